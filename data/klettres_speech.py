"""`klettres_speech`: real human recordings of letters and syllables in 20 languages (test only).

Built from the Debian package klettres-data (KDE's KLettres; GPL-2+, see
/usr/share/doc/klettres-data/copyright): every <sound name=... file=...> of the <alphabet> and
<syllables> sections of /usr/share/klettres/<lang>/sounds.xml whose file is installed. The data
is built locally from the installed package and never copied into the repository.

klettres-data 4:22.12 lists 1,976 sounds in 22 files and ships 1,835 of them: the 141 it lists
but does not install (Indonesian's alphabet and syllables, Nynorsk's .opus alphabet, 3
Malayalam and 1 Setswana syllables) are left out, so 20 languages have clips. Each clip (Ogg
Vorbis, 22.05-128 kHz, mono or stereo) is decoded with soundfile, mixed to mono, resampled to
16 kHz and stored as FLAC bytes (data/digits_speech.py: to_flac).

Fields: audio (FLAC bytes, 16 kHz mono), name (the written form as sounds.xml has it, e.g. "B",
"CAR", "Б"), text ("the letter b" / "the syllable car": the name lowercased, the caption style
of spoken_digits), language (the sounds.xml language code: en, en_GB, pt_BR, ...), kind
("letter" or "syllable"), label (the index of the sound within its language's section:
alphabet for letters, syllables for syllables), file (the path under /usr/share/klettres), id.
A zero-shot audio->text evaluation that was not synthesised by espeak-ng: English letters
("the letter a" .. "the letter z") are the spoken_digits letter captions. Splits: test (every
clip) and letters_en (the 52 English letters of en and en_GB, label = the letter's index in
a..z, LETTERS; only when there are English letters), the zero-shot split of
configs/demo_audio.py.
Build with `python data/build_demo.py --binding [--data_dir DIR]` or `build(data_dir)`.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import glob
import os
import xml.etree.ElementTree as ET

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data import digits_captions, digits_speech

ROOT = "/usr/share/klettres"
PACKAGE = "klettres-data"
KINDS = {"alphabet": "letter", "syllables": "syllable"}
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
ENGLISH = ("en", "en_GB")


@dataclasses.dataclass(frozen=True)
class Clip:
  language: str
  kind: str  # "letter" | "syllable"
  label: int  # index within its language's section
  name: str
  file: str  # relative to ROOT

  @property
  def text(self) -> str:
    return f"the {self.kind} {self.name.lower()}"


def clips(root: str = ROOT) -> list[Clip]:
  """The installed clips of every <root>/<lang>/sounds.xml, in (file, section, index) order."""
  files = sorted(glob.glob(os.path.join(root, "*", "sounds.xml")))
  if not files:
    raise FileNotFoundError(f"No {root}/<lang>/sounds.xml: install the Debian package "
                            f"{PACKAGE} (`apt-get install {PACKAGE}`).")
  out = []
  for path in files:
    for language in ET.parse(path).getroot().iter("language"):
      for section, kind in KINDS.items():
        for node in language.findall(section):
          for label, sound in enumerate(node.iter("sound")):
            clip = Clip(language.get("code"), kind, label, sound.get("name"), sound.get("file"))
            if os.path.exists(os.path.join(root, clip.file)):
              out.append(clip)
  return out


def load(clip: Clip, root: str = ROOT) -> bytes:
  """The clip as 16 kHz mono FLAC bytes."""
  import soundfile  # pylint: disable=g-import-not-at-top
  x, sr = soundfile.read(os.path.join(root, clip.file), dtype="float64")
  return digits_speech.to_flac(x, sr)


def generate(max_per_kind: int | None = None, root: str = ROOT, english_letters=False):
  """Yields (key, example) of every clip (english_letters: only ENGLISH letters, labelled by
  their index in LETTERS); max_per_kind: only the first clips of each (language, kind)
  (small builds)."""
  chosen = [c for c in clips(root) if max_per_kind is None or c.label < max_per_kind]
  if english_letters:
    chosen = [dataclasses.replace(c, label=LETTERS.index(c.name.lower())) for c in chosen
              if c.language in ENGLISH and c.kind == "letter" and c.name.lower() in LETTERS]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
    audio = pool.map(lambda c: load(c, root), chosen)
    for i, (clip, flac) in enumerate(zip(chosen, audio)):
      yield i, {"audio": flac, "name": clip.name, "text": clip.text, "language": clip.language,
                "kind": clip.kind, "label": clip.label, "file": clip.file, "id": i}


class KlettresSpeech(tfds.core.GeneratorBasedBuilder):
  """KLettres' recorded letters and syllables in 20 languages."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "Initial release (klettres-data 4:22.12).",
                   "1.1.0": "The letters_en split."}

  def __init__(self, *, max_per_kind: int | None = None, root: str = ROOT, **kwargs):
    self.max_per_kind, self.root = max_per_kind, root
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({
            "audio": tfds.features.Tensor(shape=(), dtype=np.object_,
                                          doc="FLAC bytes, 16 kHz mono"),
            "name": tfds.features.Text(), "text": tfds.features.Text(),
            "language": tfds.features.Text(), "kind": tfds.features.Text(),
            "label": np.int32, "file": tfds.features.Text(), "id": np.int32}),
        homepage="https://apps.kde.org/klettres/")

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the installed klettres-data.
    splits = {"test": self._generate_examples()}
    if any(c.language in ENGLISH and c.kind == "letter" for c in clips(self.root)):
      splits["letters_en"] = self._generate_examples(english_letters=True)
    return splits

  def _generate_examples(self, english_letters=False):
    yield from generate(self.max_per_kind, self.root, english_letters)


def build(data_dir: str | None = None, max_per_kind: int | None = None, root: str = ROOT
          ) -> tfds.core.DatasetBuilder:
  """Builds (if needed) and returns klettres_speech; max_per_kind: a small build (tests);
  root: where the <lang>/sounds.xml files are."""
  clips(root)  # A clear error before TFDS starts when klettres-data is missing.
  builder = KlettresSpeech(data_dir=data_dir, file_format="array_record",
                           max_per_kind=max_per_kind, root=root)
  with digits_captions.deterministic_serialization():
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder
