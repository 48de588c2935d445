"""Zero-shot classification: class names x prompt templates, averaged text embeddings."""
from __future__ import annotations

import numpy as np

from big_mm.evaluators import common


def class_embeddings(embedder, params, tokenizer, classnames, templates, text_len, batch_size):
  """[C, D]: per class, the mean of its L2-normalised prompt embeddings, re-normalised."""
  prompts = [template.format(name) for name in classnames for template in templates]
  tokens = tokenizer.encode(prompts, text_len)
  z = embedder.texts(params, tokens, batch_size).reshape(len(classnames), len(templates), -1)
  z = z.mean(axis=1)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


class ZeroShot(common.Evaluator):
  """Accuracy of the nearest class embedding; classnames: one per label id, in order."""
  DEFAULTS = dict(common.DEFAULTS, classnames=(), templates=("{}",))

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    if not ev.classnames:
      raise ValueError("A zeroshot evaluator needs classnames (one per label id, in order).")

  def evaluate(self, params) -> dict[str, float]:
    ev, context = self.ev, self.context
    classes = class_embeddings(context.embedder, params, context.tokenizer, list(ev.classnames),
                               list(ev.templates), context.config.input.text_len, ev.batch_size)
    data = context.embedder.split(params, self.input_cfg, ev.batch_size, texts=False)
    if "label" not in data:
      raise ValueError(f"Split {ev.split!r} of {context.config.input.data!r} has no labels for "
                       f"zero-shot.")
    pred = np.argmax(data["zimg"] @ classes.T, axis=-1)
    labels = data["label"]
    per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return {"accuracy": float(np.mean(pred == labels)),
            "balanced_accuracy": float(np.mean(per_class)),
            "num_examples": float(len(labels))}
