"""SentencePiece tokenizer with fixed-length, EOS-terminated, 0-padded encodings.

  tok = Tokenizer("data/digits_spm.model")
  tok.encode(["handwritten 7"], length=16) -> int32 [1, 16]: ids..., EOS, 0, 0, ...
  tok.decode(ids) -> ["handwritten 7"]

`input.tokenizer` is a SentencePiece `.model` file, or a Hugging Face tokenizer directory that
holds one (HF_SENTENCEPIECE_FILES: T5 / SigLIP's spiece.model, Gemma's tokenizer.model, ...):
the model file is used as is (HF's tokenizer_config.json is not read). Expected ids
(tools/make_tokenizer.py trains models this way): pad 0 (the models treat token 0 as
padding), eos 1, unk 2; a model with another pad id is refused.

The paper recipes (configs/*_b16.py) name published SentencePiece models that big_mm cannot
ship (PUBLISHED); a missing one fails at start-up saying where to get it.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import sentencepiece as spm

from big_mm import config as config_lib

# The files a Hugging Face tokenizer directory keeps its SentencePiece model in, by preference.
HF_SENTENCEPIECE_FILES = ("spiece.model", "tokenizer.model", "sentencepiece.bpe.model",
                          "sentencepiece.model")

# Published SentencePiece models (pad 0, eos 1, unk 2): the file name the recipes use ->
# (what it is, where it lives). big_vision's pp/ops_text.py KNOWN_TOKENIZERS names these
# T5 vocabularies "c4_en", "cc_all" and "mc4"; the public bucket gs://t5-data is also served
# at https://storage.googleapis.com/t5-data/...
PUBLISHED = {
    "c4_en_32k.model": ("big_vision's c4_en (English C4, 32,000 pieces: the released English "
                        "SigLIP models, CapPa)",
                        "gs://t5-data/vocabs/cc_en.32000/sentencepiece.model"),
    "cc_all_32k.model": ("big_vision's cc_all (T5's vocabulary, 32,000 pieces)",
                         "gs://t5-data/vocabs/cc_all.32000/sentencepiece.model"),
    "mc4_250k.model": ("big_vision's mc4 (mC4, 250,000 pieces: the released multilingual "
                       "SigLIP models)",
                       "gs://t5-data/vocabs/mc4.250000.100extra/sentencepiece.model"),
}

_HOW_TO_BUILD = (
    "Train one with `python tools/make_tokenizer.py --data DATA --vocab_size N --out PATH.model` "
    "(DATA: any input.data spec; set the text model's vocab_size to N), or, for the demo's "
    "data/digits_spm.model, `python data/build_demo.py --tokenizer`.")


def _published_list() -> str:
  return "; ".join(f"{name}: {what}, {url}" for name, (what, url) in PUBLISHED.items())


def missing_message(path: str) -> str:
  """What to do about a tokenizer model that is not at `path`."""
  name = os.path.basename(path)
  if name in PUBLISHED:
    what, url = PUBLISHED[name]
    https = url.replace("gs://", "https://storage.googleapis.com/", 1)
    return (f"Tokenizer model not found: {path!r}. {name} is {what}, a published SentencePiece "
            f"model big_mm does not ship: download it (`gsutil cp {url} {path}`, or from "
            f"{https}) and run again, or set input.tokenizer to where you keep it. "
            f"{_HOW_TO_BUILD}")
  return (f"Tokenizer model not found: {path!r}. input.tokenizer takes a SentencePiece .model "
          f"file or a Hugging Face tokenizer directory holding one "
          f"({', '.join(HF_SENTENCEPIECE_FILES)}). Published models (download with gsutil cp): "
          f"{_published_list()}. {_HOW_TO_BUILD}")


def model_path(path: str) -> str:
  """The SentencePiece model file `input.tokenizer` names: the path itself, or the model file
  in a Hugging Face tokenizer directory. FileNotFoundError says where to get one."""
  path = os.fspath(path)
  if os.path.isdir(path):
    for name in HF_SENTENCEPIECE_FILES:
      if os.path.isfile(os.path.join(path, name)):
        return os.path.join(path, name)
    found = sorted(os.listdir(path))
    more = ("; tokenizer.json alone is a Hugging Face fast tokenizer (e.g. CLIP's byte-level "
            "BPE), which big_mm cannot use" if "tokenizer.json" in found else "")
    raise FileNotFoundError(
        f"Tokenizer directory {path!r} holds no SentencePiece model (looked for "
        f"{', '.join(HF_SENTENCEPIECE_FILES)}; it has {found[:12]}){more}. {_HOW_TO_BUILD}")
  if not os.path.isfile(path):
    raise FileNotFoundError(missing_message(path))
  return path


class Tokenizer:
  """Wraps a SentencePiece model; picklable (ships the model proto, not the path)."""

  def __init__(self, path: str):
    self.path = model_path(path)
    with open(self.path, "rb") as f:
      self._load(f.read())

  def _load(self, proto: bytes):
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(proto)
    if self._sp.pad_id() != 0 or self._sp.eos_id() < 0:
      raise config_lib.ConfigError(f"Tokenizer {self.path!r} needs pad id 0 (big_mm's models "
                                   f"treat token 0 as padding) and an eos id; it has pad="
                                   f"{self._sp.pad_id()}, eos={self._sp.eos_id()}. "
                                   f"{_HOW_TO_BUILD}")

  def __getstate__(self):
    return {"path": self.path, "proto": self._proto}

  def __setstate__(self, state):
    self.path = state["path"]
    self._load(state["proto"])

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._sp.pad_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  def encode(self, texts: str | Sequence[str], length: int) -> np.ndarray:
    """-> int32 [N, length]: tokens (truncated to length-1), EOS, then pad (0)."""
    return self.encode_with_info(texts, length)[0]

  def encode_with_info(self, texts: str | Sequence[str],
                       length: int) -> tuple[np.ndarray, np.ndarray]:
    """As `encode`, plus bool [N]: whether each text lost tokens to truncation."""
    if length < 1:
      raise ValueError(f"length must be >= 1 (room for EOS), got {length}")
    if isinstance(texts, (str, bytes)):
      texts = [texts]
    texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
    out = np.full((len(texts), length), self.pad_id, np.int32)
    truncated = np.zeros(len(texts), bool)
    # One text (the per-example pipeline): encode it directly; a list goes through
    # SentencePiece's thread pool, which costs ~0.5 ms to start.
    encoded = [self._sp.encode(texts[0])] if len(texts) == 1 else self._sp.encode(texts)
    for i, ids in enumerate(encoded):
      truncated[i] = len(ids) > length - 1
      ids = list(ids[:length - 1]) + [self.eos_id]
      out[i, :len(ids)] = ids
    return out, truncated

  def decode(self, ids) -> list[str]:
    """int [N, L] (or [L]) -> N strings; stops at the first EOS, ignores padding."""
    ids = np.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    texts = []
    for row in ids.tolist():
      if self.eos_id in row:
        row = row[:row.index(self.eos_id)]
      texts.append(self._sp.decode([t for t in row if t != self.pad_id]))
    return texts

  def __repr__(self):
    return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"
