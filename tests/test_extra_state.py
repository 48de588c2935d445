"""Train state an objective declares beside params and optimizer state (init_extra_state /
update_extra_state): an EMA of the params follows its update rule after each step (a skipped
step leaves it as it was), is sharded like the params, checkpointed, resumed bit for bit and
rebuilt for params loaded by config.init."""
import os

import jax
import numpy as np
import pytest

from big_mm import checkpoint, objectives, sharding, train
from big_mm.input import pipeline
from conftest import tiny_config
from reliability import faults

DECAY = 0.9


class EmaContrastive(objectives.Contrastive):
  """The contrastive objective keeping an EMA of its params (a teacher its loss does not use)."""
  NAME = "ema_contrastive"

  def init_extra_state(self, params):
    return {"ema": params}

  def update_extra_state(self, extra, params, step):
    del step
    return {"ema": jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p, extra["ema"], params)}

  def value_and_grad(self, params, batch, rng, *, extra):
    # The trainer hands the extra state to the objective that declares it.
    assert jax.tree.structure(extra["ema"]) == jax.tree.structure(params)
    return super().value_and_grad(params, batch, rng)


@pytest.fixture
def ema_config(data_dir, monkeypatch):
  monkeypatch.setitem(objectives.OBJECTIVES, EmaContrastive.NAME, EmaContrastive)
  return lambda **changes: tiny_config(data_dir, **{"objective.name": EmaContrastive.NAME},
                                       **changes)


def ema_by_hand(ema, params):
  return jax.tree.map(lambda e, p: DECAY * e + (1 - DECAY) * p, ema, params)


def test_objectives_without_extra_state_keep_the_state_as_it_was(data_dir):
  ts = train.make_train_state(train.build(tiny_config(data_dir)))
  assert set(ts.abstract) == {"params", "opt", "step", "rng", "nonfinite"}


def test_ema_follows_the_params_after_each_step_and_is_sharded_like_them(ema_config):
  config = ema_config(mesh=dict(data=1, fsdp=8, tensor=1), nan_policy="skip")
  setup = train.build(config)
  ts = train.make_train_state(setup)
  it = pipeline.make_train_iterator(config.input, global_batch_size=16, seed=0, sharding=None)
  batches = [{k: np.array(v) for k, v in next(it).items()} for _ in range(4)]
  batches[2]["image"][0, 0, 0, 0] = np.nan  # step 3 is skipped: params and EMA stay
  params_seen, ema_seen = [], []
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    step = train.make_train_step(setup, ts)
    for batch in [None] + batches:
      if batch is not None:
        state, metrics = step(state, jax.device_put(batch, sharding.batch_sharding(setup.mesh)))
      params_seen.append(jax.device_get(state["params"]))
      ema_seen.append(jax.device_get(state["extra"]["ema"]))
  assert int(metrics["nonfinite_skipped"]) == 1
  want = params_seen[0]
  for number, (params, ema) in enumerate(zip(params_seen, ema_seen)):
    if number not in (0, 3):
      want = ema_by_hand(want, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), ema, want)
  jax.tree.map(np.testing.assert_array_equal, ema_seen[3], ema_seen[2])
  assert not np.array_equal(ema_seen[-1]["img"]["head"]["kernel"],
                            params_seen[-1]["img"]["head"]["kernel"])
  # Laid out like the params (fsdp-sharded where they are), not replicated.
  assert ts.shardings["extra"]["ema"] == ts.shardings["params"]
  assert all(jax.tree.leaves(jax.tree.map(lambda e, p: e.sharding == p.sharding,
                                          state["extra"]["ema"], state["params"])))
  assert any("fsdp" in str(s.spec) for s in jax.tree.leaves(ts.shardings["extra"]))


def restored_state(config, workdir, step):
  """The whole train state a run saved at `step` (host arrays)."""
  ts = train.make_train_state(train.build(config))
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every_steps=1,
                                 read_only=True)
  state, _ = ckpt.restore(step, ts.abstract)
  ckpt.close()
  return jax.device_get(state)


def test_killed_and_resumed_run_has_the_uninterrupted_extra_state(ema_config, tmp_path,
                                                                  monkeypatch):
  config = ema_config()
  straight, workdir = str(tmp_path / "straight"), str(tmp_path / "run")
  train.train(config, straight)
  with monkeypatch.context() as m:
    faults.on_batch(m, 5, lambda batch: (_ for _ in ()).throw(faults.Crash()))
    with pytest.raises(faults.Crash):
      train.train(config, workdir)  # checkpoints at steps 2 and 4; step 5 is lost
  train.train(config, workdir)
  want, got = restored_state(config, straight, 6), restored_state(config, workdir, 6)
  jax.tree.map(np.testing.assert_array_equal, got["extra"], want["extra"])
  jax.tree.map(np.testing.assert_array_equal, got["params"], want["params"])
  assert not np.array_equal(got["extra"]["ema"]["txt"]["head"]["kernel"],
                            got["params"]["txt"]["head"]["kernel"])

  # Params loaded by config.init get an extra state built for them (not for the random init).
  init_config = ema_config(**{"init.workdir": straight})
  setup = train.build(init_config)
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    state = jax.device_get(train.load_init(init_config, ts, ts.init(jax.random.key(0))))
  jax.tree.map(np.testing.assert_array_equal, state["extra"]["ema"], want["params"])
