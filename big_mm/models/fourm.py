"""4M (Mizrahi et al. 2023, "4M: Massively Multimodal Masked Modeling"): one encoder-decoder
transformer over the discrete tokens of several modalities.

  logits = FourM(...).apply({"params": p}, tokens, visible, valid, targets, target_valid)

tokens: {m: int32 [B, N_m]} for m in `modalities` (a missing one is zeros): "tok_rgb",
"tok_depth", "tok_semseg" (a tokenizer's code grid, row-major, N_m = h * w of `grids`) and
"text" (SentencePiece ids [B, text_len], 0 = pad). All modalities' tokens are concatenated in
`modalities` order (N = sum of `num_tokens()`); `visible` [B, K] indexes the K input tokens
the encoder sees (`valid` [B, K]: real picks; padding picks are masked out as keys) and
`targets` [B, T] the T tokens the decoder predicts (`target_valid` [B, T]).

Encoder: per-modality token embedding (`embed_{m}`, [V_m, D]) + position (2-D sin-cos for a
token grid, learned `pos_{m}` for text) + a modality embedding (`modality_{m}`); only the
visible tokens (after `num_global_tokens` learned global tokens) enter the ViT encoder.
Decoder: one query per target token: a shared learned [MASK] embedding for grid modalities,
or the previous text token's decoder embedding (`dec_embed_text`; id 0 before the first:
teacher forcing) for text, + position + modality embedding (decoder width). Each decoder
block (big_mm/models/decoder.py DecoderBlock) self-attends among the targets of the same
modality only (text: causally, by text position) and cross-attends to the encoded tokens,
whose keys also carry their grid position's sin-cos embedding (as MultiMAE's decoders,
big_mm/models/multimae.py; zero for text and global tokens).
Heads: one per modality (`head_{m}`: Dense [D, V_m]); the model returns every requested
modality's logits at every target query, {m: [B, T, V_m]}, and the objective scores each
target with its own modality's head (no shared vocabulary, so no offsets to mask).

Param tree: embed_{m}, pos_{m} (text), modality_{m}, global_tokens, Transformer/ (encoder),
context_proj, mask_token, dec_embed_text, dec_pos_text, dec_modality_{m},
decoder/decoderblock_{i}, decoder_norm, head_{m}. Logical axes as big_mm/models/layers.py
(embedding tables and heads ("vocab", "embed") / ("embed", "vocab")).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from big_mm.models import decoder as decoder_lib
from big_mm.models import layers
from big_mm.models import multimae

# Token grids (a tokenizer's codes) and text.
GRID_MODALITIES = ("tok_rgb", "tok_depth", "tok_semseg")
MODALITIES = GRID_MODALITIES + ("text",)
DEFAULT_GRID = (8, 8)  # 32x32 pixels at a tokenizer's downsample 4 (the demo's)


def _pairs(value, key: str) -> dict:
  """((name, value), ...) or a dict -> dict."""
  if value is None:
    return {}
  if hasattr(value, "items"):
    return dict(value.items())
  try:
    return {k: v for k, v in value}
  except (TypeError, ValueError):
    raise ValueError(f"model.{key} must be ((modality, value), ...) or a dict, got "
                     f"{value!r}.") from None


class FourM(nn.Module):
  """See the module docstring. vocab_sizes: ((m, V_m), ...) for every modality (text: the
  SentencePiece vocabulary). grids: ((m, (h, w)), ...) for token grids (default 8x8).
  encoder / decoder: architecture dicts (variant / width / depth / num_heads / mlp_dim)."""
  modalities: Sequence[str] = ("tok_rgb", "tok_depth", "tok_semseg")
  vocab_sizes: Any = ()
  grids: Any = ()
  text_len: int = 16
  encoder: Optional[Any] = None
  decoder: Optional[Any] = None
  num_global_tokens: int = 1
  dropout: float = 0.0
  attn_implementation: str = "xla"
  dtype: Any = "float32"

  def __post_init__(self):
    mods = tuple(self.modalities)
    unknown = [m for m in mods if m not in MODALITIES]
    if unknown or not mods or len(set(mods)) != len(mods):
      raise ValueError(f"model.modalities={mods!r}: give distinct names from {MODALITIES}.")
    vocab = _pairs(self.vocab_sizes, "vocab_sizes")
    missing = [m for m in mods if m not in vocab]
    if missing:
      raise ValueError(f"model.vocab_sizes has no size for {missing}; give ((modality, size), "
                       "...) for every modality (a tokenizer's vocab_size; text: the "
                       "SentencePiece model's).")
    for key in ("encoder", "decoder"):
      bad = set(dict(getattr(self, key) or {})) - set(multimae.ARCH_KEYS)
      if bad:
        raise TypeError(f"Invalid model.{key} option(s) {sorted(bad)}; valid: "
                        f"{multimae.ARCH_KEYS}.")
    super().__post_init__()

  # ---- static shapes -------------------------------------------------------------------

  def vocab(self) -> dict[str, int]:
    sizes = _pairs(self.vocab_sizes, "vocab_sizes")
    return {m: int(sizes[m]) for m in self.modalities}

  def grid(self, m: str) -> tuple[int, int]:
    g = _pairs(self.grids, "grids").get(m, DEFAULT_GRID)
    return int(g[0]), int(g[1])

  def num_tokens(self) -> dict[str, int]:
    """Tokens per modality, in `modalities` order."""
    return {m: self.text_len if m == "text" else int(np.prod(self.grid(m)))
            for m in self.modalities}

  def offsets(self) -> dict[str, int]:
    """Start of each modality in the concatenated tokens."""
    counts = self.num_tokens()
    starts = np.cumsum([0] + list(counts.values()))
    return dict(zip(counts, map(int, starts)))

  def token_layout(self):
    """(modality id [N], position within its modality [N]) of the concatenated tokens."""
    counts = list(self.num_tokens().values())
    mod = np.concatenate([np.full(n, i) for i, n in enumerate(counts)])
    pos = np.concatenate([np.arange(n) for n in counts])
    return jnp.asarray(mod, jnp.int32), jnp.asarray(pos, jnp.int32)

  def encoder_arch(self) -> dict:
    return multimae._arch(self.encoder, dict(width=256, depth=6, mlp_dim=None, num_heads=8))

  def decoder_arch(self) -> dict:
    return multimae._arch(self.decoder, dict(width=256, depth=4, mlp_dim=None, num_heads=8))

  # ---- modules -------------------------------------------------------------------------

  def setup(self):
    enc, dec = self.encoder_arch(), self.decoder_arch()
    vocab = self.vocab()
    embed = lambda v, d, name: nn.Embed(  # pylint: disable=g-long-lambda
        v, d, param_dtype=jnp.float32, dtype=layers.to_dtype(self.dtype), name=name,
        embedding_init=layers.logical(nn.linear.default_embed_init, ("vocab", "embed")))
    self.embeds = {m: embed(vocab[m], enc["width"], f"embed_{m}") for m in self.modalities}
    if "text" in self.modalities:
      self.text_pos = layers.learned_posemb(self, "pos_text", self.text_len, enc["width"])
      self.dec_embed_text = embed(vocab["text"], dec["width"], "dec_embed_text")
      self.dec_text_pos = layers.learned_posemb(self, "dec_pos_text", self.text_len,
                                                dec["width"])
    kind = lambda name, d: multimae._embedding(self, name, (1, 1, d), (None, None, "embed"))
    self.kinds = {m: kind(f"modality_{m}", enc["width"]) for m in self.modalities}
    self.dec_kinds = {m: kind(f"dec_modality_{m}", dec["width"]) for m in self.modalities}
    self.mask_token = kind("mask_token", dec["width"])
    self.global_tokens = multimae._embedding(
        self, "global_tokens", (1, self.num_global_tokens, enc["width"]),
        (None, None, "embed"))
    enc_block = layers.BlockConfig(num_heads=enc["num_heads"], mlp_dim=enc["mlp_dim"],
                                   dropout=self.dropout,
                                   attn_implementation=self.attn_implementation, dtype=self.dtype)
    self.transformer = layers.Encoder(depth=enc["depth"], block=enc_block, name="Transformer")
    dec_block = layers.BlockConfig(num_heads=dec["num_heads"], mlp_dim=dec["mlp_dim"],
                                   dropout=self.dropout,
                                   attn_implementation=self.attn_implementation, dtype=self.dtype)
    self.context_proj = multimae._dense(dec["width"], layers.to_dtype(self.dtype),
                                        "context_proj")
    self.blocks = [decoder_lib.DecoderBlock(block=dec_block, name=f"decoderblock_{i}")
                   for i in range(dec["depth"])]
    self.decoder_norm = layers._layernorm(self.dtype, name="decoder_norm")
    self.heads = {m: multimae._dense(vocab[m], layers.to_dtype(self.dtype), f"head_{m}",
                                     ("embed", "vocab")) for m in self.modalities}

  def _positions(self, width: int, text_pos) -> jax.Array:
    """[1, N, width]: every token's position embedding (text: `text_pos`, or zeros)."""
    out = []
    for m, n in self.num_tokens().items():
      if m == "text":
        out.append(jnp.zeros((1, n, width)) if text_pos is None else text_pos)
      else:
        out.append(layers.posemb_sincos_2d(*self.grid(m), width))
    return jnp.concatenate(out, axis=1)

  def _all_tokens(self, tokens: dict) -> dict:
    counts = self.num_tokens()
    b = next(iter(tokens.values())).shape[0]
    out = {}
    for m in self.modalities:
      x = tokens.get(m)
      if x is None:
        x = jnp.zeros((b, counts[m]), jnp.int32)
      elif tuple(x.shape[1:]) != (counts[m],):
        raise ValueError(f"4M input {m!r} has shape {tuple(x.shape)}; the model expects "
                         f"[B, {counts[m]}] (model.grids / model.text_len).")
      out[m] = jnp.asarray(x, jnp.int32)
    return out

  # ---- forward -------------------------------------------------------------------------

  def encode(self, tokens, visible, valid, train=False):
    """-> encoded [B, G + K, D] and its key mask [B, G + K] (global tokens always valid)."""
    tokens = self._all_tokens(tokens)
    dtype = layers.to_dtype(self.dtype)
    width = self.encoder_arch()["width"]
    x = []
    for m in self.modalities:
      pos = self.text_pos if m == "text" else layers.posemb_sincos_2d(*self.grid(m), width)
      x.append(self.embeds[m](tokens[m]) + (self.kinds[m] + pos).astype(dtype))
    x = jnp.concatenate(x, axis=1)
    x = jnp.take_along_axis(x, visible[..., None], axis=1)  # unpicked tokens are dropped here
    b = x.shape[0]
    g = jnp.tile(self.global_tokens.astype(dtype), (b, 1, 1))
    x = layers.constrain(jnp.concatenate([g, x], axis=1))
    mask = jnp.concatenate([jnp.ones((b, self.num_global_tokens), bool), valid], axis=1)
    x, _ = self.transformer(x, mask[:, None, None, :], deterministic=not train)
    return x, mask

  def decode(self, encoded, mask, visible, tokens, targets, target_valid, *, heads=None,
             train=False) -> dict:
    """-> {m: logits [B, T, V_m]} for m in `heads` (default: every modality)."""
    tokens = self._all_tokens(tokens)
    dtype = layers.to_dtype(self.dtype)
    width = self.decoder_arch()["width"]
    b = encoded.shape[0]
    # Context: encoded tokens projected, plus their grid position (zero: global and text).
    grid_pos = self._positions(width, None)[0]
    pos = jnp.concatenate([jnp.zeros((b, self.num_global_tokens, width)), grid_pos[visible]], 1)
    context = self.context_proj(encoded) + pos.astype(dtype)
    # Queries of all N tokens, then the T targets' rows.
    queries = []
    for m, n in self.num_tokens().items():
      if m == "text":
        prev = jnp.pad(tokens[m][:, :-1], ((0, 0), (1, 0)))  # teacher forcing, 0 first
        q = self.dec_embed_text(prev) + self.dec_text_pos.astype(dtype)
      else:
        q = jnp.broadcast_to(self.mask_token.astype(dtype), (b, n, width))
      queries.append(q + self.dec_kinds[m].astype(dtype))
    x = jnp.concatenate(queries, axis=1) + grid_pos[None].astype(dtype)
    x = jnp.take_along_axis(x, targets[..., None], axis=1)
    attn = self.target_mask(targets, target_valid)
    for block in self.blocks:
      x = block(x, context, dict(mask=attn), deterministic=not train, enc_mask=mask)
    x = self.decoder_norm(x)
    heads = self.modalities if heads is None else heads
    return {m: self.heads[m](x).astype(jnp.float32) for m in heads}

  def _text_id(self) -> int:
    return list(self.modalities).index("text") if "text" in self.modalities else -1

  def target_mask(self, targets, target_valid):
    """bool [B, 1, T, T]: target q sees target k iff k is real, of q's modality and (text)
    at a text position <= q's; every query sees itself (so no row is empty)."""
    mod, pos = self.token_layout()
    mq, pq = mod[targets], pos[targets]
    same = (mq[:, :, None] == mq[:, None, :]) & target_valid[:, None, :]
    causal = (mq[:, :, None] != self._text_id()) | (pq[:, None, :] <= pq[:, :, None])
    eye = jnp.eye(targets.shape[1], dtype=bool)[None]
    return ((same & causal) | eye)[:, None]

  def pool(self, encoded, mask):
    """Mean of the encoded input (non-global, valid) tokens [B, D]."""
    g = self.num_global_tokens
    w = mask[:, g:, None].astype(encoded.dtype)
    return jnp.sum(encoded[:, g:] * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)

  def __call__(self, tokens, visible, valid, targets, target_valid, *, heads=None,
               train=False):
    encoded, mask = self.encode(tokens, visible, valid, train=train)
    return self.decode(encoded, mask, visible, tokens, targets, target_valid, heads=heads,
                       train=train)
