"""Trains a SentencePiece tokenizer from a TFDS dataset's text field or a text file.

  python tools/make_tokenizer.py --tfds digits_captions --split train [--data_dir DIR] \
      --out data/digits_spm.model --vocab_size 128
  python tools/make_tokenizer.py --text_file captions.txt --out DIR/NAME.model

Ids: pad 0, eos 1, unk 2, no bos (what big_mm.input.tokenizer.Tokenizer expects).
Reads TFDS through array_record (no TensorFlow). Deterministic: one thread, no input
sampling, inputs in split order.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
from typing import Iterable

import sentencepiece as spm

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


def texts_from_tfds(name: str, split: str = "train", data_dir: str | None = None,
                    field: str = "text") -> list[str]:
  """The `field` captions of a TFDS split, in order, read TF-free. A record with several
  captions (a list, or a JSON list string) gives all of them; records whose text is empty
  or not UTF-8 give none (as the input pipeline skips them)."""
  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if root not in sys.path:
    sys.path.insert(0, root)
  from big_mm.input import preprocess, sources
  src = sources.open_source(name, split, data_dir=data_dir)
  texts = []
  for i in range(len(src)):
    try:
      texts += preprocess.captions(src[i][field])
    except preprocess.BadRecord:
      continue
  return texts


def train_from_tfds(name: str, *, split: str = "train", data_dir: str | None = None,
                    field: str = "text", out: str, **kwargs) -> str:
  return train(texts_from_tfds(name, split, data_dir, field), out, **kwargs)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--tfds", help="TFDS dataset name, e.g. digits_captions")
  src.add_argument("--text_file", help="one training sentence per line")
  p.add_argument("--split", default="train")
  p.add_argument("--data_dir", default=None)
  p.add_argument("--field", default="text")
  p.add_argument("--out", required=True, help="output path DIR/NAME.model")
  p.add_argument("--vocab_size", type=int, default=128)
  p.add_argument("--model_type", default="unigram", choices=["unigram", "bpe"])
  p.add_argument("--lowercase", action="store_true",
                 help="case-fold (normalization nmt_nfkc_cf)")
  p.add_argument("--normalization", default=None, choices=NORMALIZATIONS)
  args = p.parse_args(argv)
  kw = dict(vocab_size=args.vocab_size, model_type=args.model_type,
            lowercase=args.lowercase, normalization=args.normalization)
  if args.tfds:
    out = train_from_tfds(args.tfds, split=args.split, data_dir=args.data_dir,
                          field=args.field, out=args.out, **kw)
  else:
    with open(args.text_file, encoding="utf-8") as f:
      out = train(f.read().splitlines(), args.out, **kw)
  print(out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
