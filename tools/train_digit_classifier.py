r"""Trains the digit judge (big_mm.evaluators.digit_judge) that reads generated digit images.

Usage:
  python tools/train_digit_classifier.py --out /tmp/big_mm_digit_judge.npz [--data_dir DIR] \
      [--data digits_captions] [--pool 4] [--hidden 64] [--C 1.0] [--seed 0] \
      [--tokenizer /tmp/big_mm_cm3_tok] [--step N]

Trains on --data's train split images only (the "image" and "label" features; digits_captions
or digits_captions_tokens) with scikit-learn: an MLP with one ReLU layer of --hidden units
(lbfgs, L2 penalty 1 / --C, seed --seed) or multinomial logistic regression (--hidden 0), both
deterministic, on the judge's features (grey, average-pooled by --pool: 32x32 -> 8x8 at 4, in
[0, 1]). Writes the weights and a JSON record (data, preprocessing, train / test accuracy) to
the .npz --out, and checks that the numpy judge read back from it predicts as the scikit-learn
model does.

--tokenizer WORKDIR (a trained rgb vq_tokenizer run, configs/demo_cm3_tokenizer.py) also
measures the judge on the test images' round trip decode(encode(x)), the ceiling of judging
that tokenizer's generated images, and the codebook usage on the test split (codes used of the
vocabulary, perplexity = exp entropy of the code histogram).
"""
from __future__ import annotations

import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np

from big_mm import cli
from big_mm import config as config_lib
from big_mm.evaluators import digit_judge
from big_mm.input import preprocess
from big_mm.input import sources
# pylint: enable=g-import-not-at-top,wrong-import-position

FLAGS = ("out", "data", "data_dir", "pool", "hidden", "C", "seed", "tokenizer", "step")
_RGB_OPS = preprocess.parse_pp("decode|value_range(-1,1)")  # What the trainer's pp gives.


def load_split(data: str, split: str, data_dir: str | None = None):
  """`data`'s `split` -> (images float32 [N, H, W, 3] in [-1, 1], labels int64 [N])."""
  builder = sources._builder(data, data_dir)  # pylint: disable=protected-access
  missing = {"image", "label"} - set(builder.info.features.keys())
  if missing:
    raise config_lib.ConfigError(f"--data {data!r} has no {sorted(missing)} feature; give a "
                                 f"dataset of labelled digit images (digits_captions).")
  if split not in builder.info.splits:
    raise config_lib.ConfigError(f"--data {data!r} has no {split!r} split: "
                                 f"{sorted(builder.info.splits.keys())}.")
  decoders = sources._skip_decoders(builder.info.features)  # pylint: disable=protected-access
  src = builder.as_data_source(split=split, decoders=decoders)
  records = [src[i] for i in range(len(src))]
  images = np.stack([preprocess.apply_pp(_RGB_OPS, r["image"], None) for r in records])
  labels = np.array([int(r["label"]) for r in records], np.int64)
  return images.astype(np.float32), labels


def fit(images, labels, *, pool: int = 4, hidden: int = 64, C: float = 1.0, seed: int = 0):
  """Trains the scikit-learn classifier on judge features -> (sklearn model, DigitJudge)."""
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  from sklearn.neural_network import MLPClassifier  # pylint: disable=g-import-not-at-top
  if pool < 1 or images.shape[1] % pool or hidden < 0 or C <= 0:
    raise config_lib.ConfigError(f"--pool must divide the image size {images.shape[1]}, "
                                 f"--hidden be >= 0 and --C > 0; got {pool}, {hidden}, {C}.")
  x = digit_judge.features(images, pool)
  if hidden:
    model = MLPClassifier((hidden,), alpha=1.0 / C, solver="lbfgs", max_iter=2000,
                          random_state=seed).fit(x, labels)
    layers = list(zip(model.coefs_, model.intercepts_))
  else:
    model = LogisticRegression(C=C, max_iter=5000).fit(x, labels)
    layers = [(model.coef_.T, model.intercept_)]
  if not np.array_equal(model.classes_, np.arange(len(model.classes_))):
    raise config_lib.ConfigError(f"The train split's labels are {model.classes_.tolist()}; the "
                                 f"judge needs every class 0..{len(model.classes_) - 1}.")
  kind = f"mlp({hidden}, relu)" if hidden else "logistic_regression"
  meta = dict(model=kind, C=C, seed=seed, preprocessing=(
      f"clip [-1, 1], mean of RGB, {pool}x{pool} average pool, (x + 1) / 2, row-major"))
  judge = digit_judge.DigitJudge(layers, image_size=images.shape[1], pool=pool, meta=meta)
  return model, judge


