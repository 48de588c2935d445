"""Boxes through the input pipeline (SigLIP 2's LocCa: referring expressions and grounded
captions need each box where the model sees it).

With input.box_column set, each example's boxes and their referring expressions
(input.box_text_column) become
  batch["boxes"]    float32 [K, 4]   (ymin, xmin, ymax, xmax) in [0, 1] of the image the model
                                     sees (after every pp op); absent rows all zeros
  batch["box_text"] int32 [K, Lr]    each box's referring expression, tokenized as the
                                     captions (the pp_text ops but choose_caption, then
                                     SentencePiece, EOS, 0-padded); absent rows all zeros
with K = input.max_boxes and Lr = input.box_text_len. Present boxes come first, in record
order; a record with more than K boxes keeps its first K (counted as boxes_truncated).

Coordinates are normalised to the image: pixel column j of a W-wide image covers
x in [j / W, (j + 1) / W]. Every geometric image op of preprocess.py is an axis-aligned map
of these coordinates (`Affine`), recorded in the pp Context (`Context.geometry`) as the op
runs:
  resize, resize_small, naflex        identity (the whole image is kept, only resampled)
  central_crop, random_crop,          the crop window [top, top + h) x [left, left + w) (in
  inception_crop                      pixels of its input) becomes [0, 1]^2 (`crop`)
  flip_lr (when it flips)             x -> 1 - x (`FLIP_LR`)
  value_range, normalize              identity (photometric)
  randaugment                         refused with boxes (`check_pp`): its Rotate / Shear
                                      sub-ops are not axis-aligned maps
The loader applies the composed map (`transform`): boxes are clipped to the output image, and
a box that keeps less than MIN_VISIBLE_FRACTION of its area (its area in the record's image,
so successive crops count together) is dropped (absent row; counted as boxes_dropped).

Flip rule: a flipped image makes "the 3 on the left" name the other 3. When the composed map
flips (an odd number of flips), the words left / right, leftmost / rightmost (and Left,
LEFT, ...) are swapped in the box texts and in the caption (`swap_left_right`); "middle",
"top", "bottom" stay. Captions that order objects implicitly ("3, 7 and 1") are not fixed by
this rule: write them with a direction ("3, 7 and 1 from left to right"), as
data/digits_boxes.py does.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import numpy as np

# A box keeping less of its area in the output image is dropped.
MIN_VISIBLE_FRACTION = 0.5


class BadBoxes(ValueError):
  """A record's boxes or box texts cannot be used (the pipeline skips it as bad_boxes)."""


@dataclasses.dataclass(frozen=True)
class Affine:
  """A map of normalised image coordinates, input -> output: y' = sy * y + ty,
  x' = sx * x + tx (sx < 0: flipped left-right)."""
  sy: float = 1.0
  ty: float = 0.0
  sx: float = 1.0
  tx: float = 0.0

  def then(self, other: "Affine") -> "Affine":
    """This map followed by `other`."""
    return Affine(other.sy * self.sy, other.sy * self.ty + other.ty,
                  other.sx * self.sx, other.sx * self.tx + other.tx)

  @property
  def flipped(self) -> bool:
    return self.sx < 0


IDENTITY = Affine()
FLIP_LR = Affine(sx=-1.0, tx=1.0)


def crop(height: int, width: int, top: int, left: int, crop_height: int,
         crop_width: int) -> Affine:
  """The map of cropping rows [top, top + crop_height) and columns [left, left + crop_width)
  of a height x width image (resizing the crop afterwards changes nothing)."""
  return Affine(height / crop_height, -top / crop_height, width / crop_width, -left / crop_width)


