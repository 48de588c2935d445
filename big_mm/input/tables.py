"""Random access to image-caption tables: parquet, CSV or JSONL files (one or many).

  src = TableSource(["/data/pairs.parquet"], "parquet")
  src[0] -> {"image": b"...", "text": "a dog", "key": "pairs.parquet:0"}

The image column holds encoded image bytes, a Hugging Face style {"bytes", "path"} struct,
or a path: relative paths are read relative to the table's folder, absolute paths and
URLs (gs://, s3://, ... any fsspec path) as they are. Columns default to the first
present of IMAGE_COLUMNS / TEXT_COLUMNS (case-insensitive); set input.image_column /
input.text_column otherwise. Only those two columns are loaded, into memory, once per
process (on first use after unpickling in a worker). Tables with image bytes hold them
all in memory: convert large ones to array_record (data/convert.py).
A row with an empty image or caption raises `BadRecord("missing_field")`.
"""
from __future__ import annotations

import threading
from typing import Any, Sequence

import fsspec
import numpy as np

from big_mm.input import files
from big_mm.input.preprocess import BadRecord

FORMATS = ("parquet", "csv", "jsonl")
IMAGE_COLUMNS = ("image", "jpg", "png", "webp", "img", "image_path", "path", "filepath",
                 "file_name", "filename", "url")
TEXT_COLUMNS = ("caption", "text", "txt", "alt", "title")


def _read_table(path: str, fmt: str):
  with fsspec.open(path, "rb") as f:
    if fmt == "parquet":
      import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
      return pq.read_table(f)
    if fmt == "csv":
      import pyarrow.csv as pcsv  # pylint: disable=g-import-not-at-top
      return pcsv.read_csv(f)
    if fmt == "jsonl":
      import pyarrow.json as pjson  # pylint: disable=g-import-not-at-top
      return pjson.read_json(f)
  raise ValueError(f"Unknown table format {fmt!r}; valid: {FORMATS}")


def _pick(columns: Sequence[str], wanted: str | None, defaults: Sequence[str], what: str,
          path: str) -> str:
  if wanted:
    if wanted in columns:
      return wanted
    raise ValueError(f"{path}: no {what} column {wanted!r}; its columns are {list(columns)}. "
                     f"Set input.{what}_column to one of them.")
  lower = {c.lower(): c for c in columns}
  for name in defaults:
    if name in lower:
      return lower[name]
  raise ValueError(f"{path}: found no {what} column among {list(columns)} (looked for "
                   f"{list(defaults)}). Set input.{what}_column to the right one.")


class TableSource:
  """Rows of one or more tables (in file order), as image/text records."""

  def __init__(self, paths: Sequence[str], fmt: str, *, image_column: str | None = None,
               text_column: str | None = None):
    self.paths, self.fmt = list(paths), fmt
    self.image_column, self.text_column = image_column, text_column
    self._columns = None
    self._lock = threading.Lock()
    self._load()

  def _load(self):
    """Reads the two columns of every file (once; threads wait for the first reader)."""
    with self._lock:
      if self._columns is not None:
        return
      columns = []  # Per file: (image values, text values) as pyarrow arrays.
      for path in self.paths:
        table = _read_table(path, self.fmt)
        img = _pick(table.column_names, self.image_column, IMAGE_COLUMNS, "image", path)
        txt = _pick(table.column_names, self.text_column, TEXT_COLUMNS, "text", path)
        columns.append((table.column(img).combine_chunks(), table.column(txt).combine_chunks()))
      self._starts = np.cumsum([0] + [len(c[0]) for c in columns])
      self._columns = columns

  def __getstate__(self):
    return {k: v for k, v in self.__dict__.items() if k not in ("_columns", "_starts", "_lock")}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._columns, self._lock = None, threading.Lock()

  def __len__(self) -> int:
    if self._columns is None:
      self._load()
    return int(self._starts[-1])

  def _image(self, value, folder: str, key: str) -> bytes:
    if isinstance(value, dict):  # Hugging Face datasets' Image: {"bytes", "path"}.
      value = value.get("bytes") or value.get("path")
    if value is None or value == "" or value == b"":
      raise BadRecord("missing_field", f"empty image for row {key}")
    if isinstance(value, (bytes, bytearray)):
      return bytes(value)
    return files.read_bytes(files.join(folder, str(value)))

  def __getitem__(self, index: int) -> dict[str, Any]:
    if self._columns is None:
      self._load()
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} rows")
    f = int(np.searchsorted(self._starts, index, side="right")) - 1
    row = index - int(self._starts[f])
    path = self.paths[f]
    key = f"{path.rsplit('/', 1)[-1]}:{row}"
    images, texts = self._columns[f]
    text = texts[row].as_py()
    if text is None or str(text).strip() == "":
      raise BadRecord("missing_field", f"empty caption for row {key}")
    return {"image": self._image(images[row].as_py(), files.dirname(path), key),
            "text": str(text), "key": key}

  def __repr__(self):
    return f"TableSource({self.fmt}, {len(self.paths)} files)"
