"""data/digits_multilingual.py: number words and captions in 8 languages, held-out prompts, and
the TFDS splits of a small build."""
import glob
import io
import os
import unicodedata

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from data import digits_captions, digits_multilingual as dm

MAX_IMAGES = 6


def test_number_words_come_from_num2words_in_each_script():
  assert dm.words("en") == digits_captions.WORDS
  assert dm.words("de")[7] == "sieben" and dm.words("ru")[7] == "семь"
  assert (dm.words("ja")[7], dm.words("ko")[7], dm.words("ar")[7]) == ("七", "칠", "سبعة")
  assert len({dm.words(lang) for lang in dm.LANGUAGES}) == len(dm.LANGUAGES) == 8
  scripts = {unicodedata.name(c).split()[0] for lang in dm.LANGUAGES for w in dm.words(lang)
             for c in w if c.isalpha()}
  assert {"LATIN", "CYRILLIC", "ARABIC", "CJK", "HANGUL"} <= scripts
  with pytest.raises(ValueError, match="language 'zh'"):
    dm.words("zh")


def test_captions_use_training_templates_and_never_the_zero_shot_prompts():
  labels = digits_captions.load_digits()[1]
  for lang in dm.LANGUAGES:
    prompts = {t.format(w) for t in dm.prompts(lang) for w in dm.words(lang)}
    captions = [dm.caption(int(labels[i]), i, lang) for i in range(200)]
    assert not prompts & set(captions), lang
    matches = [[t for t in dm.CAPTION_TEMPLATES[lang]
                if c == t.format(w=dm.words(lang)[labels[i]], n=labels[i])]
               for i, c in enumerate(captions)]
    assert all(matches), lang  # Every caption from a template, every template used.
    assert {t for m in matches for t in m} == set(dm.CAPTION_TEMPLATES[lang]), lang
    assert all(t.count("{}") == 1 for t in dm.prompts(lang))
  assert dm.caption(3, 11, "fr") == dm.caption(3, 11, "fr")  # a pure function


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("digits_ml"))
  dm.build(d, max_images=MAX_IMAGES)
  return d


def test_small_build_splits_features_and_bytes(built, tmp_path):
  builder = tfds.builder("digits_multilingual", data_dir=built)
  assert {s: i.num_examples for s, i in builder.info.splits.items()} == {
      "train": MAX_IMAGES * 8, "test": MAX_IMAGES}
  images, labels = digits_captions.load_digits()
  train = tfds.data_source("digits_multilingual", data_dir=built, split="train")
  seen = set()
  for r in (train[i] for i in range(len(train))):
    i, lang = int(r["id"]), r["language"].decode()
    seen.add((i, lang))
    assert r["label"] == labels[i] and r["text"].decode() == dm.caption(r["label"], i, lang)
    assert all(r[f"text_{other}"] == (r["text"] if other == lang else b"")
               for other in dm.LANGUAGES)
    png = Image.open(io.BytesIO(digits_captions.to_png(images[i])))
    np.testing.assert_array_equal(r["image"], np.asarray(png))
  assert len(seen) == MAX_IMAGES * 8
  test = tfds.data_source("digits_multilingual", data_dir=built, split="test")
  test_ids = digits_captions.split_ids(labels)[1][:MAX_IMAGES]
  assert sorted(int(test[k]["id"]) for k in range(len(test))) == sorted(test_ids.tolist())
  for r in (test[k] for k in range(len(test))):
    assert (r["text"], r["language"]) == (r["text_en"], b"en")
    assert {lang: r[f"text_{lang}"].decode() for lang in dm.LANGUAGES} == {
        lang: dm.caption(r["label"], int(r["id"]), lang) for lang in dm.LANGUAGES}
    assert r["image"].shape == (32, 32, 3)
  dm.build(str(tmp_path), max_images=MAX_IMAGES)
  files = sorted(glob.glob(os.path.join(built, "digits_multilingual", "*", "*.array_record*")))
  assert len(files) == 2
  for path in files:
    with open(path, "rb") as f, open(os.path.join(str(tmp_path), os.path.relpath(path, built)),
                                     "rb") as g:
      assert f.read() == g.read(), path
