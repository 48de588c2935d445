"""Multilingual tokenizer training (tools/make_tokenizer.py): language-weighted corpus,
byte fallback, symbols, the per-language report (checked by hand), bad flags."""
import collections
import json
import os
import re
import sys

import emoji
import pytest
import sentencepiece as spm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm.input import tokenizer  # pylint: disable=wrong-import-position
from tools import make_tokenizer  # pylint: disable=wrong-import-position

# Latin, Cyrillic, Japanese, Chinese, Arabic, Hangul; English the high-resource language.
SIZES = {"en": 240, "ru": 80, "ja": 60, "zh": 60, "ar": 40, "ko": 30}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """Real CLDR emoji names (the emoji package) as JSON lines {"text", "language"}."""
  emoji.config.load_language(list(SIZES))
  named = [d for _, d in sorted(emoji.EMOJI_DATA.items()) if all(l in d for l in SIZES)]
  rows = []
  for lang, n in SIZES.items():  # Every 7th emoji: a spread of subjects.
    rows += [{"text": d[lang].strip(":").replace("_", " "), "language": lang}
             for d in named[::7][:n]]
  path = tmp_path_factory.mktemp("spm") / "names.jsonl"
  path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                  encoding="utf-8")
  return path, rows


def _report(err: str) -> dict[str, list[str]]:
  lines = err[err.index("per-language report"):].splitlines()[2:]
  return {line.split()[0]: line.split()[1:] for line in lines if line.strip()}


def test_byte_fallback_report_and_ids(corpus, tmp_path, capsys):
  path, _ = corpus
  out = str(tmp_path / "multi.model")
  assert make_tokenizer.main([
      "--text_file", str(path), "--language_column", "language", "--language_temperature",
      "3", "--byte_fallback", "--character_coverage", "0.9995", "--vocab_size", "1000",
      "--eval_fraction", "0.2", "--user_defined_symbols", "<lang_en>,<lang_ja>",
      "--control_symbols", "<extra_0>", "--out", out]) == 0
  captured = capsys.readouterr()
  assert captured.out.strip() == out
  sp = spm.SentencePieceProcessor(model_file=out)
  assert (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id()) == (0, 1, 2, -1)
  assert [sp.id_to_piece(i) for i in range(3, 6)] == ["<extra_0>", "<lang_en>", "<lang_ja>"]
  assert sp.is_control(3) and sp.is_byte(6) and sp.id_to_piece(6) == "<0x00>"
  tok = tokenizer.Tokenizer(out)  # big_mm's Tokenizer takes it; nothing is lost.
  text = "<lang_ja> 木の葉 и жук 😀 ☃ 𝄞"
  ids = tok.encode([text], 64)
  assert tok.decode(ids) == [text] and 2 not in ids[0] and 4 not in ids[0] and 5 in ids[0]
  report = _report(captured.err)
  assert "held-out 0.2" in captured.err and sorted(report) == sorted(SIZES)
  for lang, cols in report.items():
    assert float(cols[4]) == 0.0, lang  # unk rate: 0 with byte fallback.
  # By hand for Chinese: the held-out sentences are make_tokenizer.split_eval's.
  _, rows = corpus
  held = make_tokenizer.split_eval([r["text"] for r in rows], [r["language"] for r in rows],
                                   0.2, 0)
  zh = [t for t, l in zip(held[2], held[3]) if l == "zh"]
  pieces = [p for t in zh for p in sp.encode(t, out_type=str)]
  chars = sum(len(t) for t in zh)
  n_bytes = sum(bool(re.fullmatch(r"<0x[0-9A-F]{2}>", p)) for p in pieces)
  assert report["zh"][:3] == [str(len(zh)), str(chars), str(len(pieces))]
  assert float(report["zh"][3]) == pytest.approx(len(pieces) / chars, abs=5e-4)
  assert float(report["zh"][5]) == pytest.approx(n_bytes / len(pieces), abs=5e-4)
  assert len(zh) == round(0.2 * SIZES["zh"]) and n_bytes > 0  # Unseen hanzi: bytes.


def test_without_byte_fallback_unseen_characters_are_unk(corpus, tmp_path, capsys):
  path, _ = corpus
  assert make_tokenizer.main([
      "--text_file", str(path), "--language_column", "language", "--language_weights",
      "en=1,ru=1,ja=1,zh=1,ar=1,ko=1", "--vocab_size", "800", "--eval_fraction", "0.2",
      "--out", str(tmp_path / "u.model")]) == 0
  report = _report(capsys.readouterr().err)
  assert float(report["zh"][4]) > 0 and float(report["zh"][5]) == 0  # unk, no byte pieces


def test_language_mix_follows_temperature_and_weights():
  texts = [f"e{i}" for i in range(300)] + [f"j{i}" for i in range(12)]
  langs = ["en"] * 300 + ["ja"] * 12
  corpus, q = make_tokenizer.language_mix(texts, langs, temperature=2.0, seed=1)
  want_ja = 12 ** 0.5 / (300 ** 0.5 + 12 ** 0.5)  # n^(1/T), normalised: 1/6.
  assert q["ja"] == pytest.approx(want_ja) and len(corpus) == 312
  counts = collections.Counter(t[0] for t in corpus)
  assert counts == {"j": round(want_ja * 312), "e": round((1 - want_ja) * 312)}
  # Upsampled ja (52 of 12 sentences): each sentence 4 or 5 times, whole passes first.
  per = collections.Counter(t for t in corpus if t[0] == "j")
  assert set(per.values()) == {4, 5} and len(per) == 12
  assert len(set(t for t in corpus if t[0] == "e")) == len([t for t in corpus if t[0] == "e"])
  corpus, q = make_tokenizer.language_mix(texts, langs, weights={"en": 1, "ja": 3}, size=100)
  assert collections.Counter(t[0] for t in corpus) == {"e": 25, "j": 75}
  corpus, _ = make_tokenizer.language_mix(texts, langs, weights={"en": 0, "ja": 1}, size=10)
  assert all(t[0] == "j" for t in corpus) and len(corpus) == 10


def test_bad_flags_fail_clearly(corpus, tmp_path, capsys):
  path, _ = corpus
  base = ["--text_file", str(path), "--out", str(tmp_path / "x.model")]
  for extra, words in (
      (["--language_temperature", "2"], "need --language_column"),
      (["--language_column", "language", "--language_temperature", "0.5"], ">= 1"),
      (["--language_column", "language", "--language_weights", "en=x"], "LANG=WEIGHT"),
      (["--language_column", "language", "--language_weights", "en=1",
        "--language_temperature", "2"], "not allowed with"),
  ):
    with pytest.raises(SystemExit):
      make_tokenizer.main(base + extra)
    assert words in capsys.readouterr().err, extra
  with pytest.raises(ValueError, match=r"missing \['ar', 'ja', 'ko', 'ru', 'zh'\]"):
    make_tokenizer.main(base + ["--language_column", "language", "--language_weights", "en=1"])
