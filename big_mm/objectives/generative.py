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

Text prefix (a captioner with model.text_prefix_len > 0, e.g. a prompt or question; with
prefix_lm=True it is part of the decoder's bidirectional prefix, with prefix_lm=False the text
encoder encodes it for the cross-attention):
`prefix` int [B, P] (0 = pad; batch["prefix"] from input.prefix_column, tokenized to
input.prefix_len without EOS) conditions the caption with the image; it is never a target,
so the loss and log-likelihoods cover the caption tokens only. prefix=None: no text prefix
(all pad). Models without a text prefix reject a prefix. Config: input.prefix_column and
input.prefix_len > 0 go together and need a "captioner" with text_prefix_len >=
input.prefix_len (checked when the objective is built).

Other inputs (`objective.modality`, default "image"; big_mm/modalities.py): the encoder reads
batch[that modality's batch key], shaped by the contract (a pp-shaped kind by
input.pp_modalities, objectives.Context.shapes), e.g. video captioning:
  model.image = {"tower": "video_vit", ...}, objective.modality = "video",
  input.modalities = ("video", "text"), input.pp_modalities = {"video": "..."}.
`images` in the decoding API is then that input (a video batch [B, T, H, W, 3]). In binding
mode (every listed modality optional) rows without the input (`<key>_present` 0) get no
caption loss.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm import modalities as modalities_lib
from big_mm import sharding
from big_mm.models import aux_loss
from big_mm.objectives import base, losses
from big_mm.objectives.contrastive import check_loss_settings


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


def check_prefix(ctx: base.Context, model) -> None:
  """Fails fast unless input.prefix_column / prefix_len fit each other and the model."""
  column, length = ctx.prefix_column, int(ctx.prefix_len or 0)
  if not column and not length:
    return
  if not column or length <= 0:
    raise base.ConfigError(
        f"input.prefix_column={column!r} and input.prefix_len={length}: a text prefix needs "
        "both (the record field and its token length > 0); set both, or neither.")
  if ctx.modalities is not None:
    raise base.ConfigError(
        f"input.prefix_column={column!r} is not read with input.modalities="
        f"{tuple(ctx.modalities)}; unset one of them.")
  model_len = int(getattr(model, "text_prefix_len", 0) or 0)
  if not hasattr(model, "text_prefix_len"):
    raise base.ConfigError(
        f"input.prefix_column={column!r} needs model_name='captioner' with "
        f"model.text_prefix_len >= input.prefix_len={length}; got a {type(model).__name__}.")
  if model_len < length:
    raise base.ConfigError(
        f"input.prefix_len={length} but model.text_prefix_len={model_len}; set "
        f"model.text_prefix_len >= {length} (or shorten input.prefix_len).")


def check_token_settings(settings) -> None:
  if not 0.0 <= base.number("label_smoothing", settings["label_smoothing"]) < 1.0:
    raise base.ConfigError(f"objective.label_smoothing must be in [0, 1), got "
                           f"{settings['label_smoothing']!r}.")


def check_modality(settings) -> None:
  """objective.modality: a registered modality the encoder can read (not token ids)."""
  try:
    kind = modalities_lib.get(settings["modality"]).kind
  except ValueError as e:
    raise base.ConfigError(f"objective.modality: {e}") from None
  if kind in (modalities_lib.TOKENS, modalities_lib.CODES):
    raise base.ConfigError(f"objective.modality={settings['modality']!r} is token ids; the "
                           "encoder reads an image-like input, e.g. 'image' or 'video'.")


