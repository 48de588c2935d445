"""SigLIP 2 (Tschannen et al., 2025, arXiv:2502.14786): the sigmoid image-text loss of a towers
model plus the recipe's other terms, each a `Part` switched on by its weight:

  LocCa decoder losses   captioning, referring expressions, grounded captions (objectives/locca.py)
  self-distillation      EMA teacher, SILC local-to-global + TIPS masked prediction, from a
                         fraction of training on (objectives/self_distill.py)
  teacher distillation   a frozen teacher loaded from a checkpoint (objectives/distill.py)

and FLIP patch dropout (`model.towers.image.patch_dropout`) with an unmasked tuning phase at
the end: from `unmasked_tuning_fraction` of the steps before the end the image tower runs with
no patch dropout (the same params; the two forward passes are the branches of one lax.cond, so
the step does not recompile).

The objective is `Contrastive` (same settings, predict fns and evaluators) with the parts' loss
terms added: with every part off it is the contrastive objective's sigmoid / softmax loss,
value for value. Each part adds its own param subtrees (e.g. LocCa's decoder `dec/`), its
batch keys and, optionally, extra train state (e.g. the EMA teacher) under `extra[part.NAME]`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm import modalities as modalities_lib
from big_mm.models import aux_loss
from big_mm.objectives import base, distill, locca, self_distill
from big_mm.objectives.contrastive import Contrastive
from big_mm.objectives.part import Part

# The parts, in the order their losses are added.
PARTS: tuple[type[Part], ...] = (locca.LocCa, self_distill.SelfDistillation,
                                  distill.Distillation)


def _parts_settings() -> dict:
  out = {}
  for part in PARTS:
    out.update(part.SETTINGS)
  return out


class Siglip2(Contrastive):
  """Contrastive + the enabled parts (see the module docstring)."""
  NAME = "siglip2"
  TAKES_STEP = True
  # unmasked_tuning_fraction: the last fraction of training runs the image tower without patch
  # dropout (FLIP's unmasked tuning; 0: patch dropout to the end).
  SETTINGS = dict(Contrastive.SETTINGS, unmasked_tuning_fraction=0.0, **_parts_settings())
  HINTS = {}
  BATCH_KEYS = Contrastive.BATCH_KEYS + tuple(k for p in PARTS for k in p.BATCH_KEYS)

  @classmethod
  def check_settings(cls, settings) -> None:
    Contrastive.check_settings(settings)
    if settings["micro_batches"] != 1:
      raise base.ConfigError(
          f"objective.micro_batches={settings['micro_batches']}: GradCache is not combined with "
          "the SigLIP 2 parts; use micro_batches=1 (or objective.name='contrastive').")
    fraction = base.number("unmasked_tuning_fraction", settings["unmasked_tuning_fraction"])
    if not 0.0 <= fraction <= 1.0:
      raise base.ConfigError(f"objective.unmasked_tuning_fraction must be in [0, 1], got "
                             f"{fraction!r}.")
    for part in PARTS:
      part.check_settings(settings)

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    super().__init__(model, ctx, **settings)
    self.settings = settings
    self.parts = [p for p in (cls(self, settings) for cls in PARTS) if p.enabled]
    for part in self.parts:
      for name, value in part.predict_fns().items():
        if hasattr(self, name):
          raise ValueError(f"SigLIP 2 part {part.NAME!r} installs {name!r}, which the objective "
                           "has already.")
        setattr(self, name, value)
    self.unmasked_model, self.unmasked_from = self._unmasked_tuning(
        settings["unmasked_tuning_fraction"])
    if self._parts_with_extra():
      self.init_extra_state = self._init_extra
      self.update_extra_state = self._update_extra

  # ----------------------------------------------------------------------- schedule

  def _unmasked_tuning(self, fraction: float):
    """(the towers module without patch dropout, the first step it runs) or (None, None)."""
    image = "image"
    kwargs = dict(self.model.towers.get(image) or {})
    if not fraction or not kwargs.get("patch_dropout"):
      if fraction:
        raise base.ConfigError(
            f"objective.unmasked_tuning_fraction={fraction} but the image tower has no patch "
            "dropout (model.towers.image.patch_dropout); set one, or the fraction to 0.")
      return None, None
    if self.ctx.total_steps is None:
      return None, None  # not training: the schedule does not apply
    towers = {**self.model.towers, image: {**kwargs, "patch_dropout": 0.0}}
    start = int(round(self.ctx.total_steps * (1.0 - fraction)))
    return self.model.clone(towers=towers), start

  # ----------------------------------------------------------------------- params and state

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    example = super().example_batch()
    for part in self.parts:
      example.update(part.example_batch())
    return example

  def init_params(self, rng):
    towers_rng, *part_rngs = jax.random.split(rng, 1 + len(self.parts))
    params = dict(super().init_params(towers_rng))
    for part, part_rng in zip(self.parts, part_rngs):
      new = part.init_params(part_rng, params)
      clash = set(new) & set(params)
      if clash:
        raise ValueError(f"SigLIP 2 part {part.NAME!r} adds param scopes {sorted(clash)} that "
                         "exist already.")
      params.update(new)
    return params

  def _parts_with_extra(self) -> bool:
    return any(type(p).init_extra is not Part.init_extra for p in self.parts)

  def _init_extra(self, params):
    out = {}
    for part in self.parts:
      extra = part.init_extra(params)
      if extra is not None:
        out[part.NAME] = extra
    return out

  def _update_extra(self, extra, params, step, stats=None):
    parts = {p.NAME: p for p in self.parts}
    return {name: parts[name].update_extra(e, params, step, (stats or {}).get(name))
            for name, e in extra.items()}

  # ----------------------------------------------------------------------- loss

  def _towers_params(self, params):
    scopes = {modalities_lib.get(m).scope for m in self.model.towers} | {"t", "b"}
    return {k: v for k, v in params.items() if k in scopes}

  def _loss(self, model, params, batch, rng, extra, step):
    rng_towers, *part_rngs = jax.random.split(rng, 1 + len(self.parts))
    inputs = {m: modalities_lib.model_input(batch, m) for m in self.modalities}
    (z, out), aux = aux_loss.apply(model, self._towers_params(params), inputs, train=True,
                                   rngs={"dropout": rng_towers})
    loss, metrics = self._loss_from_embeddings(z[self.modalities[0]], z[self.modalities[1]],
                                               params)
    metrics["contrastive_loss"] = loss
    fwd = {"z": z, "out": out, "inputs": inputs, "model": model}
    for part, part_rng in zip(self.parts, part_rngs):
      part_extra = (extra or {}).get(part.NAME)
      part_loss, part_metrics = part.loss(params, batch, part_rng, fwd, extra=part_extra,
                                          step=step)
      loss = loss + part_loss
      if base.EXTRA_STATS in part_metrics:  # each part's own, for its update_extra
        part_metrics = dict(part_metrics)
        stats = part_metrics.pop(base.EXTRA_STATS)
        metrics.setdefault(base.EXTRA_STATS, {})[part.NAME] = stats
      metrics.update(part_metrics)
    return aux_loss.add(loss, metrics, aux)

  def loss_fn(self, params, batch, rng, extra=None, step=None):
    params = base.stop_frozen(self.ctx, params)
    if self.unmasked_model is None or step is None:
      return self._loss(self.model, params, batch, rng, extra, step)
    unmasked = jnp.asarray(step) >= self.unmasked_from
    loss, metrics = jax.lax.cond(
        unmasked,
        lambda: self._loss(self.unmasked_model, params, batch, rng, extra, step),
        lambda: self._loss(self.model, params, batch, rng, extra, step))
    metrics["patch_dropout_on"] = 1.0 - unmasked.astype(jnp.float32)
    return loss, metrics

  def value_and_grad(self, params, batch, rng, extra=None, step=None):
    return jax.value_and_grad(self.loss_fn, has_aux=True)(params, batch, rng, extra=extra,
                                                          step=step)
