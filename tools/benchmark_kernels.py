r"""Benchmarks for big_mm's kernels: fused contrastive loss memory (CPU), contrastive loss and
attention speed (GPU), and a correctness check of the compiled Pallas kernels (GPU; CPU in
interpret mode). Prints a table; --json PATH also writes the rows.

  python tools/benchmark_kernels.py memory [--batches 16384 65536] [--dim 768] [--devices 8]
      [--dtype float32|bfloat16] [--cpu-scheduler memory|concurrency] [--variants V ..]
      [--chunk 1024]
  python tools/benchmark_kernels.py contrastive-gpu [--batches 32768 65536] [--dim 768]
      [--implementations xla pallas chunked] [--iters 10]
  python tools/benchmark_kernels.py autotune [--batches 65536] [--implementations chunked pallas]
      [--max-gib 1.5] [--write big_mm/kernels/tuning.json]
  python tools/benchmark_kernels.py attention-gpu [--iters 10]
  python tools/benchmark_kernels.py check-gpu [--only attention contrastive] [--filter SUB..]
      [--tiny] [--budget-s S]

memory: compiles (never runs) the loss forward+backward (grads wrt zimg, ztxt, t, b) on
  simulated CPU devices and reports XLA's compiled memory_analysis() per device: temp,
  argument and output bytes, for each --variants strategy+implementation (default: ring+pallas
  (interpret mode), all_gather+xla, ring+xla, ring+pallas-opaque, ring+chunked with --chunk
  rows per step; local+... on --devices 1 compares the single-device losses), sigmoid and
  softmax; plus the ratio of each to the first variant and how temp grows with
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
  xla (dense logits) vs pallas (fused) vs chunked (XLA over row chunks), each with the config
  kernel_config gives it (the stored tuning table's entry where one matches): median wall
  time after warm-up and the process's peak GPU memory; each variant runs in its own
  subprocess (--variant-timeout) so the peaks do not mix.
autotune: the same measurement for each candidate setting (AUTOTUNE_CANDIDATES, or
  --candidates '{"tile_rows": 512}' ...) of each implementation and loss at one batch; the
  fastest within --max-gib peak memory becomes an entry of the tuning table
  (big_mm/kernels/tuning.py: keyed by device kind, implementation, loss, dim, dtype, batch),
  added to --write. --cpu runs either command on CPU (plumbing only: tests).
attention-gpu: fwd+bwd TFLOP/s of big_mm.kernels.attention.dot_product_attention for each
  implementation and of jax.nn.dot_product_attention (xla, cudnn) as baselines. FLOPs:
  4*B*H*Lq*Lk*D forward (halved when causal), backward 2.5x forward.

check-gpu: on the default backend, implementation "pallas" (and "cudnn" for bf16 attention,
  SKIP where unavailable) against the jnp reference, values and gradients:
  attention out, dq, dk, dv of sum(out * random) for full, causal, key padding, prefix-LM,
  dense mask and cross attention (Lq != Lk), lengths a power of two / a block multiple / not
  a block multiple, head_dim 64 and 128, float32 and bfloat16; contrastive loss value and
  grads wrt zimg, ztxt, t, b (sigmoid, softmax) for batches 256 / 1000 / 600 and d 128 / 768,
  float32 and bfloat16 inputs (on CPU also with the GPU's tiles and loop mode). A check
  passes iff max|got - want| / max|want| <= tol for every quantity (CHECK_TOL); an exception
  is an ERROR row with its first lines, and the run goes on. Exit status 1 on any FAIL or
  ERROR. On CPU the kernels run in interpret mode, with tiny shapes (--tiny elsewhere).
  --json is rewritten after every check, so a run killed by a timeout keeps its rows.

Imports only jax and big_mm's kernels / objectives/losses.py (loaded without the objectives
package, which needs ml_collections and flax), so it runs where only jax is installed.
"""
from __future__ import annotations

import argparse
import functools
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


def _write_json(path, payload, quiet=False):
  if path:
    with open(path, "w") as f:
      json.dump(payload, f, indent=1)
    if not quiet:
      print(f"wrote {path}")


