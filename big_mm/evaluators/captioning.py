"""Captioning on held-out data: perplexity of the true captions and metrics of generated ones.

Perplexity = exp(total NLL / total target tokens) over every real example (non-pad targets,
EOS included), from objective.log_likelihood. Generation (big_mm.decoding) runs on the first
`max_examples` examples only, being the slow part; each is scored against its own held-out
caption as the single reference (as stored in the batch: tokenized to input.text_len and
decoded back). With `classnames` (one per label id; an entry may be a tuple of alternative
names, e.g. ("seven", "7")), `label_accuracy` = fraction of generated captions that name the
example's class and no other class, as whole words. A batch "prefix" (input.prefix_column)
conditions both the perplexity and the generation, as in training.
"""
from __future__ import annotations

import jax
import numpy as np

from big_mm.evaluators import caption_metrics, common


def evaluate(ev, *, objective, mesh, params, config, tokenizer) -> dict[str, float]:
  from big_mm import decoding  # only this evaluator needs it
  if tokenizer is None:
    raise ValueError("The captioning evaluator needs input.tokenizer (to turn generated tokens "
                     "into text).")
  log_likelihood = common.jitted(objective, mesh, "log_likelihood")
  max_len = ev.max_decode_len or config.input.text_len
  options = dict(ev.decode_options or {})
  rng = jax.random.key(ev.seed)
  nll, num_tokens, num_examples = 0.0, 0, 0
  hyps, refs, labels = [], [], []
  wanted = np.inf if ev.max_examples is None else ev.max_examples
  input_cfg = common.eval_input_config(config, ev)
  for index, (batch, mask) in enumerate(common.iterate_split(input_cfg, ev.batch_size, mesh)):
    # The text prefix of a prefix-LM captioner, passed only when the data has one.
    prefix = {"prefix": batch["prefix"]} if "prefix" in batch else {}
    sum_logp, count = log_likelihood(params, batch["image"], batch["text"], **prefix)
    nll -= float(np.sum(common.gather(sum_logp)[mask], dtype=np.float64))
    num_tokens += int(np.sum(common.gather(count)[mask]))
    num_examples += int(mask.sum())
    if len(hyps) < wanted:
      if ev.decode_method == "sample":
        options["rng"] = jax.random.fold_in(rng, index)
      tokens = decoding.decode(objective, params, batch["image"], method=ev.decode_method,
                               max_len=max_len, **prefix, **options)
      hyps += decoding.to_text(tokenizer, common.gather(tokens)[mask])
      refs += [[r] for r in tokenizer.decode(common.gather(batch["text"])[mask])]
      if "label" in batch:
        labels.append(common.gather(batch["label"])[mask])
  out = {"perplexity": float(np.exp(nll / max(num_tokens, 1))),
         "nll_per_token": nll / max(num_tokens, 1), "num_examples": float(num_examples)}
  if not hyps:
    return out
  n = int(min(len(hyps), wanted))
  hyps, refs = hyps[:n], refs[:n]
  out.update(bleu4=caption_metrics.bleu(hyps, refs), cider_d=caption_metrics.cider_d(hyps, refs),
             exact_match=caption_metrics.exact_match(hyps, refs), num_decoded=float(n))
  if ev.classnames:
    if not labels:
      raise ValueError(f"evals classnames are set but split {ev.split!r} has no labels; "
                       "remove classnames or evaluate a labelled split.")
    names = [[c] if isinstance(c, str) else list(c) for c in ev.classnames]
    label = np.concatenate(labels)[:n]
    if label.max() >= len(names):
      raise ValueError(f"Label {label.max()} but only {len(names)} classnames; give one per "
                       "label id, in order.")
    out["label_accuracy"] = float(np.mean([caption_metrics.names_only(h, names, int(y))
                                           for h, y in zip(hyps, label)]))
  return out
