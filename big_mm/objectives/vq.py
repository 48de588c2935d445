"""Objective "vq_tokenizer": trains a discrete tokenizer (model "vq_tokenizer",
big_mm/models/vq.py) of one modality by reconstruction, 4M's per-modality tokenizers.

Reads the batch key of the model's modality (rgb: "image" in [-1, 1], depth: "depth" metres,
semseg: "semseg" class ids); input.modalities must load it (and "rgb", which the pipeline
always loads). Loss:
  recon:      rgb MSE; depth L1 of normalised depth (model.depth_mean / depth_std) over pixels
              with d > 0; semseg per-pixel cross-entropy
  vq:         + beta * commitment ||z - sg[e]||^2 + codebook_weight * ||sg[z] - e||^2 (VQ-VAE,
              van den Oord et al. 2017: beta = 0.25), on l2-normalised latents and codes
  fsq:        recon only (no auxiliary loss; Mentzer et al. 2023)
Dead-code restart (vq): state["extra"]["last_used"][k] is the last step code k was picked
(update_extra_state, from the step's code histogram). A code unused for `restart_after` steps
is dead and gets the loss term vq/restart = ||e_k - sg[z_j]||^2 (weight codebook_weight)
towards a batch encoder output z_j, j a random choice fixed while the code stays dead: it is
pulled onto the data at the optimizer's pace rather than reset in one step.
Why a codebook loss and not the EMA codebook update (van den Oord et al. 2017, appendix A.1):
the codebook must be a param, since evaluators and `load()` read params only, and
update_extra_state cannot write params, so an EMA codebook in the extra state would never
reach them.

Metrics: recon/loss, vq/commitment, vq/codebook, vq/restart (vq), codebook/perplexity (exp
of the entropy of the batch's code histogram), codebook/used_fraction (codes used in the
batch / vocab), codebook/dead_codes (vq), and the batch's reconstruction quality: recon/psnr (rgb,
[-1, 1] mapped to [0, 1], per image then averaged), recon/abs_rel (depth, metres, d > 0),
recon/pixel_acc and recon/miou (semseg, the batch's per-class IoU averaged over classes
present in prediction or truth).

predict(params, batch, inputs=(m,), targets=(m,)) -> {m: the round trip decode(encode(x))}
in the cross_modal evaluator's units (rgb [-1, 1], depth metres, semseg logits), so that
evaluator scores `rgb_from_rgb` etc. on held-out data (predictions=(("rgb", ("rgb",)),)).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm import modalities as modalities_lib
from big_mm.models import vq as vq_lib
from big_mm.objectives import base


def batch_key(modality: str) -> str:
  return modalities_lib.get(modality).batch_key


def code_stats(codes, vocab_size: int) -> dict:
  """Perplexity (exp entropy of the code histogram) and used fraction of int codes [...]."""
  counts = jnp.zeros((vocab_size,), jnp.float32).at[codes.reshape(-1)].add(1.0)
  p = counts / jnp.maximum(jnp.sum(counts), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0))
  return {"codebook/perplexity": jnp.exp(entropy),
          "codebook/used_fraction": jnp.mean((counts > 0).astype(jnp.float32))}


def psnr(pred, true):
  """Mean over images of the PSNR of [-1, 1] images mapped to [0, 1] (pred clipped)."""
  err = (jnp.clip(pred, -1.0, 1.0) - true) / 2.0
  mse = jnp.mean(jnp.square(err).reshape(err.shape[0], -1), axis=1)
  return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def miou(pred, true, num_classes: int):
  """The batch's mean IoU over classes present in the prediction or the truth."""
  p = jax.nn.one_hot(pred.reshape(-1), num_classes)
  t = jax.nn.one_hot(true.reshape(-1), num_classes)
  inter = jnp.sum(p * t, axis=0)
  union = jnp.sum(p, axis=0) + jnp.sum(t, axis=0) - inter
  return jnp.sum(jnp.where(union > 0, inter / jnp.maximum(union, 1.0), 0.0)) / jnp.maximum(
      jnp.sum(union > 0), 1)


