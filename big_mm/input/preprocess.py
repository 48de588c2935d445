"""Per-example preprocessing ops, written as one validated string.

  pp = Preprocessor("decode|resize(256)|random_crop(224)|flip_lr|value_range(-1,1)|"
                    "choose_caption|lowercase|tokenize(64)", tokenizer=tok)
  out, counts = pp({"image": jpeg_bytes, "text": ["A dog.", "A brown dog."]}, rng)
  # out: {"image": f32 [224, 224, 3], "text": i32 [64]}; counts: Counter({"text_truncated": 0..1})

Every op acts on one key of the example, fixed by the op: image ops on "image", text
ops on "text" (`OPS[name].key`); ops run in string order, each on its key's current value.
Each op is `name` or `name(arg, ..., key=arg)` with Python literal arguments; a bad string
raises ValueError naming the op, its signature and the valid ops (config.load calls
`parse_pp`, so this fails before any compute). Ops are deterministic given the
per-example rng.

The config gives the two parts separately (`input.pp_image`, `input.pp_text`, the latter
defaulting to `tokenize(input.text_len)`), so an evaluator can swap the image part; the
pipeline joins them into one Preprocessor.

Images: `decode` turns encoded bytes (JPEG/PNG/WebP/GIF/BMP/...) into uint8 RGB [H, W, 3]:
EXIF orientation is applied; grey, CMYK, palette and 16-bit images are converted to RGB;
transparent images (RGBA, LA, palette with transparency) are composited onto white (dropping
alpha would expose arbitrary colours hidden under transparent pixels). Large JPEGs decode
much faster with `decode(shrink_to=S)` (S: the next resize's size).
Texts: the record's text may be a str, UTF-8 bytes, a list of either, or a JSON list
string ('["a cat", "a pet"]'); it becomes a list of non-empty, stripped captions. Without
`choose_caption`, `tokenize` uses the first caption.

Bad data raises `BadRecord(reason)`; the pipeline skips such examples and counts them by
reason (sources.SKIP_REASONS is the vocabulary every source shares): corrupt_image
(undecodable or truncated bytes), empty_image (no bytes or a 0-pixel image),
image_too_large (more pixels than decode's max_pixels), too_small (smaller than a crop),
empty_caption, bad_caption_encoding (bytes that are not UTF-8), missing_field (no image /
text in the record). Truncated captions are not bad: `tokenize` counts them in
the returned counts as "text_truncated". `split_long_caption` and `sample_captions` are the
rules of the training pipeline's input.split_long_captions and input.captions_per_example.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import inspect
import io
import json
import math
import re
import warnings
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from big_mm.input import boxes as boxes_lib

IMAGE, TEXT = "image", "text"

# 64 megapixels (~200 MB as RGB uint8). PIL itself refuses images over 2 * its own
# Image.MAX_IMAGE_PIXELS (~179 MP); a larger max_pixels also needs that limit raised.
DEFAULT_MAX_PIXELS = 64 * 2**20

NORMALIZE_CONSTANTS = {  # name -> (mean, std) of [0, 1] RGB values.
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "clip": ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
    "inception": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
}


class BadRecord(Exception):
  """An example that cannot be used; `reason` names the kind (see the module docstring)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


@dataclasses.dataclass
class Context:
  """What ops may need besides value and rng: the tokenizer, and counters they bump.
  geometry: the map of normalised coordinates the image ops applied so far (boxes.Affine;
  crops and flips compose into it), None once an op moved pixels in a way no Affine describes
  (randaugment's Rotate / Shear / Translate)."""
  tokenizer: Any = None
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  geometry: boxes_lib.Affine | None = boxes_lib.IDENTITY

  def moved(self, affine: boxes_lib.Affine) -> None:
    """Records that an image op applied `affine` to the pixels."""
    if self.geometry is not None:
      self.geometry = self.geometry.then(affine)


OpFn = Callable[[Any, np.random.Generator, Context], Any]


# ---- argument checks (at parse time) ---------------------------------------------------

