"""Contrastive losses (SigLIP sigmoid / CLIP softmax) over a globally sharded batch.

Public API:
  sigmoid_loss(zimg, ztxt, t, b, valid=None)     single-device full-batch reference (SigLIP)
  softmax_loss(zimg, ztxt, t, b=None, valid=None)  single-device full-batch reference (CLIP)
  contrastive_loss(zimg, ztxt, t, b, *, loss, strategy, mesh=None, batch_axes=("data", "fsdp"),
                   implementation="xla", kernel_config=None, valid=None)
  batch_axes_of(mesh, batch_axes)           batch axes present in `mesh` (in the given order)
  sigmoid_loss_multi(zimg, ztxt, t, b)      multi-positive references: ztxt [B, k, D] holds k
  softmax_loss_multi(zimg, ztxt, t, b=None)   captions per image, each a positive of its image
                                            (contrastive_loss routes a [B, k, D] ztxt to them)

`t` is the already exponentiated temperature (scalar), `b` the bias (scalar). Inputs are
[B, D] embeddings (L2-normalised by the model); everything is computed (xla) or accumulated
(pallas, which takes bf16 embeddings as they are) in float32.

Presence mask `valid` (bool / int / float [B], nonzero = present; the global batch, sharded
like the embeddings): pair i is present in both towers or it is dropped. Absent rows and
columns contribute nothing; n_valid = the number of present pairs.
  sigmoid  sum over present (i, j) of -log sigmoid(z_ij (t x_i.y_j + b)) / max(n_valid, 1)
           (all present: big_vision's sum / B, i.e. valid=None's value)
  softmax  0.5 * (image->text + text->image), each the mean over present rows of
           lse over present columns - the positive; absent columns are replaced by a large
           finite negative logit (never -inf), so nothing is NaN.
  n_valid = 0 gives loss 0 with zero (finite) gradients. Every strategy takes it with
  implementation="xla"; the fused kernels and the multi-positive path take none. valid=None
  runs the unmasked code unchanged.

Strategies for the global batch (batch dim sharded over `batch_axes` of `mesh`):
  "local"      the reference on the global arrays; XLA/GSPMD inserts the collectives.
  "all_gather" under `jax.shard_map`: every device gathers the other tower's embeddings and
               computes its b x B logit slab(s); the row terms are psum'd and normalised.
  "ring"       under `jax.shard_map`: text embeddings travel around the ring with `ppermute`,
               one b x b block per step inside a `lax.scan` whose block computation is under
               `jax.checkpoint`, so only O(b*d) carries are saved for the backward pass.
               Softmax keeps a running log-sum-exp per local image row (image->text) and a
               running log-sum-exp per text row that travels with the text shard (text->image).

Implementations (`implementation=`):
  "xla"     the jnp code above; the logits of a block (b x b ring, b x B all_gather, B x B
            local) are materialised.
  "pallas"  the fused kernels of big_mm/kernels/contrastive.py, which walk the logits tile by
            tile and never materialise them (interpret mode on CPU). "local" runs the fused
            full-batch loss (its blocks are custom_vjp'd). The sharded strategies are one
            `jax.custom_vjp` around a forward and a hand-written backward shard_map (with
            check_vma=False, which Pallas interpret mode needs; nothing is differentiated
            through them): "all_gather" runs the fused block on the b x B slab(s) and
            psum_scatters the gathered side's gradient; "ring" runs the fused blocks at each
            ring step, and its backward runs the ring twice more (text shards with their final
            lse travel, giving the image gradients, then image shards with theirs, giving the
            text gradients) instead of saving every step's text shard, so per-device memory
            is O(b*d + tile^2) whatever the global batch.
            `kernel_config` (a big_mm.kernels.contrastive.KernelConfig) overrides the
            per-backend tile sizes.
  "chunked" the same blocks and strategies as "pallas", in plain XLA (the kernels' mode
            "chunked"): a scan over chunks of rows, each against all columns of the block
            as one large matmul, so O(chunk * columns) of the logits exist at a time. For
            GPUs, where the Pallas (Triton) kernels lose to XLA's matmuls; `kernel_config`'s
            tile_rows is the chunk (default kernels.CHUNK_ROWS, or the autotuner's table).
  With kernel_config=None both take `kernels.kernel_config` for the running backend, the
  embeddings' dim and dtype, the loss and the global batch (stored autotuner entries win).

Autodiff notes for "xla" (jax >= 0.7 shard_map with check_vma=True, the default): `psum` of a
device-varying value gives a device-invariant result and transposes to `pvary` (no extra
factor n); invariant inputs (t, b with spec P()) used with varying values are implicitly
`pvary`'d, whose transpose is a `psum`, so their gradients are summed over devices;
`ppermute` transposes to the inverse permutation and `all_gather` to `psum_scatter`.
Hence gradients of the returned replicated scalar equal the reference's exactly.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from big_mm.kernels import contrastive as kernels

LOSSES = ("sigmoid", "softmax")
STRATEGIES = ("local", "all_gather", "ring")
IMPLEMENTATIONS = ("xla", "pallas", "chunked")


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _scalar(x):
  x = jnp.asarray(x, jnp.float32)
  return jnp.reshape(x, ()) if x.size == 1 else x


# The logit of an absent column: exp underflows to 0 next to any real logit, and it stays
# finite (an all-absent row's lse is about this value, then dropped by a where()).
_ABSENT = -1e30


def _presence(valid, n):
  """float32 [n] 0/1 mask of a presence vector (nonzero = present)."""
  valid = jnp.asarray(valid)
  if valid.shape != (n,):
    raise ValueError(f"valid must be a presence mask of shape ({n},) (one entry per pair of "
                     f"the global batch), got shape {valid.shape}")
  return (valid != 0).astype(jnp.float32)


def _absent_out(logits, mi, mt):
  """A logit block for image->text (absent columns out) and for text->image (absent rows
  out); mi / mt are the rows' / columns' 0/1 masks (None: unmasked, the block itself)."""
  if mi is None:
    return logits, logits
  return (jnp.where(mt[None, :] > 0, logits, _ABSENT),
          jnp.where(mi[:, None] > 0, logits, _ABSENT))


def _masked_lse(logits, mi, mt):
  """Row lse over present columns and column lse over present rows of a logit block."""
  rows, cols = _absent_out(logits, mi, mt)
  return jax.nn.logsumexp(rows, axis=1), jax.nn.logsumexp(cols, axis=0)


def _count(m, axes, n_global):
  """The loss's normaliser: B unmasked, else max(n_valid, 1) over the whole batch."""
  if m is None:
    return n_global
  return jnp.maximum(jax.lax.psum(jnp.sum(m), axes), 1.0)