def _losses():
  """big_mm/objectives/losses.py, loaded without big_mm/objectives/__init__.py.

  That package's __init__ imports every objective and with them big_mm.config
  (ml_collections), the models (flax) and the input stack; losses.py itself needs only jax
  and big_mm.kernels, and a GPU box may have nothing else installed.
  """
  import importlib.util
  name = "big_mm_benchmark_losses"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(ROOT, "big_mm", "objectives", "losses.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[name] = module
  return sys.modules[name]


def _versions():
  import jax
  import jaxlib
  return {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
          "device": str(jax.devices()[0].device_kind), "backend": jax.default_backend()}


# ----------------------------------------------------------------------------- memory (CPU)

MEMORY_VARIANTS = ("ring+pallas", "all_gather+xla", "ring+xla", "ring+pallas-opaque",
                   "ring+chunked")


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
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from big_mm.kernels import contrastive as kernels

  losses = _losses()
  mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  cfg = kernels.kernel_config("cpu", **({"tile_rows": args.tile, "tile_cols": args.tile}
                                        if args.tile else {}))
  chunked_cfg = kernels.kernel_config("cpu", mode="chunked", tile_rows=args.chunk)
  dtype = jnp.dtype(args.dtype)
  rows = []
  for batch in args.batches:
    emb = jax.ShapeDtypeStruct((batch, args.dim), dtype,
                               sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    for loss in args.losses:
      for variant in args.variants:
        strategy, impl = variant.split("+")
        chunked = impl == "chunked"
        fn = functools.partial(losses.contrastive_loss, loss=loss, strategy=strategy, mesh=mesh,
                               implementation=impl.split("-")[0],
                               kernel_config=chunked_cfg if chunked else cfg)
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
        row = dict(batch=batch, loss=loss, variant=variant,
                   temp_MiB=mem.temp_size_in_bytes / 2**20,
                   arg_MiB=mem.argument_size_in_bytes / 2**20,
                   out_MiB=mem.output_size_in_bytes / 2**20,
                   compile_s=time.perf_counter() - start)
        rows.append(row)
        print(f"compiled {row['variant']} {loss} B={batch}: temp {row['temp_MiB']:.1f} MiB "
              f"in {row['compile_s']:.1f} s", flush=True)

  # Ratios against the first variant at the same batch, and growth with the batch.
  base_variant = args.variants[0]
  fused = {(r["batch"], r["loss"]): r["temp_MiB"] for r in rows if r["variant"] == base_variant}
  first = {(r["loss"], r["variant"]): r for r in rows if r["batch"] == args.batches[0]}
  for r in rows:
    r[f"temp_vs_{base_variant}"] = r["temp_MiB"] / max(fused[(r["batch"], r["loss"])], 1e-9)
    base = first[(r["loss"], r["variant"])]
    r["temp_growth"] = r["temp_MiB"] / max(base["temp_MiB"], 1e-9)
  print(f"\nPer-device compiled memory, fwd+bwd, d={args.dim}, {args.dtype}, "
        f"{args.devices} simulated CPU devices, pallas tile {cfg.tile_rows}x{cfg.tile_cols}, "
        f"chunk {args.chunk} rows, "
        f"{args.cpu_scheduler} scheduler (temp_growth: vs batch {args.batches[0]})")
  _print_table(rows, ["batch", "loss", "variant", "temp_MiB", "arg_MiB", "out_MiB",
                      f"temp_vs_{base_variant}", "temp_growth", "compile_s"])
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
             "(jax[cuda12] / jax[cuda13] installed); use `memory` or `check-gpu` on CPU.")
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
  """One (loss, implementation[, kernel config]) variant; prints one JSON line (run in a
  subprocess, so each variant's peak memory is its own)."""
  device = _require_gpu() if not args.cpu else None
  import jax
  import jax.numpy as jnp

  from big_mm.kernels import contrastive as kernels

  losses = _losses()
  loss, impl = args.one
  overrides = json.loads(args.kernel_config) if args.kernel_config else {}
  k1, k2 = jax.random.split(jax.random.key(0))
  norm = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(args.dtype)
  zimg = norm(jax.random.normal(k1, (args.batch, args.dim), jnp.float32))
  ztxt = norm(jax.random.normal(k2, (args.batch, args.dim), jnp.float32))
  t, b = (jnp.float32(v) for v in TEMPERATURE_BIAS[loss])
  row = dict(loss=loss, implementation=impl, batch=args.batch, dim=args.dim, dtype=args.dtype,
             versions=_versions())
  try:
    cfg = None
    if impl != "xla":  # the config the loss will run with: stored table entry, then overrides
      mode = {"mode": "chunked"} if impl == "chunked" else {}
      cfg = kernels.kernel_config(dim=args.dim, dtype=zimg.dtype, loss=loss, batch=args.batch,
                                  **mode, **overrides)
      row["config"] = {k: getattr(cfg, k) for k in ("tile_rows", "tile_cols", "num_warps")}
    fn = jax.jit(jax.value_and_grad(functools.partial(
        losses.contrastive_loss, loss=loss, strategy="local", implementation=impl,
        kernel_config=cfg), ARGNUMS))
    row["ms"] = 1e3 * _median_time(fn, (zimg, ztxt, t, b), args.iters, args.warmup)
    stats = (device.memory_stats() if device else None) or {}
    row["peak_GiB"] = stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None
  except Exception as e:  # noqa: BLE001 -- report OOM / lowering errors per variant
    row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
  print("ROW " + json.dumps(row), flush=True)


def _variant(args, loss, impl, kernel_config=None, batch=None):
  """Runs one `contrastive-gpu --one` variant in a subprocess; its row, or an error row."""
  cmd = [sys.executable, os.path.abspath(__file__), "contrastive-gpu", "--one", loss, impl,
         "--batches", str(batch or args.batches[0]), "--dim", str(args.dim),
         "--dtype", args.dtype, "--iters", str(args.iters), "--warmup", str(args.warmup)]
  cmd += ["--kernel-config", json.dumps(kernel_config)] if kernel_config else []
  cmd += ["--cpu"] if args.cpu else []
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.variant_timeout,
                          env=args.child_env)
    out, err, rc = proc.stdout, proc.stderr, proc.returncode
  except subprocess.TimeoutExpired as e:
    out, err, rc = e.stdout or "", e.stderr or "", f"timeout {args.variant_timeout} s"
    out, err = (x.decode() if isinstance(x, bytes) else x for x in (out, err))
  lines = [l for l in out.splitlines() if l.startswith("ROW ")]
  if lines:
    return json.loads(lines[-1][4:])
  tail = (err or out).strip().splitlines()[-3:] or ["no output"]
  print("\n".join((err or out).strip().splitlines()[-15:]), flush=True)
  return dict(loss=loss, implementation=impl, batch=batch, config=kernel_config,
              error=f"rc {rc}: {' | '.join(tail)}")


