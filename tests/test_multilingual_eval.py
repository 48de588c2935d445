"""Per-language zero-shot and retrieval, and cross-lingual text->text retrieval, on a 4-image
TFDS dataset with captions in two languages (text_en, text_de) and embeddings set by hand."""
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from big_mm import config as config_lib, evaluators, sharding
from big_mm.evaluators import retrieval
from big_mm.input.tokenizer import Tokenizer
from conftest import TOKENIZER, tiny_config

PP = "decode|resize(8)|value_range(-1,1)"
LABELS = (0, 1, 1, 0)
CAPTIONS = {"en": ("zero", "one", "two", "three"), "de": ("null", "eins", "zwei", "drei")}
# Image k embeds to one-hot(k); caption k of a language to its row here.
CAPTION_VECTORS = {
    # img2txt: all hit at 1 (image 2: caption 2 at 1.0 beats 3 at .9); txt2img: caption 3
    # misses (image 2 .9 > image 3 .5) -> 3/4.
    "en": [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, .9, .5]],
    # img2txt: image 1 ranks caption 0 (1.2) over its own (1) -> 3/4; txt2img: caption 0
    # ranks image 1 (1.2) over image 0 (.5) -> 3/4.
    "de": [[.5, 1.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]],
}
CLASSNAMES = {"en": ("cat", "dog"), "de": ("katze", "hund")}
# Zero-shot classes: en right on every image; de's "hund" also wins image 3 (label 0).
CLASS_VECTORS = {"cat": [1, 0, 0, 1], "dog": [0, 1, 1, 0], "katze": [1, 0, 0, 0],
                 "hund": [0, 1, 1, 1]}


def build_tiny_multilingual(data_dir) -> None:
  """A `tiny_multilingual` TFDS dataset: split `test`, image k grey 40 k, label, text (= text_en),
  text_en, text_de (the layout of data/emoji_multilingual.py's test splits)."""

  def png(k):
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), 40 * k, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()

  with tfds.core.registered.skip_registration():
    class TinyMultilingual(tfds.core.GeneratorBasedBuilder):  # pylint: disable=unused-variable
      VERSION = tfds.core.Version("1.0.0")

      @tfds.core.utils.classproperty
      @classmethod
      def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(8, 8, 3), encoding_format="png"),
            "label": np.int64, "text": tfds.features.Text(),
            **{f"text_{lang}": tfds.features.Text() for lang in CAPTIONS}}))

      def _split_generators(self, dl_manager):
        del dl_manager
        return {"test": self._generate_examples()}

      def _generate_examples(self):
        for k, label in enumerate(LABELS):
          yield k, {"image": png(k), "label": label, "text": CAPTIONS["en"][k],
                    **{f"text_{lang}": CAPTIONS[lang][k] for lang in CAPTIONS}}

    TinyMultilingual(data_dir=str(data_dir), file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))


class _PromptTokenizer:
  """The zero-shot prompts' tokenizer: a prompt's first token is 1000 + the index of the class
  name it holds in NAMES (above the caption tokenizer's ids); records the prompts."""
  NAMES = tuple(CLASS_VECTORS)

  def __init__(self):
    self.prompts = []

  def encode(self, texts, length):
    self.prompts += texts
    ids = [next(i for i, n in enumerate(self.NAMES) if n in t.split()) + 1000 for t in texts]
    return np.pad(np.array(ids, np.int32)[:, None], ((0, 0), (0, length - 1)))


