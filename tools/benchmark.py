r"""Benchmarks a config's train step on synthetic batches: compile time, step time, examples/s,
FLOPs (from XLA's cost analysis of the compiled step), MFU and compiled memory. JSON output.

  python tools/benchmark.py --config configs/demo.py [--steps 20] [--config.batch_size=256] \
      [--image_size 224] [--out result.json] [--uint8] [--profile DIR [--profile_steps 3]] \
      [--xla_dump DIR]

Runs on any backend (CPU, GPU, TPU); MFU is reported where the device's peak is known.
Two FLOP counts are reported:
- `model_flops_per_step`: XLA's count for the whole (global) step of the same model built
  without `scan` and without remat, so it counts every layer once and no recomputation
  (XLA counts a while-loop body once, so a scanned model would be undercounted). MFU uses it.
- `compiled_flops_per_step_per_device`: XLA's count for the compiled, partitioned step as it
  runs (with remat recomputation; a scanned layer stack counted once).
Both include whatever the step runs besides the model, e.g. a SigLIP 2 teacher's forward pass
(objective.distill_*: it runs unrolled, so every teacher layer is counted; tests/test_distill.py).
Also reported: `num_active_params` (the params one token uses: all but the mixture-of-experts
expert params, plus top_k / num_experts of those; `active_params`), each tower's
`<scope>/moe_dropped` of the last step, and the collectives in the compiled step's HLO.
Inputs the objective reads beyond image and text (video clips, audio, points: its
example_batch) are synthetic too, e.g. VideoMAE V2 with and without decoder masking:

  python tools/benchmark.py --config configs/videomae_v2_b16.py --config.batch_size=2 \
      --config.model.encoder.scan=False --config.optim.schedule.warmup_examples=0 \
      --config.objective.decoder_mask_ratio=0

Also reported: `batch_bytes` (what one batch moves host -> device) and `device_put_s_median`
(the time to put the host batch on the device, median of 5).
--uint8: synthetic images are uint8 [0, 255] (as pp op keep_uint8 ships them), so the step
includes the towers' on-device scaling to pixel_range; without it, float32 in [-1, 1].
--profile DIR: after the timed steps, a jax.profiler trace of --profile_steps (3) more steps in
DIR (TensorBoard / xprof files and a Perfetto trace, perfetto_trace.json.gz: open it at
ui.perfetto.dev); `profile` in the JSON (and printed) sums the trace's op events by name:
the top ops / fusions by self time per step (an enclosing while / cond op without its body's),
the time per trace line (thread), and `busy_fraction`: op time per profiled step over its
wall time (`profiled_step_s`; tracing slows steps); below 1: the device waits (host, launch
gaps); over 1: ops overlap (CPU thread pool, GPU streams). GPU/TPU: ops from the
device's "XLA Ops" line (else its streams); CPU: the XLA runtime threads' events (thunks named
by their HLO op, e.g. fusion.3, or by the fused library call, e.g. ynn_fusion / onednn),
without the runtime's bookkeeping events.
--xla_dump DIR: XLA_FLAGS gets --xla_dump_to=DIR --xla_dump_hlo_as_text and
--xla_dump_hlo_module_re=step_fn (the train step only), set before jax starts its backend; the
optimized HLO of the timed step is DIR/module_*.jit_step_fn.*after_optimizations.txt.

Mixture-of-experts mode: `--moe_mesh=1,2,4,8` runs the config (some tower with a `moe` dict)
with mesh expert=e, data=the rest, for each e, after the same config with every `moe` removed
(dense, expert=1), and prints a table (`moe_comparison`); flops_per_token is
`model_flops_per_step` / (batch * tokens per example: image patches + text_len).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python tools/benchmark.py \
      --config configs/demo.py --moe_mesh=1,2,4,8 \
      --config.model.towers.image.moe="{'layers': 'every_2', 'num_experts': 8}"
"""
from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from big_mm import config as config_lib  # noqa: E402
from big_mm import metrics, modalities, sharding, train, tree_paths  # noqa: E402
from big_mm.models import moe as moe_lib  # noqa: E402
from big_mm.models.towers import Towers  # noqa: E402

USAGE = __doc__