def _size2(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _check_size(size) -> None:
  ok = (isinstance(size, int) and not isinstance(size, bool) and size > 0) or (
      isinstance(size, (tuple, list)) and len(size) == 2
      and all(isinstance(s, int) and s > 0 for s in size))
  if not ok:
    raise ValueError(f"size must be a positive int or (height, width), got {size!r}")


def _check_number(name, value, lo=-math.inf, hi=math.inf) -> None:
  if not isinstance(value, (int, float)) or isinstance(value, bool) or not lo <= value <= hi:
    bounds = f" in [{lo}, {hi}]" if (lo, hi) != (-math.inf, math.inf) else ""
    raise ValueError(f"{name} must be a number{bounds}, got {value!r}")


def _check_int(name, value, lo=1) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < lo:
    raise ValueError(f"{name} must be an int >= {lo}, got {value!r}")


def _require_array(image, op, uint8=False):
  if not isinstance(image, np.ndarray):
    raise ValueError(f"pp op {op!r} needs a decoded image; start pp_image with 'decode'")
  if uint8 and image.dtype != np.uint8:
    raise ValueError(f"pp op {op!r} needs uint8 pixels; put it before value_range/normalize")


# ---- image ops: op_NAME(args...) returns fn(image, rng, ctx) -> image ------------------

def _to_rgb(im: Image.Image) -> Image.Image:
  """Any PIL mode -> RGB (16-bit scaled to 8-bit, transparency composited onto white)."""
  if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
    arr = np.asarray(im, np.float64)
    # 16-bit PNGs open as I;16 or I (Pillow version dependent): both are 0..65535.
    hi = 1.0 if im.mode == "F" and arr.max() <= 1.0 else (
        255.0 if im.mode == "F" else 65535.0)
    im = Image.fromarray(np.clip(arr * (255.0 / hi) + 0.5, 0, 255).astype(np.uint8), "L")
  if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
      im.mode in ("P", "L", "RGB") and "transparency" in im.info):
    im = im.convert("RGBA")
    white = Image.new("RGBA", im.size, (255, 255, 255, 255))
    im = Image.alpha_composite(white, im)
  return im if im.mode == "RGB" else im.convert("RGB")


def _decode_array(arr: np.ndarray, max_pixels: int) -> np.ndarray:
  """An already-decoded image from the source -> uint8 RGB."""
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[0] * arr.shape[1] == 0:
    raise BadRecord("empty_image", f"image array of shape {arr.shape}")
  if arr.shape[0] * arr.shape[1] > max_pixels:
    raise BadRecord("image_too_large", f"{arr.shape[0]}x{arr.shape[1]} > {max_pixels} pixels")
  if arr.shape[-1] in (1, 2):  # Grey (+ alpha, dropped: arrays carry no compositing hint).
    arr = np.repeat(arr[..., :1], 3, axis=-1)
  if arr.dtype == np.uint16:
    arr = (arr.astype(np.float32) * (255 / 65535) + 0.5).astype(np.uint8)
  return arr[..., :3].astype(np.uint8)


def _decode(data, rng, ctx, max_pixels, shrink_to):
  del rng, ctx
  if isinstance(data, np.ndarray) and data.dtype != object and data.ndim >= 2:
    return _decode_array(data, max_pixels)
  if isinstance(data, np.ndarray):  # Encoded bytes stored as a numpy scalar / array.
    data = data.item() if data.ndim == 0 else data.tobytes()
  data = bytes(data)
  if not data:
    raise BadRecord("empty_image", "0 bytes")
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      im = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadRecord("image_too_large", str(e)) from None
  except Exception as e:  # PIL raises many types for bad bytes.
    raise BadRecord("corrupt_image", f"{type(e).__name__}: {e}") from None
  with im:
    w, h = im.size
    if w * h == 0:
      raise BadRecord("empty_image", f"{w}x{h} image")
    if w * h > max_pixels:  # Checked on the header, before decoding any pixels.
      raise BadRecord("image_too_large", f"{w}x{h} > {max_pixels} pixels")
    try:
      if shrink_to and im.format == "JPEG":
        im.draft("RGB", (shrink_to, shrink_to))
      im.load()
      ImageOps.exif_transpose(im, in_place=True)
      arr = np.asarray(_to_rgb(im), np.uint8)
    except Exception as e:  # Truncated data, broken streams, unsupported modes.
      raise BadRecord("corrupt_image", f"{type(e).__name__}: {e}") from None
  return arr


def op_decode(max_pixels=DEFAULT_MAX_PIXELS, shrink_to=None):
  """Encoded bytes (JPEG/PNG/WebP/...) -> uint8 RGB [H, W, 3]; larger than max_pixels: bad.

  shrink_to=S (JPEG only): libjpeg decodes at 1/2, 1/4 or 1/8 scale while both sides stay
  >= S; set it to the next resize's size. Several times faster on large JPEGs; the pixels
  differ slightly from a full decode + resize.
  """
  _check_int("max_pixels", max_pixels)
  if shrink_to is not None:
    _check_int("shrink_to", shrink_to)
  return functools.partial(_decode, max_pixels=max_pixels, shrink_to=shrink_to)


