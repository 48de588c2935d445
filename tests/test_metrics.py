"""Tests for big_mm.metrics: JSONL + TensorBoard writing, progress, throughput, MFU."""
import glob
import json
import math
import os
import time

import numpy as np
import pytest

from big_mm import metrics as mlib


def test_jsonl_round_trip_with_nan_and_inf(tmp_path):
  with mlib.MetricWriter(str(tmp_path)) as w:
    w.write(1, {"loss": np.float32(0.5), "lr": 1e-3, "count": np.int32(7)})
    w.write(2, {"loss": float("nan"), "grad_norm": float("inf"), "x": -math.inf})
  path = tmp_path / "metrics.jsonl"
  lines = path.read_text().splitlines()
  assert len(lines) == 2
  for line in lines:  # strict JSON: no bare NaN / Infinity tokens
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-JSON {c}"))
  assert json.loads(lines[1])["loss"] == "nan"
  recs = mlib.read_jsonl(str(path))
  assert recs[0] == {"step": 1, "loss": 0.5, "lr": 1e-3, "count": 7}
  assert type(recs[0]["loss"]) is float and type(recs[0]["count"]) is int
  assert recs[1]["step"] == 2 and math.isnan(recs[1]["loss"])
  assert recs[1]["grad_norm"] == math.inf and recs[1]["x"] == -math.inf


def test_jsonl_truncated_last_line_and_restart_append(tmp_path):
  w = mlib.MetricWriter(str(tmp_path))
  w.write(1, {"loss": 1.0})
  w.write(2, {"loss": 0.9})
  w.close()
  path = tmp_path / "metrics.jsonl"
  with open(path, "a") as f:  # a crash mid-write
    f.write('{"step": 3, "loss": 0.')
  assert [r["step"] for r in mlib.read_jsonl(str(path))] == [1, 2]
  # A restarted run appends on a fresh line; the partial record is skipped.
  with mlib.MetricWriter(str(tmp_path)) as w:
    w.write(3, {"loss": 0.8})
  recs = mlib.read_jsonl(str(path))
  assert [(r["step"], r["loss"]) for r in recs] == [(1, 1.0), (2, 0.9), (3, 0.8)]
  # Corruption that is not a crash-truncated record is reported with its line.
  path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
  with pytest.raises(ValueError, match=":2:"):
    mlib.read_jsonl(str(path))


def test_tensorboard_events_written_and_readable(tmp_path):
  with mlib.MetricWriter(str(tmp_path)) as w:
    w.write(5, {"loss": 0.25})
    w.write(10, {"loss": 0.125})
    w.write_text(10, "config", "hello")
  files = glob.glob(str(tmp_path / "tb" / "events.out.tfevents*"))
  assert files and all(os.path.getsize(f) > 0 for f in files)
  scalars = mlib.read_tb_scalars(str(tmp_path / "tb"))
  assert scalars["loss"] == [(5, 0.25), (10, 0.125)]
  assert mlib.read_jsonl(str(tmp_path / "text.jsonl")) == [
      {"step": 10, "config": "hello"}]


def test_disabled_writer_writes_nothing(tmp_path):
  with mlib.MetricWriter(str(tmp_path / "w"), enabled=False) as w:
    w.write(1, {"loss": 1.0})
  assert not (tmp_path / "w").exists()


def test_non_scalar_metric_is_named(tmp_path):
  with mlib.MetricWriter(str(tmp_path)) as w:
    with pytest.raises(ValueError, match="'emb'"):
      w.write(1, {"emb": np.zeros(3)})


class FakeClock:

  def __init__(self):
    self.t = 100.0

  def __call__(self):
    return self.t