class DecodingAPI:
  """big_mm/decoding.py's interface over `self.model`, a model with encode / decode /
  prefill (Captioner, CoCa, LanguageModel). Subclasses set model, vocab_size, max_text_len;
  log_likelihood needs their `_logits(params, images, texts[, prefix=])` (teacher-forced)."""

  def _apply(self, params, *args, **kw):
    return self.model.apply({"params": params}, *args, **kw)

  def _prefix_kw(self, prefix):
    if prefix is None:
      return {}
    if not getattr(self.model, "text_prefix_len", 0):
      raise ValueError(f"A text prefix was given, but this {type(self.model).__name__} has no "
                       "text prefix (it needs model.text_prefix_len > 0).")
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
    """Log-probability of the target tokens (never the prefix) and their count."""
    logits = self._logits(params, images, texts, **self._prefix_kw(prefix))
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, texts[..., None], axis=-1)[..., 0]
    mask = texts != 0
    return jnp.sum(jnp.where(mask, token_logp, 0.0), axis=1), jnp.sum(mask, axis=1).astype(
        jnp.int32)


class _Generative(DecodingAPI):
  """What Captioning and CoCa share besides DecodingAPI. Reads the context's
  mesh, text_len and tokenizer (required: its vocabulary must be the model's, `VOCAB_KEY`), and
  the encoder's input, objective.modality (its batch key; Context.shapes for pp-shaped kinds)."""
  BATCH_KEYS = ("image", "text")

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    base.check_vocab(ctx, model.vocab_size, self.VOCAB_KEY, needed_by=self.NAME)
    self.model = model
    self.ctx = ctx
    self.mesh = ctx.mesh
    self.vocab_size = model.vocab_size
    self.max_text_len = int(ctx.text_len)
    self.label_smoothing = float(settings["label_smoothing"])
    self.settings = settings
    self.modality = modalities_lib.get(settings["modality"]).name
    self.input_key = modalities_lib.get(self.modality).batch_key

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    return base.modality_example(self.ctx, (self.modality, "text"))

  def init_params(self, rng):
    example = base.zeros(self.example_batch())
    return self.model.init({"params": rng}, example[self.input_key], example["text"],
                           train=False)["params"]

  def _inputs(self, batch):
    """(the encoder's input, the caption tokens, valid [B] or None): in binding mode `valid`
    marks the rows with both the input and a caption, and the others' tokens are all pad (no
    targets)."""
    flags = [batch[k] for k in (modalities_lib.present_key(self.modality),
                                modalities_lib.present_key("text")) if k in batch]
    if not flags:
      return batch[self.input_key], batch["text"], None
    valid = jnp.prod(jnp.stack(flags), axis=0) > 0
    return batch[self.input_key], jnp.where(valid[:, None], batch["text"], 0), valid


class Captioning(_Generative):
  """Cap / CapPa (model "captioner", also its prefix-LM option with a text prefix: the
  context's prefix_column / prefix_len)."""
  NAME = "captioning"
  VOCAB_KEY = "model.decoder.vocab_size"
  # parallel_fraction: fraction of examples trained with CapPa's parallel prediction (all
  # decoder inputs [MASK], no causal mask; CapPa 0.75); label_smoothing of the token loss.
  SETTINGS = dict(parallel_fraction=0.0, label_smoothing=0.0, modality="image")
  BATCH_KEYS = ("image", "text", "prefix")

  @classmethod
  def check_settings(cls, settings) -> None:
    if not 0.0 <= base.number("parallel_fraction", settings["parallel_fraction"]) <= 1.0:
      raise base.ConfigError(
          f"objective.parallel_fraction must be in [0, 1] (the fraction of examples trained "
          f"with parallel prediction), got {settings['parallel_fraction']!r}.")
    check_token_settings(settings)
    check_modality(settings)

  def __init__(self, model, ctx: base.Context, **settings):
    super().__init__(model, ctx, **settings)
    check_prefix(ctx, model)
    self.parallel_fraction = float(self.settings["parallel_fraction"])

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    example = super().example_batch()
    if self.ctx.prefix_column:
      example["prefix"] = jax.ShapeDtypeStruct((1, self.ctx.prefix_len), jnp.int32)
    return example

  def _logits(self, params, images, texts, prefix=None):
    return self._apply(params, images, texts, prefix=prefix, train=False)[0]

  def loss_fn(self, params, batch, rng):
    """Token loss on the caption (batch["text"]); batch["prefix"], if any, only conditions."""
    inputs, text, _ = self._inputs(batch)
    rng_parallel, rng_dropout = jax.random.split(rng)
    parallel = None
    if self.parallel_fraction > 0:
      parallel = jax.random.uniform(rng_parallel, (text.shape[0],)) < self.parallel_fraction
    (logits, _), aux = aux_loss.apply(self.model, params, inputs, text,
                                      parallel=parallel, train=True,
                                      rngs={"dropout": rng_dropout},
                                      **self._prefix_kw(batch.get("prefix")))
    loss, metrics = token_loss(logits, text, self.label_smoothing)
    if parallel is not None:
      metrics["caption/parallel_fraction"] = jnp.mean(parallel.astype(jnp.float32))
    return aux_loss.add(loss, metrics, aux)


