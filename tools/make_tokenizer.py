"""Trains a SentencePiece tokenizer from the captions of any `input.data`, or a text file.

  python tools/make_tokenizer.py --data digits_captions --out data/digits_spm.model \
      --vocab_size 128 --model_type bpe --normalization identity
  python tools/make_tokenizer.py --data 'tar:/data/shards/{00000..00099}.tar' \
      --max_records 1000000 --vocab_size 32000 --out DIR/NAME.model
  python tools/make_tokenizer.py --text_file captions.txt --out DIR/NAME.model

`--data` takes what `--config.input.data=` takes: a TFDS name, `tar:` shards,
`parquet:` / `csv:` / `jsonl:` tables, or a mixture `((spec, weight), ...)`. It is opened by
the trainer's own code (big_mm.input.sources.open_source) with the same `--split`,
`--data_dir`, `--image_column` and `--text_column` as the input config's keys; a mixture
is read over its virtual epoch, so its weights hold in the tokenizer's corpus too. Every
caption of a record is used. Records the trainer would skip are skipped and counted under
the same reasons (sources.SKIP_REASONS), printed at the end. `--max_records N` reads N
records drawn at random (seeded) instead of all of them.

Multilingual models:

  python tools/make_tokenizer.py --data emoji_multilingual --language_column language \
      --language_temperature 3.3 --byte_fallback --character_coverage 0.9995 \
      --vocab_size 4000 --eval_fraction 0.05 --out DIR/emoji_spm.model

`--language_column` names the record field / TFDS feature / table column holding each
record's language (with `--text_file x.jsonl`: a field of its JSON lines, the caption from
`--text_column`, default "text"). The training corpus then holds each language's sentences
in proportion q_l, so high-resource languages do not swamp the vocabulary: with
`--language_temperature T`, q_l ~ n_l^(1/T) (n_l: its sentences; temperature sampling of
XLM, Lample & Conneau 2019, and mT5, Xue et al. 2021, alpha = 1/T = 0.3), or with
`--language_weights en=1,ja=2,...`, q_l ~ w_l (every language listed; 0 leaves one out).
The corpus keeps the input's size N (or `--corpus_size`): language l gives round(q_l N)
sentences, its sentences in a seeded order, repeated whole before any is repeated again.
After training, a report per language goes to stderr: sentences, characters, pieces per
character, the unknown-piece rate (unk pieces / pieces) and the byte-fallback share of
the pieces, on the held-out `--eval_fraction` of each language's sentences (left out of
training) or, without it, on the whole (unresampled) corpus; the report says which.
`--byte_fallback` encodes characters outside the vocabulary as UTF-8 byte pieces instead
of unk (unk rate 0; needs vocab_size >= 259 + the pieces you want); `--character_coverage`
(1.0; e.g. 0.9995 for CJK, as SentencePiece recommends) leaves the rarest characters to
unk / bytes; `--user_defined_symbols` (always one piece, also inside text) and
`--control_symbols` (ids only, never from text), comma-separated, get the ids after unk.

Ids: pad 0, eos 1, unk 2, no bos (what big_mm.input.tokenizer.Tokenizer expects; checked
after training, byte pieces and symbols come after them).
Reads TFDS through array_record (no TensorFlow). Deterministic: one thread, no input
sampling by SentencePiece, records in source order.
"""
from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
from typing import Iterable

import numpy as np
import sentencepiece as spm

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
  sys.path.insert(0, _ROOT)

# pylint: disable=g-import-not-at-top,wrong-import-position
from big_mm import config
from big_mm.input import languages as languages_lib
from big_mm.input import preprocess
from big_mm.input import sources
# pylint: enable=g-import-not-at-top,wrong-import-position

# The committed data/digits_spm.model was made with these.
# BPE: on ~30 distinct words, unigram prunes to ~70 pieces and splits words into
# letters; BPE keeps whole words. The captions are lowercase ASCII, so "identity" normalisation loses nothing and keeps
# the model tiny (the NFKC rules alone are ~240 KB).
DEMO_SETTINGS = dict(vocab_size=128, model_type="bpe", normalization="identity")

NORMALIZATIONS = ("nmt_nfkc", "nmt_nfkc_cf", "nfkc", "nfkc_cf", "identity")


