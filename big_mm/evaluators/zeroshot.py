"""Zero-shot classification: class names x prompt templates, averaged text embeddings.

ImageNet as in the CLIP / SigLIP papers (configs/common.py paper_evals):
  dict(type="zeroshot", data="imagenet2012", split="validation", classnames="imagenet2012",
       templates="clip80")

Per language (multilingual models), with `languages` and class names / templates per language
(a {language: value} dict, or one value all languages share; data/emoji_multilingual.py's
names() and data/digits_multilingual.py's words() / prompts() give them):
  dict(type="zeroshot", data="emoji_multilingual", split="openmoji_test", languages=("en", "ja"),
       classnames={"en": names("test", "en"), "ja": names("test", "ja")}, templates=("{}",))
reports <lang>/accuracy and <lang>/balanced_accuracy per language and mean/accuracy,
mean/balanced_accuracy: their unweighted means over the languages (every language classifies the
same images). The images are embedded once.

Other modalities (`modality`, default "image"), e.g. spoken digits against the digits' names:
  dict(type="zeroshot", modality="audio", data="digits_speech", split="test",
       classnames=words(), templates=("{}",), pp_modalities={"audio": "..."})
classifies the split's `modality` inputs (read with input.modalities = (modality,), its pp
string from input.pp_modalities unless the evaluator's pp_modalities gives one; embedded by
its tower, objective.embed) against the prompts embedded by the text tower. The metric names
stay as above (name the evaluator for the modality: evals.zeroshot_audio gives
eval/zeroshot_audio/accuracy); records without the modality are skipped and counted in
num_skipped.
"""
from __future__ import annotations

import logging

import numpy as np

from big_mm import config as config_lib
from big_mm import modalities as modalities_lib
from big_mm.evaluators import common, prompts, retrieval
from big_mm.input import sources


def class_embeddings(embedder, params, tokenizer, classnames, templates, text_len, batch_size):
  """[C, D]: per class, the mean of its L2-normalised prompt embeddings, re-normalised."""
  return class_embeddings_by_dim(embedder, params, tokenizer, classnames, templates, text_len,
                                 batch_size)[None]


def class_embeddings_by_dim(embedder, params, tokenizer, classnames, templates, text_len,
                            batch_size, prefix_dims=()):
  """{None: [C, D], k: [C, k] for k in prefix_dims}: per class, the mean of its L2-normalised
  prompt embeddings (at dim k: of their re-normalised k-dim prefixes, as Matryoshka training
  sees them), re-normalised. batch_size classes (all their templates) are embedded at a time,
  so the host holds batch_size x len(templates) prompt embeddings, not C x len(templates)
  (80,000 for ImageNet)."""
  means = {dim: [] for dim in (None, *prefix_dims)}
  for start in range(0, len(classnames), batch_size):
    names = classnames[start:start + batch_size]
    tokens = tokenizer.encode([template.format(name) for name in names for template in templates],
                              text_len)
    z = embedder.texts(params, tokens, batch_size).reshape(len(names), len(templates), -1)
    for dim in means:
      means[dim].append((z if dim is None else common.matryoshka_prefix(z, dim)).mean(axis=1))
  out = {}
  for dim, parts in means.items():
    z = np.concatenate(parts)
    out[dim] = z / np.linalg.norm(z, axis=-1, keepdims=True)
  return out


