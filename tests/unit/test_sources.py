"""Sources: file formats, resumable positions, unparsed skipping, expansion of globs, S3."""

from __future__ import annotations

import bz2
import csv
import gzip
import itertools
import json
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import values, write_jsonl

from job.data.files import expand, file_format
from job.data.sources import Position, Row, read_rows
from job.errors import DataError, UserError

ROWS = [{"id": str(i), "text": f"row {i}"} for i in range(10)]
CSV_ROWS = [*ROWS[:3], {"id": "3", "text": 'two\nlines, "quoted"'}, *ROWS[4:]]
TEXT_ROWS = [{"text": f"line {i}"} for i in range(10)]


def jsonl_bytes(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_zst(path: Path, data: bytes) -> None:
    zstandard = pytest.importorskip("zstandard")
    path.write_bytes(zstandard.ZstdCompressor().compress(data))


def write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_file(path: Path) -> list:
    """Write the test rows in the format path's name says; returns the values a reader must give."""
    name = path.name
    if name.endswith(".jsonl"):
        path.write_bytes(jsonl_bytes(ROWS))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl_bytes(ROWS)))
    elif name.endswith(".jsonl.bz2"):
        path.write_bytes(bz2.compress(jsonl_bytes(ROWS)))
    elif name.endswith(".jsonl.zst"):
        write_zst(path, jsonl_bytes(ROWS))
    elif name.endswith(".json"):
        path.write_text(json.dumps(ROWS, indent=1))
    elif name.endswith(".parquet"):
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=3)
    elif name.endswith(".csv"):
        write_csv(path, CSV_ROWS)
        return CSV_ROWS
    elif name.endswith(".txt"):
        path.write_text("".join(r["text"] + "\n" for r in TEXT_ROWS))
        return TEXT_ROWS
    return ROWS


NAMES = ["d.jsonl", "d.jsonl.gz", "d.jsonl.bz2", "d.jsonl.zst", "d.json", "d.parquet", "d.csv", "d.txt"]


@pytest.fixture(params=NAMES)
def written(request, tmp_path) -> tuple[str, list]:
    path = tmp_path / request.param
    return str(path), write_file(path)


def even(i: int) -> bool:
    return i % 2 == 0


# ---------------------------------------------------------------------------------------------
# every format


def test_reads_what_was_written(written):
    url, expected = written
    pairs = list(read_rows(url))
    assert values(pairs) == expected
    assert all(row.error is None and row.source == url for row, _ in pairs)
    assert [pos.row for _, pos in pairs] == list(range(1, len(expected) + 1))


def test_resume_from_every_position(written):
    url, _ = written
    full = list(read_rows(url))
    for cut in range(len(full)):
        saved = Position.from_dict(json.loads(json.dumps(full[cut][1].to_dict())))
        assert full[: cut + 1] + list(read_rows(url, saved)) == full, f"resumed after row {cut}"
    assert list(read_rows(url, full[-1][1])) == []


def test_keep_selects_rows_and_resume_still_works(written):
    url, expected = written
    kept = list(read_rows(url, keep=even))
    assert values(kept) == expected[::2]
    assert [pos.row for _, pos in kept] == list(range(1, len(expected) + 1, 2))
    for cut in range(len(kept)):
        assert kept[: cut + 1] + list(read_rows(url, kept[cut][1], keep=even)) == kept
    odd = list(read_rows(url, kept[0][1], keep=lambda i: not even(i)))
    assert values(odd) == expected[1::2]  # ranks resuming from a shared position: no row twice


def test_keep_is_asked_about_every_row_once_in_order(written):
    url, expected = written
    asked: list[int] = []
    list(read_rows(url, Position(2), keep=lambda i: asked.append(i) or even(i)))
    assert asked == list(range(2, len(expected)))


def test_a_row_is_read_again_from_where_it_starts(written):
    """What state saves in place of a row: its start, from which reading yields that very row."""
    url, _ = written
    for row, _ in read_rows(url):
        start = Position.from_dict(json.loads(json.dumps(row.start.to_dict())))
        again, _ = next(read_rows(url, start, keep=lambda i, row=row: i == row.start.row))
        assert again == row  # its start included