# ----------------------------------------------------------------------------- references


def sigmoid_loss(zimg, ztxt, t, b, valid=None):
  """big_vision SigLIP loss: mean over rows of -sum_j log_sigmoid(z_ij * logits_ij); with
  `valid`, the sum over present pairs (i, j) / max(n_valid, 1)."""
  zimg, ztxt = _f32(zimg, ztxt)
  t, b = _scalar(t), _scalar(b)
  logits = t * zimg @ ztxt.T + b
  n = logits.shape[0]
  z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  if valid is None:
    return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(z * logits), axis=-1))
  m = _presence(valid, n)
  pairs = m[:, None] * m[None, :]
  return -jnp.sum(pairs * jax.nn.log_sigmoid(z * logits)) / jnp.maximum(jnp.sum(m), 1.0)


def softmax_loss(zimg, ztxt, t, b=None, valid=None):
  """CLIP loss: mean of the image->text and text->image cross-entropies (each mean over rows);
  with `valid`, over present rows, absent columns left out of the lse."""
  zimg, ztxt = _f32(zimg, ztxt)
  t = _scalar(t)
  logits = t * zimg @ ztxt.T
  if b is not None:
    logits = logits + _scalar(b)
  pos = jnp.diagonal(logits)
  if valid is not None:
    m = _presence(valid, logits.shape[0])
    lse_img, lse_txt = _masked_lse(logits, m, m)
    total = jnp.sum(jnp.where(m > 0, lse_img + lse_txt - 2.0 * pos, 0.0))
    return total / (2.0 * jnp.maximum(jnp.sum(m), 1.0))
  i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)
  t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - pos)
  return 0.5 * (i2t + t2i)


_REFERENCES = {"sigmoid": sigmoid_loss, "softmax": softmax_loss}


# Multi-positive (DreamLIP-style several captions per image): ztxt is [B, k, D], the k
# captions of each image; row j of the flattened [B*k, D] texts belongs to image j // k.
# Both reduce to the losses above at k = 1 (contrastive_loss then runs those exactly).


def _own_image(n_rows, n_cols, k, row_offset=0):
  """bool [n_rows, n_cols]: text column j is a caption of image row i (offset: the rows'
  global index of row 0, the columns' being 0)."""
  rows = row_offset + jnp.arange(n_rows)
  return rows[:, None] == jnp.arange(n_cols)[None, :] // k


def _positives(zimg, ztxt, t, b):
  """[b, k] logits of every image with each of its own k captions (ztxt [b, k, d])."""
  return t * jnp.einsum("id,icd->ic", zimg, ztxt) + b


def sigmoid_loss_multi(zimg, ztxt, t, b):
  """Multi-positive SigLIP: label +1 for every (image, own caption) pair, -1 for every other
  pair; -sum of log_sigmoid(label * logit) over the B x B*k pairs / (B*k), i.e. the mean over
  captions of the sum over images (k = 1: sigmoid_loss)."""
  zimg, ztxt = _f32(zimg, ztxt)
  t, b = _scalar(t), _scalar(b)
  n, k = ztxt.shape[:2]
  logits = t * zimg @ ztxt.reshape(n * k, -1).T + b  # [B, B*k]
  z = jnp.where(_own_image(n, n * k, k), 1.0, -1.0)
  return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(z * logits), axis=-1)) / k


