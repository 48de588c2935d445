"""4M objective (Mizrahi et al. 2023): predict randomly chosen target tokens of any modality
from randomly chosen input tokens of the others, over model "fourm" (big_mm/models/fourm.py).

Each step, every example gets exactly `num_input_tokens` input tokens, split across its
present modalities by a symmetric Dirichlet(`dirichlet_alpha`), then `num_target_tokens`
target tokens drawn from the tokens not chosen as inputs, split by a second, independent
Dirichlet(`target_dirichlet_alpha`) (big_mm/objectives/masked.py: dirichlet_fractions,
sample_visible; 4M samples input and target budgets the same way, each with its own alpha).
Shapes are static: [B, num_input_tokens] and [B, num_target_tokens] indices with validity
masks (False only where an example has fewer tokens than the budget).

Text rule (differs from the paper): per example, the caption is either an input modality (with
probability 1 - `text_target_prob`) or a target modality, never both; whatever share of the
budget the Dirichlet gives it is a prefix of the caption (its first k non-pad tokens), and as
a target it is predicted causally (teacher forcing). 4M instead applies T5-style span
masking to text, with sentinel tokens, so that one caption gives both input and target spans.

Loss: per modality, the mean token cross-entropy over exactly the chosen, real target tokens
of the batch; the loss is the mean over the modalities that have targets in the batch (4M's
per-modality loss averaging). Metrics: `{m}/loss`, `{m}/accuracy`, `{m}/input_fraction` and
`{m}/target_fraction` (shares of the budgets).

Generation (`generate`, `predict`): given input modalities fully visible, targets are produced
one after another, each then added to the inputs (chained generation, as 4M):
  token grids: MaskGIT (Chang et al. 2022) iterative parallel decoding: `num_steps` steps;
      after step s (r = (s + 1) / num_steps), N - floor(N cos(pi r / 2)) tokens are fixed
      (at least one more each step, all of them after the last); each step samples every
      unfixed token (argmax at `temperature` 0), and fixes the most confident ones
      (log-probability of the sampled token, plus `choice_temperature` * (1 - r) Gumbel
      noise as MaskGIT); fixed tokens are fed back to the encoder as inputs.
  text: autoregressive, greedy (or sampled at `temperature` > 0), stopping at EOS (id 1);
      a small jitted loop: one encoder pass, then the decoder rerun per token (no KV cache;
      captions are short). big_mm/decoding.py's
      interface (encode / init_cache / decode_step with a KV cache over one decoder) does not
      fit a decoder whose queries are per-modality target sets.
predict(params, batch, inputs=("rgb",), targets=("depth",)) follows MultiMAE's contract
(big_mm/objectives/masked.py) for big_mm/evaluators/cross_modal.py: names "rgb" / "depth" /
"semseg" / "text" (model modalities "tok_rgb" ... "text"); inputs read from
batch["tok_<m>"] (or encoded from the raw batch key with the modality's tokenizer when the
codes are missing); generated codes decoded with the tokenizers (`tokenizers` setting,
big_mm.models.vq.load): rgb [B, H, W, 3], depth [B, H, W] metres, semseg logits
[B, H, W, C]; text: generated ids int32 [B, text_len]; plus the codes under "tok_<m>".
embed_images(params, images) -> [B, D]: mean encoder output of the rgb tokenizer's codes.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from big_mm import modalities as modalities_lib
from big_mm.models import aux_loss
from big_mm.models import fourm as fourm_lib
from big_mm.models import vq
from big_mm.objectives import base
from big_mm.objectives.masked import dirichlet_fractions, sample_visible

# Evaluator names (cross_modal, MultiMAE's) -> model modalities, and the raw batch keys the
# tokenizers encode.
TOKEN_MODALITY = {"rgb": "tok_rgb", "depth": "tok_depth", "semseg": "tok_semseg",
                  "text": "text"}
RAW_KEY = {"rgb": "image", "depth": "depth", "semseg": "semseg"}
EOS_ID = 1


def short_name(m: str) -> str:
  return m[len("tok_"):] if m.startswith("tok_") else m


def _text_prefix(picks, valid, start: int, length: int):
  """Text picks become the caption's first positions: the j-th text pick of a row (in pick
  order) is replaced by text position j."""
  is_text = valid & (picks >= start) & (picks < start + length)
  rank = jnp.cumsum(is_text, axis=1) - 1
  return jnp.where(is_text, start + rank, picks).astype(jnp.int32)


def _scatter(total: int, picks, valid):
  """bool [B, total]: True at the valid picks."""
  seen = jnp.zeros((picks.shape[0], total), bool)
  return jax.vmap(lambda s, i, v: s.at[i].max(v))(seen, picks, valid)


def maskgit_schedule(n: int, num_steps: int) -> tuple[int, ...]:
  """Tokens fixed after each MaskGIT step: n - floor(n cos(pi/2 (s+1)/S)), at least one
  more per step (while any are left), n after the last."""
  counts, prev = [], 0
  for s in range(num_steps):
    c = n - math.floor(n * math.cos(math.pi / 2 * (s + 1) / num_steps))
    c = min(n, max(c, prev + 1))
    counts.append(c)
    prev = c
  counts[-1] = n
  return tuple(counts)


class FourM:
  """Objective "fourm" over model "fourm". See the module docstring."""
  NAME = "fourm"
  # Budgets per example; Dirichlet alphas of the input and target splits; the chance that an
  # example's caption is a target (else an input); tokenizers: ((name, vq_tokenizer workdir),
  # ...) to decode generated codes; MaskGIT steps and sampling temperatures (0: argmax, no
  # choice noise) of generate / predict.
  SETTINGS = dict(num_input_tokens=64, num_target_tokens=64, dirichlet_alpha=1.0,
                  target_dirichlet_alpha=1.0, text_target_prob=0.5, tokenizers=(),
                  num_steps=8, temperature=0.0, choice_temperature=0.0)
  BATCH_KEYS = fourm_lib.MODALITIES + tuple(modalities_lib.present_key(m) for m in fourm_lib.MODALITIES) + (
      "image", "depth", "semseg")

  @classmethod
  def check_settings(cls, settings) -> None:
    for key in ("num_input_tokens", "num_target_tokens", "num_steps"):
      base.positive_int(key, settings[key])
    for key in ("dirichlet_alpha", "target_dirichlet_alpha"):
      if not base.number(key, settings[key]) > 0:
        raise base.ConfigError(f"objective.{key} must be > 0, got {settings[key]!r}.")
    if not 0 <= base.number("text_target_prob", settings["text_target_prob"]) <= 1:
      raise base.ConfigError("objective.text_target_prob must be in [0, 1], got "
                             f"{settings['text_target_prob']!r}.")
    for key in ("temperature", "choice_temperature"):
      if not base.number(key, settings[key]) >= 0:
        raise base.ConfigError(f"objective.{key} must be >= 0, got {settings[key]!r}.")
    toks = settings["tokenizers"]
    if (isinstance(toks, str) or not isinstance(toks, (tuple, list)) or not all(
        isinstance(t, (tuple, list)) and len(t) == 2 and t[0] in RAW_KEY for t in toks)):
      raise base.ConfigError(
          "objective.tokenizers must be ((modality, workdir), ...) with modality one of "
          f"{sorted(RAW_KEY)}, e.g. (('rgb', '/tmp/4m_tok_rgb'),); got {toks!r}.")

  def __init__(self, model, ctx: base.Context, *, loaded_tokenizers=None, **settings):
    """loaded_tokenizers: {"rgb": tokenizer object, ...} (big_mm.models.vq.load's API) used
    instead of loading the `tokenizers` setting's workdirs (tests)."""
    settings = base.fill(type(self), settings)
    if not isinstance(model, fourm_lib.FourM):
      raise base.ConfigError(
          f"objective.name='fourm' needs model_name='fourm', not a {type(model).__name__}.")
    self.model, self.mesh, self.ctx = model, ctx.mesh, ctx
    self.token_modalities = tuple(model.modalities)
    self.modalities = tuple(short_name(m) for m in self.token_modalities)
    self.num_input = int(settings["num_input_tokens"])
    self.num_target = int(settings["num_target_tokens"])
    self.alpha = float(settings["dirichlet_alpha"])
    self.target_alpha = float(settings["target_dirichlet_alpha"])
    self.text_target_prob = float(settings["text_target_prob"])
    self.num_steps = int(settings["num_steps"])
    self.temperature = float(settings["temperature"])
    self.choice_temperature = float(settings["choice_temperature"])
    self.counts = model.num_tokens()
    self.offsets = model.offsets()
    self.total = sum(self.counts.values())
    for key, n in (("num_input_tokens", self.num_input), ("num_target_tokens", self.num_target)):
      if n > self.total:
        raise base.ConfigError(f"objective.{key}={n} must be in [1, {self.total}] (the model "
                               f"has {self.total} tokens: {self.counts}).")
    base.check_loaded(ctx, self.token_modalities, model, model.vocab().get("text"),
                      "model.vocab_sizes['text']")
    self.tokenizers = dict(loaded_tokenizers or {})
    for name, workdir in settings["tokenizers"]:
      if name not in self.tokenizers:
        self.tokenizers[name] = _load_tokenizer(name, workdir)
    vocab = model.vocab()
    for name, tok in self.tokenizers.items():
      m = TOKEN_MODALITY[name]
      if m not in self.counts:
        continue
      if (int(tok.vocab_size), int(tok.num_tokens)) != (vocab[m], self.counts[m]):
        raise base.ConfigError(
            f"The {name} tokenizer has vocab_size={tok.vocab_size} and {tok.num_tokens} tokens "
            f"(grid {tuple(tok.grid)}) but the model has vocab_sizes[{m!r}]={vocab[m]} and "
            f"{self.counts[m]} tokens; set model.vocab_sizes / model.grids to match.")
    self.num_semseg_classes = 0
    if "semseg" in self.tokenizers:
      out = jax.eval_shape(self.tokenizers["semseg"].decode,
                           jax.ShapeDtypeStruct((1, self.tokenizers["semseg"].num_tokens),
                                                jnp.int32))
      self.num_semseg_classes = int(out.shape[-1])

  # ---- token choice ----------------------------------------------------------------------

  def _batch_size(self, batch) -> int:
    for key in self.token_modalities + tuple(RAW_KEY.values()):
      if key in batch:
        return batch[key].shape[0]
    raise ValueError(f"The batch has none of the model's modalities {self.token_modalities} "
                     f"(keys: {sorted(batch)}).")

  def tokens(self, batch) -> dict:
    return {m: jnp.asarray(batch[m], jnp.int32) for m in self.token_modalities if m in batch}

  def available(self, batch, allowed=None) -> dict:
    """{m: bool [B, N_m]}: tokens that exist (modality in the batch and present; text: the
    caption's leading non-pad tokens)."""
    b = self._batch_size(batch)
    out = {}
    for m, n in self.counts.items():
      if m not in batch or (allowed is not None and m not in allowed):
        out[m] = jnp.zeros((b, n), bool)
        continue
      present = batch.get(modalities_lib.present_key(m))
      present = jnp.ones((b,), bool) if present is None else jnp.asarray(present) > 0
      avail = jnp.broadcast_to(present[:, None], (b, n))
      if m == "text":
        avail = avail & (jnp.cumprod(jnp.asarray(batch[m]) != 0, axis=1) > 0)
      out[m] = avail
    return out

  def _choose(self, rng, available: dict, alpha: float, budget: int):
    present = jnp.stack([jnp.any(a, axis=1) for a in available.values()], axis=1)
    fractions = dirichlet_fractions(rng, present, alpha)
    picks, valid = sample_visible(jax.random.fold_in(rng, 1), available, fractions, budget)
    if "text" in available:
      picks = _text_prefix(picks, valid, self.offsets["text"], self.counts["text"])
    return picks, valid

  def masks(self, rng, batch) -> dict:
    """-> {inputs [B, num_input_tokens], input_valid, targets [B, num_target_tokens],
    target_valid (indices into the concatenated tokens), available}."""
    role_rng, in_rng, tgt_rng = jax.random.split(rng, 3)
    available = self.available(batch)
    b = self._batch_size(batch)
    text_target = jax.random.bernoulli(role_rng, self.text_target_prob, (b,))
    given = dict(available)
    if "text" in given:
      given["text"] = available["text"] & ~text_target[:, None]
    inputs, input_valid = self._choose(in_rng, given, self.alpha, self.num_input)
    seen = _scatter(self.total, inputs, input_valid)
    left = {}
    for m, avail in available.items():
      start = self.offsets[m]
      left[m] = avail & ~seen[:, start:start + self.counts[m]]
    if "text" in left:
      left["text"] = available["text"] & text_target[:, None]
    targets, target_valid = self._choose(tgt_rng, left, self.target_alpha, self.num_target)
    return dict(inputs=inputs, input_valid=input_valid, targets=targets,
                target_valid=target_valid, available=available)

  # ---- training --------------------------------------------------------------------------

  def _all_ids(self, batch):
    """int32 [B, N]: every token id in concatenated order (missing modalities: 0)."""
    b = self._batch_size(batch)
    return jnp.concatenate([jnp.asarray(batch[m], jnp.int32) if m in batch else
                            jnp.zeros((b, n), jnp.int32) for m, n in self.counts.items()], 1)

  def target_loss(self, logits: dict, ids, targets, target_valid):
    """Cross-entropy of the chosen real targets -> (loss, metrics). logits: {m: [B, T, V_m]};
    ids: int32 [B, N] every token's id; targets / target_valid [B, T]."""
    mod = self.model.token_layout()[0][targets]
    target_ids = jnp.take_along_axis(ids, targets, axis=1)
    losses, has, metrics = [], [], {}
    for i, m in enumerate(self.token_modalities):
      w = (target_valid & (mod == i)).astype(jnp.float32)
      logp = jax.nn.log_softmax(logits[m].astype(jnp.float32), axis=-1)
      idx = jnp.clip(target_ids, 0, logp.shape[-1] - 1)  # other modalities' rows: weight 0
      nll = -jnp.take_along_axis(logp, idx[..., None], axis=-1)[..., 0]
      count = jnp.sum(w)
      loss_m = jnp.sum(nll * w) / jnp.maximum(count, 1.0)
      hit = (jnp.argmax(logp, axis=-1) == target_ids).astype(jnp.float32)
      metrics[f"{m}/loss"] = loss_m
      metrics[f"{m}/accuracy"] = jnp.sum(hit * w) / jnp.maximum(count, 1.0)
      metrics[f"{m}/target_fraction"] = count / (target_valid.shape[0] * self.num_target)
      losses.append(loss_m)
      has.append((count > 0).astype(jnp.float32))
    losses, has = jnp.stack(losses), jnp.stack(has)
    return jnp.sum(losses * has) / jnp.maximum(jnp.sum(has), 1.0), metrics

  def loss_fn(self, params, batch, rng):
    mask_rng, dropout_rng = jax.random.split(rng)
    masks = self.masks(mask_rng, batch)
    logits, aux = aux_loss.apply(self.model, params, self.tokens(batch), masks["inputs"],
                                 masks["input_valid"], masks["targets"], masks["target_valid"],
                                 train=True, rngs={"dropout": dropout_rng})
    loss, metrics = self.target_loss(logits, self._all_ids(batch), masks["targets"],
                                     masks["target_valid"])
    mod = self.model.token_layout()[0][masks["inputs"]]
    for i, m in enumerate(self.token_modalities):
      picked = masks["input_valid"] & (mod == i)
      metrics[f"{m}/input_fraction"] = jnp.mean(jnp.sum(picked, axis=1) / self.num_input)
    return aux_loss.add(loss, metrics, aux)

  def example_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
    """One example of each model modality: int32 [1, N_m]."""
    return {m: jax.ShapeDtypeStruct((1, n), jnp.int32) for m, n in self.counts.items()}

  def init_params(self, rng):
    """Initial (boxed) params from zeros shaped like `example_batch()`."""
    example = base.zeros(self.example_batch())
    inputs = jnp.zeros((1, self.num_input), jnp.int32)
    targets = jnp.zeros((1, self.num_target), jnp.int32)
    return self.model.init({"params": rng}, example, inputs, jnp.ones(inputs.shape, bool),
                           targets, jnp.ones(targets.shape, bool))["params"]

  # ---- generation ------------------------------------------------------------------------

  def _apply(self, params, *args, **kw):
    return self.model.apply({"params": params}, *args, **kw)

  def _indices(self, modalities) -> jax.Array:
    """int32 [sum of N_m]: the concatenated-token indices of `modalities`."""
    ranges = [np.arange(self.offsets[m], self.offsets[m] + self.counts[m]) for m in modalities]
    return jnp.asarray(np.concatenate(ranges or [np.zeros(0)]), jnp.int32)

  def _input_valid(self, batch, modalities):
    available = self.available(batch, allowed=modalities)
    b = self._batch_size(batch)
    return jnp.concatenate([jnp.zeros((b, 0), bool)] + [available[m] for m in modalities], 1)

  def _maskgit_setup(self, batch, given, target):
    b, n = self._batch_size(batch), self.counts[target]
    index = self._indices(given + (target,))
    visible = jnp.broadcast_to(index, (b,) + index.shape)
    targets = jnp.broadcast_to(self._indices((target,)), (b, n))
    return visible, self._input_valid(batch, given), targets

  def maskgit_step(self, params, tokens, batch, given, target, step, codes, known, rng):
    """One MaskGIT step (module docstring) for grid modality `target` from the `given`
    modalities' tokens: (codes, known) [B, N] before -> after. Known codes are kept; the
    unknown ones hold this step's samples, of which the most confident are now known
    (maskgit_schedule(N, num_steps)[step] known in all)."""
    visible, given_valid, targets = self._maskgit_setup(batch, given, target)
    b, n = codes.shape
    valid = jnp.concatenate([given_valid, known], axis=1)
    logits = self._apply(params, dict(tokens, **{target: codes}), visible, valid, targets,
                         jnp.ones((b, n), bool), heads=(target,))[target]
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    key = jax.random.fold_in(rng, step)
    if self.temperature > 0:
      sampled = jax.random.categorical(key, logp / self.temperature, axis=-1)
    else:
      sampled = jnp.argmax(logp, axis=-1)
    sampled = sampled.astype(jnp.int32)
    conf = jnp.take_along_axis(logp, sampled[..., None], axis=-1)[..., 0]
    if self.choice_temperature > 0:
      r = (step + 1.0) / self.num_steps
      noise = jax.random.gumbel(jax.random.fold_in(key, 1), conf.shape)
      conf = conf + self.choice_temperature * (1.0 - r) * noise
    conf = jnp.where(known, jnp.inf, conf)
    rank = jnp.argsort(jnp.argsort(-conf, axis=1), axis=1)
    schedule = jnp.asarray(maskgit_schedule(n, self.num_steps), jnp.int32)
    return jnp.where(known, codes, sampled), rank < schedule[step]

  def _maskgit(self, params, tokens, batch, given, target, rng):
    b, n = self._batch_size(batch), self.counts[target]

    def step(s, state):
      return self.maskgit_step(params, tokens, batch, given, target, s, *state, rng)

    state = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b, n), bool))
    return jax.lax.fori_loop(0, self.num_steps, step, state)[0]

  def _text(self, params, tokens, batch, given, rng):
    b, n = self._batch_size(batch), self.counts["text"]
    index = self._indices(given)
    visible = jnp.broadcast_to(index, (b,) + index.shape)
    valid = self._input_valid(batch, given)
    targets = jnp.broadcast_to(self._indices(("text",)), (b, n))
    # The inputs do not change while the caption grows: one encoder pass, a decoder pass per
    # token.
    encoded, mask = self._apply(params, tokens, visible, valid, method=self.model.encode)

    def step(i, state):
      text, done = state
      logits = self._apply(params, encoded, mask, visible, dict(tokens, text=text), targets,
                           jnp.ones((b, n), bool), heads=("text",),
                           method=self.model.decode)["text"]
      logits = jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False)
      logits = jnp.where(jnp.arange(logits.shape[-1]) == 0, -1e9, logits)  # never pad
      if self.temperature > 0:
        token = jax.random.categorical(jax.random.fold_in(rng, i), logits / self.temperature)
      else:
        token = jnp.argmax(logits, axis=-1)
      token = jnp.where(done, 0, token).astype(jnp.int32)
      text = jax.lax.dynamic_update_slice_in_dim(text, token[:, None], i, axis=1)
      return text, done | (token == EOS_ID)

    state = (jnp.zeros((b, n), jnp.int32), jnp.zeros((b,), bool))
    return jax.lax.fori_loop(0, n, step, state)[0]

  def _names(self, names) -> tuple[str, ...]:
    out = []
    for m in names:
      tm = TOKEN_MODALITY.get(m, m)
      if tm not in self.token_modalities:
        raise ValueError(f"Modality {m!r} is not one of the model's {self.modalities}.")
      out.append(tm)
    return tuple(out)

  def _given_tokens(self, batch, inputs) -> dict:
    """Model tokens of `inputs` from the batch (codes missing from it: encoded from the raw
    batch key with the modality's tokenizer)."""
    tokens = self.tokens(batch)
    for m in inputs:
      if m in tokens:
        continue
      name = short_name(m)
      if name not in self.tokenizers or RAW_KEY.get(name) not in batch:
        raise ValueError(f"The batch has no {m!r} (keys: {sorted(batch)}); add it to "
                         f"input.modalities, or give objective.tokenizers a {name!r} "
                         f"tokenizer to encode batch[{RAW_KEY.get(name)!r}].")
      tokens[m] = jnp.asarray(self.tokenizers[name].encode(
          base.float_pixels(batch[RAW_KEY[name]], "4M's modality tokenizers")), jnp.int32)
    return {m: tokens[m] for m in inputs}

  def generate(self, params, batch, *, inputs, targets, rng=None) -> dict:
    """Chained generation (module docstring) -> {model modality: int32 [B, N_m]} for each
    target. inputs / targets: evaluator or model names. jit-compatible (static shapes)."""
    inputs, targets = self._names(inputs), self._names(targets)
    overlap = set(inputs) & set(targets)
    if overlap:
      raise ValueError(f"{sorted(overlap)} are both inputs and targets; a target is generated "
                       "from the inputs alone.")
    rng = jax.random.key(0) if rng is None else rng
    tokens = self._given_tokens(batch, inputs)
    batch = dict(batch, **tokens)
    given, out = inputs, {}
    for i, t in enumerate(targets):
      key = jax.random.fold_in(rng, i)
      if t == "text":
        out[t] = self._text(params, tokens, batch, given, key)
      else:
        out[t] = self._maskgit(params, tokens, batch, given, t, key)
      tokens[t] = batch[t] = out[t]
      batch = {k: v for k, v in batch.items() if k != modalities_lib.present_key(t)}  # generated: present
      given = given + (t,)
    return out

  def predict(self, params, batch, *, inputs, targets, rng=None) -> dict:
    """generate, then each grid target decoded by its tokenizer (module docstring)."""
    names = [short_name(m) for m in self._names(targets)]
    missing = [n for n in names if n != "text" and n not in self.tokenizers]
    if missing:
      raise ValueError(f"predict of {missing} decodes generated codes with a tokenizer; give "
                       "objective.tokenizers=((name, <vq_tokenizer workdir>), ...) for each.")
    codes = self.generate(params, batch, inputs=inputs, targets=targets, rng=rng)
    out = dict(codes)
    for name in names:
      m = TOKEN_MODALITY[name]
      out[name] = codes[m] if m == "text" else self.tokenizers[name].decode(codes[m])
    return out

  def embed_images(self, params, images):
    """[B, D]: mean of the encoder's outputs over all the rgb tokenizer's codes of `images`."""
    tokens = self._given_tokens({"image": images}, ("tok_rgb",))
    b = images.shape[0]
    visible = jnp.broadcast_to(self._indices(("tok_rgb",)), (b, self.counts["tok_rgb"]))
    encoded, mask = self._apply(params, tokens, visible, jnp.ones(visible.shape, bool),
                                method=self.model.encode)
    return self._apply(params, encoded, mask, method=self.model.pool).astype(jnp.float32)


def _load_tokenizer(name: str, workdir: str):
  tok = vq.load(workdir)
  if tok.modality != name:
    raise base.ConfigError(f"objective.tokenizers: {workdir!r} is a {tok.modality!r} tokenizer, "
                           f"not {name!r}.")
  return tok
