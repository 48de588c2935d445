"""Optimizer (optax chain) from the `optim` config section.

Public API
----------
`make_optimizer(optim_cfg, params, total_steps) -> (tx, schedule_fn)`
    `tx` is an `optax.GradientTransformation`; `schedule_fn(step) -> lr` is the full
    (scheduled) base learning rate, for logging.
`make_schedule(schedule_cfg, lr, total_steps) -> schedule_fn`
`frozen_mask(optim_cfg, params) -> pytree of bool` (True = frozen, lr multiplier 0).
`wd_mask(optim_cfg, params) -> pytree of bool` (True = weight decay applied).
`lr_mult_tree(optim_cfg, params) -> pytree of float` (the per-param multiplier).
`describe(optim_cfg, params) -> str`: a small table (rule -> #tensors, #params) to log.
`param_paths(params) -> list of '/'-joined paths` in tree-flatten order.
`OPTIMIZERS`, `SCHEDULES`: the valid names.

`params` may hold arrays or abstract `jax.ShapeDtypeStruct` leaves; only paths,
shapes and dtypes are read here.

What one step computes, per parameter `p` with gradient `g`
----------------------------------------------------------
Let `mult` be the multiplier of the first `lr_mults` rule whose regex fullmatches
the path of `p`, `decayed` whether `wd_mask` fullmatches the path, and `lr(t)` the
schedule value at step t (t counts from 0; with warmup, step 0 has lr 0).

* frozen (`mult == 0.0`): update = 0, and `p` has NO optimizer state at all
  (`optax.partition` with `optax.set_to_zero`; the trainable branch is masked, so
  its state trees hold no arrays for frozen params).
* trainable:
    g'  = g * min(1, clip_norm / ||g_trainable||)   global-norm clipping over the
          TRAINABLE params only (frozen grads never enter the norm); off when
          `clip_norm` is None or 0.
    u   = base_optimizer(g')                        (see below)
    u  += wd * p            if decayed              (decoupled weight decay)
    update = -mult * lr(t) * u

So weight decay uses the optax.adamw / PyTorch AdamW / open_clip convention for
BOTH optimizers: it is multiplied by the scheduled lr (and by the rule's
multiplier). big_vision instead adds `wd_bv * p` after multiplying by the peak lr
(so it is scaled by the schedule shape but not by the base lr); a big_vision
config with `wd_bv` at peak lr `lr` corresponds to `wd = wd_bv / lr` here
(bv wd 1e-4 at lr 1e-3 == wd 0.1 here). For "adamw" with every param trainable
and mult 1, `tx` equals `optax.adamw(schedule_fn, b1, b2, eps, weight_decay=wd,
mask=wd_mask)` preceded by `optax.clip_by_global_norm`.

Base optimizers (`optim.name`)
------------------------------
"adamw": `optax.scale_by_adam(b1, b2, eps)` (defaults 0.9, 0.999, 1e-8).
"adafactor": big_vision's `big_vision.optax.scale_by_adafactor`, rebuilt from optax:
    optax.scale_by_factored_rms(factored=True, decay_rate=0.8,
        min_dim_size_to_factor=32, epsilon=1e-30,
        decay_rate_fn=lambda i, e: min(beta2_cap=0.999, 1 - (i + 1) ** -e))
    -> optax.clip_by_block_rms(clipping_threshold)  (only if clipping_threshold)
    -> optax.ema(momentum=0.9, debias=False, accumulator_dtype=bfloat16)
  i.e. second moments are factored into row/column statistics when the two
  largest dims are both >= factored_min_dim (else a full per-element v), the
  second-moment decay is 1 - (t+1)^-0.8 capped at beta2_cap, and the first moment
  is an un-debiased EMA (mu = 0.9 mu + 0.1 u) stored in bfloat16. No update
  clipping and no relative (parameter-scale) step size, as in big_vision.
  Knobs in `optim.adafactor`: decay_rate, beta2_cap, momentum (0/None = off),
  factored_min_dim, eps, and optionally clipping_threshold (None),
  momentum_dtype ("bfloat16"), decay_offset (0).

Schedules (`optim.schedule.name`, default "cosine"), all with linear warmup from
0 over `warmup_steps` (default 0; already resolved to steps by config.py) and an
optional linear `cooldown_steps` to 0 at the end (default 0), as big_vision:
"cosine":   lr_end + (lr - lr_end) * 0.5 * (1 + cos(pi * progress))
"linear":   lr_end + (lr - lr_end) * (1 - progress)
"rsqrt":    lr / sqrt((step - warmup_steps + timescale) / timescale)  (timescale
            default 10_000; continuous at the end of warmup)
"constant": lr
where lr_end = end_lr_fraction * lr (default 0.0) and
progress = clip((step - warmup_steps) / (total_steps - warmup_steps), 0, 1).
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_mm import tree_paths

DEFAULT_WD_MASK = r".*/kernel$"
DEFAULT_LR_MULTS = ((".*", 1.0),)
FROZEN, TRAINABLE = "frozen", "trainable"

_MISSING = object()


# ----------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------
def _get(cfg, key, default=None):
  """Reads `key` from a ConfigDict / dict / None, with a default for missing or None."""
  if cfg is None:
    return default
  if isinstance(cfg, Mapping):
    value = cfg.get(key, _MISSING)
  else:  # ml_collections.ConfigDict (not a Mapping subclass).
    value = cfg.get(key, _MISSING) if hasattr(cfg, "get") else getattr(cfg, key, _MISSING)
  if value is _MISSING or value is None:
    return default
  return value


def _flatten(params):
  leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
  paths = [tree_paths.path_str(path) for path, _ in leaves_with_path]
  leaves = [leaf for _, leaf in leaves_with_path]
  return paths, leaves, treedef


def param_paths(params):
  """'/'-joined key paths of the leaves of `params`, in tree-flatten order."""
  return _flatten(params)[0]


def _compile(regex, what):
  try:
    return re.compile(regex)
  except re.error as e:
    raise ValueError(f"optim.{what}: invalid regex {regex!r}: {e}") from e


def _lr_mult_rules(optim_cfg):
  rules = _get(optim_cfg, "lr_mults", DEFAULT_LR_MULTS)
  if isinstance(rules, Mapping) or hasattr(rules, "items"):
    rules = list(rules.items())
  out = []
  for rule in rules:
    try:
      regex, mult = rule
    except (TypeError, ValueError):
      raise ValueError(
          f"optim.lr_mults: each rule must be a (regex, multiplier) pair, got {rule!r}") from None
    mult = float(mult)
    if mult < 0 or not math.isfinite(mult):
      raise ValueError(f"optim.lr_mults: multiplier for {regex!r} must be >= 0, got {mult}")
    out.append((str(regex), _compile(regex, "lr_mults"), mult))
  if not out:
    raise ValueError("optim.lr_mults is empty: give at least one rule, e.g. (('.*', 1.0),)")
  return out


def _match_rules(optim_cfg, paths):
  """Index of the first matching lr_mults rule per path; ValueError if any uncovered."""
  rules = _lr_mult_rules(optim_cfg)
  idx, uncovered = [], []
  for path in paths:
    for i, (_, rx, _) in enumerate(rules):
      if rx.fullmatch(path):
        idx.append(i)
        break
    else:
      idx.append(None)
      uncovered.append(path)
  if uncovered:
    shown = "\n  ".join(uncovered[:10])
    more = f"\n  ... and {len(uncovered) - 10} more" if len(uncovered) > 10 else ""
    rule_list = ", ".join(f"({r!r}, {m})" for r, _, m in rules)
    raise ValueError(
        f"optim.lr_mults does not cover {len(uncovered)} of {len(paths)} params "
        f"(every param must fullmatch some rule; add a catch-all like ('.*', 1.0) "
        f"as the last rule):\n  {shown}{more}\nRules: ({rule_list})")
  return rules, idx


def lr_mult_tree(optim_cfg, params):
  """Pytree (like params) of float lr multipliers: first matching lr_mults rule."""
  paths, _, treedef = _flatten(params)
  rules, idx = _match_rules(optim_cfg, paths)
  return jax.tree_util.tree_unflatten(treedef, [rules[i][2] for i in idx])


def frozen_mask(optim_cfg, params):
  """Pytree (like params) of bools: True where the lr multiplier is 0.0 (frozen)."""
  return jax.tree.map(lambda m: m == 0.0, lr_mult_tree(optim_cfg, params))


def wd_mask(optim_cfg, params):
  """Pytree (like params) of bools: True where `optim.wd_mask` fullmatches the path."""
  rx = _compile(_get(optim_cfg, "wd_mask", DEFAULT_WD_MASK), "wd_mask")
  paths, _, treedef = _flatten(params)
  return jax.tree_util.tree_unflatten(treedef, [bool(rx.fullmatch(p)) for p in paths])


def _size(leaf):
  return int(np.prod(np.shape(leaf), dtype=np.int64))


def describe(optim_cfg, params):
  """Human-readable table: lr_mults rule -> multiplier, #tensors, #params (+ wd)."""
  paths, leaves, _ = _flatten(params)
  rules, idx = _match_rules(optim_cfg, paths)
  decayed = jax.tree.leaves(wd_mask(optim_cfg, params))
  counts = [[0, 0, 0] for _ in rules]  # tensors, params, decayed params
  for i, leaf, d in zip(idx, leaves, decayed):
    counts[i][0] += 1
    counts[i][1] += _size(leaf)
    counts[i][2] += _size(leaf) if d else 0
  width = max([len("rule")] + [len(r) for r, _, _ in rules])
  lines = [f"{'rule':<{width}}  {'mult':>6}  {'tensors':>7}  {'params':>13}  {'wd params':>13}"]
  for (regex, _, mult), (n_t, n_p, n_d) in zip(rules, counts):
    tag = " (frozen)" if mult == 0.0 else ""
    lines.append(f"{regex:<{width}}  {mult:>6g}  {n_t:>7d}  {n_p:>13,d}  {n_d:>13,d}{tag}")
  total = sum(c[1] for c in counts)
  frozen = sum(c[1] for (_, _, m), c in zip(rules, counts) if m == 0.0)
  lines.append(f"optimizer {_get(optim_cfg, 'name', 'adamw')}: {total:,d} params, "
               f"{total - frozen:,d} trainable, {frozen:,d} frozen")
  return "\n".join(lines)


