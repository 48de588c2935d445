"""Mixture-of-experts MLP blocks (V-MoE, Switch, GShard, ST-MoE, expert-choice routing).

A tower takes `moe=dict(layers="every_2", num_experts=8, top_k=1, ...)` (`MoeSettings`'
fields): the listed blocks get a `MoeMlp` (param scope `MoeMlp_0`) instead of the dense
`MlpBlock_0`; `settings(moe, depth)` checks the dict and picks the blocks.

Routing works on groups of whole examples (`group_examples` sequences per group, default 1),
so the result of a token never depends on how the batch is split over devices, and the
dispatch / combine tensors [G, S, E, C] (groups, tokens per group, experts, capacity) are
sharded over the groups like the batch: no device holds more than its own groups' one-hots.
The expert computation runs on [E, G, C, D] constrained to ("expert", "expert_group"), so
with `mesh.expert > 1` GSPMD moves tokens to their experts' devices with an all-to-all.

Routing (router in float32):
- "token_choice" (V-MoE / Switch / GShard): each token picks its `top_k` experts by router
  probability; an expert takes at most C = ceil(top_k * S * capacity_factor / E) tokens of a
  group, first choices before second choices, tokens in sequence order or, with
  `batch_priority` (V-MoE's BPR), in order of their highest router probability. In a causal
  tower (text with causal=True, the decoder) a token's choices all come before the next
  token's and BPR is refused, so no token's routing depends on a later one. A choice over
  capacity is dropped (counted in `moe_dropped`); a token that loses every choice passes only
  through the residual. Combine weights are the router probabilities (renormalised over the
  chosen experts with `renormalize`, so they sum to 1 as in Mixtral / sparse upcycling).
- "expert_choice" (Zhou et al. 2022): each expert takes its C = ceil(S * capacity_factor / E)
  highest-scoring tokens; perfectly balanced, tokens may be taken by no expert or by several.
  It looks at every token of the group, so it is not causal: refused in causal towers.

Training terms (sown as aux losses, already weighted; models/aux_loss.py), per MoE layer:
`load_balance` = w * E * sum_e f_e * P_e (Switch; f_e the fraction of tokens whose first
choice is expert e, P_e its mean router probability, per group; token choice only) and
`router_z` = w * mean logsumexp(logits)^2 (ST-MoE); optionally LIMoE's `entropy_local` /
`entropy_global` of a call's tokens (MoeSettings; "<name>/<tag>" with a tag: models/limoe.py
tags them). Statistics sown to `AUX_METRIC` (the mean over MoE layers is logged per tower, `aux_loss.collect_metrics`): `moe_dropped` (the fraction of token choices
dropped; expert choice: of tokens taken by no expert) and `moe_load/expert_<e>` (each expert's
share of the choices, before capacity; 1/E each when balanced).

Params (float32): router [D, E]; Dense_0/kernel [E, D, M], Dense_0/bias [E, M],
Dense_1/kernel [E, M, D], Dense_1/bias [E, D]: the dense MlpBlock's names with a leading
expert axis, so sparse upcycling (`upcycle`) copies a dense checkpoint's MLP into every expert.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_mm.models import layers

ROUTINGS = ("token_choice", "expert_choice")
DISPATCH_AXES = ("expert", "expert_group", None, "embed")  # [E, G, C, D]


@dataclasses.dataclass(frozen=True)
class MoeSettings:
  """A tower's `moe` dict. layers: which blocks are MoE: "all", "every_N" (blocks N-1, 2N-1,
  ...: V-MoE's "every other layer" is every_2), "last_N", or a tuple of block indices."""
  layers: Any = "every_2"
  num_experts: int = 8
  top_k: int = 1
  capacity_factor: float = 1.25
  routing: str = "token_choice"
  batch_priority: bool = False
  renormalize: bool = False
  group_examples: int = 1
  router_noise: float = 0.0       # std of Gaussian noise on the router logits in training
  router_jitter: float = 0.0      # Switch: router input times U(1 - j, 1 + j) in training
  load_balance_weight: float = 0.01
  z_loss_weight: float = 0.001
  # LIMoE's entropy terms (Mustafa et al. 2022, arXiv:2206.02770), 0: off. local: w * the
  # tokens' mean router entropy (minimised: each token confident); global: w * max(0, tau -
  # H(mean router distribution)) with tau = entropy_global_threshold in nats (None: w * -H),
  # maximising the entropy of the experts' use up to tau.
  entropy_local_weight: float = 0.0
  entropy_global_weight: float = 0.0
  entropy_global_threshold: Optional[float] = None
  tag: Optional[str] = None       # the entropy terms are sown as "entropy_local/<tag>", ...
  causal: bool = False            # set by the tower (`settings`): token-major capacity order


