"""Export big_mm two-tower models to Hugging Face transformers / open_clip / npz, and import
HF SigLIP / CLIP safetensors and big_vision-style npz back into big_mm parameter trees.

  from big_mm import export
  export.export_hf(params, config.model, "out/", arch="siglip", tokenizer="x.model")
  export.export_open_clip(params, config.model, "out/")
  export.export_npz(params, "out/model.npz")
  flat = export.load_params("out/")          # or "model.npz": {'/'-path: np.ndarray}
  flat, model_kwargs = export.load_params("out/", with_model_kwargs=True)

Only safetensors, npz (allow_pickle=False) and orbax checkpoints are ever read.
"""
from __future__ import annotations

import os

from big_mm.export.common import ExportError, flatten, stack_layers, unflatten, unstack_layers
from big_mm.export.hf import export_hf, import_hf
from big_mm.export.npz import export_npz, import_npz
from big_mm.export.open_clip import export_open_clip

FORMATS = ("hf", "open_clip", "npz")


def detect_format(path: str) -> str:
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "open_clip_config.json")):
      return "open_clip"
    if os.path.isfile(os.path.join(path, "config.json")):
      return "hf"
    raise ExportError(f"{path!r}: a directory without config.json (HF) or "
                      "open_clip_config.json (open_clip).")
  if path.endswith(".npz"):
    return "npz"
  if path.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt")):
    raise ExportError(f"{path!r}: pickled checkpoints are never loaded; convert to safetensors.")
  raise ExportError(f"{path!r}: unknown format; expected an HF directory (config.json + "
                    "model.safetensors) or a .npz file.")


def load_params(path: str, *, with_model_kwargs: bool = False, scan: bool = False):
  """Params at `path` as a flat {'/'-joined big_mm path: np.ndarray float32/...}.

  HF SiglipModel / CLIPModel directories are converted (their big_mm TwoTowers kwargs come
  back too with with_model_kwargs=True; None for npz, whose architecture is not stored).
  scan=True stacks `encoderblock_{i}` into the scan layout (`encoderblock`, leading axis).
  """
  fmt = detect_format(path)
  kwargs = None
  if fmt == "hf":
    flat, kwargs = import_hf(path)
  elif fmt == "npz":
    flat = import_npz(path)
  else:
    raise ExportError(f"{path!r}: importing open_clip exports is not supported; export the "
                      "run to npz or HF instead.")
  flat = stack_layers(flat) if scan else unstack_layers(flat)
  return (flat, kwargs) if with_model_kwargs else flat


__all__ = ["ExportError", "FORMATS", "detect_format", "export_hf", "export_npz",
           "export_open_clip", "flatten", "import_hf", "import_npz", "load_params", "unflatten"]
