"""Evaluators run on a schedule by the trainer and by big_mm.evaluate."""
from big_mm.evaluators import retrieval, zeroshot
from big_mm.evaluators.common import Embedder

__all__ = ["EVALUATORS", "Embedder", "run"]

EVALUATORS = {"zeroshot": zeroshot.evaluate, "retrieval": retrieval.evaluate}


def run(name, ev, **kwargs) -> dict[str, float]:
  """Runs one configured evaluator; metric keys come back prefixed `eval/{name}/`."""
  results = EVALUATORS[ev.type](ev, **kwargs)
  return {f"eval/{name}/{k}": v for k, v in results.items()}