def softmax_loss_multi(zimg, ztxt, t, b=None):
  """Multi-positive CLIP: the mean of image->text, whose target is uniform over the image's
  k captions (lse over all B*k captions - the mean logit of its own, mean over images), and
  text->image, one cross-entropy per caption over the B images (mean over the B*k captions)
  (k = 1: softmax_loss)."""
  zimg, ztxt = _f32(zimg, ztxt)
  t = _scalar(t)
  b = 0.0 if b is None else _scalar(b)
  n, k = ztxt.shape[:2]
  logits = t * zimg @ ztxt.reshape(n * k, -1).T + b  # [B, B*k]
  pos = jnp.diagonal(logits.reshape(n, n, k)).T  # [B, k]: each image with its own captions
  i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - jnp.mean(pos, axis=1))
  t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - pos.reshape(-1))
  return 0.5 * (i2t + t2i)


_MULTI_REFERENCES = {"sigmoid": sigmoid_loss_multi, "softmax": softmax_loss_multi}


# ----------------------------------------------------------------------------- helpers


def batch_axes_of(mesh, batch_axes: Sequence[str] | str | None = ("data", "fsdp")):
  """The entries of `batch_axes` that are axes of `mesh`, as a tuple (order kept)."""
  if batch_axes is None:
    return ()
  if isinstance(batch_axes, str):
    batch_axes = (batch_axes,)
  if mesh is None:
    return tuple(batch_axes)
  names = set(mesh.axis_names)
  return tuple(a for a in batch_axes if a in names)


def _check(loss, strategy, implementation="xla"):
  if loss not in LOSSES:
    raise ValueError(f"Unknown contrastive loss {loss!r}; valid: {', '.join(LOSSES)}")
  if strategy not in STRATEGIES:
    raise ValueError(
        f"Unknown contrastive strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"Unknown contrastive implementation {implementation!r}; "
                     f"valid: {', '.join(IMPLEMENTATIONS)}")


# ----------------------------------------------------------------------------- all_gather


# Per-device functions take the local 0/1 presence mask `m` [b] (None: unmasked).


def _all_gather_sigmoid(zimg, ztxt, t, b, m=None, *, axes, n_global):
  nb = zimg.shape[0]
  idx = jax.lax.axis_index(axes)
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)  # [B, d]
  logits = t * zimg @ ztxt_all.T + b  # [b, B]
  rows = idx * nb + jnp.arange(nb)
  cols = jnp.arange(ztxt_all.shape[0])
  z = jnp.where(rows[:, None] == cols[None, :], 1.0, -1.0)
  terms = jax.nn.log_sigmoid(z * logits)
  if m is not None:
    terms = m[:, None] * jax.lax.all_gather(m, axes, axis=0, tiled=True)[None, :] * terms
  local = -jnp.sum(terms)
  return jax.lax.psum(local, axes) / _count(m, axes, n_global)


def _all_gather_softmax(zimg, ztxt, t, b, m=None, *, axes, n_global):
  zimg_all = jax.lax.all_gather(zimg, axes, axis=0, tiled=True)  # [B, d]
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)  # [B, d]
  # image->text: local image rows against all texts; text->image: local text rows vs all images.
  logits_i2t = t * zimg @ ztxt_all.T + b  # [b, B]
  logits_t2i = t * ztxt @ zimg_all.T + b  # [b, B]
  pos = t * jnp.sum(zimg * ztxt, axis=-1) + b  # [b], the diagonal entries of the global logits
  if m is None:
    local = (jnp.sum(jax.nn.logsumexp(logits_i2t, axis=1))
             + jnp.sum(jax.nn.logsumexp(logits_t2i, axis=1))
             - 2.0 * jnp.sum(pos))
  else:
    m_all = jax.lax.all_gather(m, axes, axis=0, tiled=True)
    lse_img = _masked_lse(logits_i2t, m, m_all)[0]
    lse_txt = _masked_lse(logits_t2i, m, m_all)[0]
    local = jnp.sum(jnp.where(m > 0, lse_img + lse_txt - 2.0 * pos, 0.0))
  return jax.lax.psum(local, axes) / (2.0 * _count(m, axes, n_global))


# ----------------------------------------------------------------------------- ring


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


# With a mask, the text shard's mask `mt` travels with it (None unmasked: no extra leaves).


def _ring_sigmoid(zimg, ztxt, t, b, m=None, *, axes, n_global, n_dev):
  nb = zimg.shape[0]
  perm = _ring_perm(n_dev)

  @jax.checkpoint
  def block(zi, zt, t, b, diag, mi, mt):
    logits = t * zi @ zt.T + b
    z = jnp.where(diag, 2.0 * jnp.eye(nb, dtype=jnp.float32) - 1.0, -1.0)
    terms = jax.nn.log_sigmoid(z * logits)
    if mi is not None:
      terms = mi[:, None] * mt[None, :] * terms
    return -jnp.sum(terms)

  total = block(zimg, ztxt, t, b, True, m, m)  # offset 0: the positives live here

  def body(carry, _):
    zt, mt, acc = carry
    zt, mt = jax.lax.ppermute((zt, mt), axes, perm)
    acc = acc + block(zimg, zt, t, b, False, m, mt)
    return (zt, mt, acc), None

  if n_dev > 1:
    (_, _, total), _ = jax.lax.scan(body, (ztxt, m, total), None, length=n_dev - 1)
  return jax.lax.psum(total, axes) / _count(m, axes, n_global)


