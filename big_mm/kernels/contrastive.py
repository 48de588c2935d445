"""Fused contrastive-loss kernels (Pallas) that never materialise the B_i x B_t logits.

logits_ij = t * sim(zi_i, zt_j) + b, with `t` the already exponentiated temperature and `b`
the bias. Every pass walks the logit matrix tile by tile (float32 accumulation, bf16 or f32
inputs) and keeps only O(rows) running statistics, so memory is O(b*d + tile^2).

Building blocks (one image block zi [bi, d] against one text block zt [bt, d]; usable per
ring step, each a `jax.custom_vjp` whose backward recomputes the tiles and saves only the
inputs and the O(b) log-sum-exp vectors):
  block_lse(zi, zt, t, b)                      -> (lse_rows [bi], lse_cols [bt]) float32
  block_sigmoid_sum(zi, zt, t, b, pos_offset)  -> sum_ij -log_sigmoid(z_ij * logits_ij)
      z_ij = +1 where j == i + pos_offset (the positives; 0 for a diagonal block), else -1;
      pos_offset=None means a block without positives.
Their raw halves (no autodiff; used by the sharded losses in big_mm/objectives/losses.py):
  lse_fwd(..., rows=True, cols=True), lse_bwd(..., rows, cols, dzi_acc, dzt_acc),
  sigmoid_sum_fwd, sigmoid_sum_bwd: the backward can run only the pass over row tiles (dzi,
  dt, db) or over column tiles (dzt), and add into given gradient accumulators in place.
Full-batch losses, equal to losses.sigmoid_loss / losses.softmax_loss:
  sigmoid_loss_fused(zimg, ztxt, t, b), softmax_loss_fused(zimg, ztxt, t, b=None).
Plain-jnp references of the blocks: block_lse_reference, block_sigmoid_sum_reference.

Every function takes `similarity=` (default DOT_PRODUCT) and `config=` (a KernelConfig;
default `kernel_config(backend=None, **overrides)` for the running backend: tile sizes, loop
mode, feature padding, all chosen in that one function).

Status: checked in CPU interpret mode against the references (tests/test_kernels_contrastive.py)
and, compiled through Triton, on an H200 (`tools/benchmark_kernels.py check-gpu`, results in
docs/benchmarks.md). The Mosaic (TPU) lowering is exported on CPU for the configs' shapes
(tests/test_tpu_lowering.py); it has not been compiled by libtpu or run on a TPU.

How a pass works: a 1-D "own" axis of tiles (rows of zi, or rows of zt) is the parallel grid
axis; the "other" axis is reduced over, either as a second, sequential grid axis whose
outputs stay resident across it (mode "grid": TPU/Mosaic, and CPU interpret mode) or as a
`fori_loop` inside the kernel (mode "loop": GPU/Triton, whose grid axes run in parallel).
Blocks are zero-padded to whole tiles (and the feature dim to what the backend needs);
padded rows/cols are masked out of every sum.

Another similarity (e.g. FILIP token-wise late interaction) plugs in as an object with the
methods of `DotProduct`: `__call__(a, b) -> [ta, tb]` float32 for a tile of rows of each
side (a row may be a flattened [tokens * d] vector, reshaped inside), `grad_a` / `grad_b`
giving the tile's input gradients for a cotangent `ds` [ta, tb], and `diagonal(a, b) -> [n]`
(plain jnp, for the positives of the softmax loss). It must be cheap enough to evaluate on a
tile inside the kernel and zero-padding of the feature dim must not change it.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

MODES = ("grid", "loop", "chunked")

# ----------------------------------------------------------------------------- similarity


def _dot(a, b, contract):
  dtype = jnp.promote_types(a.dtype, b.dtype)
  return lax.dot_general(a.astype(dtype), b.astype(dtype), (contract, ((), ())),
                         preferred_element_type=jnp.float32)


class DotProduct:
  """sim(a_i, b_j) = <a_i, b_j> with float32 accumulation (the CLIP / SigLIP similarity)."""

  def __call__(self, a, b):  # [ta, d], [tb, d] -> [ta, tb]
    return _dot(a, b, ((1,), (1,)))

  def grad_a(self, a, b, ds):  # d/da of sum(ds * sim(a, b)): ds @ b
    return _dot(ds.astype(b.dtype), b, ((1,), (0,)))

  def grad_b(self, a, b, ds):  # d/db: ds^T @ a (explicit transpose: what Mosaic lowers best)
    return _dot(ds.T.astype(a.dtype), a, ((1,), (0,)))

  def diagonal(self, a, b):  # sim(a_i, b_i), plain jnp
    return jnp.sum(a.astype(jnp.float32) * b.astype(jnp.float32), axis=-1)

  def __hash__(self):
    return hash(DotProduct)

  def __eq__(self, other):
    return isinstance(other, DotProduct)


DOT_PRODUCT = DotProduct()

# ----------------------------------------------------------------------------- per-backend config


@dataclasses.dataclass(frozen=True)
class KernelConfig:
  """Static kernel settings. backend: "tpu" | "gpu" | "cpu" (cpu runs interpret mode).

  mode "chunked" is plain XLA, not Pallas: tile_rows rows of zi at a time against all of zt
  (tile_cols is unused)."""
  backend: str
  tile_rows: int
  tile_cols: int
  mode: str = "grid"
  feature_multiple: int = 1  # pad d to a multiple of this (TPU lanes)
  feature_pow2: bool = False  # pad d to a power of two (Triton block shapes)
  num_warps: int = 4
  tpu_interpret: bool = False  # run the TPU config in Mosaic's interpreter (tests, on CPU)

  @property
  def interpret(self):
    if self.tpu_interpret:
      from jax.experimental.pallas import tpu as pltpu
      return pltpu.InterpretParams()
    return self.backend == "cpu"


# Triton keeps a program's zi and zt tiles in shared memory: 227 KiB per program on an H100 /
# H200. Two [32, 1024] float32 tiles (d = 768 padded to 1024) ask for 256 KiB and fail
# (measured on an H200, docs/gpu_results/check_contrastive.log), so such rows get 16-row tiles.
_GPU_TILE_BYTES = 64 * 1024
# Mode "chunked": rows of zi per step. A step holds a few float32 [rows, n_cols] slabs: XLA:CPU
# compiles the B = 65,536, d = 768 bf16 loss's fwd+bwd to 0.93 / 1.28 / 1.60 GiB of temp at
# 256 / 512 / 1,024 rows (`tools/benchmark_kernels.py memory --devices 1`); a [512, 768] x
# [768, B] matmul still fills a GPU. The autotuner's table (tuning.py) overrides it per device.
CHUNK_ROWS = 512


def kernel_config(backend: str | None = None, *, dim: int | None = None, dtype=None,
                  loss: str | None = None, batch: int | None = None,
                  **overrides) -> KernelConfig:
  """Tile sizes and loop mode per backend (the one place to tune them); overrides win.

  dim / dtype (the embeddings' feature size and dtype), when given, let the GPU tiles shrink
  to fit shared memory, and select the autotuner's stored entry for this device (with loss
  and the global batch where given; big_mm/kernels/tuning.py), which beats the defaults.
  mode="chunked" gives the XLA chunked implementation's settings on any backend."""
  backend = backend or jax.default_backend()
  chunked = overrides.get("mode") == "chunked"
  if backend in ("cuda", "rocm"):
    backend = "gpu"
  if backend not in ("tpu", "gpu", "cpu"):
    raise ValueError(f"No Pallas contrastive kernel for backend {backend!r}; use tpu, gpu or cpu.")
  if chunked:
    cfg = dict(tile_rows=CHUNK_ROWS, tile_cols=CHUNK_ROWS, mode="chunked")
  elif backend == "tpu":
    cfg = dict(tile_rows=256, tile_cols=256, mode="grid", feature_multiple=128)
  elif backend == "gpu":
    # Small tiles: with d = 768 (padded to 1024) a [32, 1024] bf16 tile and its f32 gradient
    # accumulator already fill much of the registers / shared memory of a Triton program.
    cfg = dict(tile_rows=32, tile_cols=32, mode="loop", feature_pow2=True, num_warps=4)
    if dim is not None and dtype is not None:
      row_bytes = (1 << max(0, math.ceil(math.log2(dim)))) * jnp.dtype(dtype).itemsize
      if 32 * row_bytes > _GPU_TILE_BYTES:
        cfg.update(tile_rows=16, tile_cols=16)
  else:
    cfg = dict(tile_rows=128, tile_cols=128, mode="grid")
  if dim is not None and dtype is not None:
    from big_mm.kernels import tuning
    cfg.update(tuning.lookup("chunked" if chunked else "pallas", dim=dim, dtype=dtype,
                             loss=loss, batch=batch, backend=backend))
  cfg.update(overrides)
  if cfg["mode"] not in MODES:
    raise ValueError(f"Unknown kernel mode {cfg['mode']!r}; valid: {', '.join(MODES)}")
  if cfg["mode"] == "chunked":
    if cfg["tile_rows"] < 1:
      raise ValueError(f"mode 'chunked' needs tile_rows >= 1 (rows of zi per step); got "
                       f"{cfg['tile_rows']}.")
    return KernelConfig(backend=backend, **cfg)
  if backend == "tpu" and (cfg["tile_rows"] % 8 or cfg["tile_cols"] % 128):
    raise ValueError(f"TPU tiles must be multiples of 8 rows and 128 columns: Mosaic tiles a "
                     f"block's last two dims by (8, 128) and the column statistics travel as "
                     f"[1, tile_cols] blocks; got tile_rows={cfg['tile_rows']}, "
                     f"tile_cols={cfg['tile_cols']} (tests/test_tpu_lowering.py).")
  if backend == "gpu" and cfg["mode"] == "grid":
    raise ValueError("mode 'grid' needs sequential grid steps (TPU, CPU interpret); Triton runs "
                     "grid steps in parallel: use mode 'loop' on GPU.")
  return KernelConfig(backend=backend, **cfg)


