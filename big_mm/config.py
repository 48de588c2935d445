"""Config loading: `path.py:arg` strings, `--config.a.b=value` overrides, validation, durations.

A recipe file defines `get_config(arg=None)` returning an `ml_collections.ConfigDict`.
`load()` merges it onto `defaults()` (the schema: every valid key with its default),
applies command-line overrides, validates and locks the result. Any key that is not
in the schema fails here, before any compute, naming the key and the closest valid ones.
Sections listed in `FREE_FORM` (model kwargs, eval definitions, objective settings) are
validated by their consumers (the model constructor; each evaluator type, through
big_mm.evaluators.check; the named objective, through big_mm.objectives.settings) instead.

Durations (`total_*`, `optim.schedule.warmup_*`, `checkpoint.every_*`, `evals.*.every_*`, each
in steps, epochs or examples) are resolved to steps after the overrides, and a duration set on
the command line wins: it replaces the recipe's in another unit, and a run shortened there
(`--config.total_steps=50` on a recipe that sized its warmup for 600 steps) scales the recipe's
warmup down with it (`durations_after_overrides`). `diff` lists the keys two configs differ in.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import logging
import math
import os
import sys
from typing import Any, Iterable

import ml_collections

ConfigDict = ml_collections.ConfigDict

# Sections whose keys are not fixed by the schema: checked by their consumers.
FREE_FORM = ("model", "evals", "objective")
DURATION_UNITS = ("steps", "epochs", "examples")

OPTIMIZERS = ("adamw", "adafactor")
NAN_POLICIES = ("skip", "stop")
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")

class ConfigError(ValueError):
  """A config that cannot run: the message says which key and what to do."""


def defaults() -> ConfigDict:
  """The schema: every valid top-level key, with its default value."""
  c = ConfigDict()
  c.seed = 0
  c.batch_size = 256
  c.total_steps = None
  c.total_epochs = None
  c.total_examples = None
  c.log_every_steps = 50
  # A step with a non-finite loss or gradient never updates the params. "skip": count it and
  # go on; "stop": save the last good state and stop (checked at every step).
  c.nan_policy = "stop"

  c.model_name = "towers"
  # kwargs of the model class (FREE_FORM); towers: model.towers = {modality: tower kwargs}.
  c.model = ConfigDict()

  # name + that objective's keys only (FREE_FORM): each objective declares its SETTINGS with
  # defaults and checks (big_mm/objectives/; the registry: objectives.OBJECTIVES); validate()
  # fills them in and refuses any other key.
  c.objective = ConfigDict(dict(name="contrastive"))

  c.optim = ConfigDict(dict(
      name="adamw", lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, wd=1e-4, clip_norm=1.0,
      wd_mask=r".*/kernel$",
      lr_mults=((".*", 1.0),),
      schedule=ConfigDict(dict(name="cosine", warmup_steps=None, warmup_epochs=None,
                               warmup_examples=None, end_lr_fraction=0.0, timescale=10_000,
                               cooldown_steps=0)),
      adafactor=ConfigDict(dict(decay_rate=0.8, beta2_cap=0.999, momentum=0.9,
                                factored_min_dim=32, eps=1e-30, clipping_threshold=None,
                                momentum_dtype="bfloat16", decay_offset=0)),
  ))

  # pp_image: image ops, pp_text: text ops (big_mm/input/preprocess.py); the pipeline runs
  # them as one pp string. pp_text=None: tokenize(text_len) when a tokenizer is set.
  # data: a TFDS name, "tar:PATTERN", "parquet:|csv:|jsonl:PATTERN" or a mixture
  # ((spec, weight), ...) (big_mm/input/sources.py). image_column / text_column: the table
  # columns, the tar image extension / json caption field, or the TFDS feature (a path for a
  # nested one, e.g. "captions/text") (None: sources' defaults).
  # modalities (MultiMAE): None = image + text; else a tuple of MODALITIES. rgb is the batch's
  # "image"; depth ([H, W] float) and semseg ([H, W] int class ids) come from depth_column /
  # semseg_column (None: "depth" / "semseg") and get pp_image's geometric ops (same draws);
  # tok_rgb / tok_depth / tok_semseg (4M): stored token codes int32 [N] (tools/
  # tokenize_dataset.py), which no pp op may move (big_mm/input/dense.py).
  # prefix_column (prefix-LM captioners): a text field tokenized to prefix_len tokens as
  # batch["prefix"]; None: no prefix.
  # box_column (LocCa): a field of [n, 4] normalised (ymin, xmin, ymax, xmax) boxes, with one
  # referring expression per box in box_text_column -> batch["boxes"] f32 [max_boxes, 4] in the
  # coordinates of the preprocessed image and batch["box_text"] i32 [max_boxes, box_text_len]
  # (absent boxes: zero rows); None: no boxes (big_mm/input/boxes.py).
  # max_bad_fraction: bad records are skipped, but a source (a mixture part) with more than
  # this fraction bad among its last 1000 reads stops training, naming it (in [0, 1); 0: stop
  # at the first bad record); drop_failing_parts: drop such a mixture part instead (logged as
  # an error) and train on the others (big_mm/input/pipeline.py).
  # captions_per_example = k > 1 (contrastive training): k captions of each record per step,
  # batch["text"] [B, k, L], all positives of their image (objectives/losses.py,
  # multi_positive_loss); split_long_captions: a caption longer than text_len is split into
  # sentences / word runs (captions of their own) instead of truncated (input/pipeline.py).
  # language_column: the record field / TFDS feature / table column holding each record's
  # language code; language_temperature = T (None: off; a number >= 1, inf: uniform): training
  # draws language l with p_l ~ n_l^(1/T), n_l its natural share (mixtures: the weighted share;
  # the parts keep their weights within a language) (big_mm/input/languages.py); languages:
  # a tuple of codes, only records in these languages are trained on (None: all).
  # N-modal binding: input.modalities listing a pp-shaped modality (audio, points, vec_*)
  # makes every listed modality optional (batch[m] zeros and batch[m + "_present"] 0 where a
  # record lacks it; mixture parts may carry different subsets); pp_modalities = {modality:
  # pp string} for those (its last shape-fixing op fixes the example shape, e.g. log_mel(...),
  # sample_points(n), vector(d)); columns = {modality: record field} (None: the name).
  c.input = ConfigDict(dict(
      data="digits_captions", split="train", data_dir=None, image_column=None,
      text_column=None, tokenizer=None, text_len=16,
      pp_image="decode|resize(224)|value_range(-1,1)", pp_text=None, num_workers=0,
      num_threads=2, prefetch=2, shuffle=True, modalities=None, depth_column=None,
      semseg_column=None, prefix_column=None, prefix_len=0, box_column=None,
      box_text_column=None, max_boxes=0, box_text_len=0, max_bad_fraction=0.5,
      drop_failing_parts=False, captions_per_example=1, split_long_captions=False,
      language_column=None, language_temperature=None, languages=None, pp_modalities=None,
      columns=None,
  ))
  # {name: {type: ..., ...}} (FREE_FORM): each type's keys, defaults and checks are its
  # evaluator's (big_mm/evaluators/; every_* durations: evaluators/common.py DEFAULTS).
  c.evals = ConfigDict()

  # Mesh axis sizes, in mesh order (-1: the rest of the devices). The batch is split over
  # data and fsdp; expert: the experts of mixture-of-experts params (logical axis "expert").
  c.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, expert=1))
  c.sharding_rules = None  # None: big_mm.sharding.DEFAULT_RULES

  c.checkpoint = ConfigDict(dict(every_steps=None, every_epochs=None, every_examples=None,
                                 keep=3, async_save=True))
  # Initialise (part of) the params from another run, e.g. LiT's pretrained image tower.
  c.init = ConfigDict(dict(workdir=None, path=None, step=None, include=".*",
                           inflate=None))
  return c


# ---------------------------------------------------------------------------------------
# Arg strings: `configs/x.py:batch=32,img=B/16` -> get_config("batch=32,img=B/16").

def parse_arg(arg: str | None, **defaults_: Any) -> ConfigDict:
  """Parses a config file's `k=v,k2=v2` (or bare flag `k`) argument into a ConfigDict.

  Values are converted to the type of the default given for that key; unknown keys fail.
  """
  out = ConfigDict(dict(defaults_))
  if not arg:
    return out
  for item in arg.split(","):
    if not item:
      continue
    key, eq, value = item.partition("=")
    key = key.strip()
    if key not in defaults_:
      raise ConfigError(f"Unknown config argument {key!r}; valid: {sorted(defaults_)}"
                        f"{suggest(key, defaults_)}")
    default = defaults_[key]
    if not eq:  # bare flag
      value = True
    elif isinstance(default, bool):
      value = value.lower() in ("1", "true", "yes", "y")
    elif default is not None:
      value = type(default)(value)
    out[key] = value
  return out


def suggest(key: str, valid: Iterable[str]) -> str:
  close = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
  return f". Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""


def load_file(spec: str) -> ConfigDict:
  """Loads `path.py[:arg]` by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise ConfigError(f"Config file {path!r} not found (from --config {spec!r}). "
                      "Give a path to a .py file defining get_config(), e.g. configs/demo.py.")
  # Configs may import siblings (`from configs import common`): put the repo root on the path.
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  module_spec = importlib.util.spec_from_file_location(
      "big_mm_config_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"Config file {path!r} defines no get_config(arg=None).")
  return module.get_config(arg or None) if arg else module.get_config()


# ---------------------------------------------------------------------------------------
# Merge onto the schema, overrides, validation.

def _merge(base: ConfigDict, user: ConfigDict | dict, prefix: str) -> None:
  for key, value in user.items():
    path = f"{prefix}{key}"
    if key not in base:
      raise ConfigError(f"Unknown config key {path!r}{suggest(key, base.keys())} "
                        f"Valid keys under {prefix.rstrip('.') or 'the top level'}: "
                        f"{sorted(base.keys())}")
    if path in FREE_FORM:  # onto the section's defaults (only objective.name has one)
      base[key] = ConfigDict({**_to_dict(base[key]), **(_to_dict(value) if value is not None
                                                         else {})})
    elif isinstance(base[key], ConfigDict) and isinstance(value, (ConfigDict, dict)):
      _merge(base[key], value, path + ".")
    else:
      with base.ignore_type():
        base[key] = value


def _to_dict(value):
  return value.to_dict() if isinstance(value, ConfigDict) else dict(value)


def parse_value(text: str) -> Any:
  """Command-line value: a Python literal where it parses as one, else the string."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ConfigDict, dotted: str, value: Any) -> None:
  """`--config.optim.lr=1e-3`: sets an existing key (or any key inside a FREE_FORM section)."""
  parts = dotted.split(".")
  node, path = config, ""
  for i, part in enumerate(parts):
    path = f"{path}.{part}" if path else part
    last = i == len(parts) - 1
    in_free_form = parts[0] in FREE_FORM and i > 0
    if part not in node:
      if in_free_form:
        if last:
          node[part] = value
          return
        node[part] = ConfigDict()
      else:
        raise ConfigError(f"Unknown config key {path!r} in override --config.{dotted}"
                          f"{suggest(part, node.keys())} Valid keys here: {sorted(node.keys())}")
    if last:
      old = node[part]
      # In a FREE_FORM section a value may replace a dict (e.g. model.out_dim: one int for
      # every tower instead of {modality: int}); its consumer checks it.
      if isinstance(old, ConfigDict) and not in_free_form:
        raise ConfigError(f"--config.{dotted} names a section; set one of its keys: "
                          f"{sorted(old.keys())}")
      if isinstance(old, bool) and isinstance(value, str):
        value = value.lower() in ("1", "true", "yes")
      elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
      with node.ignore_type():
        node[part] = value
      return
    node = node[part]


def migrate_two_towers(config: ConfigDict) -> None:
  """A config written for the old "two_towers" model (model.image / model.text / out_dim=
  (image, text)) becomes the "towers" model (model.towers.image / .text, out_dim per
  modality), with a warning naming the new keys. Mixing both layouts fails."""
  legacy = [k for k in ("image", "text") if k in config.model]
  if config.model_name != "two_towers":
    if config.model_name == "towers" and legacy:
      raise ConfigError(
          f"model.{legacy[0]} is not a towers-model key: tower kwargs go under "
          f"model.towers.{legacy[0]} (e.g. --config.model.towers.{legacy[0]}.variant=...).")
    return
  from big_mm.models import towers  # pylint: disable=g-import-not-at-top
  if "towers" in config.model:
    raise ConfigError("model_name='two_towers' with model.towers: set model_name='towers'.")
  config.model_name = "towers"
  config.model = ConfigDict(towers.from_two_towers(_to_dict(config.model)))
  logging.warning("model_name='two_towers' is now 'towers': read model.image / model.text as "
                  "model.towers.image / model.towers.text and out_dim=(image, text) as "
                  "out_dim={'image': ..., 'text': ...}; update the config to silence this.")


def validate(config: ConfigDict) -> None:
  """Checks values (not only keys). Raises ConfigError naming the key and valid choices."""
  one_duration(config, "total", required=True)
  one_duration(config.optim.schedule, "warmup", prefix="optim.schedule.")
  one_duration(config.checkpoint, "every", prefix="checkpoint.")
  _validate_data(config)
  _validate_objective(config)
  choice("optim.name", config.optim.name, OPTIMIZERS)
  choice("nan_policy", config.nan_policy, NAN_POLICIES)
  choice("optim.schedule.name", config.optim.schedule.name, SCHEDULES)
  _validate_pp(config.input)
  _validate_modalities(config.input)
  _validate_captions_per_example(config)
  _validate_boxes(config)
  _validate_languages(config.input)
  if not 0 <= config.input.max_bad_fraction < 1:
    raise ConfigError(f"input.max_bad_fraction must be in [0, 1) (0: stop at the first bad "
                      f"record), got {config.input.max_bad_fraction!r}.")
  if not isinstance(config.batch_size, int) or config.batch_size <= 0:
    raise ConfigError(f"batch_size must be a positive integer, got {config.batch_size!r}.")
  for axis, size in config.mesh.items():
    if not isinstance(size, int) or (size < 1 and size != -1):
      raise ConfigError(f"mesh.{axis} must be a positive integer or -1 (the rest), got {size!r}.")
  from big_mm import evaluators  # pylint: disable=g-import-not-at-top
  for name, ev in config.evals.items():
    evaluators.check(name, ev)


def _validate_languages(input_cfg: ConfigDict) -> None:
  """input.language_temperature: None or a number >= 1, and then input.language_column names
  the language field."""
  column, temperature = input_cfg.language_column, input_cfg.language_temperature
  if column is not None and (not isinstance(column, str) or not column):
    raise ConfigError(f"input.language_column must be a field name (a non-empty string) or "
                      f"None, got {column!r}.")
  keep = input_cfg.languages
  if keep is not None:
    if (isinstance(keep, str) or not isinstance(keep, (tuple, list)) or not keep
        or not all(isinstance(l, str) and l for l in keep)):
      raise ConfigError(f"input.languages must be None or a non-empty tuple of language codes, "
                        f"e.g. ('en',); got {keep!r}.")
    if column is None:
      raise ConfigError(f"input.languages={tuple(keep)!r} needs input.language_column: the "
                        f"record field holding each record's language (e.g. 'language').")
  if temperature is None:
    return
  from big_mm.input import languages  # pylint: disable=g-import-not-at-top
  try:
    languages.check_temperature(temperature)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if column is None:
    raise ConfigError(f"input.language_temperature={temperature!r} needs input.language_column: "
                      f"the record field / TFDS feature / table column holding each record's "
                      f"language (e.g. 'language').")


def _validate_objective(config: ConfigDict) -> None:
  """config.objective becomes `name` + that objective's settings (defaults filled in); unknown
  keys and bad values fail (big_mm/objectives/). A text prefix (input.prefix_column makes
  batch["prefix"]) needs an objective that reads it."""
  from big_mm import objectives  # pylint: disable=g-import-not-at-top
  config.objective = ConfigDict(objectives.settings(config.objective))
  name = config.objective.name
  if config.input.prefix_column and "prefix" not in objectives.get_objective(name).BATCH_KEYS:
    readers = [n for n, cls in objectives.OBJECTIVES.items() if "prefix" in cls.BATCH_KEYS]
    raise ConfigError(
        f"input.prefix_column={config.input.prefix_column!r} is read only by captioners with "
        f"a text prefix (objective.name in {readers}, model.text_prefix_len > 0); "
        f"objective.name is {name!r}. Unset input.prefix_column.")


def _validate_captions_per_example(config: ConfigDict) -> None:
  """input.captions_per_example: a positive int; k > 1 only where the loss takes several
  positives (contrastive, implementation "xla"). split_long_captions: a bool. Both need
  tokenized text and no input.modalities (MultiMAE's pipeline reads one caption)."""
  k, split = config.input.captions_per_example, config.input.split_long_captions
  if isinstance(k, bool) or not isinstance(k, int) or k < 1:
    raise ConfigError(f"input.captions_per_example must be a positive integer (1: one caption "
                      f"per image), got {k!r}.")
  if not isinstance(split, bool):
    raise ConfigError(f"input.split_long_captions must be True or False, got {split!r}.")
  if k == 1 and not split:
    return
  used = "input.captions_per_example" if k > 1 else "input.split_long_captions"
  if config.input.modalities is not None or not config.input.tokenizer:
    raise ConfigError(f"{used} needs tokenized captions (input.tokenizer) and no "
                      f"input.modalities (got {config.input.modalities!r}).")
  if k > 1 and config.objective.name != "contrastive":
    raise ConfigError(f"input.captions_per_example={k} gives [B, {k}, L] texts, which only "
                      f"objective.name='contrastive' reads (as {k} positives per image); "
                      f"objective.name is {config.objective.name!r}. Use 1.")
  if k > 1 and config.objective.implementation != "xla":
    raise ConfigError(f"input.captions_per_example={k} needs objective.implementation='xla': "
                      f"the fused {config.objective.implementation!r} kernels take one "
                      f"positive per image.")


def _validate_boxes(config: ConfigDict) -> None:
  """input.box_column (LocCa boxes) needs box_text_column, max_boxes, box_text_len >= 1, a
  tokenizer, no input.modalities, a pp_image without randaugment, and an objective that reads
  batch["boxes"]."""
  cfg = config.input
  for key in ("box_column", "box_text_column"):
    value = cfg.get(key)
    if value is not None and not (isinstance(value, str) and value):
      raise ConfigError(f"input.{key} must be a field name (a non-empty string) or None, got "
                        f"{value!r}.")
  if cfg.box_column is None:
    return
  if cfg.box_text_column is None:
    raise ConfigError(f"input.box_column={cfg.box_column!r} needs input.box_text_column: the "
                      "field of each box's referring expression.")
  for key in ("max_boxes", "box_text_len"):
    value = cfg.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ConfigError(f"input.{key} must be a positive integer with input.box_column set, "
                        f"got {value!r}.")
  if not cfg.tokenizer or cfg.modalities is not None:
    raise ConfigError(f"input.box_column needs input.tokenizer (box texts are tokenized) and no "
                      f"input.modalities (got {cfg.modalities!r}).")
  from big_mm.input import boxes, preprocess  # pylint: disable=g-import-not-at-top
  try:
    boxes.check_pp([o.name for o in preprocess.parse_pp(cfg.pp_image)])
  except ValueError as e:
    raise ConfigError(f"input.pp_image: {e}") from None
  from big_mm import objectives  # pylint: disable=g-import-not-at-top
  name = config.objective.name
  if "boxes" not in objectives.get_objective(name).BATCH_KEYS:
    readers = [n for n, cls in objectives.OBJECTIVES.items() if "boxes" in cls.BATCH_KEYS]
    raise ConfigError(f"input.box_column={cfg.box_column!r} makes batch['boxes'], which "
                      f"objective.name={name!r} does not read (readers: {readers}). Unset "
                      f"input.box_column.")


def _validate_modalities(input_cfg) -> None:
  """input.modalities: None or distinct names of big_mm/modalities.py including the image
  ("rgb") or token codes (tok_*; the image is loaded either way); dense ones need a pp_image
  whose ops dense maps can follow, token codes one that moves no pixel (big_mm/input/dense.py)."""
  from big_mm import modalities as modalities_lib  # pylint: disable=g-import-not-at-top
  modalities = input_cfg.modalities
  if modalities is None:
    return
  if isinstance(modalities, str) or not isinstance(modalities, (tuple, list)) or not modalities:
    raise ConfigError(f"input.modalities must be None or a tuple of {modalities_lib.names()}, "
                      f"got {modalities!r}.")
  for m in modalities:
    choice("input.modalities entry", m, modalities_lib.names())
  found = [modalities_lib.get(m) for m in modalities]
  codes = any(mod.kind == modalities_lib.CODES for mod in found)
  if any(mod.kind in modalities_lib.PP_SHAPED for mod in found):
    _validate_binding(input_cfg, found)
  elif len(set(found)) != len(found) or not (modalities_lib.get("image") in found or codes):
    raise ConfigError(f"input.modalities={tuple(modalities)!r} must name each modality once "
                      f"and include 'rgb' (the batch's image) or token codes (tok_*).")
  for mod in found:
    value = input_cfg.get(mod.column_key) if mod.column_key else None
    if value is not None and not (isinstance(value, str) and value):
      raise ConfigError(f"input.{mod.column_key} must be a field name (a non-empty string) or "
                        f"None, got {value!r}.")
  if codes or any(mod.kind == modalities_lib.DENSE for mod in found):
    from big_mm.input import dense, preprocess  # pylint: disable=g-import-not-at-top
    try:
      dense.check_pp(preprocess.parse_pp(input_cfg.pp_image), codes=codes)
    except ValueError as e:
      kind = "token (tok_*)" if codes else "dense"
      raise ConfigError(f"input.pp_image with {kind} input.modalities: {e}") from None


def _validate_binding(input_cfg, found) -> None:
  """Binding mode (a pp-shaped modality listed): image, text and pp-shaped modalities only,
  each once; input.pp_modalities has a pp string acting on each pp-shaped one's kind whose
  shape it fixes; input.columns names listed modalities; a listed image needs a fixed size."""
  from big_mm import modalities as modalities_lib  # pylint: disable=g-import-not-at-top
  from big_mm.input import preprocess  # pylint: disable=g-import-not-at-top
  names = [mod.name for mod in found]
  allowed = {"image", "text"}
  bad = [m for m in found if m.name not in allowed and m.kind not in modalities_lib.PP_SHAPED]
  if bad or len(set(names)) != len(names):
    raise ConfigError(f"input.modalities={tuple(names)!r}: with pp-shaped modalities (audio, "
                      f"points, vec_*) each modality is named once and the others are only "
                      f"'image' and 'text' (got {[m.name for m in bad]}).")
  pps = dict(input_cfg.pp_modalities or {})
  for name in [m for m in pps if m not in names]:
    raise ConfigError(f"input.pp_modalities[{name!r}] is given but input.modalities="
                      f"{tuple(names)!r} does not list {name!r}.")
  for mod in found:
    if mod.kind not in modalities_lib.PP_SHAPED:
      continue
    if mod.name not in pps:
      raise ConfigError(f"input.modalities lists {mod.name!r}: set input.pp_modalities"
                        f"[{mod.name!r}] to its pp string (ops on {mod.kind!r}: "
                        f"{preprocess.valid_ops(mod.kind)}).")
    try:
      shape = preprocess.output_shape(pps[mod.name]) if preprocess.parse_pp(
          pps[mod.name], mod.kind) else None
    except ValueError as e:
      raise ConfigError(f"input.pp_modalities[{mod.name!r}]: {e}") from None
    if shape is None:
      raise ConfigError(f"input.pp_modalities[{mod.name!r}]={pps[mod.name]!r} does not fix the "
                        f"example shape; end it with an op that does (e.g. log_mel(frames) for "
                        f"audio, sample_points(n) for points, vector(d) for vectors).")
  for name, field in dict(input_cfg.columns or {}).items():
    if name not in names or not (isinstance(field, str) and field):
      raise ConfigError(f"input.columns[{name!r}]={field!r}: keys must be modalities that "
                        f"input.modalities lists ({names}), values record field names.")
  if "image" in names and preprocess.image_size(input_cfg.pp_image) is None:
    raise ConfigError(f"input.modalities={tuple(names)!r} makes the image optional, so "
                      f"input.pp_image must give a fixed size (end it with resize(S) or a "
                      f"crop); got {input_cfg.pp_image!r}.")


def _validate_pp(input_cfg) -> None:
  """input.pp_image / pp_text parse, act on their key, and agree with text_len / tokenizer."""
  from big_mm.input import preprocess  # pylint: disable=g-import-not-at-top
  parsed = {}
  for key, kind in (("pp_image", preprocess.IMAGE), ("pp_text", preprocess.TEXT)):
    pp = input_cfg.get(key)
    if pp is None and key == "pp_text":
      continue
    try:
      parsed[key] = preprocess.parse_pp(pp, kind)
    except ValueError as e:
      raise ConfigError(f"input.{key}: {e}") from None
  text_len = input_cfg.text_len
  if isinstance(text_len, bool) or not isinstance(text_len, int) or text_len < 1:
    raise ConfigError(f"input.text_len must be a positive integer, got {text_len!r}.")
  if "pp_text" in parsed:
    last = parsed["pp_text"][-1]
    if last.name != "tokenize":
      raise ConfigError(f"input.pp_text={input_cfg.pp_text!r} must end with "
                        f"tokenize({text_len}) (batches hold token ids).")
    if last.args[0] != text_len:
      raise ConfigError(f"input.pp_text has tokenize({last.args[0]}) but input.text_len="
                        f"{text_len}; set both to the same length.")
    if not input_cfg.tokenizer:
      raise ConfigError("input.pp_text tokenizes, but input.tokenizer is not set; give the "
                        "path of a SentencePiece .model (tools/make_tokenizer.py makes one).")


def _validate_data(config: ConfigDict) -> None:
  """input.data (and evals' data) parse as source specs; evals do not silently read the
  training files. File existence is checked when the data is opened."""
  from big_mm.input import sources  # pylint: disable=g-import-not-at-top
  for key in ("image_column", "text_column"):
    value = config.input.get(key)
    if value is not None and not (isinstance(value, str) and value):
      raise ConfigError(f"input.{key} must be a column name (a non-empty string) or None "
                        f"(the defaults), got {value!r}.")
  specs = [("input.data", config.input.data)] + [
      (f"evals.{name}.data", ev.get("data")) for name, ev in config.evals.items()
      if ev.get("data")]
  for key, data in specs:
    try:
      sources.check_data(data)
    except sources.SpecError as e:
      raise ConfigError(f"{key}: {e}") from None
  shared = sources.files_without_split(config.input.data)
  from big_mm.evaluators import common as evaluators_common  # pylint: disable=g-import-not-at-top
  for name, ev in config.evals.items():
    split = ev.get("split") or evaluators_common.DEFAULTS["split"]
    never_runs = ev.get("every_steps") == 0
    if shared and not ev.get("data") and "[" not in split and not never_runs:
      raise ConfigError(
          f"evals.{name} reads split {split!r} of input.data, but {shared[0]!r} has "
          f"no {{split}} placeholder, so it would evaluate on the training files. Give "
          f"evals.{name}.data (e.g. 'tar:/data/val/*.tar'), put {{split}} in the path, or "
          f"slice: input.split='train[:95%]' and evals.{name}.split='train[95%:]'.")


def choice(key: str, value: Any, valid: tuple[str, ...]) -> None:
  if value not in valid:
    raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(valid)}"
                      f"{suggest(str(value), valid)}")


