r"""Where the trainer's step spends its time beyond the model: the bare step (value_and_grad of
the objective's loss, tx.update, optax.apply_updates), then the trainer's pieces added one at a
time, then the trainer's own step (`train.make_train_step`). Each variant's XLA cost analysis
(flops, bytes accessed, transcendentals), compiled memory (argument / output / temp bytes) and
median wall time, the variants timed round-robin (one step of each in turn) so that machine
load hits them alike. Synthetic batches as tools/benchmark.py.

  python tools/benchmark_step.py --config configs/demo.py [--steps 20] [--timing=false] \
      [--variants=bare,metrics,trainer] [--json=out.json] [--config.k=v ...]

Variants (each adds its piece to the one before it; percentages are against bare):
  bare         value_and_grad + tx.update + apply_updates (the state's rng folded with the
               step), with the config's optimizer built without gradient clipping
  clip         + the config's gradient clipping (optim.clip_norm; no row where it is off)
  grad_norm    + the grad_norm metric (optax.tree.norm(grads))
  guard_params + the non-finite guard on params (jnp.where(finite, new, old) per leaf)
  guard_opt    + the guard on the optimizer state
  nonfinite    + the nonfinite record (count, last_step, loss, grad_norm)
  param_norm   + the param_norm metric (of the new params)
  metrics      + lr, nonfinite_skipped and the loss's aux metrics: the trainer's step as it
               was written before it skipped by lax.cond (`step_fn` up to commit 551ad69)
  trainer      train.make_train_step as it is now
Every variant takes and returns the trainer's state (donated), so one state is threaded
through them all. The objective's extra state (init_extra_state) is not supported.
XLA counts a scanned layer stack once, so the model's share of the cost analysis is too small
with `scan`; unroll it (--config.model.towers.image.scan=False, same for text) for the shares.
"""
from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import benchmark  # noqa: E402
from big_mm import config as config_lib  # noqa: E402
from big_mm import objectives, optim, sharding, train  # noqa: E402

USAGE = __doc__
LADDER = ("bare", "clip", "grad_norm", "guard_params", "guard_opt", "nonfinite", "param_norm",
          "metrics")


def ladder_step(setup, ts, level: str):
  """The step with the pieces of LADDER up to `level` (the trainer's step as it was written
  before it skipped by lax.cond, at level "metrics")."""
  tx = ts.tx
  if level == "bare" and setup.optim_cfg.get("clip_norm"):
    cfg = setup.optim_cfg.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.clip_norm = None
    tx, _ = optim.make_optimizer(cfg, ts.abstract["params"], setup.total_steps)
  on = set(LADDER[:LADDER.index(level) + 1])
  objective = setup.objective
  grad_fn = getattr(objective, "value_and_grad", None) or jax.value_and_grad(
      objective.loss_fn, has_aux=True)
  takes_step = getattr(objective, "TAKES_STEP", False)

  def step_fn(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
    kwargs = {"step": state["step"]} if takes_step else {}
    (loss, aux), grads = grad_fn(state["params"], batch, rng, **kwargs)
    aux = dict(aux)
    aux.pop(objectives.base.EXTRA_STATS, None)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss}
    new_state = {**state, "step": state["step"] + 1}
    if "grad_norm" in on:
      metrics["grad_norm"] = grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
      keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    if "guard_params" in on:
      params = keep(params, state["params"])
    if "guard_opt" in on:
      opt = keep(opt, state["opt"])
    if "nonfinite" in on:
      bad = state["nonfinite"]
      new_state["nonfinite"] = {
          "count": bad["count"] + (~finite).astype(jnp.int32),
          "last_step": jnp.where(finite, bad["last_step"], state["step"] + 1),
          "loss": jnp.where(finite, bad["loss"], loss),
          "grad_norm": jnp.where(finite, bad["grad_norm"], grad_norm)}
    if "param_norm" in on:
      metrics["param_norm"] = optax.tree.norm(params)
    if "metrics" in on:
      metrics.update(lr=ts.schedule(state["step"]),
                     nonfinite_skipped=new_state["nonfinite"]["count"], **aux)
    new_state.update(params=params, opt=opt)
    return new_state, metrics

  return jax.jit(step_fn, in_shardings=(ts.shardings, sharding.batch_sharding(setup.mesh)),
                 out_shardings=(ts.shardings, sharding.replicated(setup.mesh)),
                 donate_argnums=(0,))


def variants(setup, ts, names=None) -> dict:
  """{name: jitted step} in LADDER order, then "trainer"; only `names` (and bare) where given,
  and no "clip" where the config does not clip."""
  out = {}
  for level in LADDER:
    if level == "clip" and not setup.optim_cfg.get("clip_norm"):
      continue
    if names is None or level in names or level == "bare":
      out[level] = ladder_step(setup, ts, level)
  if names is None or "trainer" in names:
    out["trainer"] = train.make_train_step(setup, ts)
  return out


