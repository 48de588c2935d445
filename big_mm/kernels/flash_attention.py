"""Pallas flash attention: forward and backward kernels behind a `jax.custom_vjp`.

Called through `big_mm.kernels.attention.dot_product_attention(..., implementation="pallas")`;
`flash_attention` below is the same computation with the kernel knobs exposed.

Algorithm (FlashAttention-2): the grid runs over (batch, head, query block); each program
keeps one query block, loops over key blocks with an online softmax (running max `m`,
running sum `l`, float32 accumulator) and writes the output in q.dtype plus the per-row
logsumexp. The backward pass recomputes the probabilities tile by tile from that
logsumexp: one kernel for dq (grid over query blocks) and one for dk/dv (grid over key
blocks). With `causal` (and no prefix_len), key blocks entirely above the diagonal are
skipped.

Masks, all optional and combined with AND (True = may attend):
  causal       query i sees key j iff j <= i + (Lk - Lq), as in the "xla" reference;
  prefix_len   [B] ints: with causal, keys j < prefix_len[b] are also visible to every
               query (prefix-LM); passed to the kernel as a per-key vector;
  mask         boolean broadcastable to [B, H, Lq, Lk]. A mask without a query axis
               (e.g. key padding [B, 1, 1, Lk]) travels as a per-key vector, never as
               an Lq x Lk array; anything else travels as an int8/int32 [B|1, H|1, Lq, Lk].
Lengths that are not block multiples are padded internally; padded keys are always
excluded.

Semantics equal the reference: masked logits are replaced by float32 min (not -inf), so a
query row with no visible key gets the uniform average of v over all Lk real keys (its
gradient flows only to v). The kernel excludes masked keys and flags such rows (their
running max stays at the mask value); the uniform average and its dv term are added
outside the kernel, which lets causal skipping stay exact. NaN/Inf in q, k or v reach the
output wherever they do in the reference, except NaN in a value row that lies only in
key blocks a causal query block skips (the reference multiplies it by a zero probability
and returns NaN; the kernel never reads it, and returns the mathematically correct value).

Block sizes come from `block_config` (the one per-backend place): TPU (Mosaic) blocks are
multiples of (8, 128) or the whole (padded) length, GPU (Triton) blocks are powers of two.
On CPU the kernels run in Pallas interpret mode: for tests only, slow.

Limits: each program holds the whole (padded) K and V of one (batch, head) as its block
(Triton only loads the tile it slices; Mosaic keeps the block in VMEM, double-buffered:
about 4 * Lk * D * itemsize bytes, e.g. 8 MiB at Lk 8192, D 128, bf16), so very long
keys on TPU need a key-blocked grid, not written here. Dense masks are Lq x Lk int8
(GPU) / int32 (TPU) arrays; key padding and prefix-LM avoid them.
Not yet run on a real GPU or TPU (no accelerator in the session that wrote it); CPU
interpret mode and Mosaic's TPU interpret mode are tested in tests/test_attention.py.

Matmuls use the backend's default precision, like the "xla" reference (TF32 on GPU for
float32 inputs, bf16 passes on TPU), with float32 accumulation.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

# Same finite mask value as the "xla" reference.
MASK_VALUE = float(jnp.finfo(jnp.float32).min)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128, 256)

_warned_interpret = False


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Kernel tiling for one backend and one (Lq, Lk) shape."""
  block_q: int
  block_k: int
  mask_dtype: str          # dtype of the dense [.., Lq, Lk] mask the kernel reads
  num_warps: int = 4       # Triton only
  num_stages: int = 2      # Triton only


