"""Generative image-text models: Captioner (CapPa / Cap, or a prefix-LM) and CoCa.

Captioner param tree: `img/...` (the encoder: a ViT by default, pool="none": its tokens;
`model.image["tower"]` picks another tower of big_mm.models.towers.TOWERS, e.g. "video_vit" for
video tokens, still under `img/` so image captioners' checkpoints keep their names),
`dec/...` (decoder.Decoder;
`dec/prefix_pos_embedding` [1, text_prefix_len, D] with prefix_lm and text_prefix_len > 0),
`img_proj` (prefix_lm only: image tokens -> decoder width), `txt/...` (text.TextTransformer, the
encoder-decoder's text prefix encoder: prefix_lm=False and text_prefix_len > 0).

  logits, out = Captioner(...).apply({"params": p}, image, text, prefix=None, parallel=None,
                                     train=False)

logits: float32 [B, L, V], the next-token predictions for teacher-forced inputs
[BOS=0] + text[:, :-1] (caption positions only); see big_mm/objectives/generative.py.

prefix_lm=False: encoder-decoder (CapPa), the decoder cross-attends to the image tokens. With
text_prefix_len > 0 the text prefix (padded to text_prefix_len slots) is encoded by a
bidirectional text encoder at the image tokens' width (`text_encoder`: its TextTransformer
kwargs; depth / num_heads / mlp_dim default to the image tower's; pad slots masked) and its
tokens follow the image tokens in the memory the decoder cross-attends to, pad slots masked
(e.g. UL2's [mode] + corrupted input, big_mm/objectives/ul2.py).
prefix_lm=True: decoder-only over [image tokens (N); text prefix (text_prefix_len slots);
caption] (PaliGemma-style): the image tokens and the text prefix attend bidirectionally, the
caption causally; no cross-attention. `prefix`: int [B, P'] (P' <= text_prefix_len, 0 = pad),
e.g. a prompt or question. Pad slots are never attended to, so a shorter or padded prefix gives
the same logits; prefix=None is an all-pad prefix (image-only conditioning). text_prefix_len=0:
no text prefix (then `prefix` must be None).

encode(image, prefix=None) -> enc {"tokens": [B, N, D]} (+ "prefix": int [B, P'] for a
prefix-LM with text_prefix_len > 0; the encoder-decoder's text prefix gives "tokens" [B, N + P,
D] and "mask" bool [B, N + P], False = a pad slot); decode / prefill read everything from enc
(every leaf batch-major).

CoCa param tree: `img/...` (ViT tokens), `img_pool` (MAP pooler -> contrastive embedding),
`img_proj`, `txt/...` (unimodal causal decoder with an appended cls token), `txt_proj`,
`mm/...` (multimodal decoder, cross-attention to the image tokens, vocab head), `t`, `b`.

  zimg, ztxt, logits, out = CoCa(...).apply({"params": p}, image, text, train=False)
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from big_mm.models import layers
from big_mm.models.decoder import Decoder, shift_right
from big_mm.models.text import TextTransformer
from big_mm.models.towers import TOWERS, l2_normalize
from big_mm.models.vit import check_kwargs


def encoder_spec(image_kw, what: str = "model.image") -> tuple[type, dict]:
  """(tower class, kwargs) of a captioner's / CoCa's encoder: the "tower" key of `image_kw`
  (a TOWERS name, default "vit"; e.g. "video_vit" for video) and its other kwargs, checked."""
  kwargs = dict(image_kw or {})
  name = kwargs.pop("tower", "vit")
  if name not in TOWERS:
    raise ValueError(f"{what}.tower={name!r} is not a tower; choose one of {sorted(TOWERS)} "
                     "(big_mm/models/towers.py TOWERS).")
  cls = TOWERS[name]
  check_kwargs(cls, kwargs, what)
  if "pool" not in cls.__dataclass_fields__:
    raise ValueError(f"{what}.tower={name!r} has no pool option, so it cannot give the token "
                     "sequence a decoder attends to (pool='none'); use a ViT-like tower.")
  return cls, kwargs


def _image_tower(image_kw):
  cls, kwargs = encoder_spec(image_kw)
  return cls(**{**kwargs, "pool": "none", "num_classes": None}, name="img")


# The text prefix encoder's kwargs the captioner sets (width: the image tokens').
_FIXED_TEXT_ENCODER_KEYS = ("width", "vocab_size", "pool", "pool_type", "pad_mask",
                            "num_classes", "causal")


class Captioner(nn.Module):
  """image: the encoder's kwargs (a ViT's unless its "tower" key names another tower; pool is
  forced to "none"); decoder: Decoder kwargs. text_prefix_len:
  the text prefix slots (0 = none); text_encoder: TextTransformer kwargs of the
  encoder-decoder's text prefix encoder (prefix_lm=False, text_prefix_len > 0)."""
  image: Optional[Any] = None
  decoder: Optional[Any] = None
  prefix_lm: bool = False
  text_prefix_len: int = 0
  text_encoder: Optional[Any] = None

  def __post_init__(self):
    encoder_spec(self.image)
    check_kwargs(Decoder, dict(self.decoder or {}), "model.decoder")
    if "text_prefix_len" in dict(self.decoder or {}):
      raise ValueError("Set model.text_prefix_len, not model.decoder.text_prefix_len.")
    if self.text_prefix_len < 0:
      raise ValueError(f"model.text_prefix_len must be >= 0, got {self.text_prefix_len}.")
    if self.text_encoder is not None:
      if not self._encodes_text():
        raise ValueError("model.text_encoder is the encoder-decoder's text prefix encoder: it "
                         "needs model.prefix_lm=False and model.text_prefix_len > 0.")
      check_kwargs(TextTransformer, dict(self.text_encoder), "model.text_encoder")
      fixed = sorted(k for k in _FIXED_TEXT_ENCODER_KEYS if k in dict(self.text_encoder))
      if fixed:
        raise ValueError(f"model.text_encoder.{fixed[0]} is set by the captioner (the width is "
                         "the image tokens', the vocabulary the decoder's); remove it.")
    super().__post_init__()

  def _encodes_text(self) -> bool:
    return not self.prefix_lm and self.text_prefix_len > 0

  @property
  def vocab_size(self) -> int:
    return int(dict(self.decoder or {}).get("vocab_size", Decoder.vocab_size))

  def setup(self):
    self.img = _image_tower(self.image)
    kw = dict(self.decoder or {})
    self.dec = Decoder(**{**kw, "cross_attention": not self.prefix_lm,
                          "text_prefix_len": self.text_prefix_len if self.prefix_lm else 0},
                       name="dec")
    if self._encodes_text():
      arch = self.img.arch()
      self.txt = TextTransformer(**{
          **{k: arch[k] for k in ("depth", "num_heads", "mlp_dim")},
          **dict(self.text_encoder or {}), "width": arch["width"],
          "vocab_size": self.vocab_size, "pool": "none", "pad_mask": True,
          "num_classes": None}, name="txt")
    if self.prefix_lm:
      width = self.dec.arch()["width"]
      self.img_proj = nn.Dense(width, param_dtype=jnp.float32,
                               dtype=layers.to_dtype(kw.get("dtype", "float32")),
                               kernel_init=layers.logical(nn.initializers.lecun_normal(),
                                                          (None, "embed")),
                               bias_init=layers.logical(nn.initializers.zeros, ("embed",)))

  def encode(self, image, prefix=None, train=False):
    """-> {"tokens": [B, N, D]} (+ "prefix": int [B, P'], zeros when None, if the model has a
    text prefix): the decoder's conditioning."""
    tokens, _ = self.img(image, train=train)
    if self.prefix_lm:
      tokens = self.img_proj(tokens)
    enc = {"tokens": tokens}
    if self._encodes_text():
      return self._encode_text(enc, prefix, train)
    if self.text_prefix_len:
      if prefix is None:
        prefix = jnp.zeros((tokens.shape[0], self.text_prefix_len), jnp.int32)
      enc["prefix"] = jnp.asarray(prefix, jnp.int32)
    elif prefix is not None:
      raise ValueError("A text prefix was given but the captioner has text_prefix_len=0; set "
                       "model.prefix_lm=True and model.text_prefix_len.")
    return enc

  def _encode_text(self, enc, prefix, train):
    """Appends the encoded text prefix (pad slots masked) to the image tokens."""
    b, n = enc["tokens"].shape[:2]
    if prefix is None:
      prefix = jnp.zeros((b, self.text_prefix_len), jnp.int32)
    prefix = jnp.asarray(prefix, jnp.int32)
    if prefix.ndim != 2 or prefix.shape[1] > self.text_prefix_len:
      raise ValueError(f"prefix must be int [B, P] with P <= text_prefix_len="
                       f"{self.text_prefix_len}; got shape {tuple(prefix.shape)}.")
    prefix = jnp.pad(prefix, ((0, 0), (0, self.text_prefix_len - prefix.shape[1])))
    text, _ = self.txt(prefix, train=train)
    return {"tokens": jnp.concatenate([enc["tokens"], text.astype(enc["tokens"].dtype)], 1),
            "mask": jnp.concatenate([jnp.ones((b, n), bool), prefix != 0], 1)}

  def decode(self, inputs, enc, *, parallel=None, decode=False, position=None, cache_len=None,
             train=False):
    """Decoder inputs [B, T] -> logits [B, T, V] (decode=True: cached, at `position`)."""
    if self.prefix_lm:
      prefix_tokens = enc.get("prefix")
      if decode:
        # The image tokens and the text prefix were written by `prefill`; the tokens go after.
        n = enc["tokens"].shape[1] + (0 if prefix_tokens is None else prefix_tokens.shape[1])
        return self.dec(inputs, None, prefix=None, prefix_tokens=prefix_tokens, decode=True,
                        position=position, cache_len=cache_len, cached_prefix=n,
                        train=train)[0]
      return self.dec(inputs, None, prefix=enc["tokens"], prefix_tokens=prefix_tokens,
                      parallel=parallel, train=train)[0]
    return self.dec(inputs, enc["tokens"], parallel=parallel, decode=decode, position=position,
                    cache_len=cache_len, train=train, enc_mask=enc.get("mask"))[0]

  def prefill(self, enc, cache_len):
    """Creates the decoding cache: [B, cache_len] caption positions (+ the image tokens and
    text prefix)."""
    tokens = enc["tokens"]
    b = tokens.shape[0]
    if self.prefix_lm:
      prefix_tokens = enc.get("prefix")
      n = tokens.shape[1] + (0 if prefix_tokens is None else prefix_tokens.shape[1])
      self.dec(None, None, prefix=tokens, prefix_tokens=prefix_tokens, decode=True,
               cache_len=n + cache_len)
    else:
      # Position 0 is written again by the first decode step (BOS), so this write is harmless.
      self.dec(jnp.zeros((b, 1), jnp.int32), tokens, decode=True, position=0,
               cache_len=cache_len, enc_mask=enc.get("mask"))

  def __call__(self, image, text, *, prefix=None, parallel=None, train=False):
    enc = self.encode(image, prefix, train=train)
    return self.decode(shift_right(text), enc, parallel=parallel, train=train), {}