# ----------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------
SCHEDULES = ("cosine", "linear", "rsqrt", "constant")


def make_schedule(schedule_cfg, lr, total_steps):
  """Returns `schedule_fn(step) -> float32 lr` (the full lr, warmup included)."""
  name = _get(schedule_cfg, "name", "cosine")
  if name not in SCHEDULES:
    raise ValueError(f"optim.schedule.name={name!r} is not one of {list(SCHEDULES)}")
  lr = float(lr)
  total_steps = int(total_steps)
  warmup = int(_get(schedule_cfg, "warmup_steps", 0))
  cooldown = int(_get(schedule_cfg, "cooldown_steps", 0))
  end_frac = float(_get(schedule_cfg, "end_lr_fraction", 0.0))
  timescale = float(_get(schedule_cfg, "timescale", 10_000))
  if warmup < 0 or cooldown < 0:
    raise ValueError(f"optim.schedule: warmup_steps={warmup} and cooldown_steps={cooldown} "
                     "must be >= 0")
  if total_steps > 0 and warmup > total_steps:
    raise ValueError(f"optim.schedule.warmup_steps={warmup} exceeds total_steps={total_steps}")
  if timescale <= 0:
    raise ValueError(f"optim.schedule.timescale={timescale} must be > 0")
  lr_end = end_frac * lr
  decay_steps = max(1, total_steps - warmup)

  def schedule_fn(step):
    step = jnp.asarray(step, jnp.float32)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if name == "cosine":
      value = lr_end + (lr - lr_end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif name == "linear":
      value = lr_end + (lr - lr_end) * (1.0 - progress)
    elif name == "rsqrt":
      shifted = jnp.maximum(step - warmup, 0.0) + timescale
      value = lr * jnp.sqrt(timescale / shifted)
    else:  # constant
      value = jnp.full_like(step, lr)
    if warmup:
      value = value * jnp.minimum(1.0, step / warmup)
    if cooldown:
      value = value * jnp.clip((total_steps - step) / cooldown, 0.0, 1.0)
    return value.astype(jnp.float32)

  return schedule_fn


# ----------------------------------------------------------------------------
# Optimizers
# ----------------------------------------------------------------------------
def _adamw(optim_cfg):
  return optax.scale_by_adam(
      b1=float(_get(optim_cfg, "b1", 0.9)),
      b2=float(_get(optim_cfg, "b2", 0.999)),
      eps=float(_get(optim_cfg, "eps", 1e-8)))


def scale_by_adafactor(*, factored_min_dim=32, decay_rate=0.8, decay_offset=0,
                       beta2_cap=0.999, clipping_threshold=None, momentum=0.9,
                       momentum_dtype=jnp.bfloat16, eps=1e-30):
  """big_vision's Adafactor variant (big_vision.optax.scale_by_adafactor), same defaults."""

  def decay_rate_fn(i, exponent):
    t = jnp.asarray(i, jnp.float32) + 1.0
    return jnp.minimum(beta2_cap, 1.0 - t ** (-exponent))

  rms = optax.scale_by_factored_rms(
      factored=True, decay_rate=decay_rate, step_offset=decay_offset,
      min_dim_size_to_factor=factored_min_dim, epsilon=eps, decay_rate_fn=decay_rate_fn)
  clip = (optax.clip_by_block_rms(clipping_threshold) if clipping_threshold
          else optax.identity())
  mom = (optax.ema(momentum, debias=False, accumulator_dtype=momentum_dtype)
         if momentum else optax.identity())
  return optax.chain(rms, clip, mom)


def _adafactor(optim_cfg):
  cfg = _get(optim_cfg, "adafactor", {})
  return scale_by_adafactor(
      factored_min_dim=int(_get(cfg, "factored_min_dim", 32)),
      decay_rate=float(_get(cfg, "decay_rate", 0.8)),
      decay_offset=int(_get(cfg, "decay_offset", 0)),
      beta2_cap=float(_get(cfg, "beta2_cap", 0.999)),
      clipping_threshold=_get(cfg, "clipping_threshold", None),
      momentum=_get(cfg, "momentum", 0.9),
      momentum_dtype=jnp.dtype(_get(cfg, "momentum_dtype", "bfloat16")),
      eps=float(_get(cfg, "eps", 1e-30)))


OPTIMIZERS = {"adamw": _adamw, "adafactor": _adafactor}


def _is_masked(x):
  return isinstance(x, optax.MaskedNode)


def _decay_and_scale(wd_tree, mult_tree, schedule_fn):
  """u -> -mult * lr(t) * (u + wd * p). Leaf-wise trees of python floats.

  Runs inside the trainable branch of `optax.partition`, where frozen leaves of
  updates/params are `optax.MaskedNode`s; the float trees are a prefix of those.
  """

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    lr = schedule_fn(state.count)
    needs_params = any(w for w in jax.tree.leaves(wd_tree))
    if needs_params and params is None:
      raise ValueError("weight decay needs params: call tx.update(grads, state, params)")

    def one(wd, mult, u, p):
      if _is_masked(u):
        return u
      if wd:
        u = u + wd * p.astype(u.dtype)
      return (-(mult * lr) * u).astype(u.dtype)

    if params is None:
      params = jax.tree.map(lambda _: None, wd_tree)
    new = jax.tree.map(one, wd_tree, mult_tree, updates, params)
    return new, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def clip_by_global_norm(max_norm):
  """optax.clip_by_global_norm, which also takes the updates' global norm as the extra argument
  `global_norm` (`tx.update(grads, state, params, global_norm=...)`: the norm of the trainable
  grads) where the caller has it already, and leaves the updates as they are given
  `clipped=True` (the caller clipped them already with this function). The trainer's step does
  both: its grad_norm is the norm, and it clips before skipping a non-finite update."""
  inner = optax.clip_by_global_norm(max_norm)

  def update_fn(updates, state, params=None, *, global_norm=None, clipped=False, **extra_args):
    del extra_args
    if clipped:
      return updates, state
    if global_norm is None:
      return inner.update(updates, state, params)
    trigger = global_norm < max_norm  # as optax's, with its norm given
    clip = lambda t: jax.lax.select(trigger, t, (t / global_norm.astype(t.dtype)) * max_norm)
    return jax.tree.map(clip, updates), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


def make_optimizer(optim_cfg, params, total_steps):
  """Builds `(tx, schedule_fn)` from the `optim` config; see the module docstring."""
  name = _get(optim_cfg, "name", "adamw")
  if name not in OPTIMIZERS:
    raise ValueError(f"optim.name={name!r} is not one of {sorted(OPTIMIZERS)}")
  lr = _get(optim_cfg, "lr", None)
  if lr is None:
    raise ValueError("optim.lr is required")
  schedule_fn = make_schedule(_get(optim_cfg, "schedule", {}), lr, total_steps)

  mults = lr_mult_tree(optim_cfg, params)
  wd = float(_get(optim_cfg, "wd", 0.0))
  wd_tree = jax.tree.map(lambda m: wd if m else 0.0, wd_mask(optim_cfg, params))
  labels = jax.tree.map(lambda m: FROZEN if m == 0.0 else TRAINABLE, mults)

  clip_norm = _get(optim_cfg, "clip_norm", None)
  trainable = optax.chain(
      clip_by_global_norm(float(clip_norm)) if clip_norm else optax.identity(),
      OPTIMIZERS[name](optim_cfg),
      _decay_and_scale(wd_tree, mults, schedule_fn),
  )
  partition = getattr(optax, "partition", None) or optax.multi_transform
  tx = partition({TRAINABLE: trainable, FROZEN: optax.set_to_zero()}, labels)
  return tx, schedule_fn
