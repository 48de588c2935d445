"""Random access to image-caption tables: parquet, CSV or JSONL files (one or many).

  src = TableSource(["/data/pairs.parquet"], "parquet")
  src[0] -> {"image": b"...", "text": "a dog", "key": "pairs.parquet:0"}

The image column holds encoded image bytes, a Hugging Face style {"bytes", "path"} struct,
or a path: relative paths are read relative to the table's folder, absolute paths and
URLs (gs://, s3://, ... any fsspec path) as they are. The caption column holds strings,
UTF-8 bytes (decoded) or lists of them (several captions, returned as a JSON list string,
which preprocess.captions reads as such); CSV cells are read as written
(all columns as strings: "007" stays "007"). Columns default to the first present of
IMAGE_COLUMNS / TEXT_COLUMNS (case-insensitive); set input.image_column /
input.text_column otherwise. Only those two columns are kept, in memory, once per process
(on first use after unpickling in a worker). Tables with image bytes hold them all in
memory: convert large ones to array_record (data/convert.py).

Bad rows raise `BadRecord(reason)` (sources.SKIP_REASONS), which the pipeline skips and
counts: no image or caption (null) -> missing_field, an empty caption -> empty_caption,
caption bytes that are not UTF-8 -> bad_caption_encoding. A JSONL / CSV file that pyarrow
cannot parse is re-read line by line (Python's json / csv); each line that does not parse
(bad JSON, not an object, a wrong number of CSV fields) is logged as a warning naming the
file and line, and stays a row that raises BadRecord("malformed_record"), so it is counted
like any bad record (after the file's good rows).
"""
from __future__ import annotations

import csv
import io
import json
import logging
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
_MALFORMED_SHOWN = 5  # Malformed lines of a file named in its warning.


class _Rows:
  """A table read line by line: its column names and each column as a Python list."""

  def __init__(self, rows: list[dict[str, Any]], column_names: list[str]):
    self.rows, self.column_names = rows, column_names

  def column(self, name: str) -> list[Any]:
    return [row.get(name) for row in self.rows]


