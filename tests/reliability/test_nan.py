"""NaN/Inf policy: a poisoned batch never reaches the params; skip counts it, stop saves and
stops, naming the step and the offending values."""
import os

import jax
import numpy as np
import pytest

import faults
from big_mm import train
from conftest import final_params, read_metrics, tiny_config


def poison(batch):
  image = np.array(batch["image"])
  image[0, 0, 0, 0] = np.nan
  return {**batch, "image": jax.device_put(image, batch["image"].sharding)}


def test_skip_policy_skips_and_counts(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, nan_policy="skip")
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    faults.on_batch(m, 3, poison)
    train.train(config, workdir)
  records = {r["step"]: r for r in read_metrics(workdir) if "loss" in r}
  assert np.isnan(records[3]["loss"])
  assert records[2]["nonfinite_skipped"] == 0 and records[6]["nonfinite_skipped"] == 1
  assert np.isfinite(records[6]["loss"])
  # The skipped step left the params untouched; the steps around it did update them.
  assert records[3]["param_norm"] == records[2]["param_norm"]
  assert records[4]["param_norm"] != records[3]["param_norm"]
  assert all(np.isfinite(records[s]["param_norm"]) for s in records)


def test_stop_policy_saves_last_good_state_and_reports(data_dir, tmp_path, monkeypatch):
  """Every step is checked, not only the logged ones: with log_every_steps=4 the run still stops
  at the poisoned step 3, saving the state whose params are those of step 2 (the last good one;
  checkpointed at step 2 as usual), and no later step runs."""
  config = tiny_config(data_dir, nan_policy="stop", log_every_steps=4)
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    faults.on_batch(m, 3, poison)
    with pytest.raises(FloatingPointError, match=r"last at step 3 \(loss=nan"):
      train.train(config, workdir)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "3"]
  params = final_params(workdir, 3)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))
  jax.tree.map(np.testing.assert_array_equal, params, final_params(workdir, 2))
  records = [r for r in read_metrics(workdir) if "loss" in r]
  assert [r["step"] for r in records] == [1, 3] and np.isnan(records[-1]["loss"])