def cost(compiled) -> dict:
  """XLA's cost analysis (summed over programs) and compiled memory of one step."""
  analysis = compiled.cost_analysis()
  entries = [analysis] if isinstance(analysis, dict) else list(analysis or [])
  row = {key: float(sum(e.get(name, 0.0) for e in entries)) for key, name in (
      ("flops", "flops"), ("bytes_accessed", "bytes accessed"),
      ("transcendentals", "transcendentals"))}
  memory = compiled.memory_analysis()
  for key in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes"):
    row[key.replace("_size_in", "")] = int(getattr(memory, key, 0)) if memory else 0
  return row


def prepare(config, image_size: int | None = None):
  """(setup, train state, synthetic batch, image size) for the config, as tools/benchmark.py
  (a long horizon: the schedule does not affect speed; synthetic tokens: no tokenizer)."""
  with config.unlocked():
    config.total_steps, config.total_epochs, config.total_examples = 10**6, None, None
    config.input.tokenizer = None
    if image_size:
      config.input.pp_image = f"decode|resize({image_size})|value_range(-1,1)"
  setup = train.build(config)
  ts = train.make_train_state(setup)
  if ts.init_extra is not None:
    raise ValueError("tools/benchmark_step.py does not support objectives with extra state")
  image_size = image_size or benchmark.image_size_from_pp(config.input.pp_image)
  batch = benchmark.synthetic_batch(config, image_size, setup.mesh)
  batch.update(benchmark.objective_inputs(setup, batch))
  return setup, ts, batch, image_size


def run(config, *, steps: int = 10, timing: bool = True, image_size: int | None = None,
        names=None) -> dict:
  """{"rows": [{variant, flops, bytes_accessed, ..., step_s, *_vs_bare_pct}], ...}."""
  setup, ts, batch, image_size = prepare(config, image_size)
  rows, compiled = [], {}
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    for name, step in variants(setup, ts, names).items():
      t0 = time.perf_counter()
      compiled[name] = step.lower(state, batch).compile()
      rows.append({"variant": name, "compile_s": round(time.perf_counter() - t0, 2),
                   **cost(compiled[name])})
    times = {name: [] for name in compiled}
    if timing:
      for name, fn in compiled.items():  # warm-up
        state, m = fn(state, batch)
      jax.block_until_ready(state)
      for _ in range(steps):
        for name, fn in compiled.items():
          t0 = time.perf_counter()
          state, m = fn(state, batch)
          jax.block_until_ready((state, m))
          times[name].append(time.perf_counter() - t0)
  for row in rows:
    t = times[row["variant"]]
    row["step_s"] = float(np.median(t)) if t else None
  bare = rows[[r["variant"] for r in rows].index("bare")]
  for row in rows:
    for key in ("flops", "bytes_accessed"):
      row[f"{key}_vs_bare_pct"] = 100 * (row[key] / bare[key] - 1) if bare[key] else None
    row["time_vs_bare_pct"] = (100 * (row["step_s"] / bare["step_s"] - 1)
                               if row["step_s"] and bare["step_s"] else None)
  device = jax.devices()[0]
  return {"backend": jax.default_backend(), "device_kind": device.device_kind,
          "num_devices": jax.device_count(), "jax": jax.__version__,
          "batch_size": config.batch_size, "image_size": image_size, "steps": steps,
          "num_params": int(sum(x.size for x in jax.tree.leaves(state["params"]))),
          "rows": rows}


def table(result: dict) -> str:
  """A markdown table of run()'s rows."""
  pct = lambda v: "-" if v is None else f"{v:+.2f}%"
  lines = ["| variant | GFLOPs | vs bare | GB accessed | vs bare | transcendentals | "
           "temp MB | step s (median) | vs bare |", "|---|---|---|---|---|---|---|---|---|"]
  for r in result["rows"]:
    step = "-" if r["step_s"] is None else f"{r['step_s']:.4f}"
    lines.append(
        f"| {r['variant']} | {r['flops'] / 1e9:.3f} | {pct(r['flops_vs_bare_pct'])} | "
        f"{r['bytes_accessed'] / 1e9:.3f} | {pct(r['bytes_accessed_vs_bare_pct'])} | "
        f"{r['transcendentals']:.3g} | {r['temp_bytes'] / 1e6:.1f} | {step} | "
        f"{pct(r['time_vs_bare_pct'])} |")
  return "\n".join(lines)


def main(argv: list[str]) -> int:
  flags, overrides = config_lib.parse_command_line(argv)
  if "config" not in flags or set(flags) - {"config", "steps", "timing", "json", "image_size",
                                           "variants"}:
    print(USAGE, file=sys.stderr)
    return 2
  config = config_lib.load(flags["config"], overrides)
  result = run(config, steps=int(flags.get("steps", 10)),
               timing=flags.get("timing", "true").lower() != "false",
               image_size=int(flags["image_size"]) if "image_size" in flags else None,
               names=flags["variants"].split(",") if "variants" in flags else None)
  print(table(result))
  if "json" in flags:
    with open(flags["json"], "w") as f:
      json.dump(result, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
