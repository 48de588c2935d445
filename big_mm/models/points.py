"""Point-cloud transformer tower (Point-BERT's encoder, as ULIP / ULIP-2 use it).

  PointTransformer(num_classes=D, width=384, depth=12, num_groups=512, group_size=32)(
      points [B, N, 3], train=) -> (pooled [B, D], out)

Yu et al. 2022, "Point-BERT" section 3.1 (lulutang0608/Point-BERT models/Point_BERT.py
`Group`, `Encoder`, `PointTransformer`): the cloud is split into `num_groups` local patches
whose centres are picked by farthest point sampling (FPS) and whose points are each centre's
`group_size` nearest neighbours (kNN), taken relative to the centre. A mini-PointNet embeds
each patch: shared MLP 3 -> width/2 -> width per point, max-pooled; that feature concatenated
to every point's, shared MLP 2*width -> 2*width -> width, max-pooled again: one token per patch
(Point-BERT's two-stage PointNet with 128-256 | 512-enc_dim channels, scaled to the width, and
LayerNorm where it has BatchNorm, so the tower has no batch statistics). The centre
coordinates through an MLP (3 -> 128 -> width, GELU) are the position embedding. A cls token
(with its own learned position) is prepended when pool="tok"; then layers.Encoder.
pool: "tok" (the cls token), "gap" (mean of the patch tokens) or "max" (their max).

FPS starts at the point farthest from the cloud's centroid (Point-BERT starts at index 0), so
the centres, the patches, and therefore the output do not depend on the order of the points.
FPS runs as a lax.fori_loop with static shapes (jittable); geometry stays float32.

Param tree: embedding/{Dense_0..3, LayerNorm_0, LayerNorm_1} (the mini-PointNet),
pos_hidden and pos_embedding (Dense: the centres' MLP), cls [1, 1, D] and cls_pos [1, 1, D]
(pool="tok"), Transformer/... (layers.Encoder), head (num_classes set).
out: "centres" [B, G, 3], "stem" (patch tokens), "with_posemb", "encoded", "head_input",
"pre_logits", "logits".
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_mm.models import layers

POOL_TYPES = ("tok", "gap", "max")
_layernorm = layers._layernorm  # pylint: disable=protected-access


def farthest_point_sample(xyz, num: int):
  """Indices int32 [B, num] of farthest point samples of xyz [B, N, 3]: the first is the point
  farthest from the centroid, each next one the point farthest from those chosen."""
  xyz = xyz.astype(jnp.float32)

  def one(pts):
    start = jnp.argmax(jnp.sum((pts - pts.mean(0)) ** 2, -1))
    dist = jnp.sum((pts - pts[start]) ** 2, -1)
    idx = jnp.zeros((num,), jnp.int32).at[0].set(start)

    def body(i, carry):
      idx, dist = carry
      nxt = jnp.argmax(dist)
      return idx.at[i].set(nxt), jnp.minimum(dist, jnp.sum((pts - pts[nxt]) ** 2, -1))
    return jax.lax.fori_loop(1, num, body, (idx, dist))[0]
  return jax.vmap(one)(xyz)


def group_points(xyz, num_groups: int, group_size: int):
  """xyz [B, N, 3] -> (centres [B, G, 3], neighbourhoods [B, G, K, 3] relative to their
  centre): FPS centres and each centre's K nearest points (itself included)."""
  xyz = xyz.astype(jnp.float32)
  centres = jnp.take_along_axis(xyz, farthest_point_sample(xyz, num_groups)[..., None], axis=1)
  d2 = jnp.sum((centres[:, :, None] - xyz[:, None]) ** 2, -1)  # [B, G, N]
  knn = jax.lax.top_k(-d2, group_size)[1]  # [B, G, K]
  neighbours = jax.vmap(lambda p, i: p[i])(xyz, knn)  # [B, G, K, 3]
  return centres, neighbours - centres[:, :, None]


