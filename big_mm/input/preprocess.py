"""Image preprocessing ops, written as a validated string.

  ops = parse_pp("decode|resize(36)|random_crop(32)|flip_lr|value_range(-1,1)")
  image = apply_pp(ops, png_bytes, np.random.default_rng(0))   # float32 [32, 32, 3]

Ops run per example on numpy / PIL, and are deterministic given the rng. Each op is
`name` or `name(arg, ...)` with Python literal arguments; a bad string raises ValueError
naming the op, its signature and the valid ops. Ops that meet bad data raise
`BadRecord(reason)`; the pipeline skips such examples and counts them by reason.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
from typing import Any, Callable

import numpy as np
from PIL import Image


class BadRecord(Exception):
  """An example that cannot be used (undecodable image, too small, ...)."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(f"{reason}: {detail}" if detail else reason)
    self.reason = reason


def _size2(size) -> tuple[int, int]:
  if isinstance(size, int):
    return size, size
  h, w = size
  return int(h), int(w)


def _check_size(size) -> None:
  ok = (isinstance(size, int) and size > 0) or (
      isinstance(size, (tuple, list)) and len(size) == 2
      and all(isinstance(s, int) and s > 0 for s in size))
  if not ok:
    raise ValueError(f"size must be a positive int or (height, width), got {size!r}")


def _require_array(image, op):
  if not isinstance(image, np.ndarray):
    raise ValueError(f"pp op {op!r} needs a decoded image; start the pp string with 'decode'")


# ---- ops: op_NAME(args...) returns a function (image, rng) -> image -------------------

def _decode(data, rng):
  del rng
  if isinstance(data, np.ndarray):  # Already decoded by the source.
    img = data
    if img.ndim == 2:
      img = img[..., None]
    if img.shape[-1] == 1:
      img = np.repeat(img, 3, axis=-1)
    return img[..., :3].astype(np.uint8)
  try:
    with Image.open(io.BytesIO(bytes(data))) as im:
      im.load()
      if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        arr = np.asarray(im, np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr * (255.0 / hi), 0, 255).astype(np.uint8), "L")
      if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        im = im.convert("RGBA")  # Composite transparent areas onto white.
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
      arr = np.asarray(im.convert("RGB"), np.uint8)
  except Exception as e:  # PIL raises many types for bad bytes.
    raise BadRecord("decode", f"{type(e).__name__}: {e}") from e
  if arr.ndim != 3 or arr.shape[0] == 0 or arr.shape[1] == 0:
    raise BadRecord("decode", f"empty image {arr.shape}")
  return arr


def op_decode():
  """Encoded bytes (PNG/JPEG/...) -> uint8 RGB [H, W, 3]; grey/RGBA/CMYK/16-bit -> RGB."""
  return _decode


def _resize(image, rng, size):
  del rng
  _require_array(image, "resize")
  h, w = _size2(size)
  if image.shape[:2] == (h, w):
    return image
  if image.dtype == np.uint8:
    return np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
  chans = [np.asarray(Image.fromarray(image[..., c].astype(np.float32), "F")
                      .resize((w, h), Image.BILINEAR)) for c in range(image.shape[-1])]
  return np.stack(chans, -1).astype(image.dtype)


def op_resize(size):
  """Resize (bilinear) to size x size, or to (height, width)."""
  _check_size(size)
  return functools.partial(_resize, size=size)


def _resize_small(image, rng, size):
  _require_array(image, "resize_small")
  h, w = image.shape[:2]
  s = size / min(h, w)
  return _resize(image, rng, (max(1, round(h * s)), max(1, round(w * s))))


def op_resize_small(size):
  """Resize (bilinear) so the shorter side is `size`, keeping the aspect ratio."""
  if not (isinstance(size, int) and size > 0):
    raise ValueError(f"size must be a positive int, got {size!r}")
  return functools.partial(_resize_small, size=size)


def _crop(image, rng, size, random):
  _require_array(image, "random_crop" if random else "central_crop")
  ch, cw = _size2(size)
  h, w = image.shape[:2]
  if h < ch or w < cw:
    raise BadRecord("too_small", f"image {h}x{w} < crop {ch}x{cw}")
  if random:
    top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
  else:
    top, left = (h - ch) // 2, (w - cw) // 2
  return image[top:top + ch, left:left + cw]


def op_central_crop(size):
  """Crop the central size x size (or (height, width)) window."""
  _check_size(size)
  return functools.partial(_crop, size=size, random=False)