def _ring_softmax(zimg, ztxt, t, b, m=None, *, axes, n_global, n_dev):
  perm = _ring_perm(n_dev)

  @jax.checkpoint
  def block(zi, zt, t, b, lse_img, lse_txt, mi, mt):
    rows, cols = _absent_out(t * zi @ zt.T + b, mi, mt)  # logits [b_img, b_txt]
    lse_img = jnp.logaddexp(lse_img, jax.nn.logsumexp(rows, axis=1))
    lse_txt = jnp.logaddexp(lse_txt, jax.nn.logsumexp(cols, axis=0))
    return lse_img, lse_txt

  @jax.checkpoint
  def first_block(zi, zt, t, b, mi, mt):
    return _masked_lse(t * zi @ zt.T + b, mi, mt)

  lse_img, lse_txt = first_block(zimg, ztxt, t, b, m, m)
  pos = t * jnp.sum(zimg * ztxt, axis=-1) + b  # diagonal, in the offset-0 block

  def body(carry, _):
    zt, lse_img, lse_txt, mt = carry
    # The text shard travels together with its own running log-sum-exp (text->image).
    zt, lse_txt, mt = jax.lax.ppermute((zt, lse_txt, mt), axes, perm)
    lse_img, lse_txt = block(zimg, zt, t, b, lse_img, lse_txt, m, mt)
    return (zt, lse_img, lse_txt, mt), None

  mt = m
  if n_dev > 1:
    (_, lse_img, lse_txt, mt), _ = jax.lax.scan(
        body, (ztxt, lse_img, lse_txt, m), None, length=n_dev - 1)
  # After n-1 hops every text shard's lse covers all images; it sits on another device, but
  # only the global sum over text rows is needed, which is permutation invariant.
  if m is None:
    local = jnp.sum(lse_img) + jnp.sum(lse_txt) - 2.0 * jnp.sum(pos)
  else:
    local = (jnp.sum(jnp.where(m > 0, lse_img - 2.0 * pos, 0.0))
             + jnp.sum(jnp.where(mt > 0, lse_txt, 0.0)))
  return jax.lax.psum(local, axes) / (2.0 * _count(m, axes, n_global))


# ----------------------------------------------------------------------------- pallas
#
# The sharded pallas (and chunked) strategies are a `jax.custom_vjp` around two shard_maps: a forward that
# returns the loss plus O(b) residuals per device and a backward written out by hand from the
# blocks' raw fwd/bwd halves (nothing is differentiated through the shard_map, so it runs with
# check_vma=False, which Pallas interpret mode needs). Per-device functions below return
# (loss, residuals) and (dzimg, dztxt, dt, db); `g` is the loss cotangent.


def _pos_grads(zimg, ztxt, t, b, scale):
  """Grads of scale * sum_i (t * sim(zimg_i, ztxt_i) + b): the positives of the softmax loss."""
  def pos_sum(zi, zt, t, b):
    return scale * jnp.sum(t * kernels.DOT_PRODUCT.diagonal(zi, zt) + b)
  return jax.grad(pos_sum, argnums=(0, 1, 2, 3))(zimg, ztxt, t, b)


def _add(*grads):
  return tuple(sum(g) for g in zip(*grads))


def _pallas_all_gather_sigmoid_fwd(zimg, ztxt, t, b, *, axes, n_global, cfg):
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)  # [B, d]
  offset = jax.lax.axis_index(axes) * zimg.shape[0]  # the positives: column offset + i
  local = kernels.sigmoid_sum_fwd(zimg, ztxt_all, t, b, offset, config=cfg)
  return jax.lax.psum(local, axes) / n_global, ()


def _pallas_all_gather_sigmoid_bwd(zimg, ztxt, t, b, res, g, *, axes, n_global, cfg):
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)
  offset = jax.lax.axis_index(axes) * zimg.shape[0]
  dzi, dzt_all, dt, db = kernels.sigmoid_sum_bwd(zimg, ztxt_all, t, b, offset, g / n_global,
                                                 config=cfg)
  dzt = jax.lax.psum_scatter(dzt_all, axes, scatter_dimension=0, tiled=True)
  return dzi, dzt, jax.lax.psum(dt, axes), jax.lax.psum(db, axes)


def _pallas_all_gather_softmax_fwd(zimg, ztxt, t, b, *, axes, n_global, cfg):
  zimg_all = jax.lax.all_gather(zimg, axes, axis=0, tiled=True)
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)
  # Row lse of the local images vs all texts; column lse of all images vs the local texts.
  lse_img, _ = kernels.lse_fwd(zimg, ztxt_all, t, b, cols=False, config=cfg)
  _, lse_txt = kernels.lse_fwd(zimg_all, ztxt, t, b, rows=False, config=cfg)
  pos = t * kernels.DOT_PRODUCT.diagonal(zimg, ztxt) + b
  local = jnp.sum(lse_img) + jnp.sum(lse_txt) - 2.0 * jnp.sum(pos)
  return jax.lax.psum(local, axes) / (2.0 * n_global), (lse_img, lse_txt)