def train(texts: Iterable[str], out: str, *, vocab_size: int = 128,
          model_type: str = "unigram", lowercase: bool = False,
          normalization: str | None = None, character_coverage: float = 1.0,
          byte_fallback: bool = False, user_defined_symbols: Iterable[str] = (),
          control_symbols: Iterable[str] = ()) -> str:
  """Trains on `texts` and writes the model to `out` (a .model path). Returns `out`.

  `normalization`: a SentencePiece rule name (NORMALIZATIONS); default "nmt_nfkc", or
  "nmt_nfkc_cf" (case folding) when `lowercase`. byte_fallback, user_defined_symbols,
  control_symbols: see the module docstring.
  """
  if normalization is None:
    normalization = "nmt_nfkc_cf" if lowercase else "nmt_nfkc"
  if normalization not in NORMALIZATIONS:
    raise ValueError(f"normalization={normalization!r}; valid: {NORMALIZATIONS}")
  texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
  texts = [t for t in texts if t.strip()]
  if not texts:
    raise ValueError("make_tokenizer: no non-empty texts to train on.")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts),
      model_writer=model,
      vocab_size=vocab_size,
      model_type=model_type,
      pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      normalization_rule_name=normalization,
      character_coverage=character_coverage,
      byte_fallback=byte_fallback,
      user_defined_symbols=list(user_defined_symbols),
      control_symbols=list(control_symbols),
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      # Small corpora (the demo) cannot always fill `vocab_size` pieces.
      hard_vocab_limit=False,
      minloglevel=2,
  )
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  ids = (sp.pad_id(), sp.eos_id(), sp.unk_id(), sp.bos_id())
  if ids != (0, 1, 2, -1):
    raise ValueError(f"make_tokenizer: the model has pad, eos, unk, bos ids {ids}, not "
                     f"(0, 1, 2, -1) as big_mm's Tokenizer needs.")
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(model.getvalue())
  return out


def texts_from_data(data, split: str = "train", data_dir: str | None = None, *,
                    image_column: str | None = None, text_column: str | None = None,
                    max_records: int | None = None, seed: int = 0,
                    skipped: collections.Counter | None = None,
                    language_column: str | None = None,
                    languages: list[str] | None = None) -> list[str]:
  """The captions of `data` (any input.data spec, see the module docstring), in record
  order: every caption of each record. Records the trainer would skip give none and are
  counted by reason in `skipped`. max_records: read that many records, drawn at random
  (`seed`), instead of all of them. language_column: each caption's language (the record's
  field; tables: that column) is appended to `languages`."""
  src = sources.open_source(data, split, data_dir, image_column=image_column,
                            text_column=text_column)
  indices = range(len(src))
  if max_records is not None and max_records < len(src):
    indices = np.sort(np.random.default_rng(seed).permutation(len(src))[:max_records])
  skipped = collections.Counter() if skipped is None else skipped
  if language_column and languages is None:
    raise ValueError("texts_from_data: language_column needs a `languages` list to fill.")
  texts, column = [], None
  for i in indices:
    try:  # The trainer's reasons: the source's own, then the caption's (see pipeline.py).
      record = src[int(i)]
      text = record.get("text")
      if text is None:
        raise preprocess.BadRecord("missing_field")
      captions = preprocess.captions(text)
      if language_column:
        if language_column not in record and column is None:  # Tables: read the column.
          column = languages_lib.column_values(src, language_column)[0]
        language = (languages_lib.normalise(record[language_column])
                    if language_column in record else column[int(i)])
        languages += [language] * len(captions)
      texts += captions
    except preprocess.BadRecord as e:
      skipped[e.reason] += 1
    except Exception:  # pylint: disable=broad-except  An unreadable record.
      skipped["read"] += 1
  if not texts:
    hint = (" Check --text_column (the caption's column / field / TFDS feature)."
            if skipped.get("missing_field") else "")
    raise ValueError(f"make_tokenizer: no caption in {len(indices)} records of {data!r} "
                     f"split {split!r}; skipped: {dict(skipped)}.{hint}")
  return texts


def parse_language_weights(spec: str) -> dict[str, float]:
  """"en=1,ja=2" -> {"en": 1.0, "ja": 2.0}; ValueError saying the format."""
  weights = {}
  for item in filter(None, (x.strip() for x in spec.split(","))):
    lang, sep, value = item.partition("=")
    try:
      weight = float(value)
    except ValueError:
      weight = -1.0
    if not sep or not lang.strip() or not weight >= 0 or lang.strip() in weights:
      raise ValueError(f"--language_weights {spec!r}: give each language once as "
                       f"LANG=WEIGHT (a number >= 0), comma-separated, e.g. en=1,ja=2.")
    weights[lang.strip()] = weight
  if not weights or not sum(weights.values()) > 0:
    raise ValueError(f"--language_weights {spec!r}: no language with a positive weight.")
  return weights