def op_random_crop(size):
  """Crop a uniformly random size x size (or (height, width)) window."""
  _check_size(size)
  return functools.partial(_crop, size=size, random=True)


def _flip_lr(image, rng):
  _require_array(image, "flip_lr")
  return image[:, ::-1] if rng.random() < 0.5 else image


def op_flip_lr():
  """Flip left-right with probability 1/2."""
  return _flip_lr


def _value_range(image, rng, lo, hi, in_lo, in_hi):
  del rng
  _require_array(image, "value_range")
  x = image.astype(np.float32)
  return (x - in_lo) * ((hi - lo) / (in_hi - in_lo)) + lo


def op_value_range(lo, hi, in_lo=0, in_hi=255):
  """Map values [in_lo, in_hi] (default uint8 [0, 255]) linearly to float32 [lo, hi]."""
  for n, v in (("lo", lo), ("hi", hi), ("in_lo", in_lo), ("in_hi", in_hi)):
    if not isinstance(v, (int, float)) or isinstance(v, bool):
      raise ValueError(f"{n} must be a number, got {v!r}")
  if in_hi == in_lo:
    raise ValueError("in_lo and in_hi must differ")
  return functools.partial(_value_range, lo=float(lo), hi=float(hi),
                           in_lo=float(in_lo), in_hi=float(in_hi))


OPS: dict[str, Callable[..., Callable[[Any, np.random.Generator], Any]]] = {
    "decode": op_decode,
    "resize": op_resize,
    "resize_small": op_resize_small,
    "central_crop": op_central_crop,
    "random_crop": op_random_crop,
    "flip_lr": op_flip_lr,
    "value_range": op_value_range,
}


def signature(name: str) -> str:
  return f"{name}{inspect.signature(OPS[name])}"


def _valid_ops() -> str:
  return ", ".join(signature(n) for n in OPS)


@dataclasses.dataclass(frozen=True)
class Op:
  name: str
  args: tuple
  fn: Callable[[Any, np.random.Generator], Any]

  def __call__(self, image, rng):
    return self.fn(image, rng)


def _parse_one(spec: str) -> Op:
  spec = spec.strip()
  name, _, rest = spec.partition("(")
  name = name.strip()
  if name not in OPS:
    raise ValueError(f"Unknown pp op {name!r} in {spec!r}. Valid ops: {_valid_ops()}")
  args = ()
  if rest:
    if not rest.rstrip().endswith(")"):
      raise ValueError(f"pp op {spec!r}: missing ')'. Signature: {signature(name)}")
    inner = rest.rstrip()[:-1]
    try:
      args = ast.literal_eval(f"({inner},)") if inner.strip() else ()
    except (ValueError, SyntaxError):
      raise ValueError(f"pp op {spec!r}: arguments must be Python literals (numbers, "
                       f"tuples, strings). Signature: {signature(name)}. "
                       f"Valid ops: {_valid_ops()}") from None
  try:
    inspect.signature(OPS[name]).bind(*args)
    fn = OPS[name](*args)
  except (TypeError, ValueError) as e:
    raise ValueError(f"pp op {spec!r}: {e}. Signature: {signature(name)}. "
                     f"Valid ops: {_valid_ops()}") from None
  return Op(name, tuple(args), fn)


def parse_pp(pp: str) -> list[Op]:
  """Parses and validates "op|op(args)|..." -> list of Ops (ValueError when invalid)."""
  if not isinstance(pp, str) or not pp.strip():
    raise ValueError(f"pp string must be a non-empty str like "
                     f"'decode|resize(32)|value_range(-1,1)', got {pp!r}")
  ops = [_parse_one(s) for s in pp.split("|")]
  names = [o.name for o in ops]
  if "decode" in names[1:]:
    raise ValueError(f"pp {pp!r}: 'decode' can only be the first op")
  return ops


def apply_pp(ops: list[Op], image, rng: np.random.Generator):
  for op in ops:
    image = op(image, rng)
  return image


class Preprocessor:
  """A parsed pp string as a picklable callable (image, rng) -> image."""

  def __init__(self, pp: str):
    self.pp = pp
    self.ops = parse_pp(pp)

  def __getstate__(self):
    return {"pp": self.pp}

  def __setstate__(self, state):
    self.__init__(state["pp"])

  def __call__(self, image, rng: np.random.Generator):
    return apply_pp(self.ops, image, rng)

  def __repr__(self):
    return f"Preprocessor({self.pp!r})"