def _pallas_all_gather_softmax_bwd(zimg, ztxt, t, b, res, g, *, axes, n_global, cfg):
  lse_img, lse_txt = res
  gl = g / (2.0 * n_global)
  zimg_all = jax.lax.all_gather(zimg, axes, axis=0, tiled=True)
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)
  filled = lambda v: jnp.full(v.shape, gl, jnp.float32)
  dzi, dzt_all, dt_i, db_i = kernels.lse_bwd(zimg, ztxt_all, t, b, lse_img, None,
                                             filled(lse_img), None, config=cfg)
  dzi_all, dzt, dt_t, db_t = kernels.lse_bwd(zimg_all, ztxt, t, b, None, lse_txt,
                                             None, filled(lse_txt), config=cfg)
  scatter = lambda x: jax.lax.psum_scatter(x, axes, scatter_dimension=0, tiled=True)
  dzi, dzt, dt, db = _add((dzi + scatter(dzi_all), dzt + scatter(dzt_all), dt_i + dt_t,
                           db_i + db_t), _pos_grads(zimg, ztxt, t, b, -2.0 * gl))
  return dzi, dzt, jax.lax.psum(dt, axes), jax.lax.psum(db, axes)


def _pallas_ring_sigmoid_fwd(zimg, ztxt, t, b, *, axes, n_global, n_dev, cfg):
  perm = _ring_perm(n_dev)
  total = kernels.sigmoid_sum_fwd(zimg, ztxt, t, b, 0, config=cfg)  # the positives' block

  def body(carry, _):
    zt, total = carry
    zt = jax.lax.ppermute(zt, axes, perm)
    return (zt, total + kernels.sigmoid_sum_fwd(zimg, zt, t, b, None, config=cfg)), None

  if n_dev > 1:
    (_, total), _ = jax.lax.scan(body, (ztxt, total), None, length=n_dev - 1)
  return jax.lax.psum(total, axes) / n_global, ()


def _pallas_ring_softmax_fwd(zimg, ztxt, t, b, *, axes, n_global, n_dev, cfg):
  perm = _ring_perm(n_dev)
  lse_img, lse_txt = kernels.lse_fwd(zimg, ztxt, t, b, config=cfg)

  def body(carry, _):
    zt, lse_img, lse_txt = carry
    # The text shard travels together with its own running log-sum-exp (text->image).
    zt, lse_txt = jax.lax.ppermute((zt, lse_txt), axes, perm)
    lse_i, lse_t = kernels.lse_fwd(zimg, zt, t, b, config=cfg)
    return (zt, jnp.logaddexp(lse_img, lse_i), jnp.logaddexp(lse_txt, lse_t)), None

  if n_dev > 1:
    (_, lse_img, lse_txt), _ = jax.lax.scan(
        body, (ztxt, lse_img, lse_txt), None, length=n_dev - 1)
    lse_txt = jax.lax.ppermute(lse_txt, axes, perm)  # one more hop: back to its home device
  pos = t * kernels.DOT_PRODUCT.diagonal(zimg, ztxt) + b
  local = jnp.sum(lse_img) + jnp.sum(lse_txt) - 2.0 * jnp.sum(pos)
  return jax.lax.psum(local, axes) / (2.0 * n_global), (lse_img, lse_txt)


def _pallas_ring_bwd(zimg, ztxt, t, b, res, g, *, kind, axes, n_global, n_dev, cfg):
  """The ring run twice more, so no step's shard has to be saved by the forward: first the
  text shards travel (with their final lse) and each device accumulates its image rows'
  gradient and dt, db; then the image shards travel (with theirs) and each device
  accumulates its text rows' gradient. Only O(b*d) is live: a travelling shard, the one
  arriving and the local accumulator."""
  perm = _ring_perm(n_dev)
  # g is the same on every device (the loss is replicated).
  gl = g / (2.0 * n_global) if kind == "softmax" else g / n_global
  if kind == "softmax":
    lse_img, lse_txt = res
    g_img = jnp.full(lse_img.shape, gl, jnp.float32)
    g_txt = jnp.full(lse_txt.shape, gl, jnp.float32)

  def image_rows(zt, lse_t, pos_offset, dzi):  # dzi + this block's dzimg (in place); dt, db
    if kind == "sigmoid":
      dzi, _, dt, db = kernels.sigmoid_sum_bwd(zimg, zt, t, b, pos_offset, gl, cols=False,
                                               dzi_acc=dzi, config=cfg)
    else:
      dzi, _, dt, db = kernels.lse_bwd(zimg, zt, t, b, lse_img, lse_t, g_img, g_txt,
                                       cols=False, dzi_acc=dzi, config=cfg)
    return dzi, dt, db

  def text_rows(zi, lse_i, pos_offset, dzt):  # dzt + this block's dztxt (in place)
    if kind == "sigmoid":
      return kernels.sigmoid_sum_bwd(zi, ztxt, t, b, pos_offset, gl, rows=False, dzt_acc=dzt,
                                     config=cfg)[1]
    return kernels.lse_bwd(zi, ztxt, t, b, lse_i, lse_txt, g_img, g_txt, rows=False,
                           dzt_acc=dzt, config=cfg)[1]

  # The shards travel with their final lse (softmax); sigmoid needs none: zeros ride along.
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

  if n_dev > 1:
    (_, _, dzi, dt, db), _ = jax.lax.scan(
        text_travels, (ztxt, lse_t0, dzi, dt, db), None, length=n_dev - 1)
  dzt = text_rows(zimg, lse_i0, 0, None)
  if n_dev > 1:
    (_, _, dzt), _ = jax.lax.scan(image_travels, (zimg, lse_i0, dzt), None, length=n_dev - 1)
  grads = (dzi, dzt, dt, db)
  if kind == "softmax":
    grads = _add(grads, _pos_grads(zimg, ztxt, t, b, -2.0 * gl))
  dzi, dzt, dt, db = grads
  return dzi, dzt, jax.lax.psum(dt, axes), jax.lax.psum(db, axes)


