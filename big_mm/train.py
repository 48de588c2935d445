"""The trainer: one loop for every recipe (a config names the model and the objective).

Usage:
  python -m big_mm.train --config PATH.py[:ARG] --workdir DIR [--config.a.b=VALUE ...]
  python -m big_mm.train --list_configs[=DIR]

Example (the demo: a tiny SigLIP on the bundled digits, after `python data/build_demo.py`):
  python -m big_mm.train --config configs/demo.py:steps=300 --workdir /tmp/big_mm_demo \\
      --config.optim.lr=1e-3

Flags:
  --config         the recipe and its argument (see Configs below)
  --workdir        the run's directory (local or gs://...): checkpoints/, metrics.jsonl, tb/
                   and config.json (the resolved config). Running again resumes; a resumed
                   run's config may differ from the stored one only where the checkpoint's
                   shapes stay the same (the differences are listed).
  --list_configs   lists the recipes with the first line of their docstrings
  --debug          shows the traceback of a user error too
Multi-process: add --coordinator_address=HOST:PORT --num_processes=N --process_id=I, or
--distributed to let JAX detect the cluster (Cloud TPU pod slices, SLURM, ...); SLURM job
steps with several tasks are detected without it. --heartbeat_timeout_s=S (default 100)
bounds how long the others wait for a dead process.

The code reads top to bottom like a recipe: config -> mesh -> data -> model + objective ->
sharded train state (restored if the workdir has a checkpoint) -> jitted step -> loop with
metrics, evaluators and checkpoints.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import re
import signal
import sys
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from big_mm import checkpoint as checkpoint_lib
from big_mm import cli
from big_mm import config as config_lib
from big_mm import evaluators, metrics as metrics_lib, models, objectives, optim, sharding
from big_mm import tree_paths
from big_mm.models import moe
from big_mm.models import video as video_lib
from big_mm.input import pipeline, sources
from big_mm.input.tokenizer import Tokenizer

log = logging.getLogger("big_mm")
# Shown on the console progress line (everything goes to metrics.jsonl and TensorBoard).
PROGRESS_KEYS = ("loss", "lr", "t", "b", "grad_norm", "examples_per_sec", "step_time",
                 "data_wait_fraction")


@dataclasses.dataclass
class Setup:
  """Everything a run (or a benchmark / evaluation) builds from a config before compute."""
  config: Any
  mesh: jax.sharding.Mesh
  model: Any
  objective: Any
  tokenizer: Tokenizer | None
  num_train_examples: int | None
  total_steps: int
  optim_cfg: Any  # config.optim with the warmup duration resolved to steps


def build(config, *, num_train_examples: int | None = None, devices=None) -> Setup:
  """Config -> mesh, model, objective, tokenizer, durations. Fails fast on bad configs."""
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch_size(config.batch_size, mesh)
  try:
    model = models.get_model(config.model_name, **config.model.to_dict())
  except (TypeError, ValueError) as e:  # a bad model_name or model.* kwarg
    raise config_lib.ConfigError(f"model_name={config.model_name!r} / model: {e}") from e
  tokenizer = Tokenizer(config.input.tokenizer) if config.input.tokenizer else None
  total_steps = config_lib.resolve_steps(config, "total", batch_size=config.batch_size,
                                         num_examples=num_train_examples)
  objective = make_objective(config, model, mesh, tokenizer, total_steps)
  optim_cfg = config.optim.copy_and_resolve_references()
  with optim_cfg.unlocked():
    optim_cfg.schedule.warmup_steps = config_lib.resolve_steps(
        config.optim.schedule, "warmup", batch_size=config.batch_size,
        num_examples=num_train_examples, default=0)
    optim_cfg.schedule.warmup_epochs = optim_cfg.schedule.warmup_examples = None
  if optim_cfg.schedule.warmup_steps > total_steps:
    raise config_lib.ConfigError(
        f"The warmup ({optim_cfg.schedule.warmup_steps} steps) is longer than the run "
        f"({total_steps} steps): set --config.optim.schedule.warmup_steps="
        f"{max(total_steps // 10, 1)} (or any value up to {total_steps}), or lengthen total_*.")
  return Setup(config, mesh, model, objective, tokenizer, num_train_examples, total_steps,
               optim_cfg)


def make_objective(config, model, mesh, tokenizer: Tokenizer | None,
                   total_steps: int | None = None):
  """config.objective's class, given its settings and what it reads of the run (the context)."""
  modalities = config.input.modalities
  ctx = objectives.Context(
      mesh=mesh, batch_size=config.batch_size, text_len=config.input.text_len,
      image_size=objectives.base.image_size(config.input.pp_image),
      image_patches=objectives.base.naflex_patches(config.input.pp_image), tokenizer=tokenizer,
      modalities=None if modalities is None else tuple(modalities),
      prefix_column=config.input.prefix_column, prefix_len=config.input.prefix_len,
      box_text_len=config.input.get("box_text_len") or 0,
      shapes=objectives.base.modality_shapes(config.input),
      frozen=functools.partial(optim.frozen_mask, config.optim), total_steps=total_steps)
  settings = config.objective.to_dict()
  return objectives.get_objective(settings.pop("name"))(model, ctx, **settings)