def _compiler_params(cfg: KernelConfig):
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    semantics = ("parallel", "arbitrary") if cfg.mode == "grid" else ("parallel",)
    return pltpu.CompilerParams(dimension_semantics=semantics)
  if cfg.backend == "gpu":
    from jax.experimental.pallas import triton as plgpu
    return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=2)
  return None


def _scalar_spec(cfg: KernelConfig):
  if cfg.backend == "tpu":
    from jax.experimental.pallas import tpu as pltpu
    return pl.BlockSpec(memory_space=pltpu.SMEM)
  return pl.BlockSpec((_N_PARAMS,), lambda *_: (0,))


# ----------------------------------------------------------------------------- the tiled pass

# Scalars handed to every kernel, as one float32 vector (a power of two long, for Triton):
# t, b, g (the cotangent of a sigmoid sum) and pos_offset (exact below 2**24).
_N_PARAMS = 4


def _pad_to(x, rows, cols):
  return jnp.pad(x, ((0, rows - x.shape[0]), (0, cols - x.shape[1])))


def _round_up(n, m):
  return -(-n // m) * m


def _features(d, cfg):
  if cfg.feature_pow2:
    d = 1 << max(0, math.ceil(math.log2(d)))
  return _round_up(d, cfg.feature_multiple)


def _tiled_pass(tile_fn, inits, out_shapes, *, over, params, zi, zt, row_vecs, col_vecs,
                n_rows, n_cols, similarity, cfg):
  """Runs `tile_fn` over every (row tile, col tile) of the (padded) logit matrix.

  over="rows": the grid is over row tiles of zi and each program reduces over all column
    tiles; over="cols": the other way round. row_vecs are [Mi, 1] and col_vecs [1, Mt]
    float32 side inputs (e.g. lse and cotangent vectors). Each output has shape `out_shapes[k]`
    = (M_own, w) or (1, M_own) and is an accumulator updated by
    `tile_fn(tile, *accs) -> accs`, starting from `inits[k]`: a constant, or an array of the
    output's shape that is accumulated into in place (aliased to the output).
  """
  ti, tj = cfg.tile_rows, cfg.tile_cols
  mi, mt = zi.shape[0], zt.shape[0]
  own_n, other_n = (mi // ti, mt // tj) if over == "rows" else (mt // tj, mi // ti)
  grid_mode = cfg.mode == "grid"
  n_vec = len(row_vecs) + len(col_vecs)
  # Which operands belong to the "own" (gridded) side: zi and row_vecs when over rows.
  row_side_own = over == "rows"
  # Array inits come in after the side inputs and are aliased to their outputs.
  acc_inputs = [(k, init) for k, init in enumerate(inits) if not isinstance(init, float)]
  in_specs, out_specs = _pass_specs(cfg, row_side_own, zi, zt, row_vecs, col_vecs, out_shapes,
                                    [k for k, _ in acc_inputs])
  first_acc, n_acc = 3 + n_vec, len(acc_inputs)

  def kernel(params_ref, zi_ref, zt_ref, *refs):
    vec_refs, acc_refs, out_refs = refs[:n_vec], refs[n_vec:n_vec + n_acc], refs[n_vec + n_acc:]
    acc_in = {k: ref for (k, _), ref in zip(acc_inputs, acc_refs)}

    def initial(k, ref):
      if k in acc_in:
        return acc_in[k][...]
      return jnp.full(ref.shape, inits[k], jnp.float32)

    row_refs, col_refs = vec_refs[:len(row_vecs)], vec_refs[len(row_vecs):]
    p = pl.program_id(0)
    t, b, g = params_ref[0], params_ref[1], params_ref[2]
    offset = params_ref[3].astype(jnp.int32)

    def load(ref, axis, tile, own, k):
      if own or grid_mode:
        return ref[...]
      idx = [slice(None), slice(None)]
      idx[axis] = pl.ds(pl.multiple_of(k * tile, tile), tile)
      return ref[tuple(idx)]

    def step(k, accs):
      i, j = (p, k) if row_side_own else (k, p)
      zi_t = load(zi_ref, 0, ti, row_side_own, k)
      zt_t = load(zt_ref, 0, tj, not row_side_own, k)
      s = similarity(zi_t, zt_t)
      rows = i * ti + lax.broadcasted_iota(jnp.int32, (ti, 1), 0)
      cols = j * tj + lax.broadcasted_iota(jnp.int32, (1, tj), 1)
      tile = _Tile(
          zi=zi_t, zt=zt_t, s=s, logits=t * s + b, t=t, g=g,
          valid=(rows < n_rows) & (cols < n_cols), pos=cols == rows + offset,
          rows=[load(r, 0, ti, row_side_own, k) for r in row_refs],
          cols=[load(c, 1, tj, not row_side_own, k) for c in col_refs],
          similarity=similarity)
      return tuple(tile_fn(tile, *accs))

    if grid_mode:
      k = pl.program_id(1)

      @pl.when(k == 0)
      def _init():
        for j, ref in enumerate(out_refs):
          ref[...] = initial(j, ref)

      for ref, acc in zip(out_refs, step(k, tuple(ref[...] for ref in out_refs))):
        ref[...] = acc
    else:
      accs = tuple(initial(j, ref) for j, ref in enumerate(out_refs))
      accs = lax.fori_loop(0, other_n, step, accs)
      for ref, acc in zip(out_refs, accs):
        ref[...] = acc

  inputs = (params, zi, zt, *row_vecs, *col_vecs, *(init for _, init in acc_inputs))
  mat = _varying_union(inputs)
  return pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct(s, jnp.float32, manual_axis_type=mat) for s in out_shapes],
      grid=(own_n, other_n) if grid_mode else (own_n,),
      in_specs=in_specs,
      out_specs=out_specs,
      input_output_aliases={first_acc + i: k for i, (k, _) in enumerate(acc_inputs)},
      compiler_params=_compiler_params(cfg),
      interpret=cfg.interpret,
      name=f"contrastive_{tile_fn.__name__}",
  )(*inputs)