class CoCa(_Generative):
  """CoCa (model "coca"): contrastive + captioning; embed_images / embed_texts as Contrastive."""
  NAME = "coca"
  VOCAB_KEY = "model.text.vocab_size"
  # loss = contrastive_weight * contrastive (loss / strategy / implementation as the
  # contrastive objective's) + caption_weight * captioning (label_smoothing).
  SETTINGS = dict(loss="sigmoid", strategy="all_gather", implementation="xla",
                  label_smoothing=0.0, contrastive_weight=1.0, caption_weight=2.0,
                  modality="image")

  @classmethod
  def check_settings(cls, settings) -> None:
    check_loss_settings(settings)
    check_token_settings(settings)
    check_modality(settings)
    for key in ("contrastive_weight", "caption_weight"):
      if base.number(key, settings[key]) < 0:
        raise base.ConfigError(f"objective.{key} must be >= 0, got {settings[key]!r}.")
    if not settings["contrastive_weight"] + settings["caption_weight"]:
      raise base.ConfigError(
          "objective.contrastive_weight and objective.caption_weight are both 0: the coca loss "
          "would be 0; give at least one a positive weight.")

  def __init__(self, model, ctx: base.Context, **settings):
    super().__init__(model, ctx, **settings)
    self.loss_name = self.settings["loss"]
    self.strategy = self.settings["strategy"]
    self.implementation = self.settings["implementation"]
    self.contrastive_weight = float(self.settings["contrastive_weight"])
    self.caption_weight = float(self.settings["caption_weight"])

  def _logits(self, params, images, texts):
    return self._apply(params, images, texts, train=False)[2]

  def loss_parts(self, params, batch, rng):
    """-> (contrastive loss, caption loss, metrics with the model's aux_loss/* terms)."""
    inputs, text, valid = self._inputs(batch)
    (zimg, ztxt, logits, out), aux = aux_loss.apply(self.model, params, inputs, text,
                                                    train=True, rngs={"dropout": rng})
    contrastive = losses.contrastive_loss(
        zimg, ztxt, out["t"], out["b"], loss=self.loss_name, strategy=self.strategy,
        implementation=self.implementation, mesh=self.mesh,
        batch_axes=sharding.batch_axes(self.mesh) if self.mesh is not None else (),
        valid=valid)
    caption, metrics = token_loss(logits, text, self.label_smoothing)
    metrics.update(out)
    metrics["contrastive_loss"] = contrastive
    metrics["caption_loss"] = caption
    metrics["img_txt_cos/pos"] = jnp.mean(jnp.sum(zimg * ztxt, axis=-1))
    metrics.update(aux)
    return contrastive, caption, metrics

  def loss_fn(self, params, batch, rng):
    contrastive, caption, metrics = self.loss_parts(params, batch, rng)
    loss = self.contrastive_weight * contrastive + self.caption_weight * caption
    return aux_loss.add(loss, metrics)  # the aux terms are in metrics already

  def embed_images(self, params, images):
    return self._apply(params, images, method=type(self.model).encode)[1]

  def embed_texts(self, params, texts):
    return self._apply(params, texts, method=type(self.model).embed_text)[0]
