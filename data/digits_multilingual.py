"""`digits_multilingual`: scikit-learn's digits captioned in 8 languages and 5 scripts.

The images, labels and train / test split of `digits_captions` (data/digits_captions.py: 32x32
RGB PNGs, 1,497 train and 300 test images). Captions in LANGUAGES (Latin: en, de, fr, es;
Cyrillic: ru; Arabic: ar; Han: ja; Hangul: ko), each from CAPTION_TEMPLATES[lang] with "{w}" the
number word that `num2words` (PyPI, LGPL-2.1, used as a library at build time; pinned in
setup.py) gives for the digit in that language and "{n}" the numeral. The templates are ours.
HELD_OUT_TEMPLATES[lang] appear in no caption: they are zero-shot prompts the model never
trained on (`prompts(lang)`, with `words(lang)` as class names).
Splits (every record has every feature):
  - `train`: one record per (image, language): image, text (the caption), language (ISO 639-1
    code), label (0-9), id (row in sklearn's data); text_<lang> is the caption in its own
    language's column, "" in the others.
  - `test`: one record per image: image, label, id and text_<lang> for every language;
    text / language are the English caption / "en" (a reader of `text` gets a caption).
A caption's template is a pure function of (seed, id, language). Build with
`python data/build_demo.py --multilingual [--data_dir DIR]` or `build(data_dir)`.
"""
from __future__ import annotations

import functools

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data import digits_captions

SEED = 0
IMAGE_SIZE = digits_captions.IMAGE_SIZE
HOMEPAGE = "https://scikit-learn.org/stable/modules/generated/sklearn.datasets.load_digits.html"
LANGUAGES = ("en", "de", "fr", "es", "ru", "ar", "ja", "ko")

# "{w}" = the digit as a word in the language, "{n}" = as a numeral.
CAPTION_TEMPLATES = {
    "en": ("handwritten {w}", "a drawing of the number {w}", "the numeral {n}, written by hand"),
    "de": ("handgeschriebene {w}", "eine Zeichnung der Zahl {w}", "die Ziffer {n}, von Hand "
           "geschrieben"),
    "fr": ("{w} écrit à la main", "un dessin du nombre {w}", "le chiffre {n}, écrit à la main"),
    "es": ("{w} escrito a mano", "un dibujo del número {w}", "el dígito {n}, escrito a mano"),
    "ru": ("рукописная цифра {w}", "рисунок числа {w}", "цифра {n}, написанная от руки"),
    "ar": ("الرقم {w} بخط اليد", "رسم للعدد {w}", "الرقم {n} مكتوب باليد"),
    "ja": ("手書きの{w}", "数字の{w}の絵", "手で書いた数字{n}"),
    "ko": ("손으로 쓴 {w}", "숫자 {w}의 그림", "손으로 쓴 숫자 {n}"),
}
# Never in a caption: the zero-shot prompts ("a photo of the number {w}", "the digit {w}").
HELD_OUT_TEMPLATES = {
    "en": ("a photo of the number {w}", "the digit {w}"),
    "de": ("ein Foto der Zahl {w}", "die Ziffer {w}"),
    "fr": ("une photo du nombre {w}", "le chiffre {w}"),
    "es": ("una foto del número {w}", "el dígito {w}"),
    "ru": ("фотография числа {w}", "цифра {w}"),
    "ar": ("صورة للعدد {w}", "الرقم {w}"),
    "ja": ("数字の{w}の写真", "数字の{w}"),
    "ko": ("숫자 {w}의 사진", "숫자 {w}"),
}


def _check_language(language: str) -> None:
  if language not in LANGUAGES:
    raise ValueError(f"language {language!r}: digits_multilingual has {LANGUAGES}.")


@functools.cache
def words(language: str) -> tuple[str, ...]:
  """The number words 0-9 in `language` (num2words): zero-shot class names by label id."""
  _check_language(language)
  from num2words import num2words  # pylint: disable=g-import-not-at-top
  return tuple(num2words(d, lang=language) for d in range(10))


def prompts(language: str) -> tuple[str, ...]:
  """HELD_OUT_TEMPLATES[language] as zero-shot templates ("{}" for the class name)."""
  _check_language(language)
  return tuple(t.replace("{w}", "{}") for t in HELD_OUT_TEMPLATES[language])


def caption(label: int, example_id: int, language: str, seed: int = SEED) -> str:
  """The caption of example `example_id` in `language` (a pure function of its arguments)."""
  _check_language(language)
  rng = np.random.default_rng([seed, example_id, LANGUAGES.index(language)])
  templates = CAPTION_TEMPLATES[language]
  return templates[int(rng.integers(len(templates)))].format(w=words(language)[label],
                                                             n=str(label))


def generate(split: str, seed: int = SEED, max_images: int | None = None):
  """Yields (key, example) of `split` in id order (train: language order within each image);
  max_images: only the first max_images of the split (small test builds)."""
  images, labels = digits_captions.load_digits()
  train, test = digits_captions.split_ids(labels, seed)
  ids = {"train": train, "test": test}[split][:max_images]
  empty = {f"text_{lang}": "" for lang in LANGUAGES}
  for i in ids:
    i, label = int(i), int(labels[i])
    image = digits_captions.to_png(images[i])
    captions = {lang: caption(label, i, lang, seed) for lang in LANGUAGES}
    if split == "test":
      yield i, {"image": image, "label": label, "id": i, "text": captions["en"], "language": "en",
                **{f"text_{lang}": captions[lang] for lang in LANGUAGES}}
      continue
    for k, lang in enumerate(LANGUAGES):
      yield i * len(LANGUAGES) + k, {
          "image": image, "label": label, "id": i, "text": captions[lang], "language": lang,
          **empty, f"text_{lang}": captions[lang]}


class DigitsMultilingual(tfds.core.GeneratorBasedBuilder):
  """scikit-learn digits with captions in 8 languages."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (num2words 0.5.14)."}

  def __init__(self, *, max_images: int | None = None, **kwargs):
    self.max_images = max_images
    super().__init__(**kwargs)

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
                shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "text": tfds.features.Text(),
            "language": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=list(digits_captions.WORDS)),
            "id": np.int32,
            **{f"text_{lang}": tfds.features.Text() for lang in LANGUAGES},
        }),
        supervised_keys=("image", "label"),
        homepage=HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the digits ship with scikit-learn.
    return {split: self._generate_examples(split) for split in ("train", "test")}

  def _generate_examples(self, split):
    yield from generate(split, max_images=self.max_images)


def build(data_dir: str | None = None, max_images: int | None = None
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns the builder; max_images: a small build (tests)."""
  builder = DigitsMultilingual(data_dir=data_dir, file_format="array_record",
                               max_images=max_images)
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