def _pass_specs(cfg, row_side_own, zi, zt, row_vecs, col_vecs, out_shapes, acc_outputs):
  """(in_specs, out_specs) of a `_tiled_pass`: the own (gridded) side's operands are tiled by
  the program id; the other side's by the second grid axis (mode "grid") or passed whole and
  sliced in the loop. acc_outputs: the outputs whose array inits come in as extra inputs."""
  ti, tj = cfg.tile_rows, cfg.tile_cols
  grid_mode = cfg.mode == "grid"

  def spec(shape, axis, tile, own):
    """BlockSpec for an array tiled along `axis` (rows of zi/zt or an lse vector)."""
    if own:
      block = tuple(tile if a == axis else s for a, s in enumerate(shape))
      return pl.BlockSpec(block, lambda p, *k, axis=axis: tuple(
          p if a == axis else 0 for a in range(len(shape))))
    if grid_mode:
      block = tuple(tile if a == axis else s for a, s in enumerate(shape))
      return pl.BlockSpec(block, lambda p, k, axis=axis: tuple(
          k if a == axis else 0 for a in range(len(shape))))
    return pl.BlockSpec(shape, lambda p: (0,) * len(shape))  # whole; sliced in the loop

  in_specs = [_scalar_spec(cfg),
              spec(zi.shape, 0, ti, row_side_own), spec(zt.shape, 0, tj, not row_side_own)]
  in_specs += [spec(v.shape, 0, ti, row_side_own) for v in row_vecs]
  in_specs += [spec(v.shape, 1, tj, not row_side_own) for v in col_vecs]
  own_tile = ti if row_side_own else tj
  out_specs = [spec(s, 0 if s[0] != 1 else 1, own_tile, True) for s in out_shapes]
  in_specs += [out_specs[k] for k in acc_outputs]
  return in_specs, out_specs