def _start_parent(args):
  """The parent starts JAX without pre-allocating GPU memory (by default it takes 75% of it,
  leaving each variant's subprocess only the rest); children keep the environment given."""
  args.child_env = dict(os.environ)
  os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
  if not args.cpu:
    _require_gpu()


def contrastive_gpu(args):
  if args.one:
    args.batch = args.batches[0]
    return _contrastive_one(args)
  _start_parent(args)
  rows = []
  payload = {"benchmark": "contrastive-gpu", "batches": args.batches, "dim": args.dim,
             "dtype": args.dtype, "rows": rows}
  for batch in args.batches:
    for loss in args.losses:
      for impl in args.implementations:
        row = _variant(args, loss, impl, batch=batch)
        payload.setdefault("versions", row.get("versions"))
        row.pop("versions", None)
        rows.append(row)
        print(f"done B={batch} {loss} {impl}: {json.dumps(row)}", flush=True)
        _write_json(args.json, payload, quiet=True)
  print(f"\nContrastive loss fwd+bwd, strategy local, d={args.dim}, {args.dtype} inputs")
  _print_table(rows, ["batch", "loss", "implementation", "config", "ms", "peak_GiB", "error"])
  _write_json(args.json, payload)


# Candidate settings per implementation. Triton keeps a program's zi / zt row tiles (the
# padded feature dim) in shared memory, so large tiles at d = 768 may fail to compile: those
# candidates come back as error rows and are not chosen.
AUTOTUNE_CANDIDATES = {
    "chunked": [{"tile_rows": r} for r in (256, 512, 1024, 2048, 4096)],
    "pallas": [{"tile_rows": r, "tile_cols": c, "num_warps": w}
               for r, c, w in ((16, 16, 4), (32, 32, 4), (32, 32, 8), (64, 32, 4), (64, 64, 8))],
}