def one_duration(section, name: str, *, prefix: str = "", required: bool = False) -> None:
  given = [u for u in DURATION_UNITS if section.get(f"{name}_{u}") is not None]
  if len(given) > 1:
    raise ConfigError(f"Set only one of {', '.join(prefix + name + '_' + u for u in given)}.")
  if required and not given:
    raise ConfigError(f"No duration: set one of "
                      f"{', '.join(prefix + name + '_' + u for u in DURATION_UNITS)}.")


def resolve_steps(section, name: str, *, batch_size: int, num_examples: int | None,
                  default: int | None = None) -> int | None:
  """`{name}_steps|_epochs|_examples` in `section` -> a number of steps (or `default`)."""
  steps = section.get(f"{name}_steps")
  epochs = section.get(f"{name}_epochs")
  examples = section.get(f"{name}_examples")
  if steps is not None:
    return int(steps)
  if examples is not None:
    return max(1, math.ceil(examples / batch_size))
  if epochs is not None:
    if not num_examples:
      raise ConfigError(f"{name}_epochs needs the dataset size, which is unknown here; "
                        f"give {name}_steps instead.")
    return max(1, round(epochs * num_examples / batch_size))
  return default


def durations_after_overrides(config: ConfigDict, recipe: ConfigDict,
                              overrides: dict[str, Any]) -> None:
  """Durations set on the command line win over the recipe's (`recipe`: the config before the
  overrides):

  - `--config.NAME_UNIT=v` clears NAME in the recipe's other units (`--config.total_steps=50`
    on a recipe that sets total_examples replaces it).
  - A run made shorter on the command line (total_*), without a warmup of its own there,
    shrinks the recipe's warmup (optim.schedule.warmup_*, and cooldown_steps) by the same
    factor, so that it keeps its share of the run as the recipe's argument would (logged).
    A longer run keeps the recipe's warmup. Periods (checkpoint.every_*, evals.*.every_*) are
    not scaled: one longer than the run means "at the end only".
  Every duration is then resolved to steps from the final config (`resolve_steps`).
  """
  for dotted, value in overrides.items():
    section_path, _, key = dotted.rpartition(".")
    name, _, unit = key.rpartition("_")
    if value is None or unit not in DURATION_UNITS:
      continue
    section = config
    for part in filter(None, section_path.split(".")):
      section = section[part]
    for other in DURATION_UNITS:
      other_key = f"{name}_{other}"
      other_dotted = f"{section_path}.{other_key}" if section_path else other_key
      if other != unit and other_dotted not in overrides and section.get(other_key) is not None:
        with section.ignore_type():
          section[other_key] = None
  if not any(k.startswith("total_") for k in overrides) or any(
      k.startswith("optim.schedule.warmup_") or k == "optim.schedule.cooldown_steps"
      for k in overrides):
    return
  old, new = _run_length(recipe), _run_length(config)
  if old is None or new is None or old[0] != new[0] or not old[1]:
    return
  ratio = new[1] / old[1]  # of examples (or epochs)
  ratio_steps = ratio * recipe.batch_size / config.batch_size
  schedule = config.optim.schedule
  scaled = []
  for key, factor in (("warmup_steps", ratio_steps), ("warmup_examples", ratio),
                      ("warmup_epochs", ratio), ("cooldown_steps", ratio_steps)):
    value = schedule.get(key)
    if value and factor < 1:
      new_value = value * factor if key == "warmup_epochs" else max(1, round(value * factor))
      with schedule.ignore_type():
        schedule[key] = new_value
      scaled.append(f"optim.schedule.{key} {value} -> {new_value}")
  if scaled:
    logging.getLogger("big_mm").info(
        "The command line shortened the run to x%.3g of the recipe's steps; scaled %s to "
        "keep their share (set --config.optim.schedule.warmup_* to choose yourself).",
        ratio_steps, ", ".join(scaled))


