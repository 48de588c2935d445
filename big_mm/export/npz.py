"""big_mm's npz: one array per parameter, keys are '/'-joined paths (big_vision's format; its
published files, with their `params/` wrapper and older layouts, load via big_vision.py).

  export_npz(params, "model.npz");  flat = import_npz("model.npz")

Every big_mm option survives (this is the lossless format); scan=True trees are written in
their stored layout (`encoderblock/...` with a leading layers axis) unless unstack=True.
"""
from __future__ import annotations

import os
import tempfile

import numpy as np

from big_mm.export import common
from big_mm.export.common import ExportError


def export_npz(params, path: str, *, unstack: bool = False) -> str:
  flat = common.flatten(params)
  if unstack:
    flat = common.unstack_layers(flat)
  if not path.endswith(".npz"):
    raise ExportError(f"npz export path must end in .npz; got {path!r}.")
  parent = os.path.dirname(os.path.abspath(path))
  os.makedirs(parent, exist_ok=True)
  # Written beside the target and renamed over it: never a half-written .npz.
  fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".partial-", dir=parent)
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)
  except BaseException:
    os.remove(tmp)
    raise
  return path


def import_npz(path: str) -> dict[str, np.ndarray]:
  """{'/'-path: array}. Object arrays (pickles) are refused."""
  if not os.path.isfile(path):
    raise ExportError(f"npz file not found: {path!r}.")
  try:
    with np.load(path, allow_pickle=False) as data:
      return {k: np.asarray(data[k]) for k in data.files}
  except ValueError as e:
    raise ExportError(f"{path!r}: cannot read without pickle ({e}); big_mm never loads "
                      "pickled arrays.") from None
