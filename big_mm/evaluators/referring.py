"""Referring expressions on held-out data: for every present (image, expression) pair of a split
(batch["boxes"] float [B, K, 4] as (ymin, xmin, ymax, xmax) in [0, 1], batch["box_text"] int
[B, K, Lr]; a row whose expression is all pad is absent), the objective decodes the box of the
expression (`objective.predict_boxes`, LocCa's ref task) and it is scored against the true box:

  accuracy   fraction with IoU >= 0.5 (Acc@0.5, the RefCOCO / RefCOCO+ / RefCOCOg metric, as
             LocCa and SigLIP 2 report)
  mean_iou   the mean IoU

With grounded=True also the other direction (LocCa's grounded captioning): the expression
greedily decoded from the true box (`objective.predict_expressions`) and
`grounded_exact_match`, the fraction whose tokens up to EOS equal the true expression's.
Needs an objective with LocCa on (objective.name="siglip2", objective.locca_weight > 0).
"""
from __future__ import annotations

import numpy as np

from big_mm import config as config_lib
from big_mm import modalities
from big_mm.evaluators import common

IOU_THRESHOLD = 0.5


def box_iou(a, b) -> np.ndarray:
  """IoU of paired boxes a, b [N, 4] (ymin, xmin, ymax, xmax); 0 where the union is empty."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  area = lambda x: np.clip(x[:, 2] - x[:, 0], 0, None) * np.clip(x[:, 3] - x[:, 1], 0, None)
  h = np.clip(np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]), 0, None)
  w = np.clip(np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]), 0, None)
  inter = h * w
  union = area(a) + area(b) - inter
  return np.where(union > 0, inter / np.where(union > 0, union, 1.0), 0.0)


def box_metrics(pred, true) -> dict[str, float]:
  """accuracy (IoU >= 0.5) and mean_iou of paired boxes [N, 4]."""
  iou = box_iou(pred, true)
  return {"accuracy": float(np.mean(iou >= IOU_THRESHOLD)) if len(iou) else 0.0,
          "mean_iou": float(np.mean(iou)) if len(iou) else 0.0}


def until_eos(tokens, eos_id: int = 1) -> tuple[int, ...]:
  """The token ids before the first EOS (pad dropped)."""
  out = []
  for t in np.asarray(tokens).tolist():
    if t == eos_id:
      break
    if t:
      out.append(t)
  return tuple(out)


class Referring(common.Evaluator):
  """Referring-expression box accuracy / mean IoU (and grounded captions); module docstring."""
  # grounded: also decode each box's expression (exact match); max_examples: stop after that
  # many images (whole batches; None: the whole split).
  DEFAULTS = dict(common.DEFAULTS, grounded=True, max_examples=None)

  @staticmethod
  def validate(name, ev):
    if not isinstance(ev["grounded"], bool):
      raise config_lib.ConfigError(f"evals.{name}.grounded must be True or False, got "
                                   f"{ev['grounded']!r}.")
    if ev["max_examples"] is not None:
      common.int_at_least(f"evals.{name}.max_examples", ev["max_examples"], 1)

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    objective = context.objective
    if not callable(getattr(objective, "predict_boxes", None)):
      raise config_lib.ConfigError(
          f"evals.{name}.type='referring' needs an objective that decodes boxes: "
          f"objective.name='siglip2' with objective.locca_weight > 0 (the LocCa decoder); "
          f"this run's objective is {type(objective).__name__} without it. Remove the "
          "evaluator or switch LocCa on.")
    self.predict_boxes = common.jit_method(objective, context.mesh, "predict_boxes")

  def evaluate(self, params) -> dict[str, float]:
    objective = self.context.objective
    wanted = np.inf if self.ev.max_examples is None else self.ev.max_examples
    pred, true, exact, seen = [], [], [], 0
    for batch, mask in common.iterate_split(self.input_cfg, self.ev.batch_size,
                                            self.context.mesh):
      if "boxes" not in batch or "box_text" not in batch:
        raise ValueError(f"Split {self.input_cfg.split!r} of {self.input_cfg.data!r} has no "
                         "'boxes' / 'box_text': the referring evaluator needs data with boxes "
                         "and their expressions (e.g. digits_boxes).")
      images = modalities.model_input(batch, "image")  # NaFlex's mask and shape included
      boxes, box_text = common.gather(batch["boxes"]), common.gather(batch["box_text"])
      for k in range(box_text.shape[1]):
        rows = mask & np.any(box_text[:, k] != 0, axis=-1)
        if not rows.any():
          continue
        pred.append(common.gather(self.predict_boxes(params, images, batch["box_text"][:, k]))
                    [rows])
        true.append(boxes[rows, k])
        if self.ev.grounded:
          tokens = common.gather(objective.predict_expressions(params, images,
                                                               batch["boxes"][:, k]))
          exact += [until_eos(t) == until_eos(r)
                    for t, r in zip(tokens[rows], box_text[rows, k])]
      seen += int(mask.sum())
      if seen >= wanted:
        break
    if not pred:
      raise ValueError(f"Split {self.input_cfg.split!r} has no present boxes to evaluate.")
    pred, true = np.concatenate(pred), np.concatenate(true)
    out = box_metrics(pred, true)
    out["num_pairs"] = float(len(true))
    if self.ev.grounded:
      out["grounded_exact_match"] = float(np.mean(exact))
    return out