def _run_length(config: ConfigDict) -> tuple[str, float] | None:
  """The run's length as ("examples", n) or ("epochs", n); None if not (yet) valid."""
  batch_size = config.batch_size
  if not isinstance(batch_size, int) or batch_size <= 0:
    return None
  for unit, value in (("epochs", config.total_epochs), ("examples", config.total_examples),
                      ("examples", None if config.total_steps is None
                       else config.total_steps * batch_size)):
    if value is not None:
      return (unit, value) if isinstance(value, (int, float)) else None
  return None


class _Absent:
  def __repr__(self):
    return "(not set)"


ABSENT = _Absent()


def flatten(config, prefix: str = "") -> dict[str, Any]:
  """{dotted key: value} of a config's leaves (an empty section is a leaf: {})."""
  out = {}
  for key, value in config.items():
    if isinstance(value, (ConfigDict, dict)) and value:
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = {} if isinstance(value, (ConfigDict, dict)) else value
  return out


def diff(old, new) -> list[tuple[str, Any, Any]]:
  """(key, old value, new value) for each leaf whose value differs (ABSENT where one config
  lacks the key), in `new`'s key order."""
  flat_old, flat_new = flatten(old), flatten(new)
  keys = list(flat_new) + [k for k in flat_old if k not in flat_new]
  return [(k, flat_old.get(k, ABSENT), flat_new.get(k, ABSENT)) for k in keys
          if flat_old.get(k, ABSENT) != flat_new.get(k, ABSENT)]


