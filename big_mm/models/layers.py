"""Transformer building blocks shared by the ViT and text towers.

Parameter names and shapes follow big_vision (`models/vit.py`), so released
checkpoints load without renaming:

  MlpBlock:      Dense_0/{kernel [D, M], bias [M]}, Dense_1/{kernel [M, D], bias [D]}
  MultiHeadDotProductAttention:
                 {query,key,value}/{kernel [D, H, Dh], bias [H, Dh]},
                 out/{kernel [H, Dh, D], bias [D]}
  Encoder1DBlock: LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0
                 (the MLP is named after the class `BlockConfig.mlp` builds)
  Encoder:       encoderblock_{i}/... (scan=False) or encoderblock/... with a leading
                 `layers` axis of size depth (scan=True); encoder_norm
  MAPHead:       probe [1, 1, D], MultiHeadDotProductAttention_0, LayerNorm_0, MlpBlock_0

Every parameter is created through `nn.with_logical_partitioning` with the logical
axis names of docs/CONTRACTS.md (embed, mlp, heads, kv, vocab, patch, layers,
length); activations are constrained to ("batch", "length", "embed") at block
boundaries. `dtype` is the compute dtype ("float32", "bfloat16" or a jnp dtype);
parameters are always stored in float32.

Blocks take one `BlockConfig` (heads, MLP size, dropout, causality, attention kernel, dtype
and the `mlp` factory), so a tower builds it once from its own kwargs and a different MLP
(e.g. mixture-of-experts) drops in without touching the blocks. A layer may add a term to the
training loss with `self.sow(AUX_LOSS, name, scalar)` (big_mm/models/aux_loss.py).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_mm.kernels import attention as attention_kernels

Dtype = Any
AUX_LOSS = "aux_loss"  # the collection of auxiliary loss terms (big_mm/models/aux_loss.py)
AUX_METRIC = "aux_metric"  # statistics a layer reports, logged but not trained on (same file)
ACT_AXES = ("batch", "length", "embed")
REMAT_POLICIES = ("none", "nothing_saveable", "everything_saveable", "dots_saveable",
                  "dots_with_no_batch_dims_saveable", "checkpoint_dots",
                  "checkpoint_dots_with_no_batch_dims")


def to_dtype(dtype) -> jnp.dtype:
  """'float32' / 'bfloat16' / jnp dtype / None -> jnp.dtype (None -> float32)."""
  if dtype is None:
    return jnp.dtype(jnp.float32)
  try:
    return jnp.dtype(dtype)
  except TypeError:
    raise ValueError(f"Invalid dtype {dtype!r}; use e.g. 'float32' or 'bfloat16'.") from None


def logical(init, names):
  """Wraps an initializer so its param carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(names))


def head(num_classes: int, *, zeroinit: bool = False, dtype=jnp.float32, use_bias: bool = True,
         in_axis: str = "embed") -> nn.Dense:
  """A tower's output head `head/{kernel [D, num_classes], bias}` (kernel zeros with zeroinit,
  else LeCun normal; float32 params); create it inside the tower's compact __call__."""
  kinit = nn.initializers.zeros if zeroinit else nn.initializers.lecun_normal()
  return nn.Dense(num_classes, dtype=dtype, param_dtype=jnp.float32, name="head",
                  use_bias=use_bias, kernel_init=logical(kinit, (in_axis, None)),
                  bias_init=logical(nn.initializers.zeros, (None,)))


def constrain(x):
  """Activation sharding constraint at block boundaries ([B, L, D] only)."""
  if x.ndim == 3:
    return nn.with_logical_constraint(x, ACT_AXES)
  return x


def remat_policy_fn(name: Optional[str]):
  """'none'/None -> no remat (returns False); else the jax.checkpoint_policies entry."""
  if name is None or name == "none":
    return False
  policy = getattr(jax.checkpoint_policies, name, None)
  if policy is None or not callable(policy) or name.startswith("_"):
    valid = [n for n in REMAT_POLICIES if n == "none" or hasattr(jax.checkpoint_policies, n)]
    raise ValueError(f"Unknown remat_policy {name!r}; valid: {valid} "
                     "(or any jax.checkpoint_policies name).")
  # Policies that take arguments (e.g. save_only_these_names) are factories, not policies.
  if name.startswith("save_") or name.startswith("offload_"):
    raise ValueError(f"remat_policy {name!r} needs arguments; use one of {REMAT_POLICIES}.")
  return policy


