"""Mesh, logical-axis rules, param and batch shardings, multi-host initialisation."""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from big_mm import tree_paths

BATCH_AXES = ("data", "fsdp", "expert")

# Logical axis -> mesh axis (or tuple, or None). Flax uses each mesh axis at most once per
# array, first rule first: activations' "batch" takes (data, fsdp, expert) so their "embed"
# stays unsharded, while params (which have no "batch") shard "embed" over fsdp. "expert": the
# experts dimension of mixture-of-experts params and of the tokens dispatched to them, over the
# `expert` mesh axis (size 1 unless config.mesh.expert says otherwise); the dispatched tokens'
# groups ("expert_group") stay over (data, fsdp), so dispatching them is an all-to-all within
# each expert-axis row of devices (big_mm/models/moe.py).
DEFAULT_RULES = (
    ("batch", BATCH_AXES),
    ("expert_group", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("kv", None),
    ("length", None),
    ("patch", None),
    ("layers", None),
)


class ShardingError(ValueError):
  """A mesh or batch layout that cannot work with the devices at hand."""


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves the config's axis sizes (one may be -1 = the rest) against the device count."""
  sizes = {name: int(size) for name, size in mesh_cfg.items()}
  rest = [name for name, size in sizes.items() if size == -1]
  if len(rest) > 1:
    raise ShardingError(f"Only one mesh axis may be -1; got {rest} in mesh {sizes}.")
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if num_devices % fixed:
    raise ShardingError(
        f"Mesh {sizes} needs a multiple of {fixed} devices, but there are {num_devices}. "
        f"Change config.mesh so the fixed axis sizes divide {num_devices}.")
  if rest:
    sizes[rest[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ShardingError(f"Mesh {sizes} uses {fixed} devices but there are {num_devices}; "
                        "set one axis to -1 to take the rest.")
  return sizes


def make_mesh(mesh_cfg, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A GSPMD-style (Auto axes) mesh with the config's axes, in config order, over `devices`
  (default: all devices)."""
  devices = list(devices) if devices is not None else jax.devices()
  sizes = mesh_shape(mesh_cfg, len(devices))
  names = tuple(sizes)
  return jax.make_mesh(tuple(sizes.values()), names, axis_types=(AxisType.Auto,) * len(names),
                       devices=devices)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  return tuple(a for a in BATCH_AXES if a in mesh.axis_names)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over the data-parallel axes; the rest replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, process_count: int | None = None) -> None:
  process_count = process_count or jax.process_count()
  shards = math.prod(mesh.shape[a] for a in batch_axes(mesh))
  if batch_size % shards:
    raise ShardingError(
        f"batch_size={batch_size} does not divide over the data axes "
        f"{ {a: mesh.shape[a] for a in batch_axes(mesh)} } ({shards} shards). "
        f"Use a multiple of {shards} or change config.mesh.")
  if batch_size % process_count:
    raise ShardingError(f"batch_size={batch_size} does not divide over {process_count} processes.")


def rules(config_rules, mesh: Mesh | None = None) -> tuple[tuple[str, Any], ...]:
  """The logical-axis rules (config.sharding_rules, None: DEFAULT_RULES); with `mesh`, mesh
  axes it lacks are dropped from them (a hand-made mesh without `expert`, say)."""
  out = DEFAULT_RULES if config_rules is None else tuple(
      (name, tuple(axes) if isinstance(axes, list) else axes) for name, axes in config_rules)
  if mesh is None:
    return out

  def present(axes):
    if axes is None or isinstance(axes, str):
      return axes if axes in mesh.axis_names else None
    kept = tuple(a for a in axes if a in mesh.axis_names)
    return kept or None

  return tuple((name, present(axes)) for name, axes in out)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes of size 1 and axes that do not divide a dimension (replicated instead)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    kept = []
    for name in names:
      size = mesh.shape[name]
      if size > 1 and dim % (size * math.prod(mesh.shape[k] for k in kept)) == 0:
        kept.append(name)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


def unbox(tree: Any) -> Any:
  """Flax logical-partitioning boxes -> plain values (no sharding constraint applied)."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.LogicallyPartitioned)
      else nn.meta.unbox(x), tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def logical_shardings(abstract_boxed: Any, mesh: Mesh, config_rules=None) -> Any:
  """Shardings for a pytree produced by `jax.eval_shape(model.init, ...)` (boxed leaves).

  Leaves without logical names (or with names that map nowhere) are replicated.
  """
  specs = nn.get_partition_spec(abstract_boxed)
  mesh_specs = nn.logical_to_mesh(specs, rules(config_rules, mesh))
  shapes = unbox(abstract_boxed)
  return jax.tree.map(
      lambda spec, leaf: NamedSharding(mesh, _fit_spec(spec, leaf.shape, mesh)),
      mesh_specs, shapes, is_leaf=lambda x: isinstance(x, P))


def shardings_like(tree: Any, mesh: Mesh, params: Any, param_shardings: Any) -> Any:
  """Shardings for state that mirrors the params (optimizer state, an objective's extra state
  such as an EMA copy): a leaf whose key path ends with a param's path (and has its shape) gets
  that param's sharding, as optax states mirror the param tree (adam's mu/nu). Anything else
  (counts, factored statistics) is replicated.
  """
  by_path = {}
  for (path, leaf), sharding in zip(jax.tree_util.tree_leaves_with_path(params),
                                    jax.tree.leaves(param_shardings)):
    by_path[tree_paths.dict_keys(path)] = (tuple(leaf.shape), sharding)

  def pick(path, leaf):
    keys = tree_paths.dict_keys(path)
    for start in range(len(keys)):
      shape_sharding = by_path.get(keys[start:])
      if shape_sharding and shape_sharding[0] == tuple(getattr(leaf, "shape", ())):
        return shape_sharding[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, *,
                                 force: bool = False,
                                 heartbeat_timeout_s: int = 100) -> None:
  """`jax.distributed.initialize` for multi-process runs; a no-op for single-process runs
  (where it would fail).

  It is called when given a coordinator or process count, when `force` (`--distributed`:
  let JAX detect the cluster, e.g. on a Cloud TPU VM pod slice), or when the environment
  names a coordinator (JAX_COORDINATOR_ADDRESS), a SLURM job step with several tasks, or
  several TPU workers (TPU_WORKER_HOSTNAMES).
  A process that stops answering for `heartbeat_timeout_s` makes the others fail instead of
  waiting forever. `BIG_MM_CPU_COLLECTIVES=gloo` enables cross-process CPU collectives
  (local multi-process testing, see tools/launch_local.py).
  """
  env = os.environ
  if env.get("BIG_MM_CPU_COLLECTIVES"):
    jax.config.update("jax_cpu_collectives_implementation", env["BIG_MM_CPU_COLLECTIVES"])
  multi_slurm = int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env
  multi_tpu = len(env.get("TPU_WORKER_HOSTNAMES", "localhost").split(",")) > 1
  if not (force or coordinator_address or num_processes or env.get("JAX_COORDINATOR_ADDRESS")
          or multi_slurm or multi_tpu):
    return
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_s)
