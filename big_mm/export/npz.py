"""big_vision-style npz: one array per parameter, keys are '/'-joined paths.

  export_npz(params, "model.npz");  flat = import_npz("model.npz")

Every big_mm option survives (this is the lossless format); scan=True trees are written in
their stored layout (`encoderblock/...` with a leading layers axis) unless unstack=True.
"""
from __future__ import annotations

import os

import numpy as np

from big_mm.export import common
from big_mm.export.common import ExportError


def export_npz(params, path: str, *, unstack: bool = False) -> str:
  flat = common.flatten(params)
  if unstack:
    flat = common.unstack_layers(flat)
  if not path.endswith(".npz"):
    raise ExportError(f"npz export path must end in .npz; got {path!r}.")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  np.savez(path, **{k: np.asarray(v) for k, v in flat.items()})
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
