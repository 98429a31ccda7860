"""data.prompt_template: the prompt of an instruction row, written by the user over the row's fields.

    "Instruction: {instruction}\n[[Context: {input}\n]]Response: "

`{name}` is a field's text (`{{` and `}}` are braces); a part between `[[` and `]]` is written only when
every field in it is non-empty (alpaca's optional input). A field is a name of the format's fields or
one that data.fields names; nothing else: no attribute, index, conversion or format spec, so a template
can only place text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from string import Formatter

OPTIONAL_PART = re.compile(r"\[\[(.*?)\]\]", re.DOTALL)
FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class TemplateError(ValueError):
    """A template that cannot be read; the message says where in it."""


@dataclass(frozen=True)
class Part:
    """Text pieces in order, each a literal or a field's name; optional parts need all their fields."""

    pieces: tuple[tuple[str, str | None], ...]  # (literal text, field name or None)
    optional: bool

    @property
    def fields(self) -> list[str]:
        return [name for _, name in self.pieces if name is not None]


@dataclass(frozen=True)
class PromptTemplate:
    parts: tuple[Part, ...]

    @staticmethod
    def parse(text: str) -> PromptTemplate:
        """TemplateError for unbalanced braces or brackets and for fields that are not plain names."""
        parts, at = [], 0
        for match in OPTIONAL_PART.finditer(text):
            parts += [parse_part(text[at : match.start()], False), parse_part(match.group(1), True)]
            at = match.end()
        parts.append(parse_part(text[at:], False))
        return PromptTemplate(tuple(part for part in parts if part.pieces))

    @property
    def fields(self) -> list[str]:
        """Every field the template names, in order, once."""
        return list(dict.fromkeys(name for part in self.parts for name in part.fields))

    @property
    def required(self) -> set[str]:
        """The fields outside optional parts: a row without one cannot be rendered."""
        return {name for part in self.parts if not part.optional for name in part.fields}

    def render(self, values: Mapping[str, str]) -> str:
        """The prompt for a row's values (every required field present; optional ones may be empty)."""
        out = []
        for part in self.parts:
            if part.optional and not all(values.get(name) for name in part.fields):
                continue
            out += [literal + (values[name] if name is not None else "") for literal, name in part.pieces]
        return "".join(out)


def parse_part(text: str, optional: bool) -> Part:
    if "[[" in text or "]]" in text:
        raise TemplateError(f"'[[' and ']]' must pair up, without nesting: {excerpt(text)}")
    try:
        parsed = list(Formatter().parse(text))
    except ValueError as e:  # a lone { or }
        raise TemplateError(f"{e} (write {{{{ and }}}} for braces): {excerpt(text)}") from None
    pieces = []
    for literal, name, spec, conversion in parsed:
        if name is not None and (not FIELD_NAME.fullmatch(name) or spec or conversion):
            raise TemplateError(
                f"{{{name}{'!' + conversion if conversion else ''}{':' + spec if spec else ''}}} is not a "
                "field: write {name} with a field's plain name"
            )
        pieces.append((literal, name))
    if optional and not any(name for _, name in pieces):
        raise TemplateError(f"an optional part [[...]] without a field is never left out: {excerpt(text)}")
    return Part(tuple(pieces), optional)


def unknown_fields(template: PromptTemplate, known: Iterable[str]) -> list[str]:
    return [name for name in template.fields if name not in set(known)]


def excerpt(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")
