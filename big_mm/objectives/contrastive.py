"""Contrastive image-text objective (SigLIP sigmoid, CLIP softmax; LiT = frozen image tower).

The loss is computed over the global batch with an explicit cross-device strategy
(`objective.strategy`: all_gather | ring | local), see `losses.contrastive_loss`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm import optim, sharding
from big_mm.objectives import losses


class Contrastive:
  """`loss_fn(params, batch, rng) -> (loss, metrics)` and embedding predict fns."""

  def __init__(self, config, model, mesh):
    self.model = model
    self.mesh = mesh
    self.loss_name = config.objective.loss
    self.strategy = config.objective.strategy
    self.optim_cfg = config.optim

  def _stop_frozen(self, params):
    # Frozen params (lr multiplier 0, e.g. LiT's image tower) get no gradient computed at all.
    frozen = optim.frozen_mask(self.optim_cfg, params)
    return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)

  def loss_fn(self, params, batch, rng):
    params = self._stop_frozen(params)
    zimg, ztxt, out = self.model.apply({"params": params}, batch["image"], batch["text"],
                                       train=True, rngs={"dropout": rng})
    loss = losses.contrastive_loss(
        zimg, ztxt, out["t"], out["b"], loss=self.loss_name, strategy=self.strategy,
        mesh=self.mesh, batch_axes=sharding.batch_axes(self.mesh))
    metrics = {"t": out["t"], "t/parameterized": out["t/parameterized"], "b": out["b"]}
    # Diagnostics on the local logits' diagonal vs. off-diagonal (cheap, no B x B gather).
    metrics["img_txt_cos/pos"] = jnp.mean(jnp.sum(zimg * ztxt, axis=-1))
    return loss, metrics

  def embed_images(self, params, images):
    zimg, _, _ = self.model.apply({"params": params}, images, None, train=False)
    return zimg

  def embed_texts(self, params, texts):
    _, ztxt, _ = self.model.apply({"params": params}, None, texts, train=False)
    return ztxt
