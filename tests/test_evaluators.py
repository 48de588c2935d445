"""Evaluators: recall@k arithmetic, zero-shot class embeddings, whole-split embedding."""
import math

import numpy as np
import pytest

from big_mm.evaluators import retrieval, zeroshot


def test_recall_at_k_counts_rank_of_the_true_pair():
  sim = np.array([[0.9, 0.1, 0.0],    # query 0: right one first
                  [0.8, 0.5, 0.1],    # query 1: right one second
                  [0.7, 0.6, 0.1]])   # query 2: right one third
  assert retrieval.recall_at_k(sim, np.eye(3, dtype=bool), (1, 2, 3)) == {
      1: 1 / 3, 2: 2 / 3, 3: 1.0}


def test_recall_ties_are_broken_at_random_so_collapse_scores_chance():
  """Equal scores do not count for the right pair: collapsed embeddings give chance level
  (k / N), a caption shared by 3 images 1/3 of a hit."""
  collapsed = retrieval.recall_at_k(np.zeros((10, 10)), np.eye(10, dtype=bool), (1, 5, 10))
  assert collapsed == pytest.approx({1: 0.1, 5: 0.5, 10: 1.0})
  # Query 0's right candidate ties with 2 wrong ones on top; query 1's ties with 1 wrong one
  # in second place, behind a wrong one.
  sim = np.array([[0.5, 0.5, 0.5, 0.1],
                  [0.9, 0.3, 0.3, 0.1]])
  positive = np.array([[1, 0, 0, 0], [0, 1, 0, 0]], bool)
  assert retrieval.recall_at_k(sim, positive, (1, 2, 3)) == pytest.approx(
      {1: (1 / 3 + 0) / 2, 2: (2 / 3 + 1 / 2) / 2, 3: (1 + 1) / 2})


def test_multi_caption_recall_by_hand():
  """2 images, 5 captions (image 0 owns captions 0-2, image 1 owns 3-4). image->text: a hit
  if any own caption is in the top k; text->image: if the caption's image is."""
  sim = np.array([[0.1, 0.5, 0.2, 0.9, 0.3],    # image 0: caption 3 (wrong), then 1 (own)
                  [0.2, 0.1, 0.0, 0.7, 0.6]])   # image 1: caption 3 (own) first
  owner = np.array([0, 0, 0, 1, 1])
  img2txt = owner[None, :] == np.arange(2)[:, None]
  assert retrieval.recall_at_k(sim, img2txt, (1, 2)) == {1: 1 / 2, 2: 1.0}
  # Captions 1, 2, 4 rank their image first; 0 and 3 second.
  assert retrieval.recall_at_k(sim.T, img2txt.T, (1, 2)) == {1: 3 / 5, 2: 1.0}
  # All tied: image 0 has 3 right of 5 (1 - 2/5 at k=1; 1 - 2/5 * 1/4 at k=2), image 1 has 2
  # right of 5 (1 - 3/5; 1 - 3/5 * 2/4); each caption 1 right of 2.
  flat = np.zeros((2, 5))
  assert retrieval.recall_at_k(flat, img2txt, (1, 2)) == pytest.approx(
      {1: (3 / 5 + 2 / 5) / 2, 2: (9 / 10 + 7 / 10) / 2})
  assert retrieval.recall_at_k(flat.T, img2txt.T, (1, 2)) == pytest.approx({1: 0.5, 2: 1.0})


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

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from big_mm import config as config_lib, evaluators, sharding  # noqa: E402
from big_mm.evaluators import caption_metrics, captioning  # noqa: E402
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


def _run(name, ev, config, mesh, objective, tokenizer, params=None):
  """The evaluator of `ev`, built for one run and called once."""
  context = evaluators.EvalContext(config, mesh, objective, tokenizer)
  return evaluators.build(name, ev, context)({} if params is None else params)


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
  monkeypatch.setattr(captioning, "decoding", fake)

  out = _run("cap", ev, config, mesh, _TokenCountObjective(), tokenizer)

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

  out = _run("score", ev, config, mesh, objective, tokenizer)

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