def image_size_from_pp(pp: str) -> int:
  """The output size of the last resize/crop op in a pp string (the model's input size)."""
  sizes = re.findall(r"(?:resize|random_crop|central_crop|inception_crop)\((\d+)", pp)
  if not sizes:
    raise ValueError(f"Cannot tell the image size from pp_image={pp!r}; pass --image_size.")
  return int(sizes[-1])


def tower_configs(model_cfg) -> dict:
  """{modality: that tower's kwargs}: a towers model's model.towers, else (captioner, CoCa)
  model.image / model.text where present."""
  if "towers" in model_cfg:
    return dict(model_cfg.towers)
  return {m: model_cfg[m] for m in ("image", "text") if m in model_cfg}


def host_batch(config, image_size: int, uint8: bool = False) -> dict[str, np.ndarray]:
  """Synthetic image / text batch on the host: images float32 in [-1, 1], or (uint8) uint8
  [0, 255] as the pp op keep_uint8 ships them."""
  rng = np.random.default_rng(0)
  b, L = config.batch_size, config.input.text_len
  vocab = (tower_configs(config.model).get("text") or {}).get("vocab_size", 32_000)
  text = rng.integers(3, vocab, size=(b, L), dtype=np.int32)
  text[:, -3:] = 0  # padding at the end, as real captions have
  shape = (b, image_size, image_size, 3)
  image = (rng.integers(0, 256, size=shape, dtype=np.uint8) if uint8 else
           rng.uniform(-1, 1, size=shape).astype(np.float32))
  return {"image": image, "text": text}


def synthetic_batch(config, image_size: int, mesh, uint8: bool = False) -> dict[str, jax.Array]:
  return {k: jax.device_put(v, sharding.batch_sharding(mesh))
          for k, v in host_batch(config, image_size, uint8).items()}


def device_put_seconds(batch: dict[str, np.ndarray], mesh, repeats: int = 5) -> float:
  """Median time to put a host batch on the mesh's devices (until it is there)."""
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready({k: jax.device_put(v, sharding.batch_sharding(mesh))
                           for k, v in batch.items()})
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


# Events of the CPU runtime's threads that are bookkeeping, not an op's work.
_CPU_RUNTIME = re.compile(r"::|^end: |^\$|^ThreadpoolListener|^Handle |^Wait |^ParseArguments")


def trace_file(trace_dir: str) -> str:
  """The newest Perfetto / Chrome trace (perfetto_trace.json.gz, *.trace.json.gz) under
  trace_dir (jax.profiler writes DIR/plugins/profile/<run>/)."""
  files = (glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
           or glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))
  if not files:
    raise FileNotFoundError(f"No perfetto_trace.json.gz / *.trace.json.gz under {trace_dir}.")
  return max(files, key=os.path.getmtime)


def self_times(events: list[dict]) -> list[float]:
  """Each event's duration less that of the events nested in it on its line (a while / cond
  thunk encloses its body's ops: summing both would count that time twice)."""
  out = [float(e["dur"]) for e in events]
  by_line = collections.defaultdict(list)
  for i, e in enumerate(events):
    by_line[(e["pid"], e.get("tid"))].append(i)
  for idx in by_line.values():
    stack = []  # enclosing events: (end, index)
    for i in sorted(idx, key=lambda i: (events[i]["ts"], -events[i]["dur"])):
      start = events[i]["ts"]
      while stack and stack[-1][0] <= start:
        stack.pop()
      if stack:
        out[stack[-1][1]] -= events[i]["dur"]
      stack.append((start + events[i]["dur"], i))
  return out


