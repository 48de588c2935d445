"""Video towers: a space-time ViT over tubelets ("video_vit") and a frame-wise image ViT with
temporal mean pooling ("frame_vit"); `inflate` builds a video tower's params from an image
tower's (config `init.inflate`, big_mm/train.py `load_init`).

VideoViT (ViViT, Arnab et al. 2021, "ViViT: A Video Vision Transformer"): a clip [B, T, H, W, 3]
is cut into t x p x p tubelets (section 3.2 "tubelet embedding"; VideoMAE's 2 x 16 x 16, Tong
et al. 2022 section 3.3), giving t = T / t_p slices of h x w tokens in row-major (t, h, w)
order. attention="joint": every block attends over all tokens (ViViT model 1);
"factorised": each block attends within a time slice (space), then across slices at each
position (time), then its MLP (ViViT model 3, section 3.3 "factorised self-attention";
TimeSformer's divided attention, Bertasius et al. 2021 section 3, does time first).

Param tree (ViT's names, big_mm/models/vit.py, so an image checkpoint inflates):
  embedding/{kernel [t_p, p, p, 3, D], bias [D]}  conv tubelet embedding
  pos_embedding [1, h * w, D]                     space (posemb="learn", init as ViT's)
  time_embedding [1, t, D]                        time (posemb="learn", init zeros: the tower
                                                  starts as a ViT on every slice, as
                                                  TimeSformer's time_embed, same file)
  cls [1, 1, D]                                   (pool="tok")
  Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
    MlpBlock_0}, Transformer/encoder_norm          (scan: encoderblock/... with a layers axis)
    attention="factorised" adds LayerNorm_time and TimeAttention (query/key/value/out as
    MultiHeadDotProductAttention; `out` init zeros, so the time attention starts as the
    identity: TimeSformer's zero-initialised temporal_fc, facebookresearch/TimeSformer@b96c47a
    timesformer/models/vit.py)
  MAPHead_0/...                                   (pool="map")
  head/{kernel [D, num_classes], bias}            (num_classes set)
posemb="sincos": fixed sin-cos tables, 2-D over (h, w) plus 1-D over t (no params).

`VideoViT(...)(x, train=False, visible=None) -> (x, out)`: x is the head output (the pooled
features without a head; the tokens for pool="none"). Input [B, T, H, W, 3], or [B, V, T, H, W,
3] (V test views: clips x crops): the B * V clips run through the encoder and their pooled
features are averaged over V before the head. out: "stem" [B(*V), t, h, w, D], "with_posemb"
[B(*V), t*h*w, D], "encoded" [B(*V), N, D] (N = t*h*w, or K with `visible`), "head_input",
"pre_logits", "logits" (with a head).
visible: int32 [B, K] token indices (row-major over (t, h, w)): only these tokens, with their
position embeddings, go through the encoder (VideoMAE's encoder on the unmasked tubes); joint
attention, one view.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_mm.kernels import attention as attention_kernels
from big_mm.models import layers
from big_mm.models.vit import ViT, resolve_arch

INFLATE_METHODS = ("average", "central")
POOL_TYPES = ("gap", "tok", "map", "none")
POSEMB_TYPES = ("learn", "sincos")
ATTENTION_TYPES = ("joint", "factorised")


def posemb_sincos_1d(length: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """1-D sin-cos position embedding [1, length, width] (Transformer, Vaswani et al. 2017)."""
  if width % 2:
    raise ValueError(f"sincos position embedding needs an even width; got {width}.")
  omega = 1. / (temperature ** (jnp.arange(width // 2) / max(width // 2 - 1, 1)))
  pos = jnp.einsum("m,d->md", jnp.arange(length), omega)
  return jnp.asarray(jnp.concatenate([jnp.sin(pos), jnp.cos(pos)], axis=1), dtype)[None]


def _check_video(x, what: str) -> int:
  """The number of views V of x ([B, T, H, W, 3] -> 0, [B, V, T, H, W, 3] -> V)."""
  if x.ndim not in (5, 6) or x.shape[-1] != 3:
    raise ValueError(f"{what} takes clips [batch, frames, height, width, 3] or test views "
                     f"[batch, views, frames, height, width, 3]; got shape {tuple(x.shape)}.")
  return x.shape[1] if x.ndim == 6 else 0


class TimeAttention(nn.Module):
  """Self-attention with MultiHeadDotProductAttention's params, its `out` projection init
  zeros (so the block starts as the identity; see the module docstring)."""
  num_heads: int
  implementation: str = "xla"
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, x):
    dtype = layers.to_dtype(self.dtype)
    d = x.shape[-1]
    if d % self.num_heads:
      raise ValueError(f"Attention width {d} is not divisible by num_heads={self.num_heads}.")

    def dense(name, features, in_axes, kaxes, baxes, kinit=nn.initializers.xavier_uniform()):
      return layers.DenseGeneral(features=features, in_axes=in_axes, kernel_axes=kaxes,
                                 bias_axes=baxes, kernel_init=kinit, dtype=dtype, name=name)

    qkv = [dense(n, (self.num_heads, d // self.num_heads), 1, ("embed", "heads", "kv"),
                 ("heads", "kv"))(x) for n in ("query", "key", "value")]
    y = attention_kernels.dot_product_attention(*qkv, implementation=self.implementation)
    return dense("out", (d,), 2, ("heads", "kv", "embed"), ("embed",),
                 nn.initializers.zeros)(y)


class FactorisedBlock(nn.Module):
  """Space attention (within each time slice), time attention (across slices at each spatial
  position), MLP; pre-LN residuals (ViViT model 3). x [B, (1 +) t*s, D] in (t, s) order; a
  leading cls token joins every slice's space attention (its t outputs averaged) and skips
  the time attention, as TimeSformer's divided attention treats it. Returns (x, None)."""
  block: layers.BlockConfig
  slices: int
  cls: bool = False

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    del mask
    cfg, t = self.block, self.slices
    norm = lambda name: layers._layernorm(cfg.dtype, name=name, eps=cfg.norm_eps)
    x = layers.constrain(x)
    n, length, d = x.shape
    s = (length - self.cls) // t
    # Space: [B * t, (1 +) s, D].
    y = norm("LayerNorm_0")(x)
    tok = y[:, int(self.cls):].reshape(n * t, s, d)
    if self.cls:
      tok = jnp.concatenate([jnp.repeat(y[:, :1], t, axis=0), tok], axis=1)
    y = layers.MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, implementation=cfg.attn_implementation, dtype=cfg.dtype,
        name="MultiHeadDotProductAttention_0")(tok, tok)
    if self.cls:
      cls, y = y[:, :1].reshape(n, t, d).mean(axis=1, keepdims=True), y[:, 1:]
      y = jnp.concatenate([cls, y.reshape(n, t * s, d)], axis=1)
    else:
      y = y.reshape(n, t * s, d)
    x = x + nn.Dropout(rate=cfg.dropout)(layers.constrain(y), deterministic)
    # Time: [B * s, t, D] (cls untouched).
    y = norm("LayerNorm_time")(x[:, int(self.cls):])
    y = y.reshape(n, t, s, d).transpose(0, 2, 1, 3).reshape(n * s, t, d)
    y = TimeAttention(num_heads=cfg.num_heads, implementation=cfg.attn_implementation,
                      dtype=cfg.dtype, name="TimeAttention")(y)
    y = y.reshape(n, s, t, d).transpose(0, 2, 1, 3).reshape(n, t * s, d)
    if self.cls:
      y = jnp.concatenate([jnp.zeros_like(x[:, :1]), y], axis=1)
    x = x + nn.Dropout(rate=cfg.dropout)(layers.constrain(y), deterministic)
    y = norm("LayerNorm_1")(x)
    y = cfg.build_mlp()(y, deterministic)
    x = x + nn.Dropout(rate=cfg.dropout)(layers.constrain(y), deterministic)
    return layers.constrain(x), None


