"""The README's demo, as a user runs it: the CLI on one CPU device reaches >= 80% zero-shot."""
import os

from conftest import read_metrics


def test_demo_reaches_80_percent_zero_shot(trained_demo):
  workdir, proc = trained_demo
  assert "ETA" in proc.stderr and "eval/zeroshot/accuracy" in proc.stderr
  final = [r for r in read_metrics(workdir) if "eval/zeroshot/accuracy" in r][-1]
  assert final["step"] == 600
  assert final["eval/zeroshot/accuracy"] >= 0.8, final
  assert sorted(os.listdir(workdir / "checkpoints")) == ["400", "600"]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tb"))
