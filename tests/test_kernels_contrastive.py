"""Fused contrastive kernels (Pallas, interpret mode on CPU) and their XLA "chunked" mode
equal the jnp references.

Block sizes are odd and not multiples of the tiles (or chunks), so padding and masking are
exercised.
"""
import functools

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm.kernels import contrastive as kc
from big_mm.objectives import losses

TB = {"sigmoid": (10.0, -10.0), "softmax": (14.0, 0.5)}
ARGS = (0, 1, 2, 3)


def _cfg(mode="grid", rows=16, cols=32):
  return kc.kernel_config("cpu", tile_rows=rows, tile_cols=cols, mode=mode)


def _emb(seed, n_img, n_txt, d, dtype=jnp.float32):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  zi = jax.random.normal(k1, (n_img, d), jnp.float32)
  zt = jax.random.normal(k2, (n_txt, d), jnp.float32)
  m = min(n_img, n_txt)
  zt = zt.at[:m].add(0.5 * zi[:m])  # correlated pairs, so the positives matter
  norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return norm(zi).astype(dtype), norm(zt).astype(dtype)


def _close(got, want, rtol, atol_frac=0.0):
  """Elementwise rtol plus an absolute slack relative to the largest entry of `want`."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  np.testing.assert_allclose(got, want, rtol=rtol, atol=atol_frac * np.abs(want).max() + 1e-7)


# ----------------------------------------------------------------------------- blocks


@pytest.mark.parametrize("mode", kc.MODES)
def test_block_lse_matches_reference(mode):
  zi, zt = _emb(0, 45, 37, 40)
  cfg = _cfg(mode)
  w_r, w_c = jnp.linspace(-1.0, 2.0, 45), jnp.linspace(0.5, 1.5, 37)

  def objective(block):
    def f(zi, zt, t, b):
      lse_r, lse_c = block(zi, zt, t, b)
      return jnp.sum(w_r * lse_r) + jnp.sum(w_c * lse_c)
    return f

  block = functools.partial(kc.block_lse, config=cfg)
  (got_r, got_c), got = jax.jit(lambda *a: (block(*a), jax.grad(objective(block), ARGS)(*a)))(
      zi, zt, 10.0, -3.0)
  want_r, want_c = kc.block_lse_reference(zi, zt, 10.0, -3.0)
  want = jax.grad(objective(kc.block_lse_reference), ARGS)(zi, zt, 10.0, -3.0)
  _close(got_r, want_r, 1e-5)
  _close(got_c, want_c, 1e-5)
  for g, w in zip(got, want):
    _close(g, w, 1e-5, 1e-6)


@pytest.mark.parametrize("mode", kc.MODES)
def test_block_sigmoid_sum_matches_reference(mode):
  zi, zt = _emb(1, 45, 37, 40)
  cfg = _cfg(mode)
  f = lambda zi, zt, t, b, off: kc.block_sigmoid_sum(zi, zt, t, b, off, config=cfg)
  value_and_grad = jax.jit(jax.value_and_grad(f, ARGS))
  # The offset is traced; 37 (= the number of columns) is a block without positives.
  for pos_offset in (0, 5, 37):
    got_v, got_g = value_and_grad(zi, zt, 10.0, -3.0, pos_offset)
    ref = lambda zi, zt, t, b: kc.block_sigmoid_sum_reference(
        zi, zt, t, b, None if pos_offset == 37 else pos_offset)
    want_v, want_g = jax.value_and_grad(ref, ARGS)(zi, zt, 10.0, -3.0)
    _close(got_v, want_v, 1e-5)
    for g, w in zip(got_g, want_g):
      _close(g, w, 1e-5, 1e-6)


# ----------------------------------------------------------------------------- full batch


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["grid", "chunked"])
def test_fused_loss_matches_reference(loss, dtype, mode):
  zi, zt = _emb(2, 67, 67, 48, jnp.dtype(dtype))
  t, b = TB[loss]
  fused = {"sigmoid": kc.sigmoid_loss_fused, "softmax": kc.softmax_loss_fused}[loss]
  fused = functools.partial(fused, config=_cfg(mode, rows=32, cols=16))
  reference = {"sigmoid": losses.sigmoid_loss, "softmax": losses.softmax_loss}[loss]
  got_v, got_g = jax.jit(jax.value_and_grad(fused, ARGS))(zi, zt, t, b)
  want_v, want_g = jax.value_and_grad(reference, ARGS)(zi, zt, t, b)
  # bf16: same products (exact in f32), but the backward casts dlogits to bf16 for the matmul.
  rtol, slack = (1e-5, 1e-6) if dtype == "float32" else (2e-2, 2e-2)
  _close(got_v, want_v, 1e-5)
  for g, w in zip(got_g[:3], want_g[:3]):
    assert g.dtype == w.dtype
    _close(g, w, rtol, slack)
  # Softmax does not depend on b: its gradient is ~0 in both, so compare absolutely.
  np.testing.assert_allclose(got_g[3], want_g[3], rtol=rtol, atol=1e-5)


# ----------------------------------------------------------------------------- sharded

MESHES = {"data8": ((8,), ("data",)), "data4_fsdp2": ((4, 2), ("data", "fsdp"))}


def _mesh(name):
  shape, names = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


@functools.lru_cache(maxsize=None)
def _sharded_value_and_grad(loss, strategy, mesh_name, implementation):
  mesh = _mesh(mesh_name)
  mode = "chunked" if implementation == "chunked" else "grid"
  fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh,
                         implementation=implementation,
                         kernel_config=_cfg(mode, rows=16, cols=16))
  return mesh, jax.jit(jax.value_and_grad(fn, ARGS))


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("strategy,mesh_name,implementation", [
    ("ring", "data8", "pallas"), ("all_gather", "data8", "pallas"),
    ("ring", "data4_fsdp2", "pallas"), ("ring", "data8", "chunked"),
    ("all_gather", "data4_fsdp2", "chunked")])
def test_sharded_fused_equals_reference(loss, strategy, mesh_name, implementation):
  mesh, value_and_grad = _sharded_value_and_grad(loss, strategy, mesh_name, implementation)
  axes = losses.batch_axes_of(mesh, ("data", "fsdp"))
  n = 72  # 9 rows per device: not a multiple of the 16-row tile
  zi, zt = _emb(3, n, n, 32)
  t, b = TB[loss]
  reference = {"sigmoid": losses.sigmoid_loss, "softmax": losses.softmax_loss}[loss]
  want_v, want_g = jax.value_and_grad(reference, ARGS)(zi, zt, t, b)
  shard = lambda x: jax.device_put(x, NamedSharding(mesh, P(axes)))
  got_v, got_g = value_and_grad(shard(zi), shard(zt), t, b)
  _close(got_v, want_v, 1e-5)
  for g, w in zip(got_g[:3], want_g[:3]):
    _close(g, w, 1e-5, 1e-6)
  np.testing.assert_allclose(got_g[3], want_g[3], rtol=1e-5, atol=1e-6)

  # A non-finite embedding makes the loss non-finite, as in the reference.
  for bad in (jnp.nan, jnp.inf):
    zi_bad = zi.at[5, 3].set(bad)
    got_v, _ = value_and_grad(shard(zi_bad), shard(zt), t, b)
    assert not np.isfinite(reference(zi_bad, zt, t, b))
    assert not np.isfinite(got_v)


def _pallas_calls(fn, *args):
  """How many pallas_call equations the traced program of fn(*args) holds (nested jaxprs
  included: custom_vjp, jit, shard_map)."""
  def count(jaxpr):
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name == "pallas_call"
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        n += count(sub)
    return n
  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_local_pallas_strategy_uses_fused_loss():
  zi, zt = _emb(4, 40, 40, 32)
  t, b = TB["softmax"]
  fused = functools.partial(losses.contrastive_loss, loss="softmax", strategy="local",
                            implementation="pallas", kernel_config=_cfg())
  xla = functools.partial(fused, implementation="xla")
  _close(jax.jit(fused)(zi, zt, t, b), losses.softmax_loss(zi, zt, t, b), 1e-5)
  # The value alone cannot tell the kernel from the jnp loss: the program must call the kernel
  # (forward and backward), and the xla implementation must not.
  assert _pallas_calls(fused, zi, zt, t, b) >= 1
  assert _pallas_calls(jax.grad(fused, (0, 1)), zi, zt, t, b) >= 2
  assert _pallas_calls(xla, zi, zt, t, b) == 0


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_chunked_never_builds_the_logits(loss):
  """The chunked loss's compiled forward+backward holds no [B, B] array (its largest
  logit-sized value is a [chunk, B] slab), calls no Pallas kernel, and equals the reference."""
  n, chunk = 96, 16
  zi, zt = _emb(6, n, n, 8)
  t, b = TB[loss]
  fn = functools.partial(losses.contrastive_loss, loss=loss, strategy="local",
                         implementation="chunked",
                         kernel_config=kc.kernel_config("cpu", mode="chunked", tile_rows=chunk))
  grad = jax.value_and_grad(fn, ARGS)
  hlo = jax.jit(grad).lower(zi, zt, t, b).compile().as_text()
  assert f"[{chunk},{n}]" in hlo
  assert f"[{n},{n}]" not in hlo
  assert _pallas_calls(grad, zi, zt, t, b) == 0
  reference = {"sigmoid": losses.sigmoid_loss, "softmax": losses.softmax_loss}[loss]
  dense_hlo = jax.jit(jax.value_and_grad(reference, ARGS)).lower(zi, zt, t, b).compile().as_text()
  assert f"[{n},{n}]" in dense_hlo  # the check above can fail
  _close(jax.jit(fn)(zi, zt, t, b), reference(zi, zt, t, b), 1e-5)


def test_implementation_and_kernel_config_must_agree():
  zi, zt = _emb(7, 8, 8, 4)
  with pytest.raises(ValueError, match="implementation='chunked' got a kernel_config of mode"):
    losses.contrastive_loss(zi, zt, 1.0, 0.0, loss="sigmoid", strategy="local",
                            implementation="chunked", kernel_config=_cfg())
  with pytest.raises(ValueError, match="implementation='pallas' got a kernel_config of mode"):
    losses.contrastive_loss(zi, zt, 1.0, 0.0, loss="sigmoid", strategy="local",
                            implementation="pallas", kernel_config=_cfg("chunked"))
  with pytest.raises(ValueError, match="tile_rows >= 1"):
    kc.kernel_config("cpu", mode="chunked", tile_rows=0)


def test_invalid_arguments():
  zi, zt = _emb(5, 8, 8, 4)
  with pytest.raises(ValueError, match="implementation 'triton'; valid: xla, pallas, chunked"):
    losses.contrastive_loss(zi, zt, 1.0, 0.0, loss="sigmoid", strategy="local",
                            implementation="triton")
  with pytest.raises(ValueError, match="Unknown kernel mode"):
    kc.kernel_config("cpu", mode="warp")
  with pytest.raises(ValueError, match="Expected zi"):
    kc.lse_fwd(zi, zt[:, :2], 1.0, 0.0, config=_cfg())
