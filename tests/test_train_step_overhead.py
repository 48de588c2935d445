"""The trainer's step skips a non-finite update by lax.cond and clips the grads before it by
its grad_norm (tools/benchmark_step.py measures why): it must compute exactly what the earlier
formulation (jnp.where over params and optimizer state; benchmark_step's "metrics" variant)
did, for a finite step and for a non-finite one."""
import os
import sys

import jax
import numpy as np
import optax
import pytest

from big_mm import config as config_lib
from big_mm import optim, train

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import benchmark_step  # noqa: E402  pylint: disable=wrong-import-position

TINY = {"batch_size": 8, "input.text_len": 8, "optim.schedule.warmup_steps": 0,
        "model.towers.image.depth": 1, "model.towers.text.depth": 1}


def _steps(overrides):
  config = config_lib.load("configs/demo.py", {**TINY, **overrides})
  setup, ts, batch, _ = benchmark_step.prepare(config)
  with train.use_mesh(setup):
    return (setup, ts, batch, benchmark_step.ladder_step(setup, ts, "metrics"),
            train.make_train_step(setup, ts))


def _run(step, setup, ts, batch):
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    host = jax.device_get(state)  # the state is donated
    new, metrics = step(state, batch)
  return host, jax.device_get(new), jax.device_get(metrics)


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize("overrides", [
    {}, {"optim.lr_mults": (("txt/.*", 0.0), (".*", 1.0))}, {"optim.clip_norm": None}],
    ids=["clipped", "frozen_text", "unclipped"])
def test_step_equals_the_where_formulation_finite_and_not(overrides):
  """Finite: the same params, optimizer state, step and metrics, bit for bit (with some params
  frozen the clipping computes its own norm; unclipped nothing reuses it). A NaN image: params
  and optimizer state untouched, the nonfinite record filled in, both ways alike."""
  setup, ts, batch, before, after = _steps(overrides)
  old, ref_state, ref_metrics = _run(before, setup, ts, batch)
  _, new_state, new_metrics = _run(after, setup, ts, batch)
  _assert_same(new_state, ref_state)
  _assert_same(new_metrics, ref_metrics)
  assert np.isfinite(new_metrics["loss"]) and new_metrics["nonfinite_skipped"] == 0
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                       old["params"], new_state["params"]))
  assert sum(moved) > len(moved) // 2  # a real update, not a skipped one

  image = np.array(batch["image"])
  image[0, 0, 0, 0] = np.nan
  poisoned = {**batch, "image": jax.device_put(image, batch["image"].sharding)}
  _, ref_state, ref_metrics = _run(before, setup, ts, poisoned)
  old, new_state, new_metrics = _run(after, setup, ts, poisoned)
  _assert_same(new_state, ref_state)
  _assert_same(new_metrics, ref_metrics)
  _assert_same(new_state["params"], old["params"])
  _assert_same(new_state["opt"], old["opt"])
  record = new_state["nonfinite"]
  assert (record["count"], record["last_step"], int(new_state["step"])) == (1, 1, 1)
  assert np.isnan(record["loss"]) and np.isnan(record["grad_norm"])
  assert new_metrics["nonfinite_skipped"] == 1
  assert new_metrics["param_norm"] == pytest.approx(float(optax.tree.norm(old["params"])),
                                                    rel=1e-6)


def test_clipping_with_a_given_norm_equals_optax():
  grads = {"a": np.arange(6.0, dtype=np.float32).reshape(2, 3), "b": np.float32([3.0, -4.0])}
  for max_norm in (1.0, 100.0):  # clipped, and left alone
    ref, _ = optax.clip_by_global_norm(max_norm).update(grads, optax.EmptyState())
    tx = optim.clip_by_global_norm(max_norm)
    given, _ = tx.update(grads, tx.init(grads), global_norm=optax.tree.norm(grads))
    computed, _ = tx.update(grads, tx.init(grads))
    _assert_same(given, ref)
    _assert_same(computed, ref)
    _assert_same(tx.update(ref, tx.init(grads), clipped=True)[0], ref)
    assert np.array_equal(ref["a"], grads["a"]) == (max_norm == 100.0)


def test_benchmark_step_reports_the_variants_asked_for():
  """Three of the ladder's variants (each is a compile: all of them take ~40 s here)."""
  config = config_lib.load("configs/demo.py", TINY)
  assert set(benchmark_step.variants(*benchmark_step.prepare(config, None)[:2])) == {
      *benchmark_step.LADDER, "trainer"} - ({"clip"} if not config.optim.get("clip_norm")
                                             else set())
  result = benchmark_step.run(config, steps=1, names=("guard_opt", "trainer"))
  assert [r["variant"] for r in result["rows"]] == ["bare", "guard_opt", "trainer"]
  for row in result["rows"]:
    assert row["flops"] > 0 and row["bytes_accessed"] > 0 and row["step_s"] > 0
  assert "| trainer |" in benchmark_step.table(result)