def _varying_union(xs):
  """Under shard_map, outputs vary over every mesh axis any input varies over."""
  mats = [jax.typeof(x).manual_axis_type for x in xs]
  return mats[0].update(varying=frozenset().union(*(m.varying for m in mats)))


@dataclasses.dataclass
class _Tile:
  """One [ti, tj] tile of the logit matrix and its side inputs, as seen by a tile function."""
  zi: jax.Array  # [ti, d] image rows
  zt: jax.Array  # [tj, d] text rows
  s: jax.Array  # [ti, tj] float32 similarity
  logits: jax.Array  # t * s + b
  t: jax.Array
  g: jax.Array  # cotangent of a sigmoid sum (params[2])
  valid: jax.Array  # [ti, tj] inside the unpadded block
  pos: jax.Array  # [ti, tj] positive pairs (j == i + pos_offset)
  rows: list  # row side inputs, each [ti, 1]
  cols: list  # col side inputs, each [1, tj]
  similarity: object


# ----------------------------------------------------------------------------- tile functions


def _online_lse(logits, valid, m, s, axis):
  """One step of a running log-sum-exp (max m, scaled sum s) along `axis` of a tile."""
  x = jnp.where(valid, logits, -jnp.inf)
  m_new = jnp.maximum(m, jnp.max(x, axis=axis, keepdims=True))
  m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # a fully masked line so far
  s_new = s * jnp.exp(m - m_safe) + jnp.sum(jnp.exp(x - m_safe), axis=axis, keepdims=True)
  return m_new, s_new


def lse_rows(tile, m, s):
  return _online_lse(tile.logits, tile.valid, m, s, axis=1)


def lse_cols(tile, m, s):
  return _online_lse(tile.logits, tile.valid, m, s, axis=0)


