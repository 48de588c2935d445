"""LocCa's decoder losses as a SigLIP 2 part: captioning, referring expressions and grounded
captions from a text decoder that cross-attends to the image tower's un-pooled tokens.

Sources: LocCa (Wan et al. 2024, arXiv:2403.19596) trains one encoder-decoder captioner on
three tasks, each named by a task prefix: Cap (the image's caption), ARef (automatic
referring expression: a region's caption and its box) and GCap (grounded captioning: a box and
its region's caption). SigLIP 2 (Tschannen et al. 2025, arXiv:2502.14786, section 2.2) adds
such a decoder next to the sigmoid loss, cross-attending to the vision encoder's un-pooled
tokens (not the MAP head's output), with three targets: image captioning, referring
expression prediction (the box coordinates of a caption describing a region) and grounded
captioning (the region's caption given its box); only the image tower is kept afterwards.
Those directions are the ones here:

  task      prefix (bidirectional, never a target)   target (causal, in the loss)
  caption   [CAP]                                     caption tokens, EOS
  ref       [REF] expression tokens, EOS              4 coordinate tokens, EOS
  grounded  [GRD] 4 coordinate tokens                 expression tokens, EOS

Each example is trained on one task, drawn with `locca_task_probs` (one of its present
boxes, uniformly, for ref / grounded; an example without boxes is captioned). The loss is the
token cross-entropy over every target token of the batch (as one captioner),
`locca_label_smoothing` optional, times `locca_weight`. `locca_parallel_fraction` trains that
fraction of the caption rows with CapPa's parallel prediction (all inputs [MASK],
bidirectional; CapPa used 0.75).

Boxes (batch["boxes"], float [B, K, 4]) are (ymin, xmin, ymax, xmax) in [0, 1] of the image
the model sees, and become 4 coordinate tokens in that order, each coordinate quantised to
`locca_loc_bins` bins (bin = floor(c * bins), read back as the bin's centre, so within half
a bin): PaliGemma's <locNNNN> convention (1024 bins, y before x). Vocabulary: the text
tower's tokenizer pieces [0, V), then the coordinate tokens [V, V + bins), then the three
task tokens. The decoder (big_mm.models.decoder.Decoder, kwargs `locca_decoder`) puts the
task prefix in its text prefix (`prefix_tokens`) and masks the image tokens that are padding
or dropped (the tower's "img/token_mask": NaFlex, FLIP patch dropout). Its params are `dec/`.

Predict fns it gives the objective: the decoding API of big_mm.decoding (encode / init_cache /
decode_step / log_likelihood, on the caption task unless a task prefix is passed, generating
tokenizer pieces only), so `evals.x.type="captioning"` decodes captions; and for
evals.x.type="referring": `predict_boxes(params, images, box_text) -> [B, 4]` (greedy over
coordinate tokens after the ref prefix) and `predict_expressions(params, images, boxes,
max_len) -> tokens [B, max_len]` (greedy grounded caption of each box).
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from big_mm import decoding
from big_mm import modalities as modalities_lib
from big_mm.models.decoder import Decoder, shift_right
from big_mm.objectives import base
from big_mm.objectives.part import Part
from big_mm.objectives.generative import token_loss

TASKS = ("caption", "ref", "grounded")
EOS = 1
_NEG = -1e9


@dataclasses.dataclass(frozen=True)
class Vocab:
  """The decoder's vocabulary: `text` tokenizer pieces, `bins` coordinate tokens, 3 task
  tokens (TASKS order)."""
  text: int
  bins: int

  @property
  def loc_start(self) -> int:
    return self.text

  def task_token(self, task: str) -> int:
    return self.text + self.bins + TASKS.index(task)

  @property
  def size(self) -> int:
    return self.text + self.bins + len(TASKS)


def quantize(boxes, bins: int):
  """Coordinates in [0, 1] -> int32 bins in [0, bins)."""
  return jnp.clip(jnp.floor(boxes * bins), 0, bins - 1).astype(jnp.int32)


def dequantize(idx, bins: int):
  """Bins -> their centres in [0, 1] (so a round trip is within half a bin)."""
  return (idx.astype(jnp.float32) + 0.5) / bins


def _fit(x, length: int, what: str):
  """int [B, n] -> [B, length], 0-padded; a longer x fails naming the setting to raise."""
  if x.shape[1] > length:
    raise ValueError(f"LocCa {what} has {x.shape[1]} tokens but the decoder was built for "
                     f"{length}; raise objective.locca_box_text_len (or input.text_len).")
  return jnp.pad(x, ((0, 0), (0, length - x.shape[1])))


def ref_prefix(vocab: Vocab, box_text):
  """[REF] + the expression (int [B, Lr]) -> [B, 1 + Lr]."""
  task = jnp.full((box_text.shape[0], 1), vocab.task_token("ref"), jnp.int32)
  return jnp.concatenate([task, box_text.astype(jnp.int32)], axis=1)


def grounded_prefix(vocab: Vocab, boxes):
  """[GRD] + the box's 4 coordinate tokens (boxes float [B, 4]) -> [B, 5]."""
  task = jnp.full((boxes.shape[0], 1), vocab.task_token("grounded"), jnp.int32)
  return jnp.concatenate([task, vocab.loc_start + quantize(boxes, vocab.bins)], axis=1)