def layer_indices(spec, depth: int) -> tuple[int, ...]:
  """`MoeSettings.layers` -> sorted block indices in [0, depth)."""
  if isinstance(spec, str):
    m = re.fullmatch(r"(every|last)_(\d+)", spec)
    if spec == "all":
      return tuple(range(depth))
    if m and int(m.group(2)) > 0:
      n = int(m.group(2))
      if m.group(1) == "every":
        return tuple(range(n - 1, depth, n))
      return tuple(range(max(depth - n, 0), depth))
  elif isinstance(spec, (tuple, list)) and all(isinstance(i, (int, np.integer)) for i in spec):
    idx = tuple(sorted({int(i) for i in spec}))
    if idx and (idx[0] < 0 or idx[-1] >= depth):
      raise ValueError(f"moe.layers={spec!r}: block indices must be in [0, {depth}).")
    return idx
  raise ValueError(f"moe.layers={spec!r}: use 'all', 'every_N', 'last_N' or a tuple of block "
                   "indices.")


def settings(moe: Optional[Mapping], depth: int, *, causal: bool = False,
             where: str = "moe") -> tuple[Optional[MoeSettings], tuple[int, ...]]:
  """A tower's `moe` dict -> (MoeSettings, the MoE block indices); (None, ()) without one."""
  if not moe:
    return None, ()
  fields = {f.name for f in dataclasses.fields(MoeSettings)}
  unknown = set(moe) - fields
  if unknown:
    raise ValueError(f"{where}: unknown keys {sorted(unknown)}; valid: {sorted(fields)}.")
  s = MoeSettings(**dict(moe))
  if s.routing not in ROUTINGS:
    raise ValueError(f"{where}.routing={s.routing!r}; valid: {ROUTINGS}.")
  if s.num_experts < 1 or not 1 <= s.top_k <= s.num_experts:
    raise ValueError(f"{where}: need num_experts >= 1 and 1 <= top_k <= num_experts; got "
                     f"num_experts={s.num_experts}, top_k={s.top_k}.")
  if s.capacity_factor <= 0 or s.group_examples < 1:
    raise ValueError(f"{where}: capacity_factor must be > 0 and group_examples >= 1.")
  if min(s.entropy_local_weight, s.entropy_global_weight, s.entropy_global_threshold or 0) < 0:
    raise ValueError(f"{where}: entropy_local_weight, entropy_global_weight and "
                     "entropy_global_threshold (nats) must be >= 0.")
  if s.routing == "expert_choice" and (causal or s.batch_priority):
    raise ValueError(f"{where}: expert_choice routing sees every token of a group, so it is "
                     "neither causal nor prioritised; use token_choice in causal towers and "
                     "drop batch_priority.")
  if causal and s.batch_priority:
    raise ValueError(f"{where}: batch_priority orders a group's tokens by their router "
                     "probability, so a token's routing would depend on later ones in a causal "
                     "tower; drop it there.")
  s = dataclasses.replace(s, causal=causal)
  idx = layer_indices(s.layers, depth)
  if not idx:
    raise ValueError(f"{where}.layers={s.layers!r} selects no block of {depth}.")
  return s, idx


def block_config(block: layers.BlockConfig, s: MoeSettings) -> layers.BlockConfig:
  """The tower's dense BlockConfig with a MoeMlp (settings bound) as its MLP."""
  return dataclasses.replace(block, mlp=functools.partial(MoeMlp, settings=s))


def encoder_kwargs(block: layers.BlockConfig, moe: Optional[Mapping], depth: int,
                   where: str = "moe") -> dict:
  """`layers.Encoder`'s moe_block / moe_layers for a tower's dense `block` and `moe` dict."""
  s, idx = settings(moe, depth, causal=block.causal, where=where)
  return {} if s is None else {"moe_block": block_config(block, s), "moe_layers": idx}


def capacity(s: MoeSettings, group_tokens: int) -> int:
  """Tokens an expert takes per group (see the module docstring)."""
  per_expert = (s.top_k if s.routing == "token_choice" else 1) * group_tokens / s.num_experts
  return int(min(group_tokens, max(1, math.ceil(per_expert * s.capacity_factor))))


