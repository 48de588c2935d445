r"""Benchmarks for big_mm's kernels: fused contrastive loss memory (CPU), contrastive loss and
attention speed (GPU). Prints a table; --json PATH also writes the rows.

  python tools/benchmark_kernels.py memory [--batches 16384 65536] [--dim 768] [--devices 8]
      [--dtype float32|bfloat16] [--cpu-scheduler memory|concurrency]
  python tools/benchmark_kernels.py contrastive-gpu [--batch 65536] [--dim 768] [--iters 10]
  python tools/benchmark_kernels.py attention-gpu [--iters 10]

memory: compiles (never runs) the loss forward+backward (grads wrt zimg, ztxt, t, b) on
  simulated CPU devices and reports XLA's compiled memory_analysis() per device: temp,
  argument and output bytes, for all_gather (xla), ring (xla) and ring (pallas, interpret
  mode), sigmoid and softmax; plus the ratio of each to ring+pallas and how temp grows with
  the batch (x4 batch: ~x4 is linear, ~x16 quadratic). ring+pallas-opaque compiles the same
  ring with each Pallas pass replaced by an opaque call of the same operands and outputs:
  interpret mode copies every operand into its grid loop, a compiled TPU/GPU kernel does not,
  so this is the closer estimate of device memory on an accelerator (an estimate, not a
  measurement of a real kernel).
  --cpu-scheduler: XLA:CPU's default ("concurrency") instruction scheduler starts independent
  work early so that its threads overlap it: here it copies the travelling shard of the
  forward ring and of both backward rings (independent loops) all up front, so three shard
  copies and a receive buffer are live instead of one shard and its receive buffer (up to 2x
  the ring's temp). TPU/GPU schedulers keep memory in check, so the benchmark uses XLA:CPU's
  memory-minimising scheduler ("memory", the default here) for every variant; "concurrency"
  shows XLA:CPU's default.
  bfloat16 on CPU: XLA:CPU widens bf16 collective-permutes to float32 (two f32 [b, d] staging
  buffers per ring step); TPU/GPU permute bf16 as is.
contrastive-gpu: SigLIP and CLIP loss fwd+bwd on one GPU (strategy "local", bf16 inputs),
  xla reference vs pallas fused: median wall time after warm-up and the process's peak GPU
  memory; each variant runs in its own subprocess so the peaks do not mix.
attention-gpu: fwd+bwd TFLOP/s of big_mm.kernels.attention.dot_product_attention for each
  implementation and of jax.nn.dot_product_attention (xla, cudnn) as baselines. FLOPs:
  4*B*H*Lq*Lk*D forward (halved when causal), backward 2.5x forward.

Imports only jax and big_mm's kernels / objectives.losses (no data stack).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

ARGNUMS = (0, 1, 2, 3)
TEMPERATURE_BIAS = {"sigmoid": (10.0, -10.0), "softmax": (14.0, 0.0)}


def _print_table(rows, columns):
  widths = [max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns]
  print("  ".join(c.rjust(w) for c, w in zip(columns, widths)))
  for r in rows:
    print("  ".join(_fmt(r.get(c)).rjust(w) for c, w in zip(columns, widths)))


def _fmt(v):
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.4g}"
  return str(v)


def _write_json(path, payload):
  if path:
    with open(path, "w") as f:
      json.dump(payload, f, indent=1)
    print(f"wrote {path}")


def _versions():
  import jax
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}


# ----------------------------------------------------------------------------- memory (CPU)

MEMORY_VARIANTS = (("all_gather", "xla"), ("ring", "xla"), ("ring", "pallas"),
                   ("ring", "pallas-opaque"))


def _opaque_kernels(kernels):
  """A stand-in for `kernels._tiled_pass` used only for `ring+pallas-opaque` (compiled, never
  run): each Pallas pass becomes one opaque call that reads its operands in place and writes
  its outputs, as a compiled kernel does on TPU/GPU (tiles live in VMEM / shared memory).
  CPU interpret mode instead copies every operand into its grid loop, so `ring+pallas`
  over-states what the kernels cost on an accelerator; this variant measures the ring around
  them."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  def opaque_pass(tile_fn, inits, out_shapes, *, params, zi, zt, row_vecs, col_vecs, **_):
    shapes = [jax.ShapeDtypeStruct(s, jnp.float32) for s in out_shapes]
    host = lambda *a: [np.zeros(s, np.float32) for s in out_shapes]
    return jax.pure_callback(host, shapes, params, zi, zt, *row_vecs, *col_vecs)

  return opaque_pass


