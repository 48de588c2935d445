"""Generative image-text objectives: captioning (Cap / CapPa / prefix-LM) and CoCa.

Token convention: text [B, L] is 0-padded with EOS=1
after the last word; the decoder reads [BOS=0] + text[:, :-1] and predicts text; the loss
skips pad targets (EOS is a target).

`Captioning`: token cross-entropy (optional label smoothing). With
`objective.parallel_fraction = p > 0` each example is, with probability p, trained with
CapPa's parallel prediction (all decoder inputs [MASK], no causal mask; 0.75 in CapPa).
`CoCa`: contrastive_weight * contrastive (losses.contrastive_loss: objective.loss /
strategy / implementation) + caption_weight * captioning.

Both provide the decoding API used by big_mm/decoding.py and the evaluators:
  encode(params, images, prefix=None) -> enc
  init_cache(params, enc, max_len) -> cache
  decode_step(params, enc, cache, tokens [B], position) -> (logits [B, V], cache)
  log_likelihood(params, images, texts, prefix=None) -> (sum_logp [B], num_tokens [B])
Every enc / cache leaf has a leading batch axis (beams may repeat / reorder them).

Text prefix (prefix-LM captioner with model.text_prefix_len > 0, e.g. a prompt or question):
`prefix` int [B, P] (0 = pad; batch["prefix"] from input.prefix_column, tokenized to
input.prefix_len without EOS) conditions the caption with the image; it is never a target,
so the loss and log-likelihoods cover the caption tokens only. prefix=None: no text prefix
(all pad). Models without a text prefix reject a prefix. Config: input.prefix_column and
input.prefix_len > 0 go together and need a "captioner" with prefix_lm=True and
text_prefix_len >= input.prefix_len (checked when the objective is built).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm import config as config_lib
from big_mm import sharding
from big_mm.input.tokenizer import Tokenizer
from big_mm.objectives import losses, options


def token_loss(logits, targets, label_smoothing: float = 0.0):
  """Mean cross-entropy over non-pad targets (target != 0), and metrics.

  label_smoothing s: the target distribution is (1 - s) one-hot + s uniform over the vocab.
  """
  logits = logits.astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  ce = nll
  if label_smoothing:
    ce = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
  weights = (targets != 0).astype(jnp.float32)
  count = jnp.maximum(jnp.sum(weights), 1.0)
  loss = jnp.sum(ce * weights) / count
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {"caption/nll": jnp.sum(nll * weights) / count,
             "caption/token_accuracy": jnp.sum(correct * weights) / count}
  return loss, metrics


def check_vocab(config, model):
  """Fails fast unless input.tokenizer is set and its vocab matches the model's."""
  name = config.objective.name
  if not config.input.tokenizer:
    raise config_lib.ConfigError(
        f"objective.name={name!r} predicts tokens, so it needs input.tokenizer (the path of a "
        "SentencePiece .model, e.g. data/digits_spm.model).")
  tokenizer_vocab = Tokenizer(config.input.tokenizer).vocab_size
  if model.vocab_size != tokenizer_vocab:
    key = "model.text.vocab_size" if config.model_name == "coca" else "model.decoder.vocab_size"
    raise config_lib.ConfigError(
        f"{key}={model.vocab_size} but the tokenizer {config.input.tokenizer!r} has "
        f"{tokenizer_vocab} pieces; set {key}={tokenizer_vocab}.")


def check_prefix(config, model):
  """Fails fast unless input.prefix_column / prefix_len fit each other and the model."""
  column, length = config.input.get("prefix_column"), int(config.input.get("prefix_len") or 0)
  if not column and not length:
    return
  if not column or length <= 0:
    raise config_lib.ConfigError(
        f"input.prefix_column={column!r} and input.prefix_len={length}: a text prefix needs "
        "both (the record field and its token length > 0); set both, or neither.")
  if config.model_name != "captioner" or not getattr(model, "prefix_lm", False):
    raise config_lib.ConfigError(
        f"input.prefix_column={column!r} needs model_name='captioner' with model.prefix_lm=True "
        f"and model.text_prefix_len >= input.prefix_len={length}; got model_name="
        f"{config.model_name!r}" + (" with prefix_lm=False." if config.model_name == "captioner"
                                    else "."))
  model_len = int(getattr(model, "text_prefix_len", 0) or 0)
  if model_len < length:
    raise config_lib.ConfigError(
        f"input.prefix_len={length} but model.text_prefix_len={model_len}; set "
        f"model.text_prefix_len >= {length} (or shorten input.prefix_len).")


