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


def test_evaluate_reproduces_the_training_time_evals(trained_demo, data_dir):
  """big_mm.evaluate on the finished run gives the numbers the trainer logged at step 600
  (here on 8 simulated devices instead of 1: equal up to a borderline example)."""
  from big_mm import config as config_lib
  from big_mm import evaluate
  workdir, _ = trained_demo
  logged = [r for r in read_metrics(workdir) if "eval/zeroshot/accuracy" in r][-1]
  config = config_lib.load("configs/demo.py", {"input.data_dir": data_dir})
  results = evaluate.evaluate(config, str(workdir))
  for key in ("eval/zeroshot/accuracy", "eval/retrieval/img2txt/R@5", "eval/retrieval/txt2img/R@5"):
    assert abs(results[key] - logged[key]) <= 1 / 300 + 1e-9, (key, results[key], logged[key])
  assert read_metrics(workdir)[-1]["step"] == 600  # appended to the run's metrics
