"""The cm3 evaluator (big_mm/evaluators/cm3.py): an oracle that completes every prompt as the
training format says scores 1.0 on every task; a random model runs the real decoding path."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib
from big_mm import sharding
from big_mm.evaluators import cm3 as cm3_eval
from big_mm.evaluators import common
from big_mm.evaluators.digit_judge import DigitJudge
from big_mm.input.tokenizer import Tokenizer
from big_mm.models.lm import LanguageModel
from big_mm.objectives import base, cm3

from conftest import TOKENIZER

N, CODES, TEXT_LEN, SPANS = 4, 16, 12, 2
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CLASSNAMES = tuple((w, str(i)) for i, w in enumerate(WORDS))


class FakeImageTokenizer:
  """decode: a flat grey image whose level is the first code / 9 (the label, in these tests)."""
  vocab_size, num_tokens = CODES, N

  def decode(self, codes):
    level = np.asarray(codes)[:, 0].astype(np.float32) / 9.0
    return np.broadcast_to((2 * level - 1)[:, None, None, None], (len(level), 32, 32, 3))


def _level_judge(path):
  """argmax_c -(v - c/9)^2 for the grey level v of the image, as one dense layer."""
  c = np.arange(10, dtype=np.float32)
  weights = np.tile(2 * c / 9 / 64, (64, 1))
  DigitJudge([(weights, -(c / 9) ** 2)], image_size=32, pool=4).save(path)


def _examples(tokenizer, m=20):
  labels = np.arange(m) % 10
  templates = ("a drawing of a {n}", "the number {w} written by hand")
  texts = [templates[i % 2].format(n=y, w=WORDS[y]) for i, y in enumerate(labels)]
  rng = np.random.default_rng(0)
  codes = rng.integers(0, CODES, (m, N))
  codes[:, 0] = labels
  codes[:, 1] = np.arange(m) // 10  # with the label: unique images
  return codes, tokenizer.encode(texts, TEXT_LEN), labels


class Oracle(cm3.CM3):
  """Completes each evaluator prompt with its right answer, found from the true examples; for
  the infilling prompts it checks that prompt + answer + EOS is a causally masked sequence of
  the example's true document (cm3.uncausal inverts it)."""

  def set_examples(self, codes, captions):
    self.docs = {}
    for c, t in zip(codes, captions):
      caption = [int(x) for x in t[:list(t).index(cm3.EOS_ID)]]
      self.docs[tuple(int(x) for x in c)] = caption
    self.by_caption = {tuple(v): k for k, v in self.docs.items()}

  def encode(self, params, images, prefix=None):
    return {"rows": jnp.zeros((images.shape[0], 0), jnp.int32)}

  def init_cache(self, params, enc, max_len):
    return {"seen": jnp.zeros((enc["rows"].shape[0], max_len), jnp.int32)}

  def decode_step(self, params, enc, cache, tokens, position):
    seen = jax.lax.dynamic_update_slice_in_dim(cache["seen"], tokens[:, None], position, axis=1)
    nxt = jax.pure_callback(self._next, jax.ShapeDtypeStruct(tokens.shape, jnp.int32), seen,
                            position)
    return 20.0 * jax.nn.one_hot(nxt, self.vocab_size), {"seen": seen}

  def _next(self, seen, position):
    out = []
    for row in np.asarray(seen):
      s = [int(x) for x in row[1:int(position) + 1]]
      try:
        ideal = self._ideal(s)
      except (KeyError, IndexError, ValueError):  # inside the prompt, which is forced anyway
        ideal = []
      out.append(ideal[len(s)] if len(s) < len(ideal) else cm3.EOS_ID)
    return np.asarray(out, np.int32)

  def _infilled(self, prompt, text, codes):
    s0 = self.vocab.sentinel(0)
    if prompt[-1] != s0:
      raise KeyError("the prompt is still being fed")
    caption = self.docs[codes]
    at = text.index(s0)
    answer = caption[at:len(caption) - (len(text) - at - 1)]
    ideal = prompt + answer + [cm3.EOS_ID]
    image = list(self.vocab.image_block(codes))
    true_text = list(self.vocab.text_block(caption))
    doc = image + true_text if prompt[0] == self.vocab.img_start else true_text + image
    np.testing.assert_array_equal(cm3.uncausal(ideal, self.vocab.sentinel_start, SPANS), doc)
    return ideal

  def _ideal(self, s):
    v, s0 = self.vocab, self.vocab.sentinel(0)
    if s[0] == v.img_start:
      codes = tuple(x - v.code_start for x in s[1:1 + N])
      if s0 in s:  # infill, image first: [image] [text with <mask:0>] <mask:0>
        te = s.index(v.txt_end)
        return self._infilled(s[:te + 2], s[N + 3:te], codes)
      return s[:N + 3] + self.docs[codes] + [v.txt_end]
    if s[1] == s0 and s[2] == v.txt_end:  # captioning by infilling
      codes = tuple(x - v.code_start for x in s[4:4 + N])
      return self._infilled(s[:N + 6], [s0], codes)
    te = s.index(v.txt_end)
    text = s[1:te]
    if s0 in text:  # infill, caption first: [text with <mask:0>] [image] <mask:0>
      codes = tuple(x - v.code_start for x in s[te + 2:te + 2 + N])
      return self._infilled(s[:te + N + 4], text, codes)
    codes = self.by_caption[tuple(text)]  # caption -> image
    return s[:te + 2] + [c + v.code_start for c in codes] + [v.img_end]