# ---------------------------------------------------------------------------------------
# Retrieval end to end: the paper configs' COCO evaluator on a fake coco_captions, and
# degenerate embeddings on the digits test split.

from configs import common as configs_common  # noqa: E402
from test_sources import COCO_CAPTIONS, build_coco_captions  # noqa: E402

# Caption vectors = their scores against images 0..3 (images embed one-hot). Rows follow
# COCO_CAPTIONS; the 6th caption of image 2 would make it a hit at k=1 but is not a candidate.
CAPTION_SCORES = [
    # image 0: own caption 1 scores highest of all in its row -> image->text hit at 1.
    [[.50, .10, .00, .00], [.90, .20, .10, .00], [.30, .40, .00, .00], [.20, .00, .00, .00],
     [.10, .00, .00, .00]],
    # image 1: image 0's caption 2 (.40) beats its best own (.35) -> hit at 2.
    [[.00, .35, .00, .00], [.00, .30, .00, .00], [.00, .10, .80, .00], [.00, .05, .00, .00],
     [.00, .01, .00, .00]],
    # image 2: captions 1.2 (.80) and 3.0 (.70) beat its best own (.60) -> hit at 3.
    [[.00, .00, .60, .00], [.00, .00, .50, .00], [.00, .00, .40, .00], [.00, .00, .30, .00],
     [.00, .00, .20, .00], [.00, .00, .99, .00]],
    # image 3: own captions first -> hit at 1.
    [[.00, .00, .70, .65], [.00, .00, .00, .90], [.00, .00, .00, .80], [.00, .00, .00, .75],
     [.00, .00, .00, .70]],
]


class _TableObjective:
  """Image i (grey 40 i) -> one-hot(i); caption -> its row of CAPTION_SCORES, found by its
  tokens. `poison` makes image embeddings NaN; `collapse` makes every embedding equal."""

  def __init__(self, captions_tokens, vectors, poison=False, collapse=False):
    self.tokens, self.vectors = jnp.asarray(captions_tokens), jnp.asarray(vectors, jnp.float32)
    self.poison, self.collapse = poison, collapse

  def embed_images(self, params, images):
    del params
    index = jnp.round((images[:, 0, 0, 0] + 1) * 127.5 / 40).astype(jnp.int32)
    z = jnp.eye(4)[jnp.clip(index, 0, 3)]
    if self.collapse:
      z = jnp.ones_like(z) / 2
    return jnp.where(self.poison, jnp.nan, z)

  def embed_texts(self, params, texts):
    del params
    row = jnp.argmax(jnp.all(texts[:, None, :] == self.tokens[None], axis=-1), axis=-1)
    return jnp.ones((len(texts), 4)) / 2 if self.collapse else self.vectors[row]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("coco")
  build_coco_captions(d)
  return str(d)


def _coco_run(coco_dir, **objective_options):
  evals = configs_common.paper_evals("decode|resize(8)|value_range(-1,1)", every_steps=1)
  ev = dict(evals["retrieval_coco"], ks=(1, 2, 3), batch_size=8)
  config = tiny_config(coco_dir, **{"input.text_len": 8, "evals": {"coco": ev}})
  tokenizer = Tokenizer(TOKENIZER)
  captions = [c for caps in COCO_CAPTIONS for c in caps]
  objective = _TableObjective(tokenizer.encode(captions, 8),
                              [v for rows in CAPTION_SCORES for v in rows], **objective_options)
  return _run("coco", config.evals.coco, config, sharding.make_mesh(config.mesh), objective,
              tokenizer)


def test_paper_coco_retrieval_uses_every_caption(coco_dir):
  out = _coco_run(coco_dir)
  # image->text: images 0 and 3 hit at 1, image 1 at 2, image 2 at 3.
  assert [out[f"eval/coco/img2txt/R@{k}"] for k in (1, 2, 3)] == [2 / 4, 3 / 4, 4 / 4]
  # text->image, per caption (its image scores): a hit at 1 unless another image scores
  # higher: misses 0.2 (image 1: .40), 1.2 (image 2: .80), 3.0 (image 2: .70); at 2 all hit.
  assert [out[f"eval/coco/txt2img/R@{k}"] for k in (1, 2, 3)] == [17 / 20, 1.0, 1.0]
  assert (out["eval/coco/num_examples"], out["eval/coco/num_captions"]) == (4, 20)


