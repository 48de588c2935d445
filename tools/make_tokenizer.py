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

Ids: pad 0, eos 1, unk 2, no bos (what big_mm.input.tokenizer.Tokenizer expects).
Reads TFDS through array_record (no TensorFlow). Deterministic: one thread, no input
sampling by SentencePiece, records in source order.
"""
from __future__ import annotations

import argparse
import collections
import io
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
          normalization: str | None = None, character_coverage: float = 1.0) -> str:
  """Trains on `texts` and writes the model to `out` (a .model path). Returns `out`.

  `normalization`: a SentencePiece rule name (NORMALIZATIONS); default "nmt_nfkc", or
  "nmt_nfkc_cf" (case folding) when `lowercase`.
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
      num_threads=1,
      input_sentence_size=0,
      shuffle_input_sentence=False,
      # Small corpora (the demo) cannot always fill `vocab_size` pieces.
      hard_vocab_limit=False,
      minloglevel=2,
  )
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "wb") as f:
    f.write(model.getvalue())
  return out


def texts_from_data(data, split: str = "train", data_dir: str | None = None, *,
                    image_column: str | None = None, text_column: str | None = None,
                    max_records: int | None = None, seed: int = 0,
                    skipped: collections.Counter | None = None) -> list[str]:
  """The captions of `data` (any input.data spec, see the module docstring), in record
  order: every caption of each record. Records the trainer would skip give none and are
  counted by reason in `skipped`. max_records: read that many records, drawn at random
  (`seed`), instead of all of them."""
  src = sources.open_source(data, split, data_dir, image_column=image_column,
                            text_column=text_column)
  indices = range(len(src))
  if max_records is not None and max_records < len(src):
    indices = np.sort(np.random.default_rng(seed).permutation(len(src))[:max_records])
  skipped = collections.Counter() if skipped is None else skipped
  texts = []
  for i in indices:
    try:  # The trainer's reasons: the source's own, then the caption's (see pipeline.py).
      text = src[int(i)].get("text")
      if text is None:
        raise preprocess.BadRecord("missing_field")
      texts += preprocess.captions(text)
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
  args = p.parse_args(argv)
  kw = dict(vocab_size=args.vocab_size, model_type=args.model_type,
            lowercase=args.lowercase, normalization=args.normalization)
  if args.data:
    data = config.parse_value(args.data)  # As --config.input.data= parses it.
    skipped = collections.Counter()
    try:
      sources.check_data(data)
      texts = texts_from_data(data, args.split, args.data_dir,
                              image_column=args.image_column, text_column=args.text_column,
                              max_records=args.max_records, skipped=skipped)
    except (sources.SpecError, sources.DatasetNotFound) as e:
      p.error(f"--data: {e}")
    print(f"{len(texts)} captions; skipped records: {dict(skipped) or 'none'}",
          file=sys.stderr)
  else:
    with open(args.text_file, encoding="utf-8") as f:
      texts = f.read().splitlines()
  print(train(texts, args.out, **kw))
  return 0


if __name__ == "__main__":
  sys.exit(main())