def sigmoid_rows(tile, acc):
  x = jnp.where(tile.pos, tile.logits, -tile.logits)  # z * logits
  term = jnp.maximum(-x, 0.0) + jnp.log1p(jnp.exp(-jnp.abs(x)))  # -log_sigmoid(x)
  return (acc + jnp.sum(jnp.where(tile.valid, term, 0.0), axis=1, keepdims=True),)


def _dlogits_lse(tile):
  """d(sum_i g_r_i lse_row_i + sum_j g_c_j lse_col_j) / d logits_ij (either side optional)."""
  dl = 0.0
  if tile.rows:
    lse_r, g_r = tile.rows
    dl = dl + g_r * jnp.exp(tile.logits - lse_r)
  if tile.cols:
    lse_c, g_c = tile.cols
    dl = dl + g_c * jnp.exp(tile.logits - lse_c)
  return jnp.where(tile.valid, dl, 0.0)


def _dlogits_sigmoid(tile):
  """d(g * sum_ij -log_sigmoid(z_ij logits_ij)) / d logits_ij = -g z sigmoid(-z logits)."""
  sig = lambda x: 1.0 / (1.0 + jnp.exp(-x))
  dl = tile.g * jnp.where(tile.pos, -sig(-tile.logits), sig(tile.logits))
  return jnp.where(tile.valid, dl, 0.0)


def _backward_rows(dlogits):
  def bwd_rows(tile, dzi, dt, db):
    dl = dlogits(tile)
    dzi = dzi + tile.similarity.grad_a(tile.zi, tile.zt, tile.t * dl)
    dt = dt + jnp.sum(dl * tile.s, axis=1, keepdims=True)
    db = db + jnp.sum(dl, axis=1, keepdims=True)
    return dzi, dt, db
  bwd_rows.__name__ = f"bwd_rows_{dlogits.__name__.split('_')[-1]}"
  return bwd_rows


def _backward_cols(dlogits):
  def bwd_cols(tile, dzt):
    return (dzt + tile.similarity.grad_b(tile.zi, tile.zt, tile.t * dlogits(tile)),)
  bwd_cols.__name__ = f"bwd_cols_{dlogits.__name__.split('_')[-1]}"
  return bwd_cols


_BWD = {
    "lse": (_backward_rows(_dlogits_lse), _backward_cols(_dlogits_lse)),
    "sigmoid": (_backward_rows(_dlogits_sigmoid), _backward_cols(_dlogits_sigmoid)),
}

# ----------------------------------------------------------------------------- mode "chunked"
# Plain XLA: a `lax.scan` over chunks of cfg.tile_rows rows of zi, each against all of zt, so
# a step's similarity is one large matmul (cuBLAS / the MXU at full size) and only O(chunk *
# n_cols) of the logits exist at a time. One sweep gives the row and the column statistics,
# and one backward sweep gives both gradients (dzt accumulates across chunks): the loss
# costs 4 matmuls of the B x B x d logits (forward, recompute, dzi, dzt) where XLA's dense
# loss costs 3 and the Pallas kernels 5 (the backward recomputes once per pass).


