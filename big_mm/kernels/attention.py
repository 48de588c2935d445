"""Scaled dot-product attention: one public function with an `implementation=` switch.

`dot_product_attention(q, k, v, *, mask=None, causal=False, implementation="xla",
                      prefix_len=None)`

Layout (same as `jax.nn.dot_product_attention`):
  q: [B, Lq, H, D], k / v: [B, Lk, H, D]  ->  out [B, Lq, H, D] in q.dtype.
  mask: boolean, broadcastable to [B, H, Lq, Lk] (typically [B, 1, Lq, Lk] or
    [B, 1, 1, Lk] for key padding); True = may attend.
  causal: query i attends to keys j <= i + (Lk - Lq) (aligned at the end, so
    Lq == Lk gives the usual lower-triangular mask).
  prefix_len: [B] ints (or a scalar), prefix-LM attention; needs causal=True and adds
    "keys j < prefix_len[b] are visible to every query" to the causal pattern. Same as
    `mask=prefix_lm_mask(prefix_len, L)` with causal=False when Lq == Lk == L, but the
    Pallas kernel gets it as a per-key vector (no L x L mask; causal block skipping is
    off when prefix_len is given). `prefix_lm_mask` builds the dense boolean form, which every
    implementation (the kernel included, as a general mask) accepts.

Implementations (all match "xla" in meaning; see tests/test_attention.py):
  "xla": plain-jnp reference. Logits and softmax are computed in float32 whatever
    the input dtype; the result is cast back to q.dtype. A query row whose keys are
    all masked out gets a uniform average over the keys (never NaN).
  "pallas": flash attention (big_mm/kernels/flash_attention.py), forward and backward,
    TPU (Mosaic) and GPU (Triton); on CPU it runs in interpret mode (tests only, slow).
    dtypes float32/bfloat16/float16, head_dim in flash_attention.SUPPORTED_HEAD_DIMS.
  "cudnn": `jax.nn.dot_product_attention(implementation="cudnn")`, NVIDIA GPU only,
    bfloat16/float16, head_dim a multiple of 8 up to 128. jax refuses odd sequence lengths
    for training, so an odd Lq / Lk is padded by one (`pad_to_even`): padded keys are
    masked out, padded queries attend to the real keys (finite rows whose zero cotangent
    adds nothing to the gradients) and are sliced off. causal maps to is_causal when
    Lq == Lk (else it is folded into the mask; cuDNN's own causal is top-left aligned);
    masks and prefix_len are passed as a boolean mask. key_value_seq_lengths is not used:
    `mask` is an array whose valid keys need not be a contiguous prefix (it is broadcast to
    [B, H, Lq, Lk], the bias shape cuDNN needs). Checked against "xla" on an H200
    (tools/benchmark_kernels.py check-gpu; docs/benchmarks.md), not in CI (no GPU); that
    cuDNN matches the reference on fully masked rows and NaN inputs is unverified.
  "auto": CPU -> "xla". GPU -> "cudnn" when supported at even lengths (see above), else
    "pallas" when supported (odd lengths: measured faster than xla at ViT's 257 tokens on
    an H200; padded cuDNN is not measured yet), else "xla". TPU -> "pallas" when
    supported, else "xla". The choice and the reason are logged (logging.info) once per
    distinct choice.
    No GPU or TPU was available when this rule was written, so it rests on documented
    kernel support (cuDNN flash attention is NVIDIA's tuned kernel; Pallas flash avoids
    the Lq x Lk logits in HBM), not on measurements; re-measure with
    tools/benchmark_kernels.py and update the rule.

Only depends on jax, so it can be imported without flax.
"""
from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp

from big_mm.kernels import flash_attention

IMPLEMENTATIONS = ("xla", "cudnn", "pallas", "auto")

# Large negative instead of -inf: fully masked rows give a uniform softmax, not NaN.
_MASK_VALUE = flash_attention.MASK_VALUE
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 128
_logged_choices = set()


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


def prefix_lm_mask(prefix_len, length: int) -> jax.Array:
  """Boolean [B, 1, L, L] prefix-LM mask: query i sees key j iff j <= i or j < prefix_len[b].

  prefix_len: [B] ints or a scalar (then B = 1). Works as `mask=` with every
  implementation; with causal=True, `prefix_len=prefix_len` gives the same attention
  and lets the Pallas kernel avoid the L x L mask.
  """
  prefix_len = jnp.asarray(prefix_len, jnp.int32).reshape(-1)
  i = jnp.arange(length)[:, None]
  j = jnp.arange(length)[None, :]
  return jnp.logical_or(j <= i, j[None] < prefix_len[:, None, None])[:, None]


def _prefix_mask(prefix_len, b: int, lq: int, lk: int) -> jax.Array:
  """Dense [B, 1, Lq, Lk] form of `causal` + `prefix_len` (end-aligned like causal)."""
  prefix_len = jnp.broadcast_to(jnp.asarray(prefix_len, jnp.int32).reshape(-1), (b,))
  return jnp.logical_or(causal_mask(lq, lk),
                        jnp.arange(lk)[None, None, None, :] < prefix_len[:, None, None, None])


def _cudnn_unsupported_reason(q, k, v) -> str | None:
  if jax.default_backend() != "gpu":
    return f"cuDNN attention needs an NVIDIA GPU; the default backend is {jax.default_backend()!r}"
  if jnp.dtype(q.dtype) not in _CUDNN_DTYPES or not q.dtype == k.dtype == v.dtype:
    return (f"cuDNN attention supports bfloat16/float16 q, k, v; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}")
  d = q.shape[-1]
  if d % 8 or d > _CUDNN_MAX_HEAD_DIM:
    return f"cuDNN attention needs head_dim a multiple of 8 up to {_CUDNN_MAX_HEAD_DIM}; got {d}"
  return None


