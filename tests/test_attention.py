"""Pallas flash attention (interpret mode on CPU) against the "xla" reference.

Values and gradients (dq, dk, dv) for every mask kind the models use, lengths that are
not block multiples, cross-attention, fully masked rows and NaN/Inf inputs; plus the
"auto" / "cudnn" dispatch on CPU and the error messages.
"""
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm.kernels import attention as attn
from big_mm.kernels import flash_attention as fa

F32_TOL = dict(rtol=1e-5, atol=2e-5)
BF16_TOL = dict(rtol=2e-2, atol=2e-2)


def _inputs(b, lq, lk, h, d, dtype=jnp.float32, seed=0):
  kq, kk, kv, kc = jax.random.split(jax.random.PRNGKey(seed), 4)
  q = jax.random.normal(kq, (b, lq, h, d), dtype)
  k = jax.random.normal(kk, (b, lk, h, d), dtype)
  v = jax.random.normal(kv, (b, lk, h, d), dtype)
  cotangent = jax.random.normal(kc, (b, lq, h, d), dtype)
  return q, k, v, cotangent


def _value_and_grads(implementation, **kw):
  def loss(q, k, v, cotangent, mask):
    out = attn.dot_product_attention(q, k, v, mask=mask, implementation=implementation, **kw)
    return jnp.sum(out.astype(jnp.float32) * cotangent.astype(jnp.float32)), out

  @jax.jit
  def run(q, k, v, cotangent, mask):
    grads, out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v, cotangent, mask)
    return (out,) + grads

  return run


def _assert_pallas_matches_xla(q, k, v, cotangent, mask=None, tol=F32_TOL, **kw):
  got = _value_and_grads("pallas", **kw)(q, k, v, cotangent, mask)
  want = _value_and_grads("xla", **kw)(q, k, v, cotangent, mask)
  assert got[0].dtype == q.dtype
  for name, g, w in zip(("out", "dq", "dk", "dv"), got, want):
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w, np.float32),
                               err_msg=name, **tol)
  return got


@pytest.mark.parametrize("lq,lk,causal", [
    (197, 197, False),  # 4 x 4 blocks of 64, the last one padded
    (64, 197, True),    # cross-attention, queries aligned with the last keys
    (197, 64, True),    # Lq > Lk: the first 133 queries see no key (uniform average)
])
def test_pallas_matches_xla(lq, lk, causal):
  _assert_pallas_matches_xla(*_inputs(2, lq, lk, 2, 64), causal=causal)


def test_key_padding_with_fully_padded_example():
  q, k, v, cot = _inputs(2, 64, 77, 2, 64)
  # Example 1 masks every key: its rows must be the uniform average over all 77 keys.
  kpm = jnp.arange(77)[None, None, None, :] < jnp.array([30, 0])[:, None, None, None]
  out = _assert_pallas_matches_xla(q, k, v, cot, mask=kpm)[0]
  np.testing.assert_allclose(out[1], jnp.broadcast_to(v[1].mean(0), out[1].shape), atol=1e-5)


def test_general_mask_per_head_with_causal_and_fully_masked_rows():
  q, k, v, cot = _inputs(2, 77, 77, 2, 64)
  mask = jax.random.bernoulli(jax.random.PRNGKey(5), 0.6, (2, 2, 77, 77))
  mask = mask.at[0, 1, 10].set(False).at[1, :, 70:].set(False)
  _assert_pallas_matches_xla(q, k, v, cot, mask=mask, causal=True)


def test_prefix_lm():
  q, k, v, cot = _inputs(2, 77, 77, 2, 64)
  prefix_len = jnp.array([20, 70])
  # The per-key prefix path against the dense prefix_lm_mask through the reference.
  got = _value_and_grads("pallas", causal=True, prefix_len=prefix_len)(q, k, v, cot, None)
  want = _value_and_grads("xla")(q, k, v, cot, attn.prefix_lm_mask(prefix_len, 77))
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, **F32_TOL)
  # prefix_lm_mask itself: causal plus the bidirectional prefix.
  m = np.asarray(attn.prefix_lm_mask(prefix_len, 77))
  assert m.shape == (2, 1, 77, 77)
  assert m[0, 0, 5, 19] and not m[0, 0, 5, 20] and m[0, 0, 40, 40] and not m[0, 0, 40, 41]
  assert m[1, 0, 0, 69] and not m[1, 0, 0, 70]


def test_bfloat16_head_dim_128_causal_with_key_padding():
  q, k, v, cot = _inputs(2, 77, 77, 2, 128, dtype=jnp.bfloat16)
  kpm = jnp.arange(77)[None, None, None, :] < jnp.array([50, 77])[:, None, None, None]
  _assert_pallas_matches_xla(q, k, v, cot, mask=kpm, tol=BF16_TOL, causal=True)


