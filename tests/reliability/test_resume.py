"""Kill at several steps or SIGTERM, resume: bit-for-bit equal to an uninterrupted run; resume onto a
different number of devices; an incompatible checkpoint is refused with the params named."""
import os
import random
import signal

import jax
import numpy as np
import pytest

import faults
from big_mm import checkpoint, train
from conftest import final_params, read_metrics, tiny_config


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  train.train(tiny_config(data_dir), workdir)
  return workdir


# Before the first checkpoint, between checkpoints, and on the last step; BIG_MM_SOAK=N adds N
# random crash points (a longer soak, off in CI).
CRASH_POINTS = [2, 5, 6] + random.Random(0).choices(range(1, 7), k=int(os.environ.get(
    "BIG_MM_SOAK", "0")))


@pytest.mark.parametrize("crash_at_batch", CRASH_POINTS)
def test_kill_and_resume_is_bit_exact(data_dir, tmp_path, monkeypatch, straight, crash_at_batch):
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    faults.on_batch(m, crash_at_batch, lambda batch: (_ for _ in ()).throw(faults.Crash()))
    with pytest.raises(faults.Crash):
      train.train(config, workdir)
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert saved == [s for s in (2, 4) if s < crash_at_batch]  # nothing after the crash
  train.train(config, workdir)
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, 6),
               final_params(straight, 6))
  losses = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
  assert losses == {r["step"]: r["loss"] for r in read_metrics(straight) if "loss" in r}


def test_resume_on_fewer_devices(data_dir, tmp_path, monkeypatch, straight):
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    faults.on_batch(m, 5, lambda batch: (_ for _ in ()).throw(faults.Crash()))
    with pytest.raises(faults.Crash):
      train.train(config, workdir)  # 8 devices, checkpoint at step 4
  train.train(config, workdir, devices=jax.devices()[:4])  # steps 5-6 on 4 devices
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               final_params(workdir, 6), final_params(straight, 6))


def test_incompatible_checkpoint_names_the_params(data_dir, tmp_path, straight):
  wider = tiny_config(data_dir, **{"model.out_dim": (24, 24)})
  with pytest.raises(ValueError, match=r"(?s)shape mismatch params/(img|txt)/head/kernel.*\(32, 16\).*"
                                       r"--config.init.workdir="):
    train.train(wider, straight)


def test_corrupt_latest_checkpoint_falls_back(data_dir, tmp_path, straight, caplog):
  """A truncated file in the newest checkpoint: the run warns, resumes from the one before and
  still ends exactly like the uninterrupted run."""
  config = tiny_config(data_dir)
  workdir = str(tmp_path / "run")
  train.train(tiny_config(data_dir, total_steps=6), workdir)
  # Make the run look interrupted after step 4: drop step 6, truncate a file of step 4.
  ckpt_dir = os.path.join(workdir, "checkpoints")
  import shutil
  shutil.rmtree(os.path.join(ckpt_dir, "6"))
  step4 = os.path.join(ckpt_dir, "4")
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(step4) for f in fs
                 if f != checkpoint.MANIFEST_NAME), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with caplog.at_level("WARNING"):
    train.train(config, workdir)
  assert any("4" in r.getMessage() and "size mismatch" in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, 6),
               final_params(straight, 6))


def test_sigterm_saves_at_the_step_boundary_and_resumes(data_dir, tmp_path, monkeypatch, straight):
  config = tiny_config(data_dir, **{"checkpoint.every_steps": 100})
  workdir = str(tmp_path / "run")
  with monkeypatch.context() as m:
    faults.on_batch(m, 3, lambda batch: os.kill(os.getpid(), signal.SIGTERM))
    train.train(config, workdir)  # returns cleanly
  saved = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert saved == [3]  # the step in flight when the signal came was finished and saved
  train.train(config, workdir)
  assert read_metrics(workdir)[-1]["step"] == config.total_steps
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, 6),
               final_params(straight, 6))