def _resize_to(image, h, w):
  if image.shape[:2] == (h, w):
    return image
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  chans = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), "F")
                      .resize((w, h), Image.BILINEAR)) for c in range(image.shape[-1])]
  return np.stack(chans, -1).astype(image.dtype)


def _resize(image, rng, ctx, size):
  del rng, ctx
  _require_array(image, "resize")
  return _resize_to(image, *_size2(size))


def op_resize(size):
  """Resize (bilinear) to size x size, or to (height, width)."""
  _check_size(size)
  return functools.partial(_resize, size=size)


def naflex_size(height: int, width: int, patch_size: int, max_num_patches: int,
                eps: float = 1e-5) -> tuple[int, int]:
  """The largest (height, width), both multiples of `patch_size` (at least one patch each),
  of the image scaled by one factor, with at most `max_num_patches` patches: the binary
  search over the scale of transformers' Siglip2 image processor
  (`get_image_size_for_max_num_patches`, SigLIP 2's NaFlex)."""
  def scaled(scale, size):
    return max(patch_size, math.ceil(size * scale / patch_size) * patch_size)

  lo, hi = eps / 10, 100.0
  while hi - lo >= eps:
    scale = (lo + hi) / 2
    if scaled(scale, height) * scaled(scale, width) <= max_num_patches * patch_size ** 2:
      lo = scale
    else:
      hi = scale
  return scaled(lo, height), scaled(lo, width)


@dataclasses.dataclass(frozen=True)
class Patches:
  """A NaFlex image: data [N, p * p * 3] (the pixels' dtype; patches in row-major grid order,
  each (row, col, channel) flattened), mask bool [N] (False: padding), shape int32 [2] (the
  patch grid's rows and columns)."""
  data: np.ndarray
  mask: np.ndarray
  shape: np.ndarray


def _naflex(image, rng, ctx, max_num_patches, patch_size, lengths):
  del ctx
  _require_array(image, "naflex")
  budget = int(lengths[rng.integers(len(lengths))]) if lengths else max_num_patches
  h, w = naflex_size(image.shape[0], image.shape[1], patch_size, budget)
  image = _resize_to(image, h, w)  # uint8 stays uint8 (keep_uint8); image_outputs casts
  gh, gw, p = h // patch_size, w // patch_size, patch_size
  patches = image.reshape(gh, p, gw, p, 3).transpose(0, 2, 1, 3, 4).reshape(gh * gw, p * p * 3)
  data = np.zeros((max_num_patches, p * p * 3), image.dtype)
  data[:gh * gw] = patches
  return Patches(data, np.arange(max_num_patches) < gh * gw, np.array([gh, gw], np.int32))


def op_naflex(max_num_patches, patch_size=16, lengths=()):
  """NaFlex (SigLIP 2): resize keeping the aspect ratio to the largest size of at most
  `max_num_patches` patches (`naflex_size`), patchify and pad to `max_num_patches`; the
  batch gets image [N, p*p*3], image_mask [N] and image_shape [2]. The last image op.

  lengths=(n1, n2, ...): training over several sequence lengths, as SigLIP 2's NaFlex
  variant (which samples one per mini-batch from 128..1024 patches): each example draws its
  patch budget from `lengths` (each <= max_num_patches) and is padded to max_num_patches, so
  batch shapes stay static and nothing recompiles (a short example costs as much compute as a
  long one; per-batch lengths would save it at one compilation per length)."""
  _check_int("max_num_patches", max_num_patches)
  _check_int("patch_size", patch_size)
  lengths = tuple(lengths) if isinstance(lengths, (tuple, list)) else (lengths,)
  for n in lengths:
    _check_int("lengths entry", n)
    if n > max_num_patches:
      raise ValueError(f"lengths entry {n} is more than max_num_patches={max_num_patches} "
                       "(every budget is padded to max_num_patches)")
  return functools.partial(_naflex, max_num_patches=max_num_patches, patch_size=patch_size,
                           lengths=lengths)


def _resize_small(image, rng, ctx, size):
  del rng, ctx
  _require_array(image, "resize_small")
  h, w = image.shape[:2]
  s = size / min(h, w)
  return _resize_to(image, max(1, round(h * s)), max(1, round(w * s)))


def op_resize_small(size):
  """Resize (bilinear) so the shorter side is `size`, keeping the aspect ratio."""
  _check_int("size", size)
  return functools.partial(_resize_small, size=size)


def _crop(image, rng, ctx, size, random):
  _require_array(image, "random_crop" if random else "central_crop")
  ch, cw = _size2(size)
  h, w = image.shape[:2]
  if h < ch or w < cw:
    raise BadRecord("too_small", f"image {h}x{w} < crop {ch}x{cw}")
  if random:
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
  else:
    top, left = (h - ch) // 2, (w - cw) // 2
  ctx.moved(boxes_lib.crop(h, w, top, left, ch, cw))
  return image[top:top + ch, left:left + cw]