_PALLAS_SHARDED = {  # (loss, strategy) -> (per-device fwd, per-device bwd)
    ("sigmoid", "all_gather"): (_pallas_all_gather_sigmoid_fwd, _pallas_all_gather_sigmoid_bwd),
    ("softmax", "all_gather"): (_pallas_all_gather_softmax_fwd, _pallas_all_gather_softmax_bwd),
    ("sigmoid", "ring"): (_pallas_ring_sigmoid_fwd,
                          functools.partial(_pallas_ring_bwd, kind="sigmoid")),
    ("softmax", "ring"): (_pallas_ring_softmax_fwd,
                          functools.partial(_pallas_ring_bwd, kind="softmax")),
}


def _fused_sharded_loss(zimg, ztxt, t, b, *, loss, strategy, mesh, kw):
  fwd_local, bwd_local = _PALLAS_SHARDED[(loss, strategy)]
  spec = P(kw["axes"])
  res_specs = {"sigmoid": (), "softmax": (spec, spec)}[loss]
  smap = functools.partial(jax.shard_map, mesh=mesh, check_vma=False)
  fwd_sharded = smap(functools.partial(fwd_local, **kw),
                     in_specs=(spec, spec, P(), P()), out_specs=(P(), res_specs))
  bwd_sharded = smap(functools.partial(bwd_local, **kw),
                     in_specs=(spec, spec, P(), P(), res_specs, P()),
                     out_specs=(spec, spec, P(), P()))

  @jax.custom_vjp
  def sharded(zimg, ztxt, t, b):
    return fwd_sharded(zimg, ztxt, t, b)[0]

  def fwd(zimg, ztxt, t, b):
    value, res = fwd_sharded(zimg, ztxt, t, b)
    return value, (zimg, ztxt, t, b, res)

  def bwd(saved, g):
    zimg, ztxt, t, b, res = saved
    dzi, dzt, dt, db = bwd_sharded(zimg, ztxt, t, b, res, g)
    return dzi.astype(zimg.dtype), dzt.astype(ztxt.dtype), dt, db

  sharded.defvjp(fwd, bwd)
  return sharded(zimg, ztxt, t, b)


_SHARDED = {
    ("sigmoid", "all_gather"): _all_gather_sigmoid,
    ("softmax", "all_gather"): _all_gather_softmax,
    ("sigmoid", "ring"): _ring_sigmoid,
    ("softmax", "ring"): _ring_softmax,
}
_FUSED = {"sigmoid": kernels.sigmoid_loss_fused, "softmax": kernels.softmax_loss_fused}


# ----------------------------------------------------------------------------- multi-positive
# Per device: zimg [b, d], ztxt [b, k, d] (the captions of the local images). Texts travel
# (or are gathered) flattened, [b*k, d]; image rows' global index is device * b + row.


def _all_gather_sigmoid_multi(zimg, ztxt, t, b, *, axes, n_global):
  nb, k = ztxt.shape[:2]
  ztxt_all = jax.lax.all_gather(ztxt.reshape(nb * k, -1), axes, axis=0, tiled=True)  # [B*k, d]
  logits = t * zimg @ ztxt_all.T + b  # [b, B*k]
  z = jnp.where(_own_image(nb, ztxt_all.shape[0], k, jax.lax.axis_index(axes) * nb), 1.0, -1.0)
  local = -jnp.sum(jax.nn.log_sigmoid(z * logits))
  return jax.lax.psum(local, axes) / (n_global * k)


def _all_gather_softmax_multi(zimg, ztxt, t, b, *, axes, n_global):
  nb, k = ztxt.shape[:2]
  zt = ztxt.reshape(nb * k, -1)
  zimg_all = jax.lax.all_gather(zimg, axes, axis=0, tiled=True)  # [B, d]
  ztxt_all = jax.lax.all_gather(zt, axes, axis=0, tiled=True)  # [B*k, d]
  lse_img = jax.nn.logsumexp(t * zimg @ ztxt_all.T + b, axis=1)  # [b], over all captions
  lse_txt = jax.nn.logsumexp(t * zt @ zimg_all.T + b, axis=1)  # [b*k], over all images
  return _softmax_multi_total(lse_img, lse_txt, _positives(zimg, ztxt, t, b), axes, n_global)