def _odd_lengths(q, k) -> bool:
  # jax's cuDNN path refuses odd lengths for training (seen with jax 0.11.2 / cuDNN 9.19 on
  # an H200 for ViT's 257 tokens: docs/gpu_results/attention_gpu.log).
  return bool(q.shape[1] % 2 or k.shape[1] % 2)


def pad_to_even(attend, q, k, v, mask, causal):
  """attend(q, k, v, mask, causal) at even lengths: Lq / Lk padded by one where odd.

  The causal pattern is folded into the mask at the real lengths (so its end alignment
  holds); padded keys are masked out and padded query rows see every real key, then are
  sliced off. A real query with no visible key averages over the padded key too (such rows
  have no meaningful value in any implementation)."""
  lq, lk = q.shape[1], k.shape[1]
  pq, pk = lq % 2, lk % 2
  if causal:
    cm = causal_mask(lq, lk)
    mask = cm if mask is None else jnp.logical_and(mask, cm)
  mask = jnp.ones((1, 1, lq, lk), bool) if mask is None else mask
  mask = jnp.broadcast_to(mask, mask.shape[:2] + (lq, lk))
  mask = jnp.pad(mask, ((0, 0), (0, 0), (0, pq), (0, pk)), constant_values=False)
  mask = mask.at[:, :, lq:, :lk].set(True)
  pad = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
  return attend(pad(q, pq), pad(k, pk), pad(v, pk), mask, False)[:, :lq]


def _cudnn_call(q, k, v, mask, causal):
  if mask is not None:  # cuDNN takes the mask as a bias of full [.., Lq, Lk] size.
    mask = jnp.broadcast_to(mask, mask.shape[:2] + (q.shape[1], k.shape[1]))
  return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                      implementation="cudnn")


def _attention_cudnn(q, k, v, mask, causal, prefix_len):
  lq, lk = q.shape[1], k.shape[1]
  if prefix_len is not None:
    pm = _prefix_mask(prefix_len, q.shape[0], lq, lk)
    mask = pm if mask is None else jnp.logical_and(mask, pm)
    causal = False
  elif causal and lq != lk:  # cuDNN's causal mask is top-left aligned; ours is end-aligned
    cm = causal_mask(lq, lk)
    mask = cm if mask is None else jnp.logical_and(mask, cm)
    causal = False
  if _odd_lengths(q, k):
    return pad_to_even(_cudnn_call, q, k, v, mask, causal)
  return _cudnn_call(q, k, v, mask, causal)


def _choose_implementation(q, k, v) -> tuple[str, str]:
  """(implementation, reason) for "auto"; the rule is in the module docstring."""
  backend = jax.default_backend()
  if backend == "gpu":
    cudnn_reason = _cudnn_unsupported_reason(q, k, v)
    if cudnn_reason is None and _odd_lengths(q, k):
      cudnn_reason = (f"odd lengths {q.shape[1]}, {k.shape[1]} run cuDNN padded, not measured "
                      f"against Pallas yet")
    if cudnn_reason is None:
      return "cudnn", "GPU and cuDNN supports this dtype/head_dim"
    pallas_reason = flash_attention.unsupported_reason(q, k, v)
    if pallas_reason is None:
      return "pallas", f"GPU, but {cudnn_reason}"
    return "xla", f"GPU, but {cudnn_reason} and Pallas: {pallas_reason}"
  if backend == "tpu":
    pallas_reason = flash_attention.unsupported_reason(q, k, v)
    if pallas_reason is None:
      return "pallas", "TPU and the Pallas kernel supports this dtype/head_dim"
    return "xla", f"TPU, but Pallas: {pallas_reason}"
  return "xla", f"backend {backend!r} has no attention kernel (Pallas would only interpret)"


def dot_product_attention(q, k, v, *, mask=None, causal=False, implementation="xla",
                          prefix_len=None):
  """softmax(q k^T / sqrt(D) + mask) v.  See the module docstring for shapes."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
        f"Unknown attention implementation {implementation!r}; valid implementations: "
        f"{', '.join(repr(i) for i in IMPLEMENTATIONS)}.")
  _check_inputs(q, k, v, mask)
  if prefix_len is not None and not causal:
    raise ValueError("prefix_len (prefix-LM attention) requires causal=True; or pass "
                     "mask=prefix_lm_mask(prefix_len, length) instead.")
  if mask is not None:
    mask = jnp.asarray(mask, dtype=bool)
  causal = bool(causal)
  if implementation == "auto":
    implementation, reason = _choose_implementation(q, k, v)
    choice = (implementation, reason)
    if choice not in _logged_choices:
      _logged_choices.add(choice)
      logging.info("dot_product_attention(implementation='auto') chose %r: %s.", *choice)
  if implementation == "pallas":
    return flash_attention.flash_attention(q, k, v, mask=mask, causal=causal,
                                           prefix_len=prefix_len)
  if implementation == "cudnn":
    reason = _cudnn_unsupported_reason(q, k, v)
    if reason is not None:
      raise ValueError(f"implementation='cudnn' is unavailable: {reason}. Use 'xla' (any "
                       "backend), 'pallas' (TPU/GPU) or 'auto'.")
    return _attention_cudnn(q, k, v, mask, causal, prefix_len)
  if prefix_len is not None:
    pm = _prefix_mask(prefix_len, q.shape[0], q.shape[1], k.shape[1])
    mask = pm if mask is None else jnp.logical_and(mask, pm)
    causal = False
  return _attention_xla(q, k, v, mask, causal)
