"""Text transformer, parameter-compatible with big_vision `proj/image_text/text_transformer.py`.

Param tree:
  Embed_0/embedding [vocab_size, D]
  pos_embedding [1, L, D]
  Encoder_0/encoderblock_{i}/... , Encoder_0/encoder_norm
  MAPHead_0/...      (pool="map")
  head/{kernel, bias} (num_classes set)

Input: int32 tokens [B, L], 0 = pad (docs/CONTRACTS.md), EOS appended.

Padding. `pad_mask=False` (default, as big_vision): pad tokens are attended to like
any other token, which keeps released big_vision checkpoints numerically identical.
`pad_mask=True`: keys at pad positions are masked out in every layer, so outputs do
not depend on how much padding follows.

Pooling, `pool` (big_mm's names): "last" takes the token at the last non-pad position (with
sticky EOS this is the EOS); "last_position" the literal last position (index -1, a pad when
the text is shorter than L) as big_vision's and Hugging Face SigLIP's text towers do (use it for
models meant to be exported to transformers.SiglipModel); "first"; "mean" / "max" over the
tokens; "map" a MAP head; "none" the token sequence. `pool_masks_pads` (default True with `pool`):
"mean", "max" and "map" pool the non-pad tokens only; False pools pads like any token.

`pool_type` is big_vision's key with big_vision's semantics, so a big_vision text config ports
as written: "last" = the last POSITION (big_mm's "last_position"), "first", "mean"/"gap",
"max"/"gmp", "map", all pooling every position, pads included (`pool_masks_pads` defaults to
False with it). It overrides `pool` (setting both to different things is an error).
`causal=True` adds a causal mask (token i sees only tokens <= i).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import flax.linen as nn
import jax.numpy as jnp

from big_mm.models import layers, moe
from big_mm.models.vit import resolve_arch

POOL_TYPES = ("last", "last_position", "first", "mean", "max", "map", "none")
# big_vision text_transformer pool_type -> big_mm pool (pads pooled like any token there).
BIG_VISION_POOL = {"last": "last_position", "first": "first", "mean": "mean", "gap": "mean",
                   "max": "max", "gmp": "max", "map": "map"}


def last_token_index(text):
  """Index of the last non-pad (nonzero) token per row; 0 for an all-pad row."""
  pos = jnp.arange(text.shape[1], dtype=jnp.int32)[None, :]
  return jnp.max(jnp.where(text != 0, pos, 0), axis=1)


class TextTransformer(nn.Module):
  """Text encoder. Architecture from `variant` ("S", "B", "L", "So400m", ...; a
  "/patch" suffix is accepted and ignored); explicit fields override it."""
  variant: Optional[str] = None
  width: Optional[int] = None        # default (no variant): 512 / 12 / 2048 / 8
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  vocab_size: int = 32_000
  num_classes: Optional[int] = None  # head output size; None/0 = no head (big_vision name)
  pool: str = "last"                 # "last" | "last_position" | "first" | "mean" | "max" | "map"
                                     # | "none"
  pool_type: Optional[str] = None    # big_vision's key and semantics (module docstring)
  pool_masks_pads: Optional[bool] = None  # mean/max/map skip pads; default True, False w/ pool_type
  causal: bool = False
  pad_mask: bool = False
  head_bias: bool = True             # False: head without bias (CLIP / open_clip projections)
  act: str = "gelu_tanh"             # MLP activation: "gelu_tanh" | "gelu" (erf) | "quick_gelu"
  norm_eps: float = 1e-6             # LayerNorm epsilon (open_clip / OpenAI CLIP: 1e-5)
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  attn_implementation: str = "xla"
  dtype: Any = "float32"
  moe: Optional[Mapping[str, Any]] = None  # mixture-of-experts MLPs (big_mm/models/moe.py)

  def arch(self) -> dict:
    a = resolve_arch(self, dict(width=512, depth=12, mlp_dim=2048, num_heads=8))
    a.pop("patch_size", None)
    return a

  def pooling(self) -> dict:
    """{"pool": big_mm's pool name, "pool_masks_pads": bool}, from pool or pool_type."""
    pool, masks = self.pool, True
    if self.pool_type is not None:
      if self.pool_type not in BIG_VISION_POOL:
        raise ValueError(f"Unknown pool_type {self.pool_type!r} (big_vision's names); valid: "
                         f"{sorted(BIG_VISION_POOL)}. Or use pool with big_mm's: {POOL_TYPES}.")
      pool, masks = BIG_VISION_POOL[self.pool_type], False
      if self.pool not in (pool, self.__dataclass_fields__["pool"].default):
        raise ValueError(f"pool={self.pool!r} and pool_type={self.pool_type!r}: set one of them "
                         f"(pool_type={self.pool_type!r} is big_mm's pool={pool!r}).")
    if pool not in POOL_TYPES:
      raise ValueError(f"Unknown pool {pool!r}; valid: {POOL_TYPES}.")
    if self.pool_masks_pads is not None:
      masks = bool(self.pool_masks_pads)
    return {"pool": pool, "pool_masks_pads": masks}

  @nn.compact
  def __call__(self, text, *, train: bool = False):
    pooling = self.pooling()
    pool = pooling["pool"]
    if text.ndim != 2:
      raise ValueError(f"text must be int tokens [batch, length]; got shape {tuple(text.shape)}.")
    a = self.arch()
    dtype = layers.to_dtype(self.dtype)
    out = {}
    nonpad = text != 0
    pooled_tokens = nonpad if pooling["pool_masks_pads"] else jnp.ones_like(nonpad)
    x = out["embedded"] = nn.Embed(
        num_embeddings=self.vocab_size, features=a["width"], dtype=dtype,
        param_dtype=jnp.float32,
        embedding_init=layers.logical(nn.linear.default_embed_init, ("vocab", "embed")),
    )(text)
    n, l, d = x.shape
    x = x + layers.learned_posemb(self, "pos_embedding", l, d).astype(x.dtype)
    x = layers.constrain(x)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    mask = nonpad[:, None, None, :] if self.pad_mask else None
    block = layers.BlockConfig(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                               dropout=self.dropout, causal=self.causal, act=self.act,
                               norm_eps=self.norm_eps,
                               attn_implementation=self.attn_implementation, dtype=self.dtype)
    x, enc_out = layers.Encoder(
        depth=a["depth"], block=block, scan=self.scan, remat_policy=self.remat_policy,
        **moe.encoder_kwargs(block, self.moe, a["depth"], "TextTransformer.moe"),
    )(x, mask, deterministic=not train)
    out.update(enc_out)
    out["transformed"] = x

    if pool == "last":
      idx = last_token_index(text)
      x = jnp.take_along_axis(x, idx[:, None, None], axis=1)[:, 0]
    elif pool == "last_position":
      x = x[:, -1]
    elif pool == "first":
      x = x[:, 0]
    elif pool == "mean":
      w = pooled_tokens.astype(jnp.float32)[..., None]
      x = (jnp.sum(x.astype(jnp.float32) * w, axis=1)
           / jnp.maximum(jnp.sum(w, axis=1), 1.0)).astype(x.dtype)
    elif pool == "max":
      x = jnp.max(jnp.where(pooled_tokens[..., None], x, jnp.finfo(x.dtype).min), axis=1)
      x = jnp.where(jnp.any(pooled_tokens, axis=1, keepdims=True), x, 0)  # an all-pad row
    elif pool == "map":
      x = layers.MAPHead(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"], act=self.act,
                         norm_eps=self.norm_eps, attn_implementation=self.attn_implementation,
                         dtype=self.dtype)(x, mask=pooled_tokens)
    out["pre_logits"] = x

    if self.num_classes:
      x = out["logits"] = layers.head(self.num_classes, dtype=dtype, use_bias=self.head_bias)(x)
    return x, out