def _softmax_multi_total(lse_img, lse_txt, pos, axes, n_global):
  """The multi-positive softmax loss from a device's row terms: image->text sums
  (lse - mean of its k positives) over B images, text->image (lse - positive) over B*k."""
  k = pos.shape[1]
  local = k * jnp.sum(lse_img) + jnp.sum(lse_txt) - 2.0 * jnp.sum(pos)
  return jax.lax.psum(local, axes) / (2.0 * n_global * k)


def _ring_sigmoid_multi(zimg, ztxt, t, b, *, axes, n_global, n_dev):
  nb, k = ztxt.shape[:2]
  perm = _ring_perm(n_dev)

  @jax.checkpoint
  def block(zi, zt, t, b, own):
    logits = t * zi @ zt.T + b  # [b, b*k]
    z = jnp.where(own & _own_image(nb, nb * k, k), 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))

  zt = ztxt.reshape(nb * k, -1)
  total = block(zimg, zt, t, b, True)  # offset 0: the positives live here

  def body(carry, _):
    zt, acc = carry
    zt = jax.lax.ppermute(zt, axes, perm)
    return (zt, acc + block(zimg, zt, t, b, False)), None

  if n_dev > 1:
    (_, total), _ = jax.lax.scan(body, (zt, total), None, length=n_dev - 1)
  return jax.lax.psum(total, axes) / (n_global * k)


def _ring_softmax_multi(zimg, ztxt, t, b, *, axes, n_global, n_dev):
  nb, k = ztxt.shape[:2]
  perm = _ring_perm(n_dev)

  @jax.checkpoint
  def block(zi, zt, t, b):
    logits = t * zi @ zt.T + b  # [b, b*k]
    return jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0)

  zt = ztxt.reshape(nb * k, -1)
  lse_img, lse_txt = block(zimg, zt, t, b)

  def body(carry, _):
    zt, lse_img, lse_txt = carry
    # The caption shard travels together with its own running log-sum-exp (text->image).
    zt, lse_txt = jax.lax.ppermute((zt, lse_txt), axes, perm)
    lse_i, lse_t = block(zimg, zt, t, b)
    return (zt, jnp.logaddexp(lse_img, lse_i), jnp.logaddexp(lse_txt, lse_t)), None

  if n_dev > 1:
    (_, lse_img, lse_txt), _ = jax.lax.scan(
        body, (zt, lse_img, lse_txt), None, length=n_dev - 1)
  # As in _ring_softmax: each caption's lse now covers all images, wherever it sits.
  return _softmax_multi_total(lse_img, lse_txt, _positives(zimg, ztxt, t, b), axes, n_global)


_SHARDED_MULTI = {
    ("sigmoid", "all_gather"): _all_gather_sigmoid_multi,
    ("softmax", "all_gather"): _all_gather_softmax_multi,
    ("sigmoid", "ring"): _ring_sigmoid_multi,
    ("softmax", "ring"): _ring_softmax_multi,
}


def multi_positive_loss(zimg, ztxt, t, b, *, loss: str, strategy: str, mesh=None,
                        batch_axes: Sequence[str] | str = ("data", "fsdp"),
                        implementation: str = "xla", kernel_config=None):
  """contrastive_loss with k positives per image: ztxt [B, k, D], the k captions of each
  image (sharded over `batch_axes` like zimg [B, D]); equals sigmoid_loss_multi /
  softmax_loss_multi (values and grads) for every strategy. k = 1 is contrastive_loss itself
  (the same computation, bit for bit). The fused kernels take one positive per row: k > 1
  needs implementation="xla"."""
  _check(loss, strategy, implementation)
  if ztxt.ndim != 3 or zimg.ndim != 2 or ztxt.shape[0] != zimg.shape[0]:
    raise ValueError(f"multi-positive loss takes zimg [B, D] and ztxt [B, k, D]; got "
                     f"{zimg.shape} and {ztxt.shape}")
  if ztxt.shape[1] == 1:
    return contrastive_loss(zimg, ztxt[:, 0], t, b, loss=loss, strategy=strategy, mesh=mesh,
                            batch_axes=batch_axes, implementation=implementation,
                            kernel_config=kernel_config)
  if implementation != "xla":
    raise ValueError(f"{ztxt.shape[1]} captions per image (input.captions_per_example) need "
                     f"objective.implementation='xla': the fused {implementation!r} kernels "
                     f"take one positive per image.")
  if b is None:
    if loss == "sigmoid":
      raise ValueError("sigmoid loss requires a bias b")
    b = 0.0
  axes = batch_axes_of(mesh, batch_axes)
  if strategy == "local" or mesh is None or not axes:
    return _MULTI_REFERENCES[loss](zimg, ztxt, t, b)
  zimg, ztxt = _f32(zimg, ztxt)
  t, b = _scalar(t), _scalar(b)
  n_dev = 1
  for a in axes:
    n_dev *= mesh.shape[a]
  if zimg.shape[0] % n_dev:
    raise ValueError(f"global batch {zimg.shape[0]} not divisible by {n_dev} devices on {axes}")
  kw = dict(axes=axes, n_global=zimg.shape[0])
  if strategy == "ring":
    kw["n_dev"] = n_dev
  fn = functools.partial(_SHARDED_MULTI[(loss, strategy)], **kw)
  spec = P(axes)
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
      zimg, ztxt, t, b)


