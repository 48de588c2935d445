"""Evaluators between any two modalities (retrieval modalities=(a, b), zeroshot modality=m)
and higher-order retrieval, over fake binding-mode eval batches whose answers are known."""
import jax.numpy as jnp
import numpy as np
import pytest

from big_mm import config as config_lib, evaluators, sharding
from big_mm.input import pipeline
from conftest import tiny_config

D = 8  # Every fake modality's input is already its embedding: a float vector [D].
AUDIO_PP = "vector(8)"


def e(i):
  return np.eye(D, dtype=np.float32)[i]


class _FakeBatches:
  """What make_eval_batches gives in binding mode, from records {modality: vector, "label":
  int} (None: a bad record, mask 0): the modalities input_cfg.modalities lists, each with its
  `<m>_present` flag, in padded batches of batch_size."""

  def __init__(self, records, input_cfg, batch_size):
    self.records, self.names, self.batch_size = records, input_cfg.modalities, batch_size
    self.num_examples = len(records)

  def _row(self, record):
    record = record or {}  # With none of the modalities: a bad record (missing_field).
    row = {"mask": np.int32(any(m in record for m in self.names)),
           "label": np.int32(record.get("label", 0))}
    for m in self.names:
      row[m] = record.get(m, np.zeros(D, np.float32))
      row[m + "_present"] = np.int32(m in record)
    return row

  def __iter__(self):
    for start in range(0, len(self.records), self.batch_size):
      rows = [self._row(r) for r in self.records[start:start + self.batch_size]]
      rows += [dict(self._row(None))] * (self.batch_size - len(rows))
      yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}


@pytest.fixture
def fake_split(monkeypatch):
  """fake_split(records) makes the eval pipeline read them; returns the input configs it was
  asked for."""
  asked = []

  def install(records):
    def make_eval_batches(input_cfg, split, batch_size, batch_sharding, **kwargs):
      assert not kwargs and batch_sharding is not None
      asked.append(input_cfg)
      return _FakeBatches(records, input_cfg, batch_size)
    monkeypatch.setattr(pipeline, "make_eval_batches", make_eval_batches)
    return asked
  return install


class _Towers:
  def __init__(self, names):
    self.towers = {m: {} for m in names}


class _FakeObjective:
  """embed = the input (collapse: one vector for all); text prompts embed to one-hot(first
  token); higher_order_scores = the sum of the query modalities' dot products (the binding
  objective's pairwise rule)."""

  def __init__(self, towers=("image", "text", "audio"), collapse=False):
    self.model, self.collapse = _Towers(towers), collapse

  def embed(self, params, modality, x):
    del params, modality
    return jnp.ones_like(x) / jnp.sqrt(D) if self.collapse else x

  def embed_texts(self, params, texts):
    del params
    return jnp.eye(D)[texts[:, 0]]

  def higher_order_scores(self, query, target, candidates):
    del target
    return sum(q @ candidates.T for q in query.values())


class _EmbedOnly:
  def embed(self, params, modality, x):
    return x


class _DigitTokenizer:
  """A prompt's first token: 1 + the index of its class word."""

  def encode(self, texts, length):
    ids = [1 + WORDS.index(t.split()[-1]) for t in texts]
    return np.array([[i] + [0] * (length - 1) for i in ids], np.int32)


WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def _run(data_dir, ev, objective, tokenizer=None):
  config = tiny_config(data_dir, evals={"e": dict(ev, split="test", batch_size=8)})
  context = evaluators.EvalContext(config, sharding.make_mesh(config.mesh), objective,
                                   tokenizer)
  return evaluators.build("e", config.evals.e, context)({})


# Audio <-> image: 4 records with both (the rows), then ones without both, a bad record, and a
# 9th record to make a second batch of 8. Audio of row 2 points at row 3's image.
PAIRED = [
    {"audio": e(0), "image": e(0), "label": 0},
    {"audio": e(2), "label": 1},                 # no image
    {"audio": e(1), "image": e(1), "label": 1},
    None,                                        # bad record
    {"audio": e(3), "image": e(2), "label": 1},
    {"image": e(3), "label": 0},                 # no audio
    {"text": e(5)},                              # neither
    {"image": e(4), "label": 1},                 # no audio
    {"audio": e(3), "image": e(3), "label": 0},  # second batch
]


