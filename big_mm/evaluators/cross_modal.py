"""Cross-modal prediction (MultiMAE): predict one modality from others on held-out data.

For each configured `(target, inputs)` in `predictions`, objective.predict runs with the
inputs fully visible and the target fully masked (one jit per distinct `inputs`, all targets
sharing those inputs predicted in one call), over every real example of the split (`mask`)
whose inputs and target are present (`{m}_present`, where the batch has it). Metrics, each
accumulated over the whole split (keys `{target}_from_{inputs joined by _}/{metric}`). A
target predicted from itself alone, e.g. ("rgb", ("rgb",)) -> `rgb_from_rgb`, is a round trip,
accepted only for an objective with ROUND_TRIP = True (a tokenizer: objective "vq_tokenizer").

  depth (pixels with true d > 0 only; sums over all such pixels of the split):
    abs_rel = mean |d_pred - d| / d
    delta1  = fraction of pixels with d_pred > 0 and max(d_pred / d, d / d_pred) < 1.25
  semseg (pixels whose true class is in [0, C); C = objective.num_semseg_classes; others,
  e.g. a 255 "ignore" label, are skipped; prediction = argmax of the logits):
    miou      = mean over classes c with union_c > 0 of intersection_c / union_c, where
                intersection_c / union_c are pixel counts summed over the whole split
                (a class absent from both prediction and truth is left out of the mean)
    pixel_acc = fraction of pixels predicted right
  text (a generative objective's caption, e.g. 4M's; token ids as generated):
    exact_match = fraction of captions generated exactly (both cut after their first EOS)
    token_acc   = fraction of the true captions' tokens (EOS included) matched at their
                  position
  rgb: both images mapped to [0, 1] by x01 = (x - lo) / (hi - lo), (lo, hi) = `rgb_range`
  (the prediction then clipped to [0, 1]):
    psnr = mean over images of 10 log10(1 / max(MSE_image, 1e-10)) (per image, then
           averaged; a perfect prediction scores 100 dB, not inf)
  num_examples: how many examples were scored (a metric is nan when nothing was).

`rgb_range` (default (-1, 1)) must be the range the pp string puts pixels in: it is checked
against pp_image's value_range ops (uint8 [0, 255] without one; not checkable after
`normalize`).

Every metric also has a `{metric}_mean_baseline` sibling: the same metric for a constant
prediction computed from the first `baseline_examples` real examples of the training split
(config.input.data / input.split, read with the evaluator's pp_image, in order): per-pixel
mean depth (over examples with d > 0 at that pixel; pixels never valid get the mean of all
valid depths), per-pixel mean rgb image, per-pixel majority semseg class (ties: the lower
id), the most frequent caption (text). baseline_examples=0 skips the baselines. The
baselines are computed once per run, at the evaluator's first call (they depend on the
data, not on the params).
"""
from __future__ import annotations

import collections
import math
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from big_mm import config as config_lib
from big_mm import modalities as modalities_lib
from big_mm import sharding
from big_mm.evaluators import common
from big_mm.input import preprocess
from big_mm.models import multimae
from big_mm.objectives.masked import batch_key

MIN_MSE = 1e-10  # PSNR <= 100 dB.
EOS_ID = 1  # big_mm.input.tokenizer: 0 pad, 1 eos
TARGETS = ("rgb", "depth", "semseg", "text")
DEFAULT_PREDICTIONS = (("depth", ("rgb",)), ("semseg", ("rgb",)), ("rgb", ("depth", "semseg")))


# ---------------------------------------------------------------------------------------
# Metrics, accumulated over a split (host numpy, float64 sums).

class DepthMetrics:
  """abs_rel and delta1 over every pixel with true depth > 0."""

  def __init__(self):
    self.abs_rel = self.delta1 = 0.0
    self.pixels = 0

  def update(self, pred: np.ndarray, true: np.ndarray) -> None:
    valid = true > 0
    d, p = true[valid].astype(np.float64), pred[valid].astype(np.float64)
    self.abs_rel += float(np.sum(np.abs(p - d) / d))
    positive = p > 0
    ratio = np.maximum(p / d, d / np.where(positive, p, 1.0))
    self.delta1 += float(np.sum(positive & (ratio < 1.25)))
    self.pixels += int(d.size)

  def result(self) -> dict[str, float]:
    if not self.pixels:
      return {"abs_rel": float("nan"), "delta1": float("nan")}
    return {"abs_rel": self.abs_rel / self.pixels, "delta1": self.delta1 / self.pixels}


