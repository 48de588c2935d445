"""The contrastive kernels' autotuner table: measured best settings, stored per device.

`tools/benchmark_kernels.py autotune` times candidate settings of an implementation
("pallas": tile_rows, tile_cols, num_warps; "chunked": tile_rows, the chunk) on the running
device and records the fastest one that fits its memory cap; `kernel_config` (contrastive.py)
applies the matching entry before the caller's overrides. Nothing here is guessed: a device
with no entry keeps kernel_config's defaults.

The table is JSON, `{"entries": [entry, ...]}`, at big_mm/kernels/tuning.json, or at the path
in $BIG_MM_KERNEL_TUNING. An entry:
  device_kind     jax's `device.device_kind`, e.g. "NVIDIA H100 80GB HBM3"
  implementation  "pallas" | "chunked"
  loss            "sigmoid" | "softmax"
  dim, dtype      the embeddings' feature size and dtype name ("bfloat16")
  batch           the global batch it was timed at
  config          the KernelConfig fields it sets
  ms, peak_GiB    its measured forward+backward time and the process's peak device memory
  versions, date  how it was measured
`lookup` takes this device kind's entries of the implementation, dim and dtype, prefers the
same loss, and among those the batch nearest the asked one (log scale; the largest without a
batch).
"""
from __future__ import annotations

import functools
import json
import math
import os

import jax
import jax.numpy as jnp

ENV = "BIG_MM_KERNEL_TUNING"
DEFAULT_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tuning.json")
KEY = ("device_kind", "implementation", "loss", "dim", "dtype", "batch")


def table_path() -> str:
  return os.environ.get(ENV) or DEFAULT_PATH


@functools.lru_cache(maxsize=8)
def _read(path: str, stamp: tuple[int, int]) -> tuple[dict, ...]:
  del stamp  # (mtime_ns, size): part of the cache key, so a rewritten table is read again
  with open(path) as f:
    try:
      table = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"Kernel tuning table {path} is not valid JSON ({e}); fix or delete it "
                       f"(tools/benchmark_kernels.py autotune --write rewrites it).") from e
  if not isinstance(table, dict) or not isinstance(table.get("entries"), list):
    raise ValueError(f"Kernel tuning table {path} must be {{\"entries\": [...]}}; got "
                     f"{type(table).__name__}. Rewrite it with tools/benchmark_kernels.py "
                     f"autotune --write.")
  return tuple(table["entries"])


def entries(path: str | None = None) -> list[dict]:
  path = path or table_path()
  if not os.path.exists(path):
    return []
  stat = os.stat(path)
  return list(_read(path, (stat.st_mtime_ns, stat.st_size)))


def device_kind(backend: str | None = None) -> str | None:
  """The first device's kind on `backend` (None: the default), or None if there is none."""
  try:
    return jax.devices(backend)[0].device_kind
  except RuntimeError:
    return None


def lookup(implementation: str, *, dim: int, dtype, loss: str | None = None,
           batch: int | None = None, backend: str | None = None,
           path: str | None = None) -> dict:
  """The stored config fields for this device (empty when none match)."""
  kind = device_kind(backend)
  dtype = jnp.dtype(dtype).name
  found = [e for e in entries(path) if e.get("device_kind") == kind
           and e.get("implementation") == implementation and e.get("dim") == dim
           and e.get("dtype") == dtype]
  if loss is not None and any(e.get("loss") == loss for e in found):
    found = [e for e in found if e.get("loss") == loss]
  if not found:
    return {}
  if batch is None:
    best = max(found, key=lambda e: e.get("batch", 0))
  else:
    best = min(found, key=lambda e: abs(math.log(max(e.get("batch", 1), 1) / max(batch, 1))))
  return dict(best["config"])


def record(new: list[dict], path: str | None = None) -> str:
  """Adds entries to the table (replacing any with the same KEY fields); returns its path."""
  path = path or table_path()
  keep = [e for e in entries(path)
          if not any(all(e.get(k) == n.get(k) for k in KEY) for n in new)]
  merged = sorted(keep + list(new), key=lambda e: tuple(str(e.get(k)) for k in KEY))
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump({"entries": merged}, f, indent=1)
    f.write("\n")
  os.replace(tmp, path)
  return path
