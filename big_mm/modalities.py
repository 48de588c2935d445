"""The modality contract: one table saying how each modality is read, batched and encoded.

Every part of big_mm that handles a modality looks it up here by name (`get(name)`): the
input pipeline (which record field, which dtype and per-example shape), the objectives (which
batch key; example batches for init), towers models (which tower encodes it by default and
under which param scope), MultiMAE (which adapter kind) and the evaluators.

Batch conventions for a modality with batch key K:
  batch[K]             the data, [B, ...] (`Modality.example_shape` gives one example's shape)
  batch[K + "_present"] int32 [B]: 1 where the record has the modality (optional modalities;
                        absent ones are zeros of the right shape)
  batch[K + "_mask"]   bool [B, N]: True at real (non-padding) positions of a variable-length
                        input (native-aspect patches, audio frames, video clips)
  batch[K + "_shape"]  int32 [B, k]: per-example shape metadata of a variable-length input
                        (e.g. the patch grid)
`present_key`, `mask_key` and `shape_key` spell them; `model_input(batch, name)` is what a
tower gets: batch[K], or {"x": batch[K], "mask": ..., "shape": ...} when the batch has them.

Token modalities (kind CODES: "tok_rgb", "tok_depth", "tok_semseg"; 4M, Mizrahi et al. 2023)
are a tokenizer's code grid of the record's image / depth / semseg, flattened row-major, int32
[N], stored in the record under the modality's name (tools/tokenize_dataset.py writes them
with big_mm.models.vq tokenizers). The pipeline passes them through untouched (no pp op
may move the pixels they encode; big_mm/input/dense.py). N is a property of the tokenizer,
not of the batch's image size or text length, so `example_shape` refuses them (the 4M
objective builds their examples from its model's token counts).

Adding a modality is one `register(Modality(...))` in its family's module (its reader,
preprocessing ops and tower live there too); docs/CONTRACTS.md shows the whole path.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Optional

import numpy as np

# How a modality's examples are shaped (drives example shapes, MultiMAE adapters, dense ops):
IMAGE = "image"    # float32 [H, W, 3] (the pipeline's pp_image output), or uint8 [0, 255]
                   # when pp_image has keep_uint8 (the tower maps it to its pixel_range)
TOKENS = "tokens"  # int32 [text_len] token ids (0 = padding)
DENSE = "dense"    # [H, W] per-pixel maps aligned with the image (depth, segmentation)
CODES = "codes"    # int32 [N] a tokenizer's code grid of an image-like modality, row-major
AUDIO = "audio"    # float32 [frames, mels] a log-mel spectrogram (big_mm/input/audio.py)
POINTS = "points"  # float32 [N, 3] a point cloud (big_mm/input/points.py)
VECTOR = "vector"  # float32 [d] a feature vector (precomputed features, Symile's bits)
VIDEO = "video"    # float32 [T, H, W, 3] a clip, or [V, T, H, W, 3]: V test views (clips x
                   # crops) whose tower features are averaged (big_mm/input/video.py)
# Kinds whose example shape is fixed by their own pp string (input.pp_modalities[name]; see
# preprocess.output_shape), not by the image size or text length.
PP_SHAPED = (AUDIO, POINTS, VECTOR, VIDEO)
KINDS = (IMAGE, TOKENS, DENSE, CODES) + PP_SHAPED


@dataclasses.dataclass(frozen=True)
class Modality:
  """name: the config name. batch_key: its key in batches. kind: one of KINDS.
  dtype: the batch dtype (image: float32, or uint8 with the pp op keep_uint8). column_key:
  the `input.*` key naming its record field (None: the source renames its column to
  `batch_key` itself, as image_column / text_column do).
  default_field: the record field when column_key is unset. tower: the default tower of a
  towers model (big_mm.models.towers.TOWERS; None: none yet). param_scope: the towers
  model's param subtree for it. aliases: other accepted names (MultiMAE's "rgb")."""
  name: str
  batch_key: str
  kind: str
  dtype: type
  column_key: Optional[str] = None
  default_field: Optional[str] = None
  tower: Optional[str] = None
  param_scope: Optional[str] = None
  aliases: tuple[str, ...] = ()

  def field(self, input_cfg) -> str:
    """The record field this modality is read from under `input_cfg` (input.columns[name]
    first, then its column_key)."""
    columns = input_cfg.get("columns") if hasattr(input_cfg, "get") else None
    if columns and columns.get(self.name):
      return columns[self.name]
    if self.column_key is None:
      return self.batch_key
    value = input_cfg.get(self.column_key) if hasattr(input_cfg, "get") else None
    return value or self.default_field

  def example_shape(self, image_hw: tuple[int, int], text_len: int) -> tuple[int, ...]:
    """One example's shape given the batch's image size and text length (not CODES: their
    length is the tokenizer's, which the objective knows)."""
    if self.kind == CODES:
      raise ValueError(f"Modality {self.name!r} holds a tokenizer's codes: its example shape "
                       f"is (num_tokens,) of that tokenizer, which the objective builds.")
    if self.kind in PP_SHAPED:
      raise ValueError(f"Modality {self.name!r} ({self.kind}): its example shape is fixed by "
                       f"its pp string, input.pp_modalities[{self.name!r}] "
                       f"(preprocess.output_shape).")
    if self.kind == IMAGE:
      return tuple(image_hw) + (3,)
    if self.kind == DENSE:
      return tuple(image_hw)
    return (int(text_len),)

  @property
  def scope(self) -> str:
    return self.param_scope or self.name


MODALITIES: dict[str, Modality] = {}
_ALIASES: dict[str, str] = {}


def register(modality: Modality) -> Modality:
  if modality.kind not in KINDS:
    raise ValueError(f"Modality {modality.name!r}: kind {modality.kind!r} is not one of {KINDS}.")
  for name in (modality.name,) + modality.aliases:
    if name in MODALITIES or name in _ALIASES:
      raise ValueError(f"Modality name {name!r} is registered twice.")
  MODALITIES[modality.name] = modality
  _ALIASES.update({a: modality.name for a in modality.aliases})
  return modality


register(Modality("image", "image", IMAGE, np.float32, tower="vit", param_scope="img",
                  aliases=("rgb",)))
register(Modality("text", "text", TOKENS, np.int32, tower="text_transformer",
                  param_scope="txt"))
register(Modality("depth", "depth", DENSE, np.float32, column_key="depth_column",
                  default_field="depth"))
register(Modality("semseg", "semseg", DENSE, np.int32, column_key="semseg_column",
                  default_field="semseg"))
# Token codes of the image, depth and semseg (record field = batch key = name).
register(Modality("tok_rgb", "tok_rgb", CODES, np.int32))
register(Modality("tok_depth", "tok_depth", CODES, np.int32))
register(Modality("tok_semseg", "tok_semseg", CODES, np.int32))
# N-modal binding (LanguageBind, ULIP-2, Symile). Record field = batch key = name unless
# input.columns says otherwise; examples shaped by input.pp_modalities[name].
register(Modality("audio", "audio", AUDIO, np.float32, tower="audio_transformer",
                  param_scope="aud"))
register(Modality("points", "points", POINTS, np.float32, tower="point_transformer",
                  param_scope="pts"))
# Video (VideoMAE V2, video-text contrastive and captioning).
register(Modality("video", "video", VIDEO, np.float32, tower="video_vit", param_scope="vid"))
# Generic feature vectors, e.g. Symile's synthetic XOR bits (data/symile_xor.py).
for _name in ("vec_a", "vec_b", "vec_c"):
  register(Modality(_name, _name, VECTOR, np.float32, tower="mlp"))


def names() -> list[str]:
  """Every accepted name (aliases included)."""
  return list(MODALITIES) + list(_ALIASES)


def get(name: str) -> Modality:
  """The modality called `name` (or an alias of it); unknown names raise ValueError listing
  the valid ones."""
  if name in MODALITIES:
    return MODALITIES[name]
  if name in _ALIASES:
    return MODALITIES[_ALIASES[name]]
  close = difflib.get_close_matches(str(name), names(), n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  raise ValueError(f"Unknown modality {name!r}.{hint} Known: {names()} (big_mm/modalities.py).")


def present_key(name: str) -> str:
  return get(name).batch_key + "_present"


def mask_key(name: str) -> str:
  return get(name).batch_key + "_mask"


def shape_key(name: str) -> str:
  return get(name).batch_key + "_shape"


def model_input(batch, name: str):
  """A tower's input for modality `name` from a batch: its array, or with a padding mask /
  shape metadata in the batch, {"x": array, "mask": ..., "shape": ...}."""
  key = get(name).batch_key
  extra = {k: batch[f(name)] for k, f in (("mask", mask_key), ("shape", shape_key))
           if f(name) in batch}
  return {"x": batch[key], **extra} if extra else batch[key]