def memory(args):
  flags = os.environ.get("XLA_FLAGS", "")
  concurrency = "true" if args.cpu_scheduler == "concurrency" else "false"
  os.environ["XLA_FLAGS"] = (
      f"{flags} --xla_force_host_platform_device_count={args.devices} "
      f"--xla_cpu_enable_concurrency_optimized_scheduler={concurrency}")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import functools

  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from big_mm.kernels import contrastive as kernels
  from big_mm.objectives import losses

  mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  cfg = kernels.kernel_config("cpu", **({"tile_rows": args.tile, "tile_cols": args.tile}
                                        if args.tile else {}))
  dtype = jnp.dtype(args.dtype)
  rows = []
  for batch in args.batches:
    emb = jax.ShapeDtypeStruct((batch, args.dim), dtype,
                               sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    for loss in args.losses:
      for strategy, impl in MEMORY_VARIANTS:
        fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh,
                               implementation=impl.split("-")[0], kernel_config=cfg)
        start = time.perf_counter()
        real_pass = kernels._tiled_pass
        if impl == "pallas-opaque":
          kernels._tiled_pass = _opaque_kernels(kernels)
        try:
          compiled = jax.jit(jax.value_and_grad(fn, ARGNUMS)).lower(
              emb, emb, scalar, scalar).compile()
        finally:
          kernels._tiled_pass = real_pass
        mem = compiled.memory_analysis()
        row = dict(batch=batch, loss=loss, variant=f"{strategy}+{impl}",
                   temp_MiB=mem.temp_size_in_bytes / 2**20,
                   arg_MiB=mem.argument_size_in_bytes / 2**20,
                   out_MiB=mem.output_size_in_bytes / 2**20,
                   compile_s=time.perf_counter() - start)
        rows.append(row)
        print(f"compiled {row['variant']} {loss} B={batch}: temp {row['temp_MiB']:.1f} MiB "
              f"in {row['compile_s']:.1f} s", flush=True)

  # Ratios against ring+pallas at the same batch, and growth with the batch.
  fused = {(r["batch"], r["loss"]): r["temp_MiB"] for r in rows if r["variant"] == "ring+pallas"}
  first = {(r["loss"], r["variant"]): r for r in rows if r["batch"] == args.batches[0]}
  for r in rows:
    r["temp_vs_ring+pallas"] = r["temp_MiB"] / max(fused[(r["batch"], r["loss"])], 1e-9)
    base = first[(r["loss"], r["variant"])]
    r["temp_growth"] = r["temp_MiB"] / max(base["temp_MiB"], 1e-9)
  print(f"\nPer-device compiled memory, fwd+bwd, d={args.dim}, {args.dtype}, "
        f"{args.devices} simulated CPU devices, pallas tile {cfg.tile_rows}x{cfg.tile_cols}, "
        f"{args.cpu_scheduler} scheduler (temp_growth: vs batch {args.batches[0]})")
  _print_table(rows, ["batch", "loss", "variant", "temp_MiB", "arg_MiB", "out_MiB",
                      "temp_vs_ring+pallas", "temp_growth", "compile_s"])
  _write_json(args.json, {"benchmark": "memory", "dim": args.dim, "dtype": args.dtype,
                          "devices": args.devices, "tile": [cfg.tile_rows, cfg.tile_cols],
                          "cpu_scheduler": args.cpu_scheduler,
                          "versions": _versions(), "rows": rows})


# ----------------------------------------------------------------------------- GPU helpers


def _require_gpu():
  import jax
  try:
    gpus = jax.devices("gpu")
  except RuntimeError:
    gpus = []
  if not gpus:
    sys.exit(f"error: this benchmark needs an NVIDIA GPU, but JAX sees only "
             f"{[d.platform for d in jax.devices()]}. Run it on a GPU machine "
             "(jax[cuda12] installed); use the `memory` subcommand on CPU.")
  return gpus[0]


def _median_time(fn, args, iters, warmup):
  import jax
  jax.block_until_ready(fn(*args))  # compile
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


# ----------------------------------------------------------------------------- contrastive (GPU)


def _contrastive_one(args):
  """One (loss, implementation) variant; prints one JSON line (run in a subprocess)."""
  device = _require_gpu()
  import functools

  import jax
  import jax.numpy as jnp

  from big_mm.objectives import losses

  loss, impl = args.one
  k1, k2 = jax.random.split(jax.random.PRNGKey(0))
  norm = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(jnp.bfloat16)
  zimg = norm(jax.random.normal(k1, (args.batch, args.dim), jnp.float32))
  ztxt = norm(jax.random.normal(k2, (args.batch, args.dim), jnp.float32))
  t, b = (jnp.float32(v) for v in TEMPERATURE_BIAS[loss])
  fn = jax.jit(jax.value_and_grad(functools.partial(
      losses.contrastive_loss, loss=loss, strategy="local", implementation=impl), ARGNUMS))
  row = dict(loss=loss, implementation=impl, batch=args.batch, dim=args.dim)
  try:
    row["ms"] = 1e3 * _median_time(fn, (zimg, ztxt, t, b), args.iters, args.warmup)
    stats = device.memory_stats() or {}
    row["peak_GiB"] = stats.get("peak_bytes_in_use", float("nan")) / 2**30
  except Exception as e:  # noqa: BLE001 -- report OOM / lowering errors per variant
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  print("ROW " + json.dumps(row), flush=True)


