"""Zero-shot classification by caption likelihood (CapPa, Tschannen et al. 2023).

Every image scores every class prompt (classnames x templates) with objective.log_likelihood:
the total log-probability of the prompt's tokens (EOS included, not length-normalised). A
class's score is the mean of that over its templates; the prediction is the best class.
Cost: one teacher-forced pass per (image, prompt) pair (the image is re-encoded per prompt).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from big_mm import config as config_lib
from big_mm import sharding
from big_mm.evaluators import common
from big_mm.evaluators import prompts as prompt_lists


def prompt_scorer(objective, mesh):
  """jit (params, images [B, ...], prompts i32 [P, L], prefix i32 [B, P'] or None) -> f32
  [B, P] total log-probs (the prompts scored as captions after the text prefix, if any)."""
  batch = sharding.batch_sharding(mesh)

  def scores(params, images, prompts, prefix=None):
    def one_prompt(prompt):
      texts = jnp.broadcast_to(prompt, (images.shape[0],) + prompt.shape)
      texts = jax.lax.with_sharding_constraint(texts, batch)
      kw = {} if prefix is None else {"prefix": prefix}  # only prefix-LM captioners take one
      return objective.log_likelihood(params, images, texts, **kw)[0]
    return jax.lax.map(one_prompt, prompts).T

  return jax.jit(scores, out_shardings=batch)


class Scoring(common.Evaluator):
  """Zero-shot accuracy by prompt likelihood; classnames: one per label id, in order (or a
  shipped list's name), templates: as zeroshot's (big_mm/evaluators/prompts.py)."""
  DEFAULTS = dict(common.DEFAULTS, classnames=(), templates=("{}",))

  @staticmethod
  def validate(name, ev):
    if not ev["classnames"]:
      raise config_lib.ConfigError(f"evals.{name} (scoring) needs classnames: one name per "
                                   f"label id, in order.")
    prompt_lists.classnames(f"evals.{name}.classnames", ev["classnames"])
    prompt_lists.templates(f"evals.{name}.templates", ev["templates"])

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    if context.tokenizer is None:
      raise ValueError("The scoring evaluator needs input.tokenizer (to tokenize class "
                       "prompts).")
    classnames = prompt_lists.classnames(f"evals.{name}.classnames", ev.classnames)
    templates = prompt_lists.templates(f"evals.{name}.templates", ev.templates)
    self.num_classes, self.num_templates = len(classnames), len(templates)
    tokens = context.tokenizer.encode([t.format(c) for c in classnames for t in templates],
                                      context.config.input.text_len)
    self.prompts = jax.device_put(tokens, sharding.replicated(context.mesh))
    self.score = prompt_scorer(context.objective, context.mesh)

  def evaluate(self, params) -> dict[str, float]:
    class_scores, labels = [], []
    for batch, mask in common.iterate_split(self.input_cfg, self.ev.batch_size,
                                            self.context.mesh):
      if "label" not in batch:
        raise ValueError(f"Split {self.ev.split!r} of {self.input_cfg.data!r} has no labels for "
                         f"scoring.")
      logp = common.gather(self.score(params, batch["image"], self.prompts,
                                      batch.get("prefix")))[mask]
      class_scores.append(logp.reshape(-1, self.num_classes, self.num_templates).mean(axis=-1))
      labels.append(common.gather(batch["label"])[mask])
    pred = np.argmax(np.concatenate(class_scores), axis=-1)
    labels = np.concatenate(labels)
    per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return {"accuracy": float(np.mean(pred == labels)),
            "balanced_accuracy": float(np.mean(per_class)),
            "num_examples": float(len(labels))}
