"""A JSON array's items, found one by one as its text streams in: never the whole file in memory, and
never an item over max_row_bytes."""

from __future__ import annotations

import codecs
import io
import json
import re
from collections.abc import Iterable, Iterator

from job.errors import DataError

JSON_STRUCTURE = re.compile(r'[][{}",]')  # what delimits the items of a JSON array, outside strings
JSON_STRING_END = re.compile(r'["\\]')  # inside a string: its end, or an escape
NON_SPACE = re.compile(r"\S")


def utf8_size(text: str) -> int:
    """text's size in UTF-8 bytes."""
    return len(text) if text.isascii() else len(text.encode())


def advance(line: int, column: int, text: str, begin: int, end: int) -> tuple[int, int]:
    """The line and column (1-based, in characters) after text[begin:end], from those at text[begin]."""
    newlines = text.count("\n", begin, end)
    if not newlines:
        return line, column + end - begin
    return line + newlines, end - text.rfind("\n", begin, end)


def text_blocks(url: str, f: io.BufferedReader, block_size: int) -> Iterator[str]:
    """A UTF-8 file's text (a leading byte-order mark dropped), block_size bytes at a time; invalid
    UTF-8 is a DataError naming its line and column."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    line, column = 1, 1
    try:
        while data := f.read(block_size):
            text = decoder.decode(data)
            line, column = advance(line, column, text, 0, len(text))
            if text:  # not a block that ends inside a character
                yield text
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as e:
        valid = e.object[: e.start].decode("utf-8")
        line, column = advance(line, column, valid, 0, len(valid))
        raise DataError(f"{url}:{line}:{column}: invalid UTF-8: {e.reason}") from None


class _JsonItem:
    """The text of an item of a JSON array, gathered block by block; none kept once over the limit."""

    def __init__(self, max_row_bytes: int):
        self.max_row_bytes = max_row_bytes
        self.pieces: list[str] = []
        self.size = 0  # in characters, which are at least as many bytes

    def add(self, piece: str) -> None:
        self.size += len(piece)
        if self.size <= self.max_row_bytes:
            self.pieces.append(piece)
        else:
            self.pieces.clear()

    def text(self) -> str | None:
        """The item's text, or None when it is over the limit."""
        if self.size > self.max_row_bytes:
            return None
        text = "".join(self.pieces)
        return text if utf8_size(text) <= self.max_row_bytes else None


def json_items(url: str, blocks: Iterable[str], max_row_bytes: int) -> Iterator[tuple[str | None, int, int]]:
    """(text, line, column) of each item of the JSON array in `blocks`, with where it begins; None in
    place of the text of an item over max_row_bytes, which is read past, never held whole. Items are
    delimited by the brackets, braces, strings and commas around them alone: json.loads checks each."""
    depth = 0  # brackets and braces open, the array's own included
    in_string = escaped = closed = False
    item, items = _JsonItem(max_row_bytes), 0
    item_at = (1, 1)  # where the item begins
    line, column = 1, 1  # where the block begins, then where `mark` is in it
    for block in blocks:
        mark = begin = 0  # begin: where the item's text in this block begins
        i = 1 if escaped else 0  # a backslash ended the last block: skip what it escapes
        escaped = False
        while True:
            if depth == 0:  # before the array, or after it
                m = NON_SPACE.search(block, i)
                if m is None:
                    break
                line, column = advance(line, column, block, mark, m.start())
                mark = m.start()
                if closed:
                    raise DataError(
                        f"{url}:{line}:{column}: invalid JSON: Extra data (JSON Lines? name the file .jsonl)"
                    )
                if m.group() != "[":
                    raise _not_an_array(url, block)
                depth, i = 1, m.end()
                begin, item_at = i, (line, column + 1)
                continue
            m = (JSON_STRING_END if in_string else JSON_STRUCTURE).search(block, i)
            if m is None:
                break
            c, i = m.group(), m.end()
            if in_string:
                if c == '"':
                    in_string = False
                elif i < len(block):
                    i += 1
                else:
                    escaped = True
            elif c == '"':
                in_string = True
            elif c in "[{":
                depth += 1
            elif depth > 1:  # inside an item: its commas are its own
                if c != ",":
                    depth -= 1
            else:  # a comma or the array's end closes the item
                line, column = advance(line, column, block, mark, m.start())
                mark = m.start()
                if c == "}":
                    raise DataError(f"{url}:{line}:{column}: invalid JSON: expected ',' or ']'")
                item.add(block[begin : m.start()])
                text = item.text()
                if c == "," or items or text is None or text.strip():  # `[ ]` has no item
                    yield text, *item_at
                    items += 1
                item = _JsonItem(max_row_bytes)
                if c == "]":
                    depth, closed = 0, True
                else:
                    begin, item_at = i, (line, column + 1)
        if depth:
            item.add(block[begin:])
        line, column = advance(line, column, block, mark, len(block))
    if depth:
        raise DataError(f"{url}:{line}:{column}: invalid JSON: the array is not closed")
    if not closed:
        raise _not_an_array(url, "")


def _not_an_array(url: str, text: str) -> DataError:
    """The error for a .json file that does not begin with an array: what it holds, if JSON at all."""
    try:
        kind = type(json.loads(text)).__name__
    except json.JSONDecodeError as e:
        return DataError(f"{url}:{e.lineno}:{e.colno}: invalid JSON: {e.msg}")
    return DataError(f"{url}:1:1: expected a JSON array of rows, got {kind}")
