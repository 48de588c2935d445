"""Export big_mm two-tower models to Hugging Face transformers / open_clip / npz, and import
HF SigLIP / CLIP, open_clip / OpenAI CLIP and big_vision checkpoints into big_mm parameter trees.

  from big_mm import export
  export.export_hf(params, config.model, "out/", arch="siglip", tokenizer="x.model")
  export.export_open_clip(params, config.model, "out/")
  export.export_npz(params, "out/model.npz")
  flat = export.load_params("out/")          # or "model.npz": {'/'-path: np.ndarray}
  flat, model_kwargs = export.load_params("out/", with_model_kwargs=True)

What load_params reads (the formats of `config.init.path`):
  - an HF SiglipModel / CLIPModel directory (config.json + model.safetensors);
  - an open_clip directory (open_clip_config.json + open_clip_model.safetensors, or
    open_clip_pytorch_model.bin read with torch.load(weights_only=True)), e.g. OpenAI CLIP as
    open_clip publishes it (big_mm/export/open_clip.py `import_open_clip`);
  - a big_vision .npz as published (`params/` prefix or none, scanned or not, bfloat16, old
    layouts), `file.npz:img` / `:txt` for one sub-tree, a plain ViT classifier .npz as the
    image tower (big_mm/export/big_vision.py); big_mm's own npz exports are the same format.
Pickles are never unpickled: safetensors, npz with allow_pickle=False, torch weights_only=True.
Exporting and the HF / open_clip imports need `pip install -e ".[export]"` (safetensors,
transformers, torch, timm); npz needs nothing more.
"""
from __future__ import annotations

import os

from big_mm.export import big_vision
from big_mm.export.common import (ExportError, flatten, requires, stack_layers, unflatten,
                                  unstack_layers)
from big_mm.export.hf import export_hf, import_hf
from big_mm.export.npz import export_npz, import_npz
from big_mm.export.open_clip import export_open_clip, import_open_clip

FORMATS = ("hf", "open_clip", "npz")
PICKLED = (".bin", ".pt", ".pth", ".pkl", ".ckpt")


def detect_format(path: str) -> str:
  if os.path.isdir(path):
    if os.path.isfile(os.path.join(path, "open_clip_config.json")):
      return "open_clip"
    if os.path.isfile(os.path.join(path, "config.json")):
      return "hf"
    raise ExportError(f"{path!r}: a directory without config.json (HF) or "
                      "open_clip_config.json (open_clip).")
  file, _ = big_vision.split_subtree(path)
  if file.endswith(".npz"):
    return "npz"
  if path.endswith(PICKLED) or path.endswith(".safetensors"):
    if os.path.isfile(os.path.join(os.path.dirname(path) or ".", "open_clip_config.json")):
      return "open_clip"
    raise ExportError(f"{path!r}: a weights file without its architecture; give the directory "
                      "that holds it with open_clip_config.json (open_clip) or config.json (HF). "
                      "A bare pickle (.bin/.pt) is never unpickled; torch weights_only=True "
                      "is used for open_clip_pytorch_model.bin / pytorch_model.bin.")
  raise ExportError(f"{path!r}: unknown format; expected an HF directory (config.json + "
                    "model.safetensors), an open_clip directory (open_clip_config.json), or a "
                    ".npz file (optionally file.npz:img for one sub-tree).")


def load_params(path: str, *, with_model_kwargs: bool = False, scan: bool = False):
  """Params at `path` as a flat {'/'-joined big_mm path: np.ndarray float32/...}.

  HF SiglipModel / CLIPModel and open_clip directories are converted (their big_mm Towers
  kwargs come back too with with_model_kwargs=True; None for npz, whose architecture is not
  stored). scan=True stacks `encoderblock_{i}` into the scan layout (`encoderblock`, leading
  axis), scan=False unstacks.
  """
  fmt = detect_format(path)
  kwargs = None
  if fmt == "hf":
    flat, kwargs = import_hf(path)
  elif fmt == "npz":
    flat = big_vision.load(path)
  else:
    flat, kwargs = import_open_clip(path)
  flat = stack_layers(flat) if scan else unstack_layers(flat)
  return (flat, kwargs) if with_model_kwargs else flat


__all__ = ["ExportError", "FORMATS", "detect_format", "export_hf", "export_npz",
           "export_open_clip", "flatten", "import_hf", "import_npz", "import_open_clip",
           "load_params", "requires", "unflatten"]