def op_central_crop(size):
  """Crop the central size x size (or (height, width)) window."""
  _check_size(size)
  return functools.partial(_crop, size=size, random=False)


def op_random_crop(size):
  """Crop a uniformly random size x size (or (height, width)) window."""
  _check_size(size)
  return functools.partial(_crop, size=size, random=True)


def _inception_box(h, w, rng, area_min, area_max, ratio_min, ratio_max):
  """(top, left, height, width) of a random crop with area fraction in [area_min, area_max]
  and log-uniform aspect ratio (width/height) in [ratio_min, ratio_max]; 10 tries, then
  the largest central crop with a ratio in range (as torchvision's RandomResizedCrop)."""
  for _ in range(10):
    area = h * w * rng.uniform(area_min, area_max)
    ratio = math.exp(rng.uniform(math.log(ratio_min), math.log(ratio_max)))
    cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
    if 0 < cw <= w and 0 < ch <= h:
      return int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1)), ch, cw
  ratio = w / h
  if ratio < ratio_min:
    cw, ch = w, round(w / ratio_min)
  elif ratio > ratio_max:
    ch, cw = h, round(h * ratio_max)
  else:
    ch, cw = h, w
  return (h - ch) // 2, (w - cw) // 2, ch, cw


def _inception_crop(image, rng, ctx, size, area_min, area_max, ratio_min, ratio_max):
  _require_array(image, "inception_crop", uint8=True)
  h, w = image.shape[:2]
  top, left, ch, cw = _inception_box(h, w, rng, area_min / 100, area_max / 100,
                                     ratio_min, ratio_max)
  oh, ow = _size2(size)
  ctx.moved(boxes_lib.crop(h, w, top, left, ch, cw))
  im = Image.fromarray(image)  # Crop and resize in one resampling pass.
  return np.asarray(im.resize((ow, oh), Image.BILINEAR, box=(left, top, left + cw, top + ch)))


def op_inception_crop(size, area_min=5, area_max=100, ratio_min=0.75, ratio_max=None):
  """Random crop of area_min..area_max % of the image, aspect ratio (width/height)
  log-uniform in ratio_min..ratio_max (default 1/ratio_min), resized to size
  (Inception / big_vision / torchvision's RandomResizedCrop)."""
  _check_size(size)
  _check_number("area_min", area_min, 0.01, 100)
  _check_number("area_max", area_max, area_min, 100)
  _check_number("ratio_min", ratio_min, 1e-3, 1e3)
  ratio_max = 1 / ratio_min if ratio_max is None else ratio_max
  _check_number("ratio_max", ratio_max, ratio_min, 1e3)
  return functools.partial(_inception_crop, size=size, area_min=area_min, area_max=area_max,
                           ratio_min=ratio_min, ratio_max=ratio_max)


def _flip_lr(image, rng, ctx):
  _require_array(image, "flip_lr")
  if rng.random() < 0.5:
    ctx.moved(boxes_lib.FLIP_LR)
    return image[:, ::-1]
  return image


def op_flip_lr():
  """Flip left-right with probability 1/2."""
  return _flip_lr


def _value_range(image, rng, ctx, lo, hi, in_lo, in_hi):
  del rng, ctx
  _require_array(image, "value_range")
  scale = np.float32((hi - lo) / (in_hi - in_lo))
  x = image.astype(np.float32)  # A fresh array: scale it in place (half the memory traffic).
  x *= scale
  x += np.float32(lo - in_lo * scale)
  return x


def op_value_range(lo, hi, in_lo=0, in_hi=255):
  """Map values [in_lo, in_hi] (default uint8 [0, 255]) linearly to float32 [lo, hi]."""
  for n, v in (("lo", lo), ("hi", hi), ("in_lo", in_lo), ("in_hi", in_hi)):
    _check_number(n, v)
  if in_hi == in_lo:
    raise ValueError("in_lo and in_hi must differ")
  return functools.partial(_value_range, lo=float(lo), hi=float(hi),
                           in_lo=float(in_lo), in_hi=float(in_hi))


def _keep_uint8(image, rng, ctx):
  del rng, ctx
  _require_array(image, "keep_uint8", uint8=True)
  return image


def op_keep_uint8():
  """Ship the pixels as uint8 [0, 255] (1 byte per value, not float32's 4): the image tower
  maps them to its pixel_range (default (-1, 1), as value_range(-1,1)) on the device. Replaces
  value_range at the end of pp_image (before naflex, whose patches then stay uint8)."""
  return _keep_uint8


