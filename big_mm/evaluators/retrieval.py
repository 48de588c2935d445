"""Image <-> text retrieval on paired held-out data: recall@k in both directions."""
from __future__ import annotations

import numpy as np

from big_mm.evaluators import common


def recall_at_k(sim: np.ndarray, ks) -> dict[int, float]:
  """sim[i, j] = score of query i against candidate j; the right candidate of query i is i."""
  positive = np.diagonal(sim)[:, None]
  # Rank = number of candidates scored strictly higher than the right one (ties count for it).
  rank = np.sum(sim > positive, axis=1)
  return {k: float(np.mean(rank < k)) for k in ks}


def evaluate(ev, *, embedder, params, config, tokenizer) -> dict[str, float]:
  del tokenizer
  data = embedder.split(params, common.eval_input_config(config, ev), ev.batch_size)
  sim = data["zimg"] @ data["ztxt"].T
  out = {}
  for name, scores in (("img2txt", sim), ("txt2img", sim.T)):
    for k, value in recall_at_k(scores, ev.ks).items():
      out[f"{name}/R@{k}"] = value
  out["num_examples"] = float(sim.shape[0])
  return out
