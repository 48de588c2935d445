"""Transformer text decoder with a KV cache (captioning: CapPa, CoCa, prefix-LM).

Param tree (cross_attention=True, embed_input=True, head=True):
  Embed_0/embedding [vocab_size, D]          token embedding ("vocab", "embed")
  pos_embedding [1, max_len, D]              learned (plus one row with cls=True)
  prefix_pos_embedding [1, text_prefix_len, D]   (text_prefix_len > 0: the text prefix's)
  mask_embed [D]                             the [MASK] input of CapPa's parallel prediction
  cls [1, 1, D]                              (cls=True: CoCa's contrastive token, appended last)
  decoderblock_{i}/{LayerNorm_0, SelfAttention, LayerNorm_1, CrossAttention, LayerNorm_2,
                    MlpBlock_0}
  decoder_norm, head/{kernel [D, vocab], bias [vocab]}

`Decoder(...)(inputs, enc, ...) -> (x, out)`: x is the vocab logits [B, L, V] (head=True)
or the normed features [B, L, D] (out["features"]); out["cls"] the normed cls features [B, D]
(cls=True); out["prefix_features"] those of the prefix positions [B, N + P', D].

Attention of the caption tokens: causal (teacher forcing); rows with `parallel[b]` True
are CapPa's parallel prediction: every input is [MASK] and attention is bidirectional.
`prefix` ([B, N, D] embeddings placed before the tokens) makes a prefix-LM: the N prefix
positions are visible to every query (attention's prefix_len), the tokens causally.
`prefix_tokens` (int [B, P'], P' <= text_prefix_len; needs text_prefix_len > 0) is a text
prefix placed after `prefix` and also bidirectional: embedded with the token embedding plus
`prefix_pos_embedding` [1, text_prefix_len, D] (rows [:P']). Its pad slots (id 0) are masked
out as keys for every query, so [a, b, 0, 0] gives the logits of [a, b]. None with
text_prefix_len > 0 is an all-pad prefix of P' = text_prefix_len (params never depend on it).

Decoding (flax "cache" collection): `decode=True` with `inputs` [B, T] at token position
`position` writes the T keys/values at absolute index `prefix_len + position` (or at 0
for a prefix-only prefill) of cached_key / cached_value [B, cache_len, H, Dh] and attends
to the keys written so far, so feeding tokens one at a time gives the logits of the full
teacher-forced pass. The cross-attention keys are recomputed from `enc` every step.
A prefix prefill (inputs None) writes `prefix` and the embedded `prefix_tokens`; token steps
pass the same `prefix_tokens` again (not re-embedded: they mask the cached pad keys, which
sit just before `cached_prefix`, the whole cached prefix length N + P').
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_mm.kernels import attention as attention_kernels
from big_mm.models import layers, moe
from big_mm.models.vit import resolve_arch


def shift_right(text):
  """Decoder inputs for teacher forcing: [BOS=0] + text[:, :-1]."""
  return jnp.pad(text, ((0, 0), (1, 0)))[:, :-1]


class SelfAttention(nn.Module):
  """Self-attention with an optional KV cache; params as layers.MultiHeadDotProductAttention."""
  num_heads: int
  implementation: str = "xla"
  dtype: Any = "float32"

  @nn.compact
  def __call__(self, x, *, mask=None, causal=False, prefix_len=None, decode=False,
               write_index=None, cache_len=None, key_mask=None):
    """key_mask (decode only): bool [B, n] over the first n cache keys (the prefix), False =
    a key no query may see."""
    dtype = layers.to_dtype(self.dtype)
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"Decoder width {width} is not divisible by num_heads={self.num_heads}.")
    head_dim = width // self.num_heads

    def proj(name):
      return layers.DenseGeneral(features=(self.num_heads, head_dim), in_axes=1,
                                 kernel_axes=("embed", "heads", "kv"), bias_axes=("heads", "kv"),
                                 dtype=dtype, name=name)

    q, k, v = (nn.with_logical_constraint(proj(n)(x), ("batch", "length", "heads", "kv"))
               for n in ("query", "key", "value"))
    if decode:
      b, t = x.shape[:2]
      shape = (b, cache_len, self.num_heads, head_dim)
      ck = self.variable("cache", "cached_key", jnp.zeros, shape, k.dtype)
      cv = self.variable("cache", "cached_value", jnp.zeros, shape, v.dtype)
      start = (0, write_index, 0, 0)
      ck.value = jax.lax.dynamic_update_slice(ck.value, k.astype(ck.value.dtype), start)
      cv.value = jax.lax.dynamic_update_slice(cv.value, v.astype(cv.value.dtype), start)
      k, v = ck.value, cv.value
      # Query i (absolute index write_index + i) sees keys written up to itself, and the prefix.
      qpos = write_index + jnp.arange(t)[:, None]
      kpos = jnp.arange(k.shape[1])[None, :]
      visible = kpos <= qpos
      if prefix_len is not None:
        visible = jnp.logical_or(visible, kpos < prefix_len)
      visible = visible[None, None]
      if key_mask is not None:  # covers the first keys of the cache; the rest are tokens
        key_mask = jnp.pad(key_mask, ((0, 0), (0, k.shape[1] - key_mask.shape[1])),
                           constant_values=True)
        visible = jnp.logical_and(visible, key_mask[:, None, None, :])
      y = attention_kernels.dot_product_attention(
          q, k, v, mask=visible, implementation=self.implementation)
    else:
      y = attention_kernels.dot_product_attention(
          q, k, v, mask=mask, causal=causal, prefix_len=prefix_len,
          implementation=self.implementation)
    return layers.DenseGeneral(features=(width,), in_axes=2, kernel_axes=("heads", "kv", "embed"),
                               bias_axes=("embed",), dtype=dtype, name="out")(y)


class DecoderBlock(nn.Module):
  """Pre-LN block: self-attention (masked by `attn_kw`), cross-attention to `enc` (optional),
  MLP. `block.causal` is unused: the self-attention mask comes from `attn_kw`."""
  block: layers.BlockConfig
  cross_attention: bool = True

  @nn.compact
  def __call__(self, x, enc, attn_kw, deterministic=True, enc_mask=None):
    cfg = self.block
    x = layers.constrain(x)
    y = layers._layernorm(cfg.dtype)(x)
    y = SelfAttention(num_heads=cfg.num_heads, implementation=cfg.attn_implementation,
                      dtype=cfg.dtype, name="SelfAttention")(y, **attn_kw)
    x = x + nn.Dropout(rate=cfg.dropout)(layers.constrain(y), deterministic)
    if self.cross_attention:
      y = layers._layernorm(cfg.dtype)(x)
      y = layers.MultiHeadDotProductAttention(
          num_heads=cfg.num_heads, implementation=cfg.attn_implementation, dtype=cfg.dtype,
          name="CrossAttention")(y, enc, mask=None if enc_mask is None else
                                 enc_mask[:, None, None, :])
      x = x + nn.Dropout(rate=cfg.dropout)(layers.constrain(y), deterministic)
    y = layers._layernorm(cfg.dtype)(x)
    y = cfg.build_mlp()(y, deterministic)
    x = x + nn.Dropout(rate=cfg.dropout)(layers.constrain(y), deterministic)
    return layers.constrain(x)


class Decoder(nn.Module):
  """Text decoder. Architecture from `variant` ("S", "B", ...) or explicit fields.

  max_len: caption positions (learned posemb rows). text_prefix_len: the most text-prefix
  tokens (`prefix_tokens`; 0 = none, no prefix_pos_embedding). embed_input=False: `inputs` are
  embeddings [B, L, D] (CoCa's multimodal decoder; no embedding, posemb or [MASK]).
  cls=True: a learned token appended after the inputs (full passes only); it sees the
  non-pad inputs and gives out["cls"].
  """
  variant: Optional[str] = None
  width: Optional[int] = None
  depth: Optional[int] = None
  mlp_dim: Optional[int] = None
  num_heads: Optional[int] = None
  vocab_size: int = 32_000
  max_len: int = 64
  text_prefix_len: int = 0
  cross_attention: bool = True
  embed_input: bool = True
  head: bool = True
  cls: bool = False
  mask_token: bool = True            # learn the [MASK] input of parallel prediction (CapPa)
  dropout: float = 0.0
  attn_implementation: str = "xla"
  dtype: Any = "float32"
  moe: Optional[Mapping[str, Any]] = None  # mixture-of-experts MLPs (big_mm/models/moe.py)

  def arch(self) -> dict:
    a = resolve_arch(self, dict(width=512, depth=6, mlp_dim=None, num_heads=8))
    a.pop("patch_size", None)
    return a

  @nn.compact
  def __call__(self, inputs, enc=None, *, prefix=None, prefix_tokens=None, parallel=None,
               decode=False, position=None, cache_len=None, cached_prefix=0, train=False,
               enc_mask=None):
    """inputs: int tokens [B, T] (embed_input) or embeddings [B, T, D]; None for a
    prefix-only prefill. enc: [B, N, De] image tokens (cross_attention); enc_mask: bool
    [B, N], False = an image token no query attends to (NaFlex padding). prefix: [B, N, D]
    (prefix-LM). prefix_tokens: int [B, P'] text prefix (module docstring). parallel: bool
    [B] (full passes). decode: see the module docstring; cached_prefix: the prefix length
    already in the cache (prefix-LM token steps)."""
    prefix_tokens = self._check_inputs(inputs, prefix, prefix_tokens, decode)
    a = self.arch()
    dtype = layers.to_dtype(self.dtype)
    embed = None
    if self.embed_input:
      embed = nn.Embed(num_embeddings=self.vocab_size, features=a["width"], dtype=dtype,
                       param_dtype=jnp.float32,
                       embedding_init=layers.logical(nn.linear.default_embed_init,
                                                     ("vocab", "embed")))
    token_step = decode and inputs is not None
    xs, prefix_valid = self._embed_prefix(embed, prefix, prefix_tokens, token_step,
                                          cached_prefix, a["width"], dtype)
    n_prefix = sum(x.shape[1] for x in xs)
    posemb = None
    if inputs is not None:
      x, posemb = self._embed_inputs(embed, inputs, parallel, decode, position, a["width"],
                                     dtype)
      xs.append(x)
    n_text = 0 if inputs is None else xs[-1].shape[1]
    if self.cls and not decode:
      xs.append(self._cls_token(posemb, xs[-1].shape[0], a["width"], dtype))
    x = jnp.concatenate(xs, axis=1) if len(xs) > 1 else xs[0]
    x = nn.Dropout(rate=self.dropout)(x, not train)

    if decode:
      write_index = 0 if inputs is None else jnp.asarray(position, jnp.int32) + cached_prefix
      prefix_len = (n_prefix or cached_prefix) or None
      attn_kw = dict(decode=True, write_index=write_index, cache_len=cache_len,
                     prefix_len=prefix_len, key_mask=prefix_valid)
    else:
      attn_kw = self._full_mask(inputs, x.shape[1], n_prefix, n_text, parallel, prefix_valid)
    block = layers.BlockConfig(num_heads=a["num_heads"], mlp_dim=a["mlp_dim"],
                               dropout=self.dropout,
                               attn_implementation=self.attn_implementation, dtype=self.dtype)
    # The decoder is causal (or prefix-causal): expert-choice routing is refused.
    experts = moe.encoder_kwargs(dataclasses.replace(block, causal=True), self.moe, a["depth"],
                                 "Decoder.moe")
    for i in range(a["depth"]):
      x = DecoderBlock(
          block=experts["moe_block"] if i in experts.get("moe_layers", ()) else block,
          cross_attention=self.cross_attention,
          name=f"decoderblock_{i}")(x, enc, attn_kw, not train, enc_mask)
    x = layers._layernorm(self.dtype, name="decoder_norm")(x)
    return self._outputs(x, n_prefix, decode, dtype)

  def _check_inputs(self, inputs, prefix, prefix_tokens, decode):
    """Refuses combinations no mode takes; -> prefix_tokens (all pad when the decoder has a
    text prefix and none is given)."""
    if decode and (prefix is not None) and (inputs is not None):
      raise ValueError("decode=True takes either the prefix (prefill) or the tokens, not both.")
    if inputs is None and prefix is None and prefix_tokens is None:
      raise ValueError("The decoder needs inputs (tokens), a prefix or prefix_tokens.")
    if self.text_prefix_len:
      if prefix_tokens is None:  # no text prefix: all pad
        b = (inputs if inputs is not None else prefix).shape[0]
        prefix_tokens = jnp.zeros((b, self.text_prefix_len), jnp.int32)
      if prefix_tokens.ndim != 2 or prefix_tokens.shape[1] > self.text_prefix_len:
        raise ValueError(f"prefix_tokens must be int [B, P] with P <= text_prefix_len="
                         f"{self.text_prefix_len}; got shape {tuple(prefix_tokens.shape)}.")
    elif prefix_tokens is not None:
      raise ValueError("prefix_tokens given to a decoder with text_prefix_len=0; set the "
                       "model's text_prefix_len.")
    return prefix_tokens

  def _embed_prefix(self, embed, prefix, prefix_tokens, token_step, cached_prefix, width,
                    dtype):
    """-> (the prefix embeddings to run: [prefix] + [embedded text prefix], each [B, n, D];
    prefix_valid: bool [B, prefix positions], False = a pad key no query sees, or None).
    On a token step the prefix is in the cache already: nothing to run, only its pads."""
    xs = [] if prefix is None else [prefix.astype(dtype)]
    if prefix_tokens is None:
      return xs, None
    if embed is None:
      raise ValueError("prefix_tokens need a decoder with embed_input=True.")
    n_text_prefix = prefix_tokens.shape[1]
    if token_step:  # the prefix is in the cache already and ends at cached_prefix
      n_image = cached_prefix - n_text_prefix
    else:
      n_image = 0 if prefix is None else prefix.shape[1]
      prefix_posemb = layers.learned_posemb(self, "prefix_pos_embedding", self.text_prefix_len,
                                            width).astype(dtype)
      xs.append(embed(prefix_tokens) + prefix_posemb[:, :n_text_prefix])
    prefix_valid = jnp.concatenate(
        [jnp.ones((prefix_tokens.shape[0], n_image), bool), prefix_tokens != 0], axis=1)
    return xs, prefix_valid

  def _embed_inputs(self, embed, inputs, parallel, decode, position, width, dtype):
    """-> (the caption inputs [B, T, D]: embedded tokens ([MASK] on parallel rows) plus their
    position embedding, or the given embeddings; the position table [1, rows, D] or None)."""
    if not self.embed_input:
      return inputs.astype(dtype), None
    x = embed(inputs)
    if self.mask_token:
      mask_embed = self.param("mask_embed", layers.logical(
          nn.initializers.normal(0.02), ("embed",)), (width,), jnp.float32)
      if parallel is not None and not decode:
        x = jnp.where(parallel[:, None, None], mask_embed.astype(dtype), x)
    elif parallel is not None:
      raise ValueError("parallel prediction needs a decoder with mask_token=True.")
    rows = self.max_len + int(self.cls)
    posemb = layers.learned_posemb(self, "pos_embedding", rows, width).astype(dtype)
    t = x.shape[1]
    if decode:
      return x + jax.lax.dynamic_slice_in_dim(posemb, position, t, axis=1), posemb
    if t > self.max_len:
      raise ValueError(f"{t} text tokens but the decoder has max_len={self.max_len}; "
                       "raise the decoder's max_len (or shorten input.text_len).")
    return x + posemb[:, :t], posemb

  def _cls_token(self, posemb, batch, width, dtype):
    """CoCa's learned cls input [B, 1, D] (with the last position row when embedding)."""
    cls = self.param("cls", layers.logical(nn.initializers.normal(0.02), (None, None, "embed")),
                     (1, 1, width), jnp.float32).astype(dtype)
    if self.embed_input:
      cls = cls + posemb[:, self.max_len:self.max_len + 1]
    return jnp.tile(cls, [batch, 1, 1])

  def _outputs(self, x, n_prefix, decode, dtype):
    """Normed features [B, n_prefix + T (+1), D] -> (logits or caption features, out)."""
    out = {}
    if self.cls and not decode:
      out["cls"] = x[:, -1]
      x = x[:, :-1]
    out["prefix_features"] = x[:, :n_prefix]
    x = out["features"] = x[:, n_prefix:]
    if self.head:
      x = nn.Dense(self.vocab_size, dtype=dtype, param_dtype=jnp.float32, name="head",
                   kernel_init=layers.logical(nn.initializers.lecun_normal(), ("embed", "vocab")),
                   bias_init=layers.logical(nn.initializers.zeros, ("vocab",)))(x)
      x = x.astype(jnp.float32)
    return x, out

  def _full_mask(self, inputs, length, n_prefix, n_text, parallel, prefix_valid=None):
    """Attention kwargs of a full pass: causal (+prefix), parallel rows, the cls token and
    the prefix pad keys (prefix_valid: bool [B, n_prefix], False = masked for every query)."""
    key_valid = None
    if prefix_valid is not None:
      key_valid = jnp.pad(prefix_valid, ((0, 0), (0, length - prefix_valid.shape[1])),
                          constant_values=True)[:, None, None, :]  # [B, 1, 1, L]
    if parallel is None and not self.cls:
      return dict(causal=True, prefix_len=n_prefix if n_prefix else None, mask=key_valid)
    i = jnp.arange(length)[:, None]
    j = jnp.arange(length)[None, :]
    mask = jnp.logical_or(j <= i, j < n_prefix)[None, None]  # [1, 1, L, L]
    if parallel is not None:
      mask = jnp.logical_or(mask, parallel[:, None, None, None])
    if self.cls:
      # The cls query (last) ignores pad inputs; the BOS at text position 0 (id 0) is real.
      tokens = inputs if self.embed_input else None
      valid = jnp.ones((mask.shape[0] if tokens is None else tokens.shape[0], length), bool)
      if tokens is not None:
        valid = valid.at[:, n_prefix + 1:n_prefix + n_text].set(tokens[:, 1:] != 0)
      is_cls_query = (i == length - 1)[None, None]
      mask = jnp.logical_and(mask, jnp.logical_or(~is_cls_query, valid[:, None, None, :]))
    if key_valid is not None:
      mask = jnp.logical_and(mask, key_valid)
    return dict(mask=mask)
