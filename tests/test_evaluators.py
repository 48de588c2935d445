"""Evaluators: recall@k arithmetic, zero-shot class embeddings, whole-split embedding."""
import numpy as np

from big_mm.evaluators import retrieval, zeroshot


def test_recall_at_k_counts_rank_of_the_true_pair():
  sim = np.array([[0.9, 0.1, 0.0],    # query 0: right one first
                  [0.8, 0.5, 0.1],    # query 1: right one second
                  [0.7, 0.6, 0.1]])   # query 2: right one third
  assert retrieval.recall_at_k(sim, (1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0}


class _FakeEmbedder:
  """Text 'embedding' = one-hot of the first token, so prompts of a class average to it."""

  def texts(self, params, tokens, batch_size):
    del params, batch_size
    return np.eye(8)[tokens[:, 0]]


class _FakeTokenizer:
  def encode(self, texts, length):
    ids = {"zero": 1, "one": 2, "two": 3}
    return np.array([[ids[t.split()[-1]]] + [0] * (length - 1) for t in texts], np.int32)


def test_class_embeddings_average_templates_and_normalise():
  z = zeroshot.class_embeddings(_FakeEmbedder(), None, _FakeTokenizer(), ["zero", "one", "two"],
                                ["a {}", "the digit {}"], text_len=4, batch_size=8)
  assert z.shape == (3, 8)
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0)
  assert list(np.argmax(z, axis=-1)) == [1, 2, 3]


# ---------------------------------------------------------------------------------------
# Generative evaluators (captioning, scoring) with fake objectives over the digits test split.

import sys  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402

import big_mm  # noqa: E402
from big_mm import config as config_lib, evaluators, sharding  # noqa: E402
from big_mm.evaluators import caption_metrics  # noqa: E402
from big_mm.input import pipeline  # noqa: E402
from big_mm.input.tokenizer import Tokenizer  # noqa: E402
from conftest import TOKENIZER, tiny_config  # noqa: E402

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
EVAL_PP = "decode|resize(32)|value_range(-1,1)"


def _eval_setup(data_dir, ev):
  """(config, mesh over 8 devices, the split's host batches as the evaluator sees them)."""
  config = tiny_config(data_dir, **{"input.text_len": 16, "evals": {"e": ev}})
  ev = config.evals.e
  batches = list(pipeline.make_eval_batches(evaluators.common.eval_input_config(config, ev),
                                            ev.split, 256, None))
  return config, ev, sharding.make_mesh(config.mesh), batches


def _image_class(images):
  """A fake image 'classifier' with exact integer arithmetic: lit pixels in the centre, mod 10."""
  return jnp.sum(images[:, 12:20, 12:20, 0] > 0, axis=(1, 2)) % 10


class _TokenCountObjective:
  """Every real example: NLL 0.5 per non-pad token plus 1 (padded rows would add 1 each)."""

  def log_likelihood(self, params, images, texts):
    del params, images
    count = jnp.sum(texts != 0, axis=-1)
    return -0.5 * count - 1.0, count


