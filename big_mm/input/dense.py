"""Dense image-aligned modalities (depth, semantic segmentation): decoding and the joint
geometric augmentation that keeps them aligned with the image (MultiMAE, issue #8).

  pp = JointPreprocessor("decode|resize(36)|random_crop(32)|flip_lr|value_range(-1,1)|"
                         "tokenize(16)", tokenizer=tok)
  values, counts = pp({"image": png, "text": "a cat", "depth": d, "semseg": s}, rng,
                      optional=("text",))
  # values: {"image": f32 [32, 32, 3], "text": i32 [16], "depth": f32 [32, 32],
  #          "semseg": i32 [32, 32]}; an optional key absent (None) in the example is
  #          absent from values.

Record values. A dense map is a numpy array ([H, W] or [H, W, 1]), encoded image bytes
(PNG, TIFF, ...) or .npy bytes. Units:
  depth  float arrays / float ("F") images: metres, as given. uint16 arrays and 16-bit
         PNGs: millimetres (the usual depth-camera PNG convention), divided by 1000. Other
         integer depths and 8-bit images have no known unit and are rejected.
  semseg integer arrays or 1-channel images (L, P: the palette indices, 16-bit) -> int32
         class ids; float arrays only with whole-number values.
Bad maps raise preprocess.BadRecord (the pipeline skips and counts them by reason, names
of sources.SKIP_REASONS):
  corrupt_depth / corrupt_semseg      undecodable bytes, or a dtype / image mode whose
                                      meaning is unknown (8-bit depth, fractional ids)
  bad_depth_shape / bad_semseg_shape  not [H, W] / [H, W, 1] (e.g. an RGB map), empty, or
                                      H, W different from the record image's decoded H, W
  nonfinite_depth                     NaN or inf depth values

Joint augmentation. Ops run in pp-string order, as preprocess.Preprocessor runs them, and
the image and text values and rng draws are exactly the Preprocessor's. Each image op that
moves pixels (GEOMETRIC) is applied to every dense map with the same random draws: the
rng state is saved before the image op and restored for each map, then set to where the
image op left it. Depth is resampled bilinearly, semseg by nearest neighbour (PIL, so the
pixel grid matches the image's). randaugment's geometric sub-ops (Rotate, Shear*,
Translate*) move the maps too (nearest; revealed pixels get 0: no depth / class 0); its
photometric sub-ops, value_range and normalize touch only the image. `decode` decodes the
maps and checks their size against the decoded image; decode(shrink_to=...) is refused
(it shrinks JPEGs by a factor the maps cannot follow), as is any image op not listed in
OP_KINDS (check_pp, which config validation runs).
Caveat: maps are compared with the image after EXIF orientation (decode applies it); a
square image with an EXIF rotation would be rotated while its maps are not.

Token codes (modalities of kind CODES, e.g. tok_rgb) were computed from the stored image and
maps, so no op may move their pixels: with codes, check_pp(ops, codes=True) refuses flip_lr,
inception_crop, randaugment and naflex, and JointPreprocessor(..., codes=True) lets resize,
resize_small, central_crop and random_crop run only where they keep the image's size (a
no-op, e.g. resize(32) on the 32x32 images a tokenizer saw), raising ValueError otherwise.
"""
from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np
from PIL import Image

from big_mm.input import preprocess
from big_mm.input.preprocess import BadRecord

DEPTH, SEMSEG = "depth", "semseg"
DENSE = (DEPTH, SEMSEG)

# How each image op of preprocess.OPS treats dense maps.
DECODE, GEOMETRIC, RANDAUGMENT, PHOTOMETRIC = "decode", "geometric", "randaugment", "photometric"
PATCHES = "patches"  # naflex: the image becomes a patch sequence; dense maps cannot follow
OP_KINDS = {
    "decode": DECODE, "resize": GEOMETRIC, "resize_small": GEOMETRIC,
    "central_crop": GEOMETRIC, "random_crop": GEOMETRIC, "inception_crop": GEOMETRIC,
    "flip_lr": GEOMETRIC, "randaugment": RANDAUGMENT, "value_range": PHOTOMETRIC,
    "normalize": PHOTOMETRIC, "keep_uint8": PHOTOMETRIC, "naflex": PATCHES,
}
# Geometric ops allowed with token codes when they leave the image's size unchanged (then
# they are the identity); every other GEOMETRIC / RANDAUGMENT / PATCHES op moves pixels.
SIZE_OPS = ("resize", "resize_small", "central_crop", "random_crop")
_MM_PER_M = 1000.0
_INT16_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")  # 16-bit PNGs open as one of these.


