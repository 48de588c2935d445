"""NaFlex (SigLIP 2, Tschannen et al. 2025): images at their native aspect ratio as padded
patch sequences (made by the `naflex` pp op, big_mm/input/preprocess.py).

A NaFlex batch holds, per image, patches [N, p * p * 3] (row-major grid order, each patch
flattened as (row, col, channel)), a mask [N] (False: padding) and its grid shape [2]. The ViT
embeds the patches with its patch-embedding kernel, adds its learned position embeddings
resized from their stored grid to each image's grid (`resize_posemb`), and masks the padding
as attention keys and in MAP pooling.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def _axis_weights(size_out, size_in: int, index):
  """Weights [B, N, size_in] of `F.interpolate(mode="bilinear", align_corners=False,
  antialias=True)` along one axis, from size_in to each example's size_out (float [B, 1]),
  at output positions index (float [B, N]): a triangle filter as wide as the downscaling
  factor (at least 1), normalised."""
  scale = size_in / size_out
  support = jnp.maximum(scale, 1.0)
  center = (index + 0.5) * scale - 0.5
  source = jnp.arange(size_in, dtype=jnp.float32)
  w = jnp.maximum(1.0 - jnp.abs(source - center[..., None]) / support[..., None], 0.0)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def resize_posemb(posemb, shapes, length: int):
  """Position embeddings posemb [H, W, D] (the stored grid) resized to each example's grid
  shapes int [B, 2] (rows, cols) as antialiased bilinear interpolation (what transformers'
  Siglip2 computes), laid out like its patches: -> [B, length, D], grid position k at
  (k // cols, k % cols); padding positions (k >= rows * cols) get grid position 0's value.
  Static shapes: `length` is the padded sequence length."""
  gh, gw, d = posemb.shape
  sizes = jnp.asarray(shapes, jnp.float32)[:, None, :]  # [B, 1, 2]
  k = jnp.arange(length, dtype=jnp.float32)[None, :]  # [1, N]
  rows = jnp.floor(k / sizes[..., 1])
  cols = k - rows * sizes[..., 1]
  real = k < sizes[..., 0] * sizes[..., 1]
  rows, cols = jnp.where(real, rows, 0.0), jnp.where(real, cols, 0.0)
  w_rows = _axis_weights(sizes[..., 0], gh, rows)  # [B, N, H]
  w_cols = _axis_weights(sizes[..., 1], gw, cols)  # [B, N, W]
  weights = (w_rows[..., :, None] * w_cols[..., None, :]).reshape(w_rows.shape[:2] + (gh * gw,))
  flat = posemb.reshape(gh * gw, d).astype(jnp.float32)
  return jnp.einsum("bng,gd->bnd", weights, flat,
                    precision=jax.lax.Precision.HIGHEST).astype(posemb.dtype)