def test_captioning_perplexity_and_generated_caption_metrics(data_dir, monkeypatch):
  config, ev, mesh, batches = _eval_setup(data_dir, dict(
      type="captioning", split="test", pp_image=EVAL_PP, max_examples=100, decode_method="beam",
      decode_options={"beam_size": 3}, classnames=[(w, str(i)) for i, w in enumerate(WORDS)]))
  tokenizer = Tokenizer(TOKENIZER)
  wrong = tokenizer.encode(["nothing here"], 16)[0]
  calls = []

  def fake_decode(objective, params, images, *, method, max_len, **options):
    # Batch k: the true captions of even labels, "nothing here" for odd ones.
    calls.append((method, max_len, options, images.shape))
    host = batches[len(calls) - 1]
    return np.where((host["label"] % 2 == 0)[:, None], host["text"], wrong[None])

  fake = type(sys)("big_mm.decoding")
  fake.decode = fake_decode
  fake.to_text = lambda tok, tokens: tok.decode(tokens)
  monkeypatch.setitem(sys.modules, "big_mm.decoding", fake)
  monkeypatch.setattr(big_mm, "decoding", fake, raising=False)

  out = evaluators.run("cap", ev, embedder=None, objective=_TokenCountObjective(), mesh=mesh,
                       params={}, config=config, tokenizer=tokenizer)

  texts = np.concatenate([b["text"][b["mask"] > 0] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  tokens = np.sum(texts != 0)
  assert len(labels) == 300
  assert out["eval/cap/num_examples"] == 300
  assert out["eval/cap/perplexity"] == pytest.approx(np.exp((0.5 * tokens + 300) / tokens))
  # 100 examples < one batch of 256: one decode call, options passed through.
  assert calls == [("beam", 16, {"beam_size": 3}, (256, 32, 32, 3))]
  assert out["eval/cap/num_decoded"] == 100
  even = labels[:100] % 2 == 0
  assert out["eval/cap/exact_match"] == pytest.approx(np.mean(even))
  # Every true caption names its digit (as a word or numeral) and no other.
  assert out["eval/cap/label_accuracy"] == pytest.approx(np.mean(even))
  refs = [[r] for r in tokenizer.decode(texts[:100])]
  hyps = [r[0] if e else "nothing here" for r, e in zip(refs, even)]
  assert out["eval/cap/bleu4"] == pytest.approx(caption_metrics.bleu(hyps, refs))
  assert out["eval/cap/cider_d"] == pytest.approx(caption_metrics.cider_d(hyps, refs))
  assert 0 < out["eval/cap/bleu4"] < 1


class _PromptScoringObjective:
  """Log-likelihood of prompt (class c, template t) for an image whose fake class is k:
  c == k: 0 for template 0, -5 for template 1 (the best single prompt, but a mean of -2.5);
  c == k+1: -1 for both (the best mean); any other class: -10."""

  def __init__(self, prompts, num_templates):
    self.prompts, self.num_templates = jnp.asarray(prompts), num_templates

  def log_likelihood(self, params, images, texts):
    del params
    row = jnp.argmax(jnp.all(texts[:, None, :] == self.prompts[None], axis=-1), axis=-1)
    cls, template = row // self.num_templates, row % self.num_templates
    k = _image_class(images)
    score = jnp.where(cls == k, jnp.where(template == 0, 0.0, -5.0),
                      jnp.where(cls == (k + 1) % 10, -1.0, -10.0))
    return score, jnp.sum(texts != 0, axis=-1)


def test_scoring_averages_template_log_likelihoods(data_dir):
  templates = ("{}", "the digit {}")
  config, ev, mesh, batches = _eval_setup(data_dir, dict(
      type="scoring", split="test", pp_image=EVAL_PP, classnames=WORDS, templates=templates))
  tokenizer = Tokenizer(TOKENIZER)
  prompts = tokenizer.encode([t.format(w) for w in WORDS for t in templates], 16)
  objective = _PromptScoringObjective(prompts, len(templates))

  out = evaluators.run("score", ev, embedder=None, objective=objective, mesh=mesh, params={},
                       config=config, tokenizer=tokenizer)

  images = np.concatenate([b["image"][b["mask"] > 0] for b in batches])
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  pred = (np.asarray(_image_class(images)) + 1) % 10  # the best template mean
  per_class = [np.mean(pred[labels == c] == c) for c in range(10)]
  assert out == {"eval/score/accuracy": pytest.approx(np.mean(pred == labels)),
                 "eval/score/balanced_accuracy": pytest.approx(np.mean(per_class)),
                 "eval/score/num_examples": 300.0}


def test_embedder_is_lazy_for_objectives_without_embeddings():
  mesh = sharding.make_mesh(config_lib.ConfigDict(dict(data=-1)))
  embedder = evaluators.Embedder(_TokenCountObjective(), mesh)
  with pytest.raises(TypeError, match="has no embed_images.*'scoring' / 'captioning'"):
    embedder.embed_images  # pylint: disable=pointless-statement


@pytest.mark.parametrize("ev,error", [
    (dict(type="captioning", beam_size=4), r"'evals.e.beam_size'.*Valid keys"),
    (dict(type="captioning", decode_method="topk"), r"evals.e.decode_method='topk'.*greedy"),
    (dict(type="captioning", max_examples=-1), r"evals.e.max_examples must be an integer >= 0"),
    (dict(type="captioning", decode_options={"max_len": 9}), r"max_decode_len"),
    (dict(type="scoring"), r"evals.e \(scoring\) needs classnames"),
    (dict(type="scoring", classnames=WORDS, ks=(1,)), r"'evals.e.ks'.*Valid keys"),
])
def test_generative_eval_config_errors(data_dir, ev, error):
  with pytest.raises(config_lib.ConfigError, match=error):
    tiny_config(data_dir, evals={"e": dict(ev, split="test")})


def test_generative_eval_defaults(data_dir):
  config = tiny_config(data_dir, evals={"c": dict(type="captioning"),
                                        "s": dict(type="scoring", classnames=WORDS)})
  assert (config.evals.c.decode_method, config.evals.c.max_examples) == ("greedy", 1000)
  assert config.evals.s.templates == ("{}",) and config.evals.s.split == "test"