# ---- decoding ----------------------------------------------------------------------------

def _raw(value, name: str) -> np.ndarray | Image.Image:
  """A record value -> a numeric array, or an opened (loaded) PIL image."""
  if isinstance(value, np.ndarray) and value.dtype.kind in "biuf":
    return value
  if isinstance(value, (list, tuple)):  # Nested lists (e.g. JSON).
    try:
      return np.asarray(value, np.float64 if name == DEPTH else None)
    except (ValueError, TypeError) as e:
      raise BadRecord(f"corrupt_{name}", f"{name} list: {e}") from None
  if isinstance(value, np.ndarray):  # Encoded bytes stored as a numpy scalar / array.
    value = value.item() if value.ndim == 0 else value.tobytes()
  if not isinstance(value, (bytes, bytearray, memoryview)):
    raise BadRecord(f"corrupt_{name}", f"{name} of type {type(value).__name__}")
  data = bytes(value)
  if not data:
    raise BadRecord(f"corrupt_{name}", "0 bytes")
  try:
    if data.startswith(b"\x93NUMPY"):
      return np.load(io.BytesIO(data), allow_pickle=False)
    im = Image.open(io.BytesIO(data))
    im.load()
    return im
  except Exception as e:  # PIL / numpy raise many types for bad bytes.
    raise BadRecord(f"corrupt_{name}", f"{type(e).__name__}: {e}") from None


def _two_d(arr: np.ndarray, name: str) -> np.ndarray:
  if arr.ndim == 3 and arr.shape[-1] == 1:
    arr = arr[..., 0]
  if arr.ndim != 2 or arr.size == 0:
    raise BadRecord(f"bad_{name}_shape", f"{name} of shape {arr.shape}; want [H, W] or "
                                         f"[H, W, 1]")
  return arr


def _image_array(im: Image.Image, name: str, modes: tuple[str, ...]) -> np.ndarray:
  if len(im.getbands()) != 1:
    raise BadRecord(f"bad_{name}_shape", f"{name} image of mode {im.mode} has "
                                         f"{len(im.getbands())} channels; want 1")
  if im.mode not in modes:
    raise BadRecord(f"corrupt_{name}", f"{name} image of mode {im.mode}; want one of {modes}")
  return np.asarray(im)


def decode_depth(value) -> np.ndarray:
  """A record's depth -> float32 [H, W] metres (see the module docstring for units)."""
  raw = _raw(value, DEPTH)
  if isinstance(raw, Image.Image):
    arr = _image_array(raw, DEPTH, _INT16_MODES + ("F",))
    if raw.mode in _INT16_MODES:
      arr = arr.astype(np.float32) / np.float32(_MM_PER_M)
  else:
    arr = raw
    if arr.dtype == np.uint16:
      arr = arr.astype(np.float32) / np.float32(_MM_PER_M)
    elif arr.dtype.kind != "f":
      raise BadRecord("corrupt_depth", f"depth array of dtype {arr.dtype}; give float metres "
                                       f"or uint16 millimetres")
  arr = _two_d(np.asarray(arr, np.float32), DEPTH)
  if not np.isfinite(arr).all():
    raise BadRecord("nonfinite_depth", f"{int((~np.isfinite(arr)).sum())} NaN/inf values")
  return arr


