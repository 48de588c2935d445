"""SentencePiece tokenizer with fixed-length, EOS-terminated, 0-padded encodings.

  tok = Tokenizer("data/digits_spm.model")
  tok.encode(["handwritten 7"], length=16) -> int32 [1, 16]: ids..., EOS, 0, 0, ...
  tok.decode(ids) -> ["handwritten 7"]

Expected ids (tools/make_tokenizer.py trains models this way): pad 0, eos 1, unk 2.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import sentencepiece as spm

_HOW_TO_BUILD = (
    "Train one with `python tools/make_tokenizer.py --tfds DATASET --out PATH.model` "
    "(or, for the demo's data/digits_spm.model, `python data/build_demo.py --tokenizer`).")


class Tokenizer:
  """Wraps a SentencePiece model; picklable (ships the model proto, not the path)."""

  def __init__(self, path: str):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f"Tokenizer model not found: {self.path!r}. {_HOW_TO_BUILD}")
    with open(self.path, "rb") as f:
      self._load(f.read())

  def _load(self, proto: bytes):
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    self._sp.LoadFromSerializedProto(proto)
    if self._sp.pad_id() < 0 or self._sp.eos_id() < 0:
      raise ValueError(f"Tokenizer {self.path!r} needs pad and eos ids (got pad="
                       f"{self._sp.pad_id()}, eos={self._sp.eos_id()}). {_HOW_TO_BUILD}")

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