def _next_pow2(n: int) -> int:
  return 1 << max(n - 1, 0).bit_length()


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def block_config(platform: str, lq: int, lk: int, head_dim: int) -> BlockConfig:
  """Per-backend block sizes; the one place to retune after benchmarking.

  tpu: 128 x 128 (MXU sized); short sequences use one block of the length rounded up to 8
    (a block equal to the whole padded axis satisfies Mosaic's (8, 128) rule). Masks are
    int32 (int8 vector ops are not available on every TPU generation).
  gpu and cpu (interpret): powers of two, 64 x 64 (or the next power of two >= 16 below
    that), small enough that the backward's tiles fit registers at head_dim 128.
  """
  del head_dim  # Same blocks for the supported head dims; re-measure before changing.
  if platform == "tpu":
    bq = 128 if lq > 128 else _round_up(lq, 8)
    bk = 128 if lk > 128 else _round_up(lk, 8)
    return BlockConfig(bq, bk, mask_dtype="int32")
  bq = min(64, max(16, _next_pow2(lq)))
  bk = min(64, max(16, _next_pow2(lk)))
  return BlockConfig(bq, bk, mask_dtype="int8", num_warps=4, num_stages=2)


def unsupported_reason(q, k, v) -> Optional[str]:
  """Why the kernel cannot run these inputs, or None when it can."""
  dtypes = {jnp.dtype(t.dtype) for t in (q, k, v)}
  if len(dtypes) != 1:
    return f"q, k, v must share one dtype; got {', '.join(sorted(str(d) for d in dtypes))}"
  (dtype,) = dtypes
  if dtype not in SUPPORTED_DTYPES:
    return (f"dtype {dtype} is not supported (supported: "
            f"{', '.join(str(d) for d in SUPPORTED_DTYPES)})")
  if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
    return (f"head_dim {q.shape[-1]} is not supported (supported: "
            f"{', '.join(map(str, SUPPORTED_HEAD_DIMS))})")
  return None


@dataclasses.dataclass(frozen=True)
class _Static:
  """Everything the kernels need to know at trace time."""
  lq: int
  lk: int
  block_q: int
  block_k: int
  causal: bool
  scale: float
  key_mask_heads: int       # 0 = no per-key mask, else its batch-broadcast head count (1 or H)
  key_mask_batch: int
  has_prefix: bool
  dense_batch: int          # 0 = no dense mask, else 1 or B
  dense_heads: int
  pad_check: bool           # exclude keys >= lk with an iota (no mask array carries padding)

  @property
  def offset(self):
    return self.lk - self.lq


def _dot(a, b, contract_a=1, contract_b=0):
  """2-D matmul with float32 accumulation; lowers on Mosaic, Triton and interpret."""
  return lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())),
                         preferred_element_type=jnp.float32)


def _visible(st: _Static, q_start, k_start, key_mask_ref, prefix_ref, dense_ref,
             q_slice, k_slice):
  """Boolean [block_q, block_k] of attendable (query, key) pairs, or None if all are."""
  shape = (st.block_q, st.block_k)
  vis = None

  def conj(a, b):
    return b if a is None else jnp.logical_and(a, b)

  if st.causal or st.pad_check:
    cols = k_start + lax.broadcasted_iota(jnp.int32, shape, 1)
  if st.causal:
    rows = q_start + lax.broadcasted_iota(jnp.int32, shape, 0)
    vis = cols <= rows + st.offset
    if st.has_prefix:
      vis = jnp.logical_or(vis, prefix_ref[:, k_slice] != 0)
  if st.pad_check:
    vis = conj(vis, cols < st.lk)
  if st.key_mask_heads:
    vis = conj(vis, jnp.broadcast_to(key_mask_ref[:, k_slice] != 0, shape))
  if st.dense_batch:
    vis = conj(vis, dense_ref[q_slice, k_slice] != 0)
  return vis


def _num_k_blocks(st: _Static, qi, nk):
  """Key blocks [0, n) that query block qi can see (all of them unless causal)."""
  if not st.causal or st.has_prefix:
    return nk
  end = (qi + 1) * st.block_q + st.offset   # exclusive bound on visible keys
  end = jnp.maximum(end, 0)
  return jnp.minimum(lax.div(end + st.block_k - 1, st.block_k), nk)