def keeps_uint8(pp: str) -> bool:
  """Whether pp's images reach the batch as uint8 (it has keep_uint8)."""
  return any(o.name == "keep_uint8" for o in parse_pp(pp))


def _normalize(image, rng, ctx, mean, std):
  del rng, ctx
  _require_array(image, "normalize", uint8=True)
  return (image.astype(np.float32) * np.float32(1 / 255) - mean) / std


def op_normalize(mean, std=None):
  """uint8 -> float32 (x/255 - mean) / std per channel. mean: a name (imagenet, clip,
  inception: std then comes with it) or 3 numbers; std: 3 numbers."""
  if isinstance(mean, str):
    if mean not in NORMALIZE_CONSTANTS or std is not None:
      raise ValueError(f"mean={mean!r}: a name must be one of {sorted(NORMALIZE_CONSTANTS)} "
                       f"(and then give no std)")
    mean, std = NORMALIZE_CONSTANTS[mean]
  for name, v in (("mean", mean), ("std", std)):
    if not (isinstance(v, (tuple, list)) and len(v) == 3 and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)):
      raise ValueError(f"{name} must be 3 numbers (one per RGB channel), got {v!r}")
  if min(std) <= 0:
    raise ValueError(f"std must be positive, got {std!r}")
  return functools.partial(_normalize, mean=np.asarray(mean, np.float32),
                           std=np.asarray(std, np.float32))


# RandAugment (Cubuk et al. 2019): the standard 14 ops, magnitude scale [0, 10] as in
# big_vision / the TF reference; ranges as torchvision's (signed where it makes sense).
RANDAUGMENT_MAX_MAGNITUDE = 10
_FILL = (128, 128, 128)  # What geometric ops reveal (big_vision's replace value).


def _affine(im, matrix):
  return im.transform(im.size, Image.AFFINE, matrix, Image.NEAREST, fillcolor=_FILL)


def _ra_op(name: str, im: Image.Image, m: float, sign: float) -> Image.Image:
  """Applies RandAugment op `name` at magnitude fraction m in [0, 1]."""
  w, h = im.size
  if name == "Identity":
    return im
  if name == "AutoContrast":
    return ImageOps.autocontrast(im)
  if name == "Equalize":
    return ImageOps.equalize(im)
  if name == "Rotate":
    return im.rotate(sign * 30 * m, Image.NEAREST, fillcolor=_FILL)
  if name == "Solarize":
    return ImageOps.solarize(im, round(256 * (1 - m)))
  if name == "Posterize":
    return ImageOps.posterize(im, 8 - int(round(4 * m)))
  if name in ("Color", "Contrast", "Brightness", "Sharpness"):
    enhancer = getattr(ImageEnhance, name)
    return enhancer(im).enhance(1 + sign * 0.9 * m)
  if name == "ShearX":
    return _affine(im, (1, sign * 0.3 * m, 0, 0, 1, 0))
  if name == "ShearY":
    return _affine(im, (1, 0, 0, sign * 0.3 * m, 1, 0))
  if name == "TranslateX":
    return _affine(im, (1, 0, sign * 0.45 * m * w, 0, 1, 0))
  if name == "TranslateY":
    return _affine(im, (1, 0, 0, 0, 1, sign * 0.45 * m * h))
  raise AssertionError(name)


_RA_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY")
RANDAUGMENT_OPS = ("Identity", "AutoContrast", "Equalize", "Rotate", "Solarize", "Color",
                   "Posterize", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
                   "TranslateX", "TranslateY")


def _randaugment(image, rng, ctx, num_layers, magnitude):
  _require_array(image, "randaugment", uint8=True)
  im = Image.fromarray(image)
  m = magnitude / RANDAUGMENT_MAX_MAGNITUDE
  for _ in range(num_layers):
    name = RANDAUGMENT_OPS[int(rng.integers(len(RANDAUGMENT_OPS)))]
    sign = 1.0 if rng.random() < 0.5 else -1.0
    if name in _RA_GEOMETRIC and m > 0:
      ctx.geometry = None
    im = _ra_op(name, im, m, sign)
  return np.asarray(im)


def op_randaugment(num_layers=2, magnitude=10):
  """Applies num_layers ops drawn uniformly from the 14 RandAugment ops (RANDAUGMENT_OPS)
  at `magnitude` in [0, 10] (uint8 images: put it before value_range/normalize)."""
  _check_int("num_layers", num_layers, lo=0)
  _check_number("magnitude", magnitude, 0, RANDAUGMENT_MAX_MAGNITUDE)
  return functools.partial(_randaugment, num_layers=num_layers, magnitude=magnitude)


