"""`digits_speech` and `spoken_digits`: digits (and letters) spoken by espeak-ng, 16 kHz FLAC.

`digits_speech` (image, audio, text): every image of `digits_captions` (data/digits_captions.py:
the same 32x32 RGB PNGs, captions, labels and train / test split, 1,497 / 300 records) with
its digit spoken: audio (FLAC bytes, 16 kHz mono, 16 bit), text (the digits_captions caption),
spoken (what was said: "seven" or "number seven"), voice (e.g. "en-us+f3 s170 p55"), label
(0-9), id (row in sklearn's data).

`spoken_digits` (audio, text; no image): the digits zero..nine and the letters a..z spoken
(label 0-9 digits, 10-35 letters), TRAIN_PER_LABEL / TEST_PER_LABEL records per label (1,440 /
360). Fields: audio, text (a caption from DIGIT_TEMPLATES / LETTER_TEMPLATES, e.g. "a voice
saying seven", "the letter b"), spoken, voice, label, id. The (audio, text) pairs of
LanguageBind's emergent-alignment claim (Zhu et al., ICLR 2024: every modality bound to
language only, yet aligned with each other), and the letter names for the klettres_speech
zero-shot evaluation (data/klettres_speech.py). No caption uses a
digits_captions.HELD_OUT_TEMPLATES prompt.

Speech: each record draws a Voice (VOICES x VARIANTS x SPEEDS x PITCHES, espeak-ng's -v / -s /
-p) and a phrase from a seeded rng (a pure function of seed, dataset, split and record), so
both datasets share one voice grid but not their draws. A test record never repeats a (phrase,
voice) clip of its dataset's train split. Each distinct clip is synthesised once, in a thread
pool of `espeak-ng --stdout` processes, then resampled (scipy's polyphase filter) and encoded.
Deterministic: espeak-ng 1.51 gives the same samples on every run. Each dataset builds in ~40 s
on 2 cores (~1,800 clips; 26 MB / 22 MB of array_record).

espeak-ng is GPL-3 software (Debian package espeak-ng); it runs as a separate program at build
time, and its output audio is not GPL-encumbered data shipped in the repository: this script
builds it locally. Build with
`python data/build_demo.py --binding [--data_dir DIR]` or `build(...)` / `build_spoken(...)`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import math
import os
import shutil
import subprocess

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data import digits_captions

SEED = 0
SAMPLE_RATE = 16000
ESPEAK = "espeak-ng"
# espeak-ng 1.51's English voices (espeak-ng --voices=en, the gmw/ ones; mbrola ones need
# extra packages), its voice variants ("" = the voice's own; espeak-ng --voices=variant),
# speeds in words per minute (default 175) and pitches in 0..99 (default 50).
VOICES = ("en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan", "en-gb-x-gbcwmd",
          "en-029", "en-us-nyc")
VARIANTS = ("", "m1", "m3", "m5", "f1", "f2", "f3", "f4", "klatt")
SPEEDS = (120, 145, 170, 195, 220)
PITCHES = (25, 40, 55, 70, 85)

WORDS = digits_captions.WORDS
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
LABEL_NAMES = WORDS + LETTERS  # spoken_digits labels: 0-9 the digits, 10-35 the letters.
# What is said; "{w}" = the digit word / the letter.
DIGIT_PHRASES = ("{w}", "number {w}")
LETTER_PHRASES = ("{w}", "letter {w}")
# spoken_digits captions; "{w}" = the digit word / the letter, "{n}" = the numeral.
DIGIT_TEMPLATES = ("a voice saying {w}", "the spoken number {w}", "someone says {n}",
                   "{w}, said aloud")
LETTER_TEMPLATES = ("the letter {w}", "a voice saying the letter {w}", "the spoken letter {w}",
                    "someone spells {w}")
TRAIN_PER_LABEL = 40
TEST_PER_LABEL = 10
# rng streams: np.random.default_rng([seed, stream, split, record]).
_STREAMS = {"digits_speech": 1, "spoken_digits": 2}
_SPLITS = ("train", "test")


@dataclasses.dataclass(frozen=True, order=True)
class Voice:
  """One espeak-ng speaker: voice, variant ("" = none), speed (wpm), pitch (0-99)."""
  name: str
  variant: str
  speed: int
  pitch: int

  def args(self) -> list[str]:
    return ["-v", self.name + (f"+{self.variant}" if self.variant else ""),
            "-s", str(self.speed), "-p", str(self.pitch)]

  def __str__(self) -> str:
    return f"{self.args()[1]} s{self.speed} p{self.pitch}"


def draw_voice(rng: np.random.Generator) -> Voice:
  return Voice(VOICES[rng.integers(len(VOICES))], VARIANTS[rng.integers(len(VARIANTS))],
               SPEEDS[rng.integers(len(SPEEDS))], PITCHES[rng.integers(len(PITCHES))])


def espeak_binary() -> str:
  """The espeak-ng executable, or a FileNotFoundError saying how to install it."""
  path = shutil.which(ESPEAK)
  if path is None:
    raise FileNotFoundError(f"{ESPEAK} is not installed: `apt-get install {ESPEAK}` (Debian / "
                            f"Ubuntu) builds the spoken-digit datasets.")
  return path


def to_flac(samples: np.ndarray, sample_rate: int) -> bytes:
  """Float samples ([n] or [n, channels], in [-1, 1]) -> 16 kHz mono 16-bit FLAC bytes."""
  import soundfile  # pylint: disable=g-import-not-at-top
  from scipy import signal  # pylint: disable=g-import-not-at-top
  x = np.asarray(samples, np.float64)
  if x.ndim == 2:
    x = x.mean(axis=1)
  if sample_rate != SAMPLE_RATE:
    g = math.gcd(SAMPLE_RATE, sample_rate)
    x = signal.resample_poly(x, SAMPLE_RATE // g, sample_rate // g)
  buf = io.BytesIO()
  soundfile.write(buf, np.clip(x, -1.0, 1.0), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
  return buf.getvalue()


def decode(flac: bytes) -> tuple[np.ndarray, int]:
  """FLAC (or WAV / OGG) bytes -> (float32 samples [n], sample rate)."""
  import soundfile  # pylint: disable=g-import-not-at-top
  x, sr = soundfile.read(io.BytesIO(flac), dtype="float32")
  return x, sr


def synthesize(text: str, voice: Voice) -> bytes:
  """`text` spoken by `voice` (espeak-ng, 22,050 Hz WAV) as 16 kHz FLAC bytes."""
  import soundfile  # pylint: disable=g-import-not-at-top
  out = subprocess.run([espeak_binary(), *voice.args(), "--stdout", text], capture_output=True,
                       check=True).stdout
  x, sr = soundfile.read(io.BytesIO(out), dtype="float64")
  return to_flac(x, sr)


def synthesize_all(clips, workers: int | None = None) -> dict[tuple[str, Voice], bytes]:
  """{(text, voice): FLAC} for the distinct (text, voice) pairs of `clips`, synthesised once
  each by `workers` threads (default: the CPU count) running espeak-ng processes."""
  espeak_binary()
  unique = sorted(set(clips))
  with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count()) as pool:
    return dict(zip(unique, pool.map(lambda c: synthesize(*c), unique)))


def _phrases(label: int):
  return DIGIT_PHRASES if label < 10 else LETTER_PHRASES


def _draw(dataset: str, split: str, record: int, phrases, seed: int, exclude=frozenset()):
  """The (phrase index, Voice) of `record`; redrawn while the clip is in `exclude` ({(phrase
  index, voice)}: the train split's clips of the same word, for a test record)."""
  rng = np.random.default_rng([seed, _STREAMS[dataset], _SPLITS.index(split), record])
  while True:
    clip = (int(rng.integers(len(phrases))), draw_voice(rng))
    if clip not in exclude:
      return clip


def _plan(dataset: str, split: str, items: dict, seed: int):
  """[(record, label, spoken, voice)] of `split`; items: {split: [(record, label)]} with the
  whole train split, which a test record's (spoken, voice) never repeats."""
  def plan(split_, exclude):
    out = []
    for record, label in items[split_]:
      phrases = _phrases(label)
      k, voice = _draw(dataset, split_, record, phrases, seed, exclude.get(label, frozenset()))
      out.append((record, label, phrases[k].format(w=LABEL_NAMES[label]), voice, k))
    return out
  exclude = {}
  if split == "test":
    for _, label, _, voice, k in plan("train", {}):
      exclude.setdefault(label, set()).add((k, voice))
  return [p[:4] for p in plan(split, exclude)]


# ---- digits_speech ------------------------------------------------------------------------

def digits_plan(split: str, seed: int = SEED, max_images: int | None = None):
  """[(id, label, spoken, voice)] of digits_speech's `split` in id order (max_images: the first
  ones only, for small builds)."""
  labels = digits_captions.load_digits()[1]
  ids = dict(zip(_SPLITS, digits_captions.split_ids(labels, seed)))
  items = {s: [(int(i), int(labels[i])) for i in v] for s, v in ids.items()}
  items[split] = items[split][:max_images]  # The test split avoids the whole train split.
  return _plan("digits_speech", split, items, seed)


def generate_digits(split: str, seed: int = SEED, max_images: int | None = None):
  """Yields (key, example) of digits_speech's `split` in id order."""
  images = digits_captions.load_digits()[0]
  plan = digits_plan(split, seed, max_images)
  audio = synthesize_all((spoken, voice) for _, _, spoken, voice in plan)
  for i, label, spoken, voice in plan:
    yield i, {"image": digits_captions.to_png(images[i]), "audio": audio[spoken, voice],
              "text": digits_captions.caption(label, i, seed), "spoken": spoken,
              "voice": str(voice), "label": label, "id": i}


# ---- spoken_digits ------------------------------------------------------------------------

def spoken_caption(label: int, record: int, seed: int = SEED) -> str:
  """The caption of spoken_digits record `record` (label 0-9 a digit, 10-35 a letter)."""
  rng = np.random.default_rng([seed, _STREAMS["spoken_digits"], record])
  templates = DIGIT_TEMPLATES if label < 10 else LETTER_TEMPLATES
  return templates[int(rng.integers(len(templates)))].format(w=LABEL_NAMES[label], n=label)


def spoken_plan(split: str, seed: int = SEED, per_label: dict[str, int] | None = None):
  """[(record, label, spoken, voice)] of spoken_digits' `split`: record r has label r % 36;
  per_label: {split: records per label} (default TRAIN_PER_LABEL / TEST_PER_LABEL)."""
  per_label = per_label or {"train": TRAIN_PER_LABEL, "test": TEST_PER_LABEL}
  n = len(LABEL_NAMES)
  items = {s: [(r, r % n) for r in range(k * n)] for s, k in per_label.items()}
  return _plan("spoken_digits", split, items, seed)


def generate_spoken(split: str, seed: int = SEED, per_label: dict[str, int] | None = None):
  """Yields (key, example) of spoken_digits' `split` in record order."""
  plan = spoken_plan(split, seed, per_label)
  audio = synthesize_all((spoken, voice) for _, _, spoken, voice in plan)
  offset = 0 if split == "train" else 1_000_000  # Test record ids never meet train ones.
  for r, label, spoken, voice in plan:
    yield r, {"audio": audio[spoken, voice], "text": spoken_caption(label, offset + r, seed),
              "spoken": spoken, "voice": str(voice), "label": label, "id": offset + r}


# ---- builders -----------------------------------------------------------------------------

def _audio_features() -> dict:
  return {"audio": tfds.features.Tensor(shape=(), dtype=np.object_,
                                        doc="FLAC bytes, 16 kHz mono"),
          "text": tfds.features.Text(), "spoken": tfds.features.Text(),
          "voice": tfds.features.Text(), "id": np.int32}


class DigitsSpeech(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits with captions and the digit spoken by espeak-ng."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (espeak-ng 1.51)."}

  def __init__(self, *, max_images: int | None = None, **kwargs):
    self.max_images = max_images
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(digits_captions.IMAGE_SIZE,) * 2 + (3,),
                                         encoding_format="png"),
            "label": tfds.features.ClassLabel(names=list(WORDS)), **_audio_features()}),
        homepage="https://github.com/espeak-ng/espeak-ng")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: sklearn's digits, the installed espeak-ng.
    return {split: self._generate_examples(split) for split in _SPLITS}

  def _generate_examples(self, split):
    yield from generate_digits(split, max_images=self.max_images)