class _TableObjective:
  """Images: one-hot(k) of image k. Texts: a caption's row of CAPTION_VECTORS (found by its
  tokens), a prompt's class vector (found by its first token, a _PromptTokenizer id)."""

  def __init__(self, tokenizer, text_len):
    captions = [c for lang in CAPTIONS for c in CAPTIONS[lang]]
    self.tokens = jnp.asarray(tokenizer.encode(captions, text_len))
    assert len({tuple(t) for t in np.asarray(self.tokens)}) == len(captions)
    self.vectors = jnp.asarray([v for lang in CAPTIONS for v in CAPTION_VECTORS[lang]],
                               jnp.float32)
    self.classes = jnp.asarray([CLASS_VECTORS[n] for n in _PromptTokenizer.NAMES], jnp.float32)

  def embed_images(self, params, images):
    del params
    k = jnp.round((images[:, 0, 0, 0] + 1) * 127.5 / 40).astype(jnp.int32)
    return jax.nn.one_hot(k, 4)

  def embed_texts(self, params, texts):
    del params
    match = jnp.all(texts[:, None, :] == self.tokens[None], axis=-1)
    prompt = self.classes[jnp.clip(texts[:, 0] - 1000, 0, len(self.classes) - 1)]
    return jnp.where(jnp.any(match, axis=-1)[:, None], self.vectors[jnp.argmax(match, -1)],
                     prompt)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  d = tmp_path_factory.mktemp("tiny_multilingual")
  build_tiny_multilingual(d)
  return str(d)


def _run(tiny_dir, ev, prompt_tokenizer=None):
  ev = dict(ev, data="tiny_multilingual", split="test", pp_image=PP, batch_size=8)
  config = tiny_config(tiny_dir, **{"evals": {"m": ev}})
  objective = _TableObjective(Tokenizer(TOKENIZER), config.input.text_len)
  context = evaluators.EvalContext(config, sharding.make_mesh(config.mesh), objective,
                                   prompt_tokenizer or Tokenizer(TOKENIZER))
  return evaluators.build("m", config.evals.m, context)({})


def test_zeroshot_per_language_and_mean(tiny_dir):
  tokenizer = _PromptTokenizer()
  out = _run(tiny_dir, dict(type="zeroshot", languages=("en", "de"), classnames=CLASSNAMES,
                            templates={"en": ("a {}", "the {}"), "de": ("ein {}",)}),
             tokenizer)
  assert out == pytest.approx({
      "eval/m/num_examples": 4.0,
      "eval/m/en/accuracy": 1.0, "eval/m/en/balanced_accuracy": 1.0,
      # Image 3 (label 0) goes to "hund": class 0 1/2 right, class 1 2/2.
      "eval/m/de/accuracy": 3 / 4, "eval/m/de/balanced_accuracy": 3 / 4,
      "eval/m/mean/accuracy": 7 / 8, "eval/m/mean/balanced_accuracy": 7 / 8})
  # Each language's names in its own templates, class by class.
  assert tokenizer.prompts == ["a cat", "the cat", "a dog", "the dog", "ein katze", "ein hund"]
  # One language: its plain metrics under its name; one template set shared by all languages.
  out = _run(tiny_dir, dict(type="zeroshot", languages=("de",), classnames=CLASSNAMES,
                            templates=("{}",)), _PromptTokenizer())
  assert out["eval/m/de/accuracy"] == out["eval/m/mean/accuracy"] == 3 / 4


def test_retrieval_per_language_mean_and_cross_lingual(tiny_dir):
  out = _run(tiny_dir, dict(type="retrieval", languages=("en", "de"), ks=(1, 2)))
  expected = {
      "en/img2txt/R@1": 1.0, "en/txt2img/R@1": 3 / 4, "de/img2txt/R@1": 3 / 4,
      "de/txt2img/R@1": 3 / 4, "mean/img2txt/R@1": 7 / 8, "mean/txt2img/R@1": 3 / 4,
      # Labels (0, 1, 1, 0): en caption 3 -> image 2 (label 1 != 0) misses class_R@1 too; de
      # image 1 -> caption 0 (label 0 != 1) and caption 0 -> image 1 miss.
      "en/img2txt/class_R@1": 1.0, "en/txt2img/class_R@1": 3 / 4,
      "de/img2txt/class_R@1": 3 / 4, "de/txt2img/class_R@1": 3 / 4,
      # en->de: e0.d = (.5, 0, 0, 0) hit; e1.d = (1.2, 1, 0, 0) d0 first; e2 hit;
      # e3.d = (0, 0, .9, .5) d2 first -> 2/4, and all within 2.
      "en->de/R@1": 1 / 2, "en->de/R@2": 1.0,
      # de->en: d0.e = (.5, 1.2, 0, 0) e1 first; d1, d2 (e2 1 > e3 .9), d3 hit -> 3/4.
      "de->en/R@1": 3 / 4, "de->en/R@2": 1.0,
      "cross_lingual/R@1": 5 / 8, "cross_lingual/R@2": 1.0,
      "en/num_captions": 4.0, "de/num_captions": 4.0, "mean/num_captions": 4.0,
      "num_examples": 4.0}
  assert {k: out[f"eval/m/{k}"] for k in expected} == pytest.approx(expected)
  assert "eval/m/img2txt/R@1" not in out  # Per language only, no language-free caption set.
  # cross_lingual=False: none of the text->text metrics; an explicit "{lang}" column.
  out = _run(tiny_dir, dict(type="retrieval", languages=("de", "en"), ks=(1,),
                            cross_lingual=False, text_column="text_{lang}"))
  assert not [k for k in out if "->" in k or "cross_lingual" in k]
  assert out["eval/m/de/img2txt/R@1"] == 3 / 4


