"""Scaled dot-product attention: one public function with an `implementation=` switch.

`dot_product_attention(q, k, v, *, mask=None, causal=False, implementation="xla")`

Layout (same as `jax.nn.dot_product_attention`):
  q: [B, Lq, H, D], k / v: [B, Lk, H, D]  ->  out [B, Lq, H, D] in q.dtype.
  mask: boolean, broadcastable to [B, H, Lq, Lk] (typically [B, 1, Lq, Lk] or
    [B, 1, 1, Lk] for key padding); True = may attend.
  causal: query i attends to keys j <= i + (Lk - Lq) (aligned at the end, so
    Lq == Lk gives the usual lower-triangular mask).

Implementations:
  "xla": plain-jnp reference. Logits and softmax are computed in float32 whatever
    the input dtype; the result is cast back to q.dtype. A query row whose keys are
    all masked out gets a uniform average over the keys (never NaN).
  Pallas (TPU/GPU) and cuDNN kernels are added beside this reference later; they
  must match it (see tests/test_models.py).

Only depends on jax, so it can be imported without flax.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla",)

# Large negative instead of -inf: fully masked rows give a uniform softmax, not NaN.
_MASK_VALUE = float(jnp.finfo(jnp.float32).min)


def _check_inputs(q, k, v, mask):
  if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
    raise ValueError(
        "dot_product_attention expects q, k, v of rank 4 [batch, length, heads, head_dim]; "
        f"got q{tuple(q.shape)}, k{tuple(k.shape)}, v{tuple(v.shape)}.")
  if k.shape != v.shape:
    raise ValueError(f"k and v must have the same shape; got k{tuple(k.shape)}, v{tuple(v.shape)}.")
  b, _, h, d = q.shape
  if (k.shape[0], k.shape[2], k.shape[3]) != (b, h, d):
    raise ValueError(
        "q and k must agree on batch, heads and head_dim; "
        f"got q{tuple(q.shape)}, k{tuple(k.shape)}.")
  if mask is not None:
    if mask.ndim != 4:
      raise ValueError(
          f"mask must have rank 4, broadcastable to [B, H, Lq, Lk]; got shape {tuple(mask.shape)}.")
    target = (b, h, q.shape[1], k.shape[1])
    try:
      jnp.broadcast_shapes(tuple(mask.shape), target)
    except ValueError:
      raise ValueError(
          f"mask of shape {tuple(mask.shape)} does not broadcast to [B, H, Lq, Lk] = {target}."
      ) from None


def causal_mask(lq: int, lk: int) -> jax.Array:
  """Boolean [1, 1, Lq, Lk]: query i may attend to key j iff j <= i + (Lk - Lq)."""
  i = jnp.arange(lq)[:, None]
  j = jnp.arange(lk)[None, :]
  return (j <= i + (lk - lq))[None, None]


def _attention_xla(q, k, v, mask, causal):
  scale = 1.0 / math.sqrt(q.shape[-1])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  logits = logits.astype(jnp.float32) * scale
  if causal:
    cm = causal_mask(q.shape[1], k.shape[1])
    mask = cm if mask is None else jnp.logical_and(mask, cm)
  if mask is not None:
    logits = jnp.where(mask, logits, _MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v,
                   preferred_element_type=jnp.float32)
  return out.astype(q.dtype)


def dot_product_attention(q, k, v, *, mask=None, causal=False, implementation="xla"):
  """softmax(q k^T / sqrt(D) + mask) v.  See the module docstring for shapes."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"Unknown attention implementation {implementation!r}; valid implementations: "
        f"{', '.join(repr(i) for i in IMPLEMENTATIONS)}.")
  _check_inputs(q, k, v, mask)
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
  return _attention_xla(q, k, v, mask, bool(causal))
