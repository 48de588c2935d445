"""Discrete tokenizers for image-like modalities (4M's per-modality tokenizers; Mizrahi et al.
2023): a conv encoder, a quantizer and a conv decoder, trained by objective "vq_tokenizer"
(big_mm/objectives/vq.py).

  out = VQTokenizer(...).apply({"params": p}, x)   # out["recon"], out["codes"], out["z"], ...
  tok = load(workdir)                               # a trained run as a tokenizer object
  codes = tok.encode(x)                             # int32 [B, h * w], row-major
  y = tok.decode(codes)

One modality per tokenizer (`modality`):
  rgb:    f32 [B, H, W, 3] in [-1, 1]  -> recon f32 [B, H, W, 3] (same range, unclipped)
  depth:  f32 [B, H, W] metres, normalised inside by (d - depth_mean) / depth_std
          -> recon [B, H, W] in those normalised units (`decode` gives metres)
  semseg: int [B, H, W] class ids (a learned class embedding in) -> logits [B, H, W, C]
The encoder downsamples by `downsample` (a power of 2: one stride-2 conv per factor 2, each
after `num_res_blocks` residual blocks of width `channels`), the decoder mirrors it with
nearest-neighbour upsampling; a 32x32 input at downsample 4 gives an 8x8 = 64-token grid.

Quantizers:
  vq:  a codebook [codebook_size, code_dim] (param `codebook`); codes and encoder outputs
       are l2-normalised and looked up by cosine similarity (ViT-VQGAN, Yu et al. 2021:
       better codebook usage than Euclidean lookup), the straight-through estimator passes
       the decoder's gradient to the encoder (van den Oord et al. 2017). The codebook and
       commitment losses are the objective's.
  fsq: finite scalar quantisation (Mentzer et al. 2023): len(levels) latent dims, each
       bounded by tanh to `levels[i]` values and rounded (straight-through); no codebook, no
       auxiliary loss. Code index = mixed-radix number of the per-dim digits (first dim least
       significant), vocab = prod(levels), e.g. (8, 5, 5, 5) -> 1000.

Param tree: `encoder/...`, `decoder/...`, `codebook` (vq), `class_embedding` (semseg).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_mm import config as config_lib
from big_mm.models import layers

MODALITIES = ("rgb", "depth", "semseg")
QUANTIZERS = ("vq", "fsq")


def _conv(features, kernel, dtype, name, strides=1):
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides), padding="SAME",
                 dtype=dtype, param_dtype=jnp.float32, name=name,
                 kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                            (None, None, None, "embed")),
                 bias_init=layers.logical(nn.initializers.zeros, ("embed",)))


class ResBlock(nn.Module):
  """x + conv3(silu(gn(conv3(silu(gn(x))))))."""
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    groups = math.gcd(8, self.channels)
    h = nn.silu(nn.GroupNorm(groups, dtype=self.dtype, name="norm1")(x))
    h = _conv(self.channels, 3, self.dtype, "conv1")(h)
    h = nn.silu(nn.GroupNorm(groups, dtype=self.dtype, name="norm2")(h))
    return x + _conv(self.channels, 3, self.dtype, "conv2")(h)


class Encoder(nn.Module):
  channels: int
  levels: int            # log2(downsample)
  num_res_blocks: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = _conv(self.channels, 3, self.dtype, "conv_in")(x)
    for i in range(self.levels):
      for j in range(self.num_res_blocks):
        x = ResBlock(self.channels, self.dtype, name=f"down{i}_res{j}")(x)
      x = _conv(self.channels, 4, self.dtype, f"down{i}", strides=2)(x)
    for j in range(self.num_res_blocks):
      x = ResBlock(self.channels, self.dtype, name=f"mid_res{j}")(x)
    x = nn.silu(nn.GroupNorm(math.gcd(8, self.channels), dtype=self.dtype, name="norm_out")(x))
    return _conv(self.out_dim, 1, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
  channels: int
  levels: int
  num_res_blocks: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z):
    x = _conv(self.channels, 3, self.dtype, "conv_in")(z)
    for j in range(self.num_res_blocks):
      x = ResBlock(self.channels, self.dtype, name=f"mid_res{j}")(x)
    for i in range(self.levels):
      b, h, w, c = x.shape
      x = jax.image.resize(x, (b, 2 * h, 2 * w, c), "nearest")
      x = _conv(self.channels, 3, self.dtype, f"up{i}")(x)
      for j in range(self.num_res_blocks):
        x = ResBlock(self.channels, self.dtype, name=f"up{i}_res{j}")(x)
    x = nn.silu(nn.GroupNorm(math.gcd(8, self.channels), dtype=self.dtype, name="norm_out")(x))
    return _conv(self.out_dim, 3, self.dtype, "conv_out")(x).astype(jnp.float32)


# ---- FSQ ------------------------------------------------------------------------------------

def _round_ste(x):
  return x + jax.lax.stop_gradient(jnp.round(x) - x)


def fsq_quantize(z, levels):
  """z [..., d] (d = len(levels)) -> (quantised values in [-1, 1] [..., d] with straight-through
  gradients, int32 code index [...]). Mentzer et al. 2023 (google-research/fsq): dim i is
  bounded to (L_i - 1)(1 - eps) / 2 by tanh (shifted by half a step for even L_i, with the
  reference code's tan(offset / half_l) input shift, finite also for L_i = 2), rounded, and
  divided by L_i // 2: L_i values in [-1, 1]."""
  levels_arr = jnp.asarray(levels, jnp.float32)
  eps = 1e-3
  half_l = (levels_arr - 1) * (1 - eps) / 2
  offset = jnp.where(jnp.asarray(levels) % 2 == 0, 0.5, 0.0)
  shift = jnp.tan(offset / half_l)
  bounded = jnp.tanh(z.astype(jnp.float32) + shift) * half_l - offset
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  quantized = _round_ste(bounded) / half_width
  return quantized, fsq_index(quantized, levels)


def _basis(levels):
  return np.cumprod((1,) + tuple(levels[:-1])).astype(np.int32)


def fsq_index(quantized, levels):
  """Quantised values [..., d] -> int32 mixed-radix index (first dim least significant)."""
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  digits = jnp.round(jax.lax.stop_gradient(quantized) * half_width + half_width)
  return jnp.sum(digits.astype(jnp.int32) * _basis(levels), axis=-1).astype(jnp.int32)


def fsq_values(codes, levels):
  """int code index [...] -> quantised values [..., d] in [-1, 1] (inverse of fsq_index)."""
  levels_arr = np.asarray(levels, np.int32)
  digits = (jnp.asarray(codes, jnp.int32)[..., None] // _basis(levels)) % levels_arr
  half_width = jnp.asarray([l // 2 for l in levels], jnp.float32)
  return (digits.astype(jnp.float32) - half_width) / half_width


# ---- the model ------------------------------------------------------------------------------

def _l2norm(x, axis=-1):
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + 1e-12)


class VQTokenizer(nn.Module):
  """Encoder -> quantizer -> decoder for one modality; see the module docstring.

  __call__(x) -> {"recon": the decoder's output (rgb [B,H,W,3], depth normalised [B,H,W],
  semseg logits [B,H,W,C]), "codes": int32 [B, h*w], "z": the encoder output [B, h, w, d]
  (l2-normalised for vq), "zq": the quantised latents [B, h, w, d] (no straight-through)}.
  """
  modality: str = "rgb"
  image_size: int = 32
  downsample: int = 4
  channels: int = 64
  num_res_blocks: int = 1
  quantizer: str = "fsq"
  codebook_size: int = 1024      # vq
  code_dim: int = 16             # vq
  levels: tuple = (8, 5, 5, 5)   # fsq
  num_classes: int = 4           # semseg
  class_embed_dim: int = 16      # semseg
  depth_mean: float = 6.0
  depth_std: float = 2.5
  dtype: Any = "float32"

  def __post_init__(self):
    if self.modality not in MODALITIES:
      raise ValueError(f"model.modality={self.modality!r}: choose one of {MODALITIES}.")
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f"model.quantizer={self.quantizer!r}: choose one of {QUANTIZERS}.")
    d = self.downsample
    if not isinstance(d, int) or d < 1 or d & (d - 1):
      raise ValueError(f"model.downsample={d!r} must be a power of 2 (1, 2, 4, 8, ...).")
    if self.image_size % d:
      raise ValueError(f"model.image_size={self.image_size} is not divisible by "
                       f"model.downsample={d}.")
    if self.quantizer == "fsq" and (not self.levels or any(l < 2 for l in self.levels)):
      raise ValueError(f"model.levels={self.levels!r} must be levels >= 2 per dim, e.g. "
                       "(8, 5, 5, 5).")
    super().__post_init__()

  @property
  def grid(self) -> tuple[int, int]:
    n = self.image_size // self.downsample
    return (n, n)

  @property
  def vocab_size(self) -> int:
    return int(np.prod(self.levels)) if self.quantizer == "fsq" else int(self.codebook_size)

  @property
  def latent_dim(self) -> int:
    return len(self.levels) if self.quantizer == "fsq" else int(self.code_dim)

  @property
  def out_dim(self) -> int:
    return {"rgb": 3, "depth": 1, "semseg": self.num_classes}[self.modality]

  def setup(self):
    dtype = layers.to_dtype(self.dtype)
    levels = int(math.log2(self.downsample))
    self.encoder = Encoder(self.channels, levels, self.num_res_blocks, self.latent_dim, dtype)
    self.decoder = Decoder(self.channels, levels, self.num_res_blocks, self.out_dim, dtype)
    if self.quantizer == "vq":
      self.codebook = self.param(
          "codebook", layers.logical(nn.initializers.normal(self.code_dim ** -0.5), (None, None)),
          (self.codebook_size, self.code_dim), jnp.float32)
    if self.modality == "semseg":
      self.class_embedding = nn.Embed(
          self.num_classes, self.class_embed_dim, dtype=dtype, param_dtype=jnp.float32,
          embedding_init=layers.logical(nn.initializers.normal(1.0), (None, None)))

  def _features(self, x):
    dtype = layers.to_dtype(self.dtype)
    if self.modality == "rgb":
      return jnp.asarray(x, dtype)
    if self.modality == "depth":
      return ((jnp.asarray(x, jnp.float32) - self.depth_mean) / self.depth_std)[..., None].astype(
          dtype)
    return self.class_embedding(jnp.asarray(x, jnp.int32))

  def latents(self, x):
    """The encoder's output [B, h, w, d] (l2-normalised for vq)."""
    z = self.encoder(self._features(x)).astype(jnp.float32)
    return _l2norm(z) if self.quantizer == "vq" else z

  def quantize(self, z):
    """z [B, h, w, d] -> (quantised [B, h, w, d] with straight-through gradient to z,
    quantised without it, int32 codes [B, h, w])."""
    if self.quantizer == "fsq":
      q, codes = fsq_quantize(z, self.levels)
      return q, jax.lax.stop_gradient(q), codes
    book = _l2norm(self.codebook)
    codes = jnp.argmax(jnp.einsum("bhwd,kd->bhwk", jax.lax.stop_gradient(z), book), axis=-1)
    zq = book[codes]
    return z + jax.lax.stop_gradient(zq - z), zq, codes.astype(jnp.int32)

  def code_values(self, codes):
    """int32 [B, h*w] -> quantised latents [B, h, w, d]."""
    h, w = self.grid
    codes = jnp.reshape(jnp.asarray(codes, jnp.int32), (-1, h, w))
    if self.quantizer == "fsq":
      return fsq_values(codes, self.levels)
    return _l2norm(self.codebook)[codes]

  def __call__(self, x, train: bool = False):
    del train  # no dropout
    z = self.latents(x)
    zq_st, zq, codes = self.quantize(z)
    recon = self.decoder(zq_st)
    return {"recon": self._out(recon), "codes": codes.reshape(codes.shape[0], -1), "z": z,
            "zq": zq}

  def _out(self, y):
    return y[..., 0] if self.modality == "depth" else y

  def encode(self, x):
    """x (see the module docstring) -> int32 codes [B, h*w], row-major."""
    codes = self.quantize(self.latents(x))[2]
    return codes.reshape(codes.shape[0], -1)

  def decode_codes(self, codes):
    """int32 [B, h*w] -> the decoder's output (depth in normalised units)."""
    return self._out(self.decoder(self.code_values(codes)))

  def to_output(self, recon):
    """The decoder's output -> the modality's units (depth: metres; others unchanged)."""
    if self.modality == "depth":
      return recon * self.depth_std + self.depth_mean
    return recon


# ---- a trained run as a tokenizer -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tokenizer:
  """A trained vq_tokenizer run (params closed over). encode / decode are jax-traceable:
  encode(x) -> int32 [B, num_tokens]; decode(codes) -> rgb [B,H,W,3] in [-1, 1] / depth
  [B,H,W] metres / semseg logits [B,H,W,C]."""
  modality: str
  grid: tuple[int, int]
  vocab_size: int
  image_size: int
  model: VQTokenizer
  params: Any
  workdir: str
  step: int

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  def encode(self, x):
    return self.model.apply({"params": self.params}, x, method=VQTokenizer.encode)

  def decode(self, codes):
    recon = self.model.apply({"params": self.params}, codes, method=VQTokenizer.decode_codes)
    return self.model.to_output(recon)


def load(workdir: str, step: int | None = None) -> Tokenizer:
  """The vq_tokenizer run in `workdir` (its config.json and checkpoint at `step`, default the
  newest) as a Tokenizer. ConfigError when the workdir holds another kind of run."""
  from big_mm import cli  # pylint: disable=g-import-not-at-top  (cli imports the models)
  config = cli.read_config(workdir)
  if config is None:
    raise config_lib.ConfigError(
        f"{workdir!r} has no config.json, so it is not a big_mm training run; give the workdir "
        "of a run trained with model_name='vq_tokenizer' (e.g. configs/demo_4m_tokenizer.py).")
  if config.get("model_name") != "vq_tokenizer":
    raise config_lib.ConfigError(
        f"{workdir!r} is a model_name={config.get('model_name')!r} run, not a vq_tokenizer run; "
        "train one with configs/demo_4m_tokenizer.py.")
  model = VQTokenizer(**config.model.to_dict())
  params, step = cli.restore_params(workdir, step)
  params = jax.tree.map(jnp.asarray, params)
  return Tokenizer(modality=model.modality, grid=model.grid, vocab_size=model.vocab_size,
                   image_size=model.image_size, model=model, params=params,
                   workdir=str(workdir), step=int(step))