def resolve_every(section, setup: Setup, default=None):
  return config_lib.resolve_steps(section, "every", batch_size=setup.config.batch_size,
                                  num_examples=setup.num_train_examples, default=default)


@dataclasses.dataclass
class TrainState:
  """How the train state is built, laid out and updated (the state itself is a plain dict
  {"params", "opt", "step", "rng", "nonfinite"}, plus "extra" for an objective with
  `init_extra_state`, so checkpoints are ordinary pytrees)."""
  init: Callable[[jax.Array], dict]
  abstract: dict
  shardings: dict
  tx: optax.GradientTransformation
  schedule: Callable
  init_extra: Callable[[Any], Any] | None = None  # the objective's init_extra_state, if any


def make_train_state(setup: Setup) -> TrainState:
  """The params come from `objective.init_params(rng)` (its example batch: no data is read).

  An objective with `init_extra_state(params) -> pytree` (an EMA or frozen teacher, statistics)
  gets it as state["extra"], checkpointed and restored with the rest: a leaf mirroring a param
  (same path suffix and shape, e.g. an EMA copy of the params) is sharded like it, any other
  leaf replicated."""
  config, mesh = setup.config, setup.mesh
  init_params = setup.objective.init_params
  init_extra = getattr(setup.objective, "init_extra_state", None)
  if not init_extra and hasattr(setup.objective, "update_extra_state"):
    raise TypeError(f"{type(setup.objective).__name__} has update_extra_state but no "
                    "init_extra_state: define init_extra_state(params) -> the initial extra "
                    "state.")
  with use_mesh(setup):
    abstract_boxed = jax.eval_shape(init_params, jax.random.key(0))
    param_shardings = sharding.logical_shardings(abstract_boxed, mesh, config.sharding_rules)
  abstract_params = sharding.unbox(abstract_boxed)
  tx, schedule = optim.make_optimizer(setup.optim_cfg, abstract_params, setup.total_steps)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = sharding.replicated(mesh)
  state_shardings = {
      "params": param_shardings,
      "opt": sharding.shardings_like(abstract_opt, mesh, abstract_params, param_shardings),
      "step": replicated,
      "rng": replicated,
      "nonfinite": {k: replicated for k in ("count", "last_step", "loss", "grad_norm")},
  }
  if init_extra:
    state_shardings["extra"] = sharding.shardings_like(
        jax.eval_shape(init_extra, abstract_params), mesh, abstract_params, param_shardings)

  def init(rng):
    params_rng, train_rng = jax.random.split(rng)
    params = sharding.unbox(init_params(params_rng))
    state = {"params": params, "opt": tx.init(params), "step": jnp.zeros((), jnp.int32),
             "rng": jax.random.key_data(train_rng),
             "nonfinite": {"count": jnp.zeros((), jnp.int32),
                           "last_step": jnp.zeros((), jnp.int32),
                           "loss": jnp.zeros((), jnp.float32),
                           "grad_norm": jnp.zeros((), jnp.float32)}}
    if init_extra:
      state["extra"] = init_extra(params)
    return state

  abstract = jax.eval_shape(init, jax.random.key(0))
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shardings)
  return TrainState(jax.jit(init, out_shardings=state_shardings), abstract, state_shardings,
                    tx, schedule, init_extra)