class SemsegMetrics:
  """mIoU (per-class intersection / union summed over the split) and pixel accuracy."""

  def __init__(self, num_classes: int):
    self.num_classes = num_classes
    self.intersection = np.zeros(num_classes, np.int64)
    self.union = np.zeros(num_classes, np.int64)
    self.correct = self.pixels = 0

  def update(self, pred: np.ndarray, true: np.ndarray) -> None:
    c = self.num_classes
    labelled = (true >= 0) & (true < c)
    p, t = pred[labelled].astype(np.int64), true[labelled].astype(np.int64)
    hit = t[p == t]
    intersection = np.bincount(hit, minlength=c)
    self.intersection += intersection
    self.union += np.bincount(p, minlength=c) + np.bincount(t, minlength=c) - intersection
    self.correct += int(hit.size)
    self.pixels += int(t.size)

  def result(self) -> dict[str, float]:
    present = self.union > 0
    miou = np.mean(self.intersection[present] / self.union[present]) if present.any() else np.nan
    return {"miou": float(miou),
            "pixel_acc": self.correct / self.pixels if self.pixels else float("nan")}


class RgbMetrics:
  """PSNR per image on [0, 1] pixels, averaged over images."""

  def __init__(self, value_range: tuple[float, float]):
    self.lo, self.hi = map(float, value_range)
    self.psnr, self.images = 0.0, 0

  def to_unit(self, x: np.ndarray) -> np.ndarray:
    return (x.astype(np.float64) - self.lo) / (self.hi - self.lo)

  def update(self, pred: np.ndarray, true: np.ndarray) -> None:
    err = np.clip(self.to_unit(pred), 0.0, 1.0) - self.to_unit(true)
    mse = np.mean(np.square(err).reshape(len(err), -1), axis=1)
    self.psnr += float(np.sum(10.0 * np.log10(1.0 / np.maximum(mse, MIN_MSE))))
    self.images += len(err)

  def result(self) -> dict[str, float]:
    return {"psnr": self.psnr / self.images if self.images else float("nan")}


class TextMetrics:
  """Generated token ids against the true caption's, each cut after its first EOS (id 1) or
  at its first pad (id 0): exact_match (whole caption right) and token_acc (the true
  caption's tokens, EOS included, matched at their position)."""

  def __init__(self):
    self.exact = self.correct = self.tokens = self.examples = 0

  def update(self, pred: np.ndarray, true: np.ndarray) -> None:
    for p, t in zip(pred, true):
      p, t = caption_tokens(p), caption_tokens(t)
      self.exact += int(np.array_equal(p, t))
      n = min(len(p), len(t))
      self.correct += int(np.sum(p[:n] == t[:n]))
      self.tokens += len(t)
      self.examples += 1

  def result(self) -> dict[str, float]:
    if not self.examples:
      return {"exact_match": float("nan"), "token_acc": float("nan")}
    return {"exact_match": self.exact / self.examples,
            "token_acc": self.correct / max(self.tokens, 1)}


def caption_tokens(ids: np.ndarray) -> np.ndarray:
  """A caption's ids up to its first EOS (kept) or pad (dropped)."""
  ids = np.asarray(ids)
  stop = np.flatnonzero((ids == EOS_ID) | (ids == 0))
  if not stop.size:
    return ids
  return ids[:stop[0] + 1] if ids[stop[0]] == EOS_ID else ids[:stop[0]]


def _new_metrics(target: str, num_classes: int, rgb_range):
  if target == "text":
    return TextMetrics()
  if target == "depth":
    return DepthMetrics()
  if target == "semseg":
    return SemsegMetrics(num_classes)
  return RgbMetrics(rgb_range)


