"""Language-aware sampling (big_mm/input/languages.py): the temperature formula, mixtures,
exact resume through the pipeline, bad keys."""
import collections
import json
import math
import os
import sys

import numpy as np
import pytest
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from big_mm import config as config_lib  # pylint: disable=wrong-import-position
# pylint: disable=wrong-import-position
from big_mm.input import languages, pipeline, sources, tokenizer
# pylint: enable=wrong-import-position

TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")
# Record i's caption is str(i) (the digits tokenizer gives it back exactly); its language:
COUNTS = {"en": 600, "ja": 150, "ar": 40, "ko": 10}


def _write(path, start: int, counts: dict[str, int], image: str, missing: int = 0):
  """A jsonl table: ids start.., `counts` records per language, `missing` without one."""
  langs = [l for l, n in counts.items() for _ in range(n)] + [None] * missing
  with open(path, "w") as f:
    for j, lang in enumerate(langs):
      f.write(json.dumps({"image": image, "text": str(start + j), "language": lang}) + "\n")
  return {start + j: lang or languages.UNKNOWN for j, lang in enumerate(langs)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  d = tmp_path_factory.mktemp("languages")
  Image.fromarray(np.full((6, 5, 3), 90, np.uint8)).save(d / "x.png")
  lang_of = _write(d / "main.jsonl", 0, COUNTS, str(d / "x.png"))
  lang_of.update(_write(d / "en.jsonl", 1000, {"en": 400}, str(d / "x.png")))
  lang_of.update(_write(d / "enja.jsonl", 2000, {"en": 50, "ja": 50}, str(d / "x.png"),
                        missing=4))
  return d, lang_of


def _cfg(data, **kw):
  return dict(data=data, split="train", tokenizer=TOKENIZER, text_len=8,
              pp_image="decode|resize(8)|value_range(-1,1)", num_workers=0, prefetch=1,
              shuffle=True, language_column="language", **kw)


def _hoeffding(m: int, events: int, failure: float = 1e-6) -> float:
  """eps with P(some of `events` frequencies over m draws is off by > eps) <= failure, by
  Hoeffding's inequality (Hoeffding 1963: it holds for draws without replacement too)."""
  return math.sqrt(math.log(2 * events / failure) / (2 * m))


def _stream_languages(it, m: int) -> list[str]:
  """The languages of the first m positions of a train iterator's stream (no decoding)."""
  src, element = it.language_source, it._element  # pylint: disable=protected-access
  return [src.language_of(element.position(k)[1]) for k in range(m)]


@pytest.mark.parametrize("temperature", [1.0, 3.3, math.inf])
def test_proportions_follow_the_temperature_formula(data, temperature):
  d, _ = data
  it = pipeline.make_train_iterator(_cfg(f"jsonl:{d}/main.jsonl",
                                         language_temperature=temperature),
                                    global_batch_size=4, seed=0, sharding=None)
  src = it.language_source
  n = sum(COUNTS.values())
  alpha = 0.0 if math.isinf(temperature) else 1 / temperature
  z = sum(c ** alpha for c in COUNTS.values())
  want = {l: c ** alpha / z for l, c in COUNTS.items()}
  assert src.target == pytest.approx(want, abs=1e-12)
  assert src.natural == pytest.approx({l: c / n for l, c in COUNTS.items()})
  if temperature == 1:  # The natural mix: every record exactly once per epoch.
    assert len(src) == n and src.slots == [COUNTS[l] for _, l, _ in src.cells]
  # Per virtual epoch: each language's slots are its target share of the epoch, up to
  # rounding (half a slot per cell), and each record is read at least once.
  assert all(s >= len(idx) for (_, _, idx), s in zip(src.cells, src.slots))
  for lang, share in src.realised().items():
    assert abs(share - want[lang]) <= 0.5 / len(src) + 1e-12, lang
  # A long shuffled stream (several virtual epochs and a part of one): observed
  # proportions within the Hoeffding bound of the target (plus the rounding).
  m = 5 * len(src) + len(src) // 3
  seen = collections.Counter(_stream_languages(it, m))
  eps = _hoeffding(m, len(COUNTS)) + 0.5 / len(src)
  for lang in COUNTS:
    assert abs(seen[lang] / m - want[lang]) <= eps, (lang, seen[lang] / m, want[lang], eps)
  # The first third of one epoch (draws without replacement from its slots) too.
  m = len(src) // 3
  seen = collections.Counter(_stream_languages(it, m))
  for lang in COUNTS:
    assert abs(seen[lang] / m - want[lang]) <= _hoeffding(m, len(COUNTS)) + 0.5 / len(src)
  it.close()


def test_mixture_parts_keep_their_weights_within_a_language(data):
  """Part A: 400 en, weight 3; part B: 50 en + 50 ja + 4 without language, weight 1.
  m_en = 0.75 + 0.25 * 50/104, m_ja = 0.25 * 50/104, m_und = 0.25 * 4/104; q ~ m^(1/T); a
  language's records come from the parts in proportion p_k n_kl / n_k."""
  d, lang_of = data
  mix = ((f"jsonl:{d}/en.jsonl", 3.0), (f"jsonl:{d}/enja.jsonl", 1.0))
  raw = sources.open_source(mix, "train")
  for temperature in (1.0, 2.0):
    src = languages.sample_languages(raw, "language", temperature)
    m = {"en": 0.75 + 0.25 * 50 / 104, "ja": 0.25 * 50 / 104, "und": 0.25 * 4 / 104}
    z = sum(v ** (1 / temperature) for v in m.values())
    q = {l: v ** (1 / temperature) / z for l, v in m.items()}
    assert src.natural == pytest.approx(m) and src.target == pytest.approx(q)
    slots = collections.Counter()
    for i in range(len(src)):  # The virtual epoch, read by its mapping.
      record = src[i]
      lang, part = src.language_of(i), src.source_of(i)
      assert lang_of[int(record["text"])] == lang
      assert (int(record["text"]) >= 2000) == (part == 1)
      slots[lang, part] += 1
    for (lang, part), s in slots.items():
      share = (0.75 if part == 0 else 0.25 * {"en": 50, "ja": 50, "und": 4}[lang] / 104)
      assert abs(s / len(src) - q[lang] * share / m[lang]) <= 0.5 / len(src) + 1e-12
    if temperature == 1:  # The plain mixture's proportions: part A 3/4 of the epoch.
      part_a = sum(s for (_, part), s in slots.items() if part == 0)
      assert abs(part_a / len(src) - 0.75) <= 1.5 / len(src)
  assert "und: 4 records" in src.report() and "4 without a language" in src.report()


def test_exact_resume_keeps_the_language_stream(data):
  d, lang_of = data
  tok = tokenizer.Tokenizer(TOKENIZER)
  cfg = _cfg(((f"jsonl:{d}/main.jsonl", 1.0), (f"jsonl:{d}/enja.jsonl", 1.0)),
             language_temperature=2.0)

  def ids(batch):
    return [int(t) for t in tok.decode(batch["text"])]

  it = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=3, sharding=None)
  for _ in range(3):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(6)]
  it2 = pipeline.make_train_iterator(cfg, global_batch_size=4, seed=3, sharding=None)
  it2.set_state(state)
  got = [next(it2) for _ in range(6)]
  assert [ids(b) for b in got] == [ids(b) for b in want]
  assert all((g["image"] == w["image"]).all() for g, w in zip(got, want))
  # The stream is the resampled one: its records' languages are those language_of gives.
  stream = _stream_languages(it, 36)[12:]
  assert [lang_of[i] for b in want for i in ids(b)] == stream
  for x in (it, it2):
    x.close()