def trace_summary(path: str, steps: int, step_s: float | None = None, top: int = 15) -> dict:
  """Sums a trace's complete ("X") op events' self times (self_times) by name (microseconds
  -> ms per step).

  Op events: on a device process ("/device:GPU:0", "/device:TPU:0") its "XLA Ops" line, else
  all its lines but "XLA Modules" / "Steps"; without one (CPU) the XLA runtime threads
  (tf_XLA*) minus bookkeeping (_CPU_RUNTIME). The HLO op (args "hlo_op") names an event where
  the trace gives it. Returns {"source", "steps", "op_ms_per_step", "busy_fraction" (op time
  over step_s), "top_ops" [{name, ms_per_step, count_per_step, fraction}], "by_kind" (names
  without the ".N" suffix: fusion, convolution, ...), "lines" (ms per step per thread)}."""
  with gzip.open(path, "rt") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  procs, threads = {}, {}
  for e in events:
    if e.get("ph") == "M" and e.get("name") == "process_name":
      procs[e["pid"]] = e["args"]["name"]
    elif e.get("ph") == "M" and e.get("name") == "thread_name":
      threads[(e["pid"], e.get("tid"))] = e["args"]["name"]
  complete = [e for e in events if e.get("ph") == "X" and e.get("dur") is not None]
  thread = lambda e: threads.get((e["pid"], e.get("tid")), "")
  device = {p for p, n in procs.items() if n.startswith("/device:")}
  if device:
    ops_lines = {k for k, n in threads.items() if k[0] in device and n == "XLA Ops"}
    keep = ((lambda e: (e["pid"], e.get("tid")) in ops_lines) if ops_lines else
            (lambda e: e["pid"] in device and thread(e) not in ("XLA Modules", "Steps")))
    source = "device XLA Ops line" if ops_lines else "device streams"
  else:
    keep = lambda e: thread(e).startswith("tf_XLA") and not _CPU_RUNTIME.search(e["name"])
    source = "host XLA runtime threads"
  ops = [e for e in complete if keep(e)]
  total, count, kind, lines = (collections.Counter() for _ in range(4))
  for e, us in zip(ops, self_times(ops)):
    name = (e.get("args") or {}).get("hlo_op") or e["name"]
    total[name] += us
    count[name] += 1
    kind[re.sub(r"\.\d+$", "", name)] += us
  for e in complete:
    lines[f"{procs.get(e['pid'], e['pid'])} / {thread(e) or e.get('tid')}"] += e["dur"]
  op_us = sum(total.values())
  per_step = lambda us: us / 1e3 / steps
  return {
      "trace": path, "source": source, "steps": steps, "num_op_events": len(ops),
      "op_ms_per_step": per_step(op_us),
      "busy_fraction": per_step(op_us) / (step_s * 1e3) if step_s else None,
      "top_ops": [{"name": n, "ms_per_step": per_step(us), "count_per_step": count[n] / steps,
                   "fraction": us / op_us} for n, us in total.most_common(top)],
      "by_kind": {n: per_step(us) for n, us in kind.most_common(top)},
      "lines": {n: per_step(us) for n, us in lines.most_common(top)},
  }


def summary_table(summary: dict) -> str:
  """The top ops of trace_summary as text (printed to stderr)."""
  rows = [f"profile ({summary['source']}, {summary['steps']} steps): "
          f"{summary['op_ms_per_step']:.2f} ms of ops per step"
          + (f", busy {summary['busy_fraction']:.0%} of the step" if summary["busy_fraction"]
             else "")]
  rows += [f"  {o['ms_per_step']:9.3f} ms {o['fraction']:6.1%}  x{o['count_per_step']:g}  "
           f"{o['name']}" for o in summary["top_ops"]]
  return "\n".join(rows)


def objective_inputs(setup, batch: dict) -> dict[str, jax.Array]:
  """The objective's example-batch inputs that `batch` lacks (pp-shaped modalities: video
  clips, audio, points), uniform in [-1, 1] (integer keys: ones), at the global batch size."""
  rng = np.random.default_rng(1)
  out = {}
  for key, spec in setup.objective.example_batch().items():
    if key not in batch:
      shape = (setup.config.batch_size,) + tuple(spec.shape[1:])
      x = (rng.uniform(-1, 1, shape) if np.issubdtype(spec.dtype, np.floating)
           else np.ones(shape)).astype(spec.dtype)
      out[key] = jax.device_put(x, sharding.batch_sharding(setup.mesh))
  return out


