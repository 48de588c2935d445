"""MultiMAE: several image-aligned modalities (and text), one shared ViT over visible tokens.

  preds, out = MultiMAE(...).apply({"params": p}, inputs, visible, valid, train=False)

inputs: {"rgb": f32 [B, H, W, 3], "depth": f32 [B, H, W], "semseg": i32 [B, H, W],
"text": i32 [B, L]} (any subset of `modalities`; a missing one is zeros). Each modality
becomes tokens through its input adapter (patch embedding for rgb / depth; a per-pixel class
embedding then a patch embedding for semseg; a token embedding for text), plus a position
and a modality embedding. The tokens of all modalities are concatenated in `modalities`
order ([B, N] with N = sum of `num_tokens()`); `visible` [B, K] picks the K that the encoder
sees and `valid` [B, K] says which picks are real (padding picks are masked out as keys).
Masked tokens never reach the encoder: they are dropped before it.

The encoder is a ViT (`encoder`: variant / width / depth / num_heads / mlp_dim) over
[global tokens; visible tokens]. Each modality's output adapter is a small decoder
(`decoder`: width / depth / num_heads / mlp_dim): one query per token of the modality (a
learned [MASK] embedding plus its position and modality embedding) cross-attends to the
encoded tokens (whose context keys carry their patch's 2-D position embedding), then `depth`
self-attention blocks, then a linear head per patch/token:
  rgb:    p*p*3 normalised pixels (+ 2: the patch's pixel mean and std, so that an image can
          be rebuilt when the patch was never seen; see objectives/masked.py)
  depth:  p*p values of (depth - depth_mean) / depth_std
  semseg: p*p*num_semseg_classes logits
  text:   vocab_size logits
(MultiMAE's decoders also take the modality's own visible tokens as queries; here every query
is a [MASK] token and the visible ones are reached through cross-attention.)

preds: {m: [B, N_m, out_m]}; out["pooled"]: mean of the encoded visible tokens [B, D],
out["encoded"]: [B, G + K, D].

Param tree: `adapter_{m}/...`, `encoder/` (global_tokens, Transformer/encoderblock_i/...),
`decoder_{m}/...`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_mm.models import layers
from big_mm.models.vit import decode_variant



ARCH_KEYS = ("variant", "width", "depth", "mlp_dim", "num_heads")


def _arch(cfg, defaults: dict) -> dict:
  """{variant, width, depth, mlp_dim, num_heads} dict -> resolved architecture."""
  cfg = dict(cfg or {})
  a = dict(defaults)
  a.update({k: v for k, v in decode_variant(cfg.get("variant")).items() if k != "patch_size"})
  a.update({k: v for k, v in cfg.items() if k != "variant" and v is not None})
  if a.get("mlp_dim") is None:
    a["mlp_dim"] = 4 * a["width"]
  return a


def _dense(features, dtype, name, axes=("embed", None)):
  return nn.Dense(features, dtype=dtype, param_dtype=jnp.float32, name=name,
                  kernel_init=layers.logical(nn.initializers.xavier_uniform(), axes),
                  bias_init=layers.logical(nn.initializers.zeros, (axes[1],)))


def _embedding(module, name, shape, axes, stddev=0.02):
  return module.param(name, layers.logical(nn.initializers.normal(stddev), axes), shape,
                      jnp.float32)


# The modalities with adapters here (names of big_mm/modalities.py; "rgb" is the image).
MODALITIES = ("rgb", "depth", "semseg", "text")


class InputAdapter(nn.Module):
  """One modality -> tokens [B, N_m, D] (with position and modality embeddings)."""
  modality: str
  width: int
  patch_size: int
  grid: tuple
  num_semseg_classes: int = 0
  semseg_embed_dim: int = 64
  vocab_size: int = 0
  text_len: int = 0
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, x):
    dtype = layers.to_dtype(self.dtype)
    p = self.patch_size
    patch = nn.Conv(self.width, (p, p), strides=(p, p), padding="VALID", dtype=dtype,
                    param_dtype=jnp.float32, name="embedding",
                    kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                               (None, None, None, "embed")),
                    bias_init=layers.logical(nn.initializers.zeros, ("embed",)))
    if self.modality == "rgb":
      x = patch(jnp.asarray(x, dtype))
    elif self.modality == "depth":
      x = patch(jnp.asarray(x, dtype)[..., None])
    elif self.modality == "semseg":
      classes = nn.Embed(self.num_semseg_classes, self.semseg_embed_dim, dtype=dtype,
                         param_dtype=jnp.float32, name="class_embedding",
                         embedding_init=layers.logical(nn.initializers.normal(1.0),
                                                       (None, None)))
      x = patch(classes(jnp.asarray(x, jnp.int32)))
    else:  # text
      x = nn.Embed(self.vocab_size, self.width, dtype=dtype, param_dtype=jnp.float32,
                   name="token_embedding",
                   embedding_init=layers.logical(nn.linear.default_embed_init,
                                                 ("vocab", "embed")))(jnp.asarray(x, jnp.int32))
    if self.modality != "text":
      x = jnp.reshape(x, (x.shape[0], -1, x.shape[-1]))
      pos = layers.posemb_sincos_2d(*self.grid, self.width, dtype=dtype)
    else:
      pos = layers.learned_posemb(self, "pos_embedding", self.text_len, self.width).astype(dtype)
    kind = _embedding(self, "modality_embedding", (1, 1, self.width), (None, None, "embed"))
    return x + pos + kind.astype(dtype)


class CrossBlock(nn.Module):
  """Pre-LN cross-attention (queries -> context) and MLP (no dropout)."""
  block: layers.BlockConfig

  @nn.compact
  def __call__(self, x, context, context_mask):
    cfg = self.block
    q = layers._layernorm(cfg.dtype)(x)
    kv = layers._layernorm(cfg.dtype)(context)
    x = x + layers.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, implementation=cfg.attn_implementation, dtype=cfg.dtype,
        name="CrossAttention")(q, kv, mask=context_mask)
    y = layers._layernorm(cfg.dtype)(x)
    return layers.constrain(x + cfg.build_mlp()(y, True))


class OutputAdapter(nn.Module):
  """Queries for every token of one modality -> per-token predictions [B, N_m, out_dim]
  (`block`: the decoder blocks' config, dropout 0)."""
  modality: str
  num_tokens: int
  out_dim: int
  width: int
  depth: int
  block: layers.BlockConfig
  grid: Optional[tuple] = None

  @nn.compact
  def __call__(self, encoded, encoded_mask, context_pos):
    dtype = layers.to_dtype(self.block.dtype)
    b = encoded.shape[0]
    context = _dense(self.width, dtype, "context_proj")(encoded) + context_pos.astype(dtype)
    mask_token = _embedding(self, "mask_token", (1, 1, self.width), (None, None, "embed"))
    if self.grid is not None:
      pos = layers.posemb_sincos_2d(*self.grid, self.width, dtype=dtype)
    else:
      pos = layers.learned_posemb(self, "pos_embedding", self.num_tokens, self.width).astype(dtype)
    kind = _embedding(self, "modality_embedding", (1, 1, self.width), (None, None, "embed"))
    x = jnp.tile((mask_token + kind).astype(dtype), (b, self.num_tokens, 1)) + pos
    x = CrossBlock(block=self.block, name="cross")(x, context, encoded_mask[:, None, None, :])
    if self.depth:
      x, _ = layers.Encoder(depth=self.depth, block=self.block, name="Transformer")(x)
    else:
      x = layers._layernorm(self.block.dtype, name="norm")(x)
    return _dense(self.out_dim, dtype, "head", ("embed", None))(x).astype(jnp.float32)


class MultiMAE(nn.Module):
  """See the module docstring. encoder / decoder: architecture dicts."""
  modalities: Sequence[str] = ("rgb", "depth", "semseg")
  image_size: int = 224
  patch_size: int = 16
  encoder: Optional[Any] = None
  decoder: Optional[Any] = None
  num_global_tokens: int = 1
  num_semseg_classes: int = 133
  semseg_embed_dim: int = 64
  vocab_size: int = 32_000
  text_len: int = 16
  depth_mean: float = 0.0
  depth_std: float = 1.0
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  attn_implementation: str = "xla"
  dtype: Any = "float32"

  def __post_init__(self):
    mods = tuple(self.modalities)
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown or not mods or len(set(mods)) != len(mods):
      raise ValueError(f"model.modalities={mods!r}: give distinct names from {MODALITIES} (the "
                       "modalities MultiMAE has adapters for).")
    if self.image_size % self.patch_size:
      raise ValueError(f"model.image_size={self.image_size} is not divisible by "
                       f"model.patch_size={self.patch_size}.")
    for key in ("encoder", "decoder"):
      bad = set(dict(getattr(self, key) or {})) - set(ARCH_KEYS)
      if bad:
        raise TypeError(f"Invalid model.{key} option(s) {sorted(bad)}; valid: {ARCH_KEYS}.")
    super().__post_init__()

  # ---- static shapes -------------------------------------------------------------------

  @property
  def grid(self) -> tuple[int, int]:
    g = self.image_size // self.patch_size
    return g, g

  def num_tokens(self) -> dict[str, int]:
    """Tokens per modality, in `modalities` order."""
    g = self.grid[0] * self.grid[1]
    return {m: (self.text_len if m == "text" else g) for m in self.modalities}

  def out_dims(self) -> dict[str, int]:
    pp = self.patch_size ** 2
    dims = {"rgb": pp * 3 + 2, "depth": pp, "semseg": pp * self.num_semseg_classes,
            "text": self.vocab_size}
    return {m: dims[m] for m in self.modalities}

  def encoder_arch(self) -> dict:
    return _arch(self.encoder, dict(width=768, depth=12, mlp_dim=None, num_heads=12))

  def decoder_arch(self) -> dict:
    return _arch(self.decoder, dict(width=256, depth=2, mlp_dim=None, num_heads=8))

  # ---- forward -------------------------------------------------------------------------

  def setup(self):
    enc, dec = self.encoder_arch(), self.decoder_arch()
    self.adapters = {
        m: InputAdapter(modality=m, width=enc["width"], patch_size=self.patch_size,
                        grid=self.grid, num_semseg_classes=self.num_semseg_classes,
                        semseg_embed_dim=self.semseg_embed_dim, vocab_size=self.vocab_size,
                        text_len=self.text_len, dtype=self.dtype, name=f"adapter_{m}")
        for m in self.modalities}
    self.global_tokens = self.param(
        "global_tokens", layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
        (1, self.num_global_tokens, enc["width"]), jnp.float32)
    self.input_dropout = nn.Dropout(rate=self.dropout)
    enc_block = layers.BlockConfig(num_heads=enc["num_heads"], mlp_dim=enc["mlp_dim"],
                                   dropout=self.dropout,
                                   attn_implementation=self.attn_implementation, dtype=self.dtype)
    self.transformer = layers.Encoder(depth=enc["depth"], block=enc_block, scan=self.scan,
                                      remat_policy=self.remat_policy, name="Transformer")
    dec_block = layers.BlockConfig(num_heads=dec["num_heads"], mlp_dim=dec["mlp_dim"],
                                   attn_implementation=self.attn_implementation, dtype=self.dtype)
    counts, dims = self.num_tokens(), self.out_dims()
    self.decoders = {
        m: OutputAdapter(modality=m, num_tokens=counts[m], out_dim=dims[m], width=dec["width"],
                         depth=dec["depth"], block=dec_block,
                         grid=None if m == "text" else self.grid, name=f"decoder_{m}")
        for m in self.modalities}

  def tokens(self, inputs: dict) -> jax.Array:
    """All modalities' tokens [B, N, D] in `modalities` order (missing inputs: zeros)."""
    b = next(iter(inputs.values())).shape[0]
    h = w = self.image_size
    shapes = {"rgb": ((b, h, w, 3), jnp.float32), "depth": ((b, h, w), jnp.float32),
              "semseg": ((b, h, w), jnp.int32), "text": ((b, self.text_len), jnp.int32)}
    out = []
    for m in self.modalities:
      x = inputs.get(m)
      if x is None:
        x = jnp.zeros(*shapes[m])
      elif tuple(x.shape) != shapes[m][0]:
        raise ValueError(f"MultiMAE input {m!r} has shape {tuple(x.shape)}; the model expects "
                         f"{shapes[m][0]} (model.image_size={self.image_size}, "
                         f"model.text_len={self.text_len}).")
      if m == "depth":
        x = (x - self.depth_mean) / self.depth_std
      out.append(self.adapters[m](x))
    return jnp.concatenate(out, axis=1)

  def context_posemb(self, visible):
    """[B, G + K, decoder width]: the 2-D position embedding of each encoded token's patch
    (zero for global and text tokens), added to the decoders' context so that a query finds
    the tokens at and near its position by matching positions."""
    width = self.decoder_arch()["width"]
    grid = layers.posemb_sincos_2d(*self.grid, width)[0]
    table = jnp.concatenate([jnp.zeros((n, width)) if m == "text" else grid
                             for m, n in self.num_tokens().items()], axis=0)
    pos = table[visible]
    return jnp.concatenate([jnp.zeros((pos.shape[0], self.num_global_tokens, width)), pos], 1)

  def encode(self, inputs, visible, valid, train=False):
    """-> encoded [B, G + K, D] and its key mask [B, G + K] (global tokens always valid)."""
    x = self.tokens(inputs)
    x = jnp.take_along_axis(x, visible[..., None], axis=1)  # masked tokens are dropped here
    b = x.shape[0]
    g = jnp.tile(self.global_tokens.astype(x.dtype), (b, 1, 1))
    x = layers.constrain(jnp.concatenate([g, x], axis=1))
    mask = jnp.concatenate([jnp.ones((b, self.num_global_tokens), bool), valid], axis=1)
    x = self.input_dropout(x, not train)
    x, _ = self.transformer(x, mask[:, None, None, :], deterministic=not train)
    return x, mask

  def decode(self, encoded, mask, visible, targets: Sequence[str]) -> dict:
    pos = self.context_posemb(visible)
    return {m: self.decoders[m](encoded, mask, pos) for m in targets}

  def pool(self, encoded, mask):
    """Mean of the encoded visible (non-global, valid) tokens [B, D]."""
    g = self.num_global_tokens
    w = mask[:, g:, None].astype(encoded.dtype)
    return jnp.sum(encoded[:, g:] * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

  def __call__(self, inputs, visible, valid, *, targets=None, train=False):
    encoded, mask = self.encode(inputs, visible, valid, train=train)
    preds = self.decode(encoded, mask, visible,
                        self.modalities if targets is None else targets)
    return preds, {"pooled": self.pool(encoded, mask).astype(jnp.float32), "encoded": encoded}


def patchify(x, p: int):
  """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C] (row-major patches, as the adapters' tokens)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(x, p: int, h: int, w: int):
  """Inverse of `patchify`: [B, N, p*p*C] -> [B, H, W, C]."""
  b, _, d = x.shape
  c = d // (p * p)
  x = x.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)

