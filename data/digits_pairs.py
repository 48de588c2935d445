"""`digits_pairs`: a compositional image-text set built from scikit-learn's digits, where the
caption's word order matters (FILIP-style fine-grained alignment, SigLIP 2's LocCa).

Each 32x32 RGB image holds two digits side by side (each 8x8 digit upsampled to 16x16, the
pair centred vertically); its caption names both in order from CAPTION_TEMPLATES ("3 to the
left of 7", "7 to the right of 3", ...). A model that embeds an image as a bag of digits
cannot tell "3 left of 7" from "7 left of 3": the 100 classes are the ordered pairs.
Fields: image (PNG bytes), text (caption), label = 10 * left + right (0..99), left, right,
id. Splits: `train` (PAIRS_PER_SPLIT["train"] pairs of digits from digits_captions' train
images) and `test` (from its test images), so no digit image is in both.

HELD_OUT_TEMPLATES appear in no caption: they are the zero-shot prompts (`class_prompts`),
as in digits_captions. Captions use numerals and digit words. The tokenizer
data/digits_pairs_spm.model (`train_tokenizer`) is trained on the train captions and the
prompts, so the prompts' words have pieces; the model never sees them paired with an image.
`digits_pairs_wide` holds the same pairs on a wide 32x64 canvas (each digit 32x32, as in
digits_captions), for native-aspect inputs (NaFlex) against squashing to a square.
Build both with `python data/build_demo.py [--data_dir DIR]` (TF-free, deterministic).
"""
from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from data import digits_captions

SEED = 1
IMAGE_SIZE = 32
PAIRS_PER_SPLIT = {"train": 12_000, "test": 1_000}
WORDS = digits_captions.WORDS

# "{a}" / "{b}": the left / right digit, as a numeral or a word (drawn per caption).
CAPTION_TEMPLATES = (
    "{a} to the left of {b}",
    "{b} to the right of {a}",
    "the digits {a} and {b} in that order",
    "{a} then {b}",
    "handwritten {a} beside {b} on its right",
    "on the left {a}, on the right {b}",
)
# Never in a caption: the zero-shot prompts (digits as words).
HELD_OUT_TEMPLATES = (
    "a picture of {a} followed by {b}",
    "first {a} and next {b}",
)


def class_name(label: int) -> tuple[str, str]:
  """Label 10 * left + right -> the two digits as words."""
  return WORDS[label // 10], WORDS[label % 10]


def class_prompts() -> list[list[str]]:
  """For each of the 100 classes, its prompts (one per held-out template)."""
  return [[t.format(a=a, b=b) for t in HELD_OUT_TEMPLATES]
          for a, b in map(class_name, range(100))]


def caption(left: int, right: int, pair_id: int, seed: int = SEED) -> str:
  """The caption of pair `pair_id` (a pure function of its arguments)."""
  rng = np.random.default_rng([seed, pair_id])
  template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
  words = rng.integers(2, size=2)
  a = WORDS[left] if words[0] else str(left)
  b = WORDS[right] if words[1] else str(right)
  return template.format(a=a, b=b)


def to_png(left_digit: np.ndarray, right_digit: np.ndarray, wide: bool = False) -> bytes:
  """Two 8x8 arrays of 0..16 -> a 32x32 RGB PNG, the digits side by side (16x16 each); wide:
  a 32x64 one (32x32 each)."""
  half = IMAGE_SIZE if wide else IMAGE_SIZE // 2
  canvas = np.zeros((IMAGE_SIZE, 2 * half if wide else IMAGE_SIZE), np.uint8)
  top = (IMAGE_SIZE - half) // 2
  for k, digit in enumerate((left_digit, right_digit)):
    grey = np.clip(np.round(np.asarray(digit, np.float64) * (255.0 / 16.0)), 0, 255)
    img = Image.fromarray(grey.astype(np.uint8), mode="L").resize((half, half), Image.BILINEAR)
    canvas[top:top + half, k * half:(k + 1) * half] = np.asarray(img)
  return digits_captions.png_bytes(Image.fromarray(canvas, mode="L").convert("RGB"))


def generate(split: str, seed: int = SEED, wide: bool = False):
  """Yields (key, example) for `split`: PAIRS_PER_SPLIT[split] pairs whose ordered classes
  are balanced (each of the 100 equally often, up to one), digits drawn from the split's
  digits_captions images."""
  images, labels = digits_captions.load_digits()
  ids = dict(zip(("train", "test"), digits_captions.split_ids(labels)))[split]
  by_digit = [ids[labels[ids] == d] for d in range(10)]
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  n = PAIRS_PER_SPLIT[split]
  classes = rng.permutation(np.arange(n) % 100)
  for pair_id, label in enumerate(classes):
    left, right = int(label) // 10, int(label) % 10
    i, j = int(rng.choice(by_digit[left])), int(rng.choice(by_digit[right]))
    yield pair_id, {
        "image": to_png(images[i], images[j], wide),
        "text": caption(left, right, pair_id, seed),
        "label": int(label), "left": left, "right": right, "id": pair_id,
    }


class DigitsPairs(tfds.core.GeneratorBasedBuilder):
  """Two scikit-learn digits side by side, with captions that name them in order."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  WIDE = False

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(
                shape=(IMAGE_SIZE, IMAGE_SIZE * (2 if self.WIDE else 1), 3),
                encoding_format="png"),
            "text": tfds.features.Text(),
            "label": tfds.features.ClassLabel(
                names=[f"{a}_{b}" for a, b in map(class_name, range(100))]),
            "left": tfds.features.ClassLabel(names=list(WORDS)),
            "right": tfds.features.ClassLabel(names=list(WORDS)),
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
    yield from generate(split, wide=self.WIDE)


class DigitsPairsWide(DigitsPairs):
  """digits_pairs on a 32x64 canvas (each digit 32x32)."""
  WIDE = True


def train_tokenizer(out: str, data_dir: str | None = None) -> str:
  """Trains the pairs tokenizer (make_tokenizer.DEMO_SETTINGS) on the train captions and the
  zero-shot prompts; -> its path."""
  from tools import make_tokenizer  # pylint: disable=g-import-not-at-top
  captions = make_tokenizer.texts_from_data("digits_pairs", "train", data_dir)
  prompts = [p for per_class in class_prompts() for p in per_class]
  return make_tokenizer.train(list(captions) + prompts, out, **make_tokenizer.DEMO_SETTINGS)


def build(data_dir: str | None = None, wide: bool = False) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns the builder (the wide one with `wide`); `data_dir=None` =
  TFDS's default."""
  builder = (DigitsPairsWide if wide else DigitsPairs)(data_dir=data_dir,
                                                      file_format="array_record")
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
