"""VideoMAE (V2): a space-time ViT over the visible tubelets and a small decoder that predicts
the pixels of chosen masked ones (objective "videomae", big_mm/objectives/videomae.py).

  preds, out = VideoMAE(...).apply({"params": p}, video, visible, targets, train=False)

video: f32 [B, T, H, W, 3]. Its tokens are the encoder's tubelets (tubelet_size x p x p), in
row-major (t, h, w) order: N = t*h*w tokens, `grid(video_shape)` = (t, h, w). visible: int32
[B, K], the tokens the encoder sees (VideoViT's `visible=`: gathered after its position
embedding); targets: int32 [B, M], the tokens whose pixels the decoder predicts.
preds: f32 [B, M, tubelet_size*p*p*3] in `patchify`'s layout; out["encoded"]: the encoder's
output [B, K, D], out["pooled"]: its mean [B, D].

The encoder is VideoViT (big_mm/models/video.py; `encoder`: its kwargs, pool "none", no head)
under scope `vid`, so it loads into (and from) a video tower. The decoder (scope `dec`,
`decoder`: width / depth / num_heads / mlp_dim / posemb) follows VideoMAE V2's
(OpenGVLab/VideoMAEv2@29eab1e models/modeling_pretrain.py PretrainVisionTransformer): the
encoded tokens linearly projected to its width without bias (`embedding`), plus their decoder
position embedding; one learned [MASK] token (`mask_token`) plus position embedding per target;
`depth` pre-LN blocks (`Transformer/...`, ending with LayerNorm `encoder_norm`) over the K + M
tokens; a linear `head` on the M targets. Position embedding: "sincos" (the repo's fixed 1-D
sinusoid table over the flattened token index) or "learn" (`pos_embedding` [1, N, width]).
There the decoder gets a [MASK] query at every position its mask keeps, encoder-visible ones
included (their outputs unused); here only at the targets (the loss is the same set of tokens).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_mm.models import layers
from big_mm.models import video as video_lib

DECODER_KEYS = ("width", "depth", "num_heads", "mlp_dim", "posemb")
DECODER_DEFAULTS = dict(width=384, depth=4, num_heads=6, mlp_dim=None, posemb="sincos")
# Encoder kwargs the model sets itself (VideoMAE's encoder has no pooling and no head).
FIXED_ENCODER_KEYS = ("pool", "pool_type", "num_classes")


def sinusoid_table(length: int, width: int) -> np.ndarray:
  """[1, length, width]: sin at even, cos at odd channels of pos / 10000^(2*(j//2)/width)
  (VideoMAE's get_sinusoid_encoding_table, OpenGVLab/VideoMAEv2@29eab1e
  models/modeling_finetune.py)."""
  pos = np.arange(length, dtype=np.float64)[:, None]
  j = np.arange(width)
  angle = pos / np.power(10_000.0, 2 * (j // 2) / width)[None, :]
  table = np.where(j % 2 == 0, np.sin(angle), np.cos(angle))
  return table[None].astype(np.float32)


def patchify(video, sizes):
  """[B, T, H, W, C] -> [B, N, tt*ph*pw*C] with sizes = (tt, ph, pw) the tubelet: row-major
  (t, h, w) tokens, each laid out (dt, dy, dx, c) like the tubelet kernel [tt, ph, pw, 3, D]."""
  (b, t, h, w, c), (tt, ph, pw) = video.shape, sizes
  x = video.reshape(b, t // tt, tt, h // ph, ph, w // pw, pw, c)
  x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7)
  return x.reshape(b, (t // tt) * (h // ph) * (w // pw), tt * ph * pw * c)


def unpatchify(tokens, sizes, shape):
  """Inverse of `patchify`: [B, N, tt*ph*pw*C] -> [B, T, H, W, C] (shape = (T, H, W, C))."""
  (t, h, w, c), (tt, ph, pw) = shape, sizes
  x = tokens.reshape(tokens.shape[0], t // tt, h // ph, w // pw, tt, ph, pw, c)
  x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
  return x.reshape(tokens.shape[0], t, h, w, c)


class Decoder(nn.Module):
  """Encoded visible tokens + [MASK] queries at the targets -> per-target pixels [B, M, out]."""
  out_dim: int
  width: int
  depth: int
  block: layers.BlockConfig
  posemb: str = "sincos"

  @nn.compact
  def __call__(self, encoded, visible, targets, num_tokens: int):
    dtype = layers.to_dtype(self.block.dtype)
    if self.posemb == "learn":
      pos = layers.learned_posemb(self, "pos_embedding", num_tokens, self.width)[0]
    else:
      pos = jnp.asarray(sinusoid_table(num_tokens, self.width)[0])
    x = nn.Dense(self.width, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                 name="embedding",
                 kernel_init=layers.logical(nn.initializers.xavier_uniform(), ("embed", None)),
                 )(encoded.astype(dtype))
    mask_token = self.param("mask_token", layers.logical(nn.initializers.truncated_normal(0.02),
                                                          (None, None, "embed")),
                            (1, 1, self.width), jnp.float32)
    queries = mask_token + pos[targets]
    x = jnp.concatenate([x + pos[visible].astype(dtype), queries.astype(dtype)], axis=1)
    x, _ = layers.Encoder(depth=self.depth, block=self.block, name="Transformer")(
        layers.constrain(x))
    x = x[:, visible.shape[1]:]
    return nn.Dense(self.out_dim, dtype=dtype, param_dtype=jnp.float32, name="head",
                    kernel_init=layers.logical(nn.initializers.xavier_uniform(), ("embed", None)),
                    bias_init=layers.logical(nn.initializers.zeros, (None,)),
                    )(x).astype(jnp.float32)


class VideoMAE(nn.Module):
  """See the module docstring. encoder: VideoViT kwargs (variant / width / depth / mlp_dim /
  num_heads / patch_size / tubelet_size / posemb / scan / remat_policy / ...); decoder: a dict
  of DECODER_KEYS (defaults DECODER_DEFAULTS: VideoMAE V2 ViT-B's decoder, width 384, 4 blocks,
  6 heads)."""
  encoder: Optional[Any] = None
  decoder: Optional[Any] = None
  attn_implementation: str = "xla"
  dtype: Any = "float32"

  def __post_init__(self):
    enc = dict(self.encoder or {})
    fixed = sorted(set(enc) & set(FIXED_ENCODER_KEYS))
    if fixed:
      raise TypeError(f"model.encoder sets {fixed}, which VideoMAE fixes (pool 'none', no head); "
                      "remove them.")
    bad = sorted(set(dict(self.decoder or {})) - set(DECODER_KEYS))
    if bad:
      raise TypeError(f"Invalid model.decoder option(s) {bad}; valid: {list(DECODER_KEYS)}.")
    self.decoder_arch()
    super().__post_init__()

  # ---- static shapes -------------------------------------------------------------------

  def encoder_kwargs(self) -> dict:
    kw = dict(self.encoder or {})
    kw.setdefault("dtype", self.dtype)
    kw.setdefault("attn_implementation", self.attn_implementation)
    return dict(kw, pool="none", num_classes=None)

  def patch_sizes(self) -> tuple[int, int, int]:
    """(tubelet_size, patch height, patch width) of the encoder's tubelets."""
    vit = video_lib.VideoViT(**self.encoder_kwargs(), parent=None)
    return (vit.tubelet_size,) + tuple(vit.arch()["patch_size"])

  def grid(self, video_shape) -> tuple[int, int, int]:
    """(t, h, w) token grid of one clip of shape [T, H, W, 3]; ValueError if it does not tile."""
    tub, ph, pw = self.patch_sizes()
    t, h, w = tuple(video_shape)[:3]
    if t % tub or h % ph or w % pw:
      raise ValueError(f"A clip of {t} frames of {h}x{w} does not tile into {tub}x{ph}x{pw} "
                       "tubelets; make frames a multiple of model.encoder.tubelet_size and the "
                       "crop size a multiple of model.encoder.patch_size.")
    return t // tub, h // ph, w // pw

  def decoder_arch(self) -> dict:
    arch = dict(DECODER_DEFAULTS, **dict(self.decoder or {}))
    if arch["mlp_dim"] is None:
      arch["mlp_dim"] = 4 * arch["width"]
    if arch["posemb"] not in ("sincos", "learn"):
      raise ValueError(f"model.decoder.posemb={arch['posemb']!r}; use 'sincos' or 'learn'.")
    return arch

  # ---- forward -------------------------------------------------------------------------

  def setup(self):
    tt, ph, pw = self.patch_sizes()
    arch = self.decoder_arch()
    block = layers.BlockConfig(num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"],
                               attn_implementation=self.attn_implementation, dtype=self.dtype)
    self.vid = video_lib.VideoViT(**self.encoder_kwargs())
    self.dec = Decoder(out_dim=tt * ph * pw * 3, width=arch["width"], depth=arch["depth"],
                       block=block, posemb=arch["posemb"])

  def __call__(self, video, visible, targets, *, train=False):
    encoded = self.encode(video, visible, train=train)
    preds = self.dec(encoded, visible, targets, int(np.prod(self.grid(video.shape[1:]))))
    return preds, {"encoded": encoded,
                   "pooled": jnp.mean(encoded.astype(jnp.float32), axis=1)}

  def encode(self, video, visible=None, *, train=False):
    """The encoder's output [B, K, D] over the `visible` tokens (None: all, [B, N, D])."""
    kw = {} if visible is None else {"visible": visible}
    _, out = self.vid(video, train=train, **kw)
    return out["encoded"]
