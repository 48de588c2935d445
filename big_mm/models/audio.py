"""Audio Spectrogram Transformer (AST-style tower, "audio_transformer"): a ViT over the log-mel
spectrogram [B, T, F] (big_mm/input/audio.py) read as a 1-channel image.

AST (Gong et al. 2021, "AST: Audio Spectrogram Transformer", section 2.1) splits a 128-bin
spectrogram into 16x16 patches with an overlap of 6 in time and frequency (patch_size=16,
patch_stride=10 here), adds learned position embeddings and pools its [CLS] token (with a
DeiT distillation token, not built here: pool="tok" is the closest). CLAP's audio tower
(HTS-AT) is a Swin-style hierarchy, not this.

Param tree (ViT's names, big_mm/models/vit.py):
  embedding/{kernel [p_t, p_f, 1, D], bias [D]}   conv patch embedding, strides patch_stride
  pos_embedding [1, N, D]                         (posemb="learn"; N = rows x cols of patches)
  cls [1, 1, D]                                   (pool="tok")
  Transformer/encoderblock_{i}/... , Transformer/encoder_norm   (scan: encoderblock/...)
  MAPHead_0/...                                   (pool="map")
  head/{kernel [D, num_classes], bias}            (num_classes set)

`AudioTransformer(...)(x [B, T, F], train=False) -> (x, out)`: x is the head output (the
pooled features without a head); out holds "stem" [B, t, f, D] (the patch grid: t along time,
f along frequency), "encoded" [B, t * f, D], "head_input", "pre_logits" and "logits" (with
a head). The grid is t = (T - p_t) // s_t + 1, f = (F - p_f) // s_f + 1.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax.numpy as jnp

from big_mm.models import layers
from big_mm.models.vit import resolve_arch

POOL_TYPES = ("tok", "gap", "map")


def _pair(v, what: str) -> tuple[int, int]:
  pair = (v, v) if isinstance(v, int) else tuple(v)
  if len(pair) != 2 or not all(isinstance(i, int) and i > 0 for i in pair):
    raise ValueError(f"{what} must be a positive int or (time, freq) ints; got {v!r}.")
  return pair


class AudioTransformer(nn.Module):
  """AST-style ViT over [B, T, F] spectrograms. Architecture from `variant` (ViT's: "B/16",
  "S", ...); explicit fields override it."""
  variant: Optional[str] = None
  width: Optional[int] = None        # default (no variant): B/16
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None      # default 4 * width
  num_heads: Optional[int] = None
  patch_size: Optional[Union[int, Sequence[int]]] = None     # (p_t, p_f) or one int
  patch_stride: Optional[Union[int, Sequence[int]]] = None   # default patch_size (no overlap)
  num_classes: Optional[int] = None  # head output size; None/0 = no head
  posemb: str = "learn"              # "learn" | "sincos2d"
  pool: str = "gap"                  # "tok" | "gap" | "map"
  head_zeroinit: bool = True
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  attn_implementation: str = "xla"
  dtype: Any = "float32"             # compute dtype; params stay float32

  def arch(self) -> dict:
    a = resolve_arch(self, dict(width=768, depth=12, mlp_dim=None, num_heads=12,
                                patch_size=(16, 16)))
    a["patch_size"] = _pair(a["patch_size"], "patch_size")
    stride = a["patch_size"] if self.patch_stride is None else self.patch_stride
    a["patch_stride"] = _pair(stride, "patch_stride")
    return a

  @nn.compact
  def __call__(self, x, *, train: bool = False):
    if self.pool not in POOL_TYPES:
      raise ValueError(f"Unknown pool {self.pool!r}; valid: {POOL_TYPES}.")
    if x.ndim != 3:
      raise ValueError(f"AudioTransformer takes spectrograms [batch, frames, mels]; got shape "
                       f"{tuple(x.shape)}.")
    a = self.arch()
    (pt, pf), (st, sf) = a["patch_size"], a["patch_stride"]
    if x.shape[1] < pt or x.shape[2] < pf:
      raise ValueError(f"A spectrogram of {x.shape[1]} frames x {x.shape[2]} mels is smaller "
                       f"than one patch {a['patch_size']}; use more frames / mels (log_mel) or "
                       "a smaller patch_size.")
    dtype = layers.to_dtype(self.dtype)
    out = {}
    x = out["stem"] = nn.Conv(
        a["width"], (pt, pf), strides=(st, sf), padding="VALID", dtype=dtype,
        param_dtype=jnp.float32, name="embedding",
        kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
    )(jnp.asarray(x, dtype)[..., None])
    n, t, f, c = x.shape
    x = jnp.reshape(x, [n, t * f, c])
    x = x + layers.get_posemb(self, self.posemb, (t, f), c, "pos_embedding", x.dtype)
    if self.pool == "tok":
      cls = self.param("cls", layers.logical(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)
    x = layers.constrain(x)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    block = layers.BlockConfig(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                               dropout=self.dropout, attn_implementation=self.attn_implementation,
                               dtype=self.dtype)
    x, _ = layers.Encoder(depth=a["depth"], block=block, scan=self.scan,
                          remat_policy=self.remat_policy, name="Transformer",
                          )(x, deterministic=not train)
    if self.pool == "tok":
      out["encoded"] = x[:, 1:]
      x = x[:, 0]
    else:
      out["encoded"] = x
      x = (jnp.mean(x, axis=1) if self.pool == "gap" else layers.MAPHead(
          num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
          attn_implementation=self.attn_implementation, dtype=self.dtype)(x))
    out["head_input"] = out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = layers.head(self.num_classes, zeroinit=self.head_zeroinit,
                                      dtype=dtype)(x)
    return x, out