class CoCa(nn.Module):
  """image: the encoder's kwargs, as the Captioner's (its tokens); text: unimodal Decoder
  kwargs (vocab_size, max_len, widths); multimodal: Decoder kwargs of the multimodal decoder
  (depth, num_heads, mlp_dim; width and vocab come from `text`). out_dim: the contrastive
  embedding size."""
  image: Optional[Any] = None
  text: Optional[Any] = None
  multimodal: Optional[Any] = None
  out_dim: int = 512
  temperature_init: float = 1.0
  bias_init: Optional[float] = None

  def __post_init__(self):
    encoder_spec(self.image)
    check_kwargs(Decoder, dict(self.text or {}), "model.text")
    check_kwargs(Decoder, dict(self.multimodal or {}), "model.multimodal")
    if not self.temperature_init > 0:
      raise ValueError(f"temperature_init must be > 0; got {self.temperature_init}.")
    super().__post_init__()

  @property
  def vocab_size(self) -> int:
    return int(dict(self.text or {}).get("vocab_size", Decoder.vocab_size))

  def setup(self):
    self.img = _image_tower(self.image)
    arch = self.img.arch()
    txt_kw = dict(self.text or {})
    dtype = layers.to_dtype(txt_kw.get("dtype", "float32"))
    self.img_pool = layers.MAPHead(num_heads=arch["num_heads"], mlp_dim=arch["mlp_dim"],
                                   attn_implementation=self.img.attn_implementation,
                                   dtype=self.img.dtype)
    self.txt = Decoder(**{**txt_kw, "cross_attention": False, "head": False, "cls": True,
                          "mask_token": False},
                       name="txt")
    mm_kw = {k: v for k, v in txt_kw.items() if k not in ("depth", "variant")}
    mm_kw.update(dict(self.multimodal or {}))
    self.mm = Decoder(**{**mm_kw, "cross_attention": True, "embed_input": False, "head": True,
                         "cls": False, "mask_token": False}, name="mm")

    def proj():
      return nn.Dense(self.out_dim, dtype=dtype, param_dtype=jnp.float32,
                      kernel_init=layers.logical(nn.initializers.lecun_normal(), ("embed", None)),
                      bias_init=layers.logical(nn.initializers.zeros, (None,)))

    self.img_proj, self.txt_proj = proj(), proj()
    t_init = float(np.log(self.temperature_init))
    self.t = self.param("t", layers.logical(lambda k, s, d: jnp.full(s, t_init, d), (None,)),
                        (1,), jnp.float32)
    b_init = 0.0 if self.bias_init is None else float(self.bias_init)
    self.b = self.param("b", layers.logical(lambda k, s, d: jnp.full(s, b_init, d), (None,)),
                        (1,), jnp.float32)

  def encode(self, image, train=False):
    """-> {"tokens": [B, N, D]} and the L2-normalised contrastive embedding zimg [B, E]."""
    tokens, _ = self.img(image, train=train)
    return {"tokens": tokens}, l2_normalize(self.img_proj(self.img_pool(tokens)))

  def embed_text(self, text, train=False):
    """-> (L2-normalised text embedding [B, E], unimodal features [B, L, D])."""
    feats, out = self.txt(shift_right(text), train=train)
    return l2_normalize(self.txt_proj(out["cls"])), feats

  def decode(self, inputs, enc, *, decode=False, position=None, cache_len=None, train=False):
    """Decoder inputs [B, T] -> logits [B, T, V] (unimodal then multimodal decoder)."""
    feats, _ = self.txt(inputs, decode=decode, position=position, cache_len=cache_len,
                        train=train)
    return self.mm(feats, enc["tokens"], decode=decode, position=position, cache_len=cache_len,
                   train=train)[0]

  def prefill(self, enc, cache_len):
    b = enc["tokens"].shape[0]
    self.decode(jnp.zeros((b, 1), jnp.int32), enc, decode=True, position=0, cache_len=cache_len)

  def temperature_bias(self):
    return {"t": jnp.exp(self.t[0]), "t/parameterized": self.t[0], "b": self.b[0]}

  def __call__(self, image, text, *, train=False):
    enc, zimg = self.encode(image, train=train)
    ztxt, feats = self.embed_text(text, train=train)
    logits, _ = self.mm(feats, enc["tokens"], train=train)
    return zimg, ztxt, logits, self.temperature_bias()
