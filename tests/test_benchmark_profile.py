"""tools/benchmark.py --profile / --uint8: the trace is parsed into a bottleneck summary."""
import gzip
import json
import os
import sys

import pytest

from big_mm import config as config_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import benchmark  # noqa: E402  pylint: disable=wrong-import-position

SMALL = {"batch_size": 8, "model.towers.image.depth": 1, "model.towers.text.depth": 1}


def test_profiled_uint8_step_on_cpu_has_a_summary_of_its_ops(tmp_path):
  config = config_lib.load("configs/demo.py", SMALL)
  result = benchmark.run(config, steps=1, image_size=None, uint8=True,
                         profile=str(tmp_path), profile_steps=2)
  assert result["loss_finite"] and result["image_dtype"] == "uint8"
  assert result["batch_bytes"] == 8 * 32 * 32 * 3 + 8 * 16 * 4  # uint8 images, int32 text
  assert result["device_put_s_median"] > 0
  summary = result["profile"]
  assert summary["source"] == "host XLA runtime threads" and summary["steps"] == 2
  assert summary["profiled_step_s"] > 0 and summary["busy_fraction"] > 0
  assert os.path.exists(summary["trace"]) and summary["trace"].endswith(".json.gz")
  top = summary["top_ops"]
  assert top and all(o["ms_per_step"] > 0 and o["count_per_step"] > 0 for o in top)
  assert [o["ms_per_step"] for o in top] == sorted((o["ms_per_step"] for o in top), reverse=True)
  assert summary["op_ms_per_step"] >= sum(o["ms_per_step"] for o in top) - 1e-9
  assert sum(summary["by_kind"].values()) <= summary["op_ms_per_step"] + 1e-9
  # Runtime bookkeeping (ThunkExecutor::..., "end: ...") is not counted as an op.
  assert not any("::" in o["name"] or o["name"].startswith("end: ") for o in top)


def _write_trace(path, events):
  with gzip.open(path, "wt") as f:
    json.dump({"displayTimeUnit": "ns", "traceEvents": events}, f)


def test_device_trace_sums_the_xla_ops_line_by_hlo_op(tmp_path):
  """A GPU-shaped trace: the "XLA Ops" line is counted (by args.hlo_op, self times: a while op
  less the ops in it), the stream's kernels (the same work) and the host are not; ms per step
  and fractions by hand."""
  meta = [{"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "pid": 2, "name": "process_name", "args": {"name": "/host:CPU"}},
          {"ph": "M", "pid": 1, "tid": 10, "name": "thread_name", "args": {"name": "XLA Ops"}},
          {"ph": "M", "pid": 1, "tid": 11, "name": "thread_name",
           "args": {"name": "Stream #7(Compute)"}},
          {"ph": "M", "pid": 2, "tid": 20, "name": "thread_name", "args": {"name": "python"}}]
  op = lambda name, ts, dur, tid=10, pid=1, **args: {
      "ph": "X", "pid": pid, "tid": tid, "ts": ts, "dur": dur, "name": name, "args": args}
  events = meta + [
      op("fusion.1", 0, 3000), op("while.3", 3000, 4500), op("fusion.1", 3000, 3000),
      op("convolution.2", 6000, 1000), op("loop_fusion", 8000, 500, hlo_op="fusion.7"),
      op("fusion.1", 0, 9999, tid=11), op("PjitFunction(step_fn)", 0, 50000, tid=20, pid=2)]
  path = tmp_path / "perfetto_trace.json.gz"
  _write_trace(path, events)
  assert benchmark.trace_file(str(tmp_path)) == str(path)
  s = benchmark.trace_summary(str(path), steps=2, step_s=0.005)
  assert s["source"] == "device XLA Ops line" and s["num_op_events"] == 5
  # while.3 (3-7.5 ms) holds fusion.1 and convolution.2: 0.5 ms of its own; 8 ms in 2 steps.
  assert s["op_ms_per_step"] == pytest.approx(4.0)
  assert s["busy_fraction"] == pytest.approx(0.8)
  assert [(o["name"], o["ms_per_step"], o["count_per_step"]) for o in s["top_ops"]] == [
      ("fusion.1", 3.0, 1.0), ("convolution.2", 0.5, 0.5), ("while.3", 0.25, 0.5),
      ("fusion.7", 0.25, 0.5)]
  assert s["top_ops"][0]["fraction"] == pytest.approx(0.75)
  assert s["by_kind"] == pytest.approx({"fusion": 3.25, "convolution": 0.5, "while": 0.25})
  # Without an "XLA Ops" line the device's streams are the ops.
  _write_trace(path, [e for e in events if e.get("tid") != 10])
  s = benchmark.trace_summary(str(path), steps=1)
  assert s["source"] == "device streams" and s["busy_fraction"] is None
  assert [(o["name"], o["ms_per_step"]) for o in s["top_ops"]] == [("fusion.1", 9.999)]


def test_uint8_flag_and_xla_dump_flag_parse():
  assert benchmark._true("true") and not benchmark._true(None)  # pylint: disable=protected-access
  assert not benchmark._true("false")  # pylint: disable=protected-access
  assert benchmark.main(["--config", "configs/demo.py", "--bogus", "1"]) == 2