def autotune(args):
  """Times every candidate of each implementation and loss at one batch, in subprocesses;
  the fastest whose peak memory is within --max-gib becomes a table entry
  (big_mm/kernels/tuning.py), written to --write (else only printed)."""
  _start_parent(args)
  from big_mm.kernels import tuning

  batch = args.batches[0]
  rows, entries = [], []
  payload = {"benchmark": "autotune", "batch": batch, "dim": args.dim, "dtype": args.dtype,
             "max_gib": args.max_gib, "rows": rows}
  for impl in args.implementations:
    for loss in args.losses:
      tried = []
      for candidate in (json.loads(c) for c in args.candidates) if args.candidates else \
          AUTOTUNE_CANDIDATES[impl]:
        row = _variant(args, loss, impl, kernel_config=candidate, batch=batch)
        versions = row.pop("versions", None)
        row["candidate"] = candidate
        rows.append(row)
        tried.append((row, versions))
        print(f"tried {impl} {loss} {candidate}: {row.get('ms')} ms, "
              f"{row.get('peak_GiB')} GiB {row.get('error') or ''}", flush=True)
        _write_json(args.json, payload, quiet=True)
      fits = [(r, v) for r, v in tried if "ms" in r and (
          r.get("peak_GiB") is None or r["peak_GiB"] <= args.max_gib)]
      if not fits:
        print(f"no {impl} {loss} candidate ran within {args.max_gib} GiB: no entry", flush=True)
        continue
      best, versions = min(fits, key=lambda rv: rv[0]["ms"])
      best["chosen"] = True
      entries.append(dict(
          device_kind=tuning.device_kind(), implementation=impl, loss=loss, dim=args.dim,
          dtype=args.dtype, batch=batch, config=best["candidate"], ms=best["ms"],
          peak_GiB=best.get("peak_GiB"), versions=versions,
          date=time.strftime("%Y-%m-%d")))
  payload["entries"] = entries
  print(f"\nAutotune, B={batch}, d={args.dim}, {args.dtype}; chosen: fastest within "
        f"{args.max_gib} GiB")
  _print_table(rows, ["implementation", "loss", "candidate", "ms", "peak_GiB", "chosen",
                      "error"])
  if args.write and entries:
    print(f"wrote {len(entries)} entries to {tuning.record(entries, args.write)}")
  _write_json(args.json, payload)
  return 0 if entries else 1


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
    keys = jax.random.split(jax.random.key(0), 3)
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
      print(f"done {name} {label}: {json.dumps(row)}", flush=True)
      _write_json(args.json, {"benchmark": "attention-gpu", "rows": rows}, quiet=True)
  print("\nAttention fwd+bwd, bf16 (FLOPs: 4*B*H*L*L*D fwd, halved causal, bwd 2.5x fwd)")
  _print_table(rows, ["shape", "batch", "heads", "seq", "head_dim", "causal", "impl", "ms",
                      "TFLOP/s", "error"])
  _write_json(args.json, {"benchmark": "attention-gpu", "versions": _versions(), "rows": rows})


# ----------------------------------------------------------------------------- check-gpu

# Pass iff max|got - want| / max|want| <= tol, per quantity (output / each gradient; for
# scalars the denominator is max(|want|, 1e-2)). float32 on a GPU: both the kernels and the
# reference use TF32 matmuls (the backend default), hence the looser bound there.
CHECK_TOL = {("float32", "cpu"): 1e-4, ("float32", "gpu"): 1e-2, ("bfloat16", "cpu"): 2e-2,
             ("bfloat16", "gpu"): 2e-2}
