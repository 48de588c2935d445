"""Sharded contrastive losses equal the single-device full-batch reference (values and grads)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm.objectives import losses

MESHES = {
    "data8": ((8,), ("data",)),
    "data4_fsdp2": ((4, 2), ("data", "fsdp")),
    "data2_fsdp2_tensor2": ((2, 2, 2), ("data", "fsdp", "tensor")),
}
TB = {"sigmoid": (10.0, -10.0), "softmax": (14.0, 0.5)}


def _mesh(name):
  shape, names = MESHES[name]
  return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def _emb(seed, n, d):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  zi = jax.random.normal(k1, (n, d), jnp.float32)
  zt = jax.random.normal(k2, (n, d), jnp.float32)
  # Correlate the pairs a little so the diagonal matters.
  zt = zt + 0.5 * zi
  norm = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  return norm(zi), norm(zt)


# ------------------------------------------------------------------------- reference vs numpy


def _np_sigmoid(zi, zt, t, b):
  logits = t * zi.astype(np.float64) @ zt.astype(np.float64).T + b
  z = 2 * np.eye(len(zi)) - 1
  return float(np.mean(np.sum(np.log1p(np.exp(-z * logits)), axis=1)))


def _np_softmax(zi, zt, t, b):
  logits = t * zi.astype(np.float64) @ zt.astype(np.float64).T + b
  def ce(l):
    m = l.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(l - m).sum(axis=1, keepdims=True)))[:, 0]
    return np.mean(lse - np.diag(l))
  return float(0.5 * (ce(logits) + ce(logits.T)))


def test_references_match_numpy():
  zi, zt = _emb(0, 12, 8)
  zi_np, zt_np = np.asarray(zi), np.asarray(zt)
  got = losses.sigmoid_loss(zi, zt, 10.0, -10.0)
  np.testing.assert_allclose(got, _np_sigmoid(zi_np, zt_np, 10.0, -10.0), rtol=1e-5)
  got = losses.softmax_loss(zi, zt, 14.0)
  np.testing.assert_allclose(got, _np_softmax(zi_np, zt_np, 14.0, 0.0), rtol=1e-5)
  # A bias does not change softmax.
  np.testing.assert_allclose(losses.softmax_loss(zi, zt, 14.0, 3.0), got, rtol=1e-5)
  # bf16 inputs are computed in float32.
  assert losses.sigmoid_loss(zi.astype(jnp.bfloat16), zt, 10.0, -10.0).dtype == jnp.float32
  # The loss is not symmetric in a trivial way: permuting texts changes it.
  perm = np.roll(np.arange(12), 1)
  assert abs(float(losses.sigmoid_loss(zi, zt[perm], 10.0, -10.0)) - float(
      losses.sigmoid_loss(zi, zt, 10.0, -10.0))) > 1e-3


def test_invalid_arguments():
  zi, zt = _emb(0, 8, 4)
  with pytest.raises(ValueError, match="ring"):
    losses.contrastive_loss(zi, zt, 1.0, 0.0, loss="sigmoid", strategy="bogus")
  with pytest.raises(ValueError, match="softmax"):
    losses.contrastive_loss(zi, zt, 1.0, 0.0, loss="hinge", strategy="local")


def test_batch_axes_of():
  mesh = _mesh("data8")
  assert losses.batch_axes_of(mesh, ("data", "fsdp")) == ("data",)
  mesh = _mesh("data2_fsdp2_tensor2")
  assert losses.batch_axes_of(mesh, ("data", "fsdp")) == ("data", "fsdp")
  assert losses.batch_axes_of(mesh, "fsdp") == ("fsdp",)


# ------------------------------------------------------------------------- sharded == reference


def _sharded_value_and_grad(loss, strategy, mesh, zi, zt, t, b):
  axes = losses.batch_axes_of(mesh, ("data", "fsdp"))
  sh = NamedSharding(mesh, P(axes))
  rep = NamedSharding(mesh, P())
  args = (jax.device_put(zi, sh), jax.device_put(zt, sh),
          jax.device_put(jnp.float32(t), rep), jax.device_put(jnp.float32(b), rep))
  fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh,
                         batch_axes=("data", "fsdp"))
  return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(*args)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("strategy", ["local", "all_gather", "ring"])
@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_sharded_equals_reference(loss, strategy, mesh_name):
  mesh = _mesh(mesh_name)
  n = 32 if mesh_name == "data8" else 16
  zi, zt = _emb(1, n, 8)
  t, b = TB[loss]
  ref = losses.sigmoid_loss if loss == "sigmoid" else losses.softmax_loss
  want_v, want_g = jax.value_and_grad(ref, argnums=(0, 1, 2, 3))(zi, zt, jnp.float32(t),
                                                                 jnp.float32(b))
  got_v, got_g = _sharded_value_and_grad(loss, strategy, mesh, zi, zt, t, b)
  np.testing.assert_allclose(got_v, want_v, rtol=1e-5, atol=1e-6)
  for name, g, w in zip(("zimg", "ztxt", "t", "b"), got_g, want_g):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-6,
                               err_msg=f"grad {name}")
  # Gradients are non-trivial (so the comparison could fail).
  assert float(jnp.abs(want_g[0]).max()) > 1e-3
  assert abs(float(want_g[2])) > 1e-4
  if loss == "sigmoid":
    assert abs(float(want_g[3])) > 1e-4


# ------------------------------------------------------------------------- memory


def _temp_bytes(loss, strategy, mesh, n, d):
  zi, zt = _emb(2, n, d)
  sh = NamedSharding(mesh, P(("data",)))
  rep = NamedSharding(mesh, P())
  fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh)
  g = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))
  args = (jax.device_put(zi, sh), jax.device_put(zt, sh),
          jax.device_put(jnp.float32(10.0), rep), jax.device_put(jnp.float32(-10.0), rep))
  ma = g.lower(*args).compile().memory_analysis()
  if ma is None:
    print(f"memory_analysis() returned None for {strategy} on {jax.default_backend()}")
    return None
  return ma.temp_size_in_bytes


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
def test_ring_memory_smaller_than_all_gather(loss):
  mesh = _mesh("data8")
  n, d = 1024, 32
  ring = _temp_bytes(loss, "ring", mesh, n, d)
  ag = _temp_bytes(loss, "all_gather", mesh, n, d)
  if ring is None or ag is None:
    pytest.skip("compiled.memory_analysis() returned None on this backend")
  print(f"{loss} temp bytes: ring={ring} all_gather={ag}")
  # b x B logits (128 x 1024 f32 = 512 KiB) must not appear in the ring version.
  assert ring < ag, (ring, ag)
