"""data/klettres_speech.py: sounds.xml parsing, 16 kHz FLAC, the missing-package error, and
small builds (a made-up sounds.xml, then the installed klettres-data) read back."""
import os
import textwrap

import numpy as np
import pytest
import soundfile
import tensorflow_datasets as tfds

from big_mm.input import sources
from data import digits_speech, klettres_speech as ks

installed = pytest.mark.skipif(
    not os.path.isdir(ks.ROOT),
    reason=f"{ks.ROOT} is missing: install the Debian package {ks.PACKAGE} (.ci/run installs it).")


def test_missing_package_says_what_to_install(tmp_path):
  with pytest.raises(FileNotFoundError, match="apt-get install klettres-data"):
    ks.clips(str(tmp_path))


def test_made_up_language_parses_skips_missing_files_and_resamples(tmp_path):
  root = tmp_path / "klettres"
  (root / "xx" / "alpha").mkdir(parents=True)
  (root / "xx" / "syllab").mkdir()
  (root / "xx" / "sounds.xml").write_text(textwrap.dedent("""\
      <klettres><language code="xx"><menuitem><label>X</label></menuitem>
        <alphabet><sound name="A" file="xx/alpha/a.ogg"/><sound name="B" file="xx/alpha/b.ogg"/>
          <sound name="Ж" file="xx/alpha/zh.ogg"/></alphabet>
        <syllables><sound name="CAR" file="xx/syllab/car.ogg"/></syllables>
      </language></klettres>"""), encoding="utf-8")
  t = np.arange(22050) / 44100  # 0.5 s
  soundfile.write(root / "xx/alpha/a.ogg", np.stack([np.sin(2e3 * t)] * 2, 1) * 0.5, 44100)
  soundfile.write(root / "xx/alpha/zh.ogg", np.sin(np.arange(64000) / 20) * 0.5, 128000)
  soundfile.write(root / "xx/syllab/car.ogg", np.sin(2e3 * t) * 0.5, 44100)
  clips = ks.clips(str(root))  # b.ogg is listed but not there: left out.
  assert [(c.kind, c.label, c.name, c.text) for c in clips] == [
      ("letter", 0, "A", "the letter a"), ("letter", 2, "Ж", "the letter ж"),
      ("syllable", 0, "CAR", "the syllable car")]
  data_dir = str(tmp_path / "tfds")
  ks.build(data_dir, root=str(root))
  src = tfds.data_source("klettres_speech", data_dir=data_dir, split="test")
  records = sorted((src[k] for k in range(len(src))), key=lambda r: r["id"])
  assert [(r["name"].decode(), r["language"], r["kind"], r["file"]) for r in records] == [
      ("A", b"xx", b"letter", b"xx/alpha/a.ogg"), ("Ж", b"xx", b"letter", b"xx/alpha/zh.ogg"),
      ("CAR", b"xx", b"syllable", b"xx/syllab/car.ogg")]
  for r, seconds in zip(records, (0.5, 0.5, 0.5)):
    x, sr = digits_speech.decode(r["audio"])
    assert sr == 16000 and x.ndim == 1 and abs(len(x) - seconds * sr) <= 2
    assert 0.4 < np.abs(x).max() < 0.6


@installed
def test_installed_klettres_clips_and_small_build(tmp_path):
  clips = ks.clips()
  # klettres-data 4:22.12: 1,976 listed sounds, 1,835 installed, in 20 languages.
  assert len(clips) == 1835 and len({c.language for c in clips}) == 20
  english = [c for c in clips if c.language == "en" and c.kind == "letter"]
  assert [(c.label, c.name) for c in english] == list(enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
  assert english[1].text == "the letter b"
  data_dir = str(tmp_path)
  ks.build(data_dir, max_per_kind=1)
  reader = sources.open_source("klettres_speech", "test", data_dir)
  records = [reader[k] for k in range(len(reader))]
  firsts = {(c.language, c.kind) for c in clips if c.label == 0}
  assert len(records) == len(firsts) and {(r["language"], r["kind"]) for r in records} == firsts
  for r in records:
    assert r["label"] == 0 and r["text"] == f"the {r['kind']} {r['name'].lower()}"
    x, sr = digits_speech.decode(r["audio"])
    assert sr == 16000 and 0.15 < len(x) / sr < 8 and np.abs(x).max() > 0.05
  # letters_en: the English letters (en, en_GB) labelled by their index in a..z.
  letters = sources.open_source("klettres_speech", "letters_en", data_dir)
  assert sorted((r["language"], r["name"], r["label"]) for r in map(letters.__getitem__,
                                                                      range(len(letters)))) == [
      ("en", "A", 0), ("en_GB", "A", 0)]
