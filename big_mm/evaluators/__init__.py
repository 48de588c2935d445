"""Evaluators, run on a schedule by the trainer and by big_mm.evaluate.

EVALUATORS maps a config's `evals.<name>.type` to its common.Evaluator subclass, which declares
its keys (DEFAULTS) and their checks (validate). config.load checks every evals entry through
`check` and fills in its defaults; a run builds each evaluator once (`build`) and calls it with
the params at every evaluation.
"""
from __future__ import annotations

from big_mm import config as config_lib
from big_mm.evaluators import (captioning, cm3, cross_modal, dense_probe, fewshot, referring,
                               retrieval, scoring, zeroshot)
from big_mm.evaluators import higher_order
from big_mm.evaluators.common import Embedder, EvalContext, Evaluator

__all__ = ["EVALUATORS", "Embedder", "EvalContext", "Evaluator", "build", "check",
           "with_defaults"]

EVALUATORS: dict[str, type[Evaluator]] = {
    "zeroshot": zeroshot.ZeroShot,
    "retrieval": retrieval.Retrieval,
    "captioning": captioning.Captioning,
    "scoring": scoring.Scoring,
    "cross_modal": cross_modal.CrossModal,
    "fewshot": fewshot.FewShot,
    "referring": referring.Referring,
    "dense_probe": dense_probe.DenseProbe,
    "cm3": cm3.CM3Tasks,
    "higher_order_retrieval": higher_order.HigherOrderRetrieval,
}


def check(name: str, ev) -> None:
  """Raises ConfigError, naming the key and the valid ones, for an evals.{name} entry with an
  unknown type or key, two `every_*` durations, or a bad value."""
  ev_type = ev.get("type")
  if ev_type not in EVALUATORS:
    raise config_lib.ConfigError(f"evals.{name}.type is {ev_type!r}; valid types: "
                                 f"{sorted(EVALUATORS)}.")
  evaluator = EVALUATORS[ev_type]
  for key in ev.keys():
    if key not in evaluator.DEFAULTS:
      raise config_lib.ConfigError(
          f"Unknown config key 'evals.{name}.{key}' for a {ev_type} evaluator"
          f"{config_lib.suggest(key, evaluator.DEFAULTS)} Valid keys: "
          f"{sorted(evaluator.DEFAULTS)}")
  config_lib.one_duration(ev, "every", prefix=f"evals.{name}.")
  evaluator.validate(name, with_defaults(ev))


def with_defaults(ev) -> dict:
  """An evals entry (checked) with every key of its type, defaults filled in."""
  return {**EVALUATORS[ev["type"]].DEFAULTS, **ev}


def build(name: str, ev, context: EvalContext) -> Evaluator:
  """The evaluator of evals.{name} (defaults filled in) for one run."""
  return EVALUATORS[ev.type](name, ev, context)