# ---------------------------------------------------------------------------------------
# Checks.

def check_predictions(predictions, modalities) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """(target, inputs) pairs as tuples; ValueError unless every name is one of the objective's
  modalities (CrossModal.validate has checked the pairs' structure)."""
  out = tuple((target, tuple(inputs)) for target, inputs in predictions)
  for target, inputs in out:
    unknown = [m for m in (target,) + inputs if m not in modalities]
    if unknown:
      raise ValueError(f"cross_modal prediction of {target!r} from {inputs}: {unknown} not "
                       f"among the objective's modalities {list(modalities)}; predict only "
                       f"modalities the model was built with (evals.<name>.predictions).")
  return out


def pp_pixel_range(pp: str) -> tuple[float, float] | None:
  """The range `pp` maps uint8 pixels [0, 255] to; None after normalize (per channel)."""
  lo, hi = 0.0, 255.0
  for op in preprocess.parse_pp(pp):
    if op.name == "normalize":
      return None
    if op.name == "value_range":
      out_lo, out_hi, in_lo, in_hi = op.args
      scale = (out_hi - out_lo) / (in_hi - in_lo)
      lo, hi = out_lo + (lo - in_lo) * scale, out_lo + (hi - in_lo) * scale
  return lo, hi


def check_rgb_range(rgb_range, pp: str) -> None:
  expected = pp_pixel_range(pp)
  if expected is not None and not np.allclose(expected, rgb_range):
    raise ValueError(f"cross_modal rgb_range={tuple(rgb_range)} but pp_image {pp!r} puts "
                     f"pixels in {expected}; set the evaluator's rgb_range={expected}.")


# ---------------------------------------------------------------------------------------
# The loop, over any iterable of (batch, bool host mask) (common.iterate_split in evaluate).

def _require(batch, modalities) -> None:
  for m in modalities:
    if batch_key(m) not in batch:
      raise ValueError(f"cross_modal needs {m!r} in the batches (key {batch_key(m)!r}), which "
                       f"have only {sorted(batch)}; add it to input.modalities.")


def _host(batch, modality: str) -> np.ndarray:
  return common.gather(batch[batch_key(modality)])


def _rows(batch, mask: np.ndarray, modalities) -> np.ndarray:
  """Real rows where every modality is present (rgb, and batches without `{m}_present`:
  always)."""
  rows = mask.copy()
  for m in modalities:
    if modalities_lib.present_key(m) in batch:
      rows &= common.gather(batch[modalities_lib.present_key(m)]).astype(bool)
  return rows


def training_means(batches: Iterable, targets, num_examples: int,
                   num_classes: int) -> dict[str, np.ndarray]:
  """The constant baseline prediction per target from the first `num_examples` real examples
  (with that target present) of `batches`: see the module docstring."""
  sums: dict[str, np.ndarray] = {}
  counts: dict[str, np.ndarray] = {}
  seen = {t: 0 for t in targets}
  text_len = 0
  for batch, mask in batches:
    _require(batch, targets)
    for t in targets:
      rows = _rows(batch, mask, (t,))
      x = _host(batch, t)[rows][:num_examples - seen[t]]
      seen[t] += len(x)
      if t == "text":
        total = collections.Counter(tuple(caption_tokens(c)) for c in x)
        count, text_len = np.int64(len(x)), x.shape[1]
      elif t == "depth":
        valid = x > 0
        total, count = np.where(valid, x, 0).astype(np.float64).sum(0), valid.sum(0)
      elif t == "semseg":
        total = np.stack([(x == c).sum(0) for c in range(num_classes)], axis=-1)
        count = np.int64(len(x))
      else:
        total, count = x.astype(np.float64).sum(0), np.int64(len(x))
      sums[t] = sums.get(t, collections.Counter() if t == "text" else 0) + total
      counts[t] = counts.get(t, 0) + count
    if all(n >= num_examples for n in seen.values()):
      break
  missing = [t for t in targets if not seen[t]]
  if missing:
    raise ValueError(f"cross_modal: the training split has no examples with {missing} for "
                     f"the mean baseline; set baseline_examples=0 to skip the baselines.")
  out = {}
  for t in targets:
    if t == "text":
      common_caption = np.asarray(sums[t].most_common(1)[0][0], np.int32)
      out[t] = np.pad(common_caption, (0, text_len - len(common_caption)))
    elif t == "semseg":
      out[t] = np.argmax(sums[t], axis=-1).astype(np.int32)
    elif t == "depth":
      valid = counts[t] > 0
      if not valid.any():
        raise ValueError("cross_modal: no training pixel has depth > 0 for the mean baseline; "
                         "set baseline_examples=0 to skip the baselines.")
      fill = sums[t][valid].sum() / counts[t][valid].sum()
      out[t] = np.where(valid, sums[t] / np.maximum(counts[t], 1), fill)
    else:
      out[t] = sums[t] / counts[t]
  return out


