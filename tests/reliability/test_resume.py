"""Kill at several steps (an exception, or SIGKILL to a subprocess at moments across the checkpoint
intervals) or SIGTERM, resume: bit-for-bit equal to an uninterrupted run, each step logged once;
resume onto a different number of devices; a corrupt checkpoint is replaced when training reaches
its step again; an incompatible checkpoint is refused with the params named."""
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import faults
from big_mm import checkpoint, metrics, train
from conftest import ROOT, final_params, read_metrics, tiny_config


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
  assert_logged_once_as_in(workdir, straight)


def assert_logged_once_as_in(workdir, straight):
  """Each step's training metrics appear once (the rows of redone steps were replaced) and
  equal the uninterrupted run's, in metrics.jsonl and TensorBoard."""
  losses = [(r["step"], r["loss"]) for r in read_metrics(workdir) if "loss" in r]
  assert losses == [(r["step"], r["loss"]) for r in read_metrics(straight) if "loss" in r]
  tb = metrics.read_tb_scalars(os.path.join(workdir, "tb"))["loss"]
  assert [s for s, _ in tb] == [s for s, _ in losses]


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
  wider = tiny_config(data_dir, **{"model.out_dim": dict(image=24, text=24)})
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


def test_corrupt_final_checkpoint_is_replaced(data_dir, tmp_path, straight, caplog):
  """The finished run's last checkpoint is corrupt: the rerun falls back to step 4, moves step 6
  aside and, reaching step 6 again, saves a good one (not "Done" with nothing good saved)."""
  workdir = str(tmp_path / "run")
  shutil.copytree(straight, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  biggest = max((os.path.join(d, f) for d, _, fs in os.walk(os.path.join(ckpt_dir, "6"))
                 for f in fs if f != checkpoint.MANIFEST_NAME), key=os.path.getsize)
  with open(biggest, "r+b") as f:
    f.truncate(os.path.getsize(biggest) // 2)
  with caplog.at_level("INFO", logger="big_mm"):
    train.train(tiny_config(data_dir), workdir)
  assert any("Resumed" in r.getMessage() and r.getMessage().endswith("at step 4")
             for r in caplog.records)
  ckpt = checkpoint.Checkpointer(ckpt_dir, save_every_steps=1, read_only=True)
  assert ckpt.all_steps() == [2, 4, 6] and ckpt.verify(6) == []
  ckpt.close()
  assert [n.split(".")[0] for n in os.listdir(os.path.join(ckpt_dir, checkpoint.QUARANTINE_DIRNAME))
          ] == ["6"]
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, 6),
               final_params(straight, 6))
  assert_logged_once_as_in(workdir, straight)


# The tiny run in a subprocess, so that it can be killed with SIGKILL (kill -9); each batch takes
# 0.1 s more, so that a checkpoint interval lasts long enough to be hit at random moments.
_TRAIN_SCRIPT = """
import sys, time
sys.path.insert(0, {tests!r})
from conftest import tiny_config
from big_mm import metrics, train
from big_mm.input import pipeline
real_iterator = pipeline.make_train_iterator

def slow_iterator(*args, **kwargs):
  it = real_iterator(*args, **kwargs)
  class Slow(type(it)):
    def __next__(self):
      time.sleep(0.1)
      return super().__next__()
  it.__class__ = Slow
  return it

pipeline.make_train_iterator = slow_iterator
metrics.setup_logging()
train.train(tiny_config({data_dir!r}), {workdir!r})
"""


def _committed_steps(workdir):
  ckpt_dir = os.path.join(workdir, "checkpoints")
  return sorted(int(s) for s in os.listdir(ckpt_dir) if s.isdigit()) if os.path.isdir(ckpt_dir) else []


def _run_and_kill(data_dir, workdir, log_path, when, delay):
  """Trains in a subprocess and SIGKILLs it `delay` seconds after `when(log_text, steps_at_start)`
  first holds (polled every 2 ms); returns the run's log."""
  script = _TRAIN_SCRIPT.format(tests=os.path.join(ROOT, "tests"), data_dir=data_dir,
                                workdir=workdir)
  steps_at_start = _committed_steps(workdir)
  with open(log_path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=log,
                            stderr=subprocess.STDOUT)
  try:
    deadline = time.monotonic() + 600
    while not when(open(log_path).read(), steps_at_start):
      assert proc.poll() is None, "the run ended before the kill:\n" + open(log_path).read()[-5000:]
      assert time.monotonic() < deadline, open(log_path).read()[-5000:]
      time.sleep(0.002)
    time.sleep(delay)
  finally:
    proc.kill()  # SIGKILL
    proc.wait()
  return open(log_path).read()


def _after_new_checkpoint(workdir):
  """The moment orbax commits a checkpoint this run saved (before or just after its manifest)."""
  return lambda log, steps_at_start: set(_committed_steps(workdir)) - set(steps_at_start)


def _after_steps_logged(n):
  """The moment this run has logged its `n`-th training step."""
  return lambda log, steps_at_start: log.count("/6 (") >= n


def test_sigkill_at_any_moment_resumes_exactly(data_dir, tmp_path, straight, caplog):
  """kill -9 right after the first checkpoint's commit (the moment big_mm's manifest may still be
  missing), at a random moment of the next interval, and right after the commit of whichever
  checkpoint comes next; every rerun resumes from the newest committed step, and the last one ends
  exactly like the uninterrupted run. BIG_MM_SOAK=N adds N kills at random moments."""
  workdir = str(tmp_path / "run")
  rng = random.Random(0)
  kills = [(_after_new_checkpoint(workdir), 0.0), (_after_steps_logged(1), rng.uniform(0, 0.3)),
           (_after_new_checkpoint(workdir), 0.0)]
  kills += [(_after_steps_logged(rng.randint(1, 2)), rng.uniform(0, 0.3))
            for _ in range(int(os.environ.get("BIG_MM_SOAK", "0")))]
  expected_start = None
  for i, (when, delay) in enumerate(kills):
    if expected_start == 6:
      break  # nothing left to train
    log = _run_and_kill(data_dir, workdir, str(tmp_path / f"run{i}.log"), when, delay)
    if expected_start is not None:
      assert f"at step {expected_start}\n" in log, log[-5000:]
    else:
      assert "Resumed" not in log, log[-5000:]
    committed = _committed_steps(workdir)
    expected_start = committed[-1] if committed else None
  with caplog.at_level("INFO", logger="big_mm"):
    train.train(tiny_config(data_dir), workdir)
  resumed = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Resumed")]
  assert resumed == ([] if expected_start is None else [
      f"Resumed from {os.path.join(workdir, 'checkpoints')} at step {expected_start}"])
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir, 6),
               final_params(straight, 6))
  assert_logged_once_as_in(workdir, straight)