def transform(boxes: np.ndarray, affine: Affine) -> tuple[np.ndarray, np.ndarray]:
  """float [n, 4] yxyx boxes of the input image -> (float32 [n, 4] boxes of the output image,
  clipped to [0, 1], bool [n]: whether each keeps at least MIN_VISIBLE_FRACTION of its area)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  y = boxes[:, [0, 2]] * affine.sy + affine.ty
  x = boxes[:, [1, 3]] * affine.sx + affine.tx
  out = np.stack([y.min(1), x.min(1), y.max(1), x.max(1)], axis=1)
  area = (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1])
  clipped = np.clip(out, 0.0, 1.0)
  visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
  keep = visible >= MIN_VISIBLE_FRACTION * area
  return clipped.astype(np.float32), keep


_LEFT_RIGHT = re.compile(r"\b(left|right)(most)?\b", re.IGNORECASE)


def _swap(match: re.Match) -> str:
  word = match.group(1)
  other = {"left": "right", "right": "left"}[word.lower()]
  if word.isupper():
    other = other.upper()
  elif word[0].isupper():
    other = other.capitalize()
  return other + (match.group(2) or "")


def swap_left_right(text: str) -> str:
  """The text with left <-> right and leftmost <-> rightmost swapped (whole words, case kept):
  what a left-right flip of the image does to its meaning."""
  return _LEFT_RIGHT.sub(_swap, text)


def _text(item) -> str:
  if isinstance(item, (bytes, np.bytes_)):
    try:
      return bytes(item).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadBoxes(f"box text is not UTF-8: {e}") from None
  if isinstance(item, str):
    return item
  raise BadBoxes(f"box text of type {type(item).__name__}")


def parse(boxes: Any, texts: Any) -> tuple[np.ndarray, list[str]]:
  """A record's boxes (float [n, 4] or [4n] yxyx in [0, 1], nested lists, or a JSON string)
  and box texts (n strings / UTF-8 bytes, or a JSON list string) -> (float64 [n, 4], n
  stripped texts). None boxes: no boxes. BadBoxes when they do not fit (see the checks)."""
  if boxes is None:
    return np.zeros((0, 4)), []
  if isinstance(boxes, (str, bytes)):
    try:
      boxes = json.loads(boxes)
    except ValueError as e:
      raise BadBoxes(f"boxes string is not JSON: {e}") from None
  try:
    arr = np.asarray(boxes, np.float64)
  except (TypeError, ValueError) as e:
    raise BadBoxes(f"boxes are not numbers: {e}") from None
  if arr.size % 4 or (arr.ndim == 2 and arr.shape[1] != 4) or arr.ndim > 2:
    raise BadBoxes(f"boxes of shape {arr.shape}; want [n, 4] (ymin, xmin, ymax, xmax)")
  arr = arr.reshape(-1, 4)
  if not np.isfinite(arr).all() or (arr < 0).any() or (arr > 1).any():
    raise BadBoxes("box coordinates must be finite and normalised to [0, 1]")
  if (arr[:, 2] <= arr[:, 0]).any() or (arr[:, 3] <= arr[:, 1]).any():
    raise BadBoxes("each box needs ymin < ymax and xmin < xmax")
  if texts is None:
    raise BadBoxes(f"{len(arr)} boxes but no box texts")
  if isinstance(texts, (str, bytes, np.bytes_)):
    text = _text(texts)
    try:
      texts = json.loads(text)
    except ValueError:
      texts = [text]
  if isinstance(texts, np.ndarray):
    texts = texts.tolist()
  texts = [_text(t).strip() for t in texts]
  if len(texts) != len(arr):
    raise BadBoxes(f"{len(arr)} boxes but {len(texts)} box texts")
  if not all(texts):
    raise BadBoxes("a box text is empty")
  return arr, texts


def to_batch(boxes: np.ndarray, texts: list[str], affine: Affine, *, max_boxes: int,
             tokenize) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
  """Parsed boxes and texts of the record's image -> (boxes float32 [max_boxes, 4],
  box_text int32 [max_boxes, Lr], the non-zero counts) for the output image of `affine`.
  `tokenize(list of n texts) -> (int32 [n, Lr], truncated bool [n])` (n = 0 included)."""
  counts = {"boxes_truncated": int(len(boxes) > max_boxes)}
  boxes, texts = boxes[:max_boxes], texts[:max_boxes]
  out_boxes, keep = transform(boxes, affine)
  counts["boxes_dropped"] = int((~keep).sum())
  texts = [swap_left_right(t) if affine.flipped else t for t, k in zip(texts, keep) if k]
  ids, truncated = tokenize(texts)
  counts["box_text_truncated"] = int(np.sum(truncated))
  counts = {k: v for k, v in counts.items() if v}
  out = np.zeros((max_boxes, 4), np.float32)
  out[:len(texts)] = out_boxes[keep]
  box_text = np.zeros((max_boxes, ids.shape[1]), np.int32)
  box_text[:len(texts)] = ids
  return out, box_text, counts


def check_pp(op_names) -> None:
  """ValueError if an image op moves pixels in a way boxes cannot follow (randaugment)."""
  if "randaugment" in op_names:
    raise ValueError("pp op 'randaugment' cannot be used with boxes (input.box_column): its "
                     "Rotate / Shear sub-ops move pixels in ways an axis-aligned box cannot "
                     "follow. Remove it, or unset input.box_column.")
