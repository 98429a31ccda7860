"""Data formats: turn one row into text segments, each marked as carrying loss or not.

A format is a set of canonical field names; `data.fields` maps them to the user's columns.
  alpaca      instruction, optional input, output  -> prompt (no loss) + output (loss) + EOS
  completion  prompt, completion                   -> prompt (no loss) + completion (loss) + EOS
For these two, data.prompt_template writes the prompt over the row's fields (job/prompt_template.py).
  chat        messages: [{role, content}, ...]     -> the chat template's text; loss on assistant turns
  text        text                                 -> loss everywhere; long documents split into pieces
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from job.data.template_budget import TemplateTimeout, check_template, row_time_limit
from job.errors import UserError
from job.prompt_template import PromptTemplate
from job.spec import FORMAT_FIELDS, OPTIONAL_FIELDS, DataSpec

CHAT_ROLES = ("system", "user", "assistant", "tool")
SAMPLE_CONVERSATION = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


class BadRow(ValueError):
    """A row that cannot become an example; the message says why (the caller adds file:line)."""


@dataclass(frozen=True)
class Example:
    """Text segments in order, each with whether its tokens carry loss."""

    segments: tuple[tuple[str, bool], ...]
    add_bos_eos: bool = True  # completion-style formats; a chat template writes its own markers
    split_long: bool = False  # text: a long document becomes several max_seq_len pieces, not one truncated

    def to_dict(self) -> dict[str, Any]:
        """Plain values: what a formatted row holds."""
        return {
            "segments": [[text, loss] for text, loss in self.segments],
            "add_bos_eos": self.add_bos_eos,
            "split_long": self.split_long,
        }

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> Example:
        segments = tuple((str(text), bool(loss)) for text, loss in d["segments"])
        return Example(segments, bool(d["add_bos_eos"]), bool(d["split_long"]))


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _string(row: Mapping[str, Any], column: str, optional: bool) -> str:
    value = row.get(column)
    if value is None:
        if optional:
            return ""
        raise BadRow(f"missing field '{column}'")
    if not isinstance(value, str):
        raise BadRow(f"field '{column}' must be a string, got {type(value).__name__}")
    return value


class Formatter:
    """Rows of one format -> Examples. Chat needs the tokenizer for its template."""

    @classmethod
    def of(cls, data: DataSpec, tokenizer) -> Formatter:
        """The formatter data.format, data.fields, data.train_on and data.chat_template describe."""
        return cls(
            data.format, data.fields, data.train_on, tokenizer, data.chat_template, data.prompt_template
        )

    def __init__(
        self,
        data_format: str,
        fields: Mapping[str, str],
        train_on: str,
        tokenizer=None,
        chat_template=None,
        prompt_template: str | None = None,
    ):
        self.format = data_format
        self.template = PromptTemplate.parse(prompt_template) if prompt_template else None
        placed = self.template.fields if self.template else []
        names = dict.fromkeys([*FORMAT_FIELDS[data_format], *placed])
        self.columns = {name: fields.get(name, name) for name in names}
        self.optional = OPTIONAL_FIELDS | (set(placed) - self.template.required if self.template else set())
        self.prompt_loss = train_on == "all"
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        if data_format == "chat" and not (chat_template or getattr(tokenizer, "chat_template", None)):
            raise UserError(
                "data.format 'chat': the model's tokenizer has no chat template; set data.chat_template "
                "to a Jinja template (or use the alpaca, completion or text format)"
            )
        if data_format == "chat":
            template = tokenizer.get_chat_template(chat_template)  # a name picks one of the tokenizer's
            check_template(template, SAMPLE_CONVERSATION, tokenizer.special_tokens_map)
            try:
                self._render(SAMPLE_CONVERSATION, add_generation_prompt=False)
            except BadRow as e:
                raise UserError(
                    f"data.chat_template (or the tokenizer's): cannot render a conversation: {e}"
                ) from None

    def __call__(self, row: Any) -> Example:
        if not isinstance(row, Mapping):
            raise BadRow(f"expected a JSON object, got {type(row).__name__}")
        if self.format == "chat":
            return self._chat(row)
        values = {name: _string(row, column, name in self.optional) for name, column in self.columns.items()}
        if self.format == "text":
            if not values["text"].strip():
                raise BadRow(f"empty '{self.columns['text']}'")
            return Example(((values["text"], True),), split_long=True)
        if self.template:
            prompt = self.template.render(values)
        elif self.format == "alpaca":
            prompt = alpaca_prompt(values["instruction"], values["input"])
        else:
            prompt = values["prompt"]
        field = "output" if self.format == "alpaca" else "completion"
        completion = values[field]
        if not completion.strip():
            raise BadRow(f"empty '{self.columns[field]}'")
        return Example(((prompt, self.prompt_loss), (completion, True)))

    def render_prompt(self, text: str) -> str:
        """The prompt for `ftjob generate`: TEXT placed the way training placed a prompt (as the
        instruction, or the prompt field, of data.prompt_template, its other fields empty)."""
        if self.template:
            placed = "instruction" if self.format == "alpaca" else "prompt"
            return self.template.render({**dict.fromkeys(self.template.fields, ""), placed: text})
        if self.format == "alpaca":
            return alpaca_prompt(text)
        if self.format == "chat":
            return self._render([{"role": "user", "content": text}], add_generation_prompt=True)
        return text

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        from jinja2 import TemplateError

        try:
            with row_time_limit():
                return self.tokenizer.apply_chat_template(
                    messages,
                    chat_template=self.chat_template,
                    tokenize=False,
                    add_generation_prompt=add_generation_prompt,
                )
        except (TemplateError, ValueError, TemplateTimeout) as e:  # e.g. roles that must alternate
            raise BadRow(f"chat template: {e}") from None
        except MemoryError:
            raise BadRow("chat template: rendering ran out of memory") from None

    def end_of_turn(self) -> str:
        """What the chat template writes after an assistant turn's content (e.g. "<|im_end|>"), where
        generation should stop; "" for the other formats (they end with EOS)."""
        if self.format != "chat":
            return ""
        rendered = self._render(SAMPLE_CONVERSATION, add_generation_prompt=False)
        reply = SAMPLE_CONVERSATION[-1]["content"]
        return rendered[rendered.rindex(reply) + len(reply) :].strip()

    @property
    def adds_bos(self) -> bool:
        """Whether the tokenizer should add its BOS to the text: not for chat, whose template writes it."""
        return self.format != "chat"

    def _chat(self, row: Mapping[str, Any]) -> Example:
        """Segments by rendering growing prefixes of the conversation: what each assistant turn adds
        (its content and end-of-turn marker) carries loss; the rest (system, user, tool turns and the
        generation prompt before each assistant turn) does not, unless train_on is 'all'."""
        messages = self._messages(row)
        segments: list[tuple[str, bool]] = []
        done = ""
        if messages[0]["role"] == "assistant":
            raise BadRow("the conversation starts with an assistant turn: there is nothing to respond to")
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], add_generation_prompt=True)
            turn = self._render(messages[: i + 1], add_generation_prompt=False)
            if not (prompt.startswith(done) and turn.startswith(prompt)):
                raise BadRow("the chat template does not render this conversation incrementally")
            segments += [(prompt[len(done) :], self.prompt_loss), (turn[len(prompt) :], True)]
            done = turn
        rest = self._render(messages, add_generation_prompt=False)[len(done) :]
        if rest:
            segments.append((rest, self.prompt_loss))
        return Example(tuple((text, loss) for text, loss in segments if text), add_bos_eos=False)

    def _messages(self, row: Mapping[str, Any]) -> list[dict[str, str]]:
        column = self.columns["messages"]
        messages = row.get(column)
        if not isinstance(messages, list) or not messages:
            raise BadRow(f"field '{column}' must be a non-empty list of messages")
        for n, message in enumerate(messages):
            if not isinstance(message, Mapping) or message.get("role") not in CHAT_ROLES:
                raise BadRow(f"{column}[{n}]: needs a role, one of {', '.join(CHAT_ROLES)}")
            if not isinstance(message.get("content"), str):
                raise BadRow(f"{column}[{n}]: content must be a string")
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            raise BadRow(f"field '{column}' has no assistant turn with content")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