# ----------------------------------------------------------------------------- public entry


def _kernel_config(implementation, config, zimg, loss):
  """The KernelConfig of a "pallas" / "chunked" loss: the given one (its mode must match)
  or the running backend's for these embeddings, loss and global batch."""
  chunked = implementation == "chunked"
  if config is None:
    return kernels.kernel_config(dim=zimg.shape[-1], dtype=zimg.dtype, loss=loss,
                                 batch=zimg.shape[0], **({"mode": "chunked"} if chunked else {}))
  if (config.mode == "chunked") != chunked:
    raise ValueError(f"implementation={implementation!r} got a kernel_config of mode "
                     f"{config.mode!r}; use mode 'chunked' with implementation 'chunked' and "
                     f"a Pallas mode (grid, loop) with 'pallas'")
  return config



def contrastive_loss(zimg, ztxt, t, b, *, loss: str, strategy: str, mesh=None,
                     batch_axes: Sequence[str] | str = ("data", "fsdp"),
                     implementation: str = "xla", kernel_config=None, valid=None):
  """Contrastive loss over the global batch; equals the full-batch reference (value and grads).

  Args:
    zimg, ztxt: global [B, D] embeddings, batch dim sharded over `batch_axes` of `mesh`.
    t: exp'd temperature (scalar or shape (1,)). b: bias (scalar or (1,)); may be None for
      softmax (treated as 0, it does not change the softmax loss).
    loss: "sigmoid" | "softmax". strategy: "local" | "all_gather" | "ring".
    mesh: jax.sharding.Mesh; None means "local".
    batch_axes: mesh axes over which the batch is sharded; absent ones are ignored.
    implementation: "xla" (jnp, materialises logit blocks) | "pallas" (fused kernels) |
      "chunked" (XLA, chunks of rows; module docstring).
    kernel_config: optional big_mm.kernels.contrastive.KernelConfig for "pallas" / "chunked"
      (tile sizes, the chunk); None picks the running backend's (module docstring).
    valid: optional presence mask [B] (bool / int / float, nonzero = present), sharded like
      the embeddings: absent pairs' rows and columns contribute nothing (module docstring);
      implementation="xla" only.
  Returns:
    float32 scalar, replicated.
  A ztxt of [B, k, D] (k captions per image) gives `multi_positive_loss`.
  """
  if valid is not None and implementation != "xla":
    raise ValueError(f"contrastive_loss(valid=...): the fused {implementation!r} kernels take no "
                     f"presence mask; use implementation='xla' (objective.implementation) "
                     f"when pairs may be absent")
  if jnp.ndim(ztxt) == 3:
    if valid is not None:
      raise ValueError(f"contrastive_loss(valid=...) takes one positive per row (ztxt [B, D]); "
                       f"got ztxt {jnp.shape(ztxt)} (several captions per image): the "
                       f"multi-positive loss takes no presence mask")
    return multi_positive_loss(zimg, ztxt, t, b, loss=loss, strategy=strategy, mesh=mesh,
                               batch_axes=batch_axes, implementation=implementation,
                               kernel_config=kernel_config)
  _check(loss, strategy, implementation)
  if b is None:
    if loss == "sigmoid":
      raise ValueError("sigmoid loss requires a bias b")
    b = 0.0
  axes = batch_axes_of(mesh, batch_axes)
  if implementation != "xla":
    kernel_config = _kernel_config(implementation, kernel_config, zimg, loss)
  if strategy == "local" or mesh is None or not axes:
    if implementation != "xla":
      return _FUSED[loss](zimg, ztxt, t, b, config=kernel_config)
    return _REFERENCES[loss](zimg, ztxt, t, b, valid=valid)

  if implementation == "xla":
    zimg, ztxt = _f32(zimg, ztxt)  # the fused kernels take bf16 as is and accumulate in f32
  t, b = _scalar(t), _scalar(b)
  if t.shape != () or b.shape != ():
    raise ValueError(f"t and b must be scalars, got shapes {t.shape}, {b.shape}")
  n_global = zimg.shape[0]
  if ztxt.shape[0] != n_global:
    raise ValueError(f"zimg/ztxt batch mismatch: {zimg.shape} vs {ztxt.shape}")
  n_dev = 1
  for a in axes:
    n_dev *= mesh.shape[a]
  if n_global % n_dev:
    raise ValueError(f"global batch {n_global} not divisible by {n_dev} devices on {axes}")

  kw = dict(axes=axes, n_global=n_global)
  if strategy == "ring":
    kw["n_dev"] = n_dev
  if implementation != "xla":
    kw["cfg"] = kernel_config
    return _fused_sharded_loss(zimg, ztxt, t, b, loss=loss, strategy=strategy, mesh=mesh, kw=kw)
  fn = functools.partial(_SHARDED[(loss, strategy)], **kw)
  spec = P(axes)
  if valid is not None:
    return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P(), spec), out_specs=P())(
        zimg, ztxt, t, b, _presence(valid, n_global))
  return jax.shard_map(fn, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
      zimg, ztxt, t, b)