def test_retrieval_between_audio_and_image(data_dir, fake_split):
  asked = fake_split(PAIRED)
  out = _run(data_dir, dict(type="retrieval", modalities=("audio", "image"), ks=(1, 2),
                            pp_modalities={"audio": AUDIO_PP}), _FakeObjective())
  assert [tuple(c.modalities) for c in asked] == [("audio", "image")]
  assert dict(asked[0].pp_modalities) == {"audio": AUDIO_PP}
  # audio->image: rows 0, 1, 3 first; row 2's own image ties at 0 with images 0 and 1, behind
  # image 3: a third of a hit at k=2.
  # image->audio: rows 0, 1 first; row 2 (e2) ties with all 4 audios; row 3 ties with row 2's
  # audio at the top.
  assert out == pytest.approx({
      "eval/e/audio2image/R@1": 3 / 4, "eval/e/audio2image/R@2": (3 + 1 / 3) / 4,
      "eval/e/image2audio/R@1": (2 + 1 / 4 + 1 / 2) / 4, "eval/e/image2audio/R@2": 3.5 / 4,
      # Labels (0, 1, 1, 0): row 2's audio finds image 3 (label 0, not 1) first; images 1, 2
      # (label 1) tie with image 0 behind it. Image 2 ties with every audio (half label 1);
      # image 3's top audios are rows 2 and 3, labels 1 and 0.
      "eval/e/audio2image/class_R@1": 3 / 4, "eval/e/audio2image/class_R@2": (3 + 2 / 3) / 4,
      "eval/e/image2audio/class_R@1": (2 + 1 / 2 + 1 / 2) / 4,
      "eval/e/image2audio/class_R@2": (3 + 5 / 6) / 4,
      "eval/e/num_examples": 4.0, "eval/e/num_skipped": 5.0})


def test_collapsed_pair_scores_chance(data_dir, fake_split):
  """Also at a Matryoshka objective's prefix dim (its names suffixed @d4)."""
  fake_split(PAIRED)
  objective = _FakeObjective(collapse=True)
  objective.matryoshka_dims = (4, 8)
  out = _run(data_dir, dict(type="retrieval", modalities=("image", "audio"), ks=(1, 3),
                            pp_modalities={"audio": AUDIO_PP}), objective)
  assert len(out) == 2 * 2 * 2 * 2 + 2
  for name in ("image2audio", "audio2image"):
    for suffix in ("", "@d4"):
      assert out[f"eval/e/{name}/R@1{suffix}"] == pytest.approx(1 / 4)
      assert out[f"eval/e/{name}/R@3{suffix}"] == pytest.approx(3 / 4)
      # Two of the four candidates share each query's label.
      assert out[f"eval/e/{name}/class_R@1{suffix}"] == pytest.approx(1 / 2)


def test_zeroshot_audio_against_the_class_prompts(data_dir, fake_split):
  """Spoken digit k embeds to one-hot(k + 1) (its prompt's, right) or, for 2 of the 5, to a
  wrong class's; records without audio are skipped, not counted as wrong."""
  records = [{"audio": e(1), "label": 0}, {"audio": e(2), "label": 1},
             {"audio": e(3), "label": 1},  # wrong: classified 2
             {"image": e(4), "label": 3},  # no audio
             None,
             {"audio": e(3), "label": 2}, {"audio": e(1), "label": 2}]  # right, wrong
  asked = fake_split(records)
  out = _run(data_dir, dict(type="zeroshot", modality="audio", classnames=WORDS,
                            templates=("{}", "the digit {}"),
                            pp_modalities={"audio": AUDIO_PP}),
             _FakeObjective(), _DigitTokenizer())
  assert [tuple(c.modalities) for c in asked] == [("audio",)]
  assert out == pytest.approx({
      "eval/e/accuracy": 3 / 5, "eval/e/balanced_accuracy": (1 + 1 / 2 + 1 / 2) / 3,
      "eval/e/num_examples": 5.0, "eval/e/num_skipped": 2.0})


TRIPLES = [
    {"image": e(0), "text": e(0), "audio": e(0), "label": 0},
    {"image": e(1), "text": e(1), "audio": e(1), "label": 1},
    {"image": e(2), "text": e(2), "label": 2},  # no audio
    {"image": e(2), "text": e(3), "audio": e(2), "label": 0},
    None,
    {"image": e(3), "text": e(2), "audio": e(3), "label": 0},
]


