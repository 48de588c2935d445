"""File lists and split slicing shared by the file-backed sources (tar shards, tables).

  expand("gs://b/shards/{00000..00002}.tar")  -> ["gs://b/shards/00000.tar", ..., "...00002.tar"]
  expand("/data/*.parquet")                   -> the matching files, sorted
  parse_split("train[:95%]")                  -> ("train", (None, "95%"))

Paths are anything fsspec opens (local paths, gs://, s3://, memory://, ...). A `{split}`
placeholder in a path is replaced by the split name before expansion, so one spec can
serve `train` and `test` (`tar:/data/{split}/*.tar`).
"""
from __future__ import annotations

import itertools
import re
from typing import Any

import fsspec

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")
_SPLIT = re.compile(r"^([^\[\]]*)(?:\[([^\[\]]*)\])?$")
_BOUND = re.compile(r"^-?\d+%?$")
_GLOB_CHARS = ("*", "?", "[")


class FilesNotFound(FileNotFoundError):
  """A path pattern matched no file."""


def _brace_options(body: str) -> list[str]:
  m = _RANGE.match(body)
  if m:
    a, b = m.groups()
    width = len(a) if a.lstrip("-").startswith("0") and len(a) > 1 else 0
    step = 1 if int(b) >= int(a) else -1
    return [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
  if "," in body:
    return body.split(",")
  raise ValueError(f"Bad brace pattern {{{body}}}: use a range like {{00000..00099}} or a "
                   f"list like {{a,b,c}}.")


def expand_braces(pattern: str) -> list[str]:
  """`a{0..2}b{x,y}` -> the 6 strings, in order (numeric ranges keep zero padding)."""
  parts = _BRACE.split(pattern)  # Literal, brace body, literal, ...
  choices = [[p] if i % 2 == 0 else _brace_options(p) for i, p in enumerate(parts)]
  return ["".join(c) for c in itertools.product(*choices)]


def _has_glob(path: str) -> bool:
  return any(c in path for c in _GLOB_CHARS)


def expand(pattern: str, *, split: str | None = None, suffix: str | None = None) -> list[str]:
  """Files named by `pattern` (braces, globs, a directory, `{split}`), in a fixed order.

  A directory means its files ending in `suffix`. Raises FilesNotFound naming the pattern.
  """
  if "{split}" in pattern:
    if not split:
      raise ValueError(f"{pattern!r} has a {{split}} placeholder but no split was given.")
    pattern = pattern.replace("{split}", split)
  out = []
  for path in expand_braces(pattern):
    fs, fs_path = fsspec.core.url_to_fs(path)
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    prefix = "" if protocol in ("file", "local") else f"{protocol}://"
    if _has_glob(fs_path):
      out += [prefix + p.lstrip("/") if prefix else p for p in sorted(fs.glob(fs_path))]
    elif suffix and fs.isdir(fs_path):
      found = sorted(p for p in fs.ls(fs_path, detail=False) if p.endswith(suffix))
      out += [prefix + p.lstrip("/") if prefix else p for p in found]
    elif fs.exists(fs_path):
      out.append(path)
    else:
      raise FilesNotFound(f"{path!r} (from {pattern!r}) does not exist.")
  if not out:
    raise FilesNotFound(f"{pattern!r} matches no file"
                        + (f" ending in {suffix!r}" if suffix else "") + ".")
  return out


def parse_split(split: str | None) -> tuple[str, tuple[str | None, str | None] | None]:
  """`train[10:90%]` -> ("train", ("10", "90%")); `test` -> ("test", None).

  Bounds are example counts or percentages of the whole, as in TFDS's split slicing.
  """
  m = _SPLIT.match((split or "train").strip())
  if not m:
    raise ValueError(f"Bad split {split!r}: use a name with an optional slice, e.g. "
                     f"'train', 'train[:95%]', 'train[1000:]'.")
  name, body = m.groups()
  if body is None:
    return name, None
  start, colon, stop = body.partition(":")
  bounds = (start.strip() or None, stop.strip() or None)
  if not colon or any(b is not None and not _BOUND.match(b) for b in bounds):
    raise ValueError(f"Bad split slice {split!r}: write [start:stop] with integers or "
                     f"percentages, e.g. 'train[:95%]' or 'train[-500:]'.")
  return name, bounds


def _bound(b: str | None, n: int, default: int) -> int:
  if b is None:
    return default
  i = round(n * int(b[:-1]) / 100) if b.endswith("%") else int(b)
  return min(n, max(0, i + n if i < 0 else i))


class SliceSource:
  """Examples [start, stop) of a random-access source."""

  def __init__(self, source, bounds: tuple[str | None, str | None]):
    n = len(source)
    self.source = source
    self.start, self.stop = _bound(bounds[0], n, 0), _bound(bounds[1], n, n)
    self.stop = max(self.start, self.stop)

  def __len__(self) -> int:
    return self.stop - self.start

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} examples")
    return self.source[self.start + int(index)]

  def __repr__(self):
    return f"{self.source!r}[{self.start}:{self.stop}]"


def apply_split_slice(source, split: str | None):
  """`source` restricted to the slice in `split` (if any)."""
  _, bounds = parse_split(split)
  return source if bounds is None else SliceSource(source, bounds)


def read_range(path: str, offset: int, size: int) -> bytes:
  """`size` bytes of `path` at `offset` (one ranged read on object stores)."""
  fs, fs_path = fsspec.core.url_to_fs(path)
  return fs.cat_file(fs_path, start=offset, end=offset + size)


def read_bytes(path: str) -> bytes:
  fs, fs_path = fsspec.core.url_to_fs(path)
  return fs.cat_file(fs_path)


def join(folder: str, path: str) -> str:
  """`path` if absolute (or a URL), else `folder/path`."""
  if "://" in path or path.startswith("/"):
    return path
  return folder.rstrip("/") + "/" + path


def dirname(path: str) -> str:
  return path.rsplit("/", 1)[0] if "/" in path else "."

