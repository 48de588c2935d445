"""The Pallas kernels' Mosaic (TPU) lowerings, run on CPU: `jax.export` for platform "tpu"
traces each kernel with its TPU config and lowers it to a `tpu_custom_call` holding the
serialized Mosaic module, which is what a TPU VM would compile. The lowering checks what
Pallas checks before libtpu sees the kernel (block shapes against the (8, 128) tiling, every
op in the kernel body having a Mosaic lowering, scalar memory spaces); it does not allocate
VMEM or compile to TPU code (that needs libtpu and a TPU). The TPU configs' numerics run in
Mosaic's interpreter (pltpu.InterpretParams) below and in tests/test_attention.py.

Shapes are the configs': SigLIP / CLIP B/16 per-device embedding blocks (768 / 512 wide,
bf16 and float32), FILIP's token rows (configs/filip_b16.py: 256-d, 196 image / 77 text
tokens), ViT-B/16 attention (197 tokens with a class token, 196 with MAP pooling; head dim
64), text attention (64 and 77 tokens, causal for CLIP), VideoViT-B at 16 x 224^2 with
2 x 16^2 tubelets (1,568 tokens) and the 4,096-token head-dim-128 attention of
docs/benchmarks.md.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export

from big_mm.kernels import contrastive as kernels
from big_mm.kernels import filip as filip_kernels
from big_mm.kernels import flash_attention

S = jax.ShapeDtypeStruct


def tpu_kernel_calls(fn, *args) -> int:
  """Exports jit(fn) for TPU at these argument shapes -> the number of Mosaic kernels in it."""
  exported = export.export(jax.jit(fn), platforms=("tpu",))(*args)
  assert exported.platforms == ("tpu",)
  return exported.mlir_module().count("stablehlo.custom_call @tpu_custom_call")


def value_and_grads(fn, argnums):
  return jax.value_and_grad(fn, argnums=argnums)


@pytest.mark.parametrize("rows,dim,dtype", [(1024, 768, jnp.bfloat16), (256, 512, jnp.float32)])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_fused_contrastive_losses_lower_for_tpu(rows, dim, dtype, loss):
  cfg = kernels.kernel_config("tpu", dim=dim, dtype=dtype)
  fused = {"sigmoid": kernels.sigmoid_loss_fused, "softmax": kernels.softmax_loss_fused}[loss]
  fn = functools.partial(fused, config=cfg)
  z = S((rows, dim), dtype)
  scalar = S((), jnp.float32)
  forward = tpu_kernel_calls(fn, z, z, scalar, scalar)
  backward = tpu_kernel_calls(value_and_grads(fn, (0, 1, 2, 3)), z, z, scalar, scalar)
  assert forward >= 1 and backward > forward  # the backward passes are kernels too


def test_ring_blocks_lower_for_tpu():
  """The per-ring-step blocks of the sharded losses (strategy="ring", implementation="pallas"):
  a block with positives on a diagonal offset, one without, and the log-sum-exp block."""
  cfg = kernels.kernel_config("tpu", dim=768, dtype=jnp.bfloat16)
  z, scalar = S((512, 768), jnp.bfloat16), S((), jnp.float32)
  for pos_offset in (0, None):
    block = functools.partial(kernels.block_sigmoid_sum, pos_offset=pos_offset, config=cfg)
    assert tpu_kernel_calls(value_and_grads(block, (0, 1, 2, 3)), z, z, scalar, scalar) >= 2

  def lse(zi, zt, t, b):
    rows, cols = kernels.block_lse(zi, zt, t, b, config=cfg)
    return rows.sum() + cols.sum()
  assert tpu_kernel_calls(value_and_grads(lse, (0, 1, 2, 3)), z, z, scalar, scalar) >= 2


def test_filip_refuses_tpu_with_a_reason():
  """FILIP's token tiles are 8 rows (a few hundred token vectors); Mosaic's column tiles must
  be 128 rows, too many token pairs for VMEM, so the config refuses TPU instead of failing in
  the lowering (which it does with 8-row column tiles: the first assertion)."""
  tokens_a, tokens_b, dim = 196, 77, 256
  similarity = filip_kernels.TokenwiseMax(tokens_a, tokens_b, dim)
  cfg = dataclasses.replace(filip_kernels.kernel_config(tokens_a, tokens_b, backend="cpu"),
                            backend="tpu")
  loss = lambda xa, xb, t, b: kernels.softmax_loss_fused(
      *filip_kernels.same_width(xa, xb), t, b, similarity=similarity, config=cfg)
  xa, xb = S((64, tokens_a * dim), jnp.bfloat16), S((64, tokens_b * dim), jnp.bfloat16)
  scalar = S((), jnp.float32)
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    tpu_kernel_calls(loss, xa, xb, scalar, scalar)
  with pytest.raises(ValueError, match="no TPU tiling.*implementation='xla'"):
    filip_kernels.kernel_config(tokens_a, tokens_b, backend="tpu")


@pytest.mark.parametrize("length,heads,head_dim,causal", [
    (197, 12, 64, False), (196, 12, 64, False), (64, 12, 64, False), (77, 8, 64, True),
    (1568, 12, 64, False), (4096, 8, 128, True)])
def test_flash_attention_lowers_for_tpu(length, heads, head_dim, causal):
  q = S((2, length, heads, head_dim), jnp.bfloat16)
  attend = functools.partial(flash_attention.flash_attention, causal=causal, platform="tpu")
  loss = lambda q, k, v: attend(q, k, v).astype(jnp.float32).sum()
  assert tpu_kernel_calls(attend, q, q, q) == 1
  assert tpu_kernel_calls(jax.grad(loss, argnums=(0, 1, 2)), q, q, q) == 3  # fwd, dq, dk/dv


def test_flash_attention_with_key_padding_and_prefix_lowers_for_tpu():
  q = S((2, 80, 8, 64), jnp.bfloat16)
  key_mask = S((2, 1, 1, 80), jnp.bool_)
  prefix = S((2,), jnp.int32)
  padded = lambda q, k, v, m: flash_attention.flash_attention(q, k, v, mask=m, platform="tpu")
  prefix_lm = lambda q, k, v, p: flash_attention.flash_attention(
      q, k, v, causal=True, prefix_len=p, platform="tpu")
  assert tpu_kernel_calls(padded, q, q, q, key_mask) == 1
  assert tpu_kernel_calls(prefix_lm, q, q, q, prefix) == 1


def test_the_lowering_rejects_what_mosaic_cannot_tile():
  """The check is real: tiles that are not multiples of (8, 128) fail at lowering, on CPU;
  kernel_config refuses them for TPU up front."""
  cfg = dataclasses.replace(kernels.kernel_config("tpu"), tile_rows=100, tile_cols=100)
  z = S((1000, 768), jnp.float32)
  with pytest.raises(ValueError, match="divisible by 8 and 128"):
    tpu_kernel_calls(functools.partial(kernels.sigmoid_loss_fused, config=cfg), z, z,
                     S((), jnp.float32), S((), jnp.float32))
  with pytest.raises(ValueError, match="multiples of 8 rows and 128 columns"):
    kernels.kernel_config("tpu", tile_cols=64)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_tpu_config_numerics_in_mosaic_interpret_mode(loss):
  """The TPU tiling (8 x 128 tiles, the feature dim padded to 128 lanes, scalars in SMEM,
  padded rows and columns) through Mosaic's interpreter: loss and gradients equal the plain
  jnp loss."""
  from big_mm.objectives import losses
  cfg = kernels.kernel_config("tpu", tile_rows=8, tile_cols=128, tpu_interpret=True)
  fused = {"sigmoid": kernels.sigmoid_loss_fused, "softmax": kernels.softmax_loss_fused}[loss]
  reference = {"sigmoid": losses.sigmoid_loss, "softmax": losses.softmax_loss}[loss]
  k1, k2 = jax.random.split(jax.random.key(0))
  unit = lambda z: z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  zi, zt = unit(jax.random.normal(k1, (60, 96))), unit(jax.random.normal(k2, (60, 96)))
  t, b = jnp.float32(10.0), jnp.float32(-5.0)
  got = jax.value_and_grad(functools.partial(fused, config=cfg), argnums=(0, 1, 2, 3))(
      zi, zt, t, b)
  want = jax.value_and_grad(reference, argnums=(0, 1, 2, 3))(zi, zt, t, b)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
