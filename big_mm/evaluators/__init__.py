"""Evaluators run on a schedule by the trainer and by big_mm.evaluate."""
import inspect

from big_mm.evaluators import captioning, cross_modal, fewshot, retrieval, scoring, zeroshot
from big_mm.evaluators.common import Embedder

__all__ = ["EVALUATORS", "Embedder", "run"]

EVALUATORS = {"zeroshot": zeroshot.evaluate, "retrieval": retrieval.evaluate,
              "captioning": captioning.evaluate, "scoring": scoring.evaluate,
              "cross_modal": cross_modal.evaluate, "fewshot": fewshot.evaluate}


def run(name, ev, **kwargs) -> dict[str, float]:
  """Runs one configured evaluator; metric keys come back prefixed `eval/{name}/`.

  kwargs: everything an evaluator may need (embedder, objective, mesh, params, config,
  tokenizer); each evaluator gets the ones its signature names, and `name` if it names it.
  """
  evaluate = EVALUATORS[ev.type]
  wanted = inspect.signature(evaluate).parameters
  results = evaluate(ev, **{k: v for k, v in dict(kwargs, name=name).items() if k in wanted})
  return {f"eval/{name}/{k}": v for k, v in results.items()}
