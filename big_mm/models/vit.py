"""Vision Transformer, parameter-compatible with big_vision `models/vit.py`.

Param tree (pool="map", num_classes set):
  embedding/{kernel [p, p, 3, D], bias [D]}     conv patch embedding
  pos_embedding [1, N, D]                       (posemb="learn")
  cls [1, 1, D]                                 (pool="tok")
  mask_token [1, 1, D]                          (only in a call with patch_mask: TIPS)
  norm_pre/{scale, bias}                        (pre_norm=True: CLIP's LayerNorm before the encoder)
  Transformer/encoderblock_{i}/... , Transformer/encoder_norm
  MAPHead_0/...                                 (pool="map")
  head/{kernel [D, num_classes], bias}           (num_classes set)

`ViT(...)(image, train=False) -> (x, out)` where x is the head output (or the pooled
features without a head; the tokens for pool="none") and out holds "stem",
"with_posemb", "encoded", "head_input", "pre_logits", "pre_logits_2d", "logits", and with a
patch mask (NaFlex) "token_mask" [B, N] (True: a real token of "encoded"; "tok" pooling's
cls token included).
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_mm.models import layers, moe, naflex

# RECIPES.md section 1 (big_vision decode_variant): name -> (width, depth, mlp_dim, num_heads).
VARIANTS = {
    "Ti": (192, 12, 768, 3),
    "S": (384, 12, 1536, 6),
    "M": (512, 12, 2048, 8),
    "B": (768, 12, 3072, 12),
    "L": (1024, 24, 4096, 16),
    "So400m": (1152, 27, 4304, 16),
    "H": (1280, 32, 5120, 16),
    "g": (1408, 40, 6144, 16),
    "g-opt": (1536, 40, 6144, 16),
}
POOL_TYPES = ("map", "gap", "tok", "0", "none")


def decode_variant(variant: Optional[str]) -> dict:
  """'B/16' -> {width, depth, mlp_dim, num_heads, patch_size=(16, 16)}; 'B' -> no patch_size.

  None -> {}. Raises ValueError naming the valid variants.
  """
  if variant is None:
    return {}
  if not isinstance(variant, str):
    raise ValueError(f"variant must be a string like 'B/16'; got {variant!r}.")
  name, patch = variant, None
  if "/" in variant:
    name, patch = variant.split("/", 1)
  if name not in VARIANTS:
    close = difflib.get_close_matches(name, list(VARIANTS), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValueError(
        f"Unknown variant {variant!r}.{hint} Valid variants: {', '.join(VARIANTS)} "
        "optionally followed by '/<patch size>', e.g. 'B/16', 'So400m/14'.")
  width, depth, mlp_dim, num_heads = VARIANTS[name]
  out = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)
  if patch is not None:
    try:
      p = int(patch)
      if p <= 0:
        raise ValueError
    except ValueError:
      raise ValueError(f"Invalid patch size {patch!r} in variant {variant!r}; "
                       "expected a positive integer as in 'B/16'.") from None
    out["patch_size"] = (p, p)
  return out


def resolve_arch(module, defaults: dict) -> dict:
  """Variant values, overridden by explicit non-None fields, else `defaults`."""
  arch = dict(defaults)
  arch.update(decode_variant(module.variant))
  for k in defaults:
    v = getattr(module, k)
    if v is not None:
      arch[k] = v
  if arch.get("mlp_dim") is None:
    arch["mlp_dim"] = 4 * arch["width"]
  return arch


def check_kwargs(cls, kwargs: dict, what: str) -> None:
  """Raises TypeError naming bad keys of `kwargs` for module class `cls`."""
  valid = sorted(f for f in cls.__dataclass_fields__ if f not in ("parent", "name"))
  for k in kwargs:
    if k not in valid:
      close = difflib.get_close_matches(k, valid, n=1)
      hint = f" Did you mean {close[0]!r}?" if close else ""
      raise TypeError(f"Invalid {what} option {k!r}.{hint} Valid options: {', '.join(valid)}.")


def scale_pixels(image, pixel_range, dtype):
  """uint8 pixels [0, 255] (pp op keep_uint8) -> `dtype` values in pixel_range (lo, hi),
  mapped in float32 as the host's value_range(lo, hi) maps them; any other dtype: cast only."""
  if jnp.dtype(image.dtype) == jnp.uint8:
    lo, hi = (float(v) for v in pixel_range)
    image = image.astype(jnp.float32) * np.float32((hi - lo) / 255.0) + np.float32(lo)
  return jnp.asarray(image, dtype)


