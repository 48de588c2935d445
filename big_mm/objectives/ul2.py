"""UL2's mixture of denoisers (Tay et al. 2022, "UL2: Unifying Language Learning Paradigms",
ICLR 2023) over captions or image-text documents: objective "ul2".

Per example one denoiser (mode, mean_span, rate, weight) is drawn with probability ~ weight;
its corrupted caption, after its mode token, is the model's bidirectional text prefix and its
targets are the decoder's tokens (token cross-entropy, pads skipped). Modes:
  R (regular) and X (extreme): T5 span corruption (denoising.span_corrupt: noise spans become
    sentinels in the input; the targets are each sentinel then its span), mean span length
    `mean_span`, corruption rate `rate`;
  S (sequential): prefix LM (denoising.prefix_split: a prefix of the caption is the input, the
    rest the targets, about `rate` of it; `mean_span` is unused, None).
All denoisers run on the whole batch (static shapes) and each row keeps its drawn one.

What the sources say (the paper's text was not reachable here; facts below from copies):
- The mixture is 7 denoisers (paper §3.1.2): R (mu=3, r=0.15), (mu=8, r=0.15); S (r=0.25, one
  span: the suffix); X (3, 0.5), (8, 0.5), (64, 0.15), (64, 0.5). Source: the R / X values as
  quoted "from UL2 paper chapter 3.1.2 table 1" in huggingface.co/Finnish-NLP/
  ul2-small-nl24-finnish tasks.py; S as quoted in the text-denoising package's README
  ("S-denoiser (mu = L/4, r = 0.25, 1)").
- Mode (paradigm) tokens: R -> [NLU], X -> [NLG], S -> [S2S], prepended to the input (same
  tasks.py; huggingface.co/google/ul2's model card prompts S-denoising with [S2S]).
- The paper's appendix code (its `ul2_objective`, as copied in public repositories) builds R / X
  with T5's span corruption (t5.data.preprocessors random_spans_noise_mask: uniformly random
  span lengths; the paper's text speaks of lengths drawn around mean mu) and S with T5's
  prefix_lm (random_prefix_noise_mask: the input length uniform on [1, n - 1]); it samples the
  tasks with `rates`, uniformly when None.
- Not confirmed: the paper's mixture weights. The default weighs the 7 denoisers equally (the
  appendix code's default); S's rate enters through denoising.prefix_split's documented rule.

Sequences (`sequence`): "text" corrupts the caption batch["text"]; "document" (model "lm"
only) corrupts each example's CM3 document (big_mm/objectives/cm3.py `build_documents`:
[IMG_START, codes, IMG_END] of batch["tok_rgb"] [B, `image_tokens`] and [TXT_START, caption,
TXT_END], the image first with probability `image_first_prob`), so image codes are denoised too
and an S denoiser continues a prefix of the document: a split after the image block is caption
generation, after the caption block image generation.

Vocabulary: [0, V) the tokenizer's pieces (documents: cm3.DocumentVocab's ids before its
sentinels: the pieces, the `image_vocab` codes, the 4 boundary tokens), then `num_sentinels`
sentinels, then the mode tokens [R], [S], [X] (UL2's [NLU], [S2S], [NLG]):
model.decoder.vocab_size = V + num_sentinels + 3. The prefix is [mode] + the corrupted input:
1 + the widest input of the mixture's denoisers (`prefix_len`) slots; the targets are
`target_len` wide (the decoder's max_len must hold them).

Models: "lm" (decoder-only prefix-LM over the caption or document), "captioner" with
prefix_lm=True (decoder-only: image tokens + the prefix, bidirectional, then the targets) and
"captioner" with prefix_lm=False and text_prefix_len > 0 (encoder-decoder: the decoder
cross-attends to the image tokens and the text-encoded prefix). Each needs
model.text_prefix_len >= prefix_len.

Metrics: ul2/nll, ul2/token_accuracy, ul2/<mode>_loss (the token NLL of the rows of that mode)
and ul2/<mode>_fraction, for the mixture's modes.

Decoding (big_mm/decoding.py; generative.DecodingAPI): encode(params, images, prefix) with
prefix = `make_prefix(mode, inputs)` ([mode] + a corrupted input); generation gives the targets
(sentinel, span, ... EOS for R / X; the continuation for S). For "lm", `images` is any array
with the batch as its leading axis (e.g. the prefix). log_likelihood(params, images, targets,
prefix) scores targets.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from big_mm.models import aux_loss
from big_mm.models import captioner as captioner_lib
from big_mm.models import lm as lm_lib
from big_mm.models.decoder import Decoder
from big_mm.objectives import base, cm3, denoising
from big_mm.objectives.generative import DecodingAPI, check_token_settings, token_loss

MODES = ("R", "S", "X")  # the order of the mode tokens after the sentinels
PAPER_NAMES = {"R": "[NLU]", "S": "[S2S]", "X": "[NLG]"}
# (mode, mean_span, rate, weight): UL2's 7 denoisers (module docstring), weighed equally.
DENOISERS = (("R", 3, 0.15, 1.0), ("R", 8, 0.15, 1.0), ("S", None, 0.25, 1.0),
             ("X", 3, 0.5, 1.0), ("X", 8, 0.5, 1.0), ("X", 64, 0.15, 1.0), ("X", 64, 0.5, 1.0))


def _check_denoisers(denoisers) -> None:
  example = "e.g. (('R', 3, 0.15, 1.0), ('S', None, 0.25, 1.0), ('X', 64, 0.5, 1.0))"
  if isinstance(denoisers, str) or not isinstance(denoisers, (tuple, list)) or not denoisers:
    raise base.ConfigError(f"objective.denoisers must be a non-empty tuple of (mode, mean_span, "
                           f"rate, weight), {example}; got {denoisers!r}.")
  for i, d in enumerate(denoisers):
    where = f"objective.denoisers[{i}]={d!r}"
    if isinstance(d, str) or not isinstance(d, (tuple, list)) or len(d) != 4:
      raise base.ConfigError(f"{where} must be (mode, mean_span, rate, weight), {example}.")
    mode, mean_span, rate, weight = d
    if mode not in MODES:
      raise base.ConfigError(f"{where}: mode must be one of {list(MODES)} (R: regular span "
                             "corruption, S: sequential / prefix LM, X: extreme), got "
                             f"{mode!r}.")
    if mode == "S":
      if mean_span is not None:
        raise base.ConfigError(f"{where}: an S denoiser has no spans; set its mean_span to None.")
    elif isinstance(mean_span, bool) or not isinstance(mean_span, (int, float)) or not (
        mean_span >= 1):
      raise base.ConfigError(f"{where}: mean_span must be a number >= 1, got {mean_span!r}.")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < 1:
      raise base.ConfigError(f"{where}: rate must be in (0, 1), got {rate!r}.")
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight >= 0:
      raise base.ConfigError(f"{where}: weight must be a number >= 0, got {weight!r}.")
  if not sum(d[3] for d in denoisers) > 0:
    raise base.ConfigError("objective.denoisers: every weight is 0; give one a positive weight.")


class UL2(DecodingAPI):
  """Objective "ul2" (module docstring)."""
  NAME = "ul2"
  # denoisers: ((mode, mean_span, rate, weight), ...); num_sentinels: the sentinel ids after
  # the tokenizer's pieces (at least the most spans a sequence gets); sequence: "text" (the
  # caption) or "document" (module docstring), whose image_tokens / image_vocab are the codes
  # per image and the codebook size of batch["tok_rgb"]; label_smoothing.
  SETTINGS = dict(denoisers=DENOISERS, num_sentinels=32, sequence="text", image_first_prob=0.5,
                  image_tokens=16, image_vocab=1000, label_smoothing=0.0)
  BATCH_KEYS = ("image", "tok_rgb", "text")
  DOCUMENT_KEYS = ("tok_rgb", "text")

  @classmethod
  def check_settings(cls, settings) -> None:
    _check_denoisers(settings["denoisers"])
    base.positive_int("num_sentinels", settings["num_sentinels"])
    base.choice("sequence", settings["sequence"], ("text", "document"))
    if not 0 <= base.number("image_first_prob", settings["image_first_prob"]) <= 1:
      raise base.ConfigError("objective.image_first_prob must be in [0, 1], got "
                             f"{settings['image_first_prob']!r}.")
    base.positive_int("image_tokens", settings["image_tokens"])
    base.positive_int("image_vocab", settings["image_vocab"])
    check_token_settings(settings)

  def __init__(self, model, ctx: base.Context, **settings):
    settings = base.fill(type(self), settings)
    if isinstance(model, lm_lib.LanguageModel):
      self.has_image = False
    elif isinstance(model, captioner_lib.Captioner):
      self.has_image = True
    else:
      raise base.ConfigError(f"objective.name='ul2' needs model_name='lm' or 'captioner'; got "
                             f"a {type(model).__name__}.")
    if ctx.tokenizer is None:
      raise base.ConfigError("objective.name='ul2' predicts text, so it needs input.tokenizer "
                             "(the path of a SentencePiece .model, e.g. data/digits_spm.model).")
    self.model, self.ctx, self.mesh, self.settings = model, ctx, ctx.mesh, settings
    self.denoisers = tuple((m, None if s is None else float(s), float(r), float(w))
                           for m, s, r, w in settings["denoisers"])
    self.num_sentinels = int(settings["num_sentinels"])
    self.label_smoothing = float(settings["label_smoothing"])
    self.document = settings["sequence"] == "document"
    self.sentinel_start = int(ctx.tokenizer.vocab_size)
    seq_len = int(ctx.text_len)
    if self.document:
      self._check_document_inputs()
      self.doc_vocab = cm3.DocumentVocab(self.sentinel_start, int(settings["image_vocab"]),
                                         self.num_sentinels)
      self.sentinel_start = self.doc_vocab.sentinel_start
      seq_len += int(settings["image_tokens"]) + cm3.NUM_BOUNDARY_TOKENS
    self.mode_ids = {m: self.sentinel_start + self.num_sentinels + i
                     for i, m in enumerate(MODES)}
    self._check_model(seq_len)
    self.vocab_size = model.vocab_size
    self.max_text_len = self.decoder_len

  def _check_document_inputs(self) -> None:
    if self.has_image:
      raise base.ConfigError(
          "objective.sequence='document' needs model_name='lm' (the document holds the image "
          "as its VQ codes, batch['tok_rgb']); a captioner reads the image itself: use "
          "objective.sequence='text'.")
    if not set(self.DOCUMENT_KEYS) <= set(self.ctx.modalities or ("image", "text")):
      raise base.ConfigError(
          f"objective.sequence='document' reads {self.DOCUMENT_KEYS}; set "
          f"input.modalities={self.DOCUMENT_KEYS}.")

  def _check_model(self, seq_len: int) -> None:
    model, pieces = self.model, self.sentinel_start
    need = pieces + self.num_sentinels + len(MODES)
    if self.document:
      v = self.doc_vocab
      ids = (f"{v.text_vocab} text pieces + objective.image_vocab={v.code_vocab} image codes + "
             f"{cm3.NUM_BOUNDARY_TOKENS} boundary tokens")
      what = (f"documents of objective.image_tokens={self.settings['image_tokens']} + "
              f"input.text_len={self.ctx.text_len} + {cm3.NUM_BOUNDARY_TOKENS} = {seq_len} "
              "tokens")
    else:
      ids, what = f"the tokenizer's {pieces} pieces", f"captions of input.text_len={seq_len}"
    if model.vocab_size != need:
      raise base.ConfigError(
          f"model.decoder.vocab_size={model.vocab_size} but UL2 needs {need} ids ({ids} + "
          f"objective.num_sentinels={self.num_sentinels} sentinels + {len(MODES)} mode "
          f"tokens); set model.decoder.vocab_size={need}.")
    spans = max([denoising.max_spans(seq_len, s, r) for m, s, r, _ in self.denoisers
                 if m != "S"] or [0])
    if spans > self.num_sentinels:
      raise base.ConfigError(
          f"objective.num_sentinels={self.num_sentinels} but {what} get up to {spans} noise "
          f"spans with these denoisers; set objective.num_sentinels={spans} (and "
          f"model.decoder.vocab_size to match).")
    widths = [self._lengths(seq_len, d) for d in self.denoisers]
    self.prefix_len = 1 + max(w[0] for w in widths)
    self.target_len = max(w[1] for w in widths)
    have = int(getattr(model, "text_prefix_len", 0) or 0)
    if have < self.prefix_len:
      raise base.ConfigError(
          f"model.text_prefix_len={have} but UL2's prefix (mode token + corrupted {what}) "
          f"takes {self.prefix_len} slots; set model.text_prefix_len={self.prefix_len}.")
    self.decoder_len = int(dict(model.decoder or {}).get("max_len", Decoder.max_len))
    if self.decoder_len < self.target_len:
      raise base.ConfigError(
          f"model.decoder.max_len={self.decoder_len} but UL2's targets take up to "
          f"{self.target_len} tokens; set model.decoder.max_len={self.target_len}.")

  @staticmethod
  def _lengths(text_len, denoiser):
    mode, mean_span, rate, _ = denoiser
    if mode == "S":
      return denoising.prefix_lengths(text_len, rate)
    return denoising.output_lengths(text_len, mean_span, rate)

  # ---- batches -------------------------------------------------------------------------------

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    text = jax.ShapeDtypeStruct((1, int(self.ctx.text_len)), jnp.int32)
    if self.document:
      codes = (1, int(self.settings["image_tokens"]))
      return {"tok_rgb": jax.ShapeDtypeStruct(codes, jnp.int32), "text": text}
    if not self.has_image:
      return {"text": text}
    return {**base.image_text_example(self.ctx), "text": text}

  def init_params(self, rng):
    example = base.zeros(self.example_batch())
    targets = jnp.zeros((1, self.target_len), jnp.int32)
    prefix = jnp.zeros((1, self.prefix_len), jnp.int32)
    args = (example["image"], targets) if self.has_image else (targets,)
    return self.model.init({"params": rng}, *args, prefix=prefix, train=False)["params"]

  def make_prefix(self, mode: str, inputs):
    """[mode token] + inputs [B, Li] -> the model's text prefix int32 [B, 1 + Li]."""
    inputs = jnp.asarray(inputs, jnp.int32)
    mode_col = jnp.full((inputs.shape[0], 1), self.mode_ids[mode], jnp.int32)
    return jnp.concatenate([mode_col, inputs], axis=1)

  def documents(self, rng, batch):
    """(sequence="document") batch["tok_rgb"] and batch["text"] -> their documents int32
    [B, N + L + 4], the image first with probability image_first_prob (drawn with rng)."""
    codes = batch["tok_rgb"]
    image_first = jax.random.uniform(rng, (codes.shape[0],)) < self.settings["image_first_prob"]
    return cm3.build_documents(codes, batch["text"], image_first, self.doc_vocab)[0]

  def corrupt(self, rng, text):
    """Sequences [B, L] (captions or documents) -> (prefix int32 [B, prefix_len], targets int32
    [B, target_len], the drawn denoiser's index [B])."""
    keys = jax.random.split(rng, len(self.denoisers) + 1)
    weights = jnp.asarray([d[3] for d in self.denoisers], jnp.float32)
    choice = jax.random.categorical(keys[0], jnp.log(weights), shape=(text.shape[0],))
    prefixes, targets = [], []
    for key, (mode, mean_span, rate, _) in zip(keys[1:], self.denoisers):
      if mode == "S":
        inputs, tgt = denoising.prefix_split(key, text, rate=rate)
      else:
        inputs, tgt = denoising.span_corrupt(key, text, mean_span=mean_span, rate=rate,
                                             sentinel_start=self.sentinel_start,
                                             num_sentinels=self.num_sentinels)
      prefix = self.make_prefix(mode, inputs)
      prefixes.append(jnp.pad(prefix, ((0, 0), (0, self.prefix_len - prefix.shape[1]))))
      targets.append(jnp.pad(tgt, ((0, 0), (0, self.target_len - tgt.shape[1]))))
    rows = jnp.arange(text.shape[0])
    return jnp.stack(prefixes)[choice, rows], jnp.stack(targets)[choice, rows], choice

  # ---- loss and likelihoods ------------------------------------------------------------------

  def _logits(self, params, images, targets, prefix=None):
    args = (images, targets) if self.has_image else (targets,)
    logits = self.model.apply({"params": params}, *args, prefix=prefix, train=False)
    return logits[0] if self.has_image else logits

  def loss_fn(self, params, batch, rng):
    rng_noise, rng_dropout = jax.random.split(rng)
    tokens = batch["text"]
    if self.document:
      rng_order, rng_noise = jax.random.split(rng_noise)
      tokens = self.documents(rng_order, batch)
    prefix, targets, choice = self.corrupt(rng_noise, tokens)
    args = (batch["image"], targets) if self.has_image else (targets,)
    out, aux = aux_loss.apply(self.model, params, *args, prefix=prefix, train=True,
                              rngs={"dropout": rng_dropout})
    logits = out[0] if self.has_image else out
    loss, token_metrics = token_loss(logits, targets, self.label_smoothing)
    metrics = {"ul2/nll": token_metrics["caption/nll"],
               "ul2/token_accuracy": token_metrics["caption/token_accuracy"]}
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    modes = [MODES.index(d[0]) for d in self.denoisers]
    mode = jnp.asarray(modes)[choice]
    for i, m in enumerate(MODES):
      if i not in modes:
        continue
      rows = mode == i
      tokens = rows[:, None] & (targets != 0)
      metrics[f"ul2/{m}_loss"] = jnp.sum(jnp.where(tokens, nll, 0.0)) / jnp.maximum(
          jnp.sum(tokens), 1)
      metrics[f"ul2/{m}_fraction"] = jnp.mean(rows.astype(jnp.float32))
    return aux_loss.add(loss, metrics, aux)