def format_diff(changes: list[tuple[str, Any, Any]]) -> str:
  return "\n".join(f"  {key}: {old!r} -> {new!r}" for key, old, new in changes)


def load(spec: str | ConfigDict, overrides: dict[str, Any] | None = None) -> ConfigDict:
  """Config file spec (or a ConfigDict) + overrides -> a validated, locked ConfigDict."""
  user = load_file(spec) if isinstance(spec, str) else spec
  config = defaults()
  _merge(config, user, "")
  recipe = config.copy_and_resolve_references()
  for dotted, value in (overrides or {}).items():
    apply_override(config, dotted, value)
  durations_after_overrides(config, recipe, overrides or {})
  migrate_two_towers(config)
  validate(config)
  from big_mm import evaluators  # pylint: disable=g-import-not-at-top
  for ev_name in list(config.evals.keys()):
    config.evals[ev_name] = ConfigDict(evaluators.with_defaults(config.evals[ev_name].to_dict()))
  config.lock()
  return config


def parse_command_line(argv: list[str]) -> tuple[dict[str, str], dict[str, Any]]:
  """Splits `--flag=value` / `--flag value` args into (flags, config overrides).

  `--config.a.b=v` go to overrides (parsed as Python literals where possible).
  """
  flags, overrides = {}, {}
  i = 0
  while i < len(argv):
    arg = argv[i]
    if not arg.startswith("--"):
      raise ConfigError(f"Unexpected argument {arg!r}; flags look like --name=value.")
    name, eq, value = arg[2:].partition("=")
    if not eq:
      if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        value = "true"
      else:
        i += 1
        value = argv[i]
    if name.startswith("config."):
      overrides[name[len("config."):]] = parse_value(value)
    else:
      flags[name] = value
    i += 1
  return flags, overrides