def test_progress_line_and_eta_excludes_compile_step():
  clock, lines = FakeClock(), []
  p = mlib.Progress(1000, start_step=0, log=lines.append, clock=clock)
  clock.t += 30.0  # step 1 includes a 30 s compile
  p.update(1, {"loss": 0.41234, "lr": 1e-3})
  for step in range(2, 121):
    clock.t += 0.15
    line = p.update(step, {"loss": 0.41234, "lr": 1e-3, "examples_per_sec": 812.4})
  assert len(lines) == 120 and lines[-1] == line
  assert line.startswith("step 120/1000 (12.0%)")
  assert "loss 0.4123" in line and "lr 1.0e-03" in line and "812 ex/s" in line
  assert "0.15 s/step" in line
  # ETA = 880 steps * 0.15 s (the 30 s compile interval is not averaged in).
  assert "ETA 0:02:12" in line
  assert "elapsed 0:00:48" in line


def test_progress_resumed_and_sparse_updates():
  clock = FakeClock()
  p = mlib.Progress(1000, start_step=500, log=None, clock=clock)
  clock.t += 50.0
  line = p.update(600)  # only the compile interval so far: used as estimate
  assert "step 600/1000 (60.0%)" in line and "ETA 0:03:20" in line
  clock.t += 10.0
  line = p.update(700)  # 0.1 s/step from now on
  assert "ETA 0:00:30" in line


def test_throughput_data_wait_fraction_with_sleep():
  t = mlib.Throughput()
  for step in range(1, 4):
    with t.data_wait():
      time.sleep(0.03)   # waiting for input
    time.sleep(0.01)     # "compute"
  out = t.step_done(3, num_examples=8)
  assert set(out) == {"examples_per_sec", "steps_per_sec", "step_time",
                      "data_wait_fraction"}
  assert 0.0 <= out["data_wait_fraction"] <= 1.0
  assert out["data_wait_fraction"] > 0.5
  # The next interval, without data waiting, reports ~0 wait.
  t.data_start()
  t.data_end()
  time.sleep(0.02)
  out2 = t.step_done(4, num_examples=8)
  assert out2["data_wait_fraction"] < 0.2


def test_throughput_arithmetic_with_fake_clock():
  clock = FakeClock()
  t = mlib.Throughput(clock=clock)
  t.step_done(10, num_examples=32)
  t.data_start()
  clock.t += 1.0
  t.data_end()
  clock.t += 3.0
  out = t.step_done(20, num_examples=32)  # 10 steps in 4 s
  assert out["step_time"] == pytest.approx(0.4)
  assert out["steps_per_sec"] == pytest.approx(2.5)
  assert out["examples_per_sec"] == pytest.approx(80.0)
  assert out["data_wait_fraction"] == pytest.approx(0.25)


def test_mfu_and_peak_flops():
  assert mlib.mfu(1e12, 0.5, 4e12) == pytest.approx(0.5)
  assert mlib.mfu(1e12, 0.5, None) is None
  assert mlib.mfu(None, 0.5, 1e12) is None
  assert mlib.device_peak_flops("TPU v4") == 275e12
  assert mlib.device_peak_flops("TPU v5 lite") == 197e12
  assert mlib.device_peak_flops("TPU v5p") == 459e12
  assert mlib.device_peak_flops("TPU v6 lite") == 918e12
  assert mlib.device_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert mlib.device_peak_flops("NVIDIA H200") == 989e12
  assert mlib.device_peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  import jax
  assert mlib.device_peak_flops(jax.devices("cpu")[0]) is None


class _FakeCompiled:

  def __init__(self, value):
    self.value = value

  def cost_analysis(self):
    if isinstance(self.value, Exception):
      raise self.value
    return self.value


def test_compiled_flops_robust():
  assert mlib.compiled_flops(_FakeCompiled({"flops": 10.0})) == 10.0
  assert mlib.compiled_flops(_FakeCompiled([{"flops": 3.0}, {"flops": 4.0}])) == 7.0
  assert mlib.compiled_flops(_FakeCompiled(None)) is None
  assert mlib.compiled_flops(_FakeCompiled([{}])) is None
  assert mlib.compiled_flops(_FakeCompiled(NotImplementedError())) is None
  import jax
  import jax.numpy as jnp
  x = jnp.ones((16, 16), jnp.float32)
  compiled = jax.jit(lambda a: a @ a).lower(x).compile()
  flops = mlib.compiled_flops(compiled)
  assert flops is not None and flops >= 2 * 16 ** 3 * 0.9