def prediction_name(target: str, inputs: tuple[str, ...]) -> str:
  return f"{target}_from_{'_'.join(inputs)}"


def score(predict: Callable, batches: Iterable, predictions, *, num_classes: int,
          rgb_range, baselines: dict[str, np.ndarray] | None = None) -> dict[str, float]:
  """Metrics of every prediction over `batches` ((batch, bool host mask) pairs).

  predict(batch, inputs, targets) -> {target: host array} (semseg as int class ids).
  baselines: {target: constant prediction [H, W, ...]} (training_means), or None.
  """
  groups: dict[tuple[str, ...], list[str]] = {}
  for target, inputs in predictions:
    groups.setdefault(inputs, []).append(target)
  metrics = {p: _new_metrics(p[0], num_classes, rgb_range) for p in predictions}
  base = {}
  if baselines:
    base = {p: _new_metrics(p[0], num_classes, rgb_range) for p in predictions}
  examples = {p: 0 for p in predictions}
  for batch, mask in batches:
    for inputs, targets in groups.items():
      _require(batch, inputs + tuple(targets))
      out = predict(batch, inputs, tuple(targets))
      for t in targets:
        rows = _rows(batch, mask, inputs + (t,))
        if not rows.any():
          continue
        true = _host(batch, t)[rows]
        metrics[(t, inputs)].update(np.asarray(out[t])[rows], true)
        if base:
          constant = np.broadcast_to(baselines[t], true.shape[:1] + baselines[t].shape)
          base[(t, inputs)].update(constant, true)
        examples[(t, inputs)] += int(rows.sum())
  results = {}
  for p in predictions:
    name = prediction_name(*p)
    for key, value in metrics[p].result().items():
      results[f"{name}/{key}"] = value
      if base:
        results[f"{name}/{key}_mean_baseline"] = base[p].result()[key]
    results[f"{name}/num_examples"] = float(examples[p])
  return results


def predictor(objective, mesh, inputs: tuple[str, ...], targets: tuple[str, ...]):
  """jit (params, batch) -> {target: prediction} (semseg: int32 argmax ids), batch-sharded."""

  def fn(params, batch):
    out = objective.predict(params, batch, inputs=inputs, targets=targets)
    return {t: jnp.argmax(out[t], axis=-1).astype(jnp.int32) if t == "semseg" else out[t]
            for t in targets}

  return jax.jit(fn, out_shardings=sharding.batch_sharding(mesh))


def _validate_predictions(key: str, predictions) -> None:
  if not isinstance(predictions, (tuple, list)) or not predictions:
    raise config_lib.ConfigError(f"{key} must be a non-empty tuple of (target, (input, ...)) "
                                 f"pairs, e.g. {DEFAULT_PREDICTIONS}; got {predictions!r}.")
  for i, item in enumerate(predictions):
    if (not isinstance(item, (tuple, list)) or len(item) != 2
        or not isinstance(item[1], (tuple, list))):
      raise config_lib.ConfigError(f"{key}[{i}]={item!r} must be a pair (target, (input, ...)), "
                                   f"e.g. ('depth', ('rgb',)).")
    target, inputs = item
    config_lib.choice(f"{key}[{i}] target", target, TARGETS)
    for m in inputs:
      config_lib.choice(f"{key}[{i}] input", m, multimae.MODALITIES)
    round_trip = tuple(inputs) == (target,)  # a tokenizer's reconstruction (vq_tokenizer)
    if not inputs or (target in inputs and not round_trip) or len(set(inputs)) != len(inputs):
      raise config_lib.ConfigError(
          f"{key}[{i}]={item!r}: give at least one input, each once, and not the target itself "
          f"({target!r} is predicted with its input masked), or the target alone (a round "
          f"trip, for objective.name='vq_tokenizer').")