def _chunks(zi, vecs, cfg):
  """zi [n, d] and [n] row vectors -> ([k, c, d], [k, c] vectors, [k, c] row indices): zero
  rows pad n up to k whole chunks of c = min(tile_rows, n) rows."""
  n = zi.shape[0]
  c = min(cfg.tile_rows, n)
  k = -(-n // c)
  pad = lambda x: jnp.pad(x, ((0, k * c - n),) + ((0, 0),) * (x.ndim - 1))
  return (pad(zi).reshape(k, c, *zi.shape[1:]),
          [pad(v.astype(jnp.float32)).reshape(k, c) for v in vecs],
          jnp.arange(k * c).reshape(k, c))


def _chunk_tile(zc, zt, ids, params, row_vecs, col_vecs, n_rows, similarity):
  """A _Tile of one chunk of rows (with their indices `ids` [c]) against all of zt."""
  t, b, g, offset = params[0], params[1], params[2], params[3].astype(jnp.int32)
  s = similarity(zc, zt)
  cols = lax.broadcasted_iota(jnp.int32, (1, zt.shape[0]), 1)
  return _Tile(zi=zc, zt=zt, s=s, logits=t * s + b, t=t, g=g,
               valid=(ids < n_rows)[:, None], pos=cols == ids[:, None] + offset,
               rows=[v[:, None] for v in row_vecs], cols=[v[None, :] for v in col_vecs],
               similarity=similarity)


def _chunked_lse(zi, zt, params, rows, cols, similarity, cfg):
  n_rows, n_cols = zi.shape[0], zt.shape[0]
  chunks, _, ids = _chunks(zi, [], cfg)

  def step(carry, x):
    zc, ids_c = x
    tile = _chunk_tile(zc, zt, ids_c, params, [], [], n_rows, similarity)
    m_r, s_r = lse_rows(tile, jnp.full((zc.shape[0], 1), -jnp.inf), jnp.zeros((zc.shape[0], 1)))
    carry = lse_cols(tile, *carry) if cols else carry
    return carry, (m_r + jnp.log(s_r))[:, 0] if rows else None

  init = (jnp.full((1, n_cols), -jnp.inf), jnp.zeros((1, n_cols)))
  (m_c, s_c), lse_r = lax.scan(step, init, (chunks, ids))
  return (lse_r.reshape(-1)[:n_rows] if rows else None,
          (m_c + jnp.log(s_c))[0] if cols else None)


def _chunked_sigmoid_sum(zi, zt, params, similarity, cfg):
  chunks, _, ids = _chunks(zi, [], cfg)

  def step(total, x):
    zc, ids_c = x
    tile = _chunk_tile(zc, zt, ids_c, params, [], [], zi.shape[0], similarity)
    (acc,) = sigmoid_rows(tile, 0.0)
    return total + jnp.sum(acc), None

  return lax.scan(step, jnp.zeros((), jnp.float32), (chunks, ids))[0]


def _chunked_backward(kind, zi, zt, params, row_vecs, col_vecs, similarity, cfg, rows, cols,
                      dzi_acc, dzt_acc):
  n_rows = zi.shape[0]
  dlogits = _dlogits_lse if kind == "lse" else _dlogits_sigmoid
  chunks, row_chunks, ids = _chunks(zi, row_vecs, cfg)

  def step(carry, x):
    zc, ids_c, rv = x
    dzt, dt, db = carry
    tile = _chunk_tile(zc, zt, ids_c, params, rv, col_vecs, n_rows, similarity)
    dl = dlogits(tile)
    ds = tile.t * dl
    if cols:
      dzt = dzt + similarity.grad_b(zc, zt, ds)
    dt, db = dt + jnp.sum(dl * tile.s), db + jnp.sum(dl)
    return (dzt, dt, db), similarity.grad_a(zc, zt, ds) if rows else None

  dzt0 = (jnp.zeros(zt.shape, jnp.float32) if dzt_acc is None
          else dzt_acc.astype(jnp.float32)) if cols else 0.0
  zero = jnp.zeros((), jnp.float32)
  (dzt, dt, db), dzi = lax.scan(step, (dzt0, zero, zero), (chunks, ids, row_chunks))
  if rows:
    dzi = dzi.reshape(-1, zi.shape[1])[:n_rows]
    dzi = dzi if dzi_acc is None else dzi + dzi_acc.astype(jnp.float32)
  return (dzi if rows else None, dzt if cols else None,
          dt if rows else None, db if rows else None)


# ----------------------------------------------------------------------------- raw fwd / bwd


def _check_shapes(zi, zt):
  if zi.ndim != 2 or zt.ndim != 2 or zi.shape[1] != zt.shape[1]:
    raise ValueError(f"Expected zi [bi, d] and zt [bt, d]; got {zi.shape} and {zt.shape}.")


def _prepare(zi, zt, cfg):
  d = _features(zi.shape[1], cfg)
  return (_pad_to(zi, _round_up(zi.shape[0], cfg.tile_rows), d),
          _pad_to(zt, _round_up(zt.shape[0], cfg.tile_cols), d))


def _params(t, b, g=0.0, offset=0.0):
  return jnp.stack([jnp.asarray(x, jnp.float32).reshape(()) for x in (t, b, g, offset)])


def _row_vec(x, m):  # [n] -> [m, 1], zero padded
  return jnp.pad(x.astype(jnp.float32), (0, m - x.shape[0]))[:, None]


def _col_vec(x, m):  # [n] -> [1, m]
  return jnp.pad(x.astype(jnp.float32), (0, m - x.shape[0]))[None, :]


def _config(config, z):
  return config if config is not None else kernel_config(dim=z.shape[-1], dtype=z.dtype)


def lse_fwd(zi, zt, t, b, *, rows=True, cols=True, similarity=DOT_PRODUCT, config=None):
  """Per-row and per-column log-sum-exp of logits = t*sim(zi, zt) + b: ([bi], [bt]) float32.

  rows / cols = False skips that pass (its entry is then None).
  """
  cfg = _config(config, zi)
  _check_shapes(zi, zt)
  if cfg.mode == "chunked":
    return _chunked_lse(zi, zt, _params(t, b), rows, cols, similarity, cfg)
  n_rows, n_cols = zi.shape[0], zt.shape[0]
  zi_p, zt_p = _prepare(zi, zt, cfg)
  kw = dict(params=_params(t, b), zi=zi_p, zt=zt_p, row_vecs=[], col_vecs=[],
            n_rows=n_rows, n_cols=n_cols, similarity=similarity, cfg=cfg)
  lse_r = lse_c = None
  if rows:
    m, s = _tiled_pass(lse_rows, (-jnp.inf, 0.0), [(zi_p.shape[0], 1)] * 2, over="rows", **kw)
    lse_r = (m + jnp.log(s))[:n_rows, 0]
  if cols:
    m, s = _tiled_pass(lse_cols, (-jnp.inf, 0.0), [(1, zt_p.shape[0])] * 2, over="cols", **kw)
    lse_c = (m + jnp.log(s))[0, :n_cols]
  return lse_r, lse_c


def _backward(kind, zi, zt, params, row_vecs, col_vecs, similarity, cfg, rows, cols,
              dzi_acc=None, dzt_acc=None):
  _check_shapes(zi, zt)
  if cfg.mode == "chunked":
    return _chunked_backward(kind, zi, zt, params, row_vecs, col_vecs, similarity, cfg, rows,
                             cols, dzi_acc, dzt_acc)
  n_rows, n_cols = zi.shape[0], zt.shape[0]
  zi_p, zt_p = _prepare(zi, zt, cfg)
  mi, mt, d = zi_p.shape[0], zt_p.shape[0], zi_p.shape[1]
  kw = dict(params=params, zi=zi_p, zt=zt_p,
            row_vecs=[_row_vec(v, mi) for v in row_vecs],
            col_vecs=[_col_vec(v, mt) for v in col_vecs],
            n_rows=n_rows, n_cols=n_cols, similarity=similarity, cfg=cfg)
  bwd_rows, bwd_cols = _BWD[kind]
  d_in = zi.shape[1]
  dzi = dzt = dt = db = None
  # A given accumulator is padded (a no-op when the block fits the tiles) and added to in place.
  acc = lambda x, m: 0.0 if x is None else _pad_to(x.astype(jnp.float32), m, d)
  if rows:
    dzi, dt, db = _tiled_pass(bwd_rows, (acc(dzi_acc, mi), 0.0, 0.0),
                              [(mi, d), (mi, 1), (mi, 1)], over="rows", **kw)
    dzi, dt, db = dzi[:n_rows, :d_in], jnp.sum(dt), jnp.sum(db)
  if cols:
    (dzt,) = _tiled_pass(bwd_cols, (acc(dzt_acc, mt),), [(mt, d)], over="cols", **kw)
    dzt = dzt[:n_cols, :d_in]
  return dzi, dzt, dt, db


def lse_bwd(zi, zt, t, b, lse_r, lse_c, g_r, g_c, *, rows=True, cols=True, dzi_acc=None,
            dzt_acc=None, similarity=DOT_PRODUCT, config=None):
  """Grads of sum(g_r * lse_r) + sum(g_c * lse_c) given the *final* lse vectors.

  lse_r / lse_c may cover more than this block (a ring's running totals): the tile gradient
  is then this block's share. A side whose (lse, g) are None is left out.
  Returns float32 (dzi [bi, d], dzt [bt, d], dt, db); rows=False skips the pass over row
  tiles (dzi, dt, db are None), cols=False the pass over column tiles (dzt is None).
  dzi_acc / dzt_acc: float32 gradients to add this block's to, in place (a ring's running
  accumulators), so no separate block gradient is allocated.
  """
  cfg = _config(config, zi)
  row_vecs = [] if lse_r is None else [lse_r, g_r]
  col_vecs = [] if lse_c is None else [lse_c, g_c]
  return _backward("lse", zi, zt, _params(t, b), row_vecs, col_vecs, similarity, cfg,
                   rows, cols, dzi_acc, dzt_acc)


def _offset(pos_offset, n_cols):
  # A block without positives: an offset that puts them all beyond the last column.
  return n_cols if pos_offset is None else pos_offset


def sigmoid_sum_fwd(zi, zt, t, b, pos_offset=None, *, similarity=DOT_PRODUCT, config=None):
  """sum_ij -log_sigmoid(z_ij * logits_ij), z = +1 iff j == i + pos_offset; float32 scalar."""
  cfg = _config(config, zi)
  _check_shapes(zi, zt)
  params = _params(t, b, 0.0, _offset(pos_offset, zt.shape[0]))
  if cfg.mode == "chunked":
    return _chunked_sigmoid_sum(zi, zt, params, similarity, cfg)
  n_rows, n_cols = zi.shape[0], zt.shape[0]
  zi_p, zt_p = _prepare(zi, zt, cfg)
  (rows,) = _tiled_pass(
      sigmoid_rows, (0.0,), [(zi_p.shape[0], 1)], over="rows",
      params=params, zi=zi_p, zt=zt_p, row_vecs=[],
      col_vecs=[], n_rows=n_rows, n_cols=n_cols, similarity=similarity, cfg=cfg)
  return jnp.sum(rows)


def sigmoid_sum_bwd(zi, zt, t, b, pos_offset, g, *, rows=True, cols=True, dzi_acc=None,
                    dzt_acc=None, similarity=DOT_PRODUCT, config=None):
  """Grads of g * sigmoid_sum_fwd(...): float32 (dzi, dzt, dt, db); keywords as lse_bwd."""
  cfg = _config(config, zi)
  params = _params(t, b, g, _offset(pos_offset, zt.shape[0]))
  return _backward("sigmoid", zi, zt, params, [], [], similarity, cfg, rows, cols,
                   dzi_acc, dzt_acc)


# ----------------------------------------------------------------------------- custom_vjp blocks


def _scalar_f32(x):
  return jnp.asarray(x, jnp.float32).reshape(())


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _block_lse(zi, zt, t, b, similarity, cfg):
  return lse_fwd(zi, zt, t, b, similarity=similarity, config=cfg)


def _block_lse_fwd(zi, zt, t, b, similarity, cfg):
  lse_r, lse_c = lse_fwd(zi, zt, t, b, similarity=similarity, config=cfg)
  return (lse_r, lse_c), (zi, zt, t, b, lse_r, lse_c)


def _block_lse_bwd(similarity, cfg, res, cts):
  zi, zt, t, b, lse_r, lse_c = res
  g_r, g_c = cts
  dzi, dzt, dt, db = lse_bwd(zi, zt, t, b, lse_r, lse_c, g_r, g_c,
                             similarity=similarity, config=cfg)
  return dzi.astype(zi.dtype), dzt.astype(zt.dtype), dt, db


_block_lse.defvjp(_block_lse_fwd, _block_lse_bwd)


def block_lse(zi, zt, t, b, *, similarity=DOT_PRODUCT, config=None):
  """Differentiable (lse_rows [bi], lse_cols [bt]) of logits = t*sim(zi, zt) + b."""
  return _block_lse(zi, zt, _scalar_f32(t), _scalar_f32(b), similarity, _config(config, zi))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _block_sigmoid(zi, zt, t, b, offset, similarity, cfg):
  return sigmoid_sum_fwd(zi, zt, t, b, offset, similarity=similarity, config=cfg)


def _block_sigmoid_fwd(zi, zt, t, b, offset, similarity, cfg):
  out = sigmoid_sum_fwd(zi, zt, t, b, offset, similarity=similarity, config=cfg)
  return out, (zi, zt, t, b, offset)


def _block_sigmoid_bwd(similarity, cfg, res, g):
  zi, zt, t, b, offset = res
  dzi, dzt, dt, db = sigmoid_sum_bwd(zi, zt, t, b, offset, g,
                                     similarity=similarity, config=cfg)
  return dzi.astype(zi.dtype), dzt.astype(zt.dtype), dt, db, jnp.zeros_like(offset)


_block_sigmoid.defvjp(_block_sigmoid_fwd, _block_sigmoid_bwd)


def block_sigmoid_sum(zi, zt, t, b, pos_offset=None, *, similarity=DOT_PRODUCT, config=None):
  """Differentiable sum_ij -log_sigmoid(z_ij * logits_ij); z = +1 iff j == i + pos_offset.

  pos_offset: 0 for a diagonal block, None for a block without positives, or a (traced)
  integer, e.g. the column where this device's rows start in an all-gathered b x B slab.
  """
  offset = _scalar_f32(_offset(pos_offset, zt.shape[0]))
  return _block_sigmoid(zi, zt, _scalar_f32(t), _scalar_f32(b), offset, similarity,
                        _config(config, zi))


# ----------------------------------------------------------------------------- full-batch losses


def sigmoid_loss_fused(zimg, ztxt, t, b, *, similarity=DOT_PRODUCT, config=None):
  """SigLIP loss (equals losses.sigmoid_loss) without materialising the B x B logits."""
  total = block_sigmoid_sum(zimg, ztxt, t, b, 0, similarity=similarity, config=config)
  return total / zimg.shape[0]


def softmax_loss_fused(zimg, ztxt, t, b=None, *, similarity=DOT_PRODUCT, config=None):
  """CLIP loss (equals losses.softmax_loss) without materialising the B x B logits."""
  b = 0.0 if b is None else b
  lse_r, lse_c = block_lse(zimg, ztxt, t, b, similarity=similarity, config=config)
  pos = _scalar_f32(t) * similarity.diagonal(zimg, ztxt) + _scalar_f32(b)
  return 0.5 * (jnp.mean(lse_r) + jnp.mean(lse_c)) - jnp.mean(pos)


# ----------------------------------------------------------------------------- jnp references


def block_lse_reference(zi, zt, t, b):
  """Plain-jnp block_lse (materialises the block's logits)."""
  logits = _scalar_f32(t) * (zi.astype(jnp.float32) @ zt.astype(jnp.float32).T) + _scalar_f32(b)
  return jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0)


def block_sigmoid_sum_reference(zi, zt, t, b, pos_offset=None):
  """Plain-jnp block_sigmoid_sum (materialises the block's logits)."""
  logits = _scalar_f32(t) * (zi.astype(jnp.float32) @ zt.astype(jnp.float32).T) + _scalar_f32(b)
  offset = _offset(pos_offset, zt.shape[0])
  pos = jnp.arange(zt.shape[0])[None, :] == jnp.arange(zi.shape[0])[:, None] + offset
  return -jnp.sum(jax.nn.log_sigmoid(jnp.where(pos, logits, -logits)))