def test_row_numbers_of_array_formats(tmp_path):
    for name in ["d.json", "d.parquet"]:
        url = str(tmp_path / name)
        write_file(tmp_path / name)
        rows = [row for row, _ in read_rows(url, Position(4), keep=even)]
        assert [row.line for row in rows] == [5, 7, 9]
        assert rows[0].where == f"{url}:5"


def test_position_round_trip():
    assert Position.from_dict(Position(3, 120).to_dict()) == Position(3, 120)
    assert Position.from_dict({"row": 7}) == Position(7)
    assert Position().to_dict() == {"row": 0, "offset": None}


# ---------------------------------------------------------------------------------------------
# JSON Lines and text


def test_read_jsonl_line_numbers_and_errors(tmp_path):
    path = write_jsonl(
        tmp_path / "rows.jsonl",
        [{"n": 1}, "", {"n": 2}, "{not json", "   ", {"n": 3}],
    )
    rows = [row for row, _ in read_rows(str(path))]
    assert [r.line for r in rows] == [1, 3, 4, 6]
    assert [r.value for r in rows] == [{"n": 1}, {"n": 2}, None, {"n": 3}]
    assert rows[2].error is not None and rows[2].error.startswith("invalid JSON")
    assert all(r.error is None for r in rows if r.line != 4)
    assert rows[2].where == f"{path}:4"
    last = Position(5, path.stat().st_size - len(b'{"n": 3}\n'))  # where the last line begins
    assert rows[3] == Row(str(path), 6, value={"n": 3}, start=last)


