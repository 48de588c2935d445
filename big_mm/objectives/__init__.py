"""Objectives: each builds `loss_fn(params, batch, rng) -> (loss, metrics)`, its predict fns and
`init_params(rng)` from its example batch (big_mm/objectives/base.py: the contract).

`config.objective` is `name` plus that objective's SETTINGS; OBJECTIVES is the one registry.
"""
from __future__ import annotations

import difflib
from typing import Any, Mapping

from big_mm.objectives import base
from big_mm.objectives.base import Context
from big_mm.objectives.binding import Binding
from big_mm.objectives.cm3 import CM3
from big_mm.objectives.contrastive import Contrastive
from big_mm.objectives.filip import Filip
from big_mm.objectives.fourm import FourM
from big_mm.objectives.generative import CoCa, Captioning
from big_mm.objectives.masked import MultiMAE
from big_mm.objectives.siglip2 import Siglip2
from big_mm.objectives.ul2 import UL2
from big_mm.objectives.videomae import VideoMAE
from big_mm.objectives.vq import VQTokenizer

OBJECTIVES = {"contrastive": Contrastive, "captioning": Captioning, "coca": CoCa,
              "multimae": MultiMAE, "filip": Filip, "siglip2": Siglip2, "fourm": FourM,
              "vq_tokenizer": VQTokenizer, "ul2": UL2, "cm3": CM3, "binding": Binding,
              "videomae": VideoMAE}


def get_objective(name: str):
  if name not in OBJECTIVES:
    close = difflib.get_close_matches(str(name), list(OBJECTIVES), n=1)
    raise base.ConfigError(f"objective.name={name!r} is not valid; choose one of "
                           f"{sorted(OBJECTIVES)}" + (f". Did you mean {close[0]!r}?" if close
                                                      else ""))
  return OBJECTIVES[name]


def settings(objective: Mapping[str, Any]) -> dict:
  """config.objective -> {"name": ..., **that objective's settings}: defaults filled, unknown
  keys refused (a key of another objective says which one has it), values checked."""
  given = dict(objective)
  name = given.pop("name")
  return {"name": name, **base.fill(get_objective(name), given)}