def decode_semseg(value) -> np.ndarray:
  """A record's semantic segmentation -> int32 [H, W] class ids."""
  raw = _raw(value, SEMSEG)
  if isinstance(raw, Image.Image):
    raw = _image_array(raw, SEMSEG, _INT16_MODES + ("L", "P", "1", "F"))
  arr = _two_d(raw, SEMSEG)
  if arr.dtype.kind == "f":
    if not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
      raise BadRecord("corrupt_semseg", "float class ids that are not whole numbers")
  if arr.dtype.kind in "iuf" and arr.size and (
      arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
    raise BadRecord("corrupt_semseg", f"class ids in [{arr.min()}, {arr.max()}] overflow int32")
  return arr.astype(np.int32)


DECODERS = {DEPTH: decode_depth, SEMSEG: decode_semseg}


def check_shape(arr: np.ndarray, name: str, image_hw: tuple[int, int]) -> None:
  """BadRecord(bad_{name}_shape) unless the map's [H, W] is the image's."""
  if arr.shape != tuple(image_hw):
    raise BadRecord(f"bad_{name}_shape", f"{name} is {arr.shape[0]}x{arr.shape[1]}, the "
                                         f"image {image_hw[0]}x{image_hw[1]}")


# ---- geometric ops on maps ------------------------------------------------------------------

def _resample(arr, name, h, w, box=None):
  """Resize (and crop to `box`=(left, top, right, bottom)): depth bilinear, semseg nearest."""
  if arr.shape == (h, w) and box is None:
    return arr
  im = Image.fromarray(arr)  # float32 -> mode F, int32 -> mode I.
  out = im.resize((w, h), Image.BILINEAR if name == DEPTH else Image.NEAREST, box=box)
  return np.asarray(out, arr.dtype)


def _inception_crop_map(arr, name, op, rng, out_hw):
  _, area_min, area_max, ratio_min, ratio_max = op.args  # size: out_hw, the image's.
  ratio_max = 1 / ratio_min if ratio_max is None else ratio_max
  top, left, ch, cw = preprocess._inception_box(  # pylint: disable=protected-access
      *arr.shape, rng, area_min / 100, area_max / 100, ratio_min, ratio_max)
  return _resample(arr, name, *out_hw, box=(left, top, left + cw, top + ch))


# randaugment sub-ops that move pixels; the matrices mirror preprocess._ra_op's.
_RA_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")


def _randaugment_map(arr, rng, num_layers, magnitude):
  """Replays preprocess._randaugment's draws; applies only its geometric sub-ops."""
  im = Image.fromarray(arr)
  w, h = im.size
  m = magnitude / preprocess.RANDAUGMENT_MAX_MAGNITUDE
  for _ in range(num_layers):
    name = preprocess.RANDAUGMENT_OPS[int(rng.integers(len(preprocess.RANDAUGMENT_OPS)))]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if name == "Rotate":
      im = im.rotate(sign * 30 * m, Image.NEAREST, fillcolor=0)
    elif name in _RA_GEOMETRIC:
      matrix = {"ShearX": (1, sign * 0.3 * m, 0, 0, 1, 0),
                "ShearY": (1, 0, 0, sign * 0.3 * m, 1, 0),
                "TranslateX": (1, 0, sign * 0.45 * m * w, 0, 1, 0),
                "TranslateY": (1, 0, 0, 0, 1, sign * 0.45 * m * h)}[name]
      im = im.transform(im.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=0)
  return np.asarray(im, arr.dtype)


def apply_to_map(op: preprocess.Op, arr: np.ndarray, name: str, rng, out_hw) -> np.ndarray:
  """The dense counterpart of image op `op` on map `arr` [H, W] (rng: in the state the image
  op started from; out_hw: the image's [H, W] after the op)."""
  if op.name in ("central_crop", "random_crop", "flip_lr"):
    return op(arr, rng)  # Pure indexing: the image op itself works on [H, W].
  if op.name in ("resize", "resize_small"):
    return _resample(arr, name, *out_hw)
  if op.name == "inception_crop":
    return _inception_crop_map(arr, name, op, rng, out_hw)
  if op.name == "randaugment":
    return _randaugment_map(arr, rng, *op.args)
  raise AssertionError(op.name)


def check_pp(ops: list[preprocess.Op], codes: bool = False) -> None:
  """ValueError if the image ops cannot be applied jointly to dense maps, or (`codes`: a
  token modality is loaded) may move the pixels that the stored token codes encode."""
  for op in ops:
    if op.key != preprocess.IMAGE:
      continue
    if (codes and op.name in OP_KINDS and OP_KINDS[op.name] in (GEOMETRIC, RANDAUGMENT, PATCHES)
        and op.name not in SIZE_OPS):
      raise ValueError(f"pp op {op.name!r} moves the image's pixels, but token codes "
                       f"(tok_* in input.modalities) were computed from the stored image and "
                       f"cannot follow; drop {op.name!r} from pp_image (with codes, only "
                       f"{', '.join(SIZE_OPS)} that keep the image's size are allowed).")
    if op.name not in OP_KINDS:
      raise ValueError(f"pp op {op.name!r}: big_mm/input/dense.py does not know whether it "
                       f"moves pixels, so dense maps (depth, semseg) cannot follow it; add it "
                       f"to dense.OP_KINDS (and apply_to_map).")
    if OP_KINDS[op.name] == PATCHES:
      raise ValueError(f"pp op {op.name!r} turns the image into a patch sequence, which dense "
                       "maps (depth, semseg) cannot follow; end pp_image with a fixed size.")
    if op.name == "decode" and op.args[1] is not None:
      raise ValueError("pp op decode(shrink_to=...) decodes JPEGs at a reduced size that "
                       "dense maps (depth, semseg) cannot follow; drop shrink_to.")


class JointPreprocessor:
  """preprocess.Preprocessor that also carries dense maps through the image's geometric
  ops (see the module docstring). Picklable."""

  def __init__(self, pp: str, *, tokenizer=None, codes: bool = False):
    self.pp = preprocess.Preprocessor(pp, tokenizer=tokenizer)
    self.codes = bool(codes)
    check_pp(self.pp.ops, codes=self.codes)

  def __call__(self, example: Mapping[str, Any], rng: np.random.Generator, *,
               optional: tuple[str, ...] = ()) -> tuple[dict[str, Any], Any]:
    """-> ({key: processed value}, counts). Keys: the pp's (image, text; one missing from
    `example` is a BadRecord unless in `optional`) and the DENSE keys given (not None)."""
    values = {}
    for key in self.pp.keys:
      if example.get(key) is not None:
        values[key] = example[key]
      elif key not in optional:
        raise BadRecord("missing_field", f"no {key!r} in the record (it has {sorted(example)})")
    maps = {k: example[k] for k in DENSE if example.get(k) is not None}
    if maps and preprocess.IMAGE not in values:
      raise ValueError(f"pp {self.pp.pp!r} runs no image ops; dense maps need the image's")
    ctx = preprocess.Context(self.pp.tokenizer)
    decoded = False
    for op in self.pp.ops:
      if op.key not in values:
        continue
      if op.key != preprocess.IMAGE:
        values[op.key] = op(values[op.key], rng, ctx)
        continue
      if not decoded and op.name != "decode":
        maps, decoded = self._decode_maps(maps, values[preprocess.IMAGE]), True
      kind = OP_KINDS[op.name]
      if self.codes and kind == GEOMETRIC:
        before_hw = values[op.key].shape[:2]
        values[op.key] = op(values[op.key], rng, ctx)
        if values[op.key].shape[:2] != before_hw:
          raise ValueError(
              f"pp op {op.name!r} changed the image from {before_hw[0]}x{before_hw[1]} "
              f"to {values[op.key].shape[0]}x{values[op.key].shape[1]}, but token codes "
              f"(tok_* in input.modalities) encode the stored image's pixel grid; drop it or "
              f"make it keep the stored size.")
        continue
      if kind in (GEOMETRIC, RANDAUGMENT) and maps:
        before = rng.bit_generator.state if rng is not None else None
        values[op.key] = op(values[op.key], rng, ctx)
        after = rng.bit_generator.state if rng is not None else None
        out_hw = values[op.key].shape[:2]
        for name in maps:
          if rng is not None:
            rng.bit_generator.state = before
          maps[name] = apply_to_map(op, maps[name], name, rng, out_hw)
        if rng is not None:
          rng.bit_generator.state = after
      else:
        values[op.key] = op(values[op.key], rng, ctx)
    if not decoded:
      maps = self._decode_maps(maps, values[preprocess.IMAGE])
    values.update(maps)
    return values, ctx.counts

  @staticmethod
  def _decode_maps(maps: dict[str, Any], image) -> dict[str, np.ndarray]:
    if not isinstance(image, np.ndarray):
      raise ValueError("dense maps need a decoded image; start pp_image with 'decode'")
    out = {}
    for name, value in maps.items():
      out[name] = DECODERS[name](value)
      check_shape(out[name], name, image.shape[:2])
    return out

  def __repr__(self):
    return f"JointPreprocessor({self.pp.pp!r})"
