"""big_vision `.npz` checkpoints, as published, -> flat big_mm params ('/'-joined paths).

  load("webli_en_b16_224_63724782.npz")      # SigLIP / LiT two towers: img/..., txt/..., t, b
  load("webli_en_b16_224_63724782.npz:img")  # big_vision's sub-tree syntax: img/... alone
  load("B_16-i21k-300ep-....npz")            # a plain ViT classifier: becomes img/...

What is undone, as big_vision's own loaders (utils.load_params, vit.load,
text_transformer.load) undo it:
  - the checkpoint wrapper: keys `params/...` (train checkpoints with optimizer state) or
    `opt/target/...` (old flax optimizers); released files without one are taken as they are;
  - bfloat16 arrays, which numpy stores as 2-byte void: read back as float32;
  - pre-linen module numbering in the towers (`MultiHeadDotProductAttention_1`, `LayerNorm_2`,
    `MlpBlock_3` -> `_0`, `_1`, `_0`: flax's convert_pre_linen);
  - ViT: the position embedding under `Transformer/posembed_input` or `Transformer`, a combined
    class-token + patch position table (the class token's entry is added to `cls`), and an
    inlined MAP head; text: a second position embedding under `Encoder_0` (added to the first).
A file holding a single ViT (`embedding`, `Transformer` at its root) is the image tower (`img/`)
and one holding a single text transformer (`Embed_0`, `Encoder_0`) the text tower (`txt/`); a
ViT classifier's `head` (its class logits, not a contrastive projection) is dropped and logged.
Scanned (`encoderblock` with a leading layers axis) and unscanned layouts both load
(`big_mm.export.load_params(scan=)` converts).
"""
from __future__ import annotations

import logging
import os
import re

import numpy as np

from big_mm.export import common
from big_mm.export.common import ExportError

log = logging.getLogger(__name__)

_SUBTREE = re.compile(r"^(.*\.npz):([\w/]+)$")


def split_subtree(path: str) -> tuple[str, str | None]:
  """'file.npz:img' -> ('file.npz', 'img'); 'file.npz' -> ('file.npz', None)."""
  m = _SUBTREE.match(path)
  if m and not os.path.exists(path):
    return m.group(1), m.group(2).strip("/")
  return path, None


def _as_float(a: np.ndarray) -> np.ndarray:
  if a.dtype.type is np.void:  # how np.save stores bfloat16 (big_vision utils.recover_dtype)
    if a.itemsize != 2:
      raise ExportError(f"an array of unknown void dtype {a.dtype} (big_vision stores only "
                        "bfloat16 that way).")
    import ml_dtypes
    return a.view(ml_dtypes.bfloat16).astype(np.float32)
  return a


def _natural_key(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def convert_pre_linen(tree):
  """flax.training.checkpoints.convert_pre_linen: `Name_<i>` children renumbered per Name in
  natural order (pre-linen modules were numbered across all types). A no-op on linen trees."""
  if not isinstance(tree, dict):
    return tree
  out, counts = {}, {}
  for name in sorted(tree, key=_natural_key):
    m = re.match(r"^(.*)_\d+$", name)
    new = name
    if m:
      counts[m.group(1)] = counts.get(m.group(1), -1) + 1
      new = f"{m.group(1)}_{counts[m.group(1)]}"
    out[new] = convert_pre_linen(tree[name])
  return out


def fix_vit(t: dict) -> dict:
  """big_vision vit.fix_old_checkpoints on an unflattened ViT tree."""
  tr = t.get("Transformer", {})
  if "posembed_input" in tr:
    t["pos_embedding"] = tr.pop("posembed_input")["pos_embedding"]
  if "pos_embedding" in tr:
    t["pos_embedding"] = tr.pop("pos_embedding")
  if "pos_embedding" in t:
    pe = t["pos_embedding"]
    n = pe.shape[1]
    if int(np.sqrt(n)) ** 2 + 1 == n:  # old layout: [cls] concatenated before adding posemb
      t["pos_embedding"] = pe[:, 1:]
      if "cls" in t:
        t["cls"] = t["cls"] + pe[:, :1]
  if "probe" in t:
    t["MAPHead_0"] = {k: t.pop(k) for k in
                      ("probe", "MlpBlock_0", "MultiHeadDotProductAttention_0", "LayerNorm_0")}
  return t


def fix_text(t: dict) -> dict:
  """big_vision text_transformer.load: a posemb also stored in Encoder_0 was added twice."""
  extra = t.get("Encoder_0", {}).pop("pos_embedding", None)
  if extra is not None:
    t["pos_embedding"] = t["pos_embedding"] + extra
  return t


def _is_vit(t) -> bool:
  return isinstance(t, dict) and "embedding" in t and "Transformer" in t


def _is_text(t) -> bool:
  return isinstance(t, dict) and "Embed_0" in t and "Encoder_0" in t


def load(path: str) -> dict[str, np.ndarray]:
  """A big_vision .npz (optionally `file.npz:subtree`) -> flat big_mm params (see module doc)."""
  from big_mm.export.npz import import_npz
  file, key = split_subtree(path)
  flat = {k: _as_float(v) for k, v in import_npz(file).items()}
  for wrapper in ("params/", "opt/target/"):
    if any(k.startswith(wrapper) for k in flat):
      flat = {k[len(wrapper):]: v for k, v in flat.items() if k.startswith(wrapper)}
      break
  tree = common.unflatten(flat)
  if _is_vit(tree):
    tree = {"img": tree}
    if "head" in tree["img"]:
      head = tree["img"].pop("head")
      log.info("%s: a ViT classifier; its head (%s classes) is not loaded.", file,
               np.shape(head.get("kernel", np.zeros((0, 0))))[-1])
  elif _is_text(tree):
    tree = {"txt": tree}
  # Only the towers are renamed / fixed, as big_vision's vit.load and text_transformer.load do.
  if _is_vit(tree.get("img")):
    tree["img"] = fix_vit(convert_pre_linen(tree["img"]))
  if _is_text(tree.get("txt")):
    tree["txt"] = fix_text(convert_pre_linen(tree["txt"]))
  flat = common.flatten(tree)
  if key is not None:
    sub = {k: v for k, v in flat.items() if k == key or k.startswith(key + "/")}
    if not sub:
      tops = sorted({k.split("/")[0] for k in flat})
      raise ExportError(f"{file!r} has no sub-tree {key!r} (after `:`); its top-level keys are "
                        f"{tops}.")
    flat = sub
  return flat
