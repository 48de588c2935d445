"""The README's demo, as a user runs it: the CLI on one CPU device reaches >= 80% zero-shot."""
import json
import os
import subprocess
import sys

from conftest import ROOT


def test_demo_reaches_80_percent_zero_shot(data_dir, tmp_path):
  workdir = tmp_path / "demo"
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a laptop
  proc = subprocess.run(
      [sys.executable, "-m", "big_mm.train", "--config", "configs/demo.py",
       "--workdir", str(workdir), f"--config.input.data_dir={data_dir}",
       "--config.evals.retrieval.every_steps=600", "--config.evals.zeroshot.every_steps=600"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ETA" in proc.stderr and "eval/zeroshot/accuracy" in proc.stderr
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  final = [r for r in records if "eval/zeroshot/accuracy" in r][-1]
  assert final["step"] == 600
  assert final["eval/zeroshot/accuracy"] >= 0.8, final
  assert (workdir / "checkpoints" / "600").is_dir()
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tb"))