def test_retrieval_refuses_nan_embeddings(coco_dir):
  with pytest.raises(FloatingPointError, match=r"evals\.coco \(retrieval\): 4 of 4 image "
                                               r"embeddings are not finite"):
    _coco_run(coco_dir, poison=True)


def test_collapsed_embeddings_score_chance_on_the_digits(data_dir):
  """All-equal embeddings: R@k = k/300 (the one right pair among 300), class_R@k = the chance
  that one of 30 same-label captions is among k drawn from 300."""
  config, ev, mesh, _ = _eval_setup(data_dir, dict(type="retrieval", split="test",
                                                   pp_image=EVAL_PP, ks=(1, 5)))
  tokenizer = Tokenizer(TOKENIZER)
  objective = _TableObjective(np.zeros((1, 16), np.int32), np.zeros((1, 4)), collapse=True)
  out = _run("r", ev, config, mesh, objective, tokenizer)
  for k in (1, 5):
    class_chance = 1 - math.comb(270, k) / math.comb(300, k)
    for direction in ("img2txt", "txt2img"):
      assert out[f"eval/r/{direction}/R@{k}"] == pytest.approx(k / 300)
      assert out[f"eval/r/{direction}/class_R@{k}"] == pytest.approx(class_chance)


def test_a_finished_runs_objective_is_freed(coco_dir):
  """Jitted functions live on the run's evaluators, not in module caches keyed by objective."""
  import gc
  import weakref
  tokenizer = Tokenizer(TOKENIZER)
  objective = _TableObjective(np.zeros((1, 8), np.int32), np.zeros((1, 4)), collapse=True)
  evals = configs_common.paper_evals("decode|resize(8)|value_range(-1,1)", every_steps=1)
  ev = dict(evals["retrieval_coco"], ks=(1,), batch_size=8)
  config = tiny_config(coco_dir, **{"input.text_len": 8, "evals": {"coco": ev}})
  assert _run("coco", config.evals.coco, config, sharding.make_mesh(config.mesh), objective,
              tokenizer)["eval/coco/num_examples"] == 4
  freed = weakref.ref(objective)
  del objective
  gc.collect()
  assert freed() is None


# ---------------------------------------------------------------------------------------
# The evaluator contract: a new type is its class plus one line in evaluators.EVALUATORS.

from big_mm import train  # noqa: E402
from big_mm.evaluators import common  # noqa: E402
from conftest import final_params, read_metrics  # noqa: E402


class _ParamCount(evaluators.Evaluator):
  """A toy evaluator type: scale x the number of parameters, and how often it was called."""
  DEFAULTS = dict(common.DEFAULTS, scale=1.0)
  built: list[str] = []

  @staticmethod
  def validate(name, ev):
    if not ev["scale"] > 0:
      raise config_lib.ConfigError(f"evals.{name}.scale must be > 0, got {ev['scale']!r}.")

  def __init__(self, name, ev, context):
    super().__init__(name, ev, context)
    self.built.append(name)
    self.calls = 0

  def evaluate(self, params):
    self.calls += 1
    size = sum(x.size for x in jax.tree.leaves(params))
    return {"params": self.ev.scale * size, "calls": float(self.calls)}


