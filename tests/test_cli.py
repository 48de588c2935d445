"""The command-line tools as a user meets them: usage and recipes, user errors without
tracebacks, the run's stored config (read by evaluate / export, compared on resume), a finished
run re-run, and a step evaluated again."""
import glob
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from big_mm import checkpoint, cli, evaluate, evaluators, metrics, train
from big_mm import config as config_lib
from big_mm.evaluators import common
from conftest import ROOT, read_metrics, tiny_config


def _run(*args, env=None):
  return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                        timeout=300, env={**os.environ, **(env or {})})


def _export_main():
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import export  # pylint: disable=g-import-not-at-top
  return export.main


def test_usage_and_recipe_list(capsys):
  usage = _run("-m", "big_mm.train", "--help")
  assert usage.returncode == 0, usage.stderr
  recipes = _run("-m", "big_mm.train", "--list_configs")
  assert recipes.returncode == 0, recipes.stderr
  assert re.search(r"^configs/demo.py +Demo: a tiny SigLIP on the bundled digits captions, on a "
                   r"laptop / 2-core CPU\.$", recipes.stdout, re.M)
  assert "configs/common.py" not in recipes.stdout  # no get_config: not a recipe
  texts = {"train": usage.stdout}
  for name, main in (("evaluate", evaluate.main), ("export", _export_main())):
    assert main(["--help"]) == 0
    texts[name] = capsys.readouterr().out
  for name, text in texts.items():
    for expected in ("Usage:", "Example", "--workdir", "PATH.py[:ARG]", "--config.a.b=VALUE",
                     "configs/", "--list_configs", "--debug"):
      assert expected in text, (name, expected)


def test_user_errors_print_their_message_without_traceback(tmp_path, capsys, monkeypatch):
  typo = _run("-m", "big_mm.train", "--config", "configs/demo.py", "--workdir", str(tmp_path),
              "--config.optim.lrr=1")
  assert typo.returncode == 1
  assert "Unknown config key 'optim.lrr'" in typo.stderr and "Did you mean 'lr'" in typo.stderr
  assert "Traceback" not in typo.stderr

  def user_error(flags, overrides):
    raise config_lib.ConfigError("a bad key")

  def bug(flags, overrides):
    raise KeyError("a bug")

  assert cli.main(user_error, [], doc="", flags=()) == 1
  assert "Traceback" not in capsys.readouterr().err
  assert cli.main(user_error, ["--debug"], doc="", flags=()) == 1
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.setenv(cli.DEBUG_ENV, "1")
  assert cli.main(user_error, [], doc="", flags=()) == 1
  assert "Traceback" in capsys.readouterr().err
  monkeypatch.delenv(cli.DEBUG_ENV)
  with pytest.raises(KeyError, match="a bug"):  # not a user error: the traceback stays
    cli.main(bug, [], doc="", flags=())
  # Paths, data and checkpoints are user errors too.
  assert evaluate.main(["--workdir", str(tmp_path / "nothing")]) == 1
  assert "does not exist" in capsys.readouterr().err
  assert _export_main()(["--workdir", str(tmp_path), "--format", "hf", "--out", "x"]) == 1
  assert f"has no {cli.CONFIG_FILENAME}" in capsys.readouterr().err


class _ParamNorm(evaluators.Evaluator):
  """A cheap, deterministic evaluator: scale x the params' norm (on the host)."""
  DEFAULTS = dict(common.DEFAULTS, scale=1.0)
  built: list[str] = []

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    self.built.append(name)

  def evaluate(self, params):
    leaves = [np.asarray(x, np.float64) for x in jax.tree.leaves(jax.device_get(params))]
    return {"norm": self.ev.scale * float(np.sqrt(sum((x * x).sum() for x in leaves)))}


@pytest.fixture(autouse=True)
def param_norm(monkeypatch):
  monkeypatch.setitem(evaluators.EVALUATORS, "param_norm", _ParamNorm)
  monkeypatch.setattr(_ParamNorm, "built", [])
  # The tools' console logging set-up would take the log records from caplog.
  monkeypatch.setattr(metrics, "setup_logging", lambda: None)