def active_params(params, config) -> int:
  """Params one token uses: every param but the experts' (`.../MoeMlp_k/Dense_*`, leading axis
  E), plus the share of those a token goes through: top_k / E (token choice), capacity_factor /
  E on average (expert choice)."""
  scopes = {modalities.get(m).scope: t.get("moe") for m, t in tower_configs(config.model).items()}
  total = 0.0
  for name, x in tree_paths.flat_dict(params).items():
    size = int(np.prod(x.shape))
    if re.search(r"/MoeMlp_\d+/Dense_", name):
      s = moe_lib.MoeSettings(**dict(scopes[name.split("/")[0]]))
      size *= (s.top_k if s.routing == "token_choice" else s.capacity_factor) / x.shape[0]
    total += size
  return int(round(total))


def collectives(hlo: str) -> dict[str, int]:
  """How many of each collective op the compiled HLO text holds (async -start ops counted)."""
  ops = re.findall(r"\s(all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)"
                   r"(?:-start)?\(", hlo)
  return {op: ops.count(op) for op in sorted(set(ops))}


def model_flops(config, abstract_batch: dict[str, jax.ShapeDtypeStruct]) -> float | None:
  """FLOPs of one global train step of the config's model, unrolled and without remat."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for tower in tower_configs(config.model).values():
      tower["scan"] = False
      tower["remat_policy"] = "none"
  setup = train.build(config)
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    lowered = train.make_train_step(setup, ts).lower(ts.abstract, abstract_batch)
  return metrics.compiled_flops(lowered)


def run(config, *, steps: int, image_size: int | None, uint8: bool = False,
        profile: str | None = None, profile_steps: int = 3) -> dict:
  with config.unlocked():
    # Timing only: a long horizon so any warmup fits; the lr schedule does not affect speed.
    config.total_steps, config.total_epochs, config.total_examples = 10**6, None, None
    config.input.tokenizer = None  # synthetic tokens: no tokenizer file needed
    if image_size:  # the model is built for pp_image's size
      config.input.pp_image = f"decode|resize({image_size})|value_range(-1,1)"
  setup = train.build(config)
  image_size = image_size or image_size_from_pp(config.input.pp_image)
  batch = synthetic_batch(config, image_size, setup.mesh, uint8)
  batch.update(objective_inputs(setup, batch))
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    step = train.make_train_step(setup, ts)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  flops = metrics.compiled_flops(compiled)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in batch.items()}
  total_flops = model_flops(config, abstract_batch)
  memory = compiled.memory_analysis()
  for _ in range(2):  # warm-up
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  summary = None
  if profile:
    with jax.profiler.trace(profile, create_perfetto_trace=True):
      t0 = time.perf_counter()
      for _ in range(profile_steps):
        state, m = compiled(state, batch)
      jax.block_until_ready(m)
      profiled_s = (time.perf_counter() - t0) / profile_steps
    summary = trace_summary(trace_file(profile), profile_steps, profiled_s)
    summary["profiled_step_s"] = profiled_s
    print(summary_table(summary), file=sys.stderr)
  device = jax.devices()[0]
  peak = metrics.device_peak_flops(device)
  result = {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "num_devices": jax.device_count(),
      "mesh": dict(setup.mesh.shape),
      "jax": jax.__version__,
      "batch_size": config.batch_size,
      "image_size": image_size,
      "text_len": config.input.text_len,
      "image_dtype": str(batch["image"].dtype),
      "batch_bytes": int(sum(v.nbytes for v in batch.values())),
      "device_put_s_median": device_put_seconds(jax.device_get(batch), setup.mesh),
      "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
      "num_active_params": active_params(state["params"], config),
      "compile_s": round(compile_s, 3),
      "step_s_median": step_s,
      "step_s_min": float(np.min(times)),
      "examples_per_s": config.batch_size / step_s,
      "model_flops_per_step": total_flops,
      "compiled_flops_per_step_per_device": flops,
      "mfu": (metrics.mfu(total_flops / jax.device_count(), step_s, peak)
              if total_flops and peak else None),
      "loss_finite": bool(np.isfinite(float(m["loss"]))),
      **{k: float(v) for k, v in m.items() if k.endswith("/moe_dropped")},
      "collectives": collectives(compiled.as_text()),
  }
  if summary is not None:
    result["profile"] = summary
  if memory is not None:
    result["memory_bytes"] = {k: int(getattr(memory, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
        "generated_code_size_in_bytes") if hasattr(memory, k)}
  return result


def moe_comparison(config, expert_sizes, *, steps: int, image_size: int | None) -> list[dict]:
  """[dense row, MoE row per mesh expert size]: the config without any `moe` (expert=1), then
  as given at mesh expert=e, data=the rest of the devices; each row run()'s result plus
  `model` and `flops_per_token`."""
  moe_towers = [m for m, t in tower_configs(config.model).items() if t.get("moe")]
  if not moe_towers:
    raise ValueError("--moe_mesh compares MoE towers with dense ones, but no tower of the config "
                     "has a moe dict; add one, e.g. --config.model.towers.image.moe="
                     "\"{'layers': 'every_2', 'num_experts': 8}\".")
  variants = [("dense", 1)] + [("moe", int(e)) for e in expert_sizes]
  rows = []
  for name, e in variants:
    c = config.copy_and_resolve_references()
    with c.unlocked():
      c.mesh.data, c.mesh.fsdp, c.mesh.tensor, c.mesh.expert = -1, 1, 1, e
      if name == "dense":
        for tower in tower_configs(c.model).values():
          if "moe" in tower:
            del tower["moe"]
    row = {"model": name, **run(c, steps=steps, image_size=image_size)}
    cls, kwargs = Towers(**c.model.to_dict()).tower_kwargs("image")
    patch = cls(**kwargs).arch()["patch_size"]
    tokens = (row["image_size"] // patch[0]) * (row["image_size"] // patch[1]) + row["text_len"]
    row["flops_per_token"] = row["model_flops_per_step"] / (row["batch_size"] * tokens)
    rows.append(row)
  return rows


def moe_table(rows: list[dict]) -> str:
  """A markdown table of moe_comparison's rows."""
  lines = ["| model | mesh | params | active params | train FLOPs / token | img dropped | "
           "txt dropped | argument MB / device | temp MB / device | collectives |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    mem = r.get("memory_bytes", {})
    dropped = [f"{r[k]:.3f}" if k in r else "-" for k in ("img/moe_dropped", "txt/moe_dropped")]
    mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1 or k == "expert")
    lines.append(
        f"| {r['model']} | {mesh} | "
        f"{r['num_params']:,} | {r['num_active_params']:,} | {r['flops_per_token']:.3e} | "
        f"{dropped[0]} | {dropped[1]} | {mem.get('argument_size_in_bytes', 0) / 1e6:.2f} | "
        f"{mem.get('temp_size_in_bytes', 0) / 1e6:.2f} | "
        f"{', '.join(f'{k} {v}' for k, v in r['collectives'].items())} |")
  return "\n".join(lines)


