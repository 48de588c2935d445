"""tools/benchmark_kernels.py: the autotuner's plumbing, run on CPU (--cpu).

The timings themselves mean nothing on CPU; what is checked is that every candidate runs in
its own subprocess, the fastest fitting one becomes a table entry for this device, and
kernel_config then gives the loss that entry's setting."""
import json
import os
import subprocess
import sys

import jax.numpy as jnp

from big_mm.kernels import contrastive as kc
from big_mm.kernels import tuning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "benchmark_kernels.py")


def test_autotune_writes_the_fastest_fitting_candidate(tmp_path, monkeypatch):
  table, rows = tmp_path / "tuning.json", tmp_path / "rows.json"
  candidates = ['{"tile_rows": 16}', '{"tile_rows": 64}', '{"tile_rows": 0}']
  proc = subprocess.run(
      [sys.executable, TOOL, "autotune", "--cpu", "--batches", "64", "--dim", "8",
       "--dtype", "float32", "--losses", "softmax", "--implementations", "chunked",
       "--candidates", *candidates, "--iters", "2", "--warmup", "0",
       "--write", str(table), "--json", str(rows)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  tried = json.loads(rows.read_text())["rows"]
  assert [r["candidate"] for r in tried] == [json.loads(c) for c in candidates]
  assert "tile_rows >= 1" in tried[2]["error"]  # a failing candidate is a row, not a crash
  timed = [r for r in tried if "ms" in r]
  assert len(timed) == 2 and all(r["ms"] > 0 for r in timed)
  best = min(timed, key=lambda r: r["ms"])
  assert best["chosen"] and sum(bool(r.get("chosen")) for r in tried) == 1
  (entry,) = json.loads(table.read_text())["entries"]
  assert entry["device_kind"] == tuning.device_kind()
  assert (entry["implementation"], entry["loss"], entry["batch"]) == ("chunked", "softmax", 64)
  assert entry["config"] == best["candidate"] and entry["ms"] == best["ms"]

  monkeypatch.setenv(tuning.ENV, str(table))
  cfg = kc.kernel_config("cpu", mode="chunked", dim=8, dtype=jnp.float32, loss="softmax",
                         batch=64)
  assert cfg.tile_rows == best["candidate"]["tile_rows"]


def test_autotune_without_a_fitting_candidate_writes_nothing(tmp_path):
  table = tmp_path / "tuning.json"
  proc = subprocess.run(
      [sys.executable, TOOL, "autotune", "--cpu", "--batches", "16", "--dim", "4",
       "--losses", "sigmoid", "--implementations", "chunked", "--candidates",
       '{"tile_rows": -1}', "--iters", "1", "--warmup", "0", "--write", str(table)],
      capture_output=True, text=True, timeout=300, cwd=ROOT)
  assert proc.returncode == 1
  assert "no chunked sigmoid candidate ran" in proc.stdout
  assert not table.exists()
