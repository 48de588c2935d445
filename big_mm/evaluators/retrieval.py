"""Image <-> text retrieval on held-out image-caption data: recall@k in both directions.

The COCO / Flickr30k protocol: every caption of every image is a candidate (the first
`captions_per_image`, 5 by default, of each); image->text is a hit at k if any of the
image's own captions ranks within the top k, text->image if the caption's image does. With
one caption per image this is the usual paired recall.

Ties are broken uniformly at random and the metric is its expectation: a right candidate
tied with wrong ones gets the matching fraction of a hit, so collapsed (all-equal)
embeddings score chance level, never 1. Duplicate captions (identical text, hence identical
embeddings) tie likewise: an image whose caption also describes 2 other images scores 1/3
at k=1 in image->text. Non-finite embeddings are an error.

With labels in the split, class_R@k counts a hit if a candidate with the query's label ranks
within the top k (the top caption's image shows the same class, for k=1).

A Matryoshka objective (objective.matryoshka_dims) adds every recall at each smaller prefix dim
d of the embeddings (re-normalised), named with the suffix @d{d}: img2txt/R@1@d32.

An objective with its own similarity (FILIP: `common.own_similarity`) ranks by it: img2txt by
its image->text similarity, txt2img by its text->image one (logged at every evaluation).
"""
from __future__ import annotations

import functools
import logging

import numpy as np

from big_mm.evaluators import common

_QUERY_CHUNK = 1024  # Queries scored at once: bounds the [chunk, candidates] host arrays.


def expected_hits(sim: np.ndarray, positive: np.ndarray, ks) -> np.ndarray:
  """[len(ks), Q] expected hit@k of each query (rows of sim [Q, K], candidates in columns;
  positive [Q, K] marks each query's right candidates, at least one per row) when ties are
  broken uniformly at random."""
  best = np.max(np.where(positive, sim, -np.inf), axis=1, keepdims=True)
  above = np.sum((sim > best) & ~positive, axis=1)  # Wrong candidates surely ranked higher.
  tied_wrong = np.sum((sim == best) & ~positive, axis=1)
  tied_right = np.sum((sim == best) & positive, axis=1)
  out = []
  for k in ks:
    # The first of the tied right candidates lands in one of `slots` free top-k places unless
    # all of them go to tied wrong ones: P(miss) = prod_i<slots (t - i) / (t + r - i).
    slots = np.clip(k - above, 0, None)
    miss = np.ones(len(sim))
    for i in range(int(np.max(slots, initial=0))):
      factor = np.maximum(tied_wrong - i, 0) / np.maximum(tied_wrong + tied_right - i, 1)
      miss = np.where(i < slots, miss * factor, miss)
    out.append(1.0 - miss)
  return np.stack(out)


def recall_at_k(sim: np.ndarray, positive: np.ndarray, ks) -> dict[int, float]:
  """{k: mean expected hit@k} over the queries (see expected_hits)."""
  return {k: float(v) for k, v in zip(ks, expected_hits(sim, positive, ks).mean(axis=1))}


def _recalls(queries, candidates, positive_of, ks, score=None) -> dict[int, float]:
  """recall_at_k of sim = score(queries, candidates) (default queries @ candidates.T),
  computed in chunks of queries; positive_of(rows) -> bool [len(rows), K]."""
  score = score or (lambda q, c: q @ c.T)
  hits = []
  for start in range(0, len(queries), _QUERY_CHUNK):
    rows = np.arange(start, min(start + _QUERY_CHUNK, len(queries)))
    hits.append(expected_hits(score(queries[rows], candidates), positive_of(rows), ks))
  return {k: float(v) for k, v in zip(ks, np.concatenate(hits, axis=1).mean(axis=1))}


def _check_finite(name, what, z):
  bad = ~np.all(np.isfinite(z), axis=-1)
  if bad.any():
    raise FloatingPointError(
        f"evals.{name} (retrieval): {int(bad.sum())} of {len(z)} {what} embeddings are not "
        f"finite (NaN/inf), so no recall can be computed. Check the parameters (the training "
        f"loss and train.nan_policy) and the eval inputs (evals.{name}.pp_image should give "
        f"the value range the model was trained on).")


def _recall_metrics(zimg, ztxt, owner, labels, ks, scores=None) -> dict[str, float]:
  """{"img2txt/R@k", "txt2img/R@k" (and class_R@k with labels)}; owner [M]: each caption's
  image row; scores(zimg, ztxt, direction) -> [Ni, Nt] (default: the dot product)."""
  scores = scores or (lambda zi, zt, direction: zi @ zt.T)
  out = {}
  # A right candidate has the query's key: its image index, or for class_R@k its label.
  for prefix, key in (("", np.arange(len(zimg))), ("class_", labels)):
    if key is None:
      continue
    img2txt = _recalls(zimg, ztxt, lambda rows: key[rows][:, None] == key[owner][None], ks,
                       lambda zi, zt: scores(zi, zt, "img2txt"))
    txt2img = _recalls(ztxt, zimg, lambda rows: key[owner[rows]][:, None] == key[None], ks,
                       lambda zt, zi: scores(zi, zt, "txt2img").T)
    for direction, recalls in (("img2txt", img2txt), ("txt2img", txt2img)):
      out.update({f"{direction}/{prefix}R@{k}": value for k, value in recalls.items()})
  return out


class Retrieval(common.Evaluator):
  """recall@k in both directions; see the module docstring."""
  # COCO / Flickr30k: 5 captions per image.
  DEFAULTS = dict(common.DEFAULTS, ks=(1, 5, 10), captions_per_image=5)

  @staticmethod
  def validate(name, ev):
    common.int_at_least(f"evals.{name}.captions_per_image", ev["captions_per_image"], 1)

  def evaluate(self, params) -> dict[str, float]:
    ev = self.ev
    data = self.context.embedder.split(params, self.input_cfg, ev.batch_size,
                                       captions=ev.captions_per_image)
    zimg, ztxt, owner = data["zimg"], data["ztxt"], data["caption_owner"]
    _check_finite(self.name, "image", zimg)
    _check_finite(self.name, "text", ztxt)
    if common.own_similarity(self.context):
      logging.getLogger("big_mm").info(
          "evals.%s: ranking by the objective's own (FILIP token-wise) similarity.", self.name)
    out = _recall_metrics(zimg, ztxt, owner, data.get("label"), ev.ks,
                          functools.partial(common.scores, self.context))
    for dim in common.matryoshka_dims(self.context, zimg.shape[-1]):
      at_dim = _recall_metrics(common.matryoshka_prefix(zimg, dim),
                               common.matryoshka_prefix(ztxt, dim), owner, data.get("label"),
                               ev.ks)
      out.update({f"{name}@d{dim}": value for name, value in at_dim.items()})
    out["num_examples"] = float(len(zimg))
    out["num_captions"] = float(len(ztxt))
    return out