class FactorisedEncoder(nn.Module):
  """`layers.Encoder` (same names, scan and remat) with FactorisedBlocks."""
  depth: int
  block: layers.BlockConfig
  slices: int
  cls: bool = False
  scan: bool = False
  remat_policy: str = "none"

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    policy = layers.remat_policy_fn(self.remat_policy)
    block = FactorisedBlock
    if policy is not False:
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(3,), policy=policy)
    kw = dict(block=self.block, slices=self.slices, cls=self.cls)
    if self.scan:
      x, _ = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(name="encoderblock", **kw)(x, mask, deterministic)
    else:
      for i in range(self.depth):
        x, _ = block(name=f"encoderblock_{i}", **kw)(x, mask, deterministic)
    x = layers._layernorm(self.block.dtype, name="encoder_norm", eps=self.block.norm_eps)(x)
    return layers.constrain(x), {}


class VideoViT(nn.Module):
  """Space-time ViT over clips (see the module docstring). Architecture from `variant` (ViT's:
  "B/16", "S", ...); explicit fields override it."""
  variant: Optional[str] = None
  width: Optional[int] = None        # default (no variant): B/16
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None      # default 4 * width
  num_heads: Optional[int] = None
  patch_size: Optional[Union[int, Sequence[int]]] = None  # spatial p (or (p, p)); default 16
  tubelet_size: int = 2              # frames per tubelet (VideoMAE's 2)
  num_classes: Optional[int] = None  # head output size; None/0 = no head
  posemb: str = "learn"              # "learn" | "sincos" (separable space + time)
  attention: str = "joint"           # "joint" | "factorised"
  pool: str = "gap"                  # "gap" | "tok" | "map" | "none"
  head_zeroinit: bool = True
  dropout: float = 0.0
  scan: bool = False
  remat_policy: str = "none"
  attn_implementation: str = "xla"
  dtype: Any = "float32"             # compute dtype; params stay float32

  def arch(self) -> dict:
    a = resolve_arch(self, dict(width=768, depth=12, mlp_dim=None, num_heads=12,
                                patch_size=(16, 16)))
    p = a["patch_size"]
    a["patch_size"] = (int(p), int(p)) if isinstance(p, int) else tuple(int(i) for i in p)
    return a

  def _check(self):
    for name, value, valid in (("pool", self.pool, POOL_TYPES),
                               ("posemb", self.posemb, POSEMB_TYPES),
                               ("attention", self.attention, ATTENTION_TYPES)):
      if value not in valid:
        raise ValueError(f"VideoViT: unknown {name} {value!r}; valid: {valid}.")
    if not isinstance(self.tubelet_size, int) or self.tubelet_size < 1:
      raise ValueError(f"VideoViT: tubelet_size must be a positive int; got "
                       f"{self.tubelet_size!r}.")

  def _posemb(self, t: int, h: int, w: int, c: int, dtype) -> jax.Array:
    """Separable position embedding [1, t*h*w, c]: space [h*w] + time [t]."""
    if self.posemb == "learn":
      space = layers.get_posemb(self, "learn", (h, w), c, "pos_embedding", jnp.float32)
      time = self.param("time_embedding", layers.logical(nn.initializers.zeros,
                                                         (None, "length", "embed")),
                        (1, t, c), jnp.float32)
    else:
      space = layers.posemb_sincos_2d(h, w, c)
      time = posemb_sincos_1d(t, c)
    return (time[:, :, None] + space[:, None]).reshape(1, t * h * w, c).astype(dtype)

  @nn.compact
  def __call__(self, x, *, train: bool = False, visible=None):
    self._check()
    views = _check_video(x, "VideoViT")
    a = self.arch()
    tp, (ph, pw) = self.tubelet_size, a["patch_size"]
    if views:
      if visible is not None:
        raise ValueError("VideoViT: visible= takes clips [B, T, H, W, 3], not test views.")
      if self.pool == "none":
        raise ValueError("VideoViT: test views [B, V, T, H, W, 3] are averaged after pooling; "
                         "pool='none' has no pooled features. Use pool='gap', 'tok' or 'map'.")
      x = x.reshape(-1, *x.shape[2:])
    frames, height, width = x.shape[1:4]
    if frames % tp or height % ph or width % pw:
      raise ValueError(f"VideoViT: a clip of {frames} x {height} x {width} is not a whole "
                       f"number of {tp} x {ph} x {pw} tubelets; sample a multiple of "
                       f"tubelet_size={tp} frames and crop to a multiple of the patch size.")
    dtype = layers.to_dtype(self.dtype)
    out = {}
    x = out["stem"] = nn.Conv(
        a["width"], (tp, ph, pw), strides=(tp, ph, pw), padding="VALID", dtype=dtype,
        param_dtype=jnp.float32, name="embedding",
        kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                   (None, None, None, None, "embed")),
        bias_init=layers.logical(nn.initializers.zeros, ("embed",)),
    )(jnp.asarray(x, dtype))
    n, t, h, w, c = x.shape
    x = jnp.reshape(x, [n, t * h * w, c])
    x = out["with_posemb"] = x + self._posemb(t, h, w, c, x.dtype)
    if visible is not None:
      if self.attention != "joint":
        raise ValueError("VideoViT: visible= (a token subset) needs attention='joint'; "
                         "factorised attention needs the full t x h x w grid.")
      visible = jnp.asarray(visible, jnp.int32)
      if visible.ndim != 2 or visible.shape[0] != n:
        raise ValueError(f"VideoViT: visible must be int32 [batch={n}, K] token indices; got "
                         f"shape {tuple(visible.shape)}.")
      x = jnp.take_along_axis(x, visible[..., None], axis=1)
    if self.pool == "tok":
      cls = self.param("cls", layers.logical(nn.initializers.zeros, (None, None, "embed")),
                       (1, 1, c), jnp.float32)
      x = jnp.concatenate([jnp.tile(cls.astype(x.dtype), [n, 1, 1]), x], axis=1)
    x = layers.constrain(x)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    block = layers.BlockConfig(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                               dropout=self.dropout, attn_implementation=self.attn_implementation,
                               dtype=self.dtype)
    if self.attention == "joint":
      encoder = layers.Encoder(depth=a["depth"], block=block, scan=self.scan,
                               remat_policy=self.remat_policy, name="Transformer")
    else:
      encoder = FactorisedEncoder(depth=a["depth"], block=block, slices=t,
                                  cls=self.pool == "tok", scan=self.scan,
                                  remat_policy=self.remat_policy, name="Transformer")
    x, _ = encoder(x, deterministic=not train)
    if self.pool == "tok":
      out["encoded"] = x[:, 1:]
      x = x[:, 0]
    else:
      out["encoded"] = x
      if self.pool == "gap":
        x = jnp.mean(x, axis=1)
      elif self.pool == "map":
        x = layers.MAPHead(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                           attn_implementation=self.attn_implementation, dtype=self.dtype)(x)
    if views:
      x = jnp.mean(x.reshape(-1, views, x.shape[-1]), axis=1)
    out["head_input"] = out["pre_logits"] = x
    if self.num_classes:
      x = out["logits"] = layers.head(self.num_classes, zeroinit=self.head_zeroinit,
                                      dtype=dtype)(x)
    return x, out


