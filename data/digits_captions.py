"""`digits_captions`: a tiny captioned image dataset built from scikit-learn's digits.

1,797 8x8 grey digits (values 0..16) become 32x32 RGB PNGs, each with a caption drawn
deterministically from the 7 CAPTION_TEMPLATES ("handwritten 7", "a small handwritten seven",
...). Fields: image (PNG bytes), text (caption), label (0-9), id (row in sklearn's data).
Splits: `test` holds 30 images per class (300, stratified, fixed by SEED), `train` the
other 1,497.

HELD_OUT_TEMPLATES ("a photo of the number {w}", "the digit {w}", "a scan of a handwritten
{w}") appear in no caption of either split: they are the demos' zero-shot and scoring prompts
(configs/demo.py, configs/common.py), so "zero-shot" means prompts the model never trained on.
Version 1.0.0 drew captions from all 10 templates, prompts included. The committed tokenizer
(data/digits_spm.model) was trained on 1.0.0's captions, so it has pieces for the held-out
words; the model never sees them paired with an image.

It is a real TFDS builder writing array_record files, so it is read TF-free with
`tfds.data_source("digits_captions", data_dir=...)`. The TFDS writer runs without
TensorFlow here because images are handed to it already PNG-encoded (TFDS only needs TF
to encode numpy images). Build it with `python data/build_demo.py [--data_dir DIR]`.
"""
from __future__ import annotations

import contextlib
import io

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

SEED = 0
IMAGE_SIZE = 32
TEST_PER_CLASS = 30

WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# "{w}" = the digit as a word, "{n}" = as a numeral.
CAPTION_TEMPLATES = (
    "handwritten {n}",
    "a drawing of a {n}",
    "an image of the numeral {w}",
    "a blurry picture of the digit {n}",
    "a small handwritten {w}",
    "the number {n} written by hand",
    "a low resolution image of a {n}",
)
# Never in a caption: the zero-shot / scoring prompts (with the digit as a word).
HELD_OUT_TEMPLATES = (
    "a photo of the number {w}",
    "the digit {w}",
    "a scan of a handwritten {w}",
)


def caption(label: int, example_id: int, seed: int = SEED) -> str:
  """The caption of example `example_id` (a pure function of its arguments)."""
  rng = np.random.default_rng([seed, example_id])
  template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
  return template.format(w=WORDS[label], n=str(label))


def to_png(digit: np.ndarray, size: int = IMAGE_SIZE) -> bytes:
  """8x8 array of 0..16 -> `size`x`size` RGB PNG bytes (bilinear upsampling)."""
  grey = np.clip(np.round(np.asarray(digit, np.float64) * (255.0 / 16.0)), 0, 255)
  img = Image.fromarray(grey.astype(np.uint8), mode="L")
  return png_bytes(img.resize((size, size), Image.BILINEAR).convert("RGB"))


def png_bytes(img: Image.Image) -> bytes:
  """A PIL image as PNG bytes, the same bytes on every build."""
  buf = io.BytesIO()
  img.save(buf, format="PNG", optimize=False, compress_level=6)
  return buf.getvalue()


def split_ids(labels: np.ndarray, seed: int = SEED, test_per_class: int = TEST_PER_CLASS):
  """Deterministic stratified split -> (train_ids, test_ids), both sorted."""
  rng = np.random.default_rng(seed)
  test = []
  for c in range(10):
    ids = np.flatnonzero(labels == c)
    test.extend(rng.permutation(ids)[:test_per_class].tolist())
  test = np.sort(np.asarray(test, np.int64))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return train, test


def load_digits():
  """(images [1797, 8, 8] float, labels [1797] int) from scikit-learn (bundled, no download)."""
  from sklearn.datasets import load_digits as _load  # pylint: disable=g-import-not-at-top
  d = _load()
  return d.images, d.target.astype(np.int64)


def generate(split: str, seed: int = SEED):
  """Yields (key, example) for `split` in id order."""
  images, labels = load_digits()
  train, test = split_ids(labels, seed)
  ids = {"train": train, "test": test}[split]
  for i in ids:
    i = int(i)
    label = int(labels[i])
    yield i, {
        "image": to_png(images[i]),
        "text": caption(label, i, seed),
        "label": label,
        "id": i,
    }


class DigitsCaptions(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits as 32x32 RGB images with templated captions."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "2.0.0": "Captions never use the 3 held-out (zero-shot prompt) templates."}

  # TFDS's default `code_path` probes `importlib_resources` (not installed with tfds
  # 4.9.10's minimal deps) when the builder lives in a package; this file is the code.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    # `DatasetInfo(builder=self)` directly: `dataset_info_from_configs` looks for
    # metadata files next to the builder module, which this builder does not need.
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(WORDS)),
            "id": np.int32,
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the digits ship with scikit-learn.
    return {"train": self._generate_examples("train"),
            "test": self._generate_examples("test")}

  def _generate_examples(self, split):
    yield from generate(split)


@contextlib.contextmanager
def deterministic_serialization():
  """Serialises tf.Example protos with sorted map keys while building.

  TFDS calls `SerializeToString()`, whose map-field order varies between processes, so
  two builds would hold the same examples in different bytes. Scoped, undone on exit.
  """
  from tensorflow_datasets.core import example_serializer as es  # pylint: disable=g-import-not-at-top
  original = es.ExampleSerializer.serialize_example

  def serialize_example(self, example):
    return self.get_tf_example(example).SerializeToString(deterministic=True)

  es.ExampleSerializer.serialize_example = serialize_example
  try:
    yield
  finally:
    es.ExampleSerializer.serialize_example = original


def build(data_dir: str | None = None) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns the builder; `data_dir=None` = TFDS's default."""
  builder = DigitsCaptions(data_dir=data_dir, file_format="array_record")
  with deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
