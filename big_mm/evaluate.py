"""Runs a run's evaluators on one of its checkpoints (no training).

Usage:
  python -m big_mm.evaluate --workdir DIR [--step N] [--config PATH.py[:ARG]]
      [--config.a.b=VALUE ...]

Example (after the demo of `python -m big_mm.train --help`):
  python -m big_mm.evaluate --workdir /tmp/big_mm_demo --step 400

Flags:
  --workdir  a run of big_mm.train: its checkpoints and its stored config (WORKDIR/config.json)
  --step     the checkpoint's step (default: the newest)
  --config   a recipe to use instead of the stored config (the keys that differ from the stored
             one are logged); --config.a.b=VALUE overrides either
  --debug    shows the traceback of a user error too

Runs the config's evals, except those with every_steps=0 (never, as in training), prints the
metrics and records them in WORKDIR/metrics.jsonl and tb/ at the checkpoint's step. Values
already recorded for that step (by training or an earlier evaluation) are not written again;
changed ones replace them in metrics.jsonl.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Any

import jax

from big_mm import cli
from big_mm import config as config_lib
from big_mm import evaluators, metrics as metrics_lib, train
from big_mm.input import sources

log = logging.getLogger("big_mm")


def _num_train_examples(config) -> int | None:
  """The training split's size when the run's length or warmup is given in epochs (building
  the run's optimizer then needs it, as in training); None otherwise, so that evaluating a
  step-based run never opens its training data."""
  if config.total_epochs is None and config.optim.schedule.warmup_epochs is None:
    return None
  return sources.num_examples(config.input.data, config.input.split, config.input.data_dir,
                              **sources.source_options(config.input))


def enabled_evals(config) -> dict[str, Any]:
  """config.evals without those that never run (every_steps=0)."""
  if not config.evals:
    raise config_lib.ConfigError("The config defines no evaluators (config.evals is empty).")
  enabled = {name: ev for name, ev in config.evals.items() if ev.get("every_steps") != 0}
  if not enabled:
    raise config_lib.ConfigError(
        f"Every evaluator has every_steps=0 (never runs): {sorted(config.evals)}. To run one, "
        f"give it a period, e.g. --config.evals.{sorted(config.evals)[0]}.every_steps=None.")
  skipped = sorted(set(config.evals) - set(enabled))
  if skipped:
    log.info("Skipping evals %s (every_steps=0).", skipped)
  return enabled


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
  """The results of the config's evals on the checkpoint of `step` (default: the newest),
  recorded at that step (see `record`)."""
  enabled = enabled_evals(config)
  setup = train.build(config, num_train_examples=_num_train_examples(config))
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    params, step = cli.restore_params(workdir, step, ts.abstract["params"])  # no optimizer
    log.info("Evaluating checkpoint step %d of %s: %s", step, workdir, ", ".join(enabled))
    context = evaluators.EvalContext(config, setup.mesh, setup.objective, setup.tokenizer)
    results = {}
    for name, ev in enabled.items():
      results.update(evaluators.build(name, ev, context)(params))
  if jax.process_index() == 0:
    record(workdir, step, results)
  return results


def record(workdir: str, step: int, results: dict[str, float]) -> None:
  """Writes `results` at `step` to metrics.jsonl and TensorBoard, except the values already
  recorded there at that step: evaluating a step again adds no row and no TensorBoard file.
  A changed value (e.g. another eval config) replaces the old one in metrics.jsonl."""
  path = os.path.join(workdir, metrics_lib.METRICS_FILENAME)
  recorded = {}
  for row in metrics_lib.read_jsonl(path) if os.path.exists(path) else []:
    if row.get("step") == step:
      recorded.update(row)
  new = {k: v for k, v in results.items() if not _same(recorded.get(k), v)}
  if not new:
    log.info("Step %d's results are already in %s; not written again.", step, path)
    return
  stale = set(new) & set(recorded)
  if stale:
    _drop_keys_at_step(path, step, stale)
    log.info("Replacing step %d's old values of %s in %s.", step, sorted(stale), path)
  with metrics_lib.MetricWriter(workdir) as writer:
    writer.write(step, new)


def _same(old, new) -> bool:
  if old is None:
    return False
  old, new = float(old), float(new)
  return old == new or (old != old and new != new)  # NaN == NaN here


def _drop_keys_at_step(path: str, step: int, keys: set[str]) -> None:
  """Rewrites metrics.jsonl (atomically) without `keys` in its rows of `step`; a row left
  with only its step goes."""
  def edit(row):
    if row.get("step") != step or not keys & set(row):
      return row
    row = {k: v for k, v in row.items() if k not in keys}
    return None if set(row) == {"step"} else row

  metrics_lib.rewrite_jsonl(path, edit)


def main(argv: list[str]) -> int:
  return cli.main(_run_command_line, argv, doc=__doc__, flags=("config", "workdir", "step"),
                  required=("workdir",))


def _run_command_line(flags: dict[str, str], overrides: dict[str, Any]) -> int:
  config = cli.config_for_workdir(flags["workdir"], flags.get("config"), overrides)
  results = evaluate(config, flags["workdir"], cli.int_flag(flags, "step"))
  for key, value in sorted(results.items()):
    print(f"{key}: {value:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
