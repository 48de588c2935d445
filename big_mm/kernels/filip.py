"""FILIP token-wise late interaction (Yao et al. 2021) as a similarity of the fused contrastive
kernels (big_mm/kernels/contrastive.py), and its plain-jnp reference.

An example's tokens are one row: x [B, L * d], the L2-normalised token features [B, L, d]
flattened, padding tokens set to zero (`flatten_tokens`; a real token has norm 1, so a zero
token is padding, whatever the batch says). For image rows a [La tokens] and text rows b
[Lb tokens], with c_kl = <a_k, b_l> over the real tokens,
  reduce="a"     sim(a, b) = mean over a's tokens k of max over b's tokens l of c_kl
                 (FILIP's image->text similarity when a is the image)
  reduce="b"     sim(a, b) = mean over b's tokens l of max over a's tokens k of c_kl
                 (its text->image similarity)
  reduce="both"  the mean of the two (a symmetric similarity, e.g. for the sigmoid loss).
An example without real tokens has similarity 0.

`TokenwiseMax(tokens_a, tokens_b, dim, reduce)` has the methods the kernels ask of a
similarity: on a tile of rows it forms the [ta * La, tb * Lb] token-pair cosines (one tile's
worth, never the [B, B, La, Lb] tensor of the batch), reduces them, and its input gradients
are the vector-Jacobian products of that same tile function (so a tie in a max splits the
gradient as jnp.max's does). Called on whole blocks it is also the "xla" implementation
(objectives/filip_loss.py), which materialises a block's token pairs.
`similarities_reference(xa, xb, ...)`: the [Ba, Bb] matrices written out with einsum. The
kernels take one row width for both sides: `same_width(xa, xb)` zero-pads them to it.

Tiles: `kernel_config(tokens_a, tokens_b)` sizes them in tokens rather than rows (a tile of
rows is rows * L token vectors). Checked in CPU interpret mode (tests/test_filip.py); the
in-kernel reshapes to [rows, L, d] have not been lowered through Triton or Mosaic yet.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from big_mm.kernels import contrastive as kernels

REDUCTIONS = ("a", "b", "both")


def flatten_tokens(tokens, mask=None):
  """[B, L, d] normalised token features (+ bool [B, L] real tokens) -> [B, L * d], the
  padding tokens zeroed: the row layout of TokenwiseMax."""
  if mask is not None:
    tokens = jnp.where(mask[..., None], tokens, 0)
  return tokens.reshape(tokens.shape[0], -1)


def same_width(xa, xb):
  """Zero-pads two sets of flattened token rows to one width (the kernels take one feature
  width for both sides; TokenwiseMax reads only each side's L * d first features)."""
  width = max(xa.shape[1], xb.shape[1])
  pad = lambda x: jnp.pad(x, ((0, 0), (0, width - x.shape[1])))
  return pad(xa), pad(xb)


def _late_interaction(c, valid_a, valid_b, reduce):
  """c [..., La, Lb] token cosines, valid_a [..., La, 1], valid_b [..., 1, Lb] -> [...]."""
  def mean_of_max(c, valid_max, valid_mean, max_axis):
    m = jnp.max(jnp.where(valid_max, c, -jnp.inf), axis=max_axis)
    m = jnp.where(jnp.any(valid_max, axis=max_axis), m, 0.0)  # nothing to match: 0
    weights = jnp.squeeze(valid_mean, max_axis).astype(jnp.float32)
    return jnp.sum(m * weights, axis=-1) / jnp.maximum(jnp.sum(weights, axis=-1), 1.0)

  if reduce == "a":
    return mean_of_max(c, valid_b, valid_a, -1)
  if reduce == "b":
    return mean_of_max(c, valid_a, valid_b, -2)
  return 0.5 * (mean_of_max(c, valid_b, valid_a, -1) + mean_of_max(c, valid_a, valid_b, -2))


@dataclasses.dataclass(frozen=True)
class TokenwiseMax:
  """FILIP similarity of flattened token rows (see the module docstring); hashable, so it can
  be a static argument of the kernels."""
  tokens_a: int
  tokens_b: int
  dim: int
  reduce: str = "both"

  def __post_init__(self):
    if self.reduce not in REDUCTIONS:
      raise ValueError(f"TokenwiseMax.reduce={self.reduce!r}; choose one of {REDUCTIONS}.")

  def _tokens(self, x, n):
    # Rows may carry feature padding beyond n * dim (the kernels pad the feature axis).
    x = x[:, :n * self.dim].reshape(x.shape[0], n, self.dim)
    return x, jnp.sum(x.astype(jnp.float32) ** 2, axis=-1) > 0

  def __call__(self, a, b):  # [ta, >= La * d], [tb, >= Lb * d] -> [ta, tb] float32
    ta, tb = a.shape[0], b.shape[0]
    xa, va = self._tokens(a, self.tokens_a)
    xb, vb = self._tokens(b, self.tokens_b)
    c = kernels.DOT_PRODUCT(xa.reshape(ta * self.tokens_a, self.dim),
                            xb.reshape(tb * self.tokens_b, self.dim))
    c = c.reshape(ta, self.tokens_a, tb, self.tokens_b).transpose(0, 2, 1, 3)
    return _late_interaction(c, va[:, None, :, None], vb[None, :, None, :], self.reduce)

  def grad_a(self, a, b, ds):  # d/da of sum(ds * sim(a, b))
    _, vjp = jax.vjp(lambda a: self(a, b), a)
    return vjp(ds.astype(jnp.float32))[0].astype(jnp.float32)

  def grad_b(self, a, b, ds):
    _, vjp = jax.vjp(lambda b: self(a, b), b)
    return vjp(ds.astype(jnp.float32))[0].astype(jnp.float32)

  def diagonal(self, a, b):  # sim(a_i, b_i) [n], plain jnp
    xa, va = self._tokens(a, self.tokens_a)
    xb, vb = self._tokens(b, self.tokens_b)
    c = jnp.einsum("nkd,nld->nkl", xa.astype(jnp.float32), xb.astype(jnp.float32))
    return _late_interaction(c, va[:, :, None], vb[:, None, :], self.reduce)


def similarities_reference(xa, xb, tokens_a, tokens_b, dim, reduce="both"):
  """Plain-jnp [Ba, Bb] FILIP similarity of flattened token rows (materialises every token
  pair of the batch: [Ba, Bb, La, Lb])."""
  ta = xa.astype(jnp.float32).reshape(xa.shape[0], tokens_a, dim)
  tb = xb.astype(jnp.float32).reshape(xb.shape[0], tokens_b, dim)
  va, vb = jnp.sum(ta ** 2, -1) > 0, jnp.sum(tb ** 2, -1) > 0
  c = jnp.einsum("ikd,jld->ijkl", ta, tb, precision=lax.Precision.HIGHEST)
  return _late_interaction(c, va[:, None, :, None], vb[None, :, None, :], reduce)


def kernel_config(tokens_a: int, tokens_b: int, backend=None, **overrides):
  """The contrastive kernels' config with tiles of about 256 token vectors per side (a tile's
  token-pair cosines: 256 x 256 float32); overrides win."""
  rows = lambda n: max(8, 1 << max(0, (256 // n).bit_length() - 1))
  tiles = dict(tile_rows=rows(tokens_a), tile_cols=rows(tokens_b))
  if (backend or jax.default_backend()) == "tpu" and "tile_cols" not in overrides:
    # Mosaic needs 128-row column tiles: 128 * tokens_b token vectors against the row tile's
    # is a [tile_rows * tokens_a, 128 * tokens_b] float32 cosine tile (62 MB at 196 x 77
    # tokens, 8 rows), beyond a TPU core's VMEM.
    raise ValueError("FILIP's fused kernel has no TPU tiling yet (its column tiles would need "
                     f"128 rows of {tokens_b} tokens each); use objective.implementation='xla' "
                     "on TPU.")
  return kernels.kernel_config(backend, **{**tiles, **overrides})
