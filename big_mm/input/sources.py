"""TF-free access to TFDS datasets (array_record files) with raw, undecoded image bytes.

  src = open_source("digits_captions", "train", data_dir=None)
  len(src); src[3] -> {"image": b"\\x89PNG...", "text": "handwritten 7", "label": 7, "id": 12}

Image (and Video) features are returned as encoded bytes (TFDS `SkipDecoding`), text as
`str`; everything else as TFDS decodes it (numpy scalars / arrays). Sources are
picklable (they re-open the files lazily), so grain worker processes can use them.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

# Datasets whose builder lives in this repo, with the command that builds them.
BUILD_COMMANDS = {
    "digits_captions": "python data/build_demo.py --data_dir {data_dir}",
}


def default_data_dir() -> str:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return os.fspath(tfds.core.constants.DATA_DIR) if hasattr(
      tfds.core, "constants") else os.path.expanduser("~/tensorflow_datasets")


def _base_name(name: str) -> str:
  return name.split(":")[0].split("/")[0]


def missing_dataset_message(name: str, data_dir: str | None) -> str:
  searched = data_dir or f"{default_data_dir()} (TFDS default; set TFDS_DATA_DIR or input.data_dir)"
  cmd = BUILD_COMMANDS.get(_base_name(name))
  if cmd:
    cmd = cmd.format(data_dir=data_dir or "DIR").replace(" --data_dir DIR", " [--data_dir DIR]")
  else:
    cmd = f"tfds build {name}" + (f" --data_dir {data_dir}" if data_dir else "")
  return (f"TFDS dataset {name!r} not found (prepared array_record files) in data_dir "
          f"{searched}. Build it with: {cmd}")


class DatasetNotFound(FileNotFoundError):
  """A dataset is not prepared where we looked."""


def _builder(name: str, data_dir: str | None):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # DatasetNotFoundError, and friends. (Its message lists
    # every TFDS dataset; keep only its type.)
    raise DatasetNotFound(missing_dataset_message(name, data_dir)
                          + f" [{type(e).__name__}]") from None
  if not builder.is_prepared():
    raise DatasetNotFound(missing_dataset_message(name, data_dir))
  return builder


@functools.lru_cache(maxsize=None)
def _info(name: str, data_dir: str | None):
  b = _builder(name, data_dir)
  return b.info


def _skip_decoders(features) -> dict[str, Any]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  skip = (tfds.features.Image, tfds.features.Video)
  return {k: tfds.decode.SkipDecoding() for k, f in features.items() if isinstance(f, skip)}


def num_examples(name: str, split: str, data_dir: str | None = None) -> int:
  """Number of examples of `split` (TFDS split syntax, e.g. "train[:10%]", works)."""
  return len(open_source(name, split, data_dir))


def label_names(name: str, data_dir: str | None = None, key: str = "label") -> list[str] | None:
  """Class names of the `key` ClassLabel feature, or None if there is none."""
  features = _info(name, data_dir).features
  f = features[key] if key in features.keys() else None
  return list(f.names) if f is not None and hasattr(f, "names") else None


class TfdsSource:
  """Random access to one split of a prepared TFDS dataset; raw image bytes."""

  def __init__(self, name: str, split: str, data_dir: str | None = None):
    self.name, self.split, self.data_dir = name, split, data_dir
    self._open()

  def _open(self):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    builder = _builder(self.name, self.data_dir)
    features = builder.info.features
    self._text_keys = tuple(k for k, f in features.items()
                            if isinstance(f, tfds.features.Text))
    try:
      self._ds = builder.as_data_source(split=self.split,
                                        decoders=_skip_decoders(features))
    except ValueError as e:
      raise ValueError(f"Bad split {self.split!r} for {self.name!r}: valid splits are "
                       f"{sorted(builder.info.splits.keys())} (TFDS slicing like "
                       f"'train[:90%]' works too).") from e

  def __getstate__(self):
    return {"name": self.name, "split": self.split, "data_dir": self.data_dir}

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._open()

  def __len__(self) -> int:
    return len(self._ds)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = dict(self._ds[int(index)])
    for k in self._text_keys:
      if isinstance(ex.get(k), (bytes, np.bytes_)):
        ex[k] = bytes(ex[k]).decode("utf-8")
    return ex

  def __repr__(self):
    return f"TfdsSource({self.name!r}, split={self.split!r}, data_dir={self.data_dir!r})"


def open_source(name: str, split: str, data_dir: str | None = None) -> TfdsSource:
  """Opens `split` of TFDS dataset `name` TF-free; DatasetNotFound says how to build it."""
  return TfdsSource(name, split, data_dir)