def build_sequences(vocab: Vocab, text, boxes, box_text, task, box_index, prefix_len: int,
                    target_len: int):
  """Each example's (prefix [B, prefix_len], targets [B, target_len]) for its task (int [B],
  index into TASKS) and chosen box (int [B], index into K), from text [B, L], boxes
  [B, K, 4] and box_text [B, K, Lr] (module docstring's table)."""
  b = text.shape[0]
  pick = lambda x: jnp.take_along_axis(x, box_index[:, None, None], axis=1)[:, 0]
  box, expression = pick(boxes), pick(box_text).astype(jnp.int32)
  locs = vocab.loc_start + quantize(box, vocab.bins)
  eos = jnp.full((b, 1), EOS, jnp.int32)
  caption_prefix = jnp.full((b, 1), vocab.task_token("caption"), jnp.int32)
  prefixes = [caption_prefix, ref_prefix(vocab, expression), grounded_prefix(vocab, box)]
  targets = [text.astype(jnp.int32), jnp.concatenate([locs, eos], axis=1), expression]
  prefixes = [_fit(p, prefix_len, "prefix") for p in prefixes]
  targets = [_fit(t, target_len, "target") for t in targets]
  choose = lambda xs: jnp.select([task[:, None] == i for i in range(len(TASKS))], xs)
  return choose(prefixes), choose(targets)


def sample_tasks(rng, probs, box_text):
  """(task [B], box_index [B]): a task drawn with `probs` (TASKS order) and one of the
  example's present boxes (non-empty box_text rows), uniformly; examples without a present
  box get the caption task."""
  rng_task, rng_box = jax.random.split(rng)
  present = jnp.any(box_text != 0, axis=-1)  # [B, K]
  has_box = jnp.any(present, axis=-1)
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  task = jax.random.categorical(rng_task, logits, shape=(box_text.shape[0],))
  task = jnp.where(has_box, task, TASKS.index("caption")).astype(jnp.int32)
  box_logits = jnp.where(present, 0.0, -jnp.inf)
  box_logits = jnp.where(has_box[:, None], box_logits, 0.0)  # unused, but finite
  box_index = jax.random.categorical(rng_box, box_logits, axis=-1).astype(jnp.int32)
  return task, box_index