def test_a_new_evaluator_type_is_one_registry_line(data_dir, tmp_path, monkeypatch):
  """Its keys, defaults and checks come from its class; a run builds it once (every_steps=0:
  never) and calls it with the current params at every evaluation."""
  monkeypatch.setitem(evaluators.EVALUATORS, "param_count", _ParamCount)
  monkeypatch.setattr(_ParamCount, "built", [])
  with pytest.raises(config_lib.ConfigError, match=r"'evals.p.scal'.*Did you mean 'scale'"):
    tiny_config(data_dir, evals={"p": dict(type="param_count", scal=2.0)})
  with pytest.raises(config_lib.ConfigError, match=r"evals.p.scale must be > 0, got 0.0"):
    tiny_config(data_dir, evals={"p": dict(type="param_count", scale=0.0)})
  with pytest.raises(config_lib.ConfigError, match=r"evals.p.type is 'param_cout'.*param_count"):
    tiny_config(data_dir, evals={"p": dict(type="param_cout")})
  config = tiny_config(data_dir, total_steps=2, evals={
      "p": dict(type="param_count", every_steps=1, scale=2.0),
      "off": dict(type="param_count", every_steps=0)})
  assert (config.evals.off.scale, config.evals.p.split, config.evals.p.batch_size) == (
      1.0, "test", 256)
  workdir = str(tmp_path / "run")
  train.train(config, workdir)
  assert _ParamCount.built == ["p"]
  rows = [r for r in read_metrics(workdir) if "eval/p/calls" in r]
  assert [(r["step"], r["eval/p/calls"]) for r in rows] == [(1, 1.0), (2, 2.0)]
  size = sum(x.size for x in jax.tree.leaves(final_params(workdir, 2)))
  assert rows[-1]["eval/p/params"] == 2.0 * size


# ---------------------------------------------------------------------------------------
# Zero-shot ImageNet as the paper configs run it: the shipped CLIP class names and 80 templates
# on a tiny fake TFDS imagenet2012 whose images carry real label ids.

from big_mm.evaluators import imagenet, prompts  # noqa: E402

# Real ImageNet ids, and the class name the fake models "see" in image k / in a prompt. 744 is
# the second "missile" (657 is the first): its prompts equal 657's, so it is never predicted.
IMAGENET_LABELS = (0, 1, 207, 409, 999, 744)
SEEN = ("tench", "goldfish", "Golden Retriever", "analog clock", "toilet paper", "missile")


def build_fake_imagenet(data_dir) -> None:
  """imagenet2012 5.1.0's features (image, label, file_name) and a 6-image `validation` split
  (image k: grey level 40 k); read through TFDS's catalog builder, as a prepared copy is."""
  import io  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from etils import epath  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def jpeg(k):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()

  with tfds.core.registered.skip_registration():
    class Imagenet2012(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("5.1.0")

      @tfds.core.utils.classproperty
      @classmethod
      def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(encoding_format="jpeg"),
            "label": tfds.features.ClassLabel(num_classes=1000),
            "file_name": tfds.features.Text(),
        }))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"validation": self._generate_examples()}

      def _generate_examples(self):
        for k, label in enumerate(IMAGENET_LABELS):
          yield k, {"image": jpeg(k), "label": label, "file_name": f"val_{k}.JPEG"}

  Imagenet2012(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
      download_config=tfds.download.DownloadConfig(try_download_gcs=False))


class _SeenNameTokenizer:
  """Records the prompts; a prompt's 'token' is 1 + the index in SEEN of the name it holds
  (len(SEEN) + 1: none of them)."""

  def __init__(self):
    self.prompts = []

  def encode(self, texts, length):
    self.prompts += texts
    seen = [next((i for i, name in enumerate(SEEN) if name in t), len(SEEN)) for t in texts]
    return np.pad(np.array(seen, np.int32)[:, None] + 1, ((0, 0), (0, length - 1)))


class _SeenNameObjective:
  """Image k (grey 40 k) and prompts naming SEEN[k] embed to one-hot(k); other prompts to the
  last axis."""

  def embed_images(self, params, images):
    del params
    k = jnp.round((images[:, 0, 0, 0] + 1) * 127.5 / 40).astype(jnp.int32)
    return jax.nn.one_hot(k, len(SEEN) + 1)

  def embed_texts(self, params, texts):
    del params
    return jax.nn.one_hot(texts[:, 0] - 1, len(SEEN) + 1)


