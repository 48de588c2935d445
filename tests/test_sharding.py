"""Mesh construction, batch checks and logical-axis shardings."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from big_mm import config as config_lib
from big_mm import sharding


def _cfg(**axes):
  return config_lib.ConfigDict(axes)


def test_mesh_rest_axis():
  mesh = sharding.make_mesh(_cfg(data=-1, fsdp=2, tensor=1))
  assert dict(mesh.shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_mesh_errors_name_the_numbers():
  with pytest.raises(sharding.ShardingError, match=r"multiple of 3 devices, but there are 8"):
    sharding.make_mesh(_cfg(data=-1, fsdp=3))
  with pytest.raises(sharding.ShardingError, match="uses 4 devices but there are 8"):
    sharding.make_mesh(_cfg(data=2, fsdp=2))
  with pytest.raises(sharding.ShardingError, match="Only one mesh axis may be -1"):
    sharding.make_mesh(_cfg(data=-1, fsdp=-1))


def test_batch_size_must_divide_data_axes():
  mesh = sharding.make_mesh(_cfg(data=2, fsdp=2, tensor=2))
  sharding.check_batch_size(8, mesh)
  with pytest.raises(sharding.ShardingError, match=r"batch_size=6 does not divide.*4 shards"):
    sharding.check_batch_size(6, mesh)


class _Tiny(nn.Module):
  @nn.compact
  def __call__(self, x):
    k = self.param("kernel", nn.with_logical_partitioning(nn.initializers.ones, ("embed", "mlp")),
                   (x.shape[-1], 6))
    b = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (6,))
    return x @ k + b


def test_logical_shardings_and_indivisible_dims():
  mesh = sharding.make_mesh(_cfg(data=1, fsdp=4, tensor=2))
  boxed = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 8)))["params"]
  sh = sharding.logical_shardings(boxed, mesh)
  assert sh["kernel"].spec == P("fsdp", "tensor")
  assert sh["bias"].spec == P("tensor")
  # 6 is not divisible by fsdp=4: that dim falls back to replicated.
  boxed = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 6)))["params"]
  sh = sharding.logical_shardings(boxed, mesh, (("embed", "fsdp"), ("mlp", None)))
  assert sh["kernel"].spec == P(None, None) and sh["bias"].spec == P(None)


def test_optimizer_state_shardings_follow_params():
  import optax
  mesh = sharding.make_mesh(_cfg(data=1, fsdp=4, tensor=2))
  boxed = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 8)))["params"]
  params = sharding.unbox(boxed)
  psh = sharding.logical_shardings(boxed, mesh)
  opt = jax.eval_shape(optax.adamw(1e-3).init, params)
  osh = sharding.shardings_like(opt, mesh, params, psh)
  assert osh[0].mu["kernel"].spec == P("fsdp", "tensor")
  assert osh[0].nu["bias"].spec == P("tensor")
  assert osh[0].count.spec == P()


class _Experts(nn.Module):
  @nn.compact
  def __call__(self, x):
    w = self.param("experts", nn.with_logical_partitioning(nn.initializers.ones,
                                                           ("expert", "embed", "mlp")),
                   (4, x.shape[-1], 6))
    return jnp.einsum("bd,edm->bem", x, w)


def test_expert_axis_shards_expert_params():
  """config.mesh has an `expert` axis (size 1 by default: every sharding stays as without
  it); params with the logical axis "expert" are split over it."""
  default = config_lib.defaults().mesh
  assert dict(default) == {"data": -1, "fsdp": 1, "tensor": 1, "expert": 1}
  mesh = sharding.make_mesh(default)
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1, "expert": 1}
  assert sharding.batch_axes(mesh) == ("data", "fsdp", "expert")
  boxed = jax.eval_shape(_Tiny().init, jax.random.key(0), jnp.zeros((1, 8)))["params"]
  with_expert = sharding.logical_shardings(
      boxed, sharding.make_mesh(_cfg(data=1, fsdp=4, tensor=2, expert=1)))
  without = sharding.logical_shardings(boxed, sharding.make_mesh(_cfg(data=1, fsdp=4, tensor=2)))
  assert jax.tree.map(lambda s: s.spec, with_expert) == jax.tree.map(lambda s: s.spec, without)

  mesh = sharding.make_mesh(_cfg(data=2, fsdp=1, tensor=2, expert=2))
  boxed = jax.eval_shape(_Experts().init, jax.random.key(0), jnp.zeros((1, 8)))["params"]
  assert sharding.logical_shardings(boxed, mesh)["experts"].spec == P("expert", None, "tensor")


def test_rules_drop_mesh_axes_a_hand_made_mesh_lacks():
  """A mesh without `expert` (made by hand): the batch goes over the axes it has."""
  mesh = jax.make_mesh((4, 2), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
  rules = dict(sharding.rules(None, mesh))
  assert rules["batch"] == ("data", "fsdp") and rules["expert"] is None
  assert dict(sharding.rules(None))["batch"] == ("data", "fsdp", "expert")
