"""data/emoji_multilingual.py: the emoji split, their names in 14 languages, the Noto and OpenMoji
renders, the TFDS splits of a small build and the per-language evaluators reading them."""
import glob
import io
import os
import unicodedata

import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from big_mm import evaluators, sharding
from big_mm.input.tokenizer import Tokenizer
from conftest import TOKENIZER, tiny_config
from data import emoji_multilingual as em

pytestmark = pytest.mark.skipif(
    not os.path.exists(em.NOTO_FONT),
    reason=f"{em.NOTO_FONT} is missing: install the Debian package {em.NOTO_PACKAGE} "
           f"(.ci/run installs it).")

MAX_EMOJI = 10  # 8 train emoji (x 14 languages), 2 held out


def test_split_is_seeded_disjoint_and_covers_every_emoji():
  chosen = em.all_emoji()
  train, test = em.split_emoji("train"), em.split_emoji("test")
  # emoji 2.16.0 (pinned in setup.py): 1,377 single-code-point emoji of Emoji <= 15.0.
  assert (len(chosen), len(train), len(test)) == (1377, 1102, 275)
  assert not set(train) & set(test) and set(train) | set(test) == set(chosen)
  assert em.split_emoji("openmoji_test") == test
  assert list(test) == sorted(test, key=lambda e: ord(e[0]))  # label ids in code point order
  small = em.split_emoji("train", MAX_EMOJI) + em.split_emoji("test", MAX_EMOJI)
  assert len(em.split_emoji("test", MAX_EMOJI)) == 2 and len(set(small)) == MAX_EMOJI
  with pytest.raises(ValueError, match=r"split 'validation'.*'openmoji_test'"):
    em.split_emoji("validation")


def test_names_are_cldr_names_in_each_language():
  dog = "\U0001f436"
  assert {lang: em.name(dog, lang) for lang in ("en", "de", "ja", "zh", "ru", "ko")} == {
      "en": "dog face", "de": "hundegesicht", "ja": "イヌの顔", "zh": "狗脸",
      "ru": "морда собаки", "ko": "강아지 얼굴"}
  test = {lang: em.names("test", lang) for lang in em.LANGUAGES}
  assert all(len(n) == 275 for n in test.values())
  for lang in em.LANGUAGES[1:]:  # Really translated: few names equal the English one.
    same = sum(a == b for a, b in zip(test["en"], test[lang]))
    assert same < 0.1 * 275, (lang, same)
  scripts = {"ar": "ARABIC", "fa": "ARABIC", "ja": "KATAKANA", "ko": "HANGUL", "ru": "CYRILLIC",
             "zh": "CJK"}
  for lang, script in scripts.items():
    letters = [unicodedata.name(c, "") for n in test[lang] for c in n if c.isalpha()]
    assert sum(script in letter for letter in letters) > 0.3 * len(letters), lang
  with pytest.raises(ValueError, match="language 'xx'"):
    em.names("test", "xx")


def test_renders_are_deterministic_and_differ_between_styles():
  char = em.split_emoji("test")[0]
  noto, openmoji = em.render(char, "noto"), em.render(char, "openmoji")
  assert noto.size == openmoji.size == (em.IMAGE_SIZE, em.IMAGE_SIZE) and noto.mode == "RGB"
  assert np.array_equal(np.asarray(em.render(char, "noto")), np.asarray(noto))
  a, b = np.asarray(noto, np.float32), np.asarray(openmoji, np.float32)
  assert np.abs(a - b).mean() > 10  # Different art of the same emoji.
  with pytest.raises(ValueError, match=r"noto font .* has no glyph for .* \(U\+E000\)"):
    em.render("\ue000", "noto")


def _records(data_dir, split):
  ds = tfds.data_source("emoji_multilingual", data_dir=data_dir, split=split)
  return sorted((dict(ds[i]) for i in range(len(ds))),
                key=lambda r: (r["label"], r["language"]))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("emoji"))
  em.build(d, max_emoji=MAX_EMOJI)
  return d