def _dense(features, dtype, names=(None, "mlp"), name=None):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=layers.logical(nn.initializers.lecun_normal(), names),
                  bias_init=layers.logical(nn.initializers.zeros, names[1:]))


class MiniPointNet(nn.Module):
  """Patches [B, G, K, 3] -> tokens [B, G, width] (Point-BERT's two-stage PointNet)."""
  width: int
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, patches):
    dtype = layers.to_dtype(self.dtype)
    w = self.width
    x = _dense(max(w // 2, 1), dtype)(patches.astype(dtype))
    x = _dense(w, dtype)(nn.relu(_layernorm(self.dtype)(x)))
    pooled = jnp.max(x, axis=2, keepdims=True)
    x = jnp.concatenate([jnp.broadcast_to(pooled, x.shape), x], axis=-1)
    x = _dense(2 * w, dtype)(x)
    x = _dense(w, dtype, ("mlp", "embed"))(nn.relu(_layernorm(self.dtype)(x)))
    return jnp.max(x, axis=2)


class PointTransformer(nn.Module):
  """Point-BERT / ULIP point-cloud encoder (see the module docstring)."""
  width: int = 384
  depth: int = 12
  mlp_dim: Optional[int] = None  # default 4 * width
  num_heads: int = 6
  num_groups: int = 512
  group_size: int = 32
  pool: str = "tok"
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  dtype: Any = "float32"
  num_classes: Optional[int] = None  # the head's size (the embedding); None/0: no head
  head_zeroinit: bool = True

  @nn.compact
  def __call__(self, points, *, train: bool = False):
    if self.pool not in POOL_TYPES:
      raise ValueError(f"Unknown pool {self.pool!r}; valid: {POOL_TYPES}.")
    points = jnp.asarray(points, jnp.float32)
    if points.ndim != 3 or points.shape[-1] != 3:
      raise ValueError(f"PointTransformer takes points [batch, n, 3]; got shape {points.shape}.")
    n_points = points.shape[1]
    if not 1 <= self.num_groups <= n_points or not 1 <= self.group_size <= n_points:
      raise ValueError(f"num_groups={self.num_groups} and group_size={self.group_size} must be "
                       f"in [1, {n_points}] (the points per cloud); lower them or sample more "
                       "points (sample_points(n)).")
    dtype = layers.to_dtype(self.dtype)
    out = {}
    centres, patches = group_points(points, self.num_groups, self.group_size)
    out["centres"] = centres
    x = out["stem"] = MiniPointNet(self.width, self.dtype, name="embedding")(patches)
    pos = nn.gelu(_dense(128, dtype, name="pos_hidden")(centres.astype(dtype)))
    pos = _dense(self.width, dtype, ("mlp", "embed"), name="pos_embedding")(pos)
    x = out["with_posemb"] = x + pos
    n = x.shape[0]
    if self.pool == "tok":
      init = layers.logical(nn.initializers.normal(0.02), (None, None, "embed"))
      cls = self.param("cls", init, (1, 1, self.width), jnp.float32)
      cls_pos = self.param("cls_pos", init, (1, 1, self.width), jnp.float32)
      x = jnp.concatenate([jnp.tile((cls + cls_pos).astype(x.dtype), [n, 1, 1]), x], axis=1)
    x = layers.constrain(x)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    block = layers.BlockConfig(num_heads=self.num_heads, mlp_dim=self.mlp_dim or 4 * self.width,
                               dropout=self.dropout, dtype=self.dtype)
    x, out["encoder"] = layers.Encoder(depth=self.depth, block=block, scan=self.scan,
                                       remat_policy=self.remat_policy, name="Transformer",
                                       )(x, None, deterministic=not train)
    out["encoded"] = x
    if self.pool == "tok":
      x = x[:, 0]
    elif self.pool == "gap":
      x = jnp.mean(x, axis=1)
    else:
      x = jnp.max(x, axis=1)
    out["head_input"] = out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = layers.head(self.num_classes, zeroinit=self.head_zeroinit,
                                      dtype=dtype)(x)
    return x, out