def make_train_step(setup: Setup, ts: TrainState):
  """jit(step) with the state's shardings in and out, the old state donated.

  The gradients come from `objective.value_and_grad(params, batch, rng) -> ((loss, metrics),
  grads)` where the objective has one (e.g. contrastive GradCache), else from
  `jax.value_and_grad` of `objective.loss_fn`. With extra state (see `make_train_state`) both
  also get `extra=state["extra"]` (no gradient flows into it), and after the update
  `objective.update_extra_state(extra, params, step) -> extra` (if it has one) gets the new
  params and the step's number (1 for the first), and the loss's
  metrics[objectives.base.EXTRA_STATS] (taken out of the logged metrics) where it has them.
  An objective with `TAKES_STEP = True` also
  gets `step=state["step"]` (the steps done before this one: 0 for the first), for losses
  switched on or off part-way through training."""
  objective = setup.objective
  grad_fn = getattr(objective, "value_and_grad", None) or jax.value_and_grad(
      objective.loss_fn, has_aux=True)
  has_extra = ts.init_extra is not None
  update_extra = getattr(objective, "update_extra_state", None)
  takes_step = getattr(objective, "TAKES_STEP", False)
  # The gradient clipping of ts.tx (optim.clip_by_global_norm) is done before the cond below,
  # by the norm it clips by (the trainable grads': grad_norm itself where no param is frozen):
  # no second pass for the norm, and the clipped grads enter the cond in the layout it takes
  # (raw grads are copied into it). Frozen grads get clipped too, then zeroed by tx.
  clip_norm = setup.optim_cfg.get("clip_norm")
  frozen = jax.tree.leaves(optim.frozen_mask(setup.optim_cfg, ts.abstract["params"]))

  def clip(grads, grad_norm):
    if not clip_norm:
      return grads, {}
    if any(frozen):
      grad_norm = optax.tree.norm([g for g, f in zip(jax.tree.leaves(grads), frozen) if not f])
    grads, _ = optim.clip_by_global_norm(float(clip_norm)).update(
        grads, optax.EmptyState(), global_norm=grad_norm)
    return grads, {"clipped": True}

  def step_fn(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    extra_kwargs = {"extra": state["extra"]} if has_extra else {}
    if takes_step:
      extra_kwargs["step"] = state["step"]
    (loss, aux), grads = grad_fn(state["params"], batch, rng, **extra_kwargs)
    aux = dict(aux)
    stats = aux.pop(objectives.base.EXTRA_STATS, None)  # for update_extra, not logged
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient never reaches the params: the update is skipped and
    # recorded; the host then applies config.nan_policy (skip: go on; stop: save and stop).
    # Skipped by lax.cond, not by jnp.where(finite, new, old) over params and opt: XLA made
    # that where one more pass over the optimizer state (tools/benchmark_step.py).
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    clipped, kwargs = clip(grads, grad_norm)

    def update(params, opt):
      updates, opt = ts.tx.update(clipped, opt, params, **kwargs)
      return optax.apply_updates(params, updates), opt

    params, opt = jax.lax.cond(finite, update, lambda params, opt: (params, opt),
                               state["params"], state["opt"])
    bad = state["nonfinite"]
    nonfinite = {"count": bad["count"] + (~finite).astype(jnp.int32),
                 "last_step": jnp.where(finite, bad["last_step"], state["step"] + 1),
                 "loss": jnp.where(finite, bad["loss"], loss),
                 "grad_norm": jnp.where(finite, bad["grad_norm"], grad_norm)}
    metrics = {"loss": loss, "lr": ts.schedule(state["step"]), "grad_norm": grad_norm,
               "param_norm": optax.tree.norm(params), "nonfinite_skipped": nonfinite["count"],
               **aux}
    new_state = {**state, "params": params, "opt": opt,
                 "step": state["step"] + 1, "nonfinite": nonfinite}
    if has_extra and update_extra:
      stats_arg = () if stats is None else (stats,)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
      new_state["extra"] = keep(update_extra(state["extra"], params, new_state["step"],
                                             *stats_arg), state["extra"])
    return new_state, metrics

  batch_sharding = sharding.batch_sharding(setup.mesh)
  return jax.jit(step_fn, in_shardings=(ts.shardings, batch_sharding),
                 out_shardings=(ts.shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,))


def use_mesh(setup: Setup):
  """Context for tracing: the mesh and logical-axis rules for activation constraints."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(setup.mesh))
  stack.enter_context(nn.logical_axis_rules(sharding.rules(setup.config.sharding_rules,
                                                          setup.mesh)))
  return stack


def read_params(*, workdir: str | None = None, path: str | None = None,
                step: int | None = None, scan: bool | None = None,
                key: str = "config.init") -> tuple[dict, int | None]:
  """(flat {'/'-path: array}, the step read or None) of a big_mm run's checkpoint (`workdir`:
  its `step`, default the newest) or of an exported / foreign model (`path`: what
  big_mm.export.load_params reads). scan: True / False gives the layer stack in the scan
  layout or unrolled (`encoderblock_{i}`); None keeps it as stored. `key` names the config
  section in errors (config.init, objective.distill_*)."""
  from big_mm import export  # torch-free, but only needed here
  if path:
    flat = export.load_params(path, scan=bool(scan))
    return flat, None
  ckpt = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"), keep=None,
                                     save_every_steps=1, async_save=False, read_only=True)
  step = step if step is not None else ckpt.latest_step()
  if step is None:
    ckpt.close()
    raise FileNotFoundError(f"{key} workdir {workdir!r} has no checkpoint.")
  flat = tree_paths.flat_dict(ckpt.restore_params(step))
  ckpt.close()
  if scan is not None:
    flat = export.stack_layers(flat) if scan else export.unstack_layers(flat)
  return flat, step


def load_init(config, ts: TrainState, state: dict) -> dict:
  """`config.init`: copies params whose path matches `init.include` from another run's checkpoint
  (`init.workdir`, e.g. LiT's pretrained image tower) or from an exported / foreign model
  (`init.path`, read by big_mm.export.load_params: a Hugging Face SiglipModel / CLIPModel or
  open_clip directory, a big_vision .npz, `file.npz:img` for one of its sub-trees, a ViT
  classifier .npz as the image tower); shapes must agree. A param under a top-level scope the
  source has nothing of (`txt/...` from `file.npz:img`, `b` from a CLIP checkpoint) keeps its
  init, said in the log; one missing from a scope the source has is an error.
  Sparse upcycling: a mixture-of-experts param missing from a dense source gets the dense MLP
  copied into every expert (big_mm/models/moe.py `upcycle`); the routers keep their init.
  `init.inflate` ("average" | "central"): the video tower's `vid/` params (a captioner's video
  encoder: `img/`) are inflated from the source's image tower `img/` (big_mm/models/video.py
  `inflate`)."""
  path = config.init.get("path")
  if not config.init.workdir and not path:
    return state
  if config.init.workdir and path:
    raise config_lib.ConfigError("Set config.init.workdir (a big_mm run) or config.init.path "
                                 "(an HF directory or .npz), not both.")
  scan = (any("encoderblock" in name.split("/") for name in tree_paths.flat_dict(state["params"]))
          if path else None)
  flat_loaded, step = read_params(workdir=config.init.workdir, path=path, step=config.init.step,
                                  scan=scan)
  source = path or config.init.workdir
  fresh = set()
  if config.init.get("inflate"):
    targets = {n: v.shape for n, v in tree_paths.flat_dict(state["params"]).items()}
    # A towers model's video tower is vid/; a captioner's / CoCa's video encoder is img/.
    dst = "vid" if any(n.startswith("vid/") for n in targets) else "img"
    try:
      flat_loaded, fresh = video_lib.inflate(flat_loaded, targets, config.init.inflate, dst=dst)
    except ValueError as e:
      raise config_lib.ConfigError(str(e)) from None
  pattern = re.compile(config.init.include)
  covered = {n.split("/")[0] for n in flat_loaded}
  copied, kept = [], []

  upcycled, routers = [], []

  def take(path, current, target_sharding):
    name = tree_paths.path_str(path)
    if not pattern.fullmatch(name):
      return current
    if name not in flat_loaded:
      experts = moe.upcycle(flat_loaded, name, current.shape)
      if experts is not None:  # sparse upcycling: a dense MLP copied into every expert
        upcycled.append(name)
        return jax.device_put(experts.astype(current.dtype), target_sharding)
      if name.split("/")[0] not in covered or moe.is_router(name) or name in fresh:
        (routers if moe.is_router(name) else kept).append(name)
        return current
      raise config_lib.ConfigError(f"init: param {name!r} matches init.include="
                                   f"{config.init.include!r} but is not in {source!r} (which "
                                   f"has {sorted(covered)}).")
    value = flat_loaded[name]
    if tuple(value.shape) != tuple(current.shape):
      raise config_lib.ConfigError(f"init: param {name!r} has shape {tuple(value.shape)} in "
                                   f"{source!r} but {tuple(current.shape)} in this model.")
    copied.append(name)
    return jax.device_put(np.asarray(value, current.dtype), target_sharding)

  params = jax.tree_util.tree_map_with_path(take, state["params"], ts.shardings["params"])
  if not copied and not upcycled:
    raise config_lib.ConfigError(f"init.include={config.init.include!r} matched no parameter.")
  if upcycled:
    log.info("init: upcycled %d expert params from dense MLPs of %s; %d routers keep their "
             "init.", len(upcycled), source, len(routers))
  log.info("Initialised %d params from %s%s", len(copied), source,
           "" if step is None else f" step {step}")
  if kept:
    scopes = sorted({n.split("/")[0] for n in kept})
    log.info("init: %s not in %s: %d params keep their init.", ", ".join(scopes), source,
             len(kept))
  unused = sorted(set(flat_loaded) - set(copied) - {moe.dense_source(n) for n in upcycled})
  if unused:
    log.info("init: %d params of %s not loaded (not in this model or not in init.include), "
             "e.g. %s", len(unused), source, unused[:5])
  # The optimizer state (and an objective's extra state) was built for the random init;
  # rebuild it for the loaded params.
  loaded = {**state, "params": params,
            "opt": jax.jit(ts.tx.init, out_shardings=ts.shardings["opt"])(params)}
  if ts.init_extra:
    loaded["extra"] = jax.jit(ts.init_extra, out_shardings=ts.shardings["extra"])(params)
  return loaded


class _StopRequest:
  """SIGTERM / SIGINT: finish the current step, checkpoint, exit cleanly."""

  def __init__(self):
    self.requested = False
    self._previous = {}
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not in the main thread (e.g. under some test runners)
        pass

  def _handle(self, signum, frame):
    del frame
    log.warning("Received signal %d: saving a checkpoint at the next step boundary.", signum)
    self.requested = True

  def restore(self):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)


def train(config, workdir: str, *, devices=None) -> dict[str, float]:
  """Runs (or resumes) training in `workdir` on `devices` (default: all).

  Logs the config's keys that differ from the schema's defaults and stores the whole config in
  WORKDIR/config.json. A resume whose config changes the checkpoint's shapes is refused with
  the keys that differ from the stored config named; other differences are logged as a
  warning. Returns the last logged and eval metrics ({} if the run had already finished).
  """
  num_train = sources.num_examples(config.input.data, config.input.split, config.input.data_dir,
                                   **sources.source_options(config.input))
  setup = build(config, num_train_examples=num_train, devices=devices)
  is_main = jax.process_index() == 0
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), keep=config.checkpoint.keep,
      save_every_steps=resolve_every(config.checkpoint, setup, default=setup.total_steps),
      async_save=config.checkpoint.async_save)
  data = pipeline.make_train_iterator(config.input, global_batch_size=config.batch_size,
                                      seed=config.seed,
                                      sharding=sharding.batch_sharding(setup.mesh))
  ts = make_train_state(setup)
  with use_mesh(setup):
    start, state = restore_or_init(config, ts, ckpt, data, workdir)
    if start >= setup.total_steps:
      ckpt.close()
      if is_main:
        log.info("Nothing to do: the run in %s already finished at step %d of %d; checkpoints "
                 "in %s, metrics in %s and tb/ (evaluate: python -m big_mm.evaluate --workdir "
                 "%s; train on: a larger --config.total_steps).", workdir, start,
                 setup.total_steps, ckpt.directory,
                 os.path.join(workdir, metrics_lib.METRICS_FILENAME), workdir)
      return {}
    if is_main:
      log.info("Config (the keys that differ from the defaults; all of it: %s):\n%s",
               cli.write_config(config, workdir), "\n".join(
                   f"  {key} = {value!r}" for key, _, value in changes_from_defaults(config)))
    loop = _TrainLoop(setup, ts, ckpt, data, workdir, start, state)
    try:
      return loop.run(state)
    finally:
      loop.close()


def changes_from_defaults(config) -> list[tuple[str, Any, Any]]:
  """config_lib.diff against the schema's defaults, each evaluator's and the objective's."""
  baseline = config_lib.defaults()
  baseline.objective = config_lib.ConfigDict(
      objectives.settings({"name": config.objective.name}))
  for name, ev in config.evals.items():
    baseline.evals[name] = config_lib.ConfigDict(evaluators.with_defaults({"type": ev.type}))
  return [c for c in config_lib.diff(baseline, config) if c[2] is not config_lib.ABSENT]


