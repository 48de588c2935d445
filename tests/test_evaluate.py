"""big_mm.evaluate, run as a user runs it: its command line on a run trained by big_mm.train."""
from conftest import read_metrics


def test_evaluate_an_epoch_based_run(data_dir, tmp_path):
  """A run whose length is given in epochs: evaluate resolves it as training did (it needs
  the training set's size to build the run's optimizer) and gives the training-time evals."""
  from big_mm import evaluate, train
  workdir = str(tmp_path / "run")
  args = ["--config", "configs/demo.py:steps=20,batch=32", "--workdir", workdir,
          f"--config.input.data_dir={data_dir}", "--config.total_steps=None",
          "--config.total_epochs=0.1", "--config.optim.schedule.warmup_steps=None",
          "--config.optim.schedule.warmup_epochs=0.05"]
  assert train.main(args) == 0
  logged = [r for r in read_metrics(workdir) if "eval/zeroshot/accuracy" in r][-1]
  assert logged["step"] == 5  # round(0.1 epochs * 1497 examples / 32)
  assert evaluate.main(args) == 0
  evaluated = read_metrics(workdir)[-1]
  assert evaluated["step"] == 5
  for key in ("eval/zeroshot/accuracy", "eval/retrieval/img2txt/R@1"):
    assert abs(evaluated[key] - logged[key]) <= 1 / 300 + 1e-9, (key, evaluated, logged)
