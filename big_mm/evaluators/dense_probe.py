"""Dense-feature linear probes: semantic segmentation and depth read linearly from the frozen
image tower's patch tokens (objective.patch_features: a towers model's un-pooled "encoded"
tokens as a [B, h, w, D] grid), fitted on `train_split` and measured on the eval `split` of a
dataset with dense maps (e.g. the bundled multimodal_scenes: depth and semseg per pixel).

Protocol. SigLIP 2 (Tschannen et al. 2025, arXiv:2502.14786) shows its dense features by
probing the frozen image encoder on semantic segmentation (mIoU) and depth estimation (RMSE),
as TIPS (Maninis et al. 2024, arXiv:2410.16512) does. The linear segmentation probe is DINOv2's
(Oquab et al. 2023, "lin."): a linear layer on each patch token gives a low-resolution logit
map, upsampled bilinearly to the label resolution. We do that for both tasks: the patch grid's
linear outputs are upsampled bilinearly (jax.image.resize, half-pixel centres) to the map's
H x W and scored per pixel. Both heads here are linear maps on the last layer's tokens (no
multi-layer concatenation, no DPT-style decoder, no augmentation), so the numbers compare
models under this probe, not with the papers' tables.

Features are standardised per dimension with the training tokens' mean and std (+1e-5), as the
few-shot probe does (fewshot.py). Then
  semseg  logits = upsample(x W + c) [N, H, W, C]; W, c start at zero and take `seg_steps`
          full-batch Adam steps (lr `seg_lr`) on the mean cross-entropy over labelled pixels
          (class in [0, C); others, e.g. 255 "ignore", are skipped) + `seg_l2` |W|^2.
          Deterministic: zero init, the whole training set every step, no sampling.
          C = `num_classes`, or the largest training label + 1 when None.
  depth   d = upsample(x w + c): closed-form ridge regression (bilinear upsampling is linear,
          so it is least squares on the upsampled features) over the training pixels with
          depth > 0, penalty `depth_l2_reg` |w|^2 (c unpenalised), solved in float64.
Metrics, over every test pixel (split sums, as cross_modal.py's):
  semseg/miou, semseg/pixel_acc   (cross_modal.SemsegMetrics: per-class IoU of the split's
                                  pixel counts, classes absent from prediction and truth left out)
  depth/rmse = sqrt(mean (d_pred - d)^2), depth/abs_rel = mean |d_pred - d| / d,
  depth/delta1                    (pixels with true d > 0; cross_modal.DepthMetrics)
  num_examples, num_train_examples.
The evaluator reads the splits with input.modalities = ("image", *tasks) (dense.py's joint
pp, so pp_image must keep the maps aligned: decode, resize, crops, flips, value_range).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_mm import config as config_lib
from big_mm import modalities as modalities_lib
from big_mm import sharding
from big_mm.evaluators import common
from big_mm.evaluators.cross_modal import DepthMetrics, SemsegMetrics

TASKS = ("semseg", "depth")
STD_EPS = 1e-5
CHUNK = 256  # examples per chunk when upsampling features for the depth fit / predictions


def upsample(x, hw: tuple[int, int]):
  """[N, h, w, K] -> [N, H, W, K], bilinear (identity when the sizes agree)."""
  if tuple(x.shape[1:3]) == tuple(hw):
    return x
  return jax.image.resize(x, (x.shape[0], *hw, x.shape[-1]), "bilinear")


def standardiser(features: np.ndarray):
  """(mean, std) per feature dimension over every training token."""
  flat = np.asarray(features, np.float64).reshape(-1, features.shape[-1])
  return flat.mean(0).astype(np.float32), (flat.std(0) + STD_EPS).astype(np.float32)


# ---------------------------------------------------------------------------------------
# Segmentation: linear logits, upsampled, full-batch Adam.

@functools.partial(jax.jit, static_argnames=("num_classes", "steps"))
def _fit_segmentation(x, labels, *, num_classes: int, steps: int, lr, l2):
  d = x.shape[-1]
  params = {"w": jnp.zeros((d, num_classes), jnp.float32),
            "c": jnp.zeros((num_classes,), jnp.float32)}
  labelled = (labels >= 0) & (labels < num_classes)
  target = jnp.where(labelled, labels, 0)
  count = jnp.maximum(jnp.sum(labelled), 1)
  tx = optax.adam(lr)

  def loss_fn(p):
    logits = upsample(x @ p["w"] + p["c"], labels.shape[1:3])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, target)
    return jnp.sum(jnp.where(labelled, ce, 0.0)) / count + l2 * jnp.sum(p["w"] ** 2)

  def step(carry, _):
    p, opt = carry
    loss, g = jax.value_and_grad(loss_fn)(p)
    updates, opt = tx.update(g, opt, p)
    return (optax.apply_updates(p, updates), opt), loss

  (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
  return params, losses


def fit_segmentation(features, labels, *, num_classes: int, steps: int = 300, lr: float = 0.1,
                     l2: float = 0.0):
  """Probe on standardised features [N, h, w, D] for labels [N, H, W] -> (params {"w", "c"},
  the training loss at each step)."""
  params, losses = _fit_segmentation(jnp.asarray(features, jnp.float32),
                                     jnp.asarray(labels, jnp.int32), num_classes=num_classes,
                                     steps=steps, lr=jnp.float32(lr), l2=jnp.float32(l2))
  return jax.device_get(params), np.asarray(losses)


@jax.jit
def _segment(x, w, c, hw_like):
  return jnp.argmax(upsample(x @ w + c, hw_like.shape[1:3]), axis=-1).astype(jnp.int32)


def predict_segmentation(params, features, hw: tuple[int, int]) -> np.ndarray:
  """int32 [N, H, W] class ids (argmax of the upsampled logits), CHUNK examples at a time."""
  like = jnp.zeros((1, *hw), jnp.int8)
  return np.concatenate([np.asarray(_segment(jnp.asarray(features[i:i + CHUNK]), params["w"],
                                             params["c"], like))
                         for i in range(0, len(features), CHUNK)])


# ---------------------------------------------------------------------------------------
# Depth: closed-form ridge on the upsampled features.

@jax.jit
def _normal_equations(x, depth):
  """X^T X and X^T y over the pixels with depth > 0, X = [upsample(x), 1]."""
  up = upsample(x, depth.shape[1:3])
  up = jnp.concatenate([up, jnp.ones(up.shape[:-1] + (1,), up.dtype)], axis=-1)
  valid = (depth > 0).astype(up.dtype)[..., None]
  flat, y = (up * valid).reshape(-1, up.shape[-1]), (depth[..., None] * valid).reshape(-1)
  return flat.T @ flat, flat.T @ y


def fit_depth(features, depth, *, l2_reg: float = 1e-3) -> np.ndarray:
  """Ridge weights [D + 1] (last: the unpenalised bias) of depth [N, H, W] on standardised
  features [N, h, w, D]; pixels with depth <= 0 (no measurement) are left out."""
  d = features.shape[-1]
  xtx, xty = np.zeros((d + 1, d + 1)), np.zeros(d + 1)
  for i in range(0, len(features), CHUNK):
    a, b = _normal_equations(jnp.asarray(features[i:i + CHUNK], jnp.float32),
                             jnp.asarray(depth[i:i + CHUNK], jnp.float32))
    xtx += np.asarray(a, np.float64)
    xty += np.asarray(b, np.float64)
  penalty = np.full(d + 1, float(l2_reg))
  penalty[-1] = 0.0
  return np.linalg.solve(xtx + np.diag(penalty), xty)


@jax.jit
def _depth(x, w, hw_like):
  return upsample(x @ w[:-1, None] + w[-1], hw_like.shape[1:3])[..., 0]


def predict_depth(w, features, hw: tuple[int, int]) -> np.ndarray:
  like = jnp.zeros((1, *hw), jnp.int8)
  w = jnp.asarray(w, jnp.float32)
  return np.concatenate([np.asarray(_depth(jnp.asarray(features[i:i + CHUNK]), w, like))
                         for i in range(0, len(features), CHUNK)])


# ---------------------------------------------------------------------------------------
# Metrics.

def segmentation_metrics(pred, true, num_classes: int) -> dict[str, float]:
  """{"miou", "pixel_acc"} over all pixels of pred / true int [N, H, W] (see module doc)."""
  m = SemsegMetrics(num_classes)
  m.update(np.asarray(pred), np.asarray(true))
  return m.result()


def depth_metrics(pred, true) -> dict[str, float]:
  """{"rmse", "abs_rel", "delta1"} over the pixels with true depth > 0."""
  pred, true = np.asarray(pred, np.float64), np.asarray(true, np.float64)
  m = DepthMetrics()
  m.update(pred, true)
  valid = true > 0
  rmse = np.sqrt(np.mean((pred[valid] - true[valid]) ** 2)) if valid.any() else np.nan
  return {"rmse": float(rmse), **m.result()}


# ---------------------------------------------------------------------------------------
# The evaluator.

class DenseProbe(common.Evaluator):
  """Linear segmentation / depth probes on frozen patch tokens; see the module docstring."""
  # tasks: which probes (each needs that dense map in both splits). num_classes: semseg classes
  # (None: largest training label + 1; set it when labels hold an ignore id such as 255).
  DEFAULTS = dict(common.DEFAULTS, train_split="train", tasks=TASKS, num_classes=None,
                  seg_steps=300, seg_lr=0.1, seg_l2=0.0, depth_l2_reg=1e-3)

  @staticmethod
  def validate(name, ev):
    tasks = ev["tasks"]
    if (isinstance(tasks, str) or not isinstance(tasks, (tuple, list)) or not tasks
        or len(set(tasks)) != len(tasks)):
      raise config_lib.ConfigError(f"evals.{name}.tasks must be a non-empty tuple of distinct "
                                   f"probes from {TASKS}; got {tasks!r}.")
    for t in tasks:
      config_lib.choice(f"evals.{name}.tasks entry", t, TASKS)
    if ev["num_classes"] is not None:
      common.int_at_least(f"evals.{name}.num_classes", ev["num_classes"], 2)
    common.int_at_least(f"evals.{name}.seg_steps", ev["seg_steps"], 1)
    for key, positive in (("seg_lr", True), ("seg_l2", False), ("depth_l2_reg", False)):
      v = ev[key]
      if (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)
          or v < 0 or (positive and v == 0)):
        raise config_lib.ConfigError(f"evals.{name}.{key} must be a number "
                                     f"{'> 0' if positive else '>= 0'}, got {v!r}.")
    if not isinstance(ev["train_split"], str) or not ev["train_split"]:
      raise config_lib.ConfigError(f"evals.{name}.train_split must be a split name, e.g. "
                                   f"'train' or 'train[:1000]'; got {ev['train_split']!r}.")

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    if self.naflex_inputs or (self.input_cfg.pp_image or "").split("|")[-1].strip().startswith(
        "naflex"):
      raise config_lib.ConfigError(
          f"evals.{name} (dense_probe) needs images on a fixed patch grid aligned with the "
          "dense maps; NaFlex turns them into patch sequences. Give the evaluator a pp_image "
          "with a fixed size, e.g. 'decode|resize(224)|value_range(-1,1)'.")
    if not callable(getattr(context.objective, "patch_features", None)):
      raise TypeError(f"{type(context.objective).__name__} has no patch_features(); the "
                      "dense_probe evaluator needs a towers objective with an image tower "
                      "(objective.name='contrastive' or 'siglip2').")
    self.tasks = tuple(ev.tasks)
    with self.input_cfg.unlocked():
      self.input_cfg.modalities = ("image",) + self.tasks
    self.patch_features = jax.jit(context.objective.patch_features,
                                  out_shardings=sharding.batch_sharding(context.mesh))

  def _read(self, params, input_cfg):
    """(features [N, h, w, D], {task: maps [N, H, W]}) of every real example of the split."""
    feats, maps = [], {t: [] for t in self.tasks}
    try:
      for batch, mask in common.iterate_split(input_cfg, self.ev.batch_size, self.context.mesh):
        rows = mask.copy()
        for t in self.tasks:
          present = modalities_lib.present_key(t)
          if present in batch:
            rows &= common.gather(batch[present]).astype(bool)
        image = modalities_lib.model_input(batch, "image")
        feats.append(common.gather(self.patch_features(params, image))[rows])
        for t in self.tasks:
          maps[t].append(common.gather(batch[modalities_lib.get(t).batch_key])[rows])
    except ValueError as e:
      if "input.modalities names" not in str(e):
        raise
      raise ValueError(f"evals.{self.name} (dense_probe) reads {list(self.tasks)} maps from "
                       f"split {input_cfg.split!r} of {input_cfg.data!r}, which has none: {e} "
                       f"Point evals.{self.name}.data at a dataset with them (e.g. "
                       f"'multimodal_scenes') or set evals.{self.name}.tasks.") from None
    feats = np.concatenate(feats) if feats else np.zeros((0,))
    if not len(feats):
      raise ValueError(f"evals.{self.name} (dense_probe): split {input_cfg.split!r} of "
                       f"{input_cfg.data!r} has no example with every map of {list(self.tasks)}"
                       f" present.")
    return feats, {t: np.concatenate(v) for t, v in maps.items()}

  def evaluate(self, params) -> dict[str, float]:
    ev = self.ev
    train_cfg = self.input_cfg.copy_and_resolve_references()
    with train_cfg.unlocked():
      train_cfg.split = ev.train_split
    train_x, train_maps = self._read(params, train_cfg)
    test_x, test_maps = self._read(params, self.input_cfg)
    mean, std = standardiser(train_x)
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    out = {"num_examples": float(len(test_x)), "num_train_examples": float(len(train_x))}
    if "semseg" in self.tasks:
      labels = train_maps["semseg"]
      classes = ev.num_classes or int(labels.max()) + 1
      probe, _ = fit_segmentation(train_x, labels, num_classes=classes, steps=ev.seg_steps,
                                  lr=ev.seg_lr, l2=ev.seg_l2)
      true = test_maps["semseg"]
      pred = predict_segmentation(probe, test_x, true.shape[1:3])
      out.update({f"semseg/{k}": v for k, v in segmentation_metrics(pred, true, classes).items()})
    if "depth" in self.tasks:
      w = fit_depth(train_x, train_maps["depth"], l2_reg=ev.depth_l2_reg)
      true = test_maps["depth"]
      out.update({f"depth/{k}": v for k, v in depth_metrics(
          predict_depth(w, test_x, true.shape[1:3]), true).items()})
    return out