class ViT(nn.Module):
  """ViT. Architecture from `variant` (e.g. "B/16"); explicit fields override it."""
  variant: Optional[str] = None
  width: Optional[int] = None        # default (no variant): B/16
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None      # default 4 * width
  num_heads: Optional[int] = None
  patch_size: Optional[Union[int, Sequence[int]]] = None
  num_classes: Optional[int] = None  # head output size; None/0 = no head (big_vision name)
  posemb: str = "learn"              # "learn" | "sincos2d"
  pool: str = "gap"                  # "map" | "gap" | "tok" | "0" | "none"
  pool_type: Optional[str] = None    # big_vision's spelling of `pool` (same values); overrides it
  rep_size: Union[int, bool] = False
  head_zeroinit: bool = True
  head_bias: bool = True             # False: head without bias (CLIP / open_clip projections)
  pre_norm: bool = False             # LayerNorm "norm_pre" before the encoder (CLIP's ln_pre)
  posemb_grid: Optional[int] = None  # NaFlex: side of the stored position grid (default:
                                     # sqrt(max_num_patches), as SigLIP 2 / Siglip2 store it)
  act: str = "gelu_tanh"             # MLP activation: "gelu_tanh" | "gelu" (erf) | "quick_gelu"
  norm_eps: float = 1e-6             # LayerNorm epsilon (open_clip / OpenAI CLIP: 1e-5)
  dropout: float = 0.0
  patch_dropout: float = 0.0         # FLIP: fraction of patches dropped per example in training
  scan: bool = False
  remat_policy: str = "none"
  attn_implementation: str = "xla"
  dtype: Any = "float32"             # compute dtype; params stay float32
  moe: Optional[Mapping[str, Any]] = None  # mixture-of-experts MLPs (big_mm/models/moe.py)
  pixel_range: Sequence[float] = (-1.0, 1.0)  # uint8 input [0, 255] -> this range, on device

  def arch(self) -> dict:
    a = resolve_arch(self, dict(width=768, depth=12, mlp_dim=None, num_heads=12,
                                patch_size=(16, 16)))
    p = a["patch_size"]
    a["patch_size"] = (int(p), int(p)) if isinstance(p, int) else tuple(int(i) for i in p)
    return a

  def pooling(self) -> dict:
    """{"pool": the pooling in use}: `pool_type` (big_vision's key, same values) wins."""
    pool = self.pool
    if self.pool_type is not None:
      if self.pool not in (self.pool_type, self.__dataclass_fields__["pool"].default):
        raise ValueError(f"pool={self.pool!r} and pool_type={self.pool_type!r}: set one of them "
                         "(pool_type is big_vision's spelling of pool).")
      pool = self.pool_type
    if pool not in POOL_TYPES:
      raise ValueError(f"Unknown pool {pool!r}; valid: {POOL_TYPES}.")
    return {"pool": pool}

  def _drop_patches(self, x, mask):
    """FLIP's patch dropout: keep round((1 - patch_dropout) * N) tokens of each example, drawn
    at random with the "dropout" rng (NaFlex padding is dropped first), in their order."""
    if not 0 <= self.patch_dropout < 1:
      raise ValueError(f"patch_dropout={self.patch_dropout} must be in [0, 1).")
    n, length = x.shape[:2]
    keep = max(1, int(round(length * (1.0 - self.patch_dropout))))
    scores = jax.random.uniform(self.make_rng("dropout"), (n, length))
    if mask is not None:
      scores = jnp.where(mask, scores, -1.0)
    kept = jnp.sort(jax.lax.top_k(scores, keep)[1], axis=-1)
    x = jnp.take_along_axis(x, kept[..., None], axis=1)
    return x, None if mask is None else jnp.take_along_axis(mask, kept, axis=1)

  def _naflex_stem(self, embedding, patches, mask, shape, a, out):
    """NaFlex patches [B, N, p*p*3] -> (tokens [B, N, D] with resized position embeddings,
    bool mask [B, N]); the patch embedding is the Conv's kernel applied to each flattened
    patch (same params as for images)."""
    if mask is None or shape is None:
      raise ValueError("NaFlex patches [B, N, p*p*3] need mask= [B, N] and shape= [B, 2] "
                       "(the naflex pp op's image_mask / image_shape).")
    p = a["patch_size"]
    n, length = patches.shape[:2]
    # The Conv on one p x p patch at a time is exactly the flattened-patch matmul.
    x = embedding(patches.reshape(n * length, p[0], p[1], 3)).reshape(n, length, a["width"])
    out["stem"] = x
    grid = int(self.posemb_grid) if self.posemb_grid else int(round(length ** 0.5))
    posemb = layers.get_posemb(self, self.posemb, (grid, grid), a["width"], "pos_embedding",
                               jnp.float32)
    resized = naflex.resize_posemb(posemb.reshape(grid, grid, -1), shape, length)
    x = out["with_posemb"] = x + resized.astype(x.dtype)
    return x, jnp.asarray(mask, bool)

  @nn.compact
  def __call__(self, image, *, train: bool = False, mask=None, shape=None, patch_mask=None,
               posemb_shape=None):
    """image [B, H, W, 3] (uint8 [0, 255] is mapped to pixel_range here, on the device: the
    pipeline's keep_uint8 ships 1 byte per value); or NaFlex patches [B, N, p*p*3] (same
    dtypes) with mask [B, N] (True: real) and
    shape [B, 2] (each image's patch grid), big_mm/models/naflex.py: the position embeddings
    are resized to each grid and padding is masked in attention and MAP pooling.

    Masked image modeling (iBOT / TIPS, objectives/self_distill.py), images only:
    patch_mask bool [B, N] replaces those patch embeddings by the param `mask_token` [1, 1, D]
    (created only by a call that passes patch_mask) before the position embeddings are added.
    posemb_shape (rows, cols): the patch grid the learned position embeddings were made for;
    an image with another grid (a small local crop) gets them bilinearly resized to its own."""
    pool = self.pooling()["pool"]
    a = self.arch()
    dtype = layers.to_dtype(self.dtype)
    out = {}
    image = scale_pixels(image, self.pixel_range, dtype)
    embedding = nn.Conv(
        a["width"], a["patch_size"], strides=a["patch_size"], padding="VALID",
        dtype=dtype, param_dtype=jnp.float32, name="embedding",
        kernel_init=layers.logical(nn.initializers.lecun_normal(), (None, None, None, "embed")),
        bias_init=layers.logical(nn.initializers.zeros, ("embed",)))
    if image.ndim == 3:
      if patch_mask is not None or posemb_shape is not None:
        raise ValueError("patch_mask / posemb_shape are for images [B, H, W, 3], not NaFlex "
                         "patches.")
      x, mask = self._naflex_stem(embedding, image, mask, shape, a, out)
      n, c = x.shape[0], x.shape[-1]
      h = w = None
    else:
      x = out["stem"] = embedding(image)
      n, h, w, c = x.shape
      x = jnp.reshape(x, [n, h * w, c])
      if patch_mask is not None:
        token = self.param("mask_token", layers.logical(nn.initializers.zeros,
                                                        (None, None, "embed")),
                           (1, 1, c), jnp.float32)
        x = jnp.where(patch_mask[..., None], token.astype(x.dtype), x)
      grid = tuple(posemb_shape) if posemb_shape and self.posemb == "learn" else (h, w)
      posemb = layers.get_posemb(self, self.posemb, grid, c, "pos_embedding", x.dtype)
      if grid != (h, w):
        posemb = jax.image.resize(posemb.reshape(1, *grid, c), (1, h, w, c), "bilinear")
        posemb = posemb.reshape(1, h * w, c)
      x = out["with_posemb"] = x + posemb
    if train and self.patch_dropout:
      x, mask = self._drop_patches(x, mask)
      h = w = None  # the kept tokens no longer form the grid
    if pool == "tok":
      cls = self.param("cls", layers.logical(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)
      if mask is not None:
        mask = jnp.concatenate([jnp.ones((n, 1), bool), mask], axis=1)
    if self.pre_norm:
      x = layers._layernorm(self.dtype, name="norm_pre", eps=self.norm_eps)(x)
    x = layers.constrain(x)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    block = layers.BlockConfig(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                               dropout=self.dropout, act=self.act, norm_eps=self.norm_eps,
                               attn_implementation=self.attn_implementation, dtype=self.dtype)
    keys = None if mask is None else mask[:, None, None, :]
    x, enc_out = layers.Encoder(depth=a["depth"], block=block, scan=self.scan,
                                remat_policy=self.remat_policy, name="Transformer",
                                **moe.encoder_kwargs(block, self.moe, a["depth"], "ViT.moe"),
                                )(x, keys, deterministic=not train)
    out["encoder"] = enc_out
    encoded = out["encoded"] = x
    if mask is not None:
      out["token_mask"] = mask  # which of "encoded" are real (NaFlex padding, dropped patches)

    if pool == "map":
      x = out["head_input"] = layers.MAPHead(
          num_heads=a["num_heads"], mlp_dim=a["mlp_dim"], act=self.act, norm_eps=self.norm_eps,
          attn_implementation=self.attn_implementation, dtype=self.dtype)(x, mask=mask)
    elif pool == "gap":
      weights = 1.0 if mask is None else mask[..., None] / jnp.sum(mask, 1)[:, None, None]
      x = out["head_input"] = (jnp.mean(x, axis=1) if mask is None else
                               jnp.sum(x * weights.astype(x.dtype), axis=1))
    elif pool == "0":
      x = out["head_input"] = x[:, 0]
    elif pool == "tok":
      x = out["head_input"] = x[:, 0]
      encoded = encoded[:, 1:]
    # "none": x stays the token sequence.

    # NaFlex: the token sequence (grids differ per image).
    x_2d = encoded if h is None else jnp.reshape(encoded, [n, h, w, -1])
    if self.rep_size:
      rep = a["width"] if self.rep_size is True else int(self.rep_size)
      hid = nn.Dense(rep, dtype=dtype, param_dtype=jnp.float32, name="pre_logits",
                     kernel_init=layers.logical(nn.initializers.lecun_normal(), ("embed", "mlp")),
                     bias_init=layers.logical(nn.initializers.zeros, ("mlp",)))
      x_2d = nn.tanh(hid(x_2d))
      x = nn.tanh(hid(x))
    out["pre_logits_2d"] = x_2d
    out["pre_logits"] = x

    if self.num_classes:
      head = layers.head(self.num_classes, zeroinit=self.head_zeroinit, dtype=dtype,
                         use_bias=self.head_bias)
      out["logits_2d"] = head(x_2d)
      x = out["logits"] = head(x)
    return x, out