class VQTokenizer:
  """Objective "vq_tokenizer"; see the module docstring."""
  NAME = "vq_tokenizer"
  # beta: commitment weight; codebook_weight: the VQ-VAE codebook loss's (vq only);
  # restart_after: steps unused after which a code is dead and pulled onto the data (vq).
  SETTINGS = dict(beta=0.25, codebook_weight=1.0, restart_after=100)
  BATCH_KEYS = tuple(batch_key(m) for m in vq_lib.MODALITIES)
  # loss_fn gets step= (int32: the steps done before this one) for the dead-code test.
  TAKES_STEP = True
  # predict() reconstructs its input: cross_modal accepts predictions like ("rgb", ("rgb",)).
  ROUND_TRIP = True

  @classmethod
  def check_settings(cls, settings) -> None:
    for key in ("beta", "codebook_weight"):
      if base.number(key, settings[key]) < 0:
        raise base.ConfigError(f"objective.{key} must be >= 0, got {settings[key]!r}.")
    base.positive_int("restart_after", settings["restart_after"], " (steps)")

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    if not isinstance(model, vq_lib.VQTokenizer):
      raise base.ConfigError(f"objective.name='vq_tokenizer' needs model_name='vq_tokenizer', "
                             f"not a {type(model).__name__}.")
    self.model, self.ctx, self.mesh = model, ctx, ctx.mesh
    self.modality = model.modality
    self.modalities = (model.modality,)
    self.num_semseg_classes = int(model.num_classes)
    self.key = batch_key(model.modality)
    self.beta = float(settings["beta"])
    self.codebook_weight = float(settings["codebook_weight"])
    self.restart_after = int(settings["restart_after"])
    if ctx.modalities is not None and self.key not in (batch_key(m) for m in ctx.modalities):
      raise base.ConfigError(
          f"model.modality={model.modality!r} but input.modalities={tuple(ctx.modalities)} does "
          f"not load it; add {model.modality!r} to input.modalities.")
    if ctx.image_size is not None and tuple(ctx.image_size) != (model.image_size,) * 2:
      raise base.ConfigError(
          f"model.image_size={model.image_size} but input.pp_image makes {ctx.image_size} "
          "images; set model.image_size to the pp's size.")

  # ---- training --------------------------------------------------------------------------

  def _apply(self, params, x):
    return self.model.apply({"params": params}, x)

  def recon_loss(self, recon, x):
    """Mean reconstruction loss of the decoder's output against the batch's x."""
    if self.modality == "rgb":
      return jnp.mean(jnp.square(recon - x.astype(jnp.float32)))
    if self.modality == "depth":
      valid = (x > 0).astype(jnp.float32)
      norm = (x.astype(jnp.float32) - self.model.depth_mean) / self.model.depth_std
      return jnp.sum(jnp.abs(recon - norm) * valid) / jnp.maximum(jnp.sum(valid), 1.0)
    logp = jax.nn.log_softmax(recon, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, x.astype(jnp.int32)[..., None], axis=-1))

  def quality(self, recon, x) -> dict:
    """The batch's reconstruction quality (see the module docstring)."""
    recon = jax.lax.stop_gradient(recon)
    if self.modality == "rgb":
      return {"recon/psnr": psnr(recon, x.astype(jnp.float32))}
    if self.modality == "depth":
      d = x.astype(jnp.float32)
      valid = (d > 0).astype(jnp.float32)
      pred = self.model.to_output(recon)
      rel = jnp.abs(pred - d) / jnp.where(d > 0, d, 1.0)
      return {"recon/abs_rel": jnp.sum(rel * valid) / jnp.maximum(jnp.sum(valid), 1.0)}
    pred = jnp.argmax(recon, axis=-1)
    true = x.astype(jnp.int32)
    return {"recon/pixel_acc": jnp.mean((pred == true).astype(jnp.float32)),
            "recon/miou": miou(pred, true, self.num_semseg_classes)}

  def dead(self, extra, step):
    """bool [K]: codes unused for restart_after steps (before `step`)."""
    return (step - extra["last_used"]) >= self.restart_after

  def pull_targets(self, extra, num_tokens: int):
    """int32 [K]: the batch token each dead code is pulled towards, a random choice fixed by
    (code, last_used), so that it stays the same while the code is dead and the batch is."""
    keys = jax.vmap(lambda k, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), k), t))(
        jnp.arange(self.model.codebook_size), extra["last_used"])
    return jax.vmap(lambda key: jax.random.randint(key, (), 0, num_tokens))(keys)

  def loss_fn(self, params, batch, rng, *, extra, step):
    del rng  # no dropout; the dead codes' targets are fixed by pull_targets
    x = base.float_pixels(batch[self.key], "A VQ tokenizer")
    out = self._apply(params, x)
    recon_loss = self.recon_loss(out["recon"], x)
    loss = recon_loss
    metrics = {"recon/loss": recon_loss, **self.quality(out["recon"], x),
               **code_stats(out["codes"], self.model.vocab_size)}
    if self.model.quantizer == "vq":
      z, zq = out["z"], out["zq"]
      commitment = jnp.mean(jnp.sum(jnp.square(z - jax.lax.stop_gradient(zq)), axis=-1))
      codebook = jnp.mean(jnp.sum(jnp.square(jax.lax.stop_gradient(z) - zq), axis=-1))
      # Dead codes: pulled towards random encoder outputs of the batch.
      dead = self.dead(extra, step)
      flat = jax.lax.stop_gradient(z.reshape(-1, z.shape[-1]))
      pick = self.pull_targets(extra, flat.shape[0])
      book = vq_lib._l2norm(params["codebook"])  # pylint: disable=protected-access
      pull = jnp.sum(jnp.square(book - flat[pick]), axis=-1)
      restart = jnp.sum(pull * dead) / jnp.maximum(jnp.sum(dead), 1)
      loss = loss + self.beta * commitment + self.codebook_weight * (codebook + restart)
      metrics.update({"vq/commitment": commitment, "vq/codebook": codebook,
                      "vq/restart": restart,
                      "codebook/dead_codes": jnp.sum(dead).astype(jnp.float32)})
    used = jnp.zeros((self.model.vocab_size,), jnp.int32).at[out["codes"].reshape(-1)].max(1)
    metrics[base.EXTRA_STATS] = {"used": used}
    return loss, metrics

  def init_extra_state(self, params):
    """{"last_used": int32 [vocab]: the step each code was last picked (0: never)}."""
    del params
    return {"last_used": jnp.zeros((self.model.vocab_size,), jnp.int32)}

  def update_extra_state(self, extra, params, step, stats):
    del params
    return {"last_used": jnp.where(stats["used"] > 0, step, extra["last_used"])}

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    mod = modalities_lib.get(self.modality)
    hw = (self.model.image_size,) * 2
    return {mod.batch_key: jax.ShapeDtypeStruct((1,) + mod.example_shape(hw, 0), mod.dtype)}

  def init_params(self, rng):
    example = base.zeros(self.example_batch())
    return self.model.init({"params": rng}, example[self.key])["params"]

  # ---- evaluation ------------------------------------------------------------------------

  def predict(self, params, batch, *, inputs, targets):
    """{m: decode(encode(x))} for the round trip inputs == targets == (modality,)."""
    if tuple(inputs) != self.modalities or tuple(targets) != self.modalities:
      raise ValueError(f"A {self.modality} tokenizer only reconstructs its modality: predict "
                       f"with inputs=targets=({self.modality!r},), not inputs={tuple(inputs)} "
                       f"targets={tuple(targets)}.")
    recon = self._apply(params, base.float_pixels(batch[self.key], "A VQ tokenizer"))["recon"]
    return {self.modality: self.model.to_output(recon)}