class _Generative:
  """The decoding API shared by Captioning and CoCa (the model has encode/decode/prefill)."""

  def __init__(self, config, model, mesh):
    check_vocab(config, model)
    check_prefix(config, model)
    options.refuse_unused(config, self.NAME)
    self.model = model
    self.mesh = mesh
    self.vocab_size = model.vocab_size
    self.max_text_len = int(config.input.text_len)
    self.label_smoothing = float(config.objective.label_smoothing)

  def _apply(self, params, *args, **kw):
    return self.model.apply({"params": params}, *args, **kw)

  def _prefix_kw(self, prefix):
    if prefix is None:
      return {}
    if not getattr(self.model, "text_prefix_len", 0):
      raise ValueError(f"A text prefix was given, but this {type(self.model).__name__} has no "
                       "text prefix (it needs a captioner with prefix_lm=True and "
                       "text_prefix_len > 0).")
    return {"prefix": prefix}

  def encode(self, params, images, prefix=None):
    enc = self._apply(params, images, method=type(self.model).encode, **self._prefix_kw(prefix))
    return enc[0] if isinstance(enc, tuple) else enc  # CoCa also returns its embedding

  def init_cache(self, params, enc, max_len):
    _, variables = self._apply(params, enc, max_len, method=type(self.model).prefill,
                               mutable=["cache"])
    return variables["cache"]

  def decode_step(self, params, enc, cache, tokens, position):
    # The cache exists, so its length comes from the cached arrays (cache_len is unused).
    logits, variables = self.model.apply(
        {"params": params, "cache": cache}, tokens[:, None], enc, decode=True,
        position=position, cache_len=None, method=type(self.model).decode, mutable=["cache"])
    return logits[:, 0].astype(jnp.float32), variables["cache"]

  def log_likelihood(self, params, images, texts, prefix=None):
    """Log-probability of the caption tokens (never the prefix) and their count."""
    logits = self._logits(params, images, texts, **self._prefix_kw(prefix))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, texts[..., None], axis=-1)[..., 0]
    mask = texts != 0
    return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=1), jnp.sum(mask, axis=1).astype(
        jnp.int32)


class Captioning(_Generative):
  """Cap / CapPa (model "captioner", also its prefix-LM option)."""
  NAME = "captioning"

  def __init__(self, config, model, mesh):
    super().__init__(config, model, mesh)
    self.parallel_fraction = float(config.objective.parallel_fraction)

  def _logits(self, params, images, texts, prefix=None):
    return self._apply(params, images, texts, prefix=prefix, train=False)[0]

  def loss_fn(self, params, batch, rng):
    """Token loss on the caption (batch["text"]); batch["prefix"], if any, only conditions."""
    text = batch["text"]
    rng_parallel, rng_dropout = jax.random.split(rng)
    parallel = None
    if self.parallel_fraction > 0:
      parallel = jax.random.uniform(rng_parallel, (text.shape[0],)) < self.parallel_fraction
    logits, _ = self._apply(params, batch["image"], text, parallel=parallel, train=True,
                            rngs={"dropout": rng_dropout},
                            **self._prefix_kw(batch.get("prefix")))
    loss, metrics = token_loss(logits, text, self.label_smoothing)
    if parallel is not None:
      metrics["caption/parallel_fraction"] = jnp.mean(parallel.astype(jnp.float32))
    return loss, metrics


class CoCa(_Generative):
  """CoCa (model "coca"): contrastive + captioning; embed_images / embed_texts as Contrastive."""
  NAME = "coca"

  def __init__(self, config, model, mesh):
    super().__init__(config, model, mesh)
    obj = config.objective
    self.loss_name = obj.loss
    self.strategy = obj.strategy
    self.implementation = obj.implementation
    self.contrastive_weight = float(obj.contrastive_weight)
    self.caption_weight = float(obj.caption_weight)

  def _logits(self, params, images, texts):
    return self._apply(params, images, texts, train=False)[2]

  def loss_parts(self, params, batch, rng):
    """-> (contrastive loss, caption loss, metrics)."""
    zimg, ztxt, logits, out = self._apply(params, batch["image"], batch["text"], train=True,
                                          rngs={"dropout": rng})
    contrastive = losses.contrastive_loss(
        zimg, ztxt, out["t"], out["b"], loss=self.loss_name, strategy=self.strategy,
        implementation=self.implementation, mesh=self.mesh,
        batch_axes=sharding.batch_axes(self.mesh) if self.mesh is not None else ())
    caption, metrics = token_loss(logits, batch["text"], self.label_smoothing)
    metrics.update(out)
    metrics["contrastive_loss"] = contrastive
    metrics["caption_loss"] = caption
    metrics["img_txt_cos/pos"] = jnp.mean(jnp.sum(zimg * ztxt, axis=-1))
    return contrastive, caption, metrics

  def loss_fn(self, params, batch, rng):
    contrastive, caption, metrics = self.loss_parts(params, batch, rng)
    return self.contrastive_weight * contrastive + self.caption_weight * caption, metrics

  def embed_images(self, params, images):
    return self._apply(params, images, method=type(self.model).encode)[1]

  def embed_texts(self, params, texts):
    return self._apply(params, texts, method=type(self.model).embed_text)[0]
