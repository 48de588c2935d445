"""Few-shot linear probe (big_vision's fewshot_lsr): closed-form ridge regression on frozen
image features.

Features: Embedder.embed_images (objective.embed_images: the normalised image embedding of
contrastive models, MultiMAE's pooled RGB encoder features) of every real example of
`train_split` and of the eval `split` (both read with the evaluator's data / pp_image; slice
a large training split, e.g. train_split="train[:20000]", to bound the cost).

For each repeat r < `repeats` (rng seeded with seed + r) every class's training examples are
shuffled once; for each `shots` k the first k of each class (all it has, if fewer) form the
probe's training set, so the k-shot sets of one repeat are nested. As big_vision:
  x = (features - mean) / (std + 1e-5)   (mean, std per dimension over those k-shot examples)
  x = [x, 100]                          (a constant bias feature, large: ~unregularised)
  y = 2 * one_hot(label, C) - 1         (targets in {-1, 1}; C = max label + 1, over both
                                         splits)
  W = argmin |x W - y|^2 + l2_reg |W|^2 = (x^T x + l2_reg I)^-1 x^T y
      (solved in float64 with numpy, as x^T (x x^T + l2_reg I)^-1 y when there are fewer
      examples than dimensions: the same W)
and predicts argmax(x_eval W) on the eval split, with x_eval whitened by the same mean / std.
Reports `{k}shot_accuracy` (the mean over repeats) and `num_examples` (eval).
"""
from __future__ import annotations

import numpy as np

from big_mm.evaluators import common

BIAS_FEATURE = 100.0
STD_EPS = 1e-5


def fit_ridge(x: np.ndarray, y: np.ndarray, num_classes: int, l2_reg: float):
  """Fits the probe on features x [N, D], labels y [N] -> (mean, std, W [D + 1, C])."""
  x = np.asarray(x, np.float64)
  mean, std = x.mean(axis=0), x.std(axis=0) + STD_EPS
  x = _design(x, mean, std)
  targets = 2.0 * np.eye(num_classes)[y] - 1.0
  n, d = x.shape
  if n >= d:
    w = np.linalg.solve(x.T @ x + l2_reg * np.eye(d), x.T @ targets)
  else:
    w = x.T @ np.linalg.solve(x @ x.T + l2_reg * np.eye(n), targets)
  return mean, std, w


def _design(x, mean, std):
  x = (np.asarray(x, np.float64) - mean) / std
  return np.concatenate([x, np.full((len(x), 1), BIAS_FEATURE)], axis=1)


def predict_ridge(probe, x: np.ndarray) -> np.ndarray:
  mean, std, w = probe
  return np.argmax(_design(x, mean, std) @ w, axis=1)


def sample_shots(labels: np.ndarray, shots, seed: int) -> dict[int, np.ndarray]:
  """{k: indices of the first k examples of each class in a seeded per-class shuffle}."""
  rng = np.random.default_rng(seed)
  per_class = [rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)]
  return {k: np.concatenate([idx[:k] for idx in per_class]) for k in shots}


def fewshot_accuracies(train_x, train_y, test_x, test_y, *, shots, l2_reg: float, repeats: int,
                       seed: int) -> dict[str, float]:
  """{'{k}shot_accuracy': mean over repeats of the k-shot ridge probe's eval accuracy}."""
  train_y, test_y = np.asarray(train_y, np.int64), np.asarray(test_y, np.int64)
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  accuracies = {k: [] for k in shots}
  for r in range(repeats):
    for k, idx in sample_shots(train_y, shots, seed + r).items():
      probe = fit_ridge(train_x[idx], train_y[idx], num_classes, l2_reg)
      accuracies[k].append(np.mean(predict_ridge(probe, test_x) == test_y))
  return {f"{k}shot_accuracy": float(np.mean(v)) for k, v in accuracies.items()}


def evaluate(ev, *, embedder, params, config) -> dict[str, float]:
  test_cfg = common.eval_input_config(config, ev)
  train_cfg = test_cfg.copy_and_resolve_references()
  with train_cfg.unlocked():
    train_cfg.split = ev.train_split
  data = {}
  for name, cfg in (("train", train_cfg), ("test", test_cfg)):
    data[name] = embedder.split(params, cfg, ev.batch_size, texts=False)
    if "label" not in data[name] or not len(data[name]["label"]):
      raise ValueError(f"The fewshot evaluator needs labelled examples, but split "
                       f"{cfg.split!r} of {cfg.data!r} has none with a label.")
  out = fewshot_accuracies(data["train"]["zimg"], data["train"]["label"], data["test"]["zimg"],
                           data["test"]["label"], shots=tuple(ev.shots), l2_reg=float(ev.l2_reg),
                           repeats=ev.repeats, seed=ev.seed)
  out["num_examples"] = float(len(data["test"]["label"]))
  return out