def _first_q_block(st: _Static, kj, nq):
  """First query block that can see key block kj (0 unless causal)."""
  if not st.causal or st.has_prefix:
    return 0
  first_row = jnp.maximum(kj * st.block_k - st.offset, 0)
  return jnp.minimum(lax.div(first_row, st.block_q), nq)


def _split_mask_refs(st: _Static, refs):
  refs = list(refs)
  key_mask_ref = refs.pop(0) if st.key_mask_heads else None
  prefix_ref = refs.pop(0) if st.has_prefix else None
  dense_ref = refs.pop(0) if st.dense_batch else None
  return key_mask_ref, prefix_ref, dense_ref, refs


def _fwd_kernel(q_ref, k_ref, v_ref, *refs, st: _Static):
  key_mask_ref, prefix_ref, dense_ref, (o_ref, lse_ref) = _split_mask_refs(st, refs)
  bq, bk = st.block_q, st.block_k
  qi = pl.program_id(2)
  nk = k_ref.shape[0] // bk
  q = q_ref[...]

  def body(kj, carry):
    acc, m, l = carry
    k_slice = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    s = _dot(q, k_ref[k_slice, :], 1, 1) * st.scale
    vis = _visible(st, qi * bq, kj * bk, key_mask_ref, prefix_ref, dense_ref,
                   slice(None), k_slice)
    if vis is not None:
      s = jnp.where(vis, s, MASK_VALUE)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    correction = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    l = correction * l + jnp.sum(p, axis=1, keepdims=True)
    v = v_ref[k_slice, :]
    acc = correction * acc + _dot(p.astype(v.dtype), v)
    return acc, m_new, l

  init = (jnp.zeros((bq, q.shape[-1]), jnp.float32),
          jnp.full((bq, 1), MASK_VALUE, jnp.float32),
          jnp.zeros((bq, 1), jnp.float32))
  acc, m, l = lax.fori_loop(0, _num_k_blocks(st, qi, nk), body, init)
  # A row whose max is still the mask value saw no visible key: flag it with lse = +inf
  # (the wrapper substitutes the uniform average; the backward then gives it p = 0).
  # A NaN logit makes l NaN; the max alone is not trusted with NaN (vectorized max may
  # drop it on some backends), so such rows stay NaN instead of being flagged.
  no_key = jnp.logical_and(m == MASK_VALUE, jnp.logical_not(jnp.isnan(l)))
  safe_l = jnp.where(no_key, 1.0, l)
  o_ref[...] = jnp.where(no_key, 0.0, acc / safe_l).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(no_key, jnp.inf, m + jnp.log(safe_l))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: _Static):
  key_mask_ref, prefix_ref, dense_ref, (dq_ref,) = _split_mask_refs(st, refs)
  bq, bk = st.block_q, st.block_k
  qi = pl.program_id(2)
  nk = k_ref.shape[0] // bk
  q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]

  def body(kj, dq):
    k_slice = pl.ds(pl.multiple_of(kj * bk, bk), bk)
    k = k_ref[k_slice, :]
    s = _dot(q, k, 1, 1) * st.scale
    vis = _visible(st, qi * bq, kj * bk, key_mask_ref, prefix_ref, dense_ref,
                   slice(None), k_slice)
    if vis is not None:
      s = jnp.where(vis, s, MASK_VALUE)
    p = jnp.exp(s - lse)
    dp = _dot(do, v_ref[k_slice, :], 1, 1)
    ds = p * (dp - delta) * st.scale
    return dq + _dot(ds.astype(k.dtype), k)

  dq = lax.fori_loop(0, _num_k_blocks(st, qi, nk), body,
                     jnp.zeros((bq, q.shape[-1]), jnp.float32))
  dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, *refs, st: _Static):
  key_mask_ref, prefix_ref, dense_ref, (dk_ref, dv_ref) = _split_mask_refs(st, refs)
  bq, bk = st.block_q, st.block_k
  kj = pl.program_id(2)
  nq = q_ref.shape[0] // bq
  k, v = k_ref[...], v_ref[...]

  def body(qi, carry):
    dk, dv = carry
    q_slice = pl.ds(pl.multiple_of(qi * bq, bq), bq)
    q = q_ref[q_slice, :]
    do = do_ref[q_slice, :]
    s = _dot(q, k, 1, 1) * st.scale
    vis = _visible(st, qi * bq, kj * bk, key_mask_ref, prefix_ref, dense_ref,
                   q_slice, slice(None))
    if vis is not None:
      s = jnp.where(vis, s, MASK_VALUE)
    p = jnp.exp(s - lse_ref[q_slice, :])
    dv = dv + _dot(p.astype(do.dtype), do, 0, 0)
    dp = _dot(do, v, 1, 1)
    ds = p * (dp - delta_ref[q_slice, :]) * st.scale
    dk = dk + _dot(ds.astype(q.dtype), q, 0, 0)
    return dk, dv

  zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
  dk, dv = lax.fori_loop(_first_q_block(st, kj, nq), nq, body, (zeros, zeros))
  dk_ref[...] = dk.astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