def round_trip(tokenizer, images, batch: int = 100) -> tuple[np.ndarray, np.ndarray]:
  """A vq tokenizer's decode(encode(images)) and its codes, in batches."""
  import jax  # pylint: disable=g-import-not-at-top
  encode, decode = jax.jit(tokenizer.encode), jax.jit(tokenizer.decode)
  codes, recon = [], []
  for lo in range(0, len(images), batch):
    x = images[lo:lo + batch]
    pad = batch - len(x)  # Full batches only: one compilation.
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)]) if pad else x
    c = encode(x)
    codes.append(np.asarray(c)[:batch - pad])
    recon.append(np.asarray(decode(c))[:batch - pad])
  return np.concatenate(recon), np.concatenate(codes)


def code_usage(codes, vocab_size: int) -> tuple[int, float]:
  """(distinct codes, perplexity = exp entropy of the code histogram) of int codes [...]."""
  counts = np.bincount(np.asarray(codes).ravel(), minlength=vocab_size)
  p = counts[counts > 0] / counts.sum()
  return int((counts > 0).sum()), float(np.exp(-np.sum(p * np.log(p))))


def train(out: str, *, data: str = "digits_captions", data_dir: str | None = None,
          pool: int = 4, hidden: int = 64, C: float = 1.0, seed: int = 0,
          log=print) -> tuple[Any, digit_judge.DigitJudge]:
  """Trains on `data`'s train split, scores the test split, writes `out` -> (sklearn model,
  the judge read back from `out`)."""
  train_x, train_y = load_split(data, "train", data_dir)
  test_x, test_y = load_split(data, "test", data_dir)
  model, judge = fit(train_x, train_y, pool=pool, hidden=hidden, C=C, seed=seed)
  judge.meta.update(data=data, train_examples=len(train_y), test_examples=len(test_y),
                    train_accuracy=judge.accuracy(train_x, train_y),
                    test_accuracy=judge.accuracy(test_x, test_y))
  judge.save(out)
  loaded = digit_judge.DigitJudge.load(out)
  for x in (train_x, test_x):
    if not np.array_equal(loaded.predict(x), model.predict(digit_judge.features(x, pool))):
      raise AssertionError(f"The judge read back from {out} predicts otherwise than the "
                           f"scikit-learn model it was written from.")
  side = train_x.shape[1] // pool
  log(f"{judge.meta['model']} on {data} images pooled to {side}x{side}: train accuracy "
      f"{judge.meta['train_accuracy']:.4f} ({len(train_y)} images), test accuracy "
      f"{judge.meta['test_accuracy']:.4f} ({len(test_y)}); wrote {out}.")
  return model, loaded


def _run_command_line(flags, overrides) -> int:
  if overrides:
    raise config_lib.ConfigError(f"train_digit_classifier takes no --config.* overrides, got "
                                 f"{sorted(overrides)}.")
  try:
    C = float(flags.get("C", 1.0))
  except ValueError:
    raise config_lib.ConfigError(f"--C must be a number, got {flags['C']!r}.") from None
  ints = {k: cli.int_flag(flags, k) for k in ("pool", "hidden", "seed", "step")}
  data = flags.get("data", "digits_captions")
  _, judge = train(flags["out"], data=data, data_dir=flags.get("data_dir"),
                   pool=4 if ints["pool"] is None else ints["pool"],
                   hidden=64 if ints["hidden"] is None else ints["hidden"], C=C,
                   seed=ints["seed"] or 0)
  if "tokenizer" in flags:
    from big_mm.models import vq  # pylint: disable=g-import-not-at-top
    if not os.path.isdir(flags["tokenizer"]):
      raise FileNotFoundError(f"--tokenizer {flags['tokenizer']}: no such directory; give the "
                              f"workdir of a trained rgb vq_tokenizer run.")
    tok = vq.load(flags["tokenizer"], ints["step"])
    if tok.modality != "rgb":
      raise config_lib.ConfigError(f"--tokenizer {flags['tokenizer']} is a {tok.modality!r} "
                                   f"tokenizer; give an rgb one.")
    test_x, test_y = load_split(data, "test", flags.get("data_dir"))
    recon, codes = round_trip(tok, test_x)
    used, perplexity = code_usage(codes, tok.vocab_size)
    print(f"Round trip through {flags['tokenizer']} (step {tok.step}, grid {tok.grid[0]}x"
          f"{tok.grid[1]}, vocab {tok.vocab_size}): judge test accuracy "
          f"{judge.accuracy(recon, test_y):.4f} (real images {judge.meta['test_accuracy']:.4f}); "
          f"recon range [{recon.min():.2f}, {recon.max():.2f}]; codes used on the test split "
          f"{used}/{tok.vocab_size}, perplexity {perplexity:.1f}.")
  return 0


def main(argv: list[str]) -> int:
  return cli.main(_run_command_line, argv, doc=__doc__, flags=FLAGS, required=("out",))


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
