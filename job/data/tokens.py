"""Example segments -> token ids and labels, fitted to max_seq_len.

Labels are aligned with input_ids as in transformers (the model shifts them); -100 marks tokens that
carry no loss. Segments are tokenized one by one, so no token merges across a prompt/response boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

from job.data.formats import Example
from job.data.sources import Position

IGNORE_INDEX = -100
# When only the first n tokens of a text are kept, the text is cut before it is tokenized (a 20 MB
# completion truncated to 2048 tokens is not tokenized whole), at (n + CUT_MARGIN) * CHARS_PER_TOKEN
# characters. A token rarely covers more than a few characters (a word, a run of spaces or digits), so
# the cut text still holds far more than n tokens; and a cut changes only the tokens at the cut (the
# last word, or the last few tokens of a long one), so the first n are those of the whole text. Should
# the cut text give fewer than n + CUT_MARGIN tokens (a text of unusually long tokens), it is
# tokenized whole instead: the n tokens kept always lie CUT_MARGIN tokens or more before a cut.
CHARS_PER_TOKEN = 32
CUT_MARGIN = 64


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    # Its row's file and Row.start, and which of the row's pieces it is: what state saves in its place.
    origin: tuple[str, Position, int] | None = None

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


@dataclass(frozen=True)
class Fitted:
    """What became of one example: the pieces to train on, and whether it was truncated or dropped."""

    pieces: list[TokenizedExample]
    truncated: bool = False
    dropped: bool = False


def tokenize(example: Example, tokenizer, max_tokens: int | None = None) -> TokenizedExample:
    """The example's token ids and labels. With max_tokens, only the first max_tokens are sure to be
    there: a segment's text may be cut before it is tokenized (see CHARS_PER_TOKEN)."""
    input_ids: list[int] = []
    labels: list[int] = []
    for i, (text, loss) in enumerate(example.segments):
        ids = _token_ids(tokenizer, text, example.add_bos_eos and i == 0, max_tokens)
        input_ids += ids
        labels += ids if loss else [IGNORE_INDEX] * len(ids)
    if example.add_bos_eos:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return TokenizedExample(input_ids, labels)


def _token_ids(tokenizer, text: str, add_special_tokens: bool, max_tokens: int | None) -> list[int]:
    if max_tokens is not None:
        cut = (max_tokens + CUT_MARGIN) * CHARS_PER_TOKEN
        if len(text) > cut:
            ids = tokenizer(text[:cut], add_special_tokens=add_special_tokens)["input_ids"]
            if len(ids) >= max_tokens + CUT_MARGIN:
                return ids
    return tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]


def fit(tokenized: TokenizedExample, max_seq_len: int, split_long: bool, truncation: str) -> Fitted:
    """Fit an example to max_seq_len: split (text), truncate keeping the head, or drop.

    A truncated example that keeps no loss-bearing token is dropped: it would teach nothing.
    """
    ids, labels = tokenized.input_ids, tokenized.labels
    if len(ids) <= max_seq_len:
        return Fitted([tokenized])
    if split_long:
        starts = range(0, len(ids), max_seq_len)
        return Fitted(
            [TokenizedExample(ids[s : s + max_seq_len], labels[s : s + max_seq_len]) for s in starts]
        )
    head = TokenizedExample(ids[:max_seq_len], labels[:max_seq_len])
    if truncation == "drop" or head.loss_tokens == 0:
        return Fitted([], dropped=True)
    return Fitted([head], truncated=True)
