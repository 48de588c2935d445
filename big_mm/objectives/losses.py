"""Contrastive losses (SigLIP sigmoid / CLIP softmax) over a globally sharded batch.

Public API:
  sigmoid_loss(zimg, ztxt, t, b)            single-device full-batch reference (big_vision SigLIP)
  softmax_loss(zimg, ztxt, t, b=None)       single-device full-batch reference (CLIP, mean of 2 CEs)
  contrastive_loss(zimg, ztxt, t, b, *, loss, strategy, mesh=None, batch_axes=("data", "fsdp"))
  batch_axes_of(mesh, batch_axes)           batch axes present in `mesh` (in the given order)

`t` is the already exponentiated temperature (scalar), `b` the bias (scalar). Inputs are
[B, D] embeddings (L2-normalised by the model); everything is computed in float32.

Strategies for the global batch (batch dim sharded over `batch_axes` of `mesh`):
  "local"      the reference on the global arrays; XLA/GSPMD inserts the collectives.
  "all_gather" under `jax.shard_map`: every device gathers the other tower's embeddings and
               computes its b x B logit slab(s); the row terms are psum'd and normalised.
  "ring"       under `jax.shard_map`: text embeddings travel around the ring with `ppermute`,
               one b x b block per step inside a `lax.scan` whose block computation is under
               `jax.checkpoint`, so only O(b*d) carries are saved for the backward pass.
               Softmax keeps a running log-sum-exp per local image row (image->text) and a
               running log-sum-exp per text row that travels with the text shard (text->image).

Autodiff notes (jax >= 0.7 shard_map with check_vma=True, the default): `psum` of a
device-varying value gives a device-invariant result and transposes to `pvary` (no extra
factor n); invariant inputs (t, b with spec P()) used with varying values are implicitly
`pvary`'d, whose transpose is a `psum`, so their gradients are summed over devices;
`ppermute` transposes to the inverse permutation and `all_gather` to `psum_scatter`.
Hence gradients of the returned replicated scalar equal the reference's exactly.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

LOSSES = ("sigmoid", "softmax")
STRATEGIES = ("local", "all_gather", "ring")


def _f32(*xs):
  return tuple(jnp.asarray(x, jnp.float32) for x in xs)


def _scalar(x):
  x = jnp.asarray(x, jnp.float32)
  return jnp.reshape(x, ()) if x.size == 1 else x


# ----------------------------------------------------------------------------- references


def sigmoid_loss(zimg, ztxt, t, b):
  """big_vision SigLIP loss: mean over rows of -sum_j log_sigmoid(z_ij * logits_ij)."""
  zimg, ztxt = _f32(zimg, ztxt)
  t, b = _scalar(t), _scalar(b)
  logits = t * zimg @ ztxt.T + b
  n = logits.shape[0]
  z = 2.0 * jnp.eye(n, dtype=jnp.float32) - 1.0
  return -jnp.mean(jnp.sum(jax.nn.log_sigmoid(z * logits), axis=-1))


def softmax_loss(zimg, ztxt, t, b=None):
  """CLIP loss: mean of the image->text and text->image cross-entropies (each mean over rows)."""
  zimg, ztxt = _f32(zimg, ztxt)
  t = _scalar(t)
  logits = t * zimg @ ztxt.T
  if b is not None:
    logits = logits + _scalar(b)
  pos = jnp.diagonal(logits)
  i2t = jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos)
  t2i = jnp.mean(jax.nn.logsumexp(logits, axis=0) - pos)
  return 0.5 * (i2t + t2i)


_REFERENCES = {"sigmoid": sigmoid_loss, "softmax": softmax_loss}


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


def _check(loss, strategy):
  if loss not in LOSSES:
    raise ValueError(f"Unknown contrastive loss {loss!r}; valid: {', '.join(LOSSES)}")
  if strategy not in STRATEGIES:
    raise ValueError(
        f"Unknown contrastive strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")


# ----------------------------------------------------------------------------- all_gather


def _all_gather_sigmoid(zimg, ztxt, t, b, *, axes, n_global):
  nb = zimg.shape[0]
  idx = jax.lax.axis_index(axes)
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)  # [B, d]
  logits = t * zimg @ ztxt_all.T + b  # [b, B]
  rows = idx * nb + jnp.arange(nb)
  cols = jnp.arange(ztxt_all.shape[0])
  z = jnp.where(rows[:, None] == cols[None, :], 1.0, -1.0)
  local = -jnp.sum(jax.nn.log_sigmoid(z * logits))
  return jax.lax.psum(local, axes) / n_global


def _all_gather_softmax(zimg, ztxt, t, b, *, axes, n_global):
  zimg_all = jax.lax.all_gather(zimg, axes, axis=0, tiled=True)  # [B, d]
  ztxt_all = jax.lax.all_gather(ztxt, axes, axis=0, tiled=True)  # [B, d]
  # image->text: local image rows against all texts; text->image: local text rows vs all images.
  logits_i2t = t * zimg @ ztxt_all.T + b  # [b, B]
  logits_t2i = t * ztxt @ zimg_all.T + b  # [b, B]
  pos = t * jnp.sum(zimg * ztxt, axis=-1) + b  # [b], the diagonal entries of the global logits
  local = (jnp.sum(jax.nn.logsumexp(logits_i2t, axis=1))
           + jnp.sum(jax.nn.logsumexp(logits_t2i, axis=1))
           - 2.0 * jnp.sum(pos))
  return jax.lax.psum(local, axes) / (2.0 * n_global)


# ----------------------------------------------------------------------------- ring


def _ring_perm(n):
  return [(i, (i + 1) % n) for i in range(n)]


def _ring_sigmoid(zimg, ztxt, t, b, *, axes, n_global, n_dev):
  nb = zimg.shape[0]
  perm = _ring_perm(n_dev)

  @jax.checkpoint
  def block(zi, zt, t, b, diag):
    logits = t * zi @ zt.T + b
    z = jnp.where(diag, 2.0 * jnp.eye(nb, dtype=jnp.float32) - 1.0, -1.0)
    return -jnp.sum(jax.nn.log_sigmoid(z * logits))

  total = block(zimg, ztxt, t, b, True)  # offset 0: the positives live here

  def body(carry, _):
    zt, acc = carry
    zt = jax.lax.ppermute(zt, axes, perm)
    acc = acc + block(zimg, zt, t, b, False)
    return (zt, acc), None

  if n_dev > 1:
    (_, total), _ = jax.lax.scan(body, (ztxt, total), None, length=n_dev - 1)
  return jax.lax.psum(total, axes) / n_global


def _ring_softmax(zimg, ztxt, t, b, *, axes, n_global, n_dev):
  perm = _ring_perm(n_dev)

  @jax.checkpoint
  def block(zi, zt, t, b, lse_img, lse_txt):
    logits = t * zi @ zt.T + b  # [b_img, b_txt]
    lse_img = jnp.logaddexp(lse_img, jax.nn.logsumexp(logits, axis=1))
    lse_txt = jnp.logaddexp(lse_txt, jax.nn.logsumexp(logits, axis=0))
    return lse_img, lse_txt

  @jax.checkpoint
  def first_block(zi, zt, t, b):
    logits = t * zi @ zt.T + b
    return jax.nn.logsumexp(logits, axis=1), jax.nn.logsumexp(logits, axis=0)

  lse_img, lse_txt = first_block(zimg, ztxt, t, b)
  pos = t * jnp.sum(zimg * ztxt, axis=-1) + b  # diagonal, in the offset-0 block

  def body(carry, _):
    zt, lse_img, lse_txt = carry
    # The text shard travels together with its own running log-sum-exp (text->image).
    zt, lse_txt = jax.lax.ppermute((zt, lse_txt), axes, perm)
    lse_img, lse_txt = block(zimg, zt, t, b, lse_img, lse_txt)
    return (zt, lse_img, lse_txt), None

  if n_dev > 1:
    (_, lse_img, lse_txt), _ = jax.lax.scan(
        body, (ztxt, lse_img, lse_txt), None, length=n_dev - 1)
  # After n-1 hops every text shard's lse covers all images; it sits on another device, but
  # only the global sum over text rows is needed, which is permutation invariant.
  local = jnp.sum(lse_img) + jnp.sum(lse_txt) - 2.0 * jnp.sum(pos)
  return jax.lax.psum(local, axes) / (2.0 * n_global)


_SHARDED = {
    ("sigmoid", "all_gather"): _all_gather_sigmoid,
    ("softmax", "all_gather"): _all_gather_softmax,
    ("sigmoid", "ring"): _ring_sigmoid,
    ("softmax", "ring"): _ring_softmax,
}


# ----------------------------------------------------------------------------- public entry


def contrastive_loss(zimg, ztxt, t, b, *, loss: str, strategy: str, mesh=None,
                     batch_axes: Sequence[str] | str = ("data", "fsdp")):
  """Contrastive loss over the global batch; equals the full-batch reference (value and grads).

  Args:
    zimg, ztxt: global [B, D] embeddings, batch dim sharded over `batch_axes` of `mesh`.
    t: exp'd temperature (scalar or shape (1,)). b: bias (scalar or (1,)); may be None for
      softmax (treated as 0, it does not change the softmax loss).
    loss: "sigmoid" | "softmax". strategy: "local" | "all_gather" | "ring".
    mesh: jax.sharding.Mesh; None means "local".
    batch_axes: mesh axes over which the batch is sharded; absent ones are ignored.
  Returns:
    float32 scalar, replicated.
  """
  _check(loss, strategy)
  if b is None:
    if loss == "sigmoid":
      raise ValueError("sigmoid loss requires a bias b")
    b = 0.0
  axes = batch_axes_of(mesh, batch_axes)
  if strategy == "local" or mesh is None or not axes:
    return _REFERENCES[loss](zimg, ztxt, t, b)

  zimg, ztxt = _f32(zimg, ztxt)
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
  fn = _SHARDED[(loss, strategy)]

  def inner(zi, zt, t, b):
    return fn(zi, zt, t, b, **kw)

  spec = P(axes)
  return jax.shard_map(inner, mesh=mesh, in_specs=(spec, spec, P(), P()), out_specs=P())(
      zimg, ztxt, t, b)