class SpokenDigits(tfds.core.GeneratorBasedBuilder):
  """Digits and letters spoken by espeak-ng with captions (no images)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (espeak-ng 1.51)."}

  def __init__(self, *, per_label: dict[str, int] | None = None, **kwargs):
    self.per_label = per_label
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "label": tfds.features.ClassLabel(names=list(LABEL_NAMES)), **_audio_features()}),
        homepage="https://github.com/espeak-ng/espeak-ng")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the installed espeak-ng.
    return {split: self._generate_examples(split) for split in _SPLITS}

  def _generate_examples(self, split):
    yield from generate_spoken(split, per_label=self.per_label)


def _prepare(builder: tfds.core.DatasetBuilder) -> tfds.core.DatasetBuilder:
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def build(data_dir: str | None = None, max_images: int | None = None
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns digits_speech; max_images: a small build (tests)."""
  espeak_binary()
  return _prepare(DigitsSpeech(data_dir=data_dir, file_format="array_record",
                               max_images=max_images))


def build_spoken(data_dir: str | None = None, per_label: dict[str, int] | None = None
                 ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns spoken_digits; per_label: {split: n}, a small build."""
  espeak_binary()
  return _prepare(SpokenDigits(data_dir=data_dir, file_format="array_record",
                               per_label=per_label))


def train_tokenizer(out: str, data_dir: str | None = None) -> str:
  """Trains the tokenizer of configs/demo_audio.py (make_tokenizer.DEMO_SETTINGS, 192 pieces)
  on the train captions of digits_captions and spoken_digits and the zero-shot prompts (the
  digits' held-out ones and "the letter {a..z}", so every letter has pieces); -> its path."""
  from configs import common  # pylint: disable=g-import-not-at-top
  from tools import make_tokenizer  # pylint: disable=g-import-not-at-top
  texts = [*make_tokenizer.texts_from_data("digits_captions", "train", data_dir),
           *make_tokenizer.texts_from_data("spoken_digits", "train", data_dir)]
  prompts = [t.format(w) for t in common.HELD_OUT_PROMPTS for w in common.DIGITS]
  prompts += [f"the letter {c}" for c in LETTERS]
  return make_tokenizer.train(texts + prompts, out,
                              **dict(make_tokenizer.DEMO_SETTINGS, vocab_size=192))