class ExpertDense(nn.Module):
  """One dense layer per expert: kernel [E, in, out], bias [E, out] (float32 params)."""
  features: int
  kernel_axes: tuple
  bias_axes: tuple
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, x):  # [E, G, C, in]
    e, dtype = x.shape[0], layers.to_dtype(self.dtype)
    kinit = nn.initializers.xavier_uniform(in_axis=-2, out_axis=-1, batch_axis=(0,))
    kernel = self.param("kernel", layers.logical(kinit, self.kernel_axes),
                        (e, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", layers.logical(nn.initializers.normal(1e-6), self.bias_axes),
                      (e, self.features), jnp.float32)
    return (jnp.einsum("egci,eio->egco", x, kernel.astype(dtype))
            + bias.astype(dtype)[:, None, None])


def top_k(x, k: int):
  """lax.top_k over the last axis as a stable sort, which GSPMD partitions over the leading
  (group) axes: lax.top_k flattens them and so all-gathers the whole batch's router outputs
  onto every device (seen in the compiled HLO with data=8)."""
  index = jnp.argsort(-x, axis=-1, stable=True)[..., :k]
  return jnp.take_along_axis(x, index, axis=-1), index


def token_choice(probs, s: MoeSettings, cap: int):
  """probs f32 [G, S, E] -> (combine f32 [G, S, E, C], dispatch bool [G, S, E, C],
  the fraction of choices dropped, f32 [E] each expert's share of the choices)."""
  g, n, e = probs.shape
  gate, expert = top_k(probs, s.top_k)                                # [G, S, k]
  if s.renormalize:
    gate = gate / jnp.sum(gate, axis=-1, keepdims=True)
  if s.batch_priority:
    order = jnp.argsort(-jnp.max(probs, axis=-1), axis=-1, stable=True)  # [G, S]
  else:
    order = jnp.broadcast_to(jnp.arange(n), (g, n))
  # Choices in priority order: every token's first choice, then every second choice, ...;
  # causal: each token's choices, token after token.
  ranked = jnp.take_along_axis(expert, order[..., None], axis=1)      # [G, S, k]
  if not s.causal:
    ranked = jnp.swapaxes(ranked, 1, 2)                               # [G, k, S]
  onehot = jax.nn.one_hot(ranked, e, dtype=jnp.int32)
  position = jnp.cumsum(onehot.reshape(g, s.top_k * n, e), axis=1).reshape(onehot.shape) - 1
  position = jnp.sum(position * onehot, axis=-1)
  kept = position < cap
  inverse = jnp.argsort(order, axis=-1)
  unrank = lambda t: jnp.take_along_axis(t if s.causal else jnp.swapaxes(t, 1, 2),
                                         inverse[..., None], axis=1)
  position, kept = unrank(position), unrank(kept)                     # [G, S, k]
  slot = jax.nn.one_hot(jnp.where(kept, position, cap), cap, dtype=jnp.float32)  # [G, S, k, C]
  choice = jax.nn.one_hot(expert, e, dtype=jnp.float32)               # [G, S, k, E]
  combine = jnp.einsum("gske,gskc,gsk->gsec", choice, slot, gate)
  dispatch = jnp.einsum("gske,gskc->gsec", choice, slot) > 0
  load = jnp.mean(choice, axis=(0, 1, 2))                             # routed, before capacity
  return combine, dispatch, 1.0 - jnp.mean(kept.astype(jnp.float32)), load


def expert_choice(probs, s: MoeSettings, cap: int):
  """probs f32 [G, S, E] -> (combine, dispatch, fraction of tokens no expert took, load)."""
  e = probs.shape[-1]
  gate, token = top_k(jnp.swapaxes(probs, 1, 2), cap)                 # [G, E, C]
  slot = jax.nn.one_hot(token, probs.shape[1], dtype=jnp.float32)     # [G, E, C, S]
  dispatch = jnp.transpose(slot, (0, 3, 1, 2)) > 0                    # [G, S, E, C]
  combine = jnp.where(dispatch, gate[:, None], 0.0)
  taken = jnp.any(dispatch, axis=(2, 3))
  load = jnp.full((e,), 1.0 / e, jnp.float32)
  return combine, dispatch, 1.0 - jnp.mean(taken.astype(jnp.float32)), load


class MoeMlp(nn.Module):
  """Routed MLP: `(x [B, L, D], deterministic) -> [B, L, D]` (module docstring)."""
  settings: MoeSettings = MoeSettings()
  mlp_dim: Optional[int] = None
  dropout: float = 0.0
  dtype: Any = "float32"
  act: str = "gelu_tanh"

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    s = self.settings
    dtype = layers.to_dtype(self.dtype)
    b, length, d = x.shape
    e, m = s.num_experts, self.mlp_dim or 4 * d
    if b % s.group_examples:
      raise ValueError(f"moe.group_examples={s.group_examples} does not divide the batch {b}.")
    g, n = b // s.group_examples, s.group_examples * length
    cap = capacity(s, n)
    tokens = x.reshape(g, n, d)

    router_in = tokens.astype(jnp.float32)
    if not deterministic and s.router_jitter:
      router_in *= jax.random.uniform(self.make_rng("dropout"), router_in.shape, jnp.float32,
                                      1 - s.router_jitter, 1 + s.router_jitter)
    w_router = self.param("router", layers.logical(nn.initializers.lecun_normal(),
                                                   ("embed", None)), (d, e), jnp.float32)
    logits = router_in @ w_router                                       # [G, S, E] float32
    if not deterministic and s.router_noise:
      logits += s.router_noise * jax.random.normal(self.make_rng("dropout"), logits.shape)
    probs = jax.nn.softmax(logits, axis=-1)

    route = token_choice if s.routing == "token_choice" else expert_choice
    combine, dispatch, dropped, load = route(probs, s, cap)

    expert_in = jnp.einsum("gsec,gsd->egcd", dispatch.astype(dtype), tokens.astype(dtype))
    expert_in = nn.with_logical_constraint(expert_in, DISPATCH_AXES)
    h = ExpertDense(m, ("expert", "embed", "mlp"), ("expert", "mlp"), self.dtype,
                    name="Dense_0")(expert_in)
    h = nn.with_logical_constraint(h, ("expert", "expert_group", None, "mlp"))
    h = layers.activation(self.act)(h)
    h = nn.Dropout(rate=self.dropout)(h, deterministic)
    y = ExpertDense(d, ("expert", "mlp", "embed"), ("expert", "embed"), self.dtype,
                    name="Dense_1")(h)
    y = nn.with_logical_constraint(y, DISPATCH_AXES)
    out = jnp.einsum("gsec,egcd->gsd", combine.astype(dtype), y)

    if s.routing == "token_choice" and s.load_balance_weight:
      routed = jnp.mean(jax.nn.one_hot(jnp.argmax(probs, -1), e), axis=1)  # [G, E]
      balance = e * jnp.mean(jnp.sum(routed * jnp.mean(probs, axis=1), axis=-1))
      self.sow(layers.AUX_LOSS, "load_balance", s.load_balance_weight * balance)
    if s.z_loss_weight:
      z = jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))
      self.sow(layers.AUX_LOSS, "router_z", s.z_loss_weight * z)
    suffix = f"/{s.tag}" if s.tag else ""
    if s.entropy_local_weight:  # H(p) = logsumexp(logits) - sum p * logits, per token
      local = jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.sum(probs * logits, -1))
      self.sow(layers.AUX_LOSS, "entropy_local" + suffix, s.entropy_local_weight * local)
    if s.entropy_global_weight:
      mean = jnp.mean(probs, axis=(0, 1))
      neg_h = jnp.sum(mean * jnp.log(jnp.maximum(mean, jnp.finfo(jnp.float32).tiny)))
      if s.entropy_global_threshold is not None:
        neg_h = jnp.maximum(0.0, s.entropy_global_threshold + neg_h)
      self.sow(layers.AUX_LOSS, "entropy_global" + suffix, s.entropy_global_weight * neg_h)
    self.sow(layers.AUX_METRIC, "moe_dropped", dropped)
    for i in range(e):
      self.sow(layers.AUX_METRIC, f"moe_load/expert_{i}", load[i])
    return out.reshape(b, length, d).astype(x.dtype)


def upcycle(flat_dense: Mapping[str, Any], name: str, shape) -> Optional[np.ndarray]:
  """Sparse upcycling (Komatsuzaki et al. 2023): the value of MoE param `name`
  (…/MoeMlp_0/Dense_k/{kernel,bias}, shape [E, ...]) from a dense checkpoint's MLP
  (…/MlpBlock_0/Dense_k/…) copied into every expert; None when `name` is no expert param or
  the dense one is missing. The router (…/MoeMlp_0/router) has no dense source: it keeps its
  init."""
  if "/MoeMlp_0/Dense_" not in name:
    return None
  dense = flat_dense.get(dense_source(name))
  if dense is None or tuple(np.shape(dense)) != tuple(shape[1:]):
    return None
  return np.broadcast_to(np.asarray(dense)[None], tuple(shape)).copy()


def dense_source(name: str) -> str:
  """The dense MLP param an expert param `name` is upcycled from."""
  return name.replace("/MoeMlp_0/", "/MlpBlock_0/")


def is_router(name: str) -> bool:
  """Whether '/'-joined param path `name` is a MoeMlp's router."""
  return name.endswith("/MoeMlp_0/router")
