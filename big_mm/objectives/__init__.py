"""Objectives: each builds `loss_fn(params, batch, rng) -> (loss, metrics)` and predict fns."""
from big_mm.objectives.contrastive import Contrastive
from big_mm.objectives.generative import CoCa, Captioning
from big_mm.objectives.masked import MultiMAE

OBJECTIVES = {"contrastive": Contrastive, "captioning": Captioning, "coca": CoCa,
              "multimae": MultiMAE}


def get_objective(name: str):
  if name not in OBJECTIVES:
    raise ValueError(f"Unknown objective.name {name!r}; valid: {sorted(OBJECTIVES)}")
  return OBJECTIVES[name]