def test_small_build_splits_and_features(built):
  builder = tfds.builder("emoji_multilingual", data_dir=built)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": 8 * 14, "test": 2, "openmoji_test": 2, "openmoji_train": 8}
  train = _records(built, "train")
  for r in train:
    lang = r["language"].decode()
    text = r["text"].decode()
    assert text == em.names("train", lang, MAX_EMOJI)[r["label"]]
    assert r["emoji"].decode() == em.split_emoji("train", MAX_EMOJI)[r["label"]]
    assert all(r[f"text_{other}"].decode() == (text if other == lang else "")
               for other in em.LANGUAGES)
    assert r["image"].shape == (em.IMAGE_SIZE, em.IMAGE_SIZE, 3)
  assert sorted({r["language"].decode() for r in train}) == sorted(em.LANGUAGES)
  seen = _records(built, "openmoji_train")  # the train emoji, in the other style
  assert [r["emoji"].decode() for r in seen] == list(em.split_emoji("train", MAX_EMOJI))
  assert [r["text_ja"].decode() for r in seen] == em.names("train", "ja", MAX_EMOJI)
  noto, openmoji = _records(built, "test"), _records(built, "openmoji_test")
  for a, b in zip(noto, openmoji):
    assert a["label"] == b["label"] and a["emoji"] == b["emoji"]
    assert (a["text"], a["language"]) == (a["text_en"], b"en")
    for lang in em.LANGUAGES:
      assert a[f"text_{lang}"] == b[f"text_{lang}"] == em.names(
          "test", lang, MAX_EMOJI)[a["label"]].encode()
    assert np.abs(a["image"].astype(int) - b["image"].astype(int)).mean() > 10
    expected = np.asarray(Image.open(io.BytesIO(em.digits_captions.png_bytes(
        em.render(a["emoji"].decode(), "noto")))))
    np.testing.assert_array_equal(a["image"], expected)


def test_two_builds_write_the_same_bytes(built, tmp_path):
  em.build(str(tmp_path), max_emoji=MAX_EMOJI)
  files = sorted(glob.glob(os.path.join(built, "emoji_multilingual", "*", "*.array_record*")))
  assert len(files) == len(em.SPLITS)
  for path in files:
    again = os.path.join(str(tmp_path), os.path.relpath(path, built))
    with open(path, "rb") as f, open(again, "rb") as g:
      assert f.read() == g.read(), path


class _CrudeObjective:
  """Images: their mean colour; texts: their first two tokens, as 3 numbers."""

  def embed_images(self, params, images):
    del params
    return images.mean(axis=(1, 2))

  def embed_texts(self, params, texts):
    del params
    return jnp.stack([texts[:, 0], texts[:, 1], jnp.ones(len(texts))], -1).astype(jnp.float32)


def test_per_language_evaluators_read_the_built_splits(built):
  """zeroshot with names(split, lang) and retrieval over text_<lang> on openmoji_test."""
  langs = ("en", "ja", "ar")
  common = dict(data="emoji_multilingual", split="openmoji_test", languages=langs,
                pp_image="decode|value_range(-1,1)", batch_size=8)
  config = tiny_config(built, evals={
      "z": dict(common, type="zeroshot", templates=("{}",),
                classnames={lang: em.names("test", lang, MAX_EMOJI) for lang in em.LANGUAGES}),
      "r": dict(common, type="retrieval", ks=(1,))})
  context = evaluators.EvalContext(config, sharding.make_mesh(config.mesh), _CrudeObjective(),
                                   Tokenizer(TOKENIZER))
  out = {}
  for name in ("z", "r"):
    out.update(evaluators.build(name, config.evals[name], context)({}))
  keys = {f"eval/z/{lang}/accuracy" for lang in langs + ("mean",)} | {
      f"eval/r/{lang}/img2txt/R@1" for lang in langs + ("mean",)} | {
      "eval/r/ja->ar/R@1", "eval/r/cross_lingual/R@1"}
  assert keys <= set(out) and all(0 <= out[k] <= 1 for k in keys)
  assert out["eval/z/num_examples"] == out["eval/r/num_examples"] == 2
  assert out["eval/r/en/num_captions"] == out["eval/r/ja/num_captions"] == 2