def restore_or_init(config, ts: TrainState, ckpt, data, workdir: str) -> tuple[int, dict]:
  """(start step, state): the newest checkpoint that verifies (a corrupt or unfinished one is
  skipped, loudly) with the data iterator's position, else a fresh state (with `config.init`).
  Compares the config with the one the run stored (WORKDIR/config.json)."""
  stored = cli.read_config(workdir)
  changes = config_lib.diff(stored, config) if stored is not None else []
  try:
    restored = ckpt.restore_latest_good(ts.abstract)
  except checkpoint_lib.CheckpointMismatchError as e:
    differs = (f"\nThe config differs from the run's stored {cli.CONFIG_FILENAME} in:\n"
               f"{config_lib.format_diff(changes)}" if changes else "")
    raise checkpoint_lib.CheckpointMismatchError(
        f"{e}{differs}\nThe workdir {workdir!r} holds a run of a different model or optimizer. "
        "Use a new --workdir, or to start a new run from this one's matching params set "
        f"--config.init.workdir={workdir} (and init.include to pick them).") from None
  if restored is None:
    return 0, load_init(config, ts, ts.init(jax.random.key(config.seed)))
  start, state, data_state = restored
  data.set_state(data_state)
  log.info("Resumed from %s at step %d", ckpt.directory, start)
  if changes and jax.process_index() == 0:
    log.warning("Resuming with a config that differs from the run's stored %s in:\n%s",
                cli.CONFIG_FILENAME, config_lib.format_diff(changes))
  return start, state