class FrameViT(ViT):
  """CLIP4Clip's mean-pooling baseline ("meanP", Luo et al. 2021, "CLIP4Clip: An Empirical
  Study of CLIP for End to End Video Clip Retrieval", section 3.3 "parameter-free type"): the
  image ViT (same fields and params, so an image checkpoint loads as-is) on every frame, its
  outputs averaged over the frames (and test views). The head is affine, so averaging its
  outputs equals the head of the averaged pooled features.

  `FrameViT(...)(x [B, T, H, W, 3] or [B, V, T, H, W, 3], train=False) -> (x, out)`: out holds
  ViT's keys averaged over frames and views ("head_input", "pre_logits", "logits"), and "stem"
  [B(*V), T, h, w, D] and "encoded" [B(*V), T * N, D] (every frame's tokens, frame-major)."""

  def __call__(self, x, *, train: bool = False):
    if self.pooling()["pool"] == "none":
      raise ValueError("FrameViT averages pooled frame features; pool='none' has none. Use "
                       "pool='gap', 'map', 'tok' or '0'.")
    views = _check_video(x, "FrameViT")
    clips = x.reshape(-1, *x.shape[-4:])
    n, frames = clips.shape[:2]
    y, vit_out = super().__call__(clips.reshape(n * frames, *clips.shape[2:]), train=train)
    group = frames * max(views, 1)
    out = {k: jnp.mean(vit_out[k].reshape(-1, group, *vit_out[k].shape[1:]), axis=1)
           for k in ("head_input", "pre_logits", "logits") if k in vit_out}
    out["stem"] = vit_out["stem"].reshape(n, frames, *vit_out["stem"].shape[1:])
    out["encoded"] = vit_out["encoded"].reshape(n, -1, vit_out["encoded"].shape[-1])
    return jnp.mean(y.reshape(-1, group, y.shape[-1]), axis=1), out