def test_nan_and_inf_propagate_like_reference():
  q, k, v, _ = _inputs(2, 77, 77, 2, 64)
  q = q.at[0, 5, 0].set(jnp.nan)       # one query row
  k = k.at[1, 40, 1, 0].set(jnp.nan)   # one key: rows that see it
  v = v.at[0, 60, 1, 3].set(jnp.inf)   # one value entry: +inf where it has weight
  for causal in (False, True):
    got = attn.dot_product_attention(q, k, v, causal=causal, implementation="pallas")
    want = attn.dot_product_attention(q, k, v, causal=causal)
    assert np.isnan(want).any() and np.isinf(want).any()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_allclose(got, want, **F32_TOL)


def test_tpu_block_config_in_tpu_interpret_mode():
  """The TPU tiling ((8, 128)-aligned blocks, int32 masks) through Mosaic's interpreter."""
  from jax.experimental.pallas import tpu as pltpu
  q, k, v, _ = _inputs(1, 200, 136, 1, 64)
  mask = jax.random.bernoulli(jax.random.PRNGKey(1), 0.7, (1, 1, 200, 136))
  cfg = fa.block_config("tpu", 200, 136, 64)
  assert (cfg.block_q, cfg.block_k) == (128, 128)
  got = fa.flash_attention(q, k, v, mask=mask, causal=True, platform="tpu",
                           interpret=pltpu.InterpretParams())
  np.testing.assert_allclose(got, attn.dot_product_attention(q, k, v, mask=mask, causal=True),
                             **F32_TOL)


@pytest.mark.parametrize("platform,lq,lk,blocks", [
    ("gpu", 197, 77, (64, 64)), ("gpu", 20, 9, (32, 16)), ("cpu", 8, 300, (16, 64)),
    ("tpu", 77, 1000, (80, 128)), ("tpu", 300, 64, (128, 64)),
])
def test_block_config(platform, lq, lk, blocks):
  cfg = fa.block_config(platform, lq, lk, 64)
  assert (cfg.block_q, cfg.block_k) == blocks


@pytest.mark.parametrize("lq,lk,causal,masked", [
    (257, 257, False, False), (257, 257, True, False), (13, 65, True, True),
    (77, 257, False, True), (33, 64, True, False)])
def test_pad_to_even_equals_unpadded(lq, lk, causal, masked):
  """cuDNN's odd-length path (pad by one, mask the padded keys, slice the padded queries)
  run around the xla attention: values and gradients equal the unpadded attention, and the
  inner attention only sees even lengths. (A query with no visible key differs: its
  uniform average then includes the padded key.)"""
  q, k, v, cot = _inputs(2, lq, lk, 2, 16, seed=lq + lk)
  mask = (jax.random.uniform(jax.random.PRNGKey(1), (2, 1, 1, lk)) > 0.3) if masked else None
  seen = []

  def attend(q, k, v, mask, causal):
    seen.append((q.shape[1], k.shape[1]))
    return attn._attention_xla(q, k, v, mask, causal)

  def loss(fn):
    return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

  padded = lambda q, k, v: attn.pad_to_even(attend, q, k, v, mask, causal)
  plain = lambda q, k, v: attn.dot_product_attention(q, k, v, mask=mask, causal=causal)
  got = jax.value_and_grad(loss(padded), (0, 1, 2))(q, k, v)
  want = jax.value_and_grad(loss(plain), (0, 1, 2))(q, k, v)
  assert all(a % 2 == 0 and b % 2 == 0 for a, b in seen)
  np.testing.assert_allclose(padded(q, k, v), plain(q, k, v), **F32_TOL)
  for g, w in zip(got[1], want[1]):
    assert np.all(np.isfinite(g))
    np.testing.assert_allclose(g, w, **F32_TOL)


def test_auto_picks_xla_on_cpu(caplog):
  q, k, v, _ = _inputs(1, 8, 8, 2, 64)
  with caplog.at_level(logging.INFO):
    out = attn.dot_product_attention(q, k, v, causal=True, implementation="auto")
  assert "chose 'xla'" in caplog.text
  np.testing.assert_array_equal(out, attn.dot_product_attention(q, k, v, causal=True))


def test_errors():
  q, k, v, _ = _inputs(1, 8, 8, 2, 64)
  with pytest.raises(ValueError, match="NVIDIA GPU.*'xla'"):
    attn.dot_product_attention(q, k, v, implementation="cudnn")
  with pytest.raises(ValueError, match="head_dim 48 is not supported.*'xla'"):
    attn.dot_product_attention(q[..., :48], k[..., :48], v[..., :48], implementation="pallas")
  with pytest.raises(ValueError, match="dtype int32 is not supported"):
    qi = q.astype(jnp.int32)
    attn.dot_product_attention(qi, qi, qi, implementation="pallas")
  with pytest.raises(ValueError, match="share one dtype"):
    attn.dot_product_attention(q, k.astype(jnp.bfloat16), v, implementation="pallas")
  with pytest.raises(ValueError, match="requires causal=True"):
    attn.dot_product_attention(q, k, v, prefix_len=jnp.array([3]), implementation="pallas")
  with pytest.raises(ValueError, match="broadcast"):
    attn.dot_product_attention(q, k, v, mask=jnp.ones((1, 1, 3, 8), bool), implementation="pallas")