# Softmax's loss does not depend on b: its db is 0 up to rounding; checked as |db| <= this.
SOFTMAX_DB_ATOL = 1e-3


def _tolerance(dtype, backend):
  return CHECK_TOL[(dtype, "cpu" if backend == "cpu" else "gpu")]


def _error_text(e, lines=4, width=300):
  """The exception's type and its first non-empty lines (Triton/Mosaic errors are long)."""
  text = [l.strip()[:width] for l in str(e).splitlines() if l.strip()][:lines]
  return f"{type(e).__name__}: " + " | ".join(text)


def _compare(got, want, tol, scalar_atol=None):
  """{quantity: (err, tol)} for matching pytrees of arrays given as dicts."""
  import numpy as np
  out = {}
  for name, w in want.items():
    g = np.asarray(got[name], np.float32)
    w = np.asarray(w, np.float32)
    if g.shape != w.shape:
      out[name] = (float("inf"), tol)
    elif name in (scalar_atol or {}):
      out[name] = (float(np.max(np.abs(g - w))), scalar_atol[name])
    else:
      floor = 1e-2 if w.ndim == 0 else 1e-6
      err = np.max(np.abs(g - w)) / max(float(np.max(np.abs(w))), floor)
      out[name] = (float(err) if np.all(np.isfinite(g)) else float("nan"), tol)
  return out


def _as_f32(tree):
  import jax
  import jax.numpy as jnp
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _attention_run(implementation, causal):
  """jit'd (q, k, v, cot, mask, prefix_len) -> {out, dq, dk, dv} for one implementation."""
  import jax
  import jax.numpy as jnp

  from big_mm.kernels import attention

  def loss(q, k, v, cot, mask, prefix_len):
    out = attention.dot_product_attention(q, k, v, mask=mask, causal=causal,
                                          implementation=implementation, prefix_len=prefix_len)
    return jnp.sum(out.astype(jnp.float32) * cot), out

  @jax.jit
  def run(q, k, v, cot, mask, prefix_len):
    (dq, dk, dv), out = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)(
        q, k, v, cot, mask, prefix_len)
    return {"out": out, "dq": dq, "dk": dk, "dv": dv}

  return run


def _attention_cases(tiny):
  """(name, Lq, Lk, causal, mask kind, prefix) at kernel block 64: pow2 / multiple / not a
  multiple ("ragged", even) / odd (ViT's 257 = 256 patches + cls, and 77 x 257 text-image
  cross-attention; cuDNN refuses odd lengths, so `implementation="auto"` sends them here)."""
  lp, lm, lo, odd, text = (64, 128, 100, 65, 13) if tiny else (256, 192, 300, 257, 77)
  return [
      ("full", lp, lp, False, None, False),
      ("full_ragged", lo, lo, False, None, False),
      ("full_odd", odd, odd, False, None, False),
      ("keypad_odd", odd, odd, False, "keypad", False),
      ("causal", lm, lm, True, None, False),
      ("causal_ragged", lo, lo, True, None, False),
      ("keypad", lo, lo, False, "keypad", False),
      ("keypad_causal", lm, lm, True, "keypad", False),
      ("prefix", lo, lo, True, None, True),
      ("dense_mask", lm, lm, False, "dense", False),
      ("cross", 77, lo, False, None, False),
      ("cross_keypad", 77, lo, False, "keypad", False),
      ("cross_causal", 64, lm, True, None, False),
      ("cross_odd", text, odd, False, "keypad", False),
  ]