def test_cross_lingual_recalls_by_hand():
  """3 images; language b has no caption of image 2 (its a-caption queries nothing) and two of
  image 0; ties count as fractions of a hit (retrieval.expected_hits)."""
  a = (np.array([[1., 0], [0, 1], [1, 1]]), np.array([0, 1, 2]))
  b = (np.array([[1., 0], [.8, .2], [1, 0]]), np.array([0, 0, 1]))
  out = retrieval.cross_lingual_recalls({"a": a, "b": b}, (1,))
  # a->b: a0 = (1, 0) scores b (1, .8, 1): own b0 ties with b2 (image 1) -> 1/2; a1 = (0, 1)
  # scores (0, .2, 0): b1 (image 0) first -> 0. a2 has no b caption: left out.
  # b->a: b0 (1, 0) scores a (1, 0, 1): a0 ties a2 -> 1/2; b1 (.8, .2) scores (.8, .2, 1) ->
  # a2 first -> 0; b2 (1, 0) scores (1, 0, 1): own a1 last -> 0.
  assert out == pytest.approx({"a->b/R@1": 1 / 4, "b->a/R@1": 1 / 6,
                               "cross_lingual/R@1": (1 / 4 + 1 / 6) / 2})


@pytest.mark.parametrize("ev,error", [
    (dict(type="zeroshot", classnames=CLASSNAMES), r"evals.m.classnames is given per language "
                                                   r"\(\['de', 'en'\]\); name the languages"),
    (dict(type="zeroshot", languages=("en", "ja"), classnames=CLASSNAMES),
     r"evals.m.classnames has no entry for language\(s\) \['ja'\]"),
    (dict(type="zeroshot", languages=("en", "de"), classnames={"en": ("a",), "de": ("b", "c")}),
     r"counts differ: \{'en': 1, 'de': 2\}"),
    (dict(type="zeroshot", languages=("en",), classnames=CLASSNAMES, templates={"en": ("x",)}),
     r"evals.m.templates\['en'\] entry 'x': each template must hold exactly one"),
    (dict(type="zeroshot", languages=("en", "mean"), classnames=("a", "b")),
     r"none may be 'mean'"),
    (dict(type="retrieval", languages="en"), r"evals.m.languages must be a tuple of language"),
    (dict(type="retrieval", languages=("en", "de"), text_column="captions"),
     r"evals.m.text_column='captions': with languages, a text column names each language's "
     r"captions with '\{lang\}'"),
    (dict(type="retrieval", text_column="text_{lang}"), r"without languages it must not hold"),
    (dict(type="retrieval", languages=("en",), cross_lingual="yes"),
     r"cross_lingual must be True or False"),
])
def test_multilingual_keys_are_checked_when_the_config_loads(tiny_dir, ev, error):
  with pytest.raises(config_lib.ConfigError, match=error):
    tiny_config(tiny_dir, evals={"m": dict(ev, data="tiny_multilingual")})
