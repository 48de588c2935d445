"""Auxiliary loss terms: layers sow them, objectives add them to the loss and report them.

A layer (e.g. a mixture-of-experts MLP's load-balancing term) adds a term to the training
loss with

  self.sow(layers.AUX_LOSS, "load_balance", value)   # value: a scalar, already weighted

An objective runs its training forward pass through `apply` and finishes its loss with `add`:

  outputs, aux = aux_loss.apply(model, params, *args, train=True, rngs=...)
  ...
  return aux_loss.add(loss, metrics, aux)

Every sowing of one name (all layers, all towers; the scanned layers of nn.scan) is summed
into the metric `aux_loss/<name>`, and the loss is the objective's own loss plus every
`aux_loss/*` metric. The trainer logs metrics as they come, so the terms appear in the logs.
Without sown terms the loss and metrics are exactly the objective's own. Outside training
(the collection is not mutable) `sow` does nothing.

Statistics that are logged but not trained on (a mixture-of-experts layer's dropped-token
fraction and expert loads) are sown to `layers.AUX_METRIC`; `apply` returns each name's mean
over its sowings as the metric `<top-level scope>/<name>` (e.g. `img/moe_dropped`, averaged
over the image tower's MoE layers).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm.models.layers import AUX_LOSS, AUX_METRIC

PREFIX = "aux_loss/"


def apply(model, params, *args, **kwargs):
  """`model.apply({"params": params}, ...)` with the aux collections mutable ->
  (outputs, {"aux_loss/<name>": float32 scalar, "<scope>/<stat name>": float32 scalar})."""
  outputs, state = model.apply({"params": params}, *args, mutable=[AUX_LOSS, AUX_METRIC],
                               **kwargs)
  return outputs, {**collect(state.get(AUX_LOSS, {})), **collect_metrics(state.get(AUX_METRIC,
                                                                                  {}))}


def collect(sown) -> dict:
  """A sown aux_loss collection -> {"aux_loss/<name>": sum of every value sown as <name>}."""
  terms = {}
  for path, value in jax.tree_util.tree_leaves_with_path(sown):
    name = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)][-1]
    key = PREFIX + str(name)
    term = jnp.sum(jnp.asarray(value, jnp.float32))
    terms[key] = terms[key] + term if key in terms else term
  return terms


def collect_metrics(sown) -> dict:
  """A sown aux_metric collection -> {"<top scope>/<name>": mean of every value sown as <name>
  under that scope} (a layer applied alone: {"<name>": ...})."""
  values = {}
  for path, value in jax.tree_util.tree_leaves_with_path(sown):
    keys = [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]
    name = keys[-1] if len(keys) == 1 else f"{keys[0]}/{keys[-1]}"
    values.setdefault(name, []).append(jnp.asarray(value, jnp.float32))
  return {k: jnp.mean(jnp.concatenate([jnp.ravel(v) for v in vs])) for k, vs in values.items()}


def total(metrics: dict):
  """The sum of the `aux_loss/*` entries of `metrics` (None when there are none)."""
  terms = [metrics[k] for k in sorted(metrics) if k.startswith(PREFIX)]
  return sum(terms[1:], terms[0]) if terms else None


def add(loss, metrics: dict, aux: dict | None = None):
  """-> (loss + every aux_loss/* term, metrics with the terms): a loss_fn's result.
  The terms are those of `aux` (from `apply`) and any already in `metrics`."""
  metrics = {**metrics, **(aux or {})}
  extra = total(metrics)
  return (loss if extra is None else loss + extra), metrics