def _true(value) -> bool:
  """A boolean flag's value: given bare (--uint8) or as --uint8=true / false."""
  return value is not None and str(value).lower() not in ("false", "0", "no")


def main(argv: list[str]) -> int:
  flags, overrides = config_lib.parse_command_line(argv)
  if "config" not in flags or set(flags) - {"config", "steps", "image_size", "out", "moe_mesh",
                                            "uint8", "profile", "profile_steps", "xla_dump"}:
    print(USAGE, file=sys.stderr)
    return 2
  if "xla_dump" in flags:  # read when jax starts its backend, which nothing has done yet
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to="
                               f"{flags['xla_dump']} --xla_dump_hlo_as_text "
                               "--xla_dump_hlo_module_re=step_fn").strip()
  config = config_lib.load(flags["config"], overrides)
  image_size = int(flags["image_size"]) if "image_size" in flags else None
  if "moe_mesh" in flags:
    result = moe_comparison(config, flags["moe_mesh"].split(","),
                            steps=int(flags.get("steps", 10)), image_size=image_size)
    print(moe_table(result), file=sys.stderr)
  else:
    result = run(config, steps=int(flags.get("steps", 10)), image_size=image_size,
                 uint8=_true(flags.get("uint8")), profile=flags.get("profile"),
                 profile_steps=int(flags.get("profile_steps", 3)))
  text = json.dumps(result, indent=2)
  print(text)
  if "out" in flags:
    with open(flags["out"], "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