def _layernorm(dtype, name=None, eps=1e-6):
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=jnp.float32, name=name,
      scale_init=logical(nn.initializers.ones, ("embed",)),
      bias_init=logical(nn.initializers.zeros, ("embed",)))


def quick_gelu(x):
  """OpenAI CLIP's GELU approximation x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


# MLP activations by name: big_vision's (flax nn.gelu, the tanh approximation) is the default;
# "gelu" (exact, erf: torch nn.GELU, timm) and "quick_gelu" reproduce imported torch models.
ACTIVATIONS = {"gelu_tanh": functools.partial(nn.gelu, approximate=True),
               "gelu": functools.partial(nn.gelu, approximate=False),
               "quick_gelu": quick_gelu}


def activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"Unknown activation {name!r}; valid: {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


class MlpBlock(nn.Module):
  """Dense_0 -> activation -> dropout -> Dense_1 (big_vision MlpBlock)."""
  mlp_dim: Optional[int] = None  # default 4 * width
  dropout: float = 0.0
  dtype: Dtype = "float32"
  act: str = "gelu_tanh"  # a name in ACTIVATIONS

  @nn.compact
  def __call__(self, x, deterministic: bool = True):
    dtype = to_dtype(self.dtype)
    d = x.shape[-1]
    mlp_dim = self.mlp_dim or 4 * d
    x = nn.Dense(mlp_dim, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=logical(nn.initializers.xavier_uniform(), ("embed", "mlp")),
                 bias_init=logical(nn.initializers.normal(stddev=1e-6), ("mlp",)))(x)
    if x.ndim == 3:
      x = nn.with_logical_constraint(x, ("batch", "length", "mlp"))
    x = activation(self.act)(x)
    x = nn.Dropout(rate=self.dropout)(x, deterministic)
    x = nn.Dense(d, dtype=dtype, param_dtype=jnp.float32,
                 kernel_init=logical(nn.initializers.xavier_uniform(), ("mlp", "embed")),
                 bias_init=logical(nn.initializers.normal(stddev=1e-6), ("embed",)))(x)
    return x


class DenseGeneral(nn.Module):
  """`nn.DenseGeneral` for attention projections: same param names, shapes and init.

  Contracts the last `in_axes` input dims with the first `in_axes` kernel dims.
  Why not nn.DenseGeneral: in flax 0.12 it calls a logically partitioned initializer
  on the *flattened* kernel shape and unboxes it there, which applies a sharding
  constraint of the wrong rank as soon as a mesh is active during init. Here the
  initializer also sees the flattened 2-D shape (so fan-in/fan-out, hence the init
  scale, match flax/big_vision) but the logical box wraps the reshaped kernel.
  """
  features: Tuple[int, ...]
  in_axes: int
  kernel_axes: Tuple[Optional[str], ...]
  bias_axes: Tuple[Optional[str], ...]
  kernel_init: Callable = nn.initializers.xavier_uniform()
  bias_init: Callable = nn.initializers.zeros
  dtype: Dtype = "float32"

  @nn.compact
  def __call__(self, x):
    features = tuple(self.features)
    in_shape = tuple(x.shape[x.ndim - self.in_axes:])
    flat = (int(np.prod(in_shape)), int(np.prod(features)))

    def kinit(key, shape, dtype=jnp.float32):
      return jnp.reshape(self.kernel_init(key, flat, dtype), shape)

    def binit(key, shape, dtype=jnp.float32):
      return jnp.reshape(self.bias_init(key, (flat[1],), dtype), shape)

    kernel = self.param("kernel", logical(kinit, self.kernel_axes), in_shape + features,
                        jnp.float32)
    bias = self.param("bias", logical(binit, self.bias_axes), features, jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=to_dtype(self.dtype))
    y = jnp.tensordot(x, kernel, axes=self.in_axes)
    return y + bias


class MultiHeadDotProductAttention(nn.Module):
  """Drop-in for flax's MultiHeadDotProductAttention (same param names/shapes).

  Calls `big_mm.kernels.attention.dot_product_attention` with `implementation`.
  Projections use `DenseGeneral` below (flax's nn.DenseGeneral layout and init).
  `mask`: boolean broadcastable to [B, H, Lq, Lk] (True = attend).
  """
  num_heads: int
  qkv_features: Optional[int] = None
  out_features: Optional[int] = None
  causal: bool = False
  implementation: str = "xla"
  dtype: Dtype = "float32"

  @nn.compact
  def __call__(self, inputs_q, inputs_kv=None, mask=None, deterministic: bool = True):
    del deterministic  # no attention-weight dropout (big_vision default rate 0).
    dtype = to_dtype(self.dtype)
    if inputs_kv is None:
      inputs_kv = inputs_q
    features = self.qkv_features or inputs_q.shape[-1]
    if features % self.num_heads:
      raise ValueError(f"Attention width {features} is not divisible by num_heads={self.num_heads}.")
    head_dim = features // self.num_heads
    out_features = self.out_features or inputs_q.shape[-1]

    def proj(name):
      return DenseGeneral(features=(self.num_heads, head_dim), in_axes=1,
                          kernel_axes=("embed", "heads", "kv"), bias_axes=("heads", "kv"),
                          dtype=dtype, name=name)

    q = proj("query")(inputs_q)
    k = proj("key")(inputs_kv)
    v = proj("value")(inputs_kv)
    qkv_axes = ("batch", "length", "heads", "kv")
    q, k, v = (nn.with_logical_constraint(t, qkv_axes) for t in (q, k, v))
    y = attention_kernels.dot_product_attention(
        q, k, v, mask=mask, causal=self.causal, implementation=self.implementation)
    y = DenseGeneral(features=(out_features,), in_axes=2, kernel_axes=("heads", "kv", "embed"),
                     bias_axes=("embed",), dtype=dtype, name="out")(y)
    return y


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """What a transformer block needs besides its input (whose last dim is the width).

  mlp: builds the block's MLP as `mlp(mlp_dim=, dropout=, dtype=)`, a module called as
  `(x, deterministic) -> same shape as x`; its params sit under the module's class name
  (`MlpBlock_0` for the default), so another class (e.g. a mixture-of-experts MLP, with its
  own settings bound by functools.partial) drops in without changing the blocks. A non-default
  `act` is passed to it as `act=` too.
  act: the MLP activation (ACTIVATIONS); norm_eps: the blocks' LayerNorm epsilon (1e-6 as
  big_vision; torch models imported from open_clip / OpenAI CLIP use 1e-5).
  """
  num_heads: int = 12
  mlp_dim: Optional[int] = None  # default 4 * width
  dropout: float = 0.0
  causal: bool = False
  attn_implementation: str = "xla"
  dtype: Dtype = "float32"
  mlp: Callable[..., nn.Module] = MlpBlock
  act: str = "gelu_tanh"
  norm_eps: float = 1e-6

  def build_mlp(self) -> nn.Module:
    kwargs = {} if self.act == "gelu_tanh" else {"act": self.act}
    return self.mlp(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype, **kwargs)


class Encoder1DBlock(nn.Module):
  """Pre-LN transformer block. Returns (x, None) so it can be the body of nn.scan."""
  block: BlockConfig = BlockConfig()

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    cfg = self.block
    x = constrain(x)
    y = _layernorm(cfg.dtype, eps=cfg.norm_eps)(x)
    y = MultiHeadDotProductAttention(
        num_heads=cfg.num_heads, causal=cfg.causal,
        implementation=cfg.attn_implementation, dtype=cfg.dtype)(y, y, mask=mask)
    y = constrain(y)
    y = nn.Dropout(rate=cfg.dropout)(y, deterministic)
    x = x + y
    y = _layernorm(cfg.dtype, eps=cfg.norm_eps)(x)
    y = cfg.build_mlp()(y, deterministic)
    y = constrain(y)
    y = nn.Dropout(rate=cfg.dropout)(y, deterministic)
    x = constrain(x + y)
    return x, None


class Encoder(nn.Module):
  """Stack of `depth` Encoder1DBlocks + final LayerNorm (`encoder_norm`). Blocks use `block`,
  those listed in `moe_layers` use `moe_block` (big_mm/models/moe.py).

  scan=True: one `encoderblock` whose params (and sown aux losses) have a leading `layers`
  axis of size depth (nn.scan; with MoE only when every block is MoE); scan=False:
  `encoderblock_{i}`. remat_policy: "none" (no
  rematerialisation) or a `jax.checkpoint_policies` name applied with nn.remat.
  `mask` (boolean, broadcastable to [B, H, L, L]) is passed to every block.
  Returns (encoded, out) with out["pre_ln"] the output before `encoder_norm`.
  """
  depth: int
  block: BlockConfig = BlockConfig()
  scan: bool = False
  remat_policy: str = "none"
  moe_block: Optional[BlockConfig] = None
  moe_layers: Tuple[int, ...] = ()

  @nn.compact
  def __call__(self, x, mask=None, deterministic: bool = True):
    out = {}
    blocks = [self.moe_block if i in self.moe_layers else self.block for i in range(self.depth)]
    if self.scan and len(set(map(id, blocks))) > 1:
      raise ValueError(f"scan=True needs every block alike; MoE blocks {self.moe_layers} of "
                       f"{self.depth} are not. Use scan=False or moe layers='all'.")
    policy = remat_policy_fn(self.remat_policy)
    block = Encoder1DBlock
    if policy is not False:
      # static_argnums counts `self`: (self, x, mask, deterministic).
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(3,), policy=policy)
    if self.scan:
      x, _ = nn.scan(
          block, variable_axes={"params": 0, AUX_LOSS: 0, AUX_METRIC: 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(name="encoderblock", block=blocks[0])(x, mask, deterministic)
    else:
      for i in range(self.depth):
        x, _ = block(name=f"encoderblock_{i}", block=blocks[i])(x, mask, deterministic)
    out["pre_ln"] = x
    x = _layernorm(self.block.dtype, name="encoder_norm", eps=self.block.norm_eps)(x)
    return constrain(x), out


class MAPHead(nn.Module):
  """Multihead attention pooling with a learned probe (big_vision MAPHead).

  `mask`: optional boolean [B, L] key mask (True = real token) so pads are ignored.
  """
  mlp_dim: Optional[int] = None
  num_heads: int = 12
  attn_implementation: str = "xla"
  dtype: Dtype = "float32"
  act: str = "gelu_tanh"
  norm_eps: float = 1e-6

  @nn.compact
  def __call__(self, x, mask=None):
    n, _, d = x.shape
    probe = self.param("probe", logical(nn.initializers.xavier_uniform(), (None, None, "embed")),
                       (1, 1, d), jnp.float32)
    probe = jnp.tile(probe, [n, 1, 1]).astype(x.dtype)
    attn_mask = None if mask is None else jnp.asarray(mask, bool)[:, None, None, :]
    x = MultiHeadDotProductAttention(
        num_heads=self.num_heads, implementation=self.attn_implementation,
        dtype=self.dtype)(probe, x, mask=attn_mask)
    y = _layernorm(self.dtype, eps=self.norm_eps)(x)
    x = x + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype, act=self.act)(y)
    return x[:, 0]


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.,
                     dtype=jnp.float32) -> jax.Array:
  """2-D sin-cos position embedding [1, h*w, width] (MoCo v3 / big_vision)."""
  if width % 4:
    raise ValueError(f"sincos2d position embedding needs width divisible by 4; got {width}.")
  y, x = jnp.mgrid[:h, :w]
  omega = jnp.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1. / (temperature ** omega)
  y = jnp.einsum("m,d->md", y.flatten(), omega)
  x = jnp.einsum("m,d->md", x.flatten(), omega)
  pe = jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)
  return jnp.asarray(pe, dtype)[None, :, :]


def learned_posemb(module: nn.Module, name: str, length: int, width: int) -> jax.Array:
  """Learned position embedding param [1, length, width], init N(0, 1/sqrt(width))."""
  return module.param(
      name, logical(nn.initializers.normal(stddev=1 / np.sqrt(width)), (None, "length", "embed")),
      (1, length, width), jnp.float32)


def get_posemb(module: nn.Module, typ: str, seqshape, width: int, name: str, dtype=jnp.float32):
  """"learn" -> param `name` [1, prod(seqshape), width]; "sincos2d" -> fixed table."""
  if typ == "learn":
    return learned_posemb(module, name, int(np.prod(seqshape)), width).astype(dtype)
  if typ == "sincos2d":
    return posemb_sincos_2d(*seqshape, width, dtype=dtype)
  raise ValueError(f"Unknown posemb type {typ!r}; valid: 'learn', 'sincos2d'.")