def test_shipped_imagenet_names_and_clip_templates():
  """The lists are open_clip's / big_vision's, in label-id order; spot checks by id."""
  assert len(imagenet.CLASSNAMES) == 1000 and len(set(imagenet.CLASSNAMES)) == 998
  assert [imagenet.CLASSNAMES[i] for i in (0, 207, 409, 657, 744, 836, 837, 999)] == [
      "tench", "Golden Retriever", "analog clock", "missile", "missile", "sunglasses",
      "sunglasses", "toilet paper"]
  templates = imagenet.CLIP_TEMPLATES
  assert len(templates) == len(set(templates)) == 80
  assert all(t.count("{}") == 1 for t in templates)
  assert (templates[0], templates[-1]) == ("a bad photo of a {}.", "a tattoo of the {}.")
  assert set(imagenet.CLIP_TEMPLATES_7) < set(templates)
  assert prompts.CLASSNAMES["imagenet2012"] is imagenet.CLASSNAMES
  assert prompts.TEMPLATES["clip80"] is templates


def test_paper_imagenet_zeroshot_on_a_fake_imagenet2012(tmp_path):
  """configs/siglip_b16.py's ImageNet evaluator, unchanged but for data_dir: 1000 classes x
  80 prompts from the shipped lists, the accuracy over the images' real label ids."""
  build_fake_imagenet(tmp_path)
  ev = dict(config_lib.load_file("configs/siglip_b16.py").evals.zeroshot_imagenet)
  assert (ev["data"], ev["split"], ev["classnames"], ev["templates"]) == (
      "imagenet2012", "validation", "imagenet2012", "clip80")
  config = tiny_config(str(tmp_path), evals={"imagenet": ev})
  tokenizer = _SeenNameTokenizer()
  out = _run("imagenet", config.evals.imagenet, config, sharding.make_mesh(config.mesh),
             _SeenNameObjective(), tokenizer)
  # Every class's 80 prompts, class by class in label-id order.
  assert len(tokenizer.prompts) == 80_000
  assert tokenizer.prompts[:2] == ["a bad photo of a tench.", "a photo of many tench."]
  assert tokenizer.prompts[207 * 80 + 39] == "a photo of a Golden Retriever."
  assert tokenizer.prompts[-1] == "a tattoo of the toilet paper."
  # 5 of the 6 right: the image labelled 744 is predicted 657 (the first "missile").
  assert out == {"eval/imagenet/accuracy": pytest.approx(5 / 6),
                 "eval/imagenet/balanced_accuracy": pytest.approx(5 / 6),
                 "eval/imagenet/num_examples": 6.0}


def test_zeroshot_dataset_is_checked_when_the_evaluator_is_built(tmp_path, data_dir):
  """Missing imagenet2012: the run stops at start-up saying how to prepare it; the digits'
  10 labels with the 1000 ImageNet names: the counts disagree."""
  ev = dict(type="zeroshot", data="imagenet2012", split="validation",
            classnames="imagenet2012", templates="clip7")
  config = tiny_config(str(tmp_path), evals={"imagenet": ev})
  mesh = sharding.make_mesh(config.mesh)
  with pytest.raises(FileNotFoundError, match=r"evals.imagenet: TFDS dataset 'imagenet2012' not "
                     r"found.*ILSVRC2012_img_val.tar.*evals.imagenet.every_steps=0"):
    _run("imagenet", config.evals.imagenet, config, mesh, _SeenNameObjective(),
         _SeenNameTokenizer())
  config = tiny_config(data_dir, evals={"d": dict(ev, data=None, split="test")})
  with pytest.raises(config_lib.ConfigError, match=r"evals.d: 'digits_captions' has 10 classes "
                     r"but classnames has 1000 names"):
    _run("d", config.evals.d, config, mesh, _SeenNameObjective(), _SeenNameTokenizer())


@pytest.mark.parametrize("change,error", [
    (dict(classnames="imagenet"), r"evals.z.classnames='imagenet' names no list big_mm ships; "
                                  r"shipped: \['imagenet2012'\]. Did you mean 'imagenet2012'"),
    (dict(templates="clip_80"), r"evals.z.templates='clip_80'.*Did you mean 'clip80'"),
    (dict(classnames=()), r"evals.z.classnames must be the class names, one per label id"),
    (dict(templates=("a photo of a cat",)), r"entry 'a photo of a cat': each template must "
                                            r"hold exactly one \"\{\}\""),
    (dict(templates=("a {} of {x}",)), r"entry 'a \{\} of \{x\}'"),
])
@pytest.mark.parametrize("ev_type", ["zeroshot", "scoring"])
def test_class_names_and_templates_are_checked_when_the_config_loads(data_dir, ev_type, change,
                                                                     error):
  ev = {**dict(type=ev_type, split="test", classnames=WORDS, templates=("{}",)), **change}
  if ev_type == "scoring" and not ev["classnames"]:
    error = r"evals.z \(scoring\) needs classnames"
  with pytest.raises(config_lib.ConfigError, match=error):
    tiny_config(data_dir, evals={"z": ev})