def _jsonl_lines(data: bytes) -> tuple[_Rows, list[tuple[int, str]]]:
  """JSONL bytes parsed line by line -> (rows, [(line number, error)] of malformed lines)."""
  rows, names, malformed = [], {}, []
  for number, line in enumerate(data.split(b"\n"), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
      malformed.append((number, f"{type(e).__name__}: {e}"))
      continue
    if not isinstance(row, dict):
      malformed.append((number, f"a JSON {type(row).__name__}, not an object"))
      continue
    rows.append(row)
    names.update(dict.fromkeys(row))
  return _Rows(rows, list(names)), malformed


def _csv_lines(data: bytes) -> tuple[_Rows, list[tuple[int, str]]]:
  """CSV bytes parsed row by row -> (rows, [(line number, error)] of malformed rows).

  Bytes that are not UTF-8 are kept as surrogates (surrogateescape): a caption holding
  them is then a bad_caption_encoding record, not a malformed line."""
  reader = csv.reader(io.StringIO(data.decode("utf-8", "surrogateescape"), newline=""))
  header, rows, malformed = None, [], []
  while True:
    try:
      fields = next(reader)
    except StopIteration:
      break
    except csv.Error as e:
      malformed.append((reader.line_num, f"csv.Error: {e}"))
      continue
    if not fields:  # A blank line.
      continue
    if header is None:
      header = fields
    elif len(fields) != len(header):
      malformed.append((reader.line_num, f"{len(fields)} fields, the header has "
                                         f"{len(header)}"))
    else:
      rows.append(dict(zip(header, fields)))
  return _Rows(rows, header or []), malformed


def _read_table(path: str, fmt: str):
  """-> (table: .column_names and .column(name), [(line, error)] of malformed lines)."""
  if fmt not in FORMATS:
    raise ValueError(f"Unknown table format {fmt!r}; valid: {FORMATS}")
  # pylint: disable=g-import-not-at-top
  import pyarrow as pa
  import pyarrow.csv as pcsv
  import pyarrow.json as pjson
  import pyarrow.parquet as pq
  # pylint: enable=g-import-not-at-top
  try:
    with fsspec.open(path, "rb") as f:
      if fmt == "parquet":
        return pq.read_table(f), []
      if fmt == "jsonl":
        return pjson.read_json(f), []
      header = next(csv.reader([f.readline().decode("utf-8", "replace")]), [])
      f.seek(0)
      return pcsv.read_csv(f, convert_options=pcsv.ConvertOptions(
          column_types={name: pa.string() for name in header})), []
  except pa.ArrowInvalid as e:
    if fmt == "parquet":
      raise ValueError(f"Cannot read parquet file {path}: {e}. Check that it is a complete "
                       f"parquet file, or remove it from input.data.") from None
  with fsspec.open(path, "rb") as f:  # Line by line, keeping the lines that parse.
    return (_jsonl_lines if fmt == "jsonl" else _csv_lines)(f.read())


def _pick(columns: Sequence[str], wanted: str | None, defaults: Sequence[str], what: str,
          path: str, optional: bool = False) -> str | None:
  """The column holding `what`; None when `optional` and the file has none of the defaults."""
  if wanted:
    if wanted in columns:
      return wanted
    raise ValueError(f"{path}: no {what} column {wanted!r}; its columns are {list(columns)}. "
                     f"Set input.{what}_column to one of them.")
  lower = {c.lower(): c for c in columns}
  for name in defaults:
    if name in lower:
      return lower[name]
  if optional:
    return None
  raise ValueError(f"{path}: found no {what} column among {list(columns)} (looked for "
                   f"{list(defaults)}). Set input.{what}_column to the right one.")


def _value(column, row: int):
  """A cell as a Python value (arrow arrays hold arrow scalars, line-read tables values)."""
  value = column[row]
  return value.as_py() if hasattr(value, "as_py") else value


def _caption(value, key: str):
  """A caption cell (str, bytes, a list of them, a number) -> str, or a list of str."""
  if isinstance(value, (bytes, bytearray)):
    try:
      return bytes(value).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("bad_caption_encoding", f"caption of row {key}: {e}") from None
  if isinstance(value, str):
    try:
      value.encode("utf-8")  # Surrogates: bytes that are not UTF-8 (see _csv_lines).
    except UnicodeEncodeError:
      raise BadRecord("bad_caption_encoding", f"caption of row {key} is not UTF-8: "
                                              f"{value!r:.80}") from None
    return value
  if isinstance(value, (list, tuple)):
    return [_caption(v, key) for v in value if v is not None]
  return str(value)


class TableSource:
  """Rows of one or more tables (in file order), as image/text records."""

  def __init__(self, paths: Sequence[str], fmt: str, *, image_column: str | None = None,
               text_column: str | None = None, fields: Sequence[str] = ()):
    """fields (N-modal binding): further columns passed through as they are; image and text
    are then optional (a file or row without them gives None)."""
    self.paths, self.fmt = list(paths), fmt
    self.image_column, self.text_column = image_column, text_column
    self.fields = tuple(fields)
    self._columns = None
    self._lock = threading.Lock()
    self._load()

  def _load(self):
    """Reads the two columns of every file (once; threads wait for the first reader)."""
    with self._lock:
      if self._columns is not None:
        return
      # Per file: (image values, text values, [(line, error)] of malformed lines).
      columns = []
      for path in self.paths:
        table, malformed = _read_table(path, self.fmt)
        if malformed:
          shown = "; ".join(f"line {n}: {e}" for n, e in malformed[:_MALFORMED_SHOWN])
          more = (f"; and {len(malformed) - _MALFORMED_SHOWN} more"
                  if len(malformed) > _MALFORMED_SHOWN else "")
          logging.warning("%s: skipping %d malformed line(s), counted as "
                          "skipped/malformed_record: %s%s", path, len(malformed), shown, more)
        if malformed and not table.column_names:  # No line parses: nothing to pick from.
          columns.append(([], [], malformed, {}))
          continue
        names = ("image", "text") + self.fields
        picked = {f: _pick(table.column_names, column, defaults, f, path,
                           optional=bool(self.fields))
                  for f, column, defaults in (("image", self.image_column, IMAGE_COLUMNS),
                                              ("text", self.text_column, TEXT_COLUMNS))}
        picked.update({f: f for f in self.fields if f in table.column_names})
        cells = {f: table.column(c) for f, c in picked.items() if c is not None}
        cells = {f: c.combine_chunks() if hasattr(c, "combine_chunks") else c
                 for f, c in cells.items()}
        if not cells:
          raise ValueError(f"{path}: none of the columns {list(names)} (its columns: "
                           f"{table.column_names}); set input.columns / image_column / "
                           "text_column to the right ones.")
        rows = len(next(iter(cells.values())))
        columns.append((cells.get("image", [None] * rows), cells.get("text", [None] * rows),
                        malformed, {f: cells[f] for f in self.fields if f in cells}))
      self._starts = np.cumsum([0] + [len(c[0]) + len(c[2]) for c in columns])
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
    if value is None or value == "":
      raise BadRecord("missing_field", f"no image in row {key}")
    if isinstance(value, (bytes, bytearray)):
      return bytes(value)  # 0 bytes: decode skips it as empty_image.
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
    images, texts, malformed, extra = self._columns[f]
    if row >= len(images):  # A malformed line, after the file's good rows.
      number, error = malformed[row - len(images)]
      raise BadRecord("malformed_record", f"{path} line {number}: {error}")
    key = f"{path.rsplit('/', 1)[-1]}:{row}"
    if self.fields:
      return self._binding_record(images, texts, extra, row, files.dirname(path), key)
    text = _value(texts, row)
    if text is None:
      raise BadRecord("missing_field", f"no caption in row {key}")
    text = _caption(text, key)
    if not any(t.strip() for t in (text if isinstance(text, list) else [text])):
      raise BadRecord("empty_caption", f"empty caption in row {key}")
    if isinstance(text, list):  # Several captions: a JSON list, as preprocess reads them.
      text = json.dumps(text, ensure_ascii=False)
    return {"image": self._image(_value(images, row), files.dirname(path), key),
            "text": text, "key": key}

  def _binding_record(self, images, texts, extra, row, folder, key) -> dict[str, Any]:
    """A record of every column present in this row (None: absent); the caption and image
    read as image-text records read them."""
    record = {f: _value(c, row) for f, c in extra.items()}
    text, image = _value(texts, row), _value(images, row)
    record["text"] = None if text is None else _caption(text, key)
    if isinstance(record["text"], list):
      record["text"] = json.dumps(record["text"], ensure_ascii=False)
    record["image"] = None if image in (None, "") else self._image(image, folder, key)
    return {**record, "key": key}

  def column_values(self, name: str) -> list[Any]:
    """Column `name` of every row, in row order (None for malformed lines), reading only
    that column (input.language_column; big_mm/input/languages.py)."""
    out = []
    for path in self.paths:
      if self.fmt == "parquet":
        import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
        with fsspec.open(path, "rb") as f:
          columns = pq.read_schema(f).names
          if name in columns:
            f.seek(0)
            table, malformed = pq.read_table(f, columns=[name]), []
      else:
        table, malformed = _read_table(path, self.fmt)
        columns = table.column_names
        if malformed and not columns:  # No line parses (as in _load).
          out += [None] * len(malformed)
          continue
      if name not in columns:
        raise ValueError(f"{path}: no column {name!r} (input.language_column); its columns "
                         f"are {list(columns)}.")
      values = table.column(name)
      out += (values.to_pylist() if hasattr(values, "to_pylist") else list(values))
      out += [None] * len(malformed)
    return out

  def __repr__(self):
    return f"TableSource({self.fmt}, {len(self.paths)} files)"
