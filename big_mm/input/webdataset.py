"""Random access to webdataset-style tar shards (as img2dataset writes them).

  src = TarSource(files.expand("/data/shards/{00000..00099}.tar"))
  len(src); src[3] -> {"image": b"\\xff\\xd8...", "text": "a dog", "key": "00000/000000003"}

A record is the group of members sharing a key (the member path up to the first "." of
its file name): `{key}.jpg|.jpeg|.png|.webp` is the image, the caption is `{key}.txt`,
else the "caption" (or "text") field of `{key}.json` (a list there: several captions,
returned as a JSON list string, which preprocess.captions reads as such).
Bad records raise `BadRecord(reason)` (sources.SKIP_REASONS), which the pipeline skips and
counts, as for every source: no image or no caption -> missing_field, an empty one ->
empty_caption, a `.txt` that is not UTF-8 -> bad_caption_encoding, a `.json` that does
not parse -> malformed_record.
Video shards (`TarSource(video=True)`, binding mode with input.modalities listing "video"):
`{key}.mp4|.webm|.avi|.mkv` is the record's "video" (encoded bytes, decoded by
big_mm/input/video.py); video and caption are each optional, a key with neither is
missing_field. Sidecars index image shards only; video shards are scanned.

Index. Opening scans each shard's tar headers once (tarfile seeks past the data; shards
are scanned in parallel threads) and keeps (offset, size) per member in memory, cached
per process by path; a record is then read with one ranged read per member. A sidecar
`{shard}.index.json`, when present and matching the shard's size, replaces the scan:
write them once with `python data/convert.py --index_only --input SHARDS` (training
never writes next to the data). Memory: ~50 bytes per record plus its key.

Records, not shards, are what the pipeline permutes and distributes over processes and
workers, so any number of shards works with any number of processes x workers (no
hang, no duplicates); shard count only affects the index scan.
"""
from __future__ import annotations

import concurrent.futures
import json
import logging
import tarfile
import threading
from typing import Any, Sequence

import fsspec
import numpy as np

from big_mm.input import files
from big_mm.input.preprocess import BadRecord

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
VIDEO_EXTS = ("mp4", "webm", "avi", "mkv")
CAPTION_FIELDS = ("caption", "text")
SIDECAR_SUFFIX = ".index.json"
_SIDECAR_FORMAT = "big_mm.tar_index.v1"
# Members kept per record: slot -> extension(s).
_IMAGE, _TXT, _JSON = 0, 1, 2

_cache: dict[str, "ShardIndex"] = {}
_cache_lock = threading.Lock()


class ShardIndex:
  """Keys and member (offset, size) of one shard; offset -1 = member absent."""

  def __init__(self, keys: list[str], offsets: np.ndarray, sizes: np.ndarray):
    self.keys, self.offsets, self.sizes = keys, offsets, sizes

  def __len__(self) -> int:
    return len(self.keys)

  def to_json(self, shard_size: int) -> dict[str, Any]:
    return {"format": _SIDECAR_FORMAT, "shard_size": shard_size, "keys": self.keys,
            "offsets": self.offsets.tolist(), "sizes": self.sizes.tolist()}

  @classmethod
  def from_json(cls, d: dict[str, Any]) -> "ShardIndex":
    n = len(d["keys"])
    return cls(list(d["keys"]), np.asarray(d["offsets"], np.int64).reshape(n, 3),
               np.asarray(d["sizes"], np.int64).reshape(n, 3))


def _split_name(name: str) -> tuple[str, str]:
  """`dir/000123.seg.jpg` -> (`dir/000123`, `seg.jpg`) (webdataset's key convention)."""
  folder, _, base = name.rpartition("/")
  stem, _, ext = base.partition(".")
  return (f"{folder}/{stem}" if folder else stem), ext.lower()