def _setup(tmp_path, objective_cls, tasks=cm3_eval.TASKS):
  tokenizer = Tokenizer(TOKENIZER)
  vocab = cm3.DocumentVocab(tokenizer.vocab_size, CODES, SPANS)
  seq_len = N + TEXT_LEN + 4 + 2 * SPANS + 1
  model = LanguageModel(decoder=dict(vocab_size=vocab.size, max_len=seq_len, width=16,
                                     depth=1, num_heads=2, mlp_dim=32))
  ctx = base.Context(text_len=TEXT_LEN, tokenizer=tokenizer, modalities=("tok_rgb", "text"))
  objective = objective_cls(model, ctx, loaded_tokenizer=FakeImageTokenizer(), image_tokens=N,
                            image_vocab=CODES, max_spans=SPANS)
  judge = os.path.join(tmp_path, "judge.npz")
  _level_judge(judge)
  ev = config_lib.ConfigDict(dict(cm3_eval.CM3Tasks.DEFAULTS, type="cm3", batch_size=8,
                                  classnames=CLASSNAMES, judge=judge, tasks=tasks))
  config = config_lib.ConfigDict(dict(input=dict(data="unused", split="train")))
  mesh = sharding.make_mesh(dict(data=1, fsdp=1, tensor=1, expert=1), jax.devices()[:1])
  evaluator = cm3_eval.CM3Tasks("cm3", ev, common.EvalContext(config, mesh, objective,
                                                              tokenizer))
  return objective, evaluator, tokenizer


def test_an_oracle_scores_one_on_every_task(tmp_path):
  objective, evaluator, tokenizer = _setup(tmp_path, Oracle)
  codes, captions, labels = _examples(tokenizer)
  objective.set_examples(codes, captions)
  out = evaluator.score({}, codes, captions, labels)
  for key in ("caption/label_accuracy", "caption_infill/label_accuracy", "infill/accuracy",
              "infill/image_first_accuracy", "infill/text_first_accuracy",
              "image/judge_accuracy", "image/valid_codes"):
    assert out[key] == 1.0, (key, out)
  assert out["infill/num_examples"] == 20 and out["num_examples"] == 20


def test_a_random_model_runs_the_real_decoding_path(tmp_path):
  objective, evaluator, tokenizer = _setup(tmp_path, cm3.CM3, tasks=("caption",))
  params = objective.init_params(jax.random.key(0))
  params = jax.tree.map(lambda x: getattr(x, "value", x), params,
                        is_leaf=lambda x: hasattr(x, "value"))
  codes, captions, labels = _examples(tokenizer)
  out = evaluator.score(params, codes, captions, labels)
  assert sorted(out) == ["caption/label_accuracy", "num_examples"]
  assert out["caption/label_accuracy"] < 0.5  # an untrained model does not know the digits


def test_config_errors():
  check = cm3_eval.CM3Tasks.validate
  good = dict(cm3_eval.CM3Tasks.DEFAULTS, classnames=CLASSNAMES, judge="j.npz")
  with pytest.raises(config_lib.ConfigError, match="tasks"):
    check("x", dict(good, tasks=("caption", "poem")))
  with pytest.raises(config_lib.ConfigError, match="classnames"):
    check("x", dict(good, classnames=()))
  with pytest.raises(config_lib.ConfigError, match="judge"):
    check("x", dict(good, judge=None))
  check("x", dict(good, judge=None, tasks=("caption", "infill")))
