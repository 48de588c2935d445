"""Zero-shot classification by caption likelihood (CapPa, Tschannen et al. 2023).

Every image scores every class prompt (classnames x templates) with objective.log_likelihood:
the total log-probability of the prompt's tokens (EOS included, not length-normalised). A
class's score is the mean of that over its templates; the prediction is the best class.
Cost: one teacher-forced pass per (image, prompt) pair (the image is re-encoded per prompt).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from big_mm import sharding
from big_mm.evaluators import common


@functools.lru_cache(maxsize=None)
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


def evaluate(ev, *, objective, mesh, params, config, tokenizer) -> dict[str, float]:
  if not ev.classnames:
    raise ValueError("A scoring evaluator needs classnames (one per label id, in order).")
  if tokenizer is None:
    raise ValueError("The scoring evaluator needs input.tokenizer (to tokenize class prompts).")
  classnames, templates = list(ev.classnames), list(ev.templates)
  prompts = tokenizer.encode([t.format(c) for c in classnames for t in templates],
                             config.input.text_len)
  prompts = jax.device_put(prompts, sharding.replicated(mesh))
  score = prompt_scorer(objective, mesh)
  class_scores, labels = [], []
  input_cfg = common.eval_input_config(config, ev)
  for batch, mask in common.iterate_split(input_cfg, ev.batch_size, mesh):
    if "label" not in batch:
      raise ValueError(f"Split {ev.split!r} of {input_cfg.data!r} has no labels for scoring.")
    logp = common.gather(score(params, batch["image"], prompts, batch.get("prefix")))[mask]
    class_scores.append(logp.reshape(-1, len(classnames), len(templates)).mean(axis=-1))
    labels.append(common.gather(batch["label"])[mask])
  pred = np.argmax(np.concatenate(class_scores), axis=-1)
  labels = np.concatenate(labels)
  per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
  return {"accuracy": float(np.mean(pred == labels)),
          "balanced_accuracy": float(np.mean(per_class)),
          "num_examples": float(len(labels))}