# ---------------------------------------------------------------------------------------
# Matryoshka objectives: zero-shot, retrieval and few-shot at each prefix dim (`...@d<k>`).


class _ProjectionObjective:
  """Fixed random linear 'towers' into 8 dims: an image's pixels, a caption's mean token
  vector; normalised. prefix=k: the re-normalised first k dims (what MRL evaluates at k);
  matryoshka_dims: what a Matryoshka contrastive objective declares."""

  def __init__(self, matryoshka_dims=(), prefix=8):
    rng = np.random.default_rng(0)
    self.w_img = jnp.asarray(rng.normal(size=(32 * 32 * 3, 8)), jnp.float32)
    self.w_txt = jnp.asarray(rng.normal(size=(128, 8)), jnp.float32)
    self.matryoshka_dims, self.prefix = matryoshka_dims, prefix

  def _out(self, z):
    z = z[:, :self.prefix]
    return z / jnp.sqrt(jnp.maximum(jnp.sum(z * z, axis=-1, keepdims=True), 1e-12))

  def embed_images(self, params, images):
    return self._out(images.reshape(len(images), -1) @ self.w_img)

  def embed_texts(self, params, texts):
    return self._out(jax.nn.one_hot(texts, 128).sum(1) @ self.w_txt)


def test_matryoshka_metrics_at_each_prefix_dim(data_dir):
  """With objective.matryoshka_dims=(2, 4, 8) of an 8-d embedding, every zero-shot, retrieval
  and few-shot metric is also reported at 2 and 4 dims (`@d2`, `@d4`), equal to that metric of
  the embedding's re-normalised prefix; the full-dim names and values are unchanged."""
  evals = {"zs": dict(configs_common.digits_zeroshot_eval(every_steps=None), batch_size=128),
           "r": dict(type="retrieval", split="test", pp_image=EVAL_PP, ks=(1, 5)),
           "fs": dict(type="fewshot", split="test", train_split="train[:300]", shots=(2, 10),
                      repeats=1, pp_image=EVAL_PP)}
  config = tiny_config(data_dir, **{"input.text_len": 16, "evals": evals})
  mesh, tokenizer = sharding.make_mesh(config.mesh), Tokenizer(TOKENIZER)

  def run(objective):
    out = {}
    for name in evals:
      out.update(_run(name, config.evals[name], config, mesh, objective, tokenizer))
    return out

  mrl = run(_ProjectionObjective(matryoshka_dims=(2, 4, 8)))
  full = run(_ProjectionObjective())
  assert {k: v for k, v in mrl.items() if "@d" not in k} == full
  for dim in (2, 4):
    prefix = run(_ProjectionObjective(prefix=dim))
    assert {k[:-len(f"@d{dim}")]: v for k, v in mrl.items() if k.endswith(f"@d{dim}")} == {
        k: v for k, v in prefix.items() if "num_" not in k}
  assert sorted(k for k in mrl if k.startswith("eval/zs/")) == [
      "eval/zs/accuracy", "eval/zs/accuracy@d2", "eval/zs/accuracy@d4",
      "eval/zs/balanced_accuracy", "eval/zs/balanced_accuracy@d2",
      "eval/zs/balanced_accuracy@d4", "eval/zs/num_examples"]
  assert {"eval/r/img2txt/class_R@1@d2", "eval/fs/10shot_accuracy@d4"} < set(mrl)
  # The prefixes' embeddings really differ (so the comparison could fail).
  assert len({mrl[f"eval/fs/10shot_accuracy{s}"] for s in ("", "@d2", "@d4")}) == 3
