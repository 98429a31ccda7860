"""The data pipeline: files -> rows -> examples (prompt, completion) -> token ids + labels -> batches.

Each stage is a small function or generator in its own module so that it can be tested alone:
  sources.py   list and read files through fsspec (rows with file:line)
  formats.py   a row of a given format -> prompt and completion text
  tokens.py    prompt and completion -> input_ids and labels (-100 where no loss)
  batching.py  examples -> padded tensors
  pipeline.py  the stages put together: sharding by rank, shuffling, bad-row budget, epochs
"""