# ---------------------------------------------------------------------------------------
# pallas_call plumbing. Arrays inside are [B, H, L_padded, D]; masks as described above.


def _compiler_params(platform: str, cfg: BlockConfig):
  if platform == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel"))
  if platform == "gpu":
    from jax.experimental.pallas import triton as pltriton
    return pltriton.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)
  return None


@dataclasses.dataclass(frozen=True)
class _Launch:
  st: _Static
  platform: str
  interpret: object
  cfg: BlockConfig


def _mask_specs(st: _Static, lq_pad: int, lk_pad: int, axis: str):
  """BlockSpecs for the mask arrays. axis: 'q' (grid over query blocks) or 'k'."""
  specs = []

  def pick(size, idx):
    return idx if size > 1 else 0

  if st.key_mask_heads:
    kb = lk_pad if axis == "q" else st.block_k
    specs.append(pl.BlockSpec(
        (None, None, 1, kb),
        lambda b, h, i: (pick(st.key_mask_batch, b), pick(st.key_mask_heads, h), 0,
                         0 if axis == "q" else i)))
  if st.has_prefix:
    kb = lk_pad if axis == "q" else st.block_k
    specs.append(pl.BlockSpec((None, None, 1, kb),
                              lambda b, h, i: (b, 0, 0, 0 if axis == "q" else i)))
  if st.dense_batch:
    block = (st.block_q, lk_pad) if axis == "q" else (lq_pad, st.block_k)
    specs.append(pl.BlockSpec(
        (None, None) + block,
        lambda b, h, i: (pick(st.dense_batch, b), pick(st.dense_heads, h),
                         i if axis == "q" else 0, 0 if axis == "q" else i)))
  return specs


def _call_fwd(launch: _Launch, q, k, v, masks):
  st = launch.st
  b, h, lq_pad, d = q.shape
  lk_pad = k.shape[2]
  q_spec = pl.BlockSpec((None, None, st.block_q, d), lambda bi, hi, i: (bi, hi, i, 0))
  kv_spec = pl.BlockSpec((None, None, lk_pad, d), lambda bi, hi, i: (bi, hi, 0, 0))
  row_spec = pl.BlockSpec((None, None, st.block_q, 1), lambda bi, hi, i: (bi, hi, i, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, st=st),
      grid=(b, h, lq_pad // st.block_q),
      in_specs=[q_spec, kv_spec, kv_spec] + _mask_specs(st, lq_pad, lk_pad, "q"),
      out_specs=[q_spec, row_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, lq_pad, 1), jnp.float32)],
      compiler_params=_compiler_params(launch.platform, launch.cfg),
      interpret=launch.interpret,
      name="flash_attention_fwd",
  )(q, k, v, *masks)