class ZeroShot(common.Evaluator):
  """Accuracy of the nearest class embedding. classnames: one per label id, in order, or the
  name of a list big_mm ships ("imagenet2012"); templates: str.format patterns, or a shipped
  set's name ("clip80", "clip7"); see big_mm/evaluators/prompts.py. A Matryoshka objective
  (objective.matryoshka_dims) adds the accuracies at each smaller prefix dim k of the
  embeddings (re-normalised): accuracy@d{k}, balanced_accuracy@d{k}. An objective with its
  own similarity (FILIP, common.own_similarity) scores each class by the mean over its
  prompts of that similarity instead (logged at every evaluation)."""
  DEFAULTS = dict(common.DEFAULTS, classnames=(), templates=("{}",), languages=(),
                  modality="image", pp_modalities=None)

  @staticmethod
  def validate(name, ev):
    prompt_lists(name, ev)
    config_lib.choice(f"evals.{name}.modality", ev["modality"], tuple(modalities_lib.MODALITIES))
    retrieval.check_pp_modalities(f"evals.{name}.pp_modalities", ev["pp_modalities"])

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    self.modality = ev.modality
    if self.modality != "image":
      key = f"evals.{name}.modality={self.modality!r}"
      retrieval.check_towers(f"{key} (and 'text' for the class prompts)", context.objective,
                             (self.modality, "text"))
      if common.own_similarity(context):
        raise config_lib.ConfigError(f"{key}: the objective's own (FILIP) similarity is "
                                     "image-text only; classify images.")
      self.input_cfg = retrieval.modality_input(name, self.input_cfg, ev, (self.modality,))
    if context.tokenizer is None:
      raise config_lib.ConfigError(f"evals.{name} (zeroshot) needs input.tokenizer (to tokenize "
                                   f"the class prompts).")
    # {language: (classnames, templates)}; {None: ...} without languages.
    self.prompts = prompt_lists(name, ev)
    num_classes = len(next(iter(self.prompts.values()))[0])
    # A TFDS dataset names its classes: their number must match (and the dataset must be
    # there) now, at start-up, not at the first evaluation.
    try:
      labels = sources.label_names(self.input_cfg.data, self.input_cfg.data_dir)
    except sources.DatasetNotFound as e:
      raise sources.DatasetNotFound(f"evals.{name}: {e}. Or turn this evaluator off: "
                                    f"--config.evals.{name}.every_steps=0") from None
    if labels is not None and len(labels) != num_classes:
      raise config_lib.ConfigError(
          f"evals.{name}: {self.input_cfg.data!r} has {len(labels)} classes but classnames "
          f"has {num_classes} names; give one name per label id, in order.")

  def _own_scores(self, params, zimg, classnames, templates):
    """[N, C] with the objective's own similarity (FILIP): a class's score is the mean over
    its prompts of the image->text similarity (token features have no mean embedding)."""
    context, ev = self.context, self.ev
    logging.getLogger("big_mm").info(
        "evals.%s: classifying by the objective's own (FILIP token-wise) similarity.", self.name)
    scores = []
    for start in range(0, len(classnames), ev.batch_size):
      names = classnames[start:start + ev.batch_size]
      tokens = context.tokenizer.encode([t.format(n) for n in names for t in templates],
                                        context.config.input.text_len)
      ztxt = context.embedder.texts(params, tokens, ev.batch_size)
      s = common.scores(context, zimg, ztxt, "img2txt")
      scores.append(s.reshape(len(zimg), len(names), len(templates)).mean(axis=-1))
    return np.concatenate(scores, axis=1)

  def evaluate(self, params) -> dict[str, float]:
    ev, context = self.ev, self.context
    if self.modality == "image":
      data, out = context.embedder.split(params, self.input_cfg, ev.batch_size, texts=False), {}
    else:  # The modality's embeddings take the images' place ("zimg").
      z = retrieval.embed_modalities(context, params, self.input_cfg, ev.batch_size,
                                     (self.modality,))
      if not len(z[self.modality]):
        raise ValueError(f"evals.{self.name}: no record of split {ev.split!r} of "
                         f"{self.input_cfg.data!r} has {self.modality!r}.")
      data = {"zimg": z[self.modality], **{k: z[k] for k in ("label",) if k in z}}
      out = {"num_skipped": float(z["num_skipped"])}
    if "label" not in data:
      raise ValueError(f"Split {ev.split!r} of {self.input_cfg.data!r} has no labels for "
                       f"zero-shot.")
    out["num_examples"] = float(len(data["label"]))
    for language, (classnames, templates) in self.prompts.items():
      prefix = "" if language is None else f"{language}/"
      accuracies = self._accuracies(params, data, classnames, templates)
      out.update({prefix + k: v for k, v in accuracies.items()})
    if None not in self.prompts:  # Per language: the means over the languages too.
      out.update({f"mean/{k}": float(np.mean([out[f"{lang}/{k}"] for lang in self.prompts]))
                  for k in accuracies})
    return out

  def _accuracies(self, params, data, classnames, templates) -> dict[str, float]:
    """accuracy, balanced_accuracy (and @d{k}) of the images in data with these prompts."""
    ev, context = self.ev, self.context
    # Matryoshka models: the accuracies at every prefix dim k too, named "...@d{k}".
    prefix_dims = common.matryoshka_dims(context, data["zimg"].shape[-1])
    if common.own_similarity(context):  # FILIP: token features have no class embedding
      classes = {None: None}
    else:
      classes = class_embeddings_by_dim(context.embedder, params, context.tokenizer,
                                        classnames, templates,
                                        context.config.input.text_len, ev.batch_size,
                                        prefix_dims)
    labels = data["label"]
    out = {}
    for dim, class_z in classes.items():
      zimg = data["zimg"] if dim is None else common.matryoshka_prefix(data["zimg"], dim)
      pred = np.argmax(zimg @ class_z.T if class_z is not None else self._own_scores(
          params, zimg, classnames, templates), axis=-1)
      per_class = [np.mean(pred[labels == c] == c) for c in np.unique(labels)]
      suffix = "" if dim is None else f"@d{dim}"
      out[f"accuracy{suffix}"] = float(np.mean(pred == labels))
      out[f"balanced_accuracy{suffix}"] = float(np.mean(per_class))
    return out


def prompt_lists(name: str, ev) -> dict:
  """{language: (classnames, templates)} of evals.{name} (ev: its keys); {None: (...)} without
  languages. ConfigError for a bad value, a language without names or templates, or languages
  whose class counts differ."""
  langs = prompts.languages(f"evals.{name}.languages", ev["languages"])
  if not langs:
    for key in ("classnames", "templates"):
      if prompts.is_mapping(ev[key]):
        raise config_lib.ConfigError(
            f"evals.{name}.{key} is given per language ({list(ev[key].keys())}); name the "
            f"languages to evaluate: evals.{name}.languages=('en', ...).")
    return {None: (prompts.classnames(f"evals.{name}.classnames", ev["classnames"]),
                   prompts.templates(f"evals.{name}.templates", ev["templates"]))}
  names = prompts.by_language(f"evals.{name}.classnames", ev["classnames"], langs,
                              prompts.classnames)
  templates = prompts.by_language(f"evals.{name}.templates", ev["templates"], langs,
                                  prompts.templates)
  counts = {lang: len(n) for lang, n in names.items()}
  if len(set(counts.values())) > 1:
    raise config_lib.ConfigError(
        f"evals.{name}.classnames: every language needs one name per label id, in order, but "
        f"their counts differ: {counts}.")
  return {lang: (names[lang], templates[lang]) for lang in langs}
