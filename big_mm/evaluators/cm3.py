"""CM3's zero-shot tasks on held-out image-caption pairs (objective "cm3"; evals type "cm3").

For the first `max_examples` held-out examples (their image codes `tok_rgb`, caption `text` and
`label`), prompts are built in the objective's document vocabulary (big_mm/objectives/cm3.py)
and completed with big_mm/decoding.py (prompted generation); tasks:
  caption         left to right: [image block] TXT_START -> the caption, up to TXT_END.
  caption_infill  CM3's captioning by infilling: TXT_START <mask:0> TXT_END [image block]
                  <mask:0> -> the caption, up to EOS.
  infill          the caption's class-name word (e.g. "seven" or "7") replaced by <mask:0>
                  in the whole document, image first and caption first, then <mask:0> -> that
                  word's pieces, up to EOS; scored by exact match.
  image           [text block] IMG_START -> N codes, sampled (`image_temperature`,
                  `image_top_k`), decoded by the objective's image tokenizer and judged by a
                  classifier (`judge`: an .npz of tools/train_digit_classifier.py).
Metrics: caption/label_accuracy and caption_infill/label_accuracy (the caption names the
example's class and no other, as whole words: classnames, one entry per label, alternatives
allowed, as the captioning evaluator); infill/accuracy (mean of infill/image_first_accuracy and
infill/text_first_accuracy); image/judge_accuracy (the judge's label is the caption's) and
image/valid_codes (the fraction of generated tokens that are image codes; others decode as code
0). Greedy decoding except for images. Chance is 1 / len(classnames) for every task.
"""
from __future__ import annotations

import jax
import numpy as np

from big_mm import config as config_lib
from big_mm import decoding, sharding
from big_mm.evaluators import caption_metrics, common
from big_mm.evaluators.digit_judge import DigitJudge
from big_mm.objectives import cm3 as cm3_lib

TASKS = ("caption", "caption_infill", "infill", "image")
MAX_INFILL_LEN = 6  # a class name's pieces and EOS