# ---- text ops: fn(captions: list[str], rng, ctx) -> list[str] (tokenize: int32 [L]) ----

def _caption_str(item) -> str:
  if isinstance(item, (bytes, np.bytes_)):
    try:
      return bytes(item).decode("utf-8")
    except UnicodeDecodeError as e:
      raise BadRecord("bad_caption_encoding", str(e)) from None
  if isinstance(item, str):
    return item
  raise BadRecord("bad_caption_encoding", f"caption of type {type(item).__name__}")


def captions(value) -> list[str]:
  """A record's text (str, UTF-8 bytes, list of them, JSON list) -> non-empty captions."""
  if isinstance(value, list) and value and all(isinstance(c, str) and c and c == c.strip()
                                               for c in value):
    return value  # Already normalised (a previous text op's output).
  if isinstance(value, np.ndarray):
    value = value.tolist()
  items = list(value) if isinstance(value, (list, tuple)) else [value]
  out = []
  for item in items:
    text = _caption_str(item).strip()
    if text.startswith("[") and text.endswith("]"):
      try:
        parsed = json.loads(text)
      except ValueError:
        parsed = None
      if isinstance(parsed, list) and all(isinstance(c, str) for c in parsed):
        out += [c.strip() for c in parsed]
        continue
    out.append(text)
  out = [c for c in out if c]
  if not out:
    raise BadRecord("empty_caption", f"text {value!r:.80}")
  return out


def _choose_caption(text, rng, ctx):
  del ctx
  caps = captions(text)
  return [caps[int(rng.integers(len(caps)))]] if len(caps) > 1 else caps


def op_choose_caption():
  """Keep one caption, uniformly at random, of a record that has several."""
  return _choose_caption


def _lowercase(text, rng, ctx):
  del rng, ctx
  return [c.lower() for c in captions(text)]


def op_lowercase():
  """Lower-case the caption(s)."""
  return _lowercase


def _tokenize(text, rng, ctx, length):
  del rng
  if ctx.tokenizer is None:
    raise ValueError("pp op 'tokenize' needs a tokenizer (set input.tokenizer)")
  ids, truncated = ctx.tokenizer.encode_with_info([captions(text)[0]], length)
  ctx.counts["text_truncated"] += int(truncated[0])
  return ids[0]


def op_tokenize(length):
  """SentencePiece ids int32 [length]: first caption, truncated to length-1, EOS, 0-padded
  (truncations are counted as text_truncated)."""
  _check_int("length", length)
  return functools.partial(_tokenize, length=length)


# ---- several captions per example (input.captions_per_example, split_long_captions) ----

_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\s*\n\s*")


def split_long_caption(caption: str, fits: Callable[[str], bool]) -> list[str]:
  """A caption that does not fit the text tower -> sub-captions that do, in order: its
  sentences (split after . ! ? ; and at line breaks), and each sentence that still does not
  fit, greedy runs of whole words. A caption that fits, or a single word that does not,
  stays as it is (tokenize then truncates the word and counts it)."""
  if fits(caption):
    return [caption]
  out = []
  for sentence in (s.strip() for s in _SENTENCE_END.split(caption)):
    if not sentence:
      continue
    if fits(sentence):
      out.append(sentence)
      continue
    chunk = []
    for word in sentence.split():
      if chunk and not fits(" ".join(chunk + [word])):
        out.append(" ".join(chunk))
        chunk = []
      chunk.append(word)
    out.append(" ".join(chunk))
  return out


def sample_captions(caps: list[str], k: int, rng: np.random.Generator) -> list[str]:
  """k of a record's captions, drawn without replacement; a record with n < k captions
  fills its k slots by cycling through a random order of its n (each then appears
  floor(k/n) or ceil(k/n) times; the pipeline counts such records as text_repeated)."""
  order = rng.permutation(len(caps))
  return [caps[i] for i in (order[:k] if len(caps) >= k else order[np.arange(k) % len(caps)])]


def _vector(value, rng, ctx, dim):
  try:
    x = np.asarray(value, np.float32).reshape(-1)
  except (TypeError, ValueError) as e:
    raise BadRecord("bad_vector", f"not a numeric vector: {e}") from None
  if x.shape != (dim,) or not np.all(np.isfinite(x)):
    raise BadRecord("bad_vector", f"expected {dim} finite values, got shape {np.shape(value)}")
  return x


def op_vector(dim):
  """A feature-vector modality's value as float32 [dim] (finite, exactly dim values)."""
  _check_int("dim", dim)
  return functools.partial(_vector, dim=dim)


