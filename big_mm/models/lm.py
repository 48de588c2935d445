"""Decoder-only language model (model_name "lm"): CM3 documents and UL2's decoder-only form.

Param tree: `dec/...` (big_mm/models/decoder.Decoder with cross_attention=False; plus
`dec/prefix_pos_embedding` [1, text_prefix_len, D] when text_prefix_len > 0).

  logits = LanguageModel(...).apply({"params": p}, tokens, prefix=None, train=False)

tokens int [B, T] (0 = pad, never a content token); logits float32 [B, T, V] are the next-token
predictions for the teacher-forced inputs [BOS=0] + tokens[:, :-1], each position attending
causally to the earlier ones. `prefix` int [B, P'] (P' <= text_prefix_len; 0 = pad slot, never
attended) is a bidirectional prefix placed before the tokens (a prefix-LM: UL2's mode token and
corrupted input); prefix=None with text_prefix_len > 0 is an all-pad prefix.

Decoding API (big_mm/decoding.py, through the objectives): encode(rows, prefix=None) -> enc
({"rows": int [B, 0]}, + "prefix" with a text prefix; every leaf batch-major),
prefill(enc, cache_len), decode(inputs, enc, decode=True, position=, cache_len=).
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from big_mm.models.decoder import Decoder, shift_right
from big_mm.models.vit import check_kwargs

_FIXED_DECODER_KEYS = ("cross_attention", "text_prefix_len", "embed_input", "head", "cls",
                       "mask_token")


class LanguageModel(nn.Module):
  """decoder: Decoder kwargs (vocab_size, max_len, variant / width / depth / ...);
  text_prefix_len: the bidirectional prefix slots (0 = a plain causal LM)."""
  decoder: Optional[Any] = None
  text_prefix_len: int = 0

  def __post_init__(self):
    kw = dict(self.decoder or {})
    check_kwargs(Decoder, kw, "model.decoder")
    fixed = sorted(k for k in _FIXED_DECODER_KEYS if k in kw)
    if fixed:
      raise ValueError(f"model.decoder.{fixed[0]} is fixed by model_name='lm' (a decoder-only "
                       "LM); remove it (the prefix length is model.text_prefix_len).")
    if self.text_prefix_len < 0:
      raise ValueError(f"model.text_prefix_len must be >= 0, got {self.text_prefix_len}.")
    super().__post_init__()

  @property
  def vocab_size(self) -> int:
    return int(dict(self.decoder or {}).get("vocab_size", Decoder.vocab_size))

  @property
  def max_len(self) -> int:
    return int(dict(self.decoder or {}).get("max_len", Decoder.max_len))

  def setup(self):
    self.dec = Decoder(**{**dict(self.decoder or {}), "cross_attention": False,
                          "text_prefix_len": self.text_prefix_len, "mask_token": False}, name="dec")

  def encode(self, rows, prefix=None):
    """rows: any array with the batch as its leading axis (only its size is read)."""
    enc = {"rows": jnp.zeros((rows.shape[0], 0), jnp.int32)}
    if self.text_prefix_len:
      if prefix is None:
        prefix = jnp.zeros((rows.shape[0], self.text_prefix_len), jnp.int32)
      enc["prefix"] = jnp.asarray(prefix, jnp.int32)
    elif prefix is not None:
      raise ValueError("A prefix was given but the LM has text_prefix_len=0; set "
                       "model.text_prefix_len.")
    return enc

  def decode(self, inputs, enc, *, decode=False, position=None, cache_len=None, train=False):
    """Decoder inputs [B, T] -> logits [B, T, V] (decode=True: cached, at `position`)."""
    prefix = enc.get("prefix")
    if decode and prefix is not None:
      return self.dec(inputs, None, prefix_tokens=prefix, decode=True, position=position,
                      cache_len=cache_len, cached_prefix=prefix.shape[1], train=train)[0]
    return self.dec(inputs, None, prefix_tokens=prefix, decode=decode, position=position,
                    cache_len=cache_len, train=train)[0]

  def prefill(self, enc, cache_len):
    """Creates the decoding cache: cache_len token positions (after the prefix, if any)."""
    prefix = enc.get("prefix")
    if prefix is not None:
      self.dec(None, None, prefix_tokens=prefix, decode=True,
               cache_len=prefix.shape[1] + cache_len)
    else:
      # Position 0 is written again by the first decode step (BOS), so this write is harmless.
      b = enc["rows"].shape[0]
      self.dec(jnp.zeros((b, 1), jnp.int32), None, decode=True, position=0,
               cache_len=cache_len)

  def __call__(self, tokens, *, prefix=None, train=False):
    enc = self.encode(tokens, prefix)
    return self.decode(shift_right(tokens), enc, train=train)
