"""A digit classifier that judges generated digit images (the CM3 demo), in pure numpy.

  judge = DigitJudge.load("/tmp/big_mm_digit_judge.npz")  # tools/train_digit_classifier.py
  labels = judge.predict(images)    # float [B, 32, 32, 3] in [-1, 1] -> int32 [B] in 0..9

Inputs are what the trainer's pp ("decode|value_range(-1,1)") and an rgb vq tokenizer's decode
(big_mm.models.vq, unclipped) give. Preprocessing (`features`): clip to [-1, 1], mean over the
colour channels, average-pool the HxW image by `pool` x `pool` blocks (32x32 -> 8x8 at pool 4),
map to [0, 1], flatten row-major. The classifier is a stack of dense layers (weights_i [in, out],
bias_i [out]) with ReLU between them: one layer is multinomial logistic regression.

The .npz holds weights_0, bias_0, ..., and `meta`, a JSON string: format (FORMAT), image_size,
pool, num_layers, classes and the training tool's record (data, train / test accuracy, ...).
"""
from __future__ import annotations

import json
import os
import zipfile
from typing import Any

import numpy as np

FORMAT = "big_mm.digit_judge.v1"
TRAIN_HINT = ("train one with `python tools/train_digit_classifier.py --out PATH` (after "
              "`python data/build_demo.py`).")


def features(images, pool: int) -> np.ndarray:
  """float [B, H, W, 3] in [-1, 1] -> float32 [B, (H / pool) * (W / pool)] grey in [0, 1]."""
  x = np.asarray(images, np.float32)
  if x.ndim != 4 or x.shape[-1] != 3:
    raise ValueError(f"Digit judge: images must be float [B, H, W, 3] in [-1, 1], got shape "
                     f"{x.shape}.")
  b, h, w, _ = x.shape
  if h % pool or w % pool:
    raise ValueError(f"Digit judge: image size {h}x{w} is not divisible by pool {pool}.")
  grey = np.clip(x, -1.0, 1.0).mean(axis=-1)
  pooled = grey.reshape(b, h // pool, pool, w // pool, pool).mean(axis=(2, 4))
  return ((pooled + 1.0) / 2.0).reshape(b, -1)


class DigitJudge:
  """A trained digit classifier: dense layers (ReLU between) on `features(images, pool)`."""

  def __init__(self, layers: list[tuple[np.ndarray, np.ndarray]], *, image_size: int,
               pool: int, meta: dict[str, Any] | None = None):
    if not layers:
      raise ValueError("Digit judge: no layers.")
    expected = (image_size // pool) ** 2
    for i, (w, b) in enumerate(layers):
      if w.ndim != 2 or b.shape != (w.shape[1],) or w.shape[0] != expected:
        raise ValueError(f"Digit judge: layer {i} has weights {w.shape} and bias {b.shape}; "
                         f"expected [{expected}, n] and [n].")
      expected = w.shape[1]
    self.layers = [(np.asarray(w, np.float32), np.asarray(b, np.float32)) for w, b in layers]
    self.image_size = int(image_size)
    self.pool = int(pool)
    self.meta = dict(meta or {})

  @property
  def num_classes(self) -> int:
    return self.layers[-1][1].shape[0]

  def logits(self, images) -> np.ndarray:
    """float [B, image_size, image_size, 3] in [-1, 1] -> float32 logits [B, num_classes]."""
    x = np.asarray(images)
    if x.shape[1:] != (self.image_size, self.image_size, 3):
      raise ValueError(f"Digit judge: images must be [B, {self.image_size}, {self.image_size}, "
                       f"3] in [-1, 1], got shape {x.shape}.")
    h = features(x, self.pool)
    for i, (w, b) in enumerate(self.layers):
      h = h @ w + b
      if i + 1 < len(self.layers):
        h = np.maximum(h, 0.0)
    return h

  def predict(self, images) -> np.ndarray:
    """float [B, image_size, image_size, 3] in [-1, 1] -> int32 labels [B]."""
    return np.argmax(self.logits(images), axis=-1).astype(np.int32)

  def accuracy(self, images, labels) -> float:
    """Fraction of `images` predicted as `labels` (int [B])."""
    return float(np.mean(self.predict(images) == np.asarray(labels)))

  def save(self, path: str) -> None:
    """Writes the .npz that `load` reads."""
    meta = dict(self.meta, format=FORMAT, image_size=self.image_size, pool=self.pool,
                num_layers=len(self.layers), classes=self.num_classes)
    arrays = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    for i, (w, b) in enumerate(self.layers):
      arrays[f"weights_{i}"], arrays[f"bias_{i}"] = w, b
    with open(path, "wb") as f:
      np.savez(f, **arrays)

  @classmethod
  def load(cls, path: str) -> "DigitJudge":
    """The judge saved at `path` (FileNotFoundError / ValueError saying what to do)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"Digit judge {path!r}: no such file; {TRAIN_HINT}")
    try:
      with np.load(path, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
      raise ValueError(f"Digit judge {path!r} is not a readable .npz ({type(e).__name__}: "
                       f"{e}); {TRAIN_HINT}") from None
    try:
      meta = json.loads(str(arrays["meta"]))
      if meta.get("format") != FORMAT:
        raise ValueError(f"format {meta.get('format')!r}, not {FORMAT!r}")
      layers = [(arrays[f"weights_{i}"], arrays[f"bias_{i}"])
                for i in range(int(meta["num_layers"]))]
      return cls(layers, image_size=int(meta["image_size"]), pool=int(meta["pool"]), meta=meta)
    except (KeyError, ValueError, TypeError) as e:
      raise ValueError(f"Digit judge {path!r} is not a digit judge .npz ({type(e).__name__}: "
                       f"{e}); {TRAIN_HINT}") from None
