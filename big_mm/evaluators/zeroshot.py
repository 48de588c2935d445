"""Zero-shot classification: class names x prompt templates, averaged text embeddings.

ImageNet as in the CLIP / SigLIP papers (configs/common.py paper_evals):
  dict(type="zeroshot", data="imagenet2012", split="validation", classnames="imagenet2012",
       templates="clip80")
"""
from __future__ import annotations

import numpy as np

from big_mm import config as config_lib
from big_mm.evaluators import common, prompts
from big_mm.input import sources


def class_embeddings(embedder, params, tokenizer, classnames, templates, text_len, batch_size):
  """[C, D]: per class, the mean of its L2-normalised prompt embeddings, re-normalised.
  batch_size classes (all their templates) are embedded at a time, so the host holds
  batch_size x len(templates) prompt embeddings, not C x len(templates) (80,000 for ImageNet)."""
  means = []
  for start in range(0, len(classnames), batch_size):
    names = classnames[start:start + batch_size]
    tokens = tokenizer.encode([template.format(name) for name in names for template in templates],
                              text_len)
    z = embedder.texts(params, tokens, batch_size).reshape(len(names), len(templates), -1)
    means.append(z.mean(axis=1))
  z = np.concatenate(means)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


class ZeroShot(common.Evaluator):
  """Accuracy of the nearest class embedding. classnames: one per label id, in order, or the
  name of a list big_mm ships ("imagenet2012"); templates: str.format patterns, or a shipped
  set's name ("clip80", "clip7"); see big_mm/evaluators/prompts.py."""
  DEFAULTS = dict(common.DEFAULTS, classnames=(), templates=("{}",))

  @staticmethod
  def validate(name, ev):
    prompts.classnames(f"evals.{name}.classnames", ev["classnames"])
    prompts.templates(f"evals.{name}.templates", ev["templates"])

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    if context.tokenizer is None:
      raise config_lib.ConfigError(f"evals.{name} (zeroshot) needs input.tokenizer (to tokenize "
                                   f"the class prompts).")
    self.classnames = prompts.classnames(f"evals.{name}.classnames", ev.classnames)
    self.templates = prompts.templates(f"evals.{name}.templates", ev.templates)
    # A TFDS dataset names its classes: their number must match (and the dataset must be
    # there) now, at start-up, not at the first evaluation.
    try:
      labels = sources.label_names(self.input_cfg.data, self.input_cfg.data_dir)
    except sources.DatasetNotFound as e:
      raise sources.DatasetNotFound(f"evals.{name}: {e}. Or turn this evaluator off: "
                                    f"--config.evals.{name}.every_steps=0") from None
    if labels is not None and len(labels) != len(self.classnames):
      raise config_lib.ConfigError(
          f"evals.{name}: {self.input_cfg.data!r} has {len(labels)} classes but classnames "
          f"has {len(self.classnames)} names; give one name per label id, in order.")

  def evaluate(self, params) -> dict[str, float]:
    ev, context = self.ev, self.context
    classes = class_embeddings(context.embedder, params, context.tokenizer, self.classnames,
                               self.templates, context.config.input.text_len, ev.batch_size)
    data = context.embedder.split(params, self.input_cfg, ev.batch_size, texts=False)
    if "label" not in data:
      raise ValueError(f"Split {ev.split!r} of {self.input_cfg.data!r} has no labels for "
                       f"zero-shot.")
    pred = np.argmax(data["zimg"] @ classes.T, axis=-1)
    labels = data["label"]
    per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
    return {"accuracy": float(np.mean(pred == labels)),
            "balanced_accuracy": float(np.mean(per_class)),
            "num_examples": float(len(labels))}