def _config(data_dir, **changes):
  evals = {"p": dict(type="param_norm"), "off": dict(type="param_norm", every_steps=0)}
  return tiny_config(data_dir, **{"total_steps": 2, "evals": evals, **changes})


@pytest.fixture(scope="module")
def finished_run(data_dir, tmp_path_factory):
  """A 2-step run (its evals at the end); copy it before changing it."""
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(evaluators.EVALUATORS, "param_norm", _ParamNorm)
    train.train(_config(data_dir), workdir)
  return workdir


def test_run_stores_its_config_and_evaluate_needs_only_the_workdir(data_dir, finished_run,
                                                                  tmp_path, caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  with open(os.path.join(workdir, cli.CONFIG_FILENAME)) as f:
    stored = json.load(f)
  assert stored["total_steps"] == 2 and stored["evals"]["off"]["every_steps"] == 0
  assert config_lib.diff(cli.read_config(workdir), _config(data_dir)) == []
  with caplog.at_level(logging.INFO, "big_mm"):
    config = cli.config_for_workdir(workdir, None, {"optim.lr": 0.5})
  assert config.optim.lr == 0.5 and f"optim.lr: {stored['optim']['lr']!r} -> 0.5" in caplog.text

  trained = [r for r in read_metrics(workdir) if "eval/p/norm" in r]
  assert [r["step"] for r in trained] == [2]
  tb_files = glob.glob(os.path.join(workdir, "tb", "*"))
  caplog.clear()
  with caplog.at_level(logging.INFO, "big_mm"):
    assert evaluate.main(["--workdir", workdir]) == 0  # the values training recorded
    assert evaluate.main(["--workdir", workdir, "--step", "2", "--config.evals.p.scale=2.0"]) == 0
    assert evaluate.main(["--workdir", workdir, "--config.evals.p.scale=2.0"]) == 0  # again
  assert "Evaluating checkpoint step 2" in caplog.text
  assert _ParamNorm.built == ["p"] * 3  # every_steps=0: never built, as in training
  rows = [r for r in read_metrics(workdir) if any(k.startswith("eval/") for k in r)]
  assert [(r["step"], r["eval/p/norm"]) for r in rows] == [(2, 2 * trained[0]["eval/p/norm"])]
  assert len(glob.glob(os.path.join(workdir, "tb", "*"))) == len(tb_files) + 1  # the new value


def test_rerun_and_resume_compare_with_the_stored_config(data_dir, finished_run, tmp_path,
                                                         caplog):
  workdir = str(tmp_path / "run")
  shutil.copytree(finished_run, workdir)
  with caplog.at_level(logging.INFO, "big_mm"):
    assert train.train(_config(data_dir), workdir) == {}
  finished = [r.message for r in caplog.records if "already finished" in r.message]
  assert len(finished) == 1 and "at step 2 of 2" in finished[0] and workdir in finished[0]
  assert not any(r.message.startswith("Config (") for r in caplog.records)  # nothing to train

  # A change of shapes (the text position embeddings) is refused, naming the key.
  with pytest.raises(checkpoint.CheckpointMismatchError, match=r"input.text_len: 8 -> 12"):
    train.train(_config(data_dir, total_steps=3, **{"input.text_len": 12}), workdir)
  # Other changes resume, listed in a warning; config.json then holds the new config.
  caplog.clear()
  with caplog.at_level(logging.INFO, "big_mm"):
    train.train(_config(data_dir, total_steps=3, **{"optim.lr": 0.5}), workdir)
  warning = [r.message for r in caplog.records if r.levelno == logging.WARNING
             and "differs from the run's stored" in r.message]
  assert len(warning) == 1
  lr = _config(data_dir).optim.lr
  assert "total_steps: 2 -> 3" in warning[0] and f"optim.lr: {lr!r} -> 0.5" in warning[0]
  assert "input.text_len" not in warning[0]
  assert cli.read_config(workdir).optim.lr == 0.5
  # Before training, the config's keys that differ from the defaults (e.g. tiny_config's).
  assert "\n  total_steps = 3\n" in caplog.text and "\n  batch_size = 16\n" in caplog.text
  assert "\n  seed = " not in caplog.text  # as the default
  assert "Finished: step 3 of 3" in caplog.text