# ---- registry and parsing --------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class OpDef:
  key: str  # The example key the op reads and writes.
  make: Callable[..., OpFn]  # Validates the string's arguments, returns the op function.
  # Ops that fix their output's shape: out_shape(*args) -> that shape (args as `make` takes
  # them, defaults filled). Ops after it on the same key must keep the shape.
  out_shape: Callable[..., tuple[int, ...]] | None = None
  # compose=True: out_shape(shape_before, *args) gets the shape the ops before it made (None:
  # not fixed) and may leave entries None (not fixed yet), e.g. a video sampler fixes the
  # frames and a crop after it the size (big_mm/input/video.py).
  compose: bool = False


OPS: dict[str, OpDef] = {
    "decode": OpDef(IMAGE, op_decode),
    "resize": OpDef(IMAGE, op_resize),
    "resize_small": OpDef(IMAGE, op_resize_small),
    "naflex": OpDef(IMAGE, op_naflex),
    "central_crop": OpDef(IMAGE, op_central_crop),
    "random_crop": OpDef(IMAGE, op_random_crop),
    "inception_crop": OpDef(IMAGE, op_inception_crop),
    "flip_lr": OpDef(IMAGE, op_flip_lr),
    "randaugment": OpDef(IMAGE, op_randaugment),
    "value_range": OpDef(IMAGE, op_value_range),
    "normalize": OpDef(IMAGE, op_normalize),
    "keep_uint8": OpDef(IMAGE, op_keep_uint8),
    "choose_caption": OpDef(TEXT, op_choose_caption),
    "lowercase": OpDef(TEXT, op_lowercase),
    "tokenize": OpDef(TEXT, op_tokenize),
    "vector": OpDef("vector", op_vector, out_shape=lambda dim: (dim,)),
}
_FLOAT_OUTPUT = ("value_range", "normalize")  # After these, pixels are no longer uint8.
_UINT8_INPUT = ("randaugment", "inception_crop", "normalize", "keep_uint8")


def signature(name: str) -> str:
  return f"{name}{inspect.signature(OPS[name].make)}"


def valid_ops(key: str | None = None) -> str:
  """'name(args)' of every op (acting on `key`, if given), comma-separated."""
  return ", ".join(signature(n) for n, d in OPS.items() if key in (None, d.key))


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  args: tuple  # All arguments, defaults filled in, in signature order.
  key: str
  fn: OpFn

  def __call__(self, value, rng, ctx: Context | None = None):
    return self.fn(value, rng, ctx if ctx is not None else Context())


def _parse_one(spec: str) -> Op:
  spec = spec.strip()
  name, _, rest = spec.partition("(")
  name = name.strip()
  if name not in OPS:
    raise ValueError(f"Unknown pp op {name!r} in {spec!r}. Valid ops: {valid_ops()}")
  args, kwargs = (), {}
  if rest:
    if not rest.rstrip().endswith(")"):
      raise ValueError(f"pp op {spec!r}: missing ')'. Signature: {signature(name)}")
    try:
      call = ast.parse(f"op({rest.rstrip()[:-1]})", mode="eval").body
      args = tuple(ast.literal_eval(a) for a in call.args)
      kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
    except (ValueError, SyntaxError, TypeError):
      raise ValueError(f"pp op {spec!r}: arguments must be Python literals (numbers, "
                       f"tuples, strings), optionally as name=value. Signature: "
                       f"{signature(name)}. Valid ops: {valid_ops()}") from None
  try:
    bound = inspect.signature(OPS[name].make).bind(*args, **kwargs)
    fn = OPS[name].make(*args, **kwargs)
  except (TypeError, ValueError) as e:
    raise ValueError(f"pp op {spec!r}: {e}. Signature: {signature(name)}. "
                     f"Valid ops: {valid_ops()}") from None
  bound.apply_defaults()
  return Op(name, tuple(bound.arguments.values()), OPS[name].key, fn)


def _check_order(pp: str, ops: list[Op]) -> None:
  image = [o.name for o in ops if o.key == IMAGE]
  if "decode" in image[1:]:
    raise ValueError(f"pp {pp!r}: 'decode' must be the first op acting on the image")
  if "naflex" in image[:-1]:
    raise ValueError(f"pp {pp!r}: 'naflex' must be the last op acting on the image (it turns "
                     "the image into patches)")
  for i, name in enumerate(image):
    late = [n for n in image[:i] if n in _FLOAT_OUTPUT]
    if name in _UINT8_INPUT and late:
      raise ValueError(f"pp {pp!r}: {name!r} needs uint8 pixels; move it before {late[0]!r}")
  if "keep_uint8" in image and image[image.index("keep_uint8") + 1:] not in ([], ["naflex"]):
    raise ValueError(f"pp {pp!r}: 'keep_uint8' must be the last image op (or come just before "
                     "'naflex')")
  text = [o.name for o in ops if o.key == TEXT]
  if "tokenize" in text[:-1]:
    raise ValueError(f"pp {pp!r}: 'tokenize' must be the last text op")


