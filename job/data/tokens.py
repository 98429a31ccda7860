"""Prompt and completion text -> token ids and labels.

Labels are aligned with input_ids as in transformers (the model shifts them); -100 marks tokens that
carry no loss. The completion ends with EOS so the model learns to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


@dataclass(frozen=True)
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]

    @property
    def loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def tokenize_example(
    prompt: str,
    completion: str,
    tokenizer,
    max_seq_len: int,
    train_on: str = "completion",
) -> TokenizedExample:
    """Tokenize prompt and completion separately (no merge across the boundary), append EOS.

    Longer than max_seq_len: the head is kept (prompt first, then as much completion as fits).
    """
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt_labels = list(prompt_ids) if train_on == "all" else [IGNORE_INDEX] * len(prompt_ids)
    input_ids = (list(prompt_ids) + completion_ids)[:max_seq_len]
    labels = (prompt_labels + completion_ids)[:max_seq_len]
    return TokenizedExample(input_ids, labels)
