"""CM3 (Aghajanyan et al. 2022, "CM3: A Causal Masked Multimodal Model of the Internet"):
a causal decoder (model "lm") trained left to right on causally masked documents of
interleaved image tokens and text.

Documents. Per example, the image's VQ codes (batch["tok_rgb"] int32 [B, N], from a
vq_tokenizer run: tools/tokenize_dataset.py) and its caption (batch["text"] [B, L]) become
  image block [IMG_START, code_1 .. code_N, IMG_END] and text block [TXT_START, caption, TXT_END]
in random order (image first with probability `image_first_prob`), in one vocabulary
(`DocumentVocab`): the text pieces (0 = pad / BOS, 1 = EOS), then the N codes, then the four
modality boundary tokens, then the `max_spans` sentinels <mask:0..K-1>.

Causal masking (CM3 §2.2). Per document, k spans are masked, k ~ Poisson(`mean_spans`) clamped
to [`min_spans`, `max_spans`] (CM3: Poisson(1) clamped to [1, 16], recalled from the paper; its
text was not reachable to re-check here). The spans are uniformly random, non-empty,
non-overlapping and non-adjacent (2k distinct cut points of the document drawn uniformly; they
may cross a modality boundary). Span i is replaced in place by <mask:i> and appended, after the
same <mask:i>, at the end, in order; then EOS:
  [body with <mask:0> .. <mask:k-1>] <mask:0> span_0 .. <mask:k-1> span_{k-1} EOS
The model is trained on every token of that sequence (token cross-entropy, pads skipped), so it
both generates left to right and, at the end, infills each span with context from both sides.
Shapes are static: documents are [B, N + L + 4], sequences [B, N + L + 4 + 2 * max_spans + 1]
(the decoder's max_len must hold them).

Metrics: `cm3/nll`, `cm3/token_accuracy`, `cm3/nll_image` and `cm3/nll_text` (targets that are
codes / text pieces), `cm3/nll_infill` (the moved spans and the final EOS), `cm3/num_spans`.

Decoding: the LM's decoding API (generative.DecodingAPI) for big_mm/decoding.py with a prompt
(`prompt()` builds them from parts): left-to-right generation (caption after an image, image
after a caption) and infilling (a document with <mask:0> in place, then <mask:0>; generation
stops at EOS). `uncausal` inverts the masking (numpy).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from big_mm.models import aux_loss
from big_mm.models import lm as lm_lib
from big_mm.models import vq
from big_mm.objectives import base
from big_mm.objectives.generative import DecodingAPI, check_token_settings, token_loss

EOS_ID = 1
NUM_BOUNDARY_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class DocumentVocab:
  """Token ids of CM3 documents: text pieces, image codes, boundaries, sentinels."""
  text_vocab: int
  code_vocab: int
  num_sentinels: int

  @property
  def code_start(self) -> int:
    return self.text_vocab

  @property
  def img_start(self) -> int:
    return self.text_vocab + self.code_vocab

  @property
  def img_end(self) -> int:
    return self.img_start + 1

  @property
  def txt_start(self) -> int:
    return self.img_start + 2

  @property
  def txt_end(self) -> int:
    return self.img_start + 3

  @property
  def sentinel_start(self) -> int:
    return self.img_start + NUM_BOUNDARY_TOKENS

  def sentinel(self, k: int) -> int:
    if not 0 <= k < self.num_sentinels:
      raise ValueError(f"Sentinel {k} out of range: the vocabulary has {self.num_sentinels}.")
    return self.sentinel_start + k

  @property
  def size(self) -> int:
    return self.sentinel_start + self.num_sentinels

  def image_block(self, codes) -> np.ndarray:
    codes = np.asarray(codes)
    return np.concatenate([[self.img_start], codes + self.code_start, [self.img_end]])

  def text_block(self, caption) -> np.ndarray:
    """caption: its text pieces (no EOS, no pads)."""
    return np.concatenate([[self.txt_start], np.asarray(caption), [self.txt_end]])

  def codes(self, tokens) -> tuple[np.ndarray, np.ndarray]:
    """Generated tokens -> (codes, valid): tokens outside the code range get code 0."""
    codes = np.asarray(tokens) - self.code_start
    valid = (codes >= 0) & (codes < self.code_vocab)
    return np.where(valid, codes, 0), valid


def caption_length(text):
  """Number of caption pieces before the first EOS or pad of each row of text [B, L]."""
  content = (text != 0) & (text != EOS_ID)
  return jnp.sum(jnp.cumprod(content.astype(jnp.int32), axis=1), axis=1)


def build_documents(codes, text, image_first, vocab: DocumentVocab):
  """codes [B, N], text [B, L], image_first bool [B] -> (documents int32 [B, N + L + 4], their
  lengths [B]); pads (0) after each document."""
  b, n = codes.shape
  length = text.shape[1]
  c = caption_length(text)
  image = jnp.concatenate([jnp.full((b, 1), vocab.img_start), codes + vocab.code_start,
                           jnp.full((b, 1), vocab.img_end)], axis=1).astype(jnp.int32)
  j = jnp.arange(length + 2)[None, :]
  shifted = jnp.pad(text, ((0, 0), (1, 1)))
  words = jnp.where((j >= 1) & (j <= c[:, None]), shifted, 0)
  caption = jnp.where(j == 0, vocab.txt_start,
                      jnp.where(j == c[:, None] + 1, vocab.txt_end, words)).astype(jnp.int32)
  width = n + length + 4
  p = jnp.arange(width)[None, :]
  t_len = (c + 2)[:, None]

  def take(x, idx, valid):
    got = jnp.take_along_axis(x, jnp.clip(idx, 0, x.shape[1] - 1), axis=1)
    return jnp.where(valid, got, 0)

  image_then_text = jnp.where(p < n + 2, take(image, p, True),
                              take(caption, p - (n + 2), p < n + 2 + t_len))
  text_then_image = jnp.where(p < t_len, take(caption, p, True),
                              take(image, p - t_len, p < t_len + n + 2))
  docs = jnp.where(image_first[:, None], image_then_text, text_then_image)
  return docs.astype(jnp.int32), (n + 2 + c + 2).astype(jnp.int32)


def causal_mask(rng, docs, lengths, *, mean_spans: float, min_spans: int, max_spans: int,
                sentinel_start: int):
  """CM3's causal masking of each row (module docstring).

  docs int [B, W] (row b: lengths[b] tokens, then pads) -> (sequences int32
  [B, W + 2 * max_spans + 1], body lengths [B] (the masked document before the moved spans),
  number of spans [B]). Span i's sentinel is sentinel_start + i."""
  width = docs.shape[1]
  out_len = width + 2 * max_spans + 1
  none = width + 1  # a cut point past every position

  def row(key, x, n):
    k_points, k_count = jax.random.split(key)
    k = jnp.clip(jax.random.poisson(k_count, mean_spans), min_spans, max_spans)
    k = jnp.minimum(k, (n + 1) // 2).astype(jnp.int32)  # 2k distinct cut points in [0, n]
    points = jnp.arange(width + 1)
    keys = jnp.where(points <= n, jax.random.uniform(k_points, (width + 1,)), 2.0)
    first = jnp.argsort(keys)[:2 * max_spans]
    cuts = jnp.sort(jnp.where(jnp.arange(2 * max_spans) < 2 * k, first, none))
    starts, ends = cuts[0::2], cuts[1::2]  # [max_spans]; span i exists when i < k
    j = jnp.arange(width)
    inside = (j[None, :] >= starts[:, None]) & (j[None, :] < ends[:, None])
    in_span = jnp.any(inside, axis=0)
    span = jnp.argmax(inside, axis=0)
    is_start = in_span & (j == starts[span])
    kept = (j < n) & (~in_span | is_start)
    body = jnp.where(is_start, sentinel_start + span, x)
    body_len = jnp.sum(kept)
    lens = jnp.where(jnp.arange(max_spans) < k, ends - starts, 0)
    offsets = body_len + jnp.cumsum(1 + lens) - (1 + lens)  # where each moved span begins
    seq = jnp.zeros((out_len,), jnp.int32)
    seq = seq.at[jnp.where(kept, jnp.cumsum(kept) - 1, out_len)].set(body, mode="drop")
    exists = jnp.arange(max_spans) < k
    seq = seq.at[jnp.where(exists, offsets, out_len)].set(
        sentinel_start + jnp.arange(max_spans), mode="drop")
    moved = in_span & (j < n)
    seq = seq.at[jnp.where(moved, offsets[span] + 1 + j - starts[span], out_len)].set(
        x, mode="drop")
    seq = seq.at[n + 2 * k].set(EOS_ID)
    return seq, body_len.astype(jnp.int32), k

  keys = jax.random.split(rng, docs.shape[0])
  return jax.vmap(row)(keys, docs.astype(jnp.int32), lengths)


def uncausal(seq, sentinel_start: int, num_sentinels: int) -> np.ndarray:
  """Inverse of causal_mask for one sequence (numpy): the document, without pads."""
  seq = [int(t) for t in np.asarray(seq)]
  seq = seq[:seq.index(EOS_ID)] if EOS_ID in seq else seq
  is_sentinel = [sentinel_start <= t < sentinel_start + num_sentinels for t in seq]
  k = sum(is_sentinel) // 2
  if not k:
    return np.asarray(seq, np.int64)
  tail = [i for i, s in enumerate(is_sentinel) if s][k]  # the second <mask:0>
  body, moved = seq[:tail], seq[tail:]
  spans, current = {}, None
  for t in moved:
    if sentinel_start <= t < sentinel_start + num_sentinels:
      current = t
      spans[current] = []
    else:
      spans[current].append(t)
  out = []
  for t in body:
    out.extend(spans[t] if t in spans else [t])
  return np.asarray(out, np.int64)


def prompt(parts, width: int) -> np.ndarray:
  """Concatenates token lists (one row) and pads to `width`: a decoding prompt."""
  row = np.concatenate([np.asarray(p, np.int64).reshape(-1) for p in parts])
  if len(row) > width:
    raise ValueError(f"A prompt of {len(row)} tokens does not fit width {width}.")
  return np.pad(row, (0, width - len(row))).astype(np.int32)


class CM3(DecodingAPI):
  """Objective "cm3" over model "lm" (big_mm/models/lm.py). See the module docstring."""
  NAME = "cm3"
  # image_tokens / image_vocab: the codes per image (N) and the codebook size of
  # batch["tok_rgb"]; image_tokenizer: its vq_tokenizer workdir (decodes generated images;
  # optional); image_first_prob: documents with the image before the caption; spans per
  # document ~ Poisson(mean_spans) clamped to [min_spans, max_spans] (max_spans sentinels).
  SETTINGS = dict(image_tokens=16, image_vocab=1000, image_tokenizer="", image_first_prob=0.5,
                  mean_spans=1.0, min_spans=1, max_spans=4, label_smoothing=0.0)
  BATCH_KEYS = ("tok_rgb", "text")

  @classmethod
  def check_settings(cls, settings) -> None:
    for key in ("image_tokens", "image_vocab", "max_spans"):
      base.positive_int(key, settings[key])
    if not 0 <= base.number("image_first_prob", settings["image_first_prob"]) <= 1:
      raise base.ConfigError("objective.image_first_prob must be in [0, 1], got "
                             f"{settings['image_first_prob']!r}.")
    if not base.number("mean_spans", settings["mean_spans"]) >= 0:
      raise base.ConfigError(f"objective.mean_spans must be >= 0, got {settings['mean_spans']!r}.")
    min_spans = settings["min_spans"]
    if not isinstance(min_spans, int) or not 0 <= min_spans <= settings["max_spans"]:
      raise base.ConfigError(f"objective.min_spans must be an int in [0, max_spans="
                             f"{settings['max_spans']}], got {min_spans!r}.")
    if not isinstance(settings["image_tokenizer"], str):
      raise base.ConfigError("objective.image_tokenizer must be a vq_tokenizer workdir (a "
                             f"string, '' = none), got {settings['image_tokenizer']!r}.")
    check_token_settings(settings)

  def __init__(self, model, ctx: base.Context, *, loaded_tokenizer=None, **settings):
    """loaded_tokenizer: an image tokenizer object (big_mm.models.vq.load's API) used instead of
    loading the `image_tokenizer` setting (tests)."""
    settings = base.fill(type(self), settings)
    if not isinstance(model, lm_lib.LanguageModel) or model.text_prefix_len:
      raise base.ConfigError("objective.name='cm3' needs model_name='lm' with "
                             "model.text_prefix_len=0 (a causal decoder).")
    if ctx.tokenizer is None:
      raise base.ConfigError("objective.name='cm3' predicts text, so it needs input.tokenizer "
                             "(the path of a SentencePiece .model, e.g. data/digits_spm.model).")
    if ctx.modalities is not None and not set(self.BATCH_KEYS) <= set(ctx.modalities):
      raise base.ConfigError(f"objective.name='cm3' reads {self.BATCH_KEYS}; set "
                             f"input.modalities={self.BATCH_KEYS}.")
    self.model, self.ctx, self.mesh = model, ctx, ctx.mesh
    self.settings = settings
    self.num_codes = int(settings["image_tokens"])
    self.max_spans = int(settings["max_spans"])
    self.vocab = DocumentVocab(int(ctx.tokenizer.vocab_size), int(settings["image_vocab"]),
                               self.max_spans)
    if model.vocab_size != self.vocab.size:
      raise base.ConfigError(
          f"model.decoder.vocab_size={model.vocab_size} but CM3 documents need "
          f"{self.vocab.size} ids ({self.vocab.text_vocab} text pieces + {self.vocab.code_vocab}"
          f" image codes + {NUM_BOUNDARY_TOKENS} boundary tokens + {self.max_spans} sentinels); "
          f"set model.decoder.vocab_size={self.vocab.size}.")
    self.doc_len = self.num_codes + int(ctx.text_len) + 4
    self.seq_len = self.doc_len + 2 * self.max_spans + 1
    if model.max_len < self.seq_len:
      raise base.ConfigError(
          f"model.decoder.max_len={model.max_len} is shorter than CM3's sequences: "
          f"{self.seq_len} = image_tokens {self.num_codes} + text_len {ctx.text_len} + 4 "
          f"boundary tokens + 2 * max_spans {self.max_spans} + EOS; set it to >= {self.seq_len}.")
    self.vocab_size = model.vocab_size
    self.max_text_len = model.max_len
    self.label_smoothing = float(settings["label_smoothing"])
    self.tokenizer = loaded_tokenizer
    if self.tokenizer is None and settings["image_tokenizer"]:
      self.tokenizer = vq.load(settings["image_tokenizer"])
    if self.tokenizer is not None and (
        (int(self.tokenizer.vocab_size), int(self.tokenizer.num_tokens))
        != (self.vocab.code_vocab, self.num_codes)):
      raise base.ConfigError(
          f"The image tokenizer has {self.tokenizer.vocab_size} codes and "
          f"{self.tokenizer.num_tokens} tokens per image, but objective.image_vocab="
          f"{self.vocab.code_vocab} and image_tokens={self.num_codes}; set them to match.")

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    return {"tok_rgb": jax.ShapeDtypeStruct((1, self.num_codes), jnp.int32),
            "text": jax.ShapeDtypeStruct((1, int(self.ctx.text_len)), jnp.int32)}

  def init_params(self, rng):
    return self.model.init({"params": rng}, jnp.zeros((1, self.seq_len), jnp.int32),
                           train=False)["params"]

  def sequences(self, batch, rng):
    """The causally masked documents of a batch -> (int32 [B, seq_len], body lengths [B],
    spans per row [B])."""
    k_order, k_mask = jax.random.split(rng)
    codes, text = batch["tok_rgb"], batch["text"]
    image_first = jax.random.uniform(k_order, (codes.shape[0],)) < self.settings[
        "image_first_prob"]
    docs, lengths = build_documents(codes, text, image_first, self.vocab)
    return causal_mask(k_mask, docs, lengths, mean_spans=float(self.settings["mean_spans"]),
                       min_spans=int(self.settings["min_spans"]), max_spans=self.max_spans,
                       sentinel_start=self.vocab.sentinel_start)

  def loss_fn(self, params, batch, rng):
    rng_docs, rng_dropout = jax.random.split(rng)
    seq, body_len, spans = self.sequences(batch, rng_docs)
    logits, aux = aux_loss.apply(self.model, params, seq, train=True,
                                 rngs={"dropout": rng_dropout})
    loss, token_metrics = token_loss(logits, seq, self.label_smoothing)
    metrics = {"cm3/nll": token_metrics["caption/nll"],
               "cm3/token_accuracy": token_metrics["caption/token_accuracy"],
               "cm3/num_spans": jnp.mean(spans.astype(jnp.float32))}
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, seq[..., None], axis=-1)[..., 0]
    v = self.vocab
    groups = {"image": (seq >= v.code_start) & (seq < v.img_start),
              "text": (seq > EOS_ID) & (seq < v.text_vocab),
              "infill": (jnp.arange(seq.shape[1])[None, :] >= body_len[:, None]) & (seq != 0)}
    for name, mask in groups.items():
      metrics[f"cm3/nll_{name}"] = jnp.sum(jnp.where(mask, nll, 0.0)) / jnp.maximum(
          jnp.sum(mask), 1)
    return aux_loss.add(loss, metrics, aux)
