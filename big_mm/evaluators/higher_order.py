"""Higher-order retrieval: given M - 1 modalities of a record, retrieve its M-th.

Symile (Saporta et al. 2024, sec. 5.1: predict the third modality from the other two) and GRAM
(Cicchetti et al. 2025) score a query tuple against every candidate of the missing modality
with their own similarity, the objective's `higher_order_scores(query {modality: z [Q, D]},
target, candidates [K, D]) -> [Q, K]` (a pairwise objective sums the query modalities'
cosines with the candidate). E.g. on the tri-modal digits:
  dict(type="higher_order_retrieval", query=("image", "text"), target="audio",
       data="digits_speech", split="test", pp_modalities={"audio": "..."})
The split is read with input.modalities = query + (target,) (pp strings as the retrieval
evaluator's), each modality embedded by its tower (objective.embed); only records with all of
them count, one tuple and one candidate each. image+text2audio/R@k: the query's own record
ranks within the top k, with ties broken at random (retrieval.expected_hits: collapsed
embeddings score chance, k / N); class_R@k with labels: a candidate of the query's label does;
num_examples (records used) and num_skipped (the split's records without all of them).
"""
from __future__ import annotations

import numpy as np

from big_mm import config as config_lib
from big_mm.evaluators import common, retrieval

_QUERY_CHUNK = 256  # Query tuples scored at once: bounds the [chunk, candidates] scores.


class HigherOrderRetrieval(common.Evaluator):
  """R@k of the target modality given the query modalities; see the module docstring."""
  DEFAULTS = dict(common.DEFAULTS, query=("image", "text"), target="audio", ks=(1, 5, 10),
                  pp_modalities=None)

  @staticmethod
  def validate(name, ev):
    query = retrieval.check_modality_names(f"evals.{name}.query", ev["query"])
    retrieval.check_modality_names(f"evals.{name}.query + (target,)",
                                   (*query, ev["target"]), len(query) + 1)
    retrieval.check_pp_modalities(f"evals.{name}.pp_modalities", ev["pp_modalities"])
    ks = ev["ks"]
    if isinstance(ks, (str, int)) or not ks:
      raise config_lib.ConfigError(f"evals.{name}.ks must be a tuple of integers >= 1, e.g. "
                                   f"(1, 5, 10); got {ks!r}.")
    for k in ks:
      common.int_at_least(f"evals.{name}.ks entry", k, 1)

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    self.query, self.target = tuple(ev.query), ev.target
    self.names = (*self.query, self.target)
    if not callable(getattr(context.objective, "higher_order_scores", None)):
      raise config_lib.ConfigError(
          f"evals.{name} (higher_order_retrieval) needs the objective's higher_order_scores(); "
          f"{type(context.objective).__name__} has none: use objective 'binding', or the "
          f"retrieval evaluator with modalities=(a, b) for one query modality.")
    retrieval.check_towers(f"evals.{name}.query + (target,)={self.names!r}", context.objective,
                           self.names)
    self.input_cfg = retrieval.modality_input(name, self.input_cfg, ev, self.names)

  def evaluate(self, params) -> dict[str, float]:
    ev, objective = self.ev, self.context.objective
    data = retrieval.embed_modalities(self.context, params, self.input_cfg, ev.batch_size,
                                      self.names)
    if not len(data[self.target]):
      raise ValueError(f"evals.{self.name}: no record of split {ev.split!r} of "
                       f"{self.input_cfg.data!r} has all of {list(self.names)}; evaluate on "
                       f"data that has them together (evals.{self.name}.data).")
    for m in self.names:
      retrieval.check_finite(self.name, m, data[m])
    candidates, labels = data[self.target], data.get("label")
    # A right candidate has the query's key: its own record's row, or for class_R@k its label.
    keys = {"R": np.arange(len(candidates)), "class_R": labels}
    keys = {metric: key for metric, key in keys.items() if key is not None}
    hits = {metric: [] for metric in keys}
    for start in range(0, len(candidates), _QUERY_CHUNK):
      rows = np.arange(start, min(start + _QUERY_CHUNK, len(candidates)))
      query = {m: data[m][rows] for m in self.query}
      sim = np.asarray(objective.higher_order_scores(query, self.target, candidates), np.float32)
      for metric, key in keys.items():
        hits[metric].append(retrieval.expected_hits(sim, key[rows][:, None] == key[None], ev.ks))
    prefix = f"{'+'.join(self.query)}2{self.target}/"
    out = {f"{prefix}{metric}@{k}": float(v) for metric, parts in hits.items()
           for k, v in zip(ev.ks, np.concatenate(parts, axis=1).mean(axis=1))}
    out["num_examples"] = float(len(candidates))
    out["num_skipped"] = float(data["num_skipped"])
    return out
