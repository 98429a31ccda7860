"""Data formats: turn one row into the prompt the model reads and the completion it learns.

A format is a set of canonical field names; `data.fields` maps them to the user's columns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "alpaca": ("instruction", "input", "output"),
    "completion": ("prompt", "completion"),
}
OPTIONAL_FIELDS = {"input"}


class BadRow(ValueError):
    """A row that cannot become an example; the message says why (the caller adds file:line)."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    if input_text:
        return f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def render_prompt(data_format: str, text: str) -> str:
    """The prompt for `ftjob generate`: TEXT placed the way training placed a prompt."""
    return alpaca_prompt(text) if data_format == "alpaca" else text


def _field(row: Mapping[str, Any], name: str, column: str) -> str:
    value = row.get(column)
    if value is None:
        if name in OPTIONAL_FIELDS:
            return ""
        raise BadRow(f"missing field '{column}'")
    if not isinstance(value, str):
        raise BadRow(f"field '{column}' must be a string, got {type(value).__name__}")
    return value


def to_example(row: Any, data_format: str, fields: Mapping[str, str]) -> Example:
    """One row -> Example. Raises BadRow for rows that are not objects, miss fields, or have no completion."""
    if not isinstance(row, Mapping):
        raise BadRow(f"expected a JSON object, got {type(row).__name__}")
    values = {name: _field(row, name, fields.get(name, name)) for name in FORMAT_FIELDS[data_format]}
    if data_format == "alpaca":
        example = Example(alpaca_prompt(values["instruction"], values["input"]), values["output"])
        completion_field = "output"
    else:
        example = Example(values["prompt"], values["completion"])
        completion_field = "completion"
    if not example.completion.strip():
        raise BadRow(f"empty '{fields.get(completion_field, completion_field)}'")
    return example