def _attention_checks(tiny, backend):
  """Yields (name, meta, fn); fn() -> list of (impl, {quantity: (err, tol)}) or a SKIP str."""
  import jax
  import jax.numpy as jnp

  from big_mm.kernels import attention

  batch, heads = (2, 1) if tiny else (2, 2)
  combos = [(jnp.bfloat16, 64), (jnp.float32, 64), (jnp.bfloat16, 128), (jnp.float32, 128)]
  for dtype, dim in combos:
    dname = jnp.dtype(dtype).name
    tol = _tolerance(dname, backend)
    for case, lq, lk, causal, mask_kind, prefix in _attention_cases(tiny):
      if tiny and dim == 128 and case not in ("keypad", "cross"):
        continue  # CPU interpret mode is slow to compile: d=128 on a few cases only
      keys = jax.random.split(jax.random.key(lq * 1000 + lk), 5)
      q = jax.random.normal(keys[0], (batch, lq, heads, dim), jnp.float32).astype(dtype)
      k, v = (jax.random.normal(kk, (batch, lk, heads, dim), jnp.float32).astype(dtype)
              for kk in keys[1:3])
      cot = jax.random.normal(keys[3], (batch, lq, heads, dim), jnp.float32)
      mask = prefix_len = None
      if mask_kind == "keypad":
        lengths = jnp.array([lk, max(1, 2 * lk // 5)])
        mask = jnp.arange(lk)[None, None, None, :] < lengths[:, None, None, None]
      elif mask_kind == "dense":  # random, plus the diagonal so no row is fully masked
        mask = jax.random.bernoulli(keys[4], 0.6, (batch, 1, lq, lk))
        mask = mask | jnp.eye(lq, lk, dtype=bool)[None, None]
      if prefix:
        prefix_len = jnp.array([lk // 8, 4 * lk // 5])
      operands = (q, k, v, cot, mask, prefix_len)
      meta = dict(kernel="attention", case=case, dtype=dname, dims=f"B{batch} H{heads} "
                  f"Lq{lq} Lk{lk} D{dim}", tol=tol)
      name = f"attention/{case}/{dname}/d{dim}"
      ref = {}

      def reference(operands=operands, causal=causal, ref=ref):
        if not ref:  # once per case, shared by pallas and cudnn
          try:
            ref.update(jax.device_get(_as_f32(_attention_run("xla", causal)(*operands))))
          except Exception as e:  # noqa: BLE001 -- say it is the reference that failed
            raise RuntimeError(f"the xla reference failed: {_error_text(e)}") from e
        return ref

      def check(impl, operands=operands, causal=causal, reference=reference, tol=tol):
        if impl == "cudnn":
          reason = attention._cudnn_unsupported_reason(*operands[:3])
          if reason is not None:
            return reason
        want = reference()
        got = _attention_run(impl, causal)(*operands)
        dtype_ok = got["out"].dtype == operands[0].dtype
        errs = _compare(_as_f32(got), want, tol)
        if not dtype_ok:
          errs["out_dtype"] = (float("inf"), tol)
        return errs

      yield name + "/pallas", dict(meta, impl="pallas"), functools.partial(check, "pallas")
      if dname == "bfloat16":  # cuDNN flash attention takes bf16/f16 only
        yield name + "/cudnn", dict(meta, impl="cudnn"), functools.partial(check, "cudnn")


def _contrastive_checks(tiny, backend):
  import jax
  import jax.numpy as jnp

  from big_mm.kernels import contrastive as kernels

  losses = _losses()
  configs = [("default", "pallas", None),
             ("chunk128", "chunked", kernels.kernel_config(mode="chunked", tile_rows=128))]
  if backend == "cpu":  # also the GPU's tiling and fori_loop mode, in interpret mode
    configs.append(("gpu-like", "pallas", kernels.kernel_config(
        "cpu", tile_rows=32, tile_cols=32, mode="loop", feature_pow2=True)))
  shapes = ([(256, 48), (100, 128)] if tiny else
            [(256, 128), (256, 768), (1000, 128), (1000, 768), (600, 768)])
  for dtype in (jnp.bfloat16, jnp.float32):
    dname = jnp.dtype(dtype).name
    tol = _tolerance(dname, backend)
    for batch, dim in shapes:
      k1, k2 = jax.random.split(jax.random.key(batch + dim))
      zi = jax.random.normal(k1, (batch, dim), jnp.float32)
      zt = jax.random.normal(k2, (batch, dim), jnp.float32) + 0.5 * zi  # positives matter
      norm = lambda x: (x / jnp.linalg.norm(x, axis=-1, keepdims=True)).astype(dtype)
      zi, zt = norm(zi), norm(zt)
      for loss in ("sigmoid", "softmax"):
        t, b = (jnp.float32(x) for x in TEMPERATURE_BIAS[loss])
        for cfg_name, impl, cfg in configs:
          meta = dict(kernel="contrastive", case=f"{loss}_{cfg_name}", dtype=dname,
                      dims=f"B{batch} D{dim}", tol=tol, impl=impl)
          name = f"contrastive/{loss}/{dname}/B{batch}/d{dim}/{cfg_name}"

          def check(loss=loss, cfg=cfg, impl=impl, operands=(zi, zt, t, b), tol=tol):
            def run(impl):
              fn = functools.partial(losses.contrastive_loss, loss=loss, strategy="local",
                                     implementation=impl, kernel_config=cfg)
              value, grads = jax.jit(jax.value_and_grad(fn, ARGNUMS))(*operands)
              return _as_f32(dict(zip(("value", "dzimg", "dztxt", "dt", "db"),
                                      (value,) + grads)))
            want = jax.device_get(run("xla"))
            atol = {"db": SOFTMAX_DB_ATOL} if loss == "softmax" else None
            return _compare(run(impl), want, tol, atol)

          yield name, meta, check


def check_gpu(args):
  """Runs every check (or those matching --filter), prints a table; returns the exit code."""
  import jax

  versions = _versions()
  try:
    from jax._src.lib import cuda_versions  # private; only for the log
    versions["cudnn"] = str(cuda_versions.cudnn_get_version())
  except Exception:  # noqa: BLE001 -- no CUDA plugin (CPU) or a moved private module
    pass
  print("versions: " + json.dumps(versions), flush=True)
  print(f"devices: {jax.devices()}", flush=True)
  backend = jax.default_backend()
  tiny = args.tiny or backend == "cpu"
  if backend == "cpu":
    print("CPU backend: Pallas kernels run in interpret mode; tiny shapes.", flush=True)
  sections = {"attention": _attention_checks, "contrastive": _contrastive_checks}
  rows, start = [], time.perf_counter()
  payload = {"benchmark": "check-gpu", "versions": versions, "tiny": tiny,
             "tolerances": {f"{d}/{b}": t for (d, b), t in CHECK_TOL.items()}, "rows": rows}
  for section in args.only:
    for name, meta, fn in sections[section](tiny, backend):
      if args.filter and not any(f in name for f in args.filter):
        continue
      row = dict(name=name, **meta)
      t0 = time.perf_counter()
      if args.budget_s and t0 - start > args.budget_s:
        row.update(status="SKIP", detail=f"time budget {args.budget_s:g} s spent")
      else:
        try:
          result = fn()
          if isinstance(result, str):
            row.update(status="SKIP", detail=result)
          else:
            row["errors"] = {q: e for q, (e, _) in result.items()}
            bad = {q: e for q, (e, t) in result.items() if not e <= t}  # NaN fails
            worst = max(result, key=lambda q: result[q][0] / result[q][1]
                        if result[q][0] == result[q][0] else float("inf"))
            row.update(status="FAIL" if bad else "PASS", max_err=result[worst][0], worst=worst,
                       detail=", ".join(f"{q} {e:.3g}" for q, e in bad.items()) or None)
        except Exception as e:  # noqa: BLE001 -- report (e.g. a Triton lowering error), go on
          row.update(status="ERROR", detail=_error_text(e))
          print(f"  {name}: {_error_text(e, lines=20, width=1000)}", flush=True)
      row["seconds"] = time.perf_counter() - t0
      rows.append(row)
      print(f"{row['status']:5s} {name}  max_err={_fmt(row.get('max_err'))} "
            f"({_fmt(row.get('worst'))}, tol {_fmt(row.get('tol'))})  "
            f"{row['seconds']:.1f} s  {row.get('detail') or ''}", flush=True)
      _write_json(args.json, payload, quiet=True)  # after every check: a timeout loses none

  counts = {s: sum(r["status"] == s for r in rows) for s in ("PASS", "FAIL", "ERROR", "SKIP")}
  payload["summary"] = dict(counts, seconds=time.perf_counter() - start)
  print(f"\nPallas kernels vs jnp reference on {backend} ({versions['device']}); "
        "err = max|got - want| / max|want| per quantity, worst shown")
  _print_table(rows, ["kernel", "case", "impl", "dtype", "dims", "status", "max_err", "worst",
                      "tol", "seconds", "detail"])
  print(f"\n{counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['ERROR']} ERROR, "
        f"{counts['SKIP']} SKIP in {payload['summary']['seconds']:.0f} s")
  _write_json(args.json, payload)
  return 1 if counts["FAIL"] or counts["ERROR"] else 0


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
  p.add_argument("--chunk", type=int, default=1024, help="rows per step of 'chunked'")
  p.add_argument("--variants", nargs="+", default=list(MEMORY_VARIANTS),
                 help="strategy+implementation (first: the ratios' base); strategies local, "
                      "all_gather, ring; implementations xla, pallas, pallas-opaque, chunked")
  p.add_argument("--cpu-scheduler", default="memory", choices=["memory", "concurrency"],
                 help="XLA:CPU instruction scheduler: memory-minimising (default, the closer "
                      "model of TPU/GPU) or XLA:CPU's own concurrency-optimised default")
  p.set_defaults(run=memory)

  for name, run, batches, impls, about in (
      ("contrastive-gpu", contrastive_gpu, [32768], ["xla", "pallas", "chunked"],
       "contrastive loss time / peak memory (GPU)"),
      ("autotune", autotune, [65536], ["chunked", "pallas"],
       "time kernel settings, store the fastest (GPU)")):
    p = sub.add_parser(name, help=about)
    p.add_argument("--batches", type=int, nargs="+", default=batches,
                   help="global batches (autotune: the first)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--losses", nargs="+", default=["sigmoid", "softmax"])
    p.add_argument("--implementations", nargs="+", default=impls,
                   choices=["xla", "pallas", "chunked"])
    p.add_argument("--variant-timeout", type=float, default=90,
                   help="seconds allowed to each variant's subprocess")
    p.add_argument("--cpu", action="store_true",
                   help="run on CPU (the plumbing only: interpret-mode Pallas, no peak memory)")
    p.set_defaults(run=run)
  p.add_argument("--max-gib", type=float, default=1.5,
                 help="the chosen setting's peak device memory must be within this")
  p.add_argument("--candidates", nargs="+", default=None,
                 help="JSON kernel configs to try instead of the built-in candidates")
  p.add_argument("--write", default=None,
                 help="the tuning table to add the chosen entries to (big_mm/kernels/"
                      "tuning.json is the one kernel_config reads)")
  contrastive_parser = sub.choices["contrastive-gpu"]
  contrastive_parser.add_argument("--one", nargs=2, metavar=("LOSS", "IMPL"),
                                  help=argparse.SUPPRESS)
  contrastive_parser.add_argument("--kernel-config", default=None, help=argparse.SUPPRESS)

  p = sub.add_parser("attention-gpu", help="attention fwd+bwd TFLOP/s (GPU)")
  p.set_defaults(run=attention_gpu)

  p = sub.add_parser("check-gpu", help="Pallas kernels vs jnp references (GPU; CPU interpret)")
  p.add_argument("--only", nargs="+", default=["attention", "contrastive"],
                 choices=["attention", "contrastive"])
  p.add_argument("--filter", nargs="+", default=None,
                 help="run only checks whose name contains one of these substrings")
  p.add_argument("--tiny", action="store_true",
                 help="tiny shapes and fewer attention head_dim-128 cases (automatic on CPU)")
  p.add_argument("--budget-s", type=float, default=None,
                 help="skip (SKIP rows) the checks that would start after this many seconds")
  p.set_defaults(run=check_gpu)

  for p in sub.choices.values():
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    if p.prog.split()[-1] not in ("memory", "check-gpu"):
      p.add_argument("--iters", type=int, default=10)
      p.add_argument("--warmup", type=int, default=2)

  args = parser.parse_args(argv)
  return args.run(args) or 0


if __name__ == "__main__":
  sys.exit(main())