def scan_shard(path: str, image_ext: str | tuple[str, ...] | None = None) -> ShardIndex:
  """Reads the tar headers of `path` -> its ShardIndex (records in first-seen key order).
  image_ext: the media member's extension, or extensions in order of preference."""
  image_exts = (image_ext,) if isinstance(image_ext, str) else tuple(image_ext or IMAGE_EXTS)
  rows: dict[str, list[list[int]]] = {}
  exts: dict[str, str] = {}
  fs, fs_path = fsspec.core.url_to_fs(path)
  with fs.open(fs_path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tar:
    for member in tar:
      if not member.isfile():
        continue
      key, ext = _split_name(member.name)
      if ext in image_exts:
        slot = _IMAGE
      elif ext == "txt":
        slot = _TXT
      elif ext == "json":
        slot = _JSON
      else:
        rows.setdefault(key, [[-1, 0], [-1, 0], [-1, 0]])
        continue
      row = rows.setdefault(key, [[-1, 0], [-1, 0], [-1, 0]])
      if slot == _IMAGE and row[_IMAGE][0] >= 0:  # Keep the preferred image format.
        if image_exts.index(ext) >= image_exts.index(exts[key]):
          continue
      row[slot] = [member.offset_data, member.size]
      if slot == _IMAGE:
        exts[key] = ext
  keys = list(rows)
  arr = np.asarray([rows[k] for k in keys], np.int64).reshape(len(keys), 3, 2)
  return ShardIndex(keys, arr[..., 0].copy(), arr[..., 1].copy())


def sidecar_path(shard: str) -> str:
  return shard + SIDECAR_SUFFIX


def _read_sidecar(shard: str, image_ext: str | None) -> ShardIndex | None:
  fs, fs_path = fsspec.core.url_to_fs(sidecar_path(shard))
  if image_ext or not fs.exists(fs_path):  # Sidecars index the default image formats.
    return None
  try:
    d = json.loads(fs.cat_file(fs_path))
    if d.get("format") != _SIDECAR_FORMAT:
      return None
    shard_fs, shard_fs_path = fsspec.core.url_to_fs(shard)
    if int(d["shard_size"]) != int(shard_fs.size(shard_fs_path)):
      logging.warning("Ignoring stale tar index %s (shard size changed).", fs_path)
      return None
    return ShardIndex.from_json(d)
  except (ValueError, KeyError) as e:
    logging.warning("Ignoring unreadable tar index %s: %s", fs_path, e)
    return None


def write_sidecar(shard: str) -> str:
  """Scans `shard` and writes `{shard}.index.json`; returns its path."""
  index = scan_shard(shard)
  fs, fs_path = fsspec.core.url_to_fs(shard)
  out = sidecar_path(shard)
  with fsspec.open(out, "w") as f:
    json.dump(index.to_json(int(fs.size(fs_path))), f)
  return out


def load_index(shard: str, image_ext: str | None = None) -> ShardIndex:
  """The shard's index: from this process's cache, its sidecar, or a header scan."""
  cache_key = f"{shard}\0{image_ext or ''}"
  with _cache_lock:
    if cache_key in _cache:
      return _cache[cache_key]
  index = _read_sidecar(shard, image_ext)
  if index is None:
    try:
      index = scan_shard(shard, image_ext)
    except (tarfile.TarError, OSError) as e:
      raise ValueError(f"Cannot read tar shard {shard!r}: {type(e).__name__}: {e}. "
                       f"Remove it from the shard list or re-create it.") from e
  with _cache_lock:
    _cache[cache_key] = index
  return index


class TarSource:
  """All records of a list of tar shards, in shard order then key order."""

  def __init__(self, shards: Sequence[str], *, image_column: str | None = None,
               text_column: str | None = None, num_threads: int = 16, video: bool = False):
    """image_column: image extension to use (default: jpg, jpeg, png, webp in that order of
    preference); text_column: caption field of `{key}.json`, or "txt" (default: `{key}.txt`,
    else json "caption" / "text"); video: read video members (VIDEO_EXTS, or image_column's
    extension) as the optional field "video" instead of the image, the caption optional."""
    self.shards, self.video = list(shards), video
    self.image_ext = image_column.lower().lstrip(".") if image_column else None
    if video and not self.image_ext:
      self.image_ext = VIDEO_EXTS
    self.text_column = text_column
    workers = max(1, min(num_threads, len(self.shards)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
      self._indexes = list(pool.map(lambda s: load_index(s, self.image_ext), self.shards))
    self._starts = np.cumsum([0] + [len(ix) for ix in self._indexes])

  def __len__(self) -> int:
    return int(self._starts[-1])

  def _caption(self, shard: str, key: str, offsets, sizes) -> str | None:
    """The record's caption (a JSON list string: several, from a json list), "" if empty,
    None if absent; BadRecord for bytes that are not UTF-8 or a .json that does not
    parse."""
    field = self.text_column
    if field in (None, "txt") and offsets[_TXT] >= 0:
      data = files.read_range(shard, offsets[_TXT], sizes[_TXT])
      try:
        return data.decode("utf-8").strip()
      except UnicodeDecodeError as e:
        raise BadRecord("bad_caption_encoding", f"{key}.txt in {shard}: {e}") from None
    if field == "txt" or offsets[_JSON] < 0:
      return None
    try:
      meta = json.loads(files.read_range(shard, offsets[_JSON], sizes[_JSON]))
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError.
      raise BadRecord("malformed_record", f"{key}.json in {shard}: {type(e).__name__}: "
                                          f"{e}") from None
    values = [meta.get(name) for name in ((field,) if field else CAPTION_FIELDS)
              if isinstance(meta, dict)]
    value = next((v for v in values if v not in (None, "", [])), None)
    if value is None:
      return "" if any(v is not None for v in values) else None
    if isinstance(value, list):  # Several captions: a JSON list, as preprocess reads them.
      value = [str(v).strip() for v in value if v is not None]
      return json.dumps(value, ensure_ascii=False) if any(value) else ""
    return str(value).strip()

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    s = int(np.searchsorted(self._starts, index, side="right")) - 1
    shard, ix, i = self.shards[s], self._indexes[s], index - int(self._starts[s])
    key, offsets, sizes = ix.keys[i], ix.offsets[i], ix.sizes[i]
    if self.video:
      return self._video_record(shard, key, offsets, sizes)
    if offsets[_IMAGE] < 0:
      want = self.image_ext or "|".join(IMAGE_EXTS)
      raise BadRecord("missing_field", f"no image ({want}) for key {key!r} in {shard}")
    text = self._caption(shard, key, offsets, sizes)
    if text is None:
      raise BadRecord("missing_field", f"no caption for key {key!r} in {shard} "
                      f"(looked for {key}.txt or json field "
                      f"{self.text_column or ' / '.join(CAPTION_FIELDS)})")
    if not text:
      raise BadRecord("empty_caption", f"empty caption for key {key!r} in {shard}")
    image = files.read_range(shard, offsets[_IMAGE], sizes[_IMAGE])
    return {"image": image, "text": text, "key": key}

  def _video_record(self, shard: str, key: str, offsets, sizes) -> dict[str, Any]:
    """{"video": bytes | None, "text": caption | None, "key"}; neither: missing_field."""
    text = self._caption(shard, key, offsets, sizes)
    if text == "":
      raise BadRecord("empty_caption", f"empty caption for key {key!r} in {shard}")
    video = (files.read_range(shard, offsets[_IMAGE], sizes[_IMAGE]) if offsets[_IMAGE] >= 0
             else None)
    if video is None and text is None:
      exts = (self.image_ext,) if isinstance(self.image_ext, str) else self.image_ext
      raise BadRecord("missing_field", f"no video ({'|'.join(exts)}) and no caption for key "
                      f"{key!r} in {shard}")
    return {"video": video, "text": text, "key": key}

  def __repr__(self):
    return f"TarSource({len(self.shards)} shards, {len(self)} records)"


def write_sidecars(shards: Sequence[str], num_threads: int = 16) -> list[str]:
  """Writes the index sidecar of every shard (in parallel)."""
  with concurrent.futures.ThreadPoolExecutor(max(1, min(num_threads, len(shards)))) as pool:
    return list(pool.map(write_sidecar, shards))