def _call_bwd(launch: _Launch, q, k, v, do, lse, delta, masks):
  st = launch.st
  b, h, lq_pad, d = q.shape
  lk_pad = k.shape[2]
  params = _compiler_params(launch.platform, launch.cfg)

  def spec(rows, cols, by):  # by: which tensor axis the grid's last index walks
    if by:
      return pl.BlockSpec((None, None, rows, cols), lambda bi, hi, i: (bi, hi, i, 0))
    return pl.BlockSpec((None, None, rows, cols), lambda bi, hi, i: (bi, hi, 0, 0))

  dq = pl.pallas_call(
      functools.partial(_dq_kernel, st=st),
      grid=(b, h, lq_pad // st.block_q),
      in_specs=[spec(st.block_q, d, True), spec(lk_pad, d, False), spec(lk_pad, d, False),
                spec(st.block_q, d, True), spec(st.block_q, 1, True), spec(st.block_q, 1, True)]
      + _mask_specs(st, lq_pad, lk_pad, "q"),
      out_specs=spec(st.block_q, d, True),
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=params, interpret=launch.interpret, name="flash_attention_dq",
  )(q, k, v, do, lse, delta, *masks)
  dk, dv = pl.pallas_call(
      functools.partial(_dkv_kernel, st=st),
      grid=(b, h, lk_pad // st.block_k),
      in_specs=[spec(lq_pad, d, False), spec(st.block_k, d, True), spec(st.block_k, d, True),
                spec(lq_pad, d, False), spec(lq_pad, 1, False), spec(lq_pad, 1, False)]
      + _mask_specs(st, lq_pad, lk_pad, "k"),
      out_specs=[spec(st.block_k, d, True), spec(st.block_k, d, True)],
      out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
      compiler_params=params, interpret=launch.interpret, name="flash_attention_dkv",
  )(q, k, v, do, lse, delta, *masks)
  return dq, dk, dv


def _uniform_average(st: _Static, v):
  """Output of a row with no visible key: mean of v over the real keys, [B, H, 1, D]."""
  return jnp.mean(v[:, :, :st.lk].astype(jnp.float32), axis=2, keepdims=True)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(launch: _Launch, q, k, v, masks):
  return _flash_fwd(launch, q, k, v, masks)[0]


def _flash_fwd(launch: _Launch, q, k, v, masks):
  o, lse = _call_fwd(launch, q, k, v, masks)
  no_key = jnp.isposinf(lse)
  out = jnp.where(no_key, _uniform_average(launch.st, v).astype(o.dtype), o)
  return out, (q, k, v, masks, o, lse)


def _flash_bwd(launch: _Launch, res, dout):
  q, k, v, masks, o, lse = res
  st = launch.st
  no_key = jnp.isposinf(lse)
  do = jnp.where(no_key, 0, dout).astype(q.dtype)
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)
  dq, dk, dv = _call_bwd(launch, q, k, v, do, lse, delta, masks)
  # Rows with no visible key are the uniform average of v: d/dv = dout / Lk on real keys.
  dv_uniform = jnp.sum(jnp.where(no_key, dout.astype(jnp.float32), 0.0), axis=2,
                       keepdims=True) / st.lk
  real_key = (jnp.arange(k.shape[2]) < st.lk)[None, None, :, None]
  dv = (dv.astype(jnp.float32) + jnp.where(real_key, dv_uniform, 0.0)).astype(v.dtype)
  return dq, dk, dv, jax.tree.map(lambda _: None, masks)


_flash.defvjp(_flash_fwd, _flash_bwd)


# ---------------------------------------------------------------------------------------
# Public entry point.


def _pad_axis(x, axis, size, value=0):
  extra = size - x.shape[axis]
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def flash_attention(q, k, v, *, mask=None, causal=False, prefix_len=None,
                    platform: Optional[str] = None, interpret=None,
                    block_q: Optional[int] = None, block_k: Optional[int] = None):
  """Flash attention with the layout and semantics of `dot_product_attention`.

  q [B, Lq, H, D], k/v [B, Lk, H, D]; mask boolean broadcastable to [B, H, Lq, Lk];
  prefix_len [B] ints (needs causal=True; see the module docstring).
  platform: "tpu" | "gpu" | "cpu" (default: jax.default_backend()) picks block sizes and
    compiler params. interpret: None = interpret exactly when the platform is "cpu";
    anything else is passed to pallas_call (e.g. pltpu.InterpretParams()).
  block_q / block_k override `block_config` (must divide the padding they imply).
  Inputs are assumed already validated (rank, shapes) by `dot_product_attention`.
  """
  global _warned_interpret
  reason = unsupported_reason(q, k, v)
  if reason is not None:
    raise ValueError(f"Pallas flash attention: {reason}. Use implementation='xla' instead.")
  if prefix_len is not None and not causal:
    raise ValueError("prefix_len (prefix-LM attention) requires causal=True.")
  platform = platform or jax.default_backend()
  if interpret is None:
    interpret = platform == "cpu"
    if interpret and not _warned_interpret:
      _warned_interpret = True
      logging.warning("Pallas flash attention runs in interpret mode on CPU: correct but "
                      "slow, meant for tests only. Use implementation='xla' on CPU.")
  b, lq, h, d = q.shape
  lk = k.shape[1]
  cfg = block_config(platform, lq, lk, d)
  if block_q or block_k:
    cfg = dataclasses.replace(cfg, block_q=block_q or cfg.block_q, block_k=block_k or cfg.block_k)
  lq_pad, lk_pad = _round_up(lq, cfg.block_q), _round_up(lk, cfg.block_k)

  masks = []
  key_mask_batch = key_mask_heads = dense_batch = dense_heads = 0
  if mask is not None:
    mask = jnp.asarray(mask, bool)
    mb, mh, mq, mk = mask.shape
    if mq == 1:  # no query axis: a per-key vector, e.g. key padding [B, 1, 1, Lk]
      key_mask_batch, key_mask_heads = mb, mh
      vec = jnp.broadcast_to(mask, (mb, mh, 1, lk)).astype(jnp.int32)
      masks.append(_pad_axis(vec, 3, lk_pad))
    else:
      dense_batch, dense_heads = mb, mh
      dense = jnp.broadcast_to(mask, (mb, mh, lq, lk)).astype(cfg.mask_dtype)
      masks.append(_pad_axis(_pad_axis(dense, 2, lq_pad), 3, lk_pad))
  if prefix_len is not None:
    prefix_len = jnp.broadcast_to(jnp.asarray(prefix_len, jnp.int32).reshape(-1), (b,))
    prefix = jnp.arange(lk_pad)[None, :] < jnp.minimum(prefix_len, lk)[:, None]
    masks.insert(1 if key_mask_heads else 0, prefix.astype(jnp.int32)[:, None, None, :])

  st = _Static(lq=lq, lk=lk, block_q=cfg.block_q, block_k=cfg.block_k, causal=bool(causal),
               scale=1.0 / math.sqrt(d), key_mask_heads=key_mask_heads,
               key_mask_batch=key_mask_batch, has_prefix=prefix_len is not None,
               dense_batch=dense_batch, dense_heads=dense_heads,
               pad_check=lk_pad != lk and not (key_mask_heads or dense_batch))
  launch = _Launch(st=st, platform=platform, interpret=interpret, cfg=cfg)

  def to_kernel(x, length):
    return _pad_axis(jnp.swapaxes(x, 1, 2), 2, length)

  out = _flash(launch, to_kernel(q, lq_pad), to_kernel(k, lk_pad), to_kernel(v, lk_pad),
               tuple(masks))
  return jnp.swapaxes(out[:, :, :lq], 1, 2)