def parse_pp(pp: str, key: str | None = None) -> list[Op]:
  """Parses and validates "op|op(args)|..." -> list of Ops (ValueError when invalid).

  `key`: when given, every op must act on it (e.g. "image" for input.pp_image).
  """
  if not isinstance(pp, str) or not pp.strip():
    raise ValueError(f"pp string must be a non-empty str like "
                     f"'decode|resize(32)|value_range(-1,1)', got {pp!r}")
  ops = [_parse_one(s) for s in pp.split("|")]
  if key is not None:
    other = [o.name for o in ops if o.key != key]
    if other:
      raise ValueError(f"pp {pp!r}: ops {other} do not act on {key!r}. Ops that do: "
                       f"{valid_ops(key)}")
  _check_order(pp, ops)
  return ops


def output_shape(pp: str) -> tuple[int, ...] | None:
  """The example shape a pp string's output has whatever the input (the last op that fixes
  it, OpDef.out_shape; composing ops build on the shape before them), or None when no op
  fixes it (or an entry of it)."""
  shape = None
  for o in parse_pp(pp):
    d = OPS[o.name]
    if d.out_shape is not None:
      shape = d.out_shape(shape, *o.args) if d.compose else d.out_shape(*o.args)
  return None if shape is None or None in shape else tuple(int(n) for n in shape)


def image_size(pp_image: str) -> tuple[int, int] | None:
  """(height, width) of the images `pp_image` makes, or None when they keep the source's size
  (or it ends in naflex). Found by running its ops on two blank images of different sizes."""
  ops = parse_pp(pp_image, IMAGE)
  if ops[-1].name == "naflex":
    return None
  sizes = set()
  for shape in ((480, 640, 3), (600, 520, 3)):
    sizes.add(tuple(apply_pp(ops, np.zeros(shape, np.uint8), np.random.default_rng(0)).shape[:2]))
  return sizes.pop() if len(sizes) == 1 else None


def apply_pp(ops: list[Op], value, rng: np.random.Generator, ctx: Context | None = None):
  """Runs ops that all act on one key on that key's value (e.g. image bytes -> array)."""
  ctx = ctx if ctx is not None else Context()
  for op in ops:
    value = op(value, rng, ctx)
  return value


class Preprocessor:
  """A parsed pp string as a picklable callable (example, rng) -> (outputs, counts)."""

  def __init__(self, pp: str, *, tokenizer=None):
    self.pp, self.tokenizer = pp, tokenizer
    self.ops = parse_pp(pp)
    self.keys = tuple(dict.fromkeys(o.key for o in self.ops))  # In first-use order.
    if tokenizer is None and any(o.name == "tokenize" for o in self.ops):
      raise ValueError(f"pp {pp!r} tokenizes but no tokenizer was given (input.tokenizer)")

  def __getstate__(self):
    return {"pp": self.pp, "tokenizer": self.tokenizer}

  def __setstate__(self, state):
    self.__init__(state["pp"], tokenizer=state["tokenizer"])

  def __call__(self, example: Mapping[str, Any], rng: np.random.Generator, *,
               optional: tuple[str, ...] = (), ctx: Context | None = None
               ) -> tuple[dict[str, Any], collections.Counter]:
    """-> ({key: processed value}, counts). A key the ops use must be in `example` (and
    not None) unless it is in `optional`; then its ops are left out. `ctx`: the Context to run
    in (its counts are returned; its geometry then tells what the image ops did)."""
    values = {}
    for key in self.keys:
      if example.get(key) is not None:
        values[key] = example[key]
      elif key not in optional:
        raise BadRecord("missing_field", f"no {key!r} in the record (it has {sorted(example)})")
    ctx = ctx if ctx is not None else Context(self.tokenizer)
    for op in self.ops:
      if op.key in values:
        values[op.key] = op(values[op.key], rng, ctx)
    return values, ctx.counts

  def __repr__(self):
    return f"Preprocessor({self.pp!r})"
from big_mm.input import points as _points  # noqa: E402,F401  (registers the point-cloud ops)
from big_mm.input import audio as _audio  # noqa: E402,F401  (registers the audio ops)
from big_mm.input import video as _video  # noqa: E402,F401  (registers the video ops)
