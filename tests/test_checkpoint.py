"""Tests for big_mm.checkpoint on 8 simulated CPU devices."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from big_mm.checkpoint import Checkpointer, CheckpointDirectoryError


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))


def _state(mesh, scale=1.0):
  """A small train-state-like pytree: params, opt state (tuple), step, rng data."""
  sh = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  params = {
      "img": {"kernel": jnp.arange(32.0).reshape(16, 2) * scale},
      "t": jnp.array([scale]),
  }
  state = {
      "params": params,
      "opt": ({"mu": jax.tree.map(jnp.zeros_like, params)}, {"count": jnp.int32(3)}),
      "step": jnp.int32(7),
      "rng": jax.random.key_data(jax.random.key(0)),
  }
  shardings = {
      "params": {"img": {"kernel": sh}, "t": rep},
      "opt": ({"mu": {"img": {"kernel": sh}, "t": rep}}, {"count": rep}),
      "step": rep,
      "rng": rep,
  }
  return jax.device_put(state, shardings), shardings


def _abstract(state, shardings):
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
      state, shardings)


def _assert_equal(a, b):
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a, b)


def test_save_restore_sharded_with_data_state(tmp_path, mesh):
  state, shardings = _state(mesh)
  data_state = {"epoch": 1, "next_index": 123, "shard": [0, 8]}
  ckpt = Checkpointer(str(tmp_path / "ck"), keep=3, save_every_steps=1)
  assert ckpt.save(7, state, data_state=data_state)
  ckpt.close()
  # A fresh Checkpointer (as after a restart) finds and restores it.
  ckpt = Checkpointer(str(tmp_path / "ck"), keep=3, save_every_steps=1)
  assert ckpt.latest_step() == 7 and ckpt.all_steps() == [7]
  restored, restored_data = ckpt.restore(7, _abstract(state, shardings))
  ckpt.close()
  _assert_equal(restored, state)
  assert restored_data == data_state
  k = restored["params"]["img"]["kernel"]
  assert k.sharding.is_equivalent_to(NamedSharding(mesh, P("data")), k.ndim)
  assert len(k.addressable_shards) == 8 and k.addressable_shards[0].data.shape == (2, 2)
  assert restored["rng"].dtype == jnp.uint32
  key = jax.random.wrap_key_data(restored["rng"])
  np.testing.assert_array_equal(jax.random.key_data(key), state["rng"])


def test_restore_onto_different_sharding_and_no_data_state(tmp_path, mesh):
  state, shardings = _state(mesh, scale=2.0)
  with Checkpointer(str(tmp_path), save_every_steps=10, async_save=False) as ckpt:
    assert ckpt.save(10, state)  # no data_state
    rep = NamedSharding(mesh, P())
    restored, data_state = ckpt.restore(None, _abstract(state, jax.tree.map(
        lambda _: rep, state)))
  assert data_state is None
  _assert_equal(restored, state)
  k = restored["params"]["img"]["kernel"]
  assert k.sharding.is_fully_replicated
  assert k.addressable_shards[0].data.shape == (16, 2)


def test_save_interval_and_keep(tmp_path, mesh):
  state, _ = _state(mesh)
  ckpt = Checkpointer(str(tmp_path), keep=2, save_every_steps=2)
  assert not ckpt.save(1, state)          # off the interval
  for step in (2, 4, 6):
    assert ckpt.save(step, state, data_state={"i": step})
  assert ckpt.save(7, state, force=True)  # forced final save
  assert not ckpt.save(7, state, force=True)  # existing step: not overwritten
  ckpt.wait()
  assert ckpt.all_steps() == [6, 7]
  ckpt.close()
  on_disk = sorted(int(d) for d in os.listdir(tmp_path) if d.isdigit())
  assert on_disk == [6, 7]


def test_missing_step_lists_available(tmp_path, mesh):
  state, shardings = _state(mesh)
  with Checkpointer(str(tmp_path), save_every_steps=1) as ckpt:
    ckpt.save(3, state)
    ckpt.save(5, state)
    with pytest.raises(ValueError, match=r"step 4.*Available steps: \[3, 5\]"):
      ckpt.restore(4, _abstract(state, shardings))
  with Checkpointer(str(tmp_path / "empty"), save_every_steps=1) as ckpt:
    with pytest.raises(ValueError, match="No checkpoints"):
      ckpt.restore(None, _abstract(state, shardings))


def test_shape_and_structure_mismatch_names_params(tmp_path, mesh):
  state, shardings = _state(mesh)
  with Checkpointer(str(tmp_path), save_every_steps=1) as ckpt:
    ckpt.save(1, state)
    abstract = _abstract(state, shardings)
    rep = NamedSharding(mesh, P())
    bad = jax.tree.map(lambda x: x, abstract)
    bad["params"]["img"]["kernel"] = jax.ShapeDtypeStruct(
        (16, 4), jnp.float32, sharding=NamedSharding(mesh, P("data")))
    with pytest.raises(ValueError) as e:
      ckpt.restore(1, bad)
    msg = str(e.value)
    assert "params/img/kernel" in msg and "(16, 2)" in msg and "(16, 4)" in msg
    assert "opt/0/mu/img/kernel" not in msg  # only the mismatched path
    extra = jax.tree.map(lambda x: x, abstract)
    extra["params"]["b"] = jax.ShapeDtypeStruct((1,), jnp.float32, sharding=rep)
    del extra["params"]["t"]
    with pytest.raises(ValueError) as e:
      ckpt.restore(1, extra)
    msg = str(e.value)
    assert "missing from checkpoint: params/b" in msg
    assert "only in checkpoint: params/t" in msg


def test_unwritable_directory_fails_at_construction(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  path = str(blocker / "checkpoints")
  with pytest.raises(CheckpointDirectoryError) as e:
    Checkpointer(path, save_every_steps=1)
  assert path in str(e.value)
  assert "NotADirectoryError" in str(e.value) or "FileExistsError" in str(e.value)
