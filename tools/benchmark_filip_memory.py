r"""Per-device memory of the FILIP loss (fwd + bwd) against the global batch, on simulated CPU
devices: compiles (never runs) jax.value_and_grad of big_mm/objectives/filip_loss.py's loss
and prints XLA's compiled memory_analysis() temp bytes per device.

  python tools/benchmark_filip_memory.py [--batches 64 128 256 512] [--devices 8]
      [--image-tokens 64] [--text-tokens 16] [--dim 64] [--loss softmax] [--json PATH]

Variants: "reference" (filip_loss_reference on the sharded global arrays: every token pair of
the batch, [B, B, Li, Lt], left to GSPMD), all_gather+xla (a b x B block of token pairs per
device), ring+xla (a b x b block per step), ring+pallas (the fused kernels in CPU interpret
mode, which copies every operand into its grid loop) and ring+pallas-opaque (each Pallas pass
replaced by an opaque call reading its operands in place, as a compiled TPU/GPU kernel does:
the estimate of the ring around real kernels; tools/benchmark_kernels.py memory explains it).
temp_growth: temp / temp at the first batch; with the batch x2 per row, linear per device is
x2 per row, quadratic x4. XLA:CPU's memory-minimising scheduler is used (as
tools/benchmark_kernels.py memory does).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ("reference", "all_gather+xla", "ring+xla", "ring+pallas", "ring+pallas-opaque")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512])
  parser.add_argument("--devices", type=int, default=8)
  parser.add_argument("--image-tokens", type=int, default=64)
  parser.add_argument("--text-tokens", type=int, default=16)
  parser.add_argument("--dim", type=int, default=64)
  parser.add_argument("--loss", default="softmax", choices=("softmax", "sigmoid"))
  parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
  parser.add_argument("--json", default=None)
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = (
      f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={args.devices}"
      " --xla_cpu_enable_concurrency_optimized_scheduler=false")
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P

  from big_mm.kernels import contrastive as kernels
  from big_mm.objectives import filip_loss
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
  from benchmark_kernels import _opaque_kernels, _print_table, _versions

  mesh = jax.make_mesh((args.devices,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
  tokens = (args.image_tokens, args.text_tokens)
  rows = []
  for batch in args.batches:
    spec = lambda n: jax.ShapeDtypeStruct((batch, n * args.dim), jnp.float32,
                                          sharding=NamedSharding(mesh, P("data")))
    scalar = jax.ShapeDtypeStruct((), jnp.float32, sharding=NamedSharding(mesh, P()))
    for variant in args.variants:
      if variant == "reference":
        fn = functools.partial(filip_loss.filip_loss_reference, tokens=tokens, dim=args.dim,
                               loss=args.loss)
      else:
        strategy, impl = variant.split("+")
        fn = functools.partial(filip_loss.filip_loss, tokens=tokens, dim=args.dim,
                               loss=args.loss, strategy=strategy, mesh=mesh,
                               implementation=impl.split("-")[0])
      start = time.perf_counter()
      real_pass = kernels._tiled_pass
      if variant.endswith("opaque"):
        kernels._tiled_pass = _opaque_kernels(kernels)
      try:
        compiled = jax.jit(jax.value_and_grad(fn, (0, 1, 2, 3))).lower(
            spec(tokens[0]), spec(tokens[1]), scalar, scalar).compile()
      finally:
        kernels._tiled_pass = real_pass
      mem = compiled.memory_analysis()
      rows.append(dict(batch=batch, per_device=batch // args.devices, variant=variant,
                       temp_MiB=mem.temp_size_in_bytes / 2**20,
                       arg_MiB=mem.argument_size_in_bytes / 2**20,
                       compile_s=time.perf_counter() - start))
      print(f"compiled {variant} B={batch}: temp {rows[-1]['temp_MiB']:.2f} MiB", flush=True)
  first = {r["variant"]: r["temp_MiB"] for r in rows if r["batch"] == args.batches[0]}
  for r in rows:
    r["temp_growth"] = r["temp_MiB"] / max(first[r["variant"]], 1e-9)
  print(f"\nFILIP {args.loss} loss fwd+bwd, per-device compiled memory, {args.devices} simulated "
        f"CPU devices, tokens image {tokens[0]} / text {tokens[1]}, d={args.dim}, float32")
  _print_table(rows, ["batch", "per_device", "variant", "temp_MiB", "arg_MiB", "temp_growth",
                      "compile_s"])
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"benchmark": "filip_memory", "tokens": tokens, "dim": args.dim,
                 "loss": args.loss, "devices": args.devices, "versions": _versions(),
                 "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
