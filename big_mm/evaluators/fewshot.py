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
Reports `{k}shot_accuracy` (the mean over repeats) and `num_examples` (eval). A Matryoshka
objective (objective.matryoshka_dims) adds the probes on each smaller prefix dim d of the
features (re-normalised): `{k}shot_accuracy@d{d}`.

Other modalities (`modality`, default "image"), e.g. a linear probe on video features:
  dict(type="fewshot", modality="video", pp_modalities={"video": "...|video_views(3, 224)|..."})
reads both splits with input.modalities = (modality,) (its pp string from input.pp_modalities
unless the evaluator's pp_modalities gives one) and embeds them with objective.embed (its
tower; a video tower averages the pooled features of multi-view [V, T, H, W, 3] examples);
records without the modality are skipped.
"""
from __future__ import annotations

import numpy as np

from big_mm import config as config_lib
from big_mm import modalities as modalities_lib
from big_mm.evaluators import common, retrieval

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


class FewShot(common.Evaluator):
  """k-shot ridge probes on frozen image (or `modality`) features; see the module docstring."""
  DEFAULTS = dict(common.DEFAULTS, train_split="train", shots=(1, 5, 10), l2_reg=2.0**10,
                  repeats=3, seed=0, modality="image", pp_modalities=None)

  @staticmethod
  def validate(name, ev):
    shots = ev["shots"]
    if not isinstance(shots, (tuple, list)) or not shots:
      raise config_lib.ConfigError(f"evals.{name}.shots must be a non-empty tuple of examples "
                                   f"per class, e.g. (1, 5, 10); got {shots!r}.")
    for k in shots:
      common.int_at_least(f"evals.{name}.shots entries", k, 1)
    l2_reg = ev["l2_reg"]
    if isinstance(l2_reg, bool) or not isinstance(l2_reg, (int, float)) or not l2_reg > 0:
      raise config_lib.ConfigError(f"evals.{name}.l2_reg must be a number > 0 (big_vision: "
                                   f"2.0**10), got {l2_reg!r}.")
    common.int_at_least(f"evals.{name}.repeats", ev["repeats"], 1)
    common.int_at_least(f"evals.{name}.seed", ev["seed"], 0)
    if not isinstance(ev["train_split"], str) or not ev["train_split"]:
      raise config_lib.ConfigError(f"evals.{name}.train_split must be a split name, e.g. "
                                   f"'train' or 'train[:10000]'; got {ev['train_split']!r}.")
    config_lib.choice(f"evals.{name}.modality", ev["modality"], tuple(modalities_lib.MODALITIES))
    retrieval.check_pp_modalities(f"evals.{name}.pp_modalities", ev["pp_modalities"])

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    self.modality = ev.modality
    if self.modality != "image":
      retrieval.check_towers(f"evals.{name}.modality={self.modality!r}", context.objective,
                             (self.modality,))
      self.input_cfg = retrieval.modality_input(name, self.input_cfg, ev, (self.modality,))

  def _features(self, params, input_cfg):
    """{"zimg": features [N, D], "label": [N]} of the split's records (with the modality)."""
    if self.modality == "image":
      return self.context.embedder.split(params, input_cfg, self.ev.batch_size, texts=False)
    z = retrieval.embed_modalities(self.context, params, input_cfg, self.ev.batch_size,
                                   (self.modality,))
    return {"zimg": z[self.modality], **{k: z[k] for k in ("label",) if k in z}}

  def evaluate(self, params) -> dict[str, float]:
    ev = self.ev
    train_cfg = self.input_cfg.copy_and_resolve_references()
    with train_cfg.unlocked():
      train_cfg.split = ev.train_split
    data = {}
    for name, cfg in (("train", train_cfg), ("test", self.input_cfg)):
      data[name] = self._features(params, cfg)
      if "label" not in data[name] or not len(data[name]["label"]):
        raise ValueError(f"The fewshot evaluator needs labelled examples, but split "
                         f"{cfg.split!r} of {cfg.data!r} has none with a label.")
    probe = dict(shots=tuple(ev.shots), l2_reg=float(ev.l2_reg), repeats=ev.repeats,
                 seed=ev.seed)
    train_x, test_x = data["train"]["zimg"], data["test"]["zimg"]
    out = fewshot_accuracies(train_x, data["train"]["label"], test_x, data["test"]["label"],
                             **probe)
    for dim in common.matryoshka_dims(self.context, train_x.shape[-1]):
      at_dim = fewshot_accuracies(common.matryoshka_prefix(train_x, dim), data["train"]["label"],
                                  common.matryoshka_prefix(test_x, dim), data["test"]["label"],
                                  **probe)
      out.update({f"{name}@d{dim}": value for name, value in at_dim.items()})
    out["num_examples"] = float(len(data["test"]["label"]))
    return out