def _inflate_kernel(kernel: np.ndarray, shape: tuple, method: str) -> np.ndarray:
  """Image patch kernel [p, p, 3, D] -> tubelet kernel `shape` [t, p, p, 3, D]: "average"
  repeats kernel / t over t, "central" puts the kernel at frame t // 2 and zeros elsewhere
  (ViViT section 3.4 "initialisation by inflation" / "central frame initialisation"). Either
  way a static clip gets the image's patch embedding."""
  t = shape[0]
  if method == "average":
    return np.repeat(kernel[None] / t, t, axis=0)
  out = np.zeros(shape, kernel.dtype)
  out[t // 2] = kernel
  return out


def _resize_posemb(posemb: np.ndarray, length: int, name: str) -> np.ndarray:
  """Position embeddings [1, N, D] of a square grid -> [1, length, D] (square), bilinear as
  ViT's posemb_shape resize."""
  src, dst = int(round(posemb.shape[1] ** 0.5)), int(round(length ** 0.5))
  if src * src != posemb.shape[1] or dst * dst != length:
    raise ValueError(f"inflate: {name} has {posemb.shape[1]} positions in the source and "
                     f"{length} here; resizing needs square grids. Use square crops or give "
                     "the video tower the image tower's grid.")
  d = posemb.shape[-1]
  resized = jax.image.resize(jnp.asarray(posemb, jnp.float32).reshape(1, src, src, d),
                             (1, dst, dst, d), "bilinear")
  return np.asarray(resized, posemb.dtype).reshape(1, length, d)


def inflate(flat: dict, targets: dict, method: str = "average", src: str = "img",
            dst: str = "vid") -> tuple[dict, set]:
  """Video tower params from an image tower's, for `train.load_init` (`init.inflate`).

  flat: a source's flat params {"img/...": array} (a big_mm run, a big_vision npz, an HF
  SigLIP / CLIP export; `train.read_params`); targets: this model's flat param shapes {name:
  shape}. Returns (flat plus a "vid/..." entry for every target under `dst/` with a source
  under `src/`, the target names to keep at their init). A VideoViT's tubelet kernel is
  inflated by `method` ("average" | "central", `_inflate_kernel`); `pos_embedding` (space) is
  resized to the new grid; `time_embedding` is zeros; the factorised blocks' time attention
  (TimeAttention, LayerNorm_time) keeps its init (its zero `out` makes it the identity);
  everything else is copied, shapes must agree. A FrameViT's params are the image ViT's
  (copied). A static clip then gets the image tower's output (tests/test_video_models.py)
  exactly with gap / map pooling or factorised attention; with pool="tok" and joint attention
  the cls token attends over t copies of every patch, which shifts its softmax weight (close,
  not equal)."""
  if method not in INFLATE_METHODS:
    raise ValueError(f"init.inflate={method!r}; valid: {INFLATE_METHODS}.")
  mine = {n: tuple(s) for n, s in targets.items() if n.startswith(f"{dst}/")}
  if not any(n.startswith(f"{src}/") for n in flat):
    raise ValueError(f"init.inflate: the source has no {src}/ params to inflate into {dst}/ "
                     f"(it has {sorted({n.split('/')[0] for n in flat})}).")
  out, fresh = dict(flat), set()
  for name, shape in mine.items():
    rel = name[len(dst) + 1:]
    parts = rel.split("/")
    if rel == "time_embedding":
      out[name] = np.zeros(shape, np.float32)
      continue
    if "TimeAttention" in parts or "LayerNorm_time" in parts:
      fresh.add(name)
      continue
    source = f"{src}/{rel}"
    if source not in flat:
      continue  # load_init reports it (an error, as for any param the source lacks)
    value = np.asarray(flat[source])
    if tuple(value.shape) == shape:
      out[name] = value
    elif rel == "embedding/kernel" and shape[1:] == value.shape:
      out[name] = _inflate_kernel(value, shape, method)
    elif rel == "pos_embedding" and value.ndim == 3 and shape[2] == value.shape[2]:
      out[name] = _resize_posemb(value, shape[1], source)
    else:
      raise ValueError(f"init.inflate: {source} has shape {tuple(value.shape)}, which does not "
                       f"inflate to {name} {shape} (patch size and width must match).")
  return out, fresh