class _TrainLoop:
  """The steps from `start` to the end: metrics, the nan policy, checkpoints and evaluators."""

  def __init__(self, setup: Setup, ts: TrainState, ckpt, data, workdir: str, start: int,
               state: dict):
    config = self.config = setup.config
    self.setup, self.ckpt, self.data, self.workdir, self.start = setup, ckpt, data, workdir, start
    self.is_main = jax.process_index() == 0
    # Rows of the steps after `start` come from a run that stopped before checkpointing them.
    self.writer = metrics_lib.MetricWriter(workdir, enabled=self.is_main, resume_step=start)
    if self.is_main:
      log.info("Training %d steps of batch %d on mesh %s; workdir %s", setup.total_steps,
               config.batch_size, dict(setup.mesh.shape), workdir)
      log.info("Parameters:\n%s", optim.describe(config.optim, state["params"]))
    self.train_step = make_train_step(setup, ts)
    self.eval_every = {name: resolve_every(ev, setup) for name, ev in config.evals.items()}
    # Built once per run (their jitted functions and cached data live on them); every_steps=0:
    # never run, never built.
    context = evaluators.EvalContext(config, setup.mesh, setup.objective, setup.tokenizer)
    self.evaluators = {name: evaluators.build(name, config.evals[name], context)
                       for name, every in self.eval_every.items() if every != 0}
    self.progress = metrics_lib.Progress(setup.total_steps, start_step=start,
                                         log=log.info if self.is_main else (lambda line: None))
    self.throughput = metrics_lib.Throughput()
    self.stop = _StopRequest()
    self.skipped_reported = int(jax.device_get(state["nonfinite"]["count"]))

  def run(self, state: dict) -> dict[str, float]:
    config, ckpt, total_steps = self.config, self.ckpt, self.setup.total_steps
    last: dict[str, float] = {}
    for step in range(self.start + 1, total_steps + 1):
      with self.throughput.data_wait():
        batch = next(self.data)
      state, step_metrics = self.train_step(state, batch)
      done = step == total_steps
      # nan_policy="stop" looks at every step (one scalar fetched from the device), so it
      # stops and saves at the first non-finite step, whose update was skipped.
      if (step % config.log_every_steps == 0 or done or step == self.start + 1
          or config.nan_policy == "stop"
          and int(step_metrics["nonfinite_skipped"]) > self.skipped_reported):
        last.update(self.log_step(step, state, step_metrics))
      if done or self.stop.requested or ckpt.should_save(step):  # iterator state only when saving
        ckpt.save(step, state, self.data.get_state(), force=True)
      # After the save, so a failing evaluator never costs training. every_steps=0: never.
      due = [n for n, every in self.eval_every.items()
             if n in self.evaluators and ((every and step % every == 0) or done)]
      last.update(self.run_evals(step, state["params"], due))
      if self.stop.requested or ckpt.reached_preemption(step):
        log.warning("Stopped at step %d after saving; run again to resume.", step)
        break
      if done and self.is_main:
        log.info("Finished: step %d of %d; checkpoints in %s, metrics in %s and tb/.%s", step,
                 total_steps, ckpt.directory,
                 os.path.join(self.workdir, metrics_lib.METRICS_FILENAME), "".join(
                     f" {k}={v:.4f}" for k, v in sorted(last.items()) if k.startswith("eval/")))
    return last

  def log_step(self, step: int, state: dict, step_metrics: dict) -> dict[str, float]:
    """Writes the step's metrics (and the input's statistics), applies the nan policy and
    updates the progress line; returns what it wrote."""
    host = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    host.update(self.throughput.step_done(step, self.config.batch_size))
    host.update({f"data/{k}": float(v) for k, v in self.data.stats().items()})
    self.writer.write(step, host)
    if host["nonfinite_skipped"] > self.skipped_reported:
      self.report_nonfinite(step, state, int(host["nonfinite_skipped"]))
    self.progress.update(step, {k: host[k] for k in PROGRESS_KEYS if k in host})
    return host

  def report_nonfinite(self, step: int, state: dict, skipped: int) -> None:
    """New skipped updates: nan_policy="skip" warns; "stop" saves the state and raises."""
    self.skipped_reported = skipped
    bad = {k: float(v) for k, v in jax.device_get(state["nonfinite"]).items()}
    message = (f"{skipped} update(s) skipped for a non-finite loss or gradient; the last at "
               f"step {int(bad['last_step'])} (loss={bad['loss']}, "
               f"grad_norm={bad['grad_norm']}).")
    if self.config.nan_policy == "stop":
      self.ckpt.save(step, state, self.data.get_state(), force=True)
      self.ckpt.wait()
      raise FloatingPointError(
          f"{message} nan_policy='stop': the last good state is saved in "
          f"{self.ckpt.directory} at step {step}. Lower optim.lr, check the data, or set "
          "nan_policy='skip'.")
    log.warning("%s Continuing (nan_policy='skip').", message)

  def run_evals(self, step: int, params, names: list[str]) -> dict[str, float]:
    results = {}
    for name in names:
      results.update(self.evaluators[name](params))
    if results:
      self.writer.write(step, results)
      if self.is_main:
        log.info("step %d evals: %s", step,
                 ", ".join(f"{k}={v:.4f}" for k, v in sorted(results.items())))
    return results

  def close(self) -> None:
    self.stop.restore()
    self.ckpt.close()
    self.writer.close()


FLAGS = ("config", "workdir", "coordinator_address", "num_processes", "process_id",
         "heartbeat_timeout_s", "distributed")


def main(argv: list[str]) -> int:
  return cli.main(_run_command_line, argv, doc=__doc__, flags=FLAGS,
                  required=("config", "workdir"))


def _run_command_line(flags: dict[str, str], overrides: dict[str, Any]) -> int:
  config = config_lib.load(flags["config"], overrides)  # config errors before anything else
  sharding.maybe_initialize_distributed(
      flags.get("coordinator_address"), cli.int_flag(flags, "num_processes"),
      cli.int_flag(flags, "process_id"),
      force=flags.get("distributed", "false").lower() in ("1", "true", "yes"),
      heartbeat_timeout_s=cli.int_flag(flags, "heartbeat_timeout_s") or 100)
  train(config, flags["workdir"])
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
