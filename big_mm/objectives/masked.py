"""MultiMAE objective: masked multimodal reconstruction with a Dirichlet token budget.

Each step, every example gets exactly `objective.num_visible` = K visible input tokens,
split across its present modalities by a symmetric Dirichlet(`objective.dirichlet_alpha`)
(`sample_visible`); the encoder sees only those, the per-modality decoders predict every
token, and the loss counts only the tokens that were masked (and are real):
  rgb:    MSE of per-patch normalised pixels (MAE's norm_pix_loss), plus MSE of each patch's
          pixel mean and std (so that `predict` can rebuild pixels of never-seen patches)
  depth:  L1 of (depth - model.depth_mean) / model.depth_std over pixels with depth > 0
  semseg: per-pixel cross-entropy
  text:   token cross-entropy over non-pad tokens
loss = sum_m w_m * loss_m (objective.modality_weights, default 1).

Absent modalities: a batch without a modality's key, or with "{m}_present" = 0 for an
example, gives that modality no visible tokens and no loss for the example. Text pad tokens
(id 0) are never visible and never targets.

For evaluators (big_mm/evaluators/cross_modal.py, fewshot.py):
  predict(params, batch, inputs=("rgb",), targets=("depth",)) -> {m: prediction}: inputs fully
      visible, targets fully masked; rgb [B, H, W, 3] (batch range), depth [B, H, W] (batch
      units), semseg logits [B, H, W, C], text logits [B, L, V].
  embed_images(params, images) -> [B, D] pooled encoder features from RGB alone.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm import modalities as modalities_lib
from big_mm.models import aux_loss
from big_mm.models import multimae as multimae_lib
from big_mm.objectives import base



def batch_key(modality: str) -> str:
  return modalities_lib.get(modality).batch_key


def sample_visible(rng, available: dict, fractions, budget: int):
  """Picks `budget` visible tokens per example, split across modalities by `fractions`.

  available: {m: bool [B, N_m]} (modalities in order); fractions: [B, M] (rows sum to 1, 0 for
  absent modalities). Token r (random rank among the available ones) of modality m gets the key
  (r + 1/2) / fraction_m; the `budget` smallest keys win, so every example has exactly `budget`
  picks and modality m about budget * fraction_m of them (Sainte-Lague apportionment), never
  more than it has: a modality short of tokens leaves its share to the others.
  -> visible [B, budget] int32 indices into the concatenated tokens, valid [B, budget] bool
  (False only when an example has fewer than `budget` available tokens in all).
  """
  keys = []
  rngs = jax.random.split(rng, len(available))
  for i, (m, avail) in enumerate(available.items()):
    noise = jnp.where(avail, jax.random.uniform(rngs[i], avail.shape), 2.0)
    rank = jnp.argsort(jnp.argsort(noise, axis=-1), axis=-1).astype(jnp.float32)
    frac = fractions[:, i:i + 1]
    key = (rank + 0.5) / jnp.maximum(frac, 1e-30)
    keys.append(jnp.where(avail & (frac > 0), key, jnp.inf))
  keys = jnp.concatenate(keys, axis=1)
  if budget > keys.shape[1]:
    raise ValueError(f"objective.num_visible={budget} but the model has only {keys.shape[1]} "
                     "tokens in all; lower num_visible.")
  neg, visible = jax.lax.top_k(-keys, budget)
  return visible.astype(jnp.int32), jnp.isfinite(neg)


def dirichlet_fractions(rng, present, alpha: float):
  """Symmetric Dirichlet(alpha) over the present modalities: present [B, M] bool -> [B, M]."""
  g = jax.random.gamma(rng, alpha, present.shape)
  g = jnp.where(present, jnp.maximum(g, 1e-12), 0.0)
  return g / jnp.maximum(jnp.sum(g, axis=1, keepdims=True), 1e-30)


def _masked_mean(values, weights):
  return jnp.sum(values * weights) / jnp.maximum(jnp.sum(weights), 1.0)


class MultiMAE:
  """Objective "multimae" over model "multimae" (big_mm/models/multimae.py). Reads the
  context's modalities, text_len and tokenizer (with a text modality)."""
  NAME = "multimae"
  # num_visible input tokens per example, split across the modalities by a symmetric
  # Dirichlet(dirichlet_alpha); modality_weights: ((name, w), ...) loss weights (unlisted: 1.0).
  SETTINGS = dict(num_visible=98, dirichlet_alpha=1.0, modality_weights=())
  # The batch keys it reads: MultiMAE's modalities and their presence masks.
  BATCH_KEYS = tuple(batch_key(m) for m in multimae_lib.MODALITIES) + tuple(
      modalities_lib.present_key(m) for m in multimae_lib.MODALITIES)

  @classmethod
  def check_settings(cls, settings) -> None:
    base.positive_int("num_visible", settings["num_visible"])
    if not base.number("dirichlet_alpha", settings["dirichlet_alpha"]) > 0:
      raise base.ConfigError(
          f"objective.dirichlet_alpha must be > 0, got {settings['dirichlet_alpha']!r}.")
    weights = settings["modality_weights"]
    if (isinstance(weights, str) or not isinstance(weights, (tuple, list)) or not all(
        isinstance(w, (tuple, list)) and len(w) == 2 for w in weights)):
      raise base.ConfigError(f"objective.modality_weights must be ((modality, weight), ...), "
                             f"e.g. (('depth', 2.0),); got {weights!r}.")
    for m, w in weights:
      base.number(f"modality_weights[{m!r}]", w)

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    if not isinstance(model, multimae_lib.MultiMAE):
      raise base.ConfigError(
          f"objective.name='multimae' needs model_name='multimae', not a {type(model).__name__}.")
    self.model, self.mesh, self.ctx = model, ctx.mesh, ctx
    self.modalities = tuple(model.modalities)
    self.num_semseg_classes = int(model.num_semseg_classes)
    self.budget = int(settings["num_visible"])
    self.alpha = float(settings["dirichlet_alpha"])
    counts = model.num_tokens()
    total = sum(counts.values())
    if not 0 < self.budget <= total:
      raise base.ConfigError(
          f"objective.num_visible={self.budget} must be in [1, {total}] (the model has "
          f"{total} tokens: {counts}).")
    weights = dict(settings["modality_weights"] or ())
    unknown = sorted(set(weights) - set(self.modalities))
    if unknown:
      raise base.ConfigError(
          f"objective.modality_weights names {unknown}, not modalities of the model "
          f"{self.modalities}.")
    self.weights = {m: float(weights.get(m, 1.0)) for m in self.modalities}
    base.check_loaded(ctx, self.modalities, model, model.vocab_size, "model.vocab_size",
                      needed_by=self.NAME)

  # ---- pieces ----------------------------------------------------------------------------

  def _apply(self, params, *args, **kw):
    return self.model.apply({"params": params}, *args, **kw)

  def inputs(self, batch) -> dict:
    return {m: base.float_pixels(batch[batch_key(m)], "MultiMAE") for m in self.modalities
            if batch_key(m) in batch}

  def available(self, batch, allowed=None) -> dict:
    """{m: bool [B, N_m]}: tokens that exist (modality in the batch, present, not text pad)."""
    b = batch["image"].shape[0]
    counts = self.model.num_tokens()
    out = {}
    for m in self.modalities:
      if batch_key(m) not in batch or (allowed is not None and m not in allowed):
        out[m] = jnp.zeros((b, counts[m]), bool)
        continue
      present = batch.get(modalities_lib.present_key(m))
      present = jnp.ones((b,), bool) if present is None else jnp.asarray(present) > 0
      avail = jnp.broadcast_to(present[:, None], (b, counts[m]))
      if m == "text":
        avail = avail & (batch["text"] != 0)
      out[m] = avail
    return out

  def targets(self, batch) -> dict:
    """Per-modality targets in the decoders' output layout [B, N_m, ...]."""
    p = self.model.patch_size
    out = {}
    for m in self.modalities:
      key = batch_key(m)
      if key not in batch:
        continue
      x = batch[key]
      if m == "rgb":
        out[m] = multimae_lib.patchify(x.astype(jnp.float32), p)
      elif m == "depth":
        out[m] = multimae_lib.patchify(x.astype(jnp.float32)[..., None], p)
      elif m == "semseg":
        out[m] = multimae_lib.patchify(x.astype(jnp.int32)[..., None], p)
      else:
        out[m] = x.astype(jnp.int32)
    return out

  def token_losses(self, preds, targets) -> dict:
    """{m: (per-token loss [B, N_m], per-token weight of real pixels/tokens [B, N_m])}."""
    p2 = self.model.patch_size ** 2
    out = {}
    for m, target in targets.items():
      pred = preds[m]
      if m == "rgb":
        mean = jnp.mean(target, axis=-1, keepdims=True)
        std = jnp.sqrt(jnp.var(target, axis=-1, keepdims=True) + 1e-6)
        norm = (target - mean) / std
        loss = (jnp.mean((pred[..., :-2] - norm) ** 2, axis=-1)
                + (pred[..., -2] - mean[..., 0]) ** 2 + (pred[..., -1] - std[..., 0]) ** 2)
        out[m] = (loss, jnp.ones(loss.shape, jnp.float32))
      elif m == "depth":
        depth = target
        valid = (depth > 0).astype(jnp.float32)
        norm = (depth - self.model.depth_mean) / self.model.depth_std
        err = jnp.sum(jnp.abs(pred - norm) * valid, axis=-1)
        count = jnp.sum(valid, axis=-1)
        out[m] = (err / jnp.maximum(count, 1.0), (count > 0).astype(jnp.float32))
      elif m == "semseg":
        logits = pred.reshape(pred.shape[:2] + (p2, self.num_semseg_classes))
        logp = jax.nn.log_softmax(logits, axis=-1)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        out[m] = (jnp.mean(nll, axis=-1), jnp.ones(nll.shape[:2], jnp.float32))
      else:
        logp = jax.nn.log_softmax(pred, axis=-1)
        nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
        out[m] = (nll, (target != 0).astype(jnp.float32))
    return out

  def masks(self, rng, batch):
    """-> (visible [B, K], valid [B, K], available {m: [B, N_m]})."""
    available = self.available(batch)
    present = jnp.stack([jnp.any(a, axis=1) for a in available.values()], axis=1)
    fractions = dirichlet_fractions(rng, present, self.alpha)
    visible, valid = sample_visible(jax.random.fold_in(rng, 1), available, fractions,
                                    self.budget)
    return visible, valid, available

  # ---- training --------------------------------------------------------------------------

  def loss_fn(self, params, batch, rng):
    mask_rng, dropout_rng = jax.random.split(rng)
    visible, valid, available = self.masks(mask_rng, batch)
    targets = self.targets(batch)
    (preds, _), aux = aux_loss.apply(self.model, params, self.inputs(batch), visible, valid,
                                     targets=tuple(targets), train=True,
                                     rngs={"dropout": dropout_rng})
    # seen[b, n]: token n (concatenated order) was given to the encoder.
    total = sum(a.shape[1] for a in available.values())
    seen = jnp.zeros((visible.shape[0], total), bool)
    seen = jax.vmap(lambda s, i, v: s.at[i].max(v))(seen, visible, valid)
    loss, metrics, start = 0.0, {}, 0
    per_token = self.token_losses(preds, targets)
    for m, avail in available.items():
      seen_m = seen[:, start:start + avail.shape[1]]
      start += avail.shape[1]
      metrics[f"{m}/visible_fraction"] = jnp.mean(jnp.sum(seen_m, axis=1) / self.budget)
      if m not in per_token:
        continue
      values, weights = per_token[m]
      loss_m = _masked_mean(values, weights * (avail & ~seen_m).astype(jnp.float32))
      loss = loss + self.weights[m] * loss_m
      metrics[f"{m}/loss"] = loss_m
    return aux_loss.add(loss, metrics, aux)

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One example of each model modality the input loads (input.modalities; None: image and
    text), at the model's sizes."""
    loaded = self.ctx.modalities if self.ctx.modalities is not None else ("rgb", "text")
    hw = (self.model.image_size, self.model.image_size)
    out = {}
    for m in self.modalities:
      if m in loaded:
        mod = modalities_lib.get(m)
        out[mod.batch_key] = jax.ShapeDtypeStruct(
            (1,) + mod.example_shape(hw, self.model.text_len), mod.dtype)
    return out

  def init_params(self, rng):
    """Initial (boxed) params from zeros shaped like `example_batch()`."""
    example = base.zeros(self.example_batch())
    visible = jnp.zeros((1, self.budget), jnp.int32)
    return self.model.init({"params": rng}, self.inputs(example), visible,
                           jnp.ones(visible.shape, bool))["params"]

  # ---- evaluation ------------------------------------------------------------------------

  def _all_visible(self, batch, inputs):
    available = self.available(batch, allowed=inputs)
    k = sum(self.model.num_tokens()[m] for m in inputs)
    present = jnp.stack([jnp.any(a, axis=1) for a in available.values()], axis=1)
    fractions = present / jnp.maximum(jnp.sum(present, axis=1, keepdims=True), 1)
    # Every available input token fits in the budget, so the ordering's randomness is moot.
    return sample_visible(jax.random.key(0), available, fractions, k)

  def predict(self, params, batch, *, inputs, targets):
    inputs, targets = tuple(inputs), tuple(targets)
    for m in inputs + targets:
      if m not in self.modalities:
        raise ValueError(f"Modality {m!r} is not one of the model's {self.modalities}.")
    visible, valid = self._all_visible(batch, inputs)
    given = {m: x for m, x in self.inputs(batch).items() if m in inputs}
    preds, _ = self._apply(params, given, visible, valid, targets=targets)
    model, p = self.model, self.model.patch_size
    h = w = model.image_size
    out = {}
    for m, pred in preds.items():
      if m == "rgb":
        pixels = pred[..., :-2] * pred[..., -1:] + pred[..., -2:-1]
        out[m] = multimae_lib.unpatchify(pixels, p, h, w)
      elif m == "depth":
        out[m] = multimae_lib.unpatchify(pred, p, h, w)[..., 0] * model.depth_std + (
            model.depth_mean)
      elif m == "semseg":
        out[m] = multimae_lib.unpatchify(pred, p, h, w)
      else:
        out[m] = pred
    return out

  def embed_images(self, params, images):
    batch = {"image": images}
    visible, valid = self._all_visible(batch, ("rgb",))
    _, out = self._apply(params, {"rgb": images}, visible, valid, targets=())
    return out["pooled"]