def test_jsonl_blank_lines_count_as_rows_and_resume(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", [{"n": 1}, "", "", {"n": 2}, ""])
    pairs = list(read_rows(str(path)))
    assert [(row.line, pos.row) for row, pos in pairs] == [(1, 1), (4, 4)]
    assert list(read_rows(str(path), pairs[1][1])) == []
    assert [r.line for r, _ in read_rows(str(path), Position(1))] == [4]  # offset unknown: skip lines


def test_jsonl_invalid_utf8_is_a_row_error(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"n": 1}\n{"s": "\xff"}\n{"n": 3}\n')
    rows = [row for row, _ in read_rows(str(path))]
    assert [(r.line, r.value) for r in rows] == [(1, {"n": 1}), (2, None), (3, {"n": 3})]
    assert rows[1].error.startswith("invalid JSON")


def test_jsonl_offsets_are_byte_offsets(tmp_path):
    path = tmp_path / "rows.jsonl"
    # CRLF, a blank line, multibyte UTF-8, no final newline
    lines = [b'{"n": 1}\r\n', b"\n", b'{"s": "\xc3\xa9t\xc3\xa9"}\n', b'{"n": 3}']
    path.write_bytes(b"".join(lines))
    pairs = list(read_rows(str(path)))
    assert [pos for _, pos in pairs] == [
        Position(1, len(lines[0])),
        Position(3, len(b"".join(lines[:3]))),
        Position(4, len(b"".join(lines))),
    ]
    assert [r.value for r, _ in pairs] == [{"n": 1}, {"s": "été"}, {"n": 3}]


def test_jsonl_resume_seeks_without_rereading(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(jsonl_bytes(ROWS))
    _, pos = next(iter(read_rows(str(path), Position(3))))
    assert pos.offset == len(jsonl_bytes(ROWS[:4]))
    with path.open("r+b") as f:  # rows before the offset become unreadable: a resumed read never sees them
        f.write(b"\xff" * pos.offset)
    rows = [row for row, _ in read_rows(str(path), pos)]
    assert [r.value for r in rows] == ROWS[4:] and rows[0].line == 5


def test_compressed_positions_have_no_offset(tmp_path):
    path = tmp_path / "d.jsonl.gz"
    write_file(path)
    assert {pos.offset for _, pos in read_rows(str(path))} == {None}


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz"])
def test_rows_not_kept_or_before_start_are_not_parsed(tmp_path, name):
    data = jsonl_bytes(ROWS[:2]).replace(b'{"id": "1"', b'{not json "1"') + jsonl_bytes(ROWS[2:4])
    path = tmp_path / name
    path.write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    assert [row.error is not None for row, _ in read_rows(str(path))] == [False, True, False, False]
    assert values(read_rows(str(path), keep=lambda i: i != 1)) == [ROWS[0], ROWS[2], ROWS[3]]
    assert values(read_rows(str(path), Position(2))) == ROWS[2:4]


def test_read_jsonl_gzip_inferred(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write('{"n": 1}\n\n{"n": 2}\n')
    rows = [row for row, _ in read_rows(str(path))]
    assert [(r.line, r.value, r.error) for r in rows] == [(1, {"n": 1}, None), (3, {"n": 2}, None)]


def test_read_jsonl_truncated_gzip_is_a_data_error(tmp_path):
    data = gzip.compress(b"".join(b'{"n": %d}\n' % i for i in range(2000)))
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz:\d+: cannot read: EOFError") as info:
        list(read_rows(str(path)))
    assert info.value.exit_code == 3


def test_text_lines(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"\xef\xbb\xbffirst\r\n\n  \n  indented  \nbad \xff\nlast")
    rows = [row for row, _ in read_rows(str(path))]
    assert [(r.line, r.value) for r in rows] == [
        (1, {"text": "first"}),
        (4, {"text": "  indented  "}),
        (5, None),
        (6, {"text": "last"}),
    ]
    assert rows[2].error.startswith("invalid UTF-8")


# ---------------------------------------------------------------------------------------------
# CSV


def test_csv_line_numbers_multiline_fields_and_bad_rows(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('id,text\n1,a\n2,"two\nlines"\n\n3,c,extra\n4\n5,"x, ""y"""\n', newline="")
    rows = [row for row, _ in read_rows(str(path))]
    assert [(r.line, r.value, r.error) for r in rows] == [
        (2, {"id": "1", "text": "a"}, None),
        (3, {"id": "2", "text": "two\nlines"}, None),
        (6, None, "expected 2 fields, got 3"),
        (7, None, "expected 2 fields, got 1"),
        (8, {"id": "5", "text": 'x, "y"'}, None),
    ]
    resumed = [row for row, _ in read_rows(str(path), Position(2), keep=lambda i: i != 3)]
    assert [r.line for r in resumed] == [6, 8]


def test_csv_header_only_or_empty(tmp_path):
    (tmp_path / "h.csv").write_text("a,b\n")
    (tmp_path / "e.csv").write_text("")
    assert list(read_rows(str(tmp_path / "h.csv"))) == []
    assert list(read_rows(str(tmp_path / "e.csv"))) == []


def test_csv_gzip(tmp_path):
    path = tmp_path / "d.csv.gz"
    write_csv(tmp_path / "plain.csv", CSV_ROWS)
    path.write_bytes(gzip.compress((tmp_path / "plain.csv").read_bytes()))
    assert values(read_rows(str(path), Position(3))) == CSV_ROWS[3:]


# ---------------------------------------------------------------------------------------------
# JSON arrays


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[{"a": 1},\n {"a": 2,}]', r"d\.json:2:10: invalid JSON: Expecting property name"),
        ('"rows"', r"d\.json:1:1: expected a JSON array of rows, got str"),
    ],
)
def test_invalid_json_file_is_a_data_error(tmp_path, text, match):
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(DataError, match=match) as info:
        list(read_rows(str(tmp_path / "d.json")))
    assert info.value.exit_code == 3


def test_a_json_file_of_json_lines_is_read_as_json_lines(tmp_path):
    """As datasets reads .json files, which dataset repos often fill with JSON Lines."""
    (tmp_path / "d.json").write_bytes(b'\xef\xbb\xbf{"a": 1}\n{"a": 2\n{"a": 3}\n')
    rows = [row for row, _ in read_rows(str(tmp_path / "d.json"))]
    assert [(r.line, r.value, r.error) for r in rows] == [
        (1, {"a": 1}, None),
        (2, None, "invalid JSON: Expecting ',' delimiter"),
        (3, {"a": 3}, None),
    ]


def test_json_invalid_utf8_names_line_and_column(tmp_path):
    (tmp_path / "d.json").write_bytes(b'[\n {"a": "ok"},\n {"a": "\xff"}]')
    with pytest.raises(DataError, match=r"d\.json:3:9: invalid UTF-8"):
        list(read_rows(str(tmp_path / "d.json")))


# ---------------------------------------------------------------------------------------------
# Parquet


def test_parquet_reads_one_row_group_at_a_time(tmp_path, groups_read):
    path = tmp_path / "d.parquet"
    write_file(path)  # 10 rows in groups of 3: [0-2] [3-5] [6-8] [9]
    assert values(read_rows(str(path))) == ROWS
    assert groups_read == [[0], [1], [2], [3]]

    groups_read.clear()
    assert values(read_rows(str(path), Position(7))) == ROWS[7:]
    assert groups_read == [[2], [3]]  # groups before the start are not read

    groups_read.clear()
    assert values(read_rows(str(path), keep=lambda i: i in (1, 9))) == [ROWS[1], ROWS[9]]
    assert groups_read == [[0], [3]]  # nor groups without a row kept


def test_parquet_batches_within_a_group(tmp_path, monkeypatch):
    monkeypatch.setattr("job.data.sources.PARQUET_BATCH_ROWS", 2)
    rows = [{"n": i} for i in range(25)]
    path = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    pairs = list(read_rows(str(path), Position(4), keep=lambda i: i % 3 == 0))
    assert [(row.line, row.value, pos.row) for row, pos in pairs] == [
        (i + 1, {"n": i}, i + 1) for i in range(6, 25, 3)
    ]


def test_not_parquet_is_a_data_error(tmp_path):
    (tmp_path / "d.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"d\.parquet:1: cannot read: ArrowInvalid"):
        list(read_rows(str(tmp_path / "d.parquet")))


# ---------------------------------------------------------------------------------------------
# formats from names, expansion


@pytest.mark.parametrize(
    ("name", "fmt"),
    [
        ("a.jsonl", "jsonl"),
        ("s3://b/x/a.NDJSON.gz", "jsonl"),
        ("a.jsonl.zst", "jsonl"),
        ("a.json.bz2", "json"),
        ("a.parquet", "parquet"),
        ("a.pq", "parquet"),
        ("a.csv.xz", "csv"),
        ("a.txt", "text"),
        ("a.text.gz", "text"),
    ],
)
def test_file_format(name, fmt):
    assert file_format(name) == fmt


@pytest.mark.parametrize("name", ["a.md", "README", "a.gz", "a.jsonl.tar", "dir.jsonl/a.avro"])
def test_unsupported_file_format(name):
    with pytest.raises(UserError, match=r"unsupported file type; supported: \.jsonl, \.ndjson, \.json"):
        file_format(name)


def test_compressed_parquet_is_refused():
    with pytest.raises(UserError, match=r"a\.parquet\.gz: a Parquet file cannot be read through gzip"):
        file_format("a.parquet.gz")


def test_expand_unsupported_file_names_the_key_and_file(tmp_path):
    write_jsonl(tmp_path / "d" / "a.jsonl", [{"n": 1}])
    (tmp_path / "d" / "notes.md").write_text("hi")
    with pytest.raises(UserError, match=r"^data\.train\[1\]: \S*/d/notes\.md: unsupported file type") as info:
        expand(["d/a.jsonl", "d/*"], "data.train")
    assert info.value.exit_code == 2


def test_expand_glob_sorted(tmp_path):
    for name in ["c.jsonl", "a.jsonl", "b.jsonl", "skip.txt"]:
        write_jsonl(tmp_path / "d" / name, [{"n": 1}])
    (tmp_path / "d" / "dir.jsonl").mkdir()  # a directory is not a file
    files = expand(["d/*.jsonl"], "data.train")
    assert [Path(f).name for f in files] == ["a.jsonl", "b.jsonl", "c.jsonl"]
    assert all(Path(f).resolve() == (tmp_path / "d" / Path(f).name).resolve() for f in files)


def test_expand_keeps_pattern_order(tmp_path):
    write_jsonl(tmp_path / "z.jsonl", [{"n": 1}])
    write_jsonl(tmp_path / "a.jsonl", [{"n": 1}])
    files = expand(["z.jsonl", "a.jsonl"], "data.train")
    assert [Path(f).name for f in files] == ["z.jsonl", "a.jsonl"]


def test_expand_missing_file_names_the_key(tmp_path):
    with pytest.raises(UserError) as info:
        expand(["missing.jsonl"], "data.train")
    assert info.value.exit_code == 2
    assert str(info.value).startswith("data.train[0]: no such file: missing.jsonl")

    write_jsonl(tmp_path / "ok.jsonl", [{"n": 1}])
    with pytest.raises(UserError, match=r"^data\.eval\[1\]: no such file: none-\*\.jsonl"):
        expand(["ok.jsonl", "none-*.jsonl"], "data.eval")


# --- datasets' save_to_disk --------------------------------------------------------------------


def saved_dataset(target: str, n: int, **storage) -> None:
    from datasets import Dataset

    Dataset.from_list([{"n": i, "text": f"row {i}"} for i in range(n)]).save_to_disk(target, **storage)


def test_a_saved_dataset_is_a_source_read_by_index_and_resumed_exactly(isolated):
    saved_dataset(str(isolated / "ds"), 2500)
    assert expand([str(isolated / "ds"), str(isolated / "d*")], "data.train") == [str(isolated / "ds")] * 2
    rows = list(read_rows(str(isolated / "ds"), keep=lambda i: i % 3 == 0))
    assert [r.value["n"] for r, _ in rows] == list(range(0, 2500, 3))
    assert rows[1][0].where == f"{isolated / 'ds'}:4"
    cut = rows[400][1]  # the Position after a row in the second batch of 1024
    resumed = list(read_rows(str(isolated / "ds"), cut, keep=lambda i: i % 3 == 0))
    assert [r.value for r, _ in resumed] == [r.value for r, _ in rows[401:]]


def test_a_saved_dataset_dict_names_its_splits(isolated):
    from datasets import Dataset, DatasetDict

    DatasetDict({"train": Dataset.from_list([{"n": 1}])}).save_to_disk(str(isolated / "dd"))
    with pytest.raises(UserError, match="holds a DatasetDict; name one split's directory"):
        expand([str(isolated / "dd")], "data.train")
    assert expand([str(isolated / "dd" / "train")], "data.train") == [str(isolated / "dd" / "train")]


# ---------------------------------------------------------------------------------------------
# rows over data.max_row_bytes, CSV fields over the csv module's limit, streaming JSON arrays

EDGES = [{"text": "first"}, {"text": "x" * 3000}, {"text": "last"}]  # the middle row is over 1000 bytes


def write_as(path: Path, rows: list[dict]) -> None:
    """Rows in the format path's name says (a .json file as an array), gzipped for a .gz name."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".jsonl"):
        data = jsonl_bytes(rows)
    elif name.endswith(".json"):
        data = json.dumps(rows, indent=1).encode()
    elif name.endswith(".txt"):
        data = "".join(r["text"] + "\n" for r in rows).encode()
    else:
        write_csv(path, rows)
        data = path.read_bytes()
    path.write_bytes(gzip.compress(data, compresslevel=1) if path.name.endswith(".gz") else data)


@pytest.mark.parametrize(
    "name", ["d.jsonl", "d.jsonl.gz", "d.txt", "d.csv", "d.csv.gz", "d.json", "d.json.gz"]
)
def test_a_row_over_max_row_bytes_is_a_bad_row_and_reading_goes_on(tmp_path, name):
    """Parquet: test_parquet_rows_over_max_row_bytes."""
    url = str(tmp_path / name)
    write_as(tmp_path / name, EDGES)
    full = list(read_rows(url, max_row_bytes=1000))
    rows = [row for row, _ in full]
    assert [r.value for r in rows] == [EDGES[0], None, EDGES[2]]
    line = 3 if ".csv" in name else 2  # CSV: the record's line, after the header
    assert rows[1].where == f"{url}:{line}"
    assert rows[1].error == "longer than data.max_row_bytes (1000 bytes)"
    for cut in range(len(full)):  # the cursor moves past it: a resumed read goes on after it
        assert full[: cut + 1] + list(read_rows(url, full[cut][1], max_row_bytes=1000)) == full
    assert values(read_rows(url, max_row_bytes=10_000)) == EDGES
    assert values(read_rows(url, keep=lambda i: i != 1, max_row_bytes=1000)) == [EDGES[0], EDGES[2]]


@pytest.mark.parametrize("name", ["d.jsonl.gz", "d.txt.gz", "d.csv.gz", "d.json.gz"])
def test_a_huge_row_is_read_past_without_being_held(tmp_path, name):
    """A 64 MiB row in a small compressed file: read past in blocks, never held whole."""
    write_as(tmp_path / name, [{"text": "first"}, {"text": "x" * (64 << 20)}, {"text": "last"}])
    tracemalloc.start()
    try:
        rows = [row for row, _ in read_rows(str(tmp_path / name), max_row_bytes=1 << 20)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [r.value for r in rows] == [{"text": "first"}, None, {"text": "last"}]
    assert "max_row_bytes" in rows[1].error
    assert peak < 16 << 20


def test_parquet_rows_over_max_row_bytes(tmp_path, groups_read):
    """A row group whose uncompressed size (the file's metadata) is over max_row_bytes per row holds
    rows over the limit: it is not decoded, and all its rows are bad rows. In the groups that are
    decoded, a row is over by its Arrow size, and only that row is bad."""
    small = [{"text": f"row {i}"} for i in range(7)]
    big = {"text": "x" * 5000}
    groups = [[small[0], big], [small[1], big, *small[2:6]], [small[6]]]  # 10 KB for 2 rows, 5 KB for 6
    path, url = tmp_path / "d.parquet", str(tmp_path / "d.parquet")
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())])) as writer:
        for group in groups:
            writer.write_table(pa.Table.from_pylist(group, schema=writer.schema))
    full = list(read_rows(url, max_row_bytes=1000))
    rows = [row for row, _ in full]
    assert [r.value for r in rows] == [None, None, small[1], None, *small[2:]]
    assert [r.where for r in rows if r.error] == [f"{url}:1", f"{url}:2", f"{url}:4"]
    assert rows[0].error == rows[1].error
    assert "in a row group of 2 rows and " in rows[0].error
    assert "over data.max_row_bytes (1000 bytes) per row: not read" in rows[0].error
    assert rows[3].error == "longer than data.max_row_bytes (1000 bytes)"
    assert groups_read == [[1], [2]]
    for cut in range(len(full)):  # the cursor moves past them: a resumed read goes on after them
        assert full[: cut + 1] + list(read_rows(url, full[cut][1], max_row_bytes=1000)) == full
    assert values(read_rows(url, keep=lambda i: i > 2 and i != 3, max_row_bytes=1000)) == small[2:]
    assert values(read_rows(url, max_row_bytes=6000)) == [row for group in groups for row in group]


# Rows read in a process of their own: Arrow allocates outside tracemalloc's sight, so the peak is
# the process's high-water mark of resident memory (Linux's VmHWM; unlike ru_maxrss, not inherited
# from the parent), over what it held before reading.


def test_a_csv_record_over_max_row_bytes_is_a_bad_row_whatever_its_lines(tmp_path):
    """The limit is on the record, all its lines together: a quoted field of 200 short lines is a
    record of 100 KB, over a limit of 1000 bytes, though each line is under it."""
    long = {"text": "\n".join(["y" * 499] * 200), "n": "2"}
    path, url = tmp_path / "d.csv", str(tmp_path / "d.csv")
    write_csv(path, [{"text": "first", "n": "1"}, long, {"text": "last", "n": "3"}])
    full = list(read_rows(url, max_row_bytes=1000))
    rows = [row for row, _ in full]
    assert [(r.line, r.value) for r in rows] == [
        (2, {"text": "first", "n": "1"}),
        (3, None),
        (203, {"text": "last", "n": "3"}),
    ]
    assert rows[1].error == "longer than data.max_row_bytes (1000 bytes)"
    for cut in range(len(full)):
        assert full[: cut + 1] + list(read_rows(url, full[cut][1], max_row_bytes=1000)) == full
    assert values(read_rows(url, max_row_bytes=200_000))[1] == long


def test_a_csv_field_over_the_csv_modules_limit_is_a_bad_row(tmp_path):
    limit = csv.field_size_limit()
    quoted = '"' + 'a, ""b""\n' * (limit // 7 + 1) + '"'  # 'a, "b"\n' over and over: over the limit
    path = tmp_path / "d.csv"
    path.write_text(f"text,n\nfirst,1\n{'y' * (limit + 1)},2\n{quoted},3\nlast,4\n", newline="")
    full = list(read_rows(str(path)))
    rows = [row for row, _ in full]
    assert [(r.line, r.value) for r in rows] == [
        (2, {"text": "first", "n": "1"}),
        (3, None),
        (4, None),
        (5 + quoted.count("\n"), {"text": "last", "n": "4"}),
    ]
    assert rows[1].error == rows[2].error == f"field larger than field limit ({limit})"
    for cut in range(len(full)):
        assert full[: cut + 1] + list(read_rows(str(path), full[cut][1])) == full
    assert [r.line for r, _ in read_rows(str(path), keep=lambda i: i == 3)] == [5 + quoted.count("\n")]


@pytest.mark.parametrize("block", [1, 2, 3, 7, 64])
def test_json_array_items_are_found_across_blocks(tmp_path, monkeypatch, block):
    monkeypatch.setattr("job.data.sources.BUFFER_SIZE", block)
    items = [
        {"text": 'a ] } , [ { " \\ \\" \\\\'},
        {"nested": [[1, [2]], {"k": {"l": []}}], "été": "日本 😀"},
        "scalar",
        12.5,
        None,
        [],
        {},
    ]
    text = "\ufeff [\n" + ",\n\t".join(json.dumps(i, ensure_ascii=False) for i in items) + "\n]\n"
    (tmp_path / "d.json").write_bytes(text.encode())
    pairs = list(read_rows(str(tmp_path / "d.json")))
    assert values(pairs) == items
    assert [(row.line, pos.row) for row, pos in pairs] == [(i + 1, i + 1) for i in range(len(items))]
    (tmp_path / "e.json").write_text(" [ ] ")
    assert list(read_rows(str(tmp_path / "e.json"))) == []


def test_the_first_rows_of_a_big_json_array_come_before_the_rest_is_read(tmp_path):
    items = [{"text": f"row {i}", "pad": "p" * 100} for i in range(200_000)]  # about 25 MB
    (tmp_path / "d.json").write_text(json.dumps(items))
    tracemalloc.start()
    try:
        first = [row.value for row, _ in itertools.islice(read_rows(str(tmp_path / "d.json")), 10)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert first == items[:10]
    assert peak < 8 << 20


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('[{"a": 1},\n {"a": 2}', r"d\.json:2:10: invalid JSON: the array is not closed"),
        (
            '[{"a": 1}]\n[{"a": 2}]',
            r"d\.json:2:1: invalid JSON: Extra data \(JSON Lines\? name the file \.jsonl\)",
        ),
        ('[{"a": 1}}', r"d\.json:1:10: invalid JSON: expected ',' or ']'"),
        ("", r"d\.json:1:1: invalid JSON: Expecting value"),
    ],
)
def test_a_broken_json_array_is_a_data_error_naming_line_and_column(tmp_path, text, match):
    (tmp_path / "d.json").write_text(text)
    with pytest.raises(DataError, match=match):
        list(read_rows(str(tmp_path / "d.json")))


def test_parquet_asks_keep_about_rows_as_it_reads_them(tmp_path, monkeypatch):
    """No index of a row group's rows is made before they are read: keep is asked batch by batch."""
    monkeypatch.setattr("job.data.sources.PARQUET_BATCH_ROWS", 2)
    pq.write_table(pa.Table.from_pylist([{"n": i} for i in range(25)]), tmp_path / "d.parquet")
    events = []
    for row, _ in read_rows(str(tmp_path / "d.parquet"), keep=lambda i: events.append(("keep", i)) or True):
        events.append(("row", row.value["n"]))
    assert events.index(("row", 0)) < events.index(("keep", 10))
    assert sorted(i for what, i in events if what == "keep") == list(range(25))
