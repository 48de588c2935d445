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

from big_mm import config as config_lib
from big_mm import decoding
from big_mm import modalities
from big_mm.evaluators import caption_metrics, common


class Captioning(common.Evaluator):
  """Perplexity and generated-caption metrics; see the module docstring."""
  # max_examples: how many examples are decoded (None: all; 0: perplexity only; whole eval
  # batches are decoded until it is reached); decode_options go to decoding.decode (e.g.
  # beam_size, length_penalty, temperature, top_k, top_p); max_decode_len None: input.text_len;
  # seed: the rng of method "sample"; classnames (optional): one per label id, in order.
  DEFAULTS = dict(common.DEFAULTS, max_examples=1000, decode_method="greedy",
                  max_decode_len=None, decode_options={}, seed=0, classnames=())

  @staticmethod
  def validate(name, ev):
    config_lib.choice(f"evals.{name}.decode_method", ev["decode_method"],
                       decoding.METHODS)
    for key, smallest in (("max_examples", 0), ("max_decode_len", 1)):
      value = ev[key]
      if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                or value < smallest):
        raise config_lib.ConfigError(f"evals.{name}.{key} must be an integer >= {smallest} or "
                                     f"None, got {value!r}.")
    options = ev["decode_options"] or {}
    if not hasattr(options, "keys") or "method" in options or "max_len" in options:
      raise config_lib.ConfigError(
          f"evals.{name}.decode_options must be a dict of extra decoding.decode arguments (e.g. "
          f"{{'beam_size': 4}}); set the method and length with decode_method / "
          f"max_decode_len. Got {options!r}.")

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    if context.tokenizer is None:
      raise ValueError("The captioning evaluator needs input.tokenizer (to turn generated "
                       "tokens into text).")
    self.log_likelihood = common.jit_method(context.objective, context.mesh, "log_likelihood")

  def evaluate(self, params) -> dict[str, float]:
    ev, objective, tokenizer = self.ev, self.context.objective, self.context.tokenizer
    max_len = ev.max_decode_len or self.context.config.input.text_len
    options = dict(ev.decode_options or {})
    rng = jax.random.key(ev.seed)
    nll, num_tokens, num_examples = 0.0, 0, 0
    hyps, refs, labels = [], [], []
    wanted = np.inf if ev.max_examples is None else ev.max_examples
    batches = common.iterate_split(self.input_cfg, ev.batch_size, self.context.mesh)
    for index, (batch, mask) in enumerate(batches):
      # The text prefix of a prefix-LM captioner, passed only when the data has one.
      prefix = {"prefix": batch["prefix"]} if "prefix" in batch else {}
      # NaFlex's mask and shape included; objective.modality: e.g. a video captioner's clips.
      images = modalities.model_input(batch, getattr(objective, "modality", "image"))
      sum_logp, count = self.log_likelihood(params, images, batch["text"], **prefix)
      nll -= float(np.sum(common.gather(sum_logp)[mask], dtype=np.float64))
      num_tokens += int(np.sum(common.gather(count)[mask]))
      num_examples += int(mask.sum())
      if len(hyps) < wanted:
        if ev.decode_method == "sample":
          options["rng"] = jax.random.fold_in(rng, index)
        tokens = decoding.decode(objective, params, images, method=ev.decode_method,
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
    out.update(bleu4=caption_metrics.bleu(hyps, refs),
               cider_d=caption_metrics.cider_d(hyps, refs),
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
