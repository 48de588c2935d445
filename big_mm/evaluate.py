"""Runs a config's evaluators on a trained checkpoint (no training).

    python -m big_mm.evaluate --config configs/demo.py --workdir /tmp/big_mm_demo [--step N]

Prints the metrics and appends them to WORKDIR/metrics.jsonl at the checkpoint's step.
"""
from __future__ import annotations

import logging
import os
import sys

import jax

from big_mm import checkpoint as checkpoint_lib
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


def evaluate(config, workdir: str, step: int | None = None) -> dict[str, float]:
  if not config.evals:
    raise config_lib.ConfigError("The config defines no evaluators (config.evals is empty).")
  setup = train.build(config, num_train_examples=_num_train_examples(config))
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                     save_every_steps=1, read_only=True)
  step = step if step is not None else ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"No checkpoint in {workdir!r}; train first with big_mm.train.")
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    params = ckpt.restore_params(step, ts.abstract["params"])  # no optimizer state
    ckpt.close()
    context = evaluators.EvalContext(config, setup.mesh, setup.objective, setup.tokenizer)
    results = {}
    for name, ev in config.evals.items():
      results.update(evaluators.build(name, ev, context)(params))
  with metrics_lib.MetricWriter(workdir, enabled=jax.process_index() == 0) as writer:
    writer.write(step, results)
  return results


def main(argv: list[str]) -> int:
  metrics_lib.setup_logging()
  flags, overrides = config_lib.parse_command_line(argv)
  if set(flags) - {"config", "workdir", "step"} or not {"config", "workdir"} <= set(flags):
    print(__doc__, file=sys.stderr)
    return 2
  config = config_lib.load(flags["config"], overrides)
  results = evaluate(config, flags["workdir"], int(flags["step"]) if "step" in flags else None)
  for key, value in sorted(results.items()):
    print(f"{key}: {value:.4f}")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
