"""What every objective shares: the context the trainer hands it, its settings (filled from
`config.objective` and checked), and the helpers its example batch and checks use.

An objective class declares
  NAME                                its key in objectives.OBJECTIVES
  SETTINGS = dict(key=default, ...)   its `config.objective` keys besides `name`
  check_settings(settings)            (classmethod) ConfigError for a bad value
  BATCH_KEYS = (...)                  the batch keys it can read
  HINTS = {key: why}                  optional: shown when another objective is given `key`
and is built as `cls(model, context, **settings)` (missing settings take their defaults;
`fill` checks them). It provides
  example_batch() -> {key: ShapeDtypeStruct [1, ...]}   from the context, no data read
  init_params(rng) -> boxed params                       from zeros like example_batch()
  loss_fn(params, batch, rng) -> (loss, metrics)         [value_and_grad: optional]
and optionally state beside params and optimizer state (an EMA or frozen teacher, statistics),
sharded, checkpointed and resumed with them (train.make_train_state):
  init_extra_state(params) -> pytree                     state["extra"] at init
  update_extra_state(extra, params, step) -> extra       after each step's update [optional]
with which loss_fn / value_and_grad also get `extra=` (the state before the step); their
metrics may hold `EXTRA_STATS`: statistics of the step's forward pass (e.g. a DINO teacher's
mean output, for its centering) that the trainer takes out of the metrics (not logged) and
hands on as update_extra_state(extra, params, step, stats). With
`TAKES_STEP = True` they also get `step=` (int32 scalar: the steps done before this one), e.g.
for a loss switched on for the last part of training (`Context.total_steps`).
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from big_mm import config as config_lib
from big_mm import modalities as modalities_lib

ConfigError = config_lib.ConfigError
# The metrics key of the forward pass's statistics for update_extra_state (see above).
EXTRA_STATS = "extra_stats"


@dataclasses.dataclass(frozen=True)
class Context:
  """What the trainer gives an objective besides its model and settings (never the config).

  image_size: (height, width) of every batch image (input.pp_image's fixed output size;
  None when the pp keeps the source's size). frozen: params -> pytree of bool (True: the
  param is frozen, its lr multiplier 0), e.g. `functools.partial(optim.frozen_mask, optim)`.
  """
  mesh: Any = None                        # jax.sharding.Mesh; None: one device
  batch_size: int | None = None           # the global batch
  text_len: int = 16                      # batch["text"] is int32 [B, text_len]
  image_size: tuple[int, int] | None = None
  image_patches: tuple[int, int] | None = None  # NaFlex: (max_num_patches, patch_size)
  tokenizer: Any = None                   # big_mm.input.tokenizer.Tokenizer or None
  modalities: tuple[str, ...] | None = None  # input.modalities (None: image and text)
  prefix_column: str | None = None        # input.prefix_column: batch["prefix"] when set
  prefix_len: int = 0                     # batch["prefix"] is int32 [B, prefix_len]
  box_text_len: int = 0                   # batch["box_text"] is int32 [B, K, box_text_len]
  # One example's shape of each pp-shaped modality (audio, points, vec_*) of the run:
  # preprocess.output_shape(input.pp_modalities[m]) (modality_shapes).
  shapes: Mapping[str, tuple[int, ...]] | None = None
  frozen: Callable[[Any], Any] | None = None
  total_steps: int | None = None          # the run's training steps (None: not training)


def stop_frozen(ctx: Context, params):
  """params with the frozen ones (ctx.frozen: lr multiplier 0, e.g. LiT's image tower) behind
  stop_gradient, so no gradient is computed for them at all."""
  if ctx.frozen is None:
    return params
  return jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params,
                      ctx.frozen(params))


def fill(cls, given: Mapping[str, Any]) -> dict:
  """cls.SETTINGS with `given` on top, checked by cls.check_settings. An unknown key fails,
  naming the closest valid ones, or which objective has it (its HINTS, if any)."""
  settings = dict(cls.SETTINGS)
  for key, value in given.items():
    if key not in settings:
      hint = _other_objectives_hint(key)
      close = difflib.get_close_matches(key, list(cls.SETTINGS), n=3, cutoff=0.5)
      raise ConfigError(
          f"Unknown config key 'objective.{key}' for objective.name={cls.NAME!r}"
          + (f": {hint}." if hint else ".")
          + (f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else "")
          + f" Valid keys under objective: {sorted(['name', *cls.SETTINGS])}")
    settings[key] = value
  cls.check_settings(settings)
  return settings


def _other_objectives_hint(key: str) -> str:
  from big_mm.objectives import OBJECTIVES  # pylint: disable=g-import-not-at-top
  owners = [name for name, cls in OBJECTIVES.items() if key in cls.SETTINGS]
  hints = [getattr(OBJECTIVES[n], "HINTS", {}).get(key) for n in owners]
  hints = [h for h in hints if h]
  if hints:
    return hints[0]
  return f"it is a setting of objective.name in {owners} only" if owners else ""


# ---- value checks (messages name the objective.* key) ---------------------------------------

def choice(key: str, value, valid: tuple[str, ...]) -> None:
  if value not in valid:
    close = difflib.get_close_matches(str(value), list(valid), n=3, cutoff=0.5)
    raise ConfigError(f"objective.{key}={value!r} is not valid; choose one of {list(valid)}"
                      + (f". Did you mean {' or '.join(repr(c) for c in close)}?" if close
                         else ""))


def number(key: str, value) -> float:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise ConfigError(f"objective.{key} must be a number, got {value!r}.")
  return value


def positive_int(key: str, value, meaning: str = "") -> int:
  if isinstance(value, bool) or not isinstance(value, int) or value < 1:
    raise ConfigError(f"objective.{key} must be a positive integer{meaning}, got {value!r}.")
  return value


# ---- checks against the model and the input -------------------------------------------------

def float_pixels(x, who: str):
  """x itself; a ValueError if it holds uint8 pixels (pp op keep_uint8), which `who` (an
  objective whose targets or tokenizer read pixel values) cannot take."""
  if getattr(x, "dtype", None) == jnp.uint8:
    raise ValueError(f"{who} reads float pixels (its targets / tokens are pixel values), but the "
                     f"batch holds uint8 images from pp op keep_uint8 (only ViT image towers "
                     f"scale those): end input.pp_image in value_range(-1, 1) instead.")
  return x


def check_vocab(ctx: Context, vocab_size: int | None, key: str, *,
                needed_by: str | None = None) -> None:
  """Fails fast unless the tokenizer's vocabulary is the model's (`key`: the config key that
  sets the model's). needed_by: the objective that predicts tokens, so needs a tokenizer."""
  if ctx.tokenizer is None:
    if needed_by:
      raise ConfigError(
          f"objective.name={needed_by!r} predicts tokens, so it needs input.tokenizer (the "
          "path of a SentencePiece .model, e.g. data/digits_spm.model).")
    return
  pieces = ctx.tokenizer.vocab_size
  if vocab_size is not None and vocab_size != pieces:
    raise ConfigError(f"{key}={vocab_size} but the tokenizer {ctx.tokenizer.path!r} has "
                      f"{pieces} pieces; set {key}={pieces}.")


def check_loaded(ctx: Context, modalities, model, vocab_size: int | None, vocab_key: str, *,
                 needed_by: str | None = None) -> None:
  """Fails fast unless input.modalities loads each of the model's `modalities` and, with
  "text" among them, input.text_len is `model.text_len` and the tokenizer's vocabulary
  `vocab_size` (`vocab_key`: the config key that sets it; needed_by: as check_vocab)."""
  if ctx.modalities is not None:
    missing = [m for m in modalities if m not in tuple(ctx.modalities)]
    if missing:
      raise ConfigError(
          f"model.modalities has {missing} but input.modalities={tuple(ctx.modalities)} does "
          "not load them; add them to input.modalities (or drop them from model.modalities).")
  if "text" in modalities:
    if ctx.text_len != model.text_len:
      raise ConfigError(f"model.text_len={model.text_len} but input.text_len={ctx.text_len}; "
                        "set both to the same length.")
    check_vocab(ctx, vocab_size, vocab_key, needed_by=needed_by)


def image_size(pp_image: str) -> tuple[int, int] | None:
  """(height, width) of the images `pp_image` makes, or None when they keep the source's size
  (preprocess.image_size)."""
  from big_mm.input import preprocess  # pylint: disable=g-import-not-at-top
  return preprocess.image_size(pp_image)


def modality_shapes(input_cfg) -> dict[str, tuple[int, ...]]:
  """{modality: example shape} of the pp-shaped modalities input.modalities lists."""
  from big_mm.input import preprocess  # pylint: disable=g-import-not-at-top
  pps = input_cfg.get("pp_modalities") or {}
  return {modalities_lib.get(m).name: preprocess.output_shape(pps[modalities_lib.get(m).name])
          for m in input_cfg.get("modalities") or ()
          if modalities_lib.get(m).kind in modalities_lib.PP_SHAPED}


def naflex_patches(pp_image: str) -> tuple[int, int] | None:
  """(max_num_patches, patch_size) when `pp_image` ends with the naflex op, else None."""
  from big_mm.input import preprocess  # pylint: disable=g-import-not-at-top
  last = preprocess.parse_pp(pp_image, preprocess.IMAGE)[-1]
  return tuple(last.args[:2]) if last.name == "naflex" else None


def image_shape(ctx: Context) -> tuple[int, int, int]:
  if ctx.image_size is None:
    raise ConfigError(
        "input.pp_image leaves images at the size they are stored at, so the model's input size "
        "is unknown before reading data; end it with a fixed size, e.g. resize(224) or "
        "resize_small(256)|central_crop(224).")
  return tuple(ctx.image_size) + (3,)


def modality_example(ctx: Context, names) -> dict[str, jax.ShapeDtypeStruct]:
  """One example (batch of 1) of each named modality (big_mm/modalities.py), under its batch
  key, e.g. image float32 [1, H, W, 3] and text int32 [1, text_len]."""
  out = {}
  for name in names:
    mod = modalities_lib.get(name)
    if mod.kind == modalities_lib.IMAGE and ctx.image_patches:
      n, p = ctx.image_patches
      out[mod.batch_key] = jax.ShapeDtypeStruct((1, n, p * p * 3), mod.dtype)
      out[modalities_lib.mask_key(name)] = jax.ShapeDtypeStruct((1, n), jnp.bool_)
      out[modalities_lib.shape_key(name)] = jax.ShapeDtypeStruct((1, 2), jnp.int32)
      continue
    if mod.kind in modalities_lib.PP_SHAPED:
      if name not in (ctx.shapes or {}):
        raise ConfigError(f"The {name!r} tower needs input.modalities to list {name!r} and "
                          f"input.pp_modalities[{name!r}] to fix its shape (e.g. log_mel(...) "
                          "for audio, sample_points(n) for points, vector(d) for vectors).")
      out[mod.batch_key] = jax.ShapeDtypeStruct((1,) + tuple(ctx.shapes[name]), mod.dtype)
      continue
    hw = image_shape(ctx)[:2] if mod.kind != modalities_lib.TOKENS else None
    out[mod.batch_key] = jax.ShapeDtypeStruct((1,) + mod.example_shape(hw, ctx.text_len),
                                              mod.dtype)
  return out


def image_text_example(ctx: Context) -> dict[str, jax.ShapeDtypeStruct]:
  return modality_example(ctx, ("image", "text"))


def zeros(example: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
  """Zeros shaped like `example`, except that a padded input is one real position (its
  "_mask" True at 0, its "_shape" all 1: a one-patch NaFlex image), so it stays valid. Behind
  an optimization barrier: under jit, XLA would otherwise constant-fold the init's forward
  pass of these constants (seconds of compile for a point tower's farthest-point sampling)."""
  out = {k: jnp.zeros(v.shape, v.dtype) for k, v in example.items()}
  for k, v in example.items():
    if k.endswith("_mask"):
      out[k] = out[k].at[..., 0].set(True)
    elif k.endswith("_shape"):
      out[k] = jnp.ones(v.shape, v.dtype)
  return jax.lax.optimization_barrier(out)