def contrastive_gpu(args):
  if args.one:
    return _contrastive_one(args)
  _require_gpu()
  rows = []
  for loss in args.losses:
    for impl in ("xla", "pallas"):
      cmd = [sys.executable, os.path.abspath(__file__), "contrastive-gpu", "--one", loss, impl,
             "--batch", str(args.batch), "--dim", str(args.dim), "--iters", str(args.iters),
             "--warmup", str(args.warmup)]
      proc = subprocess.run(cmd, capture_output=True, text=True)
      lines = [l for l in proc.stdout.splitlines() if l.startswith("ROW ")]
      if lines:
        rows.append(json.loads(lines[-1][4:]))
      else:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        rows.append(dict(loss=loss, implementation=impl, error=f"rc {proc.returncode}: {tail[0]}"))
      print(f"done {loss} {impl}", flush=True)
  print(f"\nContrastive loss fwd+bwd, strategy local, B={args.batch}, d={args.dim}, bf16 inputs")
  _print_table(rows, ["loss", "implementation", "ms", "peak_GiB", "error"])
  _write_json(args.json, {"benchmark": "contrastive-gpu", "versions": _versions(), "rows": rows})


# ----------------------------------------------------------------------------- attention (GPU)

ATTENTION_SHAPES = (  # name, batch, heads, seq, head_dim, causal
    ("vit", 64, 16, 257, 64, False),
    ("long", 4, 16, 4096, 128, False),
    ("long_causal", 4, 16, 4096, 128, True),
)


def attention_gpu(args):
  _require_gpu()
  import jax
  import jax.numpy as jnp

  from big_mm.kernels import attention

  impls = [(f"big_mm:{impl}", impl) for impl in ("xla", "cudnn", "pallas")]
  impls += [("jax.nn:xla", "jax:xla"), ("jax.nn:cudnn", "jax:cudnn")]
  rows = []
  for name, batch, heads, seq, dim, causal in ATTENTION_SHAPES:
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q, k, v = (jax.random.normal(key, (batch, seq, heads, dim), jnp.bfloat16) for key in keys)
    fwd_flops = 4 * batch * heads * seq * seq * dim * (0.5 if causal else 1.0)
    for label, impl in impls:
      if impl.startswith("jax:"):
        def attend(q, k, v, impl=impl[4:], causal=causal):
          return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)
      else:
        def attend(q, k, v, impl=impl, causal=causal):
          return attention.dot_product_attention(q, k, v, mask=None, causal=causal,
                                                 implementation=impl)
      loss = lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v).astype(jnp.float32))
      step = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
      row = dict(shape=name, batch=batch, heads=heads, seq=seq, head_dim=dim, causal=causal,
                 impl=label)
      try:
        seconds = _median_time(step, (q, k, v), args.iters, args.warmup)
        row["ms"] = 1e3 * seconds
        row["TFLOP/s"] = 3.5 * fwd_flops / seconds / 1e12
      except Exception as e:  # noqa: BLE001 -- an implementation may be missing or unsupported
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"
      rows.append(row)
      print(f"done {name} {label}", flush=True)
  print("\nAttention fwd+bwd, bf16 (FLOPs: 4*B*H*L*L*D fwd, halved causal, bwd 2.5x fwd)")
  _print_table(rows, ["shape", "batch", "heads", "seq", "head_dim", "causal", "impl", "ms",
                      "TFLOP/s", "error"])
  _write_json(args.json, {"benchmark": "attention-gpu", "versions": _versions(), "rows": rows})


# ----------------------------------------------------------------------------- CLI


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)

  p = sub.add_parser("memory", help="compiled memory of the contrastive losses (CPU)")
  p.add_argument("--batches", type=int, nargs="+", default=[16384, 65536])
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--devices", type=int, default=8)
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--losses", nargs="+", default=["sigmoid", "softmax"])
  p.add_argument("--tile", type=int, default=None, help="pallas tile (default: CPU config)")
  p.add_argument("--cpu-scheduler", default="memory", choices=["memory", "concurrency"],
                 help="XLA:CPU instruction scheduler: memory-minimising (default, the closer "
                      "model of TPU/GPU) or XLA:CPU's own concurrency-optimised default")
  p.set_defaults(run=memory)

  p = sub.add_parser("contrastive-gpu", help="contrastive loss time / peak memory (GPU)")
  p.add_argument("--batch", type=int, default=65536)
  p.add_argument("--dim", type=int, default=768)
  p.add_argument("--losses", nargs="+", default=["sigmoid", "softmax"])
  p.add_argument("--one", nargs=2, metavar=("LOSS", "IMPL"), help=argparse.SUPPRESS)
  p.set_defaults(run=contrastive_gpu)

  p = sub.add_parser("attention-gpu", help="attention fwd+bwd TFLOP/s (GPU)")
  p.set_defaults(run=attention_gpu)

  for p in sub.choices.values():
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    if p.prog.split()[-1] != "memory":
      p.add_argument("--iters", type=int, default=10)
      p.add_argument("--warmup", type=int, default=2)

  args = parser.parse_args(argv)
  args.run(args)


if __name__ == "__main__":
  main()
