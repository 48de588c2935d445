"""An MLP tower for feature-vector modalities (kind "vector": precomputed features, Symile's
synthetic bits): `MlpTower(num_classes=D)(x [B, d], train=) -> (pooled [B, D'], out)`.

Param tree: `hidden_{i}/{kernel, bias}` (i < depth), then `head/{kernel, bias}` when
num_classes is set. Hidden layers are Dense -> GELU -> dropout; the head is linear.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from big_mm.models import layers


class MlpTower(nn.Module):
  width: int = 256
  depth: int = 2
  dropout: float = 0.0
  num_classes: Optional[int] = None  # the head's size (the embedding); None: no head
  head_zeroinit: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    x = jnp.asarray(x, jnp.float32)
    if x.ndim != 2:
      raise ValueError(f"MlpTower takes [batch, features] vectors; got shape {x.shape}.")
    out = {}
    for i in range(self.depth):
      x = nn.Dense(self.width, name=f"hidden_{i}",
                   kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, "mlp")),
                   bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))(x)
      x = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(x))
    out["pre_logits"] = x
    if self.num_classes:
      x = layers.head(self.num_classes, zeroinit=self.head_zeroinit, in_axis="mlp")(x)
      out["logits"] = x
    return x, out
