"""Checkpoints: a thin, explicit wrapper around orbax's `CheckpointManager`.

One checkpoint step holds two items in one composite orbax checkpoint::

    DIRECTORY/<step>/state/   the train-state pytree of jax.Arrays (StandardSave):
                              params, optimizer state, step, rng key data, ...
    DIRECTORY/<step>/data/    the data-iterator state dict (JsonSave), optional

Usage in the trainer::

    ckpt = Checkpointer(workdir + "/checkpoints", keep=3, save_every_steps=1000)
    abstract = jax.eval_shape(init) with shardings   # ShapeDtypeStructs + .sharding
    if (step := ckpt.latest_step()) is not None:
      state, data_state = ckpt.restore(step, abstract)   # restored already sharded
    ...
    ckpt.save(step, state, data_state=it.get_state())     # no-op off the interval
    ...
    ckpt.save(final_step, state, data_state=..., force=True)
    ckpt.close()                                          # waits for async saves

Notes:

* PRNG keys: store ``jax.random.key_data(key)`` (a uint32 array) in the state and
  rebuild with ``jax.random.wrap_key_data`` after restore; typed key arrays are
  not supported here.
* Restoring: `abstract_state` is a pytree of `jax.ShapeDtypeStruct` WITH
  `.sharding`; orbax reads each shard straight into the requested sharding, so a
  checkpoint written on one mesh / sharding can be restored onto another (e.g.
  replicated). dtypes may differ (orbax casts); tree structure and shapes may not:
  they are checked against the checkpoint's stored metadata before reading
  anything, and a mismatch raises ValueError naming the parameter paths.
* Async saves: with `async_save=True` the device->host copy happens inside
  `save()` (so donating the state to the next step is safe) and the write to
  storage runs in a background thread; the next `save()`, `wait()` and `close()`
  wait for it. A step directory only appears under its final name once committed,
  so `latest_step()` never names a partial checkpoint.
* Multi-host: call every method on every process (orbax synchronises them).
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Mapping, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "CheckpointDirectoryError", "STATE_ITEM", "DATA_ITEM"]

STATE_ITEM = "state"
DATA_ITEM = "data"
_MAX_LISTED = 20


class CheckpointDirectoryError(OSError):
  """The checkpoint directory cannot be created or written."""


def _is_remote(path: str) -> bool:
  return "://" in path


def _check_directory(directory: str) -> None:
  """Creates `directory` and checks it is writable; raises CheckpointDirectoryError."""
  try:
    if _is_remote(directory):
      epath.Path(directory).mkdir(parents=True, exist_ok=True)
      return  # object stores: no cheap, reliable write probe; orbax reports errors
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(
        directory, f".write_probe.{jax.process_index()}.{uuid.uuid4().hex}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointDirectoryError(
        f"Checkpoint directory {directory!r} cannot be created or written: "
        f"{type(e).__name__}: {e}. Choose a writable --workdir (and check that no "
        "file exists where a directory is expected).") from e


def _key_str(k: Any) -> str:
  for attr in ("key", "name", "idx"):  # DictKey, GetAttrKey, SequenceKey/Flattened
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _path_str(path: Sequence[Any]) -> str:
  return "/".join(_key_str(k) for k in path) or "<root>"


def _flat_shapes(tree: Any, is_leaf=None) -> dict[str, Optional[tuple[int, ...]]]:
  leaves, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  out = {}
  for path, leaf in leaves:
    shape = getattr(leaf, "shape", None)
    out[_path_str(path)] = None if shape is None else tuple(int(d) for d in shape)
  return out


def _is_metadata_leaf(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _fmt_shape(shape) -> str:
  return "?" if shape is None else str(tuple(shape))


def _tree_mismatches(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  problems = []
  missing = [p for p in wanted if p not in stored]
  unexpected = [p for p in stored if p not in wanted]
  shape = [p for p in wanted
           if p in stored and stored[p] is not None and wanted[p] is not None
           and tuple(stored[p]) != tuple(wanted[p])]
  for p in shape[:_MAX_LISTED]:
    problems.append(f"  shape mismatch {p}: checkpoint {_fmt_shape(stored[p])}, "
                    f"expected {_fmt_shape(wanted[p])}")
  for p in missing[:_MAX_LISTED]:
    problems.append(f"  missing from checkpoint: {p} (expected shape "
                    f"{_fmt_shape(wanted[p])})")
  for p in unexpected[:_MAX_LISTED]:
    problems.append(f"  only in checkpoint: {p} (shape {_fmt_shape(stored[p])})")
  n_more = (len(shape) + len(missing) + len(unexpected)) - len(problems)
  if n_more > 0:
    problems.append(f"  ... and {n_more} more")
  return problems


class Checkpointer:
  """Saves/restores (train state, data-iterator state) with orbax.

  Args:
    directory: where step directories go (local path or gs://...). Created and
      checked for writability at construction (before any compute):
      CheckpointDirectoryError names the path and the OS error.
    keep: keep the latest `keep` checkpoints (None keeps all).
    save_every_steps: `save()` writes only at multiples of this (or with
      force=True). Preemption saves (orbax's multi-host preemption sync point)
      are also honoured.
    async_save: write to storage in a background thread.
  """

  def __init__(self, directory: str, *, keep: Optional[int] = 3,
               save_every_steps: int, async_save: bool = True, read_only: bool = False):
    directory = os.fspath(directory)
    if not _is_remote(directory):
      directory = os.path.abspath(directory)
    if int(save_every_steps) <= 0:
      raise ValueError(f"save_every_steps must be positive, got {save_every_steps}")
    if keep is not None and int(keep) <= 0:
      raise ValueError(f"keep must be positive or None, got {keep}")
    if read_only:
      if not epath.Path(directory).exists():
        raise FileNotFoundError(f"No checkpoint directory {directory!r}.")
    else:
      _check_directory(directory)
    self.directory = directory
    self.keep = keep
    self.save_every_steps = int(save_every_steps)
    self.async_save = bool(async_save)

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.StandardSave)
    registry.add(STATE_ITEM, ocp.args.StandardRestore)
    registry.add(DATA_ITEM, ocp.args.JsonSave)
    registry.add(DATA_ITEM, ocp.args.JsonRestore)
    policies = ocp.checkpoint_managers
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(self.save_every_steps),
            policies.PreemptionCheckpointingPolicy(),
        ]),
        preservation_policy=policies.LatestN(None if keep is None else int(keep)),
        enable_async_checkpointing=self.async_save,
        create=not read_only,
        read_only=read_only,
        cleanup_tmp_directories=not read_only,
    )
    self._mngr = ocp.CheckpointManager(
        directory, options=options, handler_registry=registry)

  # -- queries -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed checkpoint steps, ascending."""
    return sorted(int(s) for s in self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(int(step))

  # -- save ----------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: Optional[Mapping] = None,
           force: bool = False) -> bool:
    """Saves `state` (and `data_state`) at `step` if due (or `force`).

    Returns True if a save was started. A step that already has a checkpoint
    is not overwritten (returns False), so a final forced save at a step that
    was just saved periodically is harmless.
    """
    step = int(step)
    if step in self._mngr.all_steps():
      logging.info("Checkpoint for step %d already exists in %s; not saving.",
                   step, self.directory)
      return False
    items = {STATE_ITEM: ocp.args.StandardSave(state)}
    if data_state is not None:
      items[DATA_ITEM] = ocp.args.JsonSave(dict(data_state))
    try:
      saved = self._mngr.save(step, args=ocp.args.Composite(**items), force=force)
    except ocp.checkpoint_manager.StepAlreadyExistsError:  # e.g. still in flight
      return False
    if saved:
      logging.info("Saving checkpoint for step %d to %s%s.", step, self.directory,
                   " (async)" if self.async_save else "")
    return bool(saved)

  # -- restore -------------------------------------------------------------

  def _check_step(self, step: Optional[int]) -> int:
    steps = self.all_steps()
    if step is None:
      if not steps:
        raise ValueError(f"No checkpoints found in {self.directory!r}.")
      return steps[-1]
    step = int(step)
    if step not in steps:
      raise ValueError(
          f"No checkpoint for step {step} in {self.directory!r}. Available "
          f"steps: {steps if steps else 'none'}.")
    return step

  def stored_shapes(self, step: Optional[int] = None) -> dict[str, tuple]:
    """{'/'-joined param path: shape} of the train state stored at `step`."""
    step = self._check_step(step)
    meta = self._mngr.item_metadata(step)[STATE_ITEM]
    tree = getattr(meta, "tree", meta)
    return _flat_shapes(tree, is_leaf=_is_metadata_leaf)

  def restore(self, step: Optional[int], abstract_state: Any
              ) -> tuple[Any, Optional[dict]]:
    """Restores (state, data_state) at `step` (None = latest).

    `abstract_state`: pytree of jax.ShapeDtypeStruct with `.sharding` set, e.g.
    ``jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    jax.eval_shape(init), shardings)``. The state is returned as jax.Arrays with
    those shardings and dtypes. data_state is None if none was saved.

    Raises ValueError if the step does not exist (listing available steps) or if
    the stored tree structure / shapes differ from `abstract_state` (naming the
    mismatched parameter paths and shapes).
    """
    self._mngr.wait_until_finished()
    step = self._check_step(step)
    missing_sharding = [
        _path_str(p) for p, x in
        jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        if getattr(x, "sharding", None) is None]
    if missing_sharding:
      raise ValueError(
          "abstract_state leaves need a .sharding so the state is restored "
          f"directly sharded; missing for: {missing_sharding[:_MAX_LISTED]}")

    stored = self.stored_shapes(step)
    wanted = _flat_shapes(abstract_state)
    problems = _tree_mismatches(stored, wanted)
    if problems:
      raise ValueError(
          f"Checkpoint step {step} in {self.directory!r} does not match the "
          "expected train state (tree structure or shapes differ; did the model "
          "or optimizer config change?):\n" + "\n".join(problems))

    item_names = set(self._mngr.item_metadata(step).keys())
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    has_data = DATA_ITEM in item_names
    if has_data:
      items[DATA_ITEM] = ocp.args.JsonRestore()
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    data_state = restored[DATA_ITEM] if has_data else None
    return restored[STATE_ITEM], data_state

  def restore_params(self, step: Optional[int] = None) -> Any:
    """The `params` subtree stored at `step`, replicated, whatever the rest of that run's
    state (optimizer, ...) was: for initialising one run from another (e.g. LiT)."""
    step = self._check_step(step)
    meta = self._mngr.item_metadata(step)[STATE_ITEM]
    tree = getattr(meta, "tree", meta)
    if "params" not in tree:
      raise ValueError(f"Checkpoint step {step} in {self.directory!r} has no params.")
    replicated = jax.sharding.NamedSharding(
        jax.sharding.Mesh(jax.devices(), ("devices",)), jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
        tree, is_leaf=_is_metadata_leaf)
    restored = self._mngr.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(abstract)}))
    return restored[STATE_ITEM]["params"]

  # -- lifecycle -----------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending async saves are committed."""
    self._mngr.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax resources."""
    self._mngr.wait_until_finished()
    self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