def test_bad_keys_fail_clearly(data):
  d, _ = data
  for kw, words in ((dict(language_temperature=0.5), ">= 1"),
                    (dict(language_temperature="3"), ">= 1"),
                    (dict(language_temperature=2.0), "needs input.language_column"),
                    (dict(language_column=""), "language_column must be")):
    cfg = config_lib.defaults()
    cfg.total_steps = 1
    for k, v in kw.items():
      cfg.input[k] = v
    with pytest.raises(config_lib.ConfigError, match=words):
      config_lib.validate(cfg)
  with pytest.raises(ValueError, match=r"no column 'lang'.*columns are"):
    pipeline.make_train_iterator(dict(_cfg(f"jsonl:{d}/main.jsonl", language_temperature=2.0),
                                      language_column="lang"),
                                 global_batch_size=4, seed=0, sharding=None)


def test_languages_keeps_only_those_records(data):
  """input.languages=("ja", "ar"): the stream holds those languages only, in their natural
  proportion (150 : 40) without a temperature."""
  d, lang_of = data
  it = pipeline.make_train_iterator(_cfg(f"jsonl:{d}/main.jsonl", languages=("ja", "ar")),
                                    global_batch_size=4, seed=0, sharding=None)
  stream = _stream_languages(it, len(it.language_source))
  assert set(stream) == {"ja", "ar"}
  assert stream.count("ja") == 150 and stream.count("ar") == 40
  with pytest.raises(ValueError, match=r"no record is in these languages.*'en'"):
    pipeline.make_train_iterator(_cfg(f"jsonl:{d}/main.jsonl", languages=("xx",)),
                                 global_batch_size=4, seed=0, sharding=None)
  cfg = config_lib.defaults()
  cfg.total_steps = 1
  cfg.input.languages = "en"
  with pytest.raises(config_lib.ConfigError, match="tuple of language codes"):
    config_lib.validate(cfg)