class LocCa(Part):
  """The LocCa decoder part (module docstring)."""
  NAME = "locca"
  # locca_weight: the part's loss weight (0: off). locca_decoder: big_mm.models.decoder.Decoder
  # kwargs (variant or width / depth / mlp_dim / num_heads, dropout, ...; vocab_size, max_len,
  # text_prefix_len and cross_attention are set here). locca_task_probs: the chance of each
  # task (caption, ref, grounded) per example. locca_loc_bins: coordinate quantisation bins.
  # locca_box_text_len: the most tokens of a referring expression (batch["box_text"]'s last
  # dim; None: input.box_text_len, else input.text_len). locca_label_smoothing: of the token loss.
  # locca_parallel_fraction: CapPa parallel prediction on that fraction of caption rows.
  SETTINGS = dict(locca_weight=0.0, locca_decoder={}, locca_task_probs=(1.0, 1.0, 1.0),
                  locca_loc_bins=1024, locca_box_text_len=None, locca_label_smoothing=0.0,
                  locca_parallel_fraction=0.0)
  BATCH_KEYS = ("boxes", "box_text")
  _SET_HERE = ("vocab_size", "max_len", "text_prefix_len", "cross_attention", "embed_input",
               "head", "cls", "mask_token")

  @classmethod
  def check_settings(cls, settings) -> None:
    if base.number("locca_weight", settings["locca_weight"]) < 0:
      raise base.ConfigError(f"objective.locca_weight must be >= 0 (0: LocCa off), got "
                             f"{settings['locca_weight']!r}.")
    dec = settings["locca_decoder"]
    if not hasattr(dec, "keys"):
      raise base.ConfigError(f"objective.locca_decoder must be a dict of Decoder kwargs (e.g. "
                             f"dict(width=256, depth=2, num_heads=4)); got {dec!r}.")
    fields = Decoder.__dataclass_fields__
    for key in dec.keys():
      if key in cls._SET_HERE:
        raise base.ConfigError(f"objective.locca_decoder.{key} is set by the LocCa part (from "
                               "the tokenizer, the coordinate bins and the text lengths); "
                               "remove it.")
      if key not in fields or key in ("parent", "name"):
        raise base.ConfigError(
            f"objective.locca_decoder.{key} is not a Decoder field; valid: "
            f"{sorted(k for k in fields if k not in cls._SET_HERE + ('parent', 'name'))}.")
    probs = settings["locca_task_probs"]
    if (isinstance(probs, str) or not hasattr(probs, "__len__") or len(probs) != len(TASKS)
        or any(base.number("locca_task_probs entry", p) < 0 for p in probs)
        or not sum(probs) > 0):
      raise base.ConfigError(f"objective.locca_task_probs must be 3 non-negative numbers, not "
                             f"all 0: the chance of the caption, ref and grounded tasks; got "
                             f"{probs!r}.")
    base.positive_int("locca_loc_bins", settings["locca_loc_bins"],
                      " (coordinate bins, e.g. 1024 as PaliGemma)")
    if settings["locca_box_text_len"] is not None:
      base.positive_int("locca_box_text_len", settings["locca_box_text_len"],
                        " (batch['box_text']'s tokens; None: input.box_text_len)")
    if not 0.0 <= base.number("locca_label_smoothing", settings["locca_label_smoothing"]) < 1:
      raise base.ConfigError(f"objective.locca_label_smoothing must be in [0, 1), got "
                             f"{settings['locca_label_smoothing']!r}.")
    if not 0.0 <= base.number("locca_parallel_fraction",
                              settings["locca_parallel_fraction"]) <= 1:
      raise base.ConfigError(f"objective.locca_parallel_fraction must be in [0, 1], got "
                             f"{settings['locca_parallel_fraction']!r}.")

  def __init__(self, objective, settings: dict):
    super().__init__(objective, settings)
    self.weight = float(settings["locca_weight"])
    if not self.enabled:
      return
    ctx = objective.ctx
    text_tower = dict(objective.model.towers.get("text") or {})
    if "image" not in objective.model.towers or not text_tower.get("vocab_size"):
      raise base.ConfigError(
          "objective.locca_weight > 0 needs an image tower and a text tower with vocab_size "
          "(model.towers.image / model.towers.text): the decoder reads the image tokens and "
          "writes the text tower's tokenizer pieces.")
    self.vocab = Vocab(int(text_tower["vocab_size"]), int(settings["locca_loc_bins"]))
    probs = [float(p) for p in settings["locca_task_probs"]]
    self.task_probs = tuple(p / sum(probs) for p in probs)
    self.text_len = int(ctx.text_len)
    self.box_text_len = int(settings["locca_box_text_len"] or ctx.box_text_len or ctx.text_len)
    if ctx.box_text_len > self.box_text_len:
      raise base.ConfigError(
          f"objective.locca_box_text_len={self.box_text_len} is shorter than the batches' "
          f"input.box_text_len={ctx.box_text_len}; raise it or leave it None (the input's).")
    self.prefix_len = 1 + max(self.box_text_len, 4)
    self.target_len = max(self.text_len, self.box_text_len, 5)
    self.label_smoothing = float(settings["locca_label_smoothing"])
    self.parallel_fraction = float(settings["locca_parallel_fraction"])
    self.decoder = Decoder(**dict(settings["locca_decoder"]), vocab_size=self.vocab.size,
                           max_len=self.target_len, text_prefix_len=self.prefix_len,
                           cross_attention=True, mask_token=self.parallel_fraction > 0)

  @property
  def enabled(self) -> bool:
    return self.weight > 0

  def example_batch(self) -> dict:
    # K (boxes per example) is free; the decoder's shapes depend on the lengths only.
    return {"boxes": jax.ShapeDtypeStruct((1, 1, 4), jnp.float32),
            "box_text": jax.ShapeDtypeStruct((1, 1, self.box_text_len), jnp.int32)}

  def init_params(self, rng, towers_params) -> dict:
    enc = self._encode_shapes(towers_params)
    prefix = jnp.zeros((1, self.prefix_len), jnp.int32)
    targets = jnp.zeros((1, self.target_len), jnp.int32)
    return {"dec": self.decoder.init({"params": rng}, targets, enc, prefix_tokens=prefix,
                                     train=False)["params"]}

  def _encode_shapes(self, towers_params):
    """Zeros shaped like the image tower's tokens (for init)."""
    obj = self.objective
    example = base.zeros(base.modality_example(obj.ctx, ("image",)))
    image = modalities_lib.model_input(example, "image")
    _, out = jax.eval_shape(lambda p: obj.model.apply({"params": p}, {"image": image},
                                                      train=False),
                            nn.unbox(obj._towers_params(towers_params)))
    return jnp.zeros(out["img/encoded"].shape, out["img/encoded"].dtype)

  # ----------------------------------------------------------------------- loss

  def _decode_full(self, params, targets, enc, enc_mask, prefix, parallel=None, rng=None):
    rngs = {"dropout": rng} if rng is not None else {}
    logits, _ = self.decoder.apply({"params": params["dec"]}, shift_right(targets), enc,
                                   enc_mask=enc_mask, prefix_tokens=prefix, parallel=parallel,
                                   train=rng is not None, rngs=rngs)
    return logits

  def loss(self, params, batch, rng, fwd, *, extra, step):
    del extra, step
    out = fwd["out"]
    enc, enc_mask = out["img/encoded"], out.get("img/token_mask")
    rng_task, rng_parallel, rng_dropout = jax.random.split(rng, 3)
    text = batch["text"]
    if "boxes" in batch:
      boxes, box_text = batch["boxes"], batch["box_text"]
    elif self.task_probs[0] < 1:
      raise ValueError("objective.locca_task_probs gives the ref / grounded tasks a chance but "
                       "the batch has no 'boxes' / 'box_text'; use data with boxes (e.g. "
                       "digits_boxes) or locca_task_probs=(1, 0, 0) (captions only).")
    else:
      boxes = jnp.zeros((text.shape[0], 1, 4), jnp.float32)
      box_text = jnp.zeros((text.shape[0], 1, 1), jnp.int32)
    task, box_index = sample_tasks(rng_task, self.task_probs, box_text)
    prefix, targets = build_sequences(self.vocab, text, boxes, box_text, task, box_index,
                                      self.prefix_len, self.target_len)
    parallel = None
    if self.parallel_fraction:
      parallel = ((task == TASKS.index("caption"))
                  & (jax.random.uniform(rng_parallel, task.shape) < self.parallel_fraction))
    logits = self._decode_full(params, targets, enc, enc_mask, prefix, parallel, rng_dropout)
    loss, token_metrics = token_loss(logits, targets, self.label_smoothing)
    metrics = {"locca/loss": loss, "locca/nll": token_metrics["caption/nll"],
               "locca/token_accuracy": token_metrics["caption/token_accuracy"]}
    for i, name in enumerate(TASKS):
      rows = task == i
      _, m = token_loss(logits, jnp.where(rows[:, None], targets, 0))
      metrics[f"locca/{name}_nll"] = m["caption/nll"]
      metrics[f"locca/{name}_token_accuracy"] = m["caption/token_accuracy"]
      metrics[f"locca/{name}_fraction"] = jnp.mean(rows.astype(jnp.float32))
    return self.weight * loss, metrics

  # ----------------------------------------------------------------------- predict fns

  def predict_fns(self) -> dict:
    return dict(encode=self.encode, init_cache=self.init_cache, decode_step=self.decode_step,
                log_likelihood=self.log_likelihood, predict_boxes=self.predict_boxes,
                predict_expressions=self.predict_expressions, vocab_size=self.vocab.size,
                max_text_len=self.target_len, locca_vocab=self.vocab)

  def _image_tokens(self, params, images):
    """(tokens [B, N, D], bool mask [B, N]) of the image tower at evaluation."""
    obj = self.objective
    _, out = obj.model.apply({"params": obj._towers_params(params)}, {"image": images},
                             train=False)
    tokens = out["img/encoded"]
    mask = out.get("img/token_mask")
    if mask is None:
      mask = jnp.ones(tokens.shape[:2], bool)
    return tokens, mask

  def encode(self, params, images, prefix=None):
    """-> {"tokens", "mask", "prefix"}: the image tokens and the task prefix (None: the
    caption task's [CAP]; else int [B, P'] in the decoder's vocabulary, e.g. ref_prefix)."""
    tokens, mask = self._image_tokens(params, images)
    if prefix is None:
      prefix = jnp.full((tokens.shape[0], 1), self.vocab.task_token("caption"), jnp.int32)
    return {"tokens": tokens, "mask": mask, "prefix": jnp.asarray(prefix, jnp.int32)}

  def init_cache(self, params, enc, max_len):
    _, variables = self.decoder.apply(
        {"params": params["dec"]}, None, enc["tokens"], enc_mask=enc["mask"],
        prefix_tokens=enc["prefix"], decode=True, cache_len=enc["prefix"].shape[1] + max_len,
        mutable=["cache"])
    return variables["cache"]

  def _step_logits(self, params, enc, cache, tokens, position):
    (logits, _), variables = self.decoder.apply(
        {"params": params["dec"], "cache": cache}, tokens[:, None], enc["tokens"],
        enc_mask=enc["mask"], prefix_tokens=enc["prefix"], decode=True, position=position,
        cached_prefix=enc["prefix"].shape[1], mutable=["cache"])
    return logits[:, 0].astype(jnp.float32), variables["cache"]

  def decode_step(self, params, enc, cache, tokens, position):
    """Next-token logits over tokenizer pieces only (coordinate and task tokens at -1e9):
    what the decoding API generates is text."""
    logits, cache = self._step_logits(params, enc, cache, tokens, position)
    is_text = jnp.arange(logits.shape[-1]) < self.vocab.text
    return jnp.where(is_text, logits, _NEG), cache

  def log_likelihood(self, params, images, texts, prefix=None):
    """(sum of log p(caption tokens) [B], their count [B]) under the caption task (or the
    given task prefix), over the full vocabulary as trained."""
    enc = self.encode(params, images, prefix)
    logits = self._decode_full(params, texts, enc["tokens"], enc["mask"], enc["prefix"])
    logp = jax.nn.log_softmax(logits, axis=-1)
    token_logp = jnp.take_along_axis(logp, texts[..., None], axis=-1)[..., 0]
    valid = texts != 0
    return (jnp.sum(jnp.where(valid, token_logp, 0.0), axis=1),
            jnp.sum(valid, axis=1).astype(jnp.int32))

  def predict_boxes(self, params, images, box_text):
    """Boxes [B, 4] (ymin, xmin, ymax, xmax in [0, 1]) of the expressions box_text (int
    [B, Lr], EOS-terminated): greedy decoding of 4 coordinate tokens after the ref prefix."""
    enc = self.encode(params, images, ref_prefix(self.vocab, _fit(
        jnp.asarray(box_text, jnp.int32), self.box_text_len, "expression")))
    cache = self.init_cache(params, enc, 4)
    token = jnp.zeros((box_text.shape[0],), jnp.int32)  # BOS
    bins = []
    for position in range(4):
      logits, cache = self._step_logits(params, enc, cache, token, position)
      loc_logits = logits[:, self.vocab.loc_start:self.vocab.loc_start + self.vocab.bins]
      idx = jnp.argmax(loc_logits, axis=-1).astype(jnp.int32)
      bins.append(idx)
      token = self.vocab.loc_start + idx
    return dequantize(jnp.stack(bins, axis=1), self.vocab.bins)

  def predict_expressions(self, params, images, boxes, max_len=None):
    """Greedy grounded captions int [B, max_len] (EOS-terminated, 0 after) of boxes [B, 4]."""
    return decoding.greedy(self.objective, params, images, max_len=max_len or self.box_text_len,
                           prefix=grounded_prefix(self.vocab, jnp.asarray(boxes, jnp.float32)))