class CrossModal(common.Evaluator):
  """Cross-modal prediction metrics and their mean baselines; see the module docstring."""
  # predictions: ((target, (inputs...)), ...); rgb_range: the batch pixel range (pp_image's
  # value_range).
  DEFAULTS = dict(common.DEFAULTS, predictions=DEFAULT_PREDICTIONS, baseline_examples=1024,
                  rgb_range=(-1.0, 1.0))

  @staticmethod
  def validate(name, ev):
    """The structure of predictions (the names are checked against the objective's modalities
    when the evaluator is built), baseline_examples, rgb_range."""
    _validate_predictions(f"evals.{name}.predictions", ev["predictions"])
    common.int_at_least(f"evals.{name}.baseline_examples", ev["baseline_examples"], 0)
    rgb_range = ev["rgb_range"]
    if (not isinstance(rgb_range, (tuple, list)) or len(rgb_range) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                   for v in rgb_range)
        or rgb_range[0] >= rgb_range[1]):
      raise config_lib.ConfigError(
          f"evals.{name}.rgb_range must be (lo, hi) with lo < hi: the range pp_image's "
          f"value_range puts pixels in, e.g. (-1.0, 1.0); got {rgb_range!r}.")

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    objective = context.objective
    if not hasattr(objective, "predict"):
      raise TypeError(f"{type(objective).__name__} has no predict(); the cross_modal evaluator "
                      "needs a masked multimodal objective (objective.name='multimae').")
    self.predictions = check_predictions(ev.predictions, objective.modalities)
    if not getattr(objective, "ROUND_TRIP", False):
      trips = [p for p in self.predictions if p[1] == (p[0],)]
      if trips:
        raise ValueError(f"cross_modal predictions {trips} predict a modality from itself, a "
                         f"round trip that only a tokenizer objective ('vq_tokenizer') makes; "
                         f"{type(objective).__name__} predicts targets from other inputs.")
    self.targets = tuple(sorted({t for t, _ in self.predictions}))
    if "rgb" in self.targets:
      check_rgb_range(ev.rgb_range, self.input_cfg.pp_image)
    self.num_classes = int(objective.num_semseg_classes) if "semseg" in self.targets else 0
    # One jit per distinct inputs (all targets sharing them predicted in one call).
    groups: dict[tuple[str, ...], list[str]] = {}
    for target, inputs in self.predictions:
      groups.setdefault(inputs, []).append(target)
    self.predictors = {inputs: predictor(objective, context.mesh, inputs, tuple(targets))
                       for inputs, targets in groups.items()}
    self.baselines = None  # training_means, at the first call (baseline_examples > 0)

  def _training_means(self):
    train_cfg = self.input_cfg.copy_and_resolve_references()
    with train_cfg.unlocked():
      train_cfg.data = self.context.config.input.data
      train_cfg.split = self.context.config.input.split
    return training_means(common.iterate_split(train_cfg, self.ev.batch_size, self.context.mesh),
                          self.targets, self.ev.baseline_examples, self.num_classes)

  def evaluate(self, params) -> dict[str, float]:
    if self.ev.baseline_examples and self.baselines is None:
      self.baselines = self._training_means()

    def predict(batch, inputs, targets):
      out = self.predictors[inputs](params, batch)
      return {t: common.gather(out[t]) for t in targets}

    return score(predict, common.iterate_split(self.input_cfg, self.ev.batch_size,
                                               self.context.mesh),
                 self.predictions, num_classes=self.num_classes, rgb_range=self.ev.rgb_range,
                 baselines=self.baselines)