def test_higher_order_retrieval_from_two_modalities(data_dir, fake_split):
  """Query (image, text) -> audio by the sum of the two dot products: rows 0, 1 are perfect;
  rows 2 and 3 (image and text swapped between them) score 1 with both audios 2 and 3."""
  asked = fake_split(TRIPLES)
  out = _run(data_dir, dict(type="higher_order_retrieval", query=("image", "text"),
                            target="audio", ks=(1, 2), pp_modalities={"audio": AUDIO_PP}),
             _FakeObjective())
  assert [tuple(c.modalities) for c in asked] == [("image", "text", "audio")]
  assert out == pytest.approx({
      "eval/e/image+text2audio/R@1": (2 + 1 / 2 + 1 / 2) / 4,
      "eval/e/image+text2audio/R@2": 1.0,
      "eval/e/image+text2audio/class_R@1": 1.0,  # Rows 2 and 3 both have label 0.
      "eval/e/image+text2audio/class_R@2": 1.0,
      "eval/e/num_examples": 4.0, "eval/e/num_skipped": 2.0})
  collapsed = _run(data_dir, dict(type="higher_order_retrieval", query=("image", "text"),
                                  target="audio", ks=(1, 3), pp_modalities={"audio": AUDIO_PP}),
                   _FakeObjective(collapse=True))
  assert (collapsed["eval/e/image+text2audio/R@1"],
          collapsed["eval/e/image+text2audio/R@3"]) == pytest.approx((1 / 4, 3 / 4))
  # Labels (0, 1, 0, 0): 3 of 4 candidates share a label-0 query's label, 1 a label-1 one's.
  assert collapsed["eval/e/image+text2audio/class_R@1"] == pytest.approx((3 * 3 / 4 + 1 / 4) / 4)


@pytest.mark.parametrize("ev,error", [
    (dict(type="retrieval", modalities=("audio",)),
     r"evals.e.modalities must be a tuple of 2 different modalities"),
    (dict(type="retrieval", modalities=("audio", "imgae")),
     r"evals.e.modalities entry='imgae' is not valid.*Did you mean 'image'"),
    (dict(type="retrieval", modalities=("audio", "image"), languages=("en", "ja")),
     r"evals.e.languages is for image-text retrieval"),
    (dict(type="retrieval", modalities=("audio", "image"), pp_modalities="vector(8)"),
     r"evals.e.pp_modalities must be None or \{modality: pp string\}"),
    (dict(type="zeroshot", classnames=WORDS, modality="sound"),
     r"evals.e.modality='sound' is not valid"),
    (dict(type="higher_order_retrieval", query=("image",)),
     r"evals.e.query must be a tuple of at least 2 different modalities"),
    (dict(type="higher_order_retrieval", query=("image", "audio"), target="audio"),
     r"evals.e.query \+ \(target,\) must be a tuple of 3 different modalities"),
    (dict(type="higher_order_retrieval", ks=(0, 1)), r"evals.e.ks entry must be an integer >= 1"),
])
def test_bad_keys_are_refused_when_the_config_loads(data_dir, ev, error):
  with pytest.raises(config_lib.ConfigError, match=error):
    tiny_config(data_dir, evals={"e": dict(ev, split="test")})


@pytest.mark.parametrize("ev,objective,error", [
    (dict(type="retrieval", modalities=("audio", "points")), _FakeObjective(),
     r"evals.e.modalities=\('audio', 'points'\): the model has no tower for \['points'\]"),
    (dict(type="retrieval", modalities=("audio", "image")), _FakeObjective(),
     r"set evals.e.pp_modalities=\{'audio': ...\} \(or input.pp_modalities\['audio'\]\)"),
    (dict(type="zeroshot", classnames=WORDS, modality="audio"), _FakeObjective(("audio",)),
     r"evals.e.modality='audio' \(and 'text' for the class prompts\): the model has no "
     r"tower for \['text'\]"),
    (dict(type="higher_order_retrieval"), _EmbedOnly(),
     r"needs the objective's higher_order_scores\(\); _EmbedOnly has none"),
])
def test_missing_towers_and_pp_strings_are_refused_at_build(data_dir, ev, objective, error):
  config = tiny_config(data_dir, evals={"e": dict(ev, split="test")})
  context = evaluators.EvalContext(config, sharding.make_mesh(config.mesh), objective,
                                   _DigitTokenizer())
  with pytest.raises(config_lib.ConfigError, match=error):
    evaluators.build("e", config.evals.e, context)
