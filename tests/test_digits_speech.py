"""data/digits_speech.py: the espeak-ng voice plan, 16 kHz FLAC, and small builds of
digits_speech and spoken_digits read back through TFDS and big_mm's source reader."""
import glob
import io
import os
import shutil

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from big_mm.input import sources
from data import digits_captions, digits_speech as ds

needs_espeak = pytest.mark.skipif(
    shutil.which(ds.ESPEAK) is None,
    reason=f"{ds.ESPEAK} is missing: install the Debian package {ds.ESPEAK} (.ci/run installs "
           f"it).")
MAX_IMAGES = 3
PER_LABEL = {"train": 1, "test": 1}


def test_to_flac_resamples_and_mixes_to_16khz_mono():
  t = np.arange(44100) / 44100
  tone = 0.5 * np.sin(2 * np.pi * 440 * t)
  x, sr = ds.decode(ds.to_flac(np.stack([tone, tone], axis=1), 44100))
  assert (sr, x.shape, x.dtype) == (16000, (16000,), np.float32)
  spectrum = np.abs(np.fft.rfft(x))
  assert np.argmax(spectrum) == 440  # 1 s at 16 kHz: bin k is k Hz.
  np.testing.assert_allclose(np.max(np.abs(x[100:-100])), 0.5, atol=0.01)


def test_plans_are_seeded_test_clips_never_in_train_and_captions_avoid_prompts():
  train, test = ds.digits_plan("train"), ds.digits_plan("test")
  labels = digits_captions.load_digits()[1]
  ids = digits_captions.split_ids(labels)
  assert [p[0] for p in train] == ids[0].tolist() and [p[0] for p in test] == ids[1].tolist()
  assert ds.digits_plan("test", max_images=MAX_IMAGES) == test[:MAX_IMAGES]
  for plan in ((train, test), (ds.spoken_plan("train"), ds.spoken_plan("test"))):
    assert not {p[2:] for p in plan[0]} & {p[2:] for p in plan[1]}
    for _, label, spoken, voice in plan[0] + plan[1]:
      assert spoken in [t.format(w=ds.LABEL_NAMES[label])
                        for t in (ds.DIGIT_PHRASES if label < 10 else ds.LETTER_PHRASES)]
  voices = [p[3] for p in train]
  assert ({v.name for v in voices}, {v.variant for v in voices}) == (set(ds.VOICES),
                                                                      set(ds.VARIANTS))
  assert ds.spoken_plan("test") == ds.spoken_plan("test")
  assert len(ds.spoken_plan("train")) == 36 * ds.TRAIN_PER_LABEL
  prompts = {t.format(w=w) for t in digits_captions.HELD_OUT_TEMPLATES for w in ds.WORDS}
  captions = {ds.spoken_caption(r % 36, r) for r in range(720)}
  assert not captions & prompts and "the letter b" in captions
  assert captions >= {t.format(w="seven", n=7) for t in ds.DIGIT_TEMPLATES}


@needs_espeak
def test_synthesis_is_deterministic_and_follows_speed_and_pitch():
  voice = ds.Voice("en-us", "f3", 170, 55)
  assert str(voice) == "en-us+f3 s170 p55"
  clip = ds.synthesize("number seven", voice)
  assert clip == ds.synthesize("number seven", voice)
  x, sr = ds.decode(clip)
  assert sr == 16000 and 0.4 < len(x) / sr < 2.0 and np.abs(x).max() > 0.1
  slow = ds.decode(ds.synthesize("number seven", ds.Voice("en-us", "f3", 120, 55)))[0]
  assert len(slow) > 1.2 * len(x)
  assert ds.synthesize("number seven", ds.Voice("en-us", "f3", 170, 85)) != clip


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("speech"))
  ds.build(d, max_images=MAX_IMAGES)
  ds.build_spoken(d, per_label=PER_LABEL)
  return d


def _audio_ok(flac, spoken):
  x, sr = ds.decode(flac)
  # espeak-ng at 120-220 wpm: ~0.3 s per word plus ~0.1 s of silence around it.
  assert sr == 16000 and x.ndim == 1 and 0.25 * len(spoken.split()) < len(x) / sr < 2.5
  assert np.abs(x).max() > 0.05


@needs_espeak
def test_digits_speech_small_build(built):
  images, labels = digits_captions.load_digits()
  for split in ("train", "test"):
    plan = ds.digits_plan(split, max_images=MAX_IMAGES)
    src = tfds.data_source("digits_speech", data_dir=built, split=split)
    reader = sources.open_source("digits_speech", split, built)
    assert len(src) == len(reader) == MAX_IMAGES
    records = sorted((src[k] for k in range(len(src))), key=lambda r: r["id"])
    for r, (i, label, spoken, voice), read in zip(records, plan, sorted(
        (reader[k] for k in range(len(reader))), key=lambda r: r["id"])):
      assert (int(r["id"]), int(r["label"]), r["spoken"].decode(), r["voice"].decode()) == (
          i, labels[i], spoken, str(voice))
      assert r["text"].decode() == digits_captions.caption(label, i) == read["text"]
      np.testing.assert_array_equal(
          r["image"], np.asarray(Image.open(io.BytesIO(digits_captions.to_png(images[i])))))
      assert isinstance(r["audio"], bytes) and read["audio"] == r["audio"]
      _audio_ok(r["audio"], spoken)
  assert tfds.builder("digits_speech", data_dir=built).info.features["label"].names == list(
      ds.WORDS)


@needs_espeak
def test_spoken_digits_small_build(built, tmp_path):
  builder = tfds.builder("spoken_digits", data_dir=built)
  assert "image" not in builder.info.features
  assert builder.info.features["label"].names[7] == "seven"
  assert builder.info.features["label"].names[11] == "b"
  clips = {}
  for split in ("train", "test"):
    reader = sources.open_source("spoken_digits", split, built)
    records = [reader[k] for k in range(len(reader))]
    assert sorted(int(r["label"]) for r in records) == list(range(36))
    for r in records:
      label = int(r["label"])
      assert ds.LABEL_NAMES[label] in r["spoken"].split()
      assert r["text"] == ds.spoken_caption(label, int(r["id"]))
      templates = ds.DIGIT_TEMPLATES if label < 10 else ds.LETTER_TEMPLATES
      assert r["text"] in [t.format(w=ds.LABEL_NAMES[label], n=label) for t in templates]
      _audio_ok(r["audio"], r["spoken"])
    clips[split] = {(r["spoken"], r["voice"]) for r in records}
    assert len(clips[split]) == 36
  assert not clips["train"] & clips["test"]
  ds.build_spoken(str(tmp_path), per_label=PER_LABEL)  # A second build: the same bytes.
  files = sorted(glob.glob(os.path.join(built, "spoken_digits", "*", "*.array_record*")))
  assert len(files) == 2
  for path in files:
    with open(path, "rb") as f, open(os.path.join(str(tmp_path), os.path.relpath(path, built)),
                                     "rb") as g:
      assert f.read() == g.read(), path