def language_mix(texts: list[str], languages: list[str], *, temperature: float | None = None,
                 weights: dict[str, float] | None = None, size: int | None = None,
                 seed: int = 0) -> tuple[list[str], dict[str, float]]:
  """The training corpus with language l's share q_l (module docstring) -> (corpus, q).

  Language l gives round(q_l * size) sentences (size: len(texts)): its sentences in a
  seeded permutation, cycled (a fresh permutation each pass), languages in sorted order.
  """
  by_language: dict[str, list[str]] = collections.defaultdict(list)
  for text, lang in zip(texts, languages, strict=True):
    by_language[lang].append(text)
  counts = {l: len(v) for l, v in sorted(by_language.items())}
  if (temperature is None) == (weights is None):
    raise ValueError("language_mix: give a temperature or weights (one of them).")
  if weights is not None:
    missing = sorted(set(counts) - set(weights))
    unknown = sorted(set(weights) - set(counts))
    if missing or unknown:
      raise ValueError(f"--language_weights: the corpus's languages are {sorted(counts)}; "
                       f"missing {missing}, not in the corpus {unknown}. List each of its "
                       f"languages (0 leaves one out).")
    total = sum(weights.values())
    q = {l: weights[l] / total for l in counts}
  else:
    q = languages_lib.temperature_probs(counts, temperature)
  size = len(texts) if size is None else int(size)
  rng = np.random.default_rng(seed)
  corpus = []
  for lang, items in sorted(by_language.items()):
    want = int(round(q[lang] * size))
    order = np.concatenate([rng.permutation(len(items))
                            for _ in range(-(-want // len(items)))] or [[]])
    corpus += [items[int(j)] for j in order[:want]]
  return corpus, q


def split_eval(texts: list[str], languages: list[str], fraction: float, seed: int = 0):
  """-> (train texts, train languages, eval texts, eval languages): a seeded `fraction` of
  each language's sentences (at least one, never all) held out."""
  if not 0 < fraction < 1:
    raise ValueError(f"--eval_fraction={fraction}: must be in (0, 1).")
  rng = np.random.default_rng(seed)
  held = np.zeros(len(texts), bool)
  langs = np.asarray(languages, object)
  for lang in sorted(set(languages)):
    idx = np.flatnonzero(langs == lang)
    if len(idx) > 1:
      k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
      held[rng.permutation(idx)[:k]] = True
  pick = lambda mask: ([t for t, m in zip(texts, mask) if m],
                       [l for l, m in zip(languages, mask) if m])
  return (*pick(~held), *pick(held))


def language_report(model: str, texts: list[str], languages: list[str]) -> dict[str, dict]:
  """Per language: sentences, characters (code points), pieces (no eos), pieces per
  character, unk rate (unk pieces / pieces) and byte share (byte-fallback pieces / pieces)."""
  sp = spm.SentencePieceProcessor(model_file=model)
  byte_ids = {i for i in range(sp.get_piece_size()) if sp.is_byte(i)}
  out = {}
  for lang in sorted(set(languages)):
    items = [t for t, l in zip(texts, languages) if l == lang]
    ids = [i for row in sp.encode(items) for i in row]
    chars = sum(len(t) for t in items)
    pieces = max(len(ids), 1)
    out[lang] = dict(sentences=len(items), characters=chars, pieces=len(ids),
                     pieces_per_char=len(ids) / max(chars, 1),
                     unk_rate=sum(i == sp.unk_id() for i in ids) / pieces,
                     byte_share=sum(i in byte_ids for i in ids) / pieces)
  return out


def format_report(report: dict[str, dict], where: str) -> str:
  lines = [f"per-language report on {where}:",
           f"{'lang':>6} {'sentences':>9} {'chars':>8} {'pieces':>8} {'pieces/char':>11} "
           f"{'unk rate':>8} {'bytes':>6}"]
  for lang, r in report.items():
    lines.append(f"{lang:>6} {r['sentences']:>9} {r['characters']:>8} {r['pieces']:>8} "
                 f"{r['pieces_per_char']:>11.3f} {r['unk_rate']:>8.4f} {r['byte_share']:>6.3f}")
  return "\n".join(lines)


def train_from_data(data, *, out: str, split: str = "train", data_dir: str | None = None,
                    image_column: str | None = None, text_column: str | None = None,
                    max_records: int | None = None, **kwargs) -> str:
  """Trains on the captions of `data` (texts_from_data); kwargs: train()'s."""
  return train(texts_from_data(data, split, data_dir, image_column=image_column,
                               text_column=text_column, max_records=max_records),
               out, **kwargs)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter,
                              epilog="\n".join(__doc__.splitlines()[1:]))
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--data", help="an input.data spec: TFDS name, tar:/parquet:/csv:/jsonl: "
                                  "files, or a mixture ((spec, weight), ...)")
  src.add_argument("--text_file", help="one training sentence per line")
  p.add_argument("--split", default="train")
  p.add_argument("--data_dir", default=None, help="TFDS data dir (input.data_dir)")
  p.add_argument("--image_column", default=None, help="as input.image_column")
  p.add_argument("--text_column", default=None, help="as input.text_column")
  p.add_argument("--max_records", type=int, default=None,
                 help="read this many records, drawn at random, instead of all")
  p.add_argument("--out", required=True, help="output path DIR/NAME.model")
  p.add_argument("--vocab_size", type=int, default=128)
  # word: one piece per whitespace-separated word (a closed vocabulary, e.g. the scenes' 16
  # words, where unigram / bpe stop at character pieces).
  p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe", "word"])
  p.add_argument("--lowercase", action="store_true",
                 help="case-fold (normalization nmt_nfkc_cf)")
  p.add_argument("--normalization", default=None, choices=NORMALIZATIONS)
  p.add_argument("--character_coverage", type=float, default=1.0,
                 help="share of characters covered by the vocabulary (e.g. 0.9995 for CJK)")
  p.add_argument("--byte_fallback", action="store_true",
                 help="characters outside the vocabulary become UTF-8 byte pieces, not unk")
  p.add_argument("--user_defined_symbols", default="",
                 help="comma-separated pieces always kept whole (also inside text)")
  p.add_argument("--control_symbols", default="",
                 help="comma-separated control pieces (ids only, never produced from text)")
  p.add_argument("--language_column", default=None,
                 help="the records' language field (with --text_file: a .jsonl field)")
  mix = p.add_mutually_exclusive_group()
  mix.add_argument("--language_temperature", type=float, default=None,
                   help="language l's corpus share ~ n_l^(1/T) (>= 1; mT5 / XLM-R: 3.3)")
  mix.add_argument("--language_weights", default=None,
                   help="language l's corpus share ~ w_l: en=1,ja=2,... (every language)")
  p.add_argument("--corpus_size", type=int, default=None,
                 help="sentences in the resampled corpus (default: as many as read)")
  p.add_argument("--eval_fraction", type=float, default=0.0,
                 help="hold out this share of each language's sentences for the report")
  p.add_argument("--seed", type=int, default=0)
  args = p.parse_args(argv)
  symbols = lambda v: [x for x in v.split(",") if x]
  kw = dict(vocab_size=args.vocab_size, model_type=args.model_type,
            lowercase=args.lowercase, normalization=args.normalization,
            character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
            user_defined_symbols=symbols(args.user_defined_symbols),
            control_symbols=symbols(args.control_symbols))
  column = args.language_column
  mixing = args.language_temperature is not None or args.language_weights is not None
  if (mixing or args.eval_fraction) and not column:
    p.error("--language_temperature / --language_weights / --eval_fraction need "
            "--language_column (the field holding each record's language).")
  try:
    weights = (parse_language_weights(args.language_weights)
               if args.language_weights is not None else None)
    if args.language_temperature is not None:
      languages_lib.check_temperature(args.language_temperature)
  except ValueError as e:
    p.error(str(e))
  langs = [] if column else None
  if args.data:
    data = config.parse_value(args.data)  # As --config.input.data= parses it.
    skipped = collections.Counter()
    try:
      sources.check_data(data)
      texts = texts_from_data(data, args.split, args.data_dir,
                              image_column=args.image_column, text_column=args.text_column,
                              max_records=args.max_records, skipped=skipped,
                              language_column=column, languages=langs)
    except (sources.SpecError, sources.DatasetNotFound) as e:
      p.error(f"--data: {e}")
    print(f"{len(texts)} captions; skipped records: {dict(skipped) or 'none'}",
          file=sys.stderr)
  elif column:  # JSON lines with the caption and its language.
    texts = []
    with open(args.text_file, encoding="utf-8") as f:
      for number, line in enumerate(f, 1):
        if not line.strip():
          continue
        row = json.loads(line)
        text_key = args.text_column or "text"
        if not isinstance(row, dict) or text_key not in row:
          p.error(f"--text_file {args.text_file} line {number}: not a JSON object with a "
                  f"{text_key!r} field (--text_column); with --language_column the file "
                  f"holds JSON lines.")
        texts.append(str(row[text_key]))
        langs.append(languages_lib.normalise(row.get(column)))
  else:
    with open(args.text_file, encoding="utf-8") as f:
      texts = f.read().splitlines()
  where = "the whole corpus, as read (before resampling)"
  corpus, eval_texts, eval_langs = texts, texts, langs
  if args.eval_fraction:
    corpus, langs, eval_texts, eval_langs = split_eval(texts, langs, args.eval_fraction,
                                                       args.seed)
    where = (f"the held-out {args.eval_fraction:g} of each language's sentences "
             f"({len(eval_texts)}, not trained on)")
  if mixing:
    corpus, q = language_mix(corpus, langs, temperature=args.language_temperature,
                             weights=weights, size=args.corpus_size, seed=args.seed)
    print(f"training corpus: {len(corpus)} sentences; language shares "
          + ", ".join(f"{l} {v:.3f}" for l, v in q.items()), file=sys.stderr)
  out = train(corpus, args.out, **kw)
  if column:
    print(format_report(language_report(out, eval_texts, eval_langs), where), file=sys.stderr)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
