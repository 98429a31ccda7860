"""The data pipeline: files -> rows -> examples -> token ids + labels -> (packed rows) -> batches.

Each stage is a small function or class in its own module so that it can be tested alone:
  files.py       which files a data entry names (globs, saved datasets, dataset repos), and their formats
  sources.py     stream a file's rows (JSONL, JSON, Parquet, CSV, text), resumably
  json_array.py  the items of a JSON array, found as its text streams in
  stream.py      per-rank row streams with a cursor: epochs, file order, sharding, shuffle, mixing
  formats.py     a row of a given format -> text segments, each with or without loss
  tokens.py      segments -> input_ids and labels (-100 where no loss), fitted to max_seq_len
  batching.py    examples -> padded batches, or packed rows
  plan.py        which files the run reads (rank 0's plan, followed by every rank, saved with the cursor)
  pipeline.py    the stages put together, with one state_dict for exact resume
  cursor.py      a saved cursor is input: checked against the spec before a row is read
  counting.py    the data's own counts: steps of an epoch-based run, data metrics
"""
