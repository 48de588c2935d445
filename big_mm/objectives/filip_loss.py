"""FILIP contrastive losses (token-wise late interaction) over a globally sharded batch.

  filip_loss(ximg, xtxt, t, b, *, tokens, dim, loss, strategy, mesh=None,
             batch_axes=("data", "fsdp"), implementation="xla", kernel_config=None)
  filip_loss_reference(ximg, xtxt, t, b, *, tokens, dim, loss)   single device, plain jnp

ximg [B, Li * d] and xtxt [B, Lt * d] are the flattened, L2-normalised token features, padding
tokens zeroed (big_mm/kernels/filip.py: flatten_tokens); tokens = (Li, Lt). With
s_I = sim(reduce="a") (image->text: mean over patches of the max over the caption's tokens)
and s_T = sim(reduce="b") (text->image: mean over the caption's tokens of the max over
patches), logits = t * s + b:
  softmax (the paper): 0.5 * (CE over each image's row of t*s_I+b + CE over each caption's
           column of t*s_T+b), the positives on the diagonal;
  sigmoid: SigLIP's loss on s = (s_I + s_T) / 2.

"local" with "xla" is the reference itself (the batch's token cosines computed once, autodiff).
Every other strategy and implementation is one `jax.custom_vjp` around a forward and a
hand-written backward (the same algorithm as losses.py's pallas path, with two similarities: the row
log-sum-exps use s_I, the column ones s_T). Per block the work is done by `_Ops`:
  implementation "pallas": the fused kernels (big_mm/kernels/contrastive.py) with
      TokenwiseMax tiles: no token-pair tensor beyond one tile;
  implementation "xla": plain jnp on the block: its [rows, cols, Li, Lt] token cosines are
      materialised (and recomputed in the backward).
Strategies:
  "local"       the whole batch is one block (no collectives; xla: the reference);
  "all_gather"  each device gathers the other side's tokens: a b x B block per direction;
  "ring"        the text (then, in the backward, image) shards travel with ppermute, one
                b x b block per step; the forward keeps only O(b) log-sum-exps and the
                backward runs the ring again, so per-device memory is O(b * L * d + one block)
                whatever the global batch (docs/benchmarks.md measures it).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from big_mm.kernels import contrastive as kernels
from big_mm.kernels import filip as filip_kernels
from big_mm.objectives import losses

LOSSES = ("sigmoid", "softmax")
STRATEGIES = ("local", "all_gather", "ring")
IMPLEMENTATIONS = ("xla", "pallas")


def _scalars(t, b):
  return (jnp.asarray(t, jnp.float32).reshape(()),
          jnp.asarray(0.0 if b is None else b, jnp.float32).reshape(()))


def _sigmoid_sum(logits, offset):
  """sum_ij -log_sigmoid(z_ij * logits_ij), z = +1 iff j == i + offset (None: no positives)."""
  rows, cols = logits.shape
  pos = (jnp.arange(cols)[None, :] == jnp.arange(rows)[:, None] + offset if offset is not None
         else jnp.zeros(logits.shape, bool))
  return -jnp.sum(jax.nn.log_sigmoid(jnp.where(pos, logits, -logits)))


def filip_loss_reference(ximg, xtxt, t, b, *, tokens, dim, loss):
  """The loss of the whole batch, every token pair materialised ([B, B, Li, Lt])."""
  t, b = _scalars(t, b)
  s_i = filip_kernels.similarities_reference(ximg, xtxt, *tokens, dim, reduce="a")
  s_t = filip_kernels.similarities_reference(ximg, xtxt, *tokens, dim, reduce="b")
  if loss == "sigmoid":
    return _sigmoid_sum(t * 0.5 * (s_i + s_t) + b, 0) / ximg.shape[0]
  li, lt = t * s_i + b, t * s_t + b
  i2t = jnp.mean(jax.nn.logsumexp(li, axis=1) - jnp.diagonal(li))
  t2i = jnp.mean(jax.nn.logsumexp(lt, axis=0) - jnp.diagonal(lt))
  return 0.5 * (i2t + t2i)


# ----------------------------------------------------------------------------- block ops


class _Ops:
  """One block's forward / backward pieces (zi [bi, Li*d] against zt [bt, Lt*d]): the row
  log-sum-exps of t*s_I+b, the column ones of t*s_T+b, the sigmoid sum of t*s+b, and their
  gradients given the final log-sum-exps (the kernels' lse_bwd / sigmoid_sum_bwd contract:
  rows=False skips dzi, dt, db; cols=False skips dzt; *_acc are added to)."""

  def __init__(self, tokens, dim, implementation, cfg):
    self.sim_i = filip_kernels.TokenwiseMax(*tokens, dim, "a")
    self.sim_t = filip_kernels.TokenwiseMax(*tokens, dim, "b")
    self.sim_s = filip_kernels.TokenwiseMax(*tokens, dim, "both")
    self.pallas = implementation == "pallas"
    self.cfg = cfg if cfg is not None or not self.pallas else filip_kernels.kernel_config(
        *tokens)

  def positives(self, zi, zt, t, b):
    """[n] the softmax positives of both directions, summed: (t*s_I_ii + b) + (t*s_T_ii + b)."""
    return t * (self.sim_i.diagonal(zi, zt) + self.sim_t.diagonal(zi, zt)) + 2.0 * b

  def lse_rows(self, zi, zt, t, b):
    if self.pallas:
      return kernels.lse_fwd(zi, zt, t, b, cols=False, similarity=self.sim_i, config=self.cfg)[0]
    return jax.nn.logsumexp(t * self.sim_i(zi, zt) + b, axis=1)

  def lse_cols(self, zi, zt, t, b):
    if self.pallas:
      return kernels.lse_fwd(zi, zt, t, b, rows=False, similarity=self.sim_t, config=self.cfg)[1]
    return jax.nn.logsumexp(t * self.sim_t(zi, zt) + b, axis=0)

  def sigmoid_sum(self, zi, zt, t, b, offset):
    if self.pallas:
      return kernels.sigmoid_sum_fwd(zi, zt, t, b, offset, similarity=self.sim_s, config=self.cfg)
    return _sigmoid_sum(t * self.sim_s(zi, zt) + b, offset)

  def _xla_grads(self, fn, zi, zt, t, b, rows, cols, dzi_acc, dzt_acc):
    dzi, dzt, dt, db = jax.grad(fn, argnums=(0, 1, 2, 3))(zi, zt, t, b)
    add = lambda acc, g: g if acc is None else acc + g
    return (add(dzi_acc, dzi) if rows else None, add(dzt_acc, dzt) if cols else None,
            dt if rows else None, db if rows else None)

  def lse_bwd(self, zi, zt, t, b, lse_r, lse_c, g_r, g_c, *, rows=True, cols=True,
              dzi_acc=None, dzt_acc=None):
    """Grads of sum(g_r * lse_r) (s_I rows) + sum(g_c * lse_c) (s_T columns), either side
    optional, given their final values."""
    dt = db = None
    for lse, g, sim, axis in ((lse_r, g_r, self.sim_i, 1), (lse_c, g_c, self.sim_t, 0)):
      if lse is None:
        continue
      if self.pallas:
        vecs = (lse, None, g, None) if axis == 1 else (None, lse, None, g)
        grads = kernels.lse_bwd(zi, zt, t, b, *vecs, rows=rows, cols=cols, dzi_acc=dzi_acc,
                                dzt_acc=dzt_acc, similarity=sim, config=self.cfg)
      else:
        expand = (lambda v: v[:, None]) if axis == 1 else (lambda v: v[None, :])

        def block(zi, zt, t, b, sim=sim, lse=lse, g=g, expand=expand):
          logits = t * sim(zi, zt) + b  # d/dlogits of g * lse_final: g * softmax
          weights = jax.lax.stop_gradient(expand(g) * jnp.exp(logits - expand(lse)))
          return jnp.sum(weights * logits)
        grads = self._xla_grads(block, zi, zt, t, b, rows, cols, dzi_acc, dzt_acc)
      dzi_acc, dzt_acc = grads[0], grads[1]
      dt = grads[2] if dt is None else dt + grads[2]
      db = grads[3] if db is None else db + grads[3]
    return dzi_acc, dzt_acc, dt, db

  def sigmoid_bwd(self, zi, zt, t, b, offset, g, *, rows=True, cols=True, dzi_acc=None,
                  dzt_acc=None):
    if self.pallas:
      return kernels.sigmoid_sum_bwd(zi, zt, t, b, offset, g, rows=rows, cols=cols,
                                     dzi_acc=dzi_acc, dzt_acc=dzt_acc, similarity=self.sim_s,
                                     config=self.cfg)
    block = lambda zi, zt, t, b: g * _sigmoid_sum(t * self.sim_s(zi, zt) + b, offset)
    return self._xla_grads(block, zi, zt, t, b, rows, cols, dzi_acc, dzt_acc)


# ----------------------------------------------------------------------------- per device
# fwd(zimg, ztxt, t, b) -> (loss, residuals) and bwd(zimg, ztxt, t, b, residuals, g) ->
# (dzimg, dztxt, dt, db) on one device's shard; axes=() is the whole batch on one device.


def _psum(x, axes):
  return jax.lax.psum(x, axes) if axes else x


def _gather(x, axes):
  return jax.lax.all_gather(x, axes, axis=0, tiled=True) if axes else x


def _scatter(x, axes):
  return jax.lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True) if axes else x


def _first_row(zimg, axes):  # the global index of this device's first row
  return jax.lax.axis_index(axes) * zimg.shape[0] if axes else 0


def _pos_grads(ops, zimg, ztxt, t, b, scale):
  return jax.grad(lambda *a: scale * jnp.sum(ops.positives(*a)), argnums=(0, 1, 2, 3))(
      zimg, ztxt, t, b)


def _add(*grads):
  return tuple(sum(g) for g in zip(*grads))


def _gather_fwd(zimg, ztxt, t, b, *, kind, ops, axes, n_global):
  if kind == "sigmoid":
    local = ops.sigmoid_sum(zimg, _gather(ztxt, axes), t, b, _first_row(zimg, axes))
    return _psum(local, axes) / n_global, ()
  # Row lse (s_I) of the local images vs all texts; column lse (s_T) of all images vs the
  # local texts.
  lse_img = ops.lse_rows(zimg, _gather(ztxt, axes), t, b)
  lse_txt = ops.lse_cols(_gather(zimg, axes), ztxt, t, b)
  local = jnp.sum(lse_img) + jnp.sum(lse_txt) - jnp.sum(ops.positives(zimg, ztxt, t, b))
  return _psum(local, axes) / (2.0 * n_global), (lse_img, lse_txt)


def _gather_bwd(zimg, ztxt, t, b, res, g, *, kind, ops, axes, n_global):
  zimg_all, ztxt_all = _gather(zimg, axes), _gather(ztxt, axes)
  if kind == "sigmoid":
    dzi, dzt_all, dt, db = ops.sigmoid_bwd(zimg, ztxt_all, t, b, _first_row(zimg, axes),
                                           g / n_global)
    return dzi, _scatter(dzt_all, axes), _psum(dt, axes), _psum(db, axes)
  lse_img, lse_txt = res
  gl = g / (2.0 * n_global)
  filled = lambda v: jnp.full(v.shape, gl, jnp.float32)
  dzi, dzt_all, dt_i, db_i = ops.lse_bwd(zimg, ztxt_all, t, b, lse_img, None, filled(lse_img),
                                         None)
  dzi_all, dzt, dt_t, db_t = ops.lse_bwd(zimg_all, ztxt, t, b, None, lse_txt, None,
                                         filled(lse_txt))
  grads = (dzi + _scatter(dzi_all, axes), dzt + _scatter(dzt_all, axes), dt_i + dt_t,
           db_i + db_t)
  dzi, dzt, dt, db = _add(grads, _pos_grads(ops, zimg, ztxt, t, b, -gl))
  return dzi, dzt, _psum(dt, axes), _psum(db, axes)


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _ring_fwd(zimg, ztxt, t, b, *, kind, ops, axes, n_global, n_dev):
  perm = _ring_perm(n_dev)
  if kind == "sigmoid":
    total = ops.sigmoid_sum(zimg, ztxt, t, b, 0)  # the positives' block

    def body(carry, _):
      zt, total = carry
      zt = jax.lax.ppermute(zt, axes, perm)
      return (zt, total + ops.sigmoid_sum(zimg, zt, t, b, None)), None

    (_, total), _ = jax.lax.scan(body, (ztxt, total), None, length=n_dev - 1)
    return jax.lax.psum(total, axes) / n_global, ()

  lse_img, lse_txt = ops.lse_rows(zimg, ztxt, t, b), ops.lse_cols(zimg, ztxt, t, b)

  def body(carry, _):
    zt, lse_img, lse_txt = carry
    # The text shard travels with its own running column log-sum-exp (text->image).
    zt, lse_txt = jax.lax.ppermute((zt, lse_txt), axes, perm)
    lse_img = jnp.logaddexp(lse_img, ops.lse_rows(zimg, zt, t, b))
    lse_txt = jnp.logaddexp(lse_txt, ops.lse_cols(zimg, zt, t, b))
    return (zt, lse_img, lse_txt), None

  (_, lse_img, lse_txt), _ = jax.lax.scan(body, (ztxt, lse_img, lse_txt), None,
                                          length=n_dev - 1)
  lse_txt = jax.lax.ppermute(lse_txt, axes, perm)  # one more hop: back to its home device
  local = jnp.sum(lse_img) + jnp.sum(lse_txt) - jnp.sum(ops.positives(zimg, ztxt, t, b))
  return jax.lax.psum(local, axes) / (2.0 * n_global), (lse_img, lse_txt)


def _ring_bwd(zimg, ztxt, t, b, res, g, *, kind, ops, axes, n_global, n_dev):
  """The ring run twice more (as losses._pallas_ring_bwd): the text shards travel with their
  final lse, giving the image rows' gradient, dt and db; then the image shards travel with
  theirs, giving the text rows' gradient. Live: the local shards, one travelling shard and
  the accumulators."""
  perm = _ring_perm(n_dev)
  gl = g / (2.0 * n_global) if kind == "softmax" else g / n_global
  if kind == "softmax":
    lse_img, lse_txt = res
    g_img = jnp.full(lse_img.shape, gl, jnp.float32)
    g_txt = jnp.full(lse_txt.shape, gl, jnp.float32)

  def image_rows(zt, lse_t, pos_offset, dzi):
    if kind == "sigmoid":
      dzi, _, dt, db = ops.sigmoid_bwd(zimg, zt, t, b, pos_offset, gl, cols=False, dzi_acc=dzi)
    else:
      dzi, _, dt, db = ops.lse_bwd(zimg, zt, t, b, lse_img, lse_t, g_img, g_txt, cols=False,
                                   dzi_acc=dzi)
    return dzi, dt, db

  def text_rows(zi, lse_i, pos_offset, dzt):
    if kind == "sigmoid":
      return ops.sigmoid_bwd(zi, ztxt, t, b, pos_offset, gl, rows=False, dzt_acc=dzt)[1]
    return ops.lse_bwd(zi, ztxt, t, b, lse_i, lse_txt, g_img, g_txt, rows=False,
                       dzt_acc=dzt)[1]

  lse_t0 = lse_txt if kind == "softmax" else jnp.zeros(ztxt.shape[:1], jnp.float32)
  lse_i0 = lse_img if kind == "softmax" else jnp.zeros(zimg.shape[:1], jnp.float32)
  dzi, dt, db = image_rows(ztxt, lse_t0, 0, None)

  def text_travels(carry, _):
    zt, lse_t, dzi, dt, db = carry
    zt, lse_t = jax.lax.ppermute((zt, lse_t), axes, perm)
    dzi, ddt, ddb = image_rows(zt, lse_t, None, dzi)
    return (zt, lse_t, dzi, dt + ddt, db + ddb), None

  def image_travels(carry, _):
    zi, lse_i, dzt = carry
    zi, lse_i = jax.lax.ppermute((zi, lse_i), axes, perm)
    return (zi, lse_i, text_rows(zi, lse_i, None, dzt)), None

  (_, _, dzi, dt, db), _ = jax.lax.scan(text_travels, (ztxt, lse_t0, dzi, dt, db), None,
                                        length=n_dev - 1)
  dzt = text_rows(zimg, lse_i0, 0, None)
  (_, _, dzt), _ = jax.lax.scan(image_travels, (zimg, lse_i0, dzt), None, length=n_dev - 1)
  grads = (dzi, dzt, dt, db)
  if kind == "softmax":
    grads = _add(grads, _pos_grads(ops, zimg, ztxt, t, b, -gl))
  dzi, dzt, dt, db = grads
  return dzi, dzt, jax.lax.psum(dt, axes), jax.lax.psum(db, axes)


# ----------------------------------------------------------------------------- public entry


def filip_loss(ximg, xtxt, t, b, *, tokens: tuple[int, int], dim: int, loss: str,
               strategy: str, mesh=None, batch_axes: Sequence[str] | str = ("data", "fsdp"),
               implementation: str = "xla", kernel_config=None):
  """FILIP loss over the global batch; equals filip_loss_reference (value and grads).

  ximg [B, Li * d], xtxt [B, Lt * d]: flattened token features (padding zero), batch dim
  sharded over `batch_axes` of `mesh`; tokens = (Li, Lt); dim = d. t: exp'd temperature;
  b: bias (None: 0, softmax only). kernel_config: a KernelConfig for "pallas" (default:
  big_mm.kernels.filip.kernel_config). Returns a replicated float32 scalar.
  """
  if loss not in LOSSES or strategy not in STRATEGIES or implementation not in IMPLEMENTATIONS:
    raise ValueError(f"FILIP loss={loss!r}, strategy={strategy!r}, implementation="
                     f"{implementation!r}; valid: {LOSSES}, {STRATEGIES}, {IMPLEMENTATIONS}.")
  if b is None and loss == "sigmoid":
    raise ValueError("sigmoid loss requires a bias b")
  tokens = tuple(int(n) for n in tokens)
  for x, n, what in ((ximg, tokens[0], "ximg"), (xtxt, tokens[1], "xtxt")):
    if x.ndim != 2 or x.shape[1] != n * dim:
      raise ValueError(f"{what} must be [B, {n} tokens x {dim}] = [B, {n * dim}] flattened "
                       f"token features; got shape {x.shape}.")
  if ximg.shape[0] != xtxt.shape[0]:
    raise ValueError(f"ximg / xtxt batch mismatch: {ximg.shape} vs {xtxt.shape}")
  t, b = _scalars(t, b)
  n_global = ximg.shape[0]
  axes = losses.batch_axes_of(mesh, batch_axes)
  n_dev = 1
  for a in axes if mesh is not None else ():
    n_dev *= mesh.shape[a]
  if strategy == "local" or mesh is None or not axes or n_dev == 1:
    if implementation == "xla":  # one block: the token cosines once, autodiff
      return filip_loss_reference(ximg, xtxt, t, b, tokens=tokens, dim=dim, loss=loss)
    axes, strategy = (), "local"
  elif n_global % n_dev:
    raise ValueError(f"global batch {n_global} not divisible by {n_dev} devices on {axes}")
  ximg, xtxt = filip_kernels.same_width(ximg, xtxt)  # the kernels' one feature width
  if implementation == "xla":
    ximg, xtxt = ximg.astype(jnp.float32), xtxt.astype(jnp.float32)
  kind = loss
  ops = _Ops(tokens, dim, implementation, kernel_config)
  kw = dict(kind=kind, ops=ops, axes=axes, n_global=n_global)
  if strategy == "ring":
    fwd_local = functools.partial(_ring_fwd, n_dev=n_dev, **kw)
    bwd_local = functools.partial(_ring_bwd, n_dev=n_dev, **kw)
  else:
    fwd_local = functools.partial(_gather_fwd, **kw)
    bwd_local = functools.partial(_gather_bwd, **kw)
  if axes:
    spec = P(axes)
    res_specs = () if kind == "sigmoid" else (spec, spec)
    smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
    fwd_local = smap(fwd_local, in_specs=(spec, spec, P(), P()), out_specs=(P(), res_specs))
    bwd_local = smap(bwd_local, in_specs=(spec, spec, P(), P(), res_specs, P()),
                     out_specs=(spec, spec, P(), P()))

  @jax.custom_vjp
  def value(ximg, xtxt, t, b):
    return fwd_local(ximg, xtxt, t, b)[0]

  def fwd(ximg, xtxt, t, b):
    out, res = fwd_local(ximg, xtxt, t, b)
    return out, (ximg, xtxt, t, b, res)

  def bwd(saved, g):
    ximg, xtxt, t, b, res = saved
    dzi, dzt, dt, db = bwd_local(ximg, xtxt, t, b, res, g)
    return dzi.astype(ximg.dtype), dzt.astype(xtxt.dtype), dt, db

  value.defvjp(fwd, bwd)
  return value(ximg, xtxt, t, b)