class CM3Tasks(common.Evaluator):
  """Zero-shot captioning, infilling and caption-to-image of a CM3 model; see the module
  docstring."""
  DEFAULTS = dict(common.DEFAULTS, max_examples=300, tasks=TASKS, classnames=(), judge=None,
                  image_temperature=1.0, image_top_k=0, seed=0)

  @staticmethod
  def validate(name, ev):
    tasks = tuple(ev["tasks"])
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown or not tasks:
      raise config_lib.ConfigError(f"evals.{name}.tasks={tasks!r}: choose from {TASKS}.")
    if not ev["classnames"]:
      raise config_lib.ConfigError(
          f"evals.{name}.classnames is empty: give one name (or a tuple of alternatives) per "
          "label id, e.g. (('zero', '0'), ('one', '1'), ...).")
    if "image" in tasks and not isinstance(ev["judge"], str):
      raise config_lib.ConfigError(
          f"evals.{name}.judge must be the .npz of tools/train_digit_classifier.py for the "
          "'image' task (or drop 'image' from tasks).")
    max_examples = ev["max_examples"]
    if isinstance(max_examples, bool) or not isinstance(max_examples, int) or max_examples < 1:
      raise config_lib.ConfigError(f"evals.{name}.max_examples must be an int >= 1, got "
                                   f"{max_examples!r}.")
    if not ev["image_temperature"] >= 0 or ev["image_top_k"] < 0:
      raise config_lib.ConfigError(f"evals.{name}.image_temperature and image_top_k must be "
                                   ">= 0.")

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    objective = context.objective
    if not isinstance(objective, cm3_lib.CM3):
      raise config_lib.ConfigError(f"evals.{name} (type cm3) needs objective.name='cm3'.")
    self.tasks = tuple(ev.tasks)
    self.names = [[c] if isinstance(c, str) else list(c) for c in ev.classnames]
    self.judge = None
    if "image" in self.tasks:
      if objective.tokenizer is None:
        raise config_lib.ConfigError(
            f"evals.{name}'s image task decodes generated codes: set objective.image_tokenizer "
            "to the vq_tokenizer workdir of the codes.")
      self.judge = DigitJudge.load(ev.judge)

  # ---- generation ------------------------------------------------------------------------

  def _generate(self, params, prompts, max_len, eos_id, rng=None):
    """Completes host prompts [M, P] in evaluation batches -> generated int [M, max_len]."""
    mesh, objective = self.context.mesh, self.context.objective
    size = common.round_batch(self.ev.batch_size, mesh)
    out = []
    for start in range(0, len(prompts), size):
      chunk = prompts[start:start + size]
      rows = len(chunk)
      chunk = np.concatenate([chunk, np.repeat(chunk[:1], size - rows, axis=0)])
      chunk = jax.device_put(chunk, sharding.batch_sharding(mesh))
      if rng is None:
        tokens = decoding.greedy(objective, params, None, prompt=chunk, max_len=max_len,
                                 eos_id=eos_id)
      else:
        tokens = decoding.sample(objective, params, None, jax.random.fold_in(rng, start),
                                 prompt=chunk, max_len=max_len, eos_id=eos_id,
                                 temperature=self.ev.image_temperature,
                                 top_k=self.ev.image_top_k)
      out.append(common.gather(tokens)[:rows])
    return np.concatenate(out)

  @staticmethod
  def _until(tokens, stop):
    tokens = list(tokens)
    return tokens[:tokens.index(stop)] if stop in tokens else tokens

  def _caption_accuracy(self, generated, stop, labels):
    vocab, tokenizer = self.context.objective.vocab, self.context.tokenizer
    hits = []
    for row, label in zip(generated, labels):
      pieces = [t for t in self._until(row, stop) if cm3_lib.EOS_ID < t < vocab.text_vocab]
      hits.append(caption_metrics.names_only(tokenizer.decode(np.asarray(pieces))[0],
                                             self.names, int(label)))
    return float(np.mean(hits))

  def _name_pieces(self, caption: str, label: int):
    """-> (the caption's pieces word by word, index of the class-name word) or None."""
    words = caption.split()
    names = {n.lower() for n in self.names[label]}
    hits = [i for i, w in enumerate(words) if w.lower() in names]
    if len(hits) != 1:
      return None
    tokenizer = self.context.tokenizer
    pieces = [list(self._until(tokenizer.encode(w, 64)[0], cm3_lib.EOS_ID)) for w in words]
    return pieces, hits[0]

  # ---- tasks -----------------------------------------------------------------------------

  def evaluate(self, params) -> dict[str, float]:
    return self.score(params, *self._examples())

  def score(self, params, codes, captions, labels) -> dict[str, float]:
    """The tasks' metrics on host codes int [M, N], captions int [M, text_len] and labels [M]."""
    objective = self.context.objective
    vocab, n = objective.vocab, objective.num_codes
    width = objective.seq_len
    text_len = captions.shape[1]
    out = {"num_examples": float(len(labels))}
    caption_pieces = [self._until(row, cm3_lib.EOS_ID) for row in captions]
    caption_pieces = [[t for t in row if t] for row in caption_pieces]
    images = [vocab.image_block(c) for c in codes]

    if "caption" in self.tasks:
      prompts = np.stack([cm3_lib.prompt([img, [vocab.txt_start]], n + 3) for img in images])
      generated = self._generate(params, prompts, min(text_len + 1, width - n - 3),
                                 vocab.txt_end)
      out["caption/label_accuracy"] = self._caption_accuracy(generated, vocab.txt_end, labels)

    if "caption_infill" in self.tasks:
      mask = vocab.sentinel(0)
      prompts = np.stack([cm3_lib.prompt([[vocab.txt_start, mask, vocab.txt_end], img, [mask]],
                                         n + 6) for img in images])
      generated = self._generate(params, prompts, min(text_len, width - n - 6), cm3_lib.EOS_ID)
      out["caption_infill/label_accuracy"] = self._caption_accuracy(generated, cm3_lib.EOS_ID,
                                                                    labels)

    if "infill" in self.tasks:
      out.update(self._infill(params, images, captions, labels, width))

    if "image" in self.tasks:
      prompts = np.stack([cm3_lib.prompt([vocab.text_block(c), [vocab.img_start]], text_len + 3)
                          for c in caption_pieces])
      generated = self._generate(params, prompts, n, vocab.img_end,
                                 rng=jax.random.key(self.ev.seed))
      image_codes, valid = vocab.codes(generated)
      decoded = np.asarray(objective.tokenizer.decode(image_codes))
      predicted = self.judge.predict(decoded)
      out["image/judge_accuracy"] = float(np.mean(predicted == labels))
      out["image/valid_codes"] = float(np.mean(valid))
    return out

  def _infill(self, params, images, captions, labels, width):
    vocab, tokenizer = self.context.objective.vocab, self.context.tokenizer
    mask = vocab.sentinel(0)
    out = {}
    texts = tokenizer.decode(captions)
    found = [self._name_pieces(t, int(y)) for t, y in zip(texts, labels)]
    rows = [i for i, f in enumerate(found) if f is not None]
    if not rows:
      raise ValueError("No held-out caption names its class exactly once as a word, so the "
                       "infill task has nothing to mask; check evals classnames.")
    for order in ("image_first", "text_first"):
      prompts, targets = [], []
      for i in rows:
        pieces, at = found[i]
        before = [t for p in pieces[:at] for t in p]
        after = [t for p in pieces[at + 1:] for t in p]
        text = vocab.text_block(before + [mask] + after)
        parts = [images[i], text] if order == "image_first" else [text, images[i]]
        prompts.append(cm3_lib.prompt(parts + [[mask]], width - MAX_INFILL_LEN))
        targets.append(pieces[at])
      generated = self._generate(params, np.stack(prompts), MAX_INFILL_LEN, cm3_lib.EOS_ID)
      hits = [self._until(g, cm3_lib.EOS_ID) == t for g, t in zip(generated, targets)]
      out[f"infill/{order}_accuracy"] = float(np.mean(hits))
    out["infill/accuracy"] = (out["infill/image_first_accuracy"]
                              + out["infill/text_first_accuracy"]) / 2
    out["infill/num_examples"] = float(len(rows))
    return out

  def _examples(self):
    """The first max_examples held-out (codes, text, label), host arrays."""
    codes, texts, labels = [], [], []
    total = 0
    for batch, mask in common.iterate_split(self.input_cfg, self.ev.batch_size,
                                            self.context.mesh):
      if "label" not in batch:
        raise ValueError(f"Split {self.ev.split!r} has no labels, which the cm3 evaluator "
                         "scores against; evaluate a labelled split.")
      codes.append(common.gather(batch["tok_rgb"])[mask])
      texts.append(common.gather(batch["text"])[mask])
      labels.append(common.gather(batch["label"])[mask])
      total += int(mask.sum())
      if total >= self.ev.max_examples:
        break
    m = self.ev.max_examples
    return (np.concatenate(codes)[:m], np.concatenate(texts)[:m],
            np.concatenate(labels)[:m].astype(np.int64))
