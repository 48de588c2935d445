"""Checkpoints: an explicit wrapper around orbax's `CheckpointManager`.

One checkpoint step holds two items in one composite orbax checkpoint::

    DIRECTORY/<step>/state/   the train-state pytree of jax.Arrays (StandardSave):
                              params, optimizer state, step, rng key data, ...
    DIRECTORY/<step>/data/    the data-iterator state dict (JsonSave), optional
    DIRECTORY/<step>/big_mm_manifest.json   sizes and CRC32s of the step's files

Usage in the trainer::

    ckpt = Checkpointer(workdir + "/checkpoints", keep=3, save_every_steps=1000)
    abstract = jax.eval_shape(init) with shardings   # ShapeDtypeStructs + .sharding
    if (got := ckpt.restore_latest_good(abstract)) is not None:  # skips corrupt steps
      step, state, data_state = got                       # restored already sharded
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
  `restore_params` reads the params subtree alone (evaluation, init from another run,
  export): the optimizer state and data-iterator state stay on disk.
* Async saves: with `async_save=True` the device->host copy happens inside
  `save()` (so donating the state to the next step is safe) and the write to
  storage runs in a background thread; the next `save()`, `wait()` and `close()`
  wait for it. A step directory only appears under its final name once orbax has
  committed it, so `latest_step()` never names a partial checkpoint.
* Integrity (big_mm/checkpoint_integrity.py): each committed step gets a manifest;
  `verify(step)` re-checks it (a step without one is committed but unverified: orbax's
  own records are checked instead); `restore()` refuses a step that fails
  (CheckpointCorruptError) and `restore_latest_good()` falls back to the newest step that
  passes and reads, with a warning per rejected step, or raises RuntimeError if none does.
  When a writable Checkpointer falls back, the rejected steps are moved aside to
  ``DIRECTORY/quarantine/``. Remote paths (gs://...): no manifests; orbax read errors still
  make `restore_latest_good` fall back.
* Multi-host: call every method on every process (orbax synchronises them).
  Integrity decisions are process 0's, so all processes restore the same step.
"""
from __future__ import annotations

import logging
import os
import uuid
from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath

from big_mm import tree_paths
from big_mm.checkpoint_integrity import (DATA_ITEM, MANIFEST_NAME, MAX_LISTED,
                                         QUARANTINE_DIRNAME, STATE_ITEM,
                                         CheckpointCorruptError, CheckpointDirectoryError,
                                         ManifestWatch, StepIntegrity, is_remote)

__all__ = ["Checkpointer", "CheckpointDirectoryError", "CheckpointCorruptError",
           "CheckpointMismatchError", "STATE_ITEM", "DATA_ITEM", "MANIFEST_NAME",
           "QUARANTINE_DIRNAME"]

PARAMS = "params"  # the train state's subtree that `restore_params` reads


class CheckpointMismatchError(ValueError):
  """The stored tree structure / shapes differ from the expected train state
  (a config change, not corruption: never skipped by `restore_latest_good`)."""


def _check_directory(directory: str) -> None:
  """Creates `directory` and checks it is writable; raises CheckpointDirectoryError."""
  try:
    if is_remote(directory):
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


def _is_metadata_leaf(x: Any) -> bool:
  return hasattr(x, "shape") and hasattr(x, "dtype")


def _flat_shapes(tree: Any, is_leaf=None) -> dict[str, Optional[tuple[int, ...]]]:
  out = {}
  for name, leaf in tree_paths.flat_dict(tree, is_leaf=is_leaf).items():
    shape = getattr(leaf, "shape", None)
    out[name or "<root>"] = None if shape is None else tuple(int(d) for d in shape)
  return out


def _fmt_shape(shape) -> str:
  return "?" if shape is None else str(tuple(shape))


def _tree_mismatches(stored: Mapping[str, Any], wanted: Mapping[str, Any]) -> list[str]:
  problems = []
  missing = [p for p in wanted if p not in stored]
  unexpected = [p for p in stored if p not in wanted]
  shape = [p for p in wanted
           if p in stored and stored[p] is not None and wanted[p] is not None
           and tuple(stored[p]) != tuple(wanted[p])]
  for p in shape[:MAX_LISTED]:
    problems.append(f"  shape mismatch {p}: checkpoint {_fmt_shape(stored[p])}, "
                    f"expected {_fmt_shape(wanted[p])}")
  for p in missing[:MAX_LISTED]:
    problems.append(f"  missing from checkpoint: {p} (expected shape "
                    f"{_fmt_shape(wanted[p])})")
  for p in unexpected[:MAX_LISTED]:
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
    read_only: for reading another run's checkpoints: creates, deletes, quarantines and
      writes (manifests included) nothing.
  """

  def __init__(self, directory: str, *, keep: Optional[int] = 3,
               save_every_steps: int, async_save: bool = True, read_only: bool = False):
    directory = os.fspath(directory)
    if not is_remote(directory):
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
    self.read_only = bool(read_only)

    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    registry.add(STATE_ITEM, ocp.args.StandardSave)
    registry.add(STATE_ITEM, ocp.args.StandardRestore)
    registry.add(STATE_ITEM, ocp.args.PyTreeRestore)  # partial restores (`restore_params`)
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
    self._integrity = StepIntegrity(directory, read_only=self.read_only)
    # The thread waiting for an async save to commit to write its manifest (see `save`).
    self._manifest_watch: Optional[ManifestWatch] = None

  # -- queries -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed checkpoint steps, ascending."""
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def reached_preemption(self, step: int) -> bool:
    """True once the JAX preemption-sync service says every process reached its preemption
    point (multi-host TPU/GPU maintenance events); the trainer then saves and exits."""
    return self._mngr.reached_preemption(int(step))

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(int(step))

  # -- save ----------------------------------------------------------------

  def save(self, step: int, state: Any, data_state: Optional[Mapping] = None,
           force: bool = False) -> bool:
    """Saves `state` (and `data_state`) at `step` if due (or `force`).

    Returns True if a save was started. A step that already has a checkpoint
    is not overwritten (returns False), so a final forced save at a step that
    was just saved periodically is harmless. The step's manifest is written as
    soon as orbax commits it: here for a sync save, from a background thread for
    an async one.
    """
    step = int(step)
    if not (force or self._mngr.should_save(step)):
      return False
    self._finish_pending_save()  # orbax would wait for it too
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
      if self._integrity.manifests_enabled and jax.process_index() == 0:
        if self.async_save:
          self._manifest_watch = self._integrity.watch_commit(step)
        else:  # committed already
          self._integrity.write_manifest_if_committed(step)
    return bool(saved)

  def _finish_pending_save(self) -> None:
    """Waits for an async save in flight (raising if it failed) and for its manifest."""
    watch, self._manifest_watch = self._manifest_watch, None
    try:
      self._mngr.wait_until_finished()
    finally:
      if watch is not None:
        watch.finish()

  # -- integrity (big_mm/checkpoint_integrity.py) ---------------------------

  def write_manifest(self, step: int) -> dict:
    """Writes DIRECTORY/<step>/big_mm_manifest.json for the files now in the step
    directory (atomically) and returns it. Called automatically after each save
    commits; call it by hand only to adopt a step you have checked otherwise
    (e.g. written before manifests existed). Local paths only."""
    return self._integrity.write_manifest(step)

  def has_manifest(self, step: int) -> bool:
    """Whether `step` has big_mm's manifest (local paths; see `verify`)."""
    return self._integrity.has_manifest(step)

  def verify(self, step: int) -> list[str]:
    """Problems with checkpoint `step` ([] = good): an unreadable manifest, files
    missing, of the wrong size or checksum, or not in the manifest.

    Reads every file of the step (crc32, ~GB/s). A step without a manifest
    (committed but unverified, see big_mm/checkpoint_integrity.py) is checked against
    orbax's own records instead: a commit time and readable item metadata.
    On remote paths (gs://...) no manifests exist and this returns [] (nothing
    checked).
    """
    return self._integrity.verify(step)

  def _verified_step(self, step: Optional[int]) -> int:
    """`step` (None = latest) once it exists and passes `verify` (as process 0 decides)."""
    step = self._check_step(step)
    problems = self._integrity.agreed_problems(step)
    if problems:
      raise self._integrity.corrupt_error(step, problems)
    return step

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

  def _stored_tree(self, step: int) -> Any:
    """The train state's stored metadata tree (shapes and dtypes, no data)."""
    meta = self._mngr.item_metadata(step)[STATE_ITEM]
    return getattr(meta, "tree", meta)

  def stored_shapes(self, step: Optional[int] = None) -> dict[str, tuple]:
    """{'/'-joined param path: shape} of the train state stored at `step`."""
    step = self._check_step(step)
    return _flat_shapes(self._stored_tree(step), is_leaf=_is_metadata_leaf)

  def _check_abstract(self, abstract_state: Any) -> None:
    missing_sharding = [
        name for name, x in tree_paths.flat_dict(abstract_state).items()
        if getattr(x, "sharding", None) is None]
    if missing_sharding:
      raise ValueError(
          "abstract_state leaves need a .sharding so the state is restored "
          f"directly sharded; missing for: {missing_sharding[:MAX_LISTED]}")

  def _check_shapes(self, step: int, abstract: Any, stored_tree: Any) -> None:
    problems = _tree_mismatches(_flat_shapes(stored_tree, is_leaf=_is_metadata_leaf),
                                _flat_shapes(abstract))
    if problems:
      raise CheckpointMismatchError(
          f"Checkpoint step {step} in {self.directory!r} does not match the "
          "expected train state (tree structure or shapes differ; did the model "
          "or optimizer config change?):\n" + "\n".join(problems))

  def _read(self, step: int, abstract_state: Any) -> tuple[Any, Optional[dict]]:
    item_names = set(self._mngr.item_metadata(step).keys())
    items = {STATE_ITEM: ocp.args.StandardRestore(abstract_state)}
    has_data = DATA_ITEM in item_names
    if has_data:
      items[DATA_ITEM] = ocp.args.JsonRestore()
    restored = self._mngr.restore(step, args=ocp.args.Composite(**items))
    data_state = restored[DATA_ITEM] if has_data else None
    return restored[STATE_ITEM], data_state

  def restore(self, step: Optional[int], abstract_state: Any
              ) -> tuple[Any, Optional[dict]]:
    """Restores (state, data_state) at `step` (None = latest).

    `abstract_state`: pytree of jax.ShapeDtypeStruct with `.sharding` set, e.g.
    ``jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
    jax.eval_shape(init), shardings)``. The state is returned as jax.Arrays with
    those shardings and dtypes. data_state is None if none was saved.

    Raises ValueError if the step does not exist (listing available steps),
    CheckpointCorruptError (a ValueError) if it fails `verify` (listing the
    problems; no fallback, see `restore_latest_good`), or
    CheckpointMismatchError (a ValueError) if the stored tree structure / shapes
    differ from `abstract_state` (naming the mismatched parameter paths and shapes).
    """
    self._finish_pending_save()
    self._check_abstract(abstract_state)
    step = self._verified_step(step)
    self._check_shapes(step, abstract_state, self._stored_tree(step))
    return self._read(step, abstract_state)

  def restore_latest_good(self, abstract_state: Any
                          ) -> Optional[tuple[int, Any, Optional[dict]]]:
    """Restores the newest checkpoint step that is intact: (step, state, data_state).

    Walks committed steps newest first. A step that fails `verify` (missing /
    truncated / changed / extra files; without a manifest, broken orbax records) or
    whose files orbax fails to read is skipped with a WARNING naming the step and
    why, and the previous one is tried. The skipped steps are then moved aside to
    DIRECTORY/quarantine/ (unless read_only), so that saving those steps again
    writes them afresh. Returns None if there are no checkpoints at all. Raises
    RuntimeError listing every step tried and why it was rejected if none is good
    (moving nothing), and CheckpointMismatchError (a ValueError) at once if an
    intact step's tree structure / shapes differ from `abstract_state` (a config
    change, not corruption). `abstract_state` as for `restore`.
    """
    self._finish_pending_save()
    self._check_abstract(abstract_state)
    steps = self.all_steps()
    if not steps:
      return None
    rejected: list[tuple[int, list[str]]] = []
    for step in reversed(steps):
      problems = self._integrity.agreed_problems(step)
      if not problems:
        try:
          self._check_shapes(step, abstract_state, self._stored_tree(step))  # propagates
          state, data_state = self._read(step, abstract_state)
        except CheckpointMismatchError:
          raise
        except Exception as e:  # pylint: disable=broad-except
          problems = [f"reading it failed: {type(e).__name__}: {e}"]
      if problems:
        logging.warning(
            "Checkpoint step %d in %s is incomplete or corrupt; skipping it and "
            "trying the previous one:\n%s", step, self.directory,
            "\n".join(f"  {p}" for p in problems))
        rejected.append((step, problems))
        continue
      if rejected:
        logging.warning(
            "Restored checkpoint step %d from %s, falling back past rejected newer "
            "step(s) %s.", step, self.directory, [s for s, _ in rejected])
        if not self.read_only:
          self._integrity.quarantine([s for s, _ in rejected])
          self._mngr.reload()  # the moved steps are gone from orbax's step list
      return step, state, data_state
    lines = []
    for step, problems in rejected:
      lines.append(f"  step {step}:")
      lines.extend(f"    {p}" for p in problems)
    raise RuntimeError(
        f"No good checkpoint in {self.directory!r}: all {len(rejected)} step(s) "
        "are incomplete or corrupt:\n" + "\n".join(lines) +
        "\nRefusing to load them. Move the directory aside to start from scratch, "
        "or repair / restore a step from a backup.")

  def restore_params(self, step: Optional[int] = None,
                     abstract_params: Any = None) -> Any:
    """The `params` subtree stored at `step` (None = latest), read alone: the rest of that
    run's state (optimizer, ...) and its data-iterator state are never read, whatever they
    hold. For evaluating a run, initialising one run from another (e.g. LiT) and exports.

    `abstract_params`: ShapeDtypeStructs with `.sharding` (e.g. the params of the evaluating
    run's abstract train state): restored with those shardings and dtypes, shapes checked as
    in `restore` (CheckpointMismatchError). None: as stored, replicated on every device.
    Raises as `restore` does for a missing or corrupt step.
    """
    self._finish_pending_save()
    step = self._verified_step(step)
    stored = self._stored_tree(step)
    if PARAMS not in stored:
      raise ValueError(f"Checkpoint step {step} in {self.directory!r} has no {PARAMS}.")
    if abstract_params is None:
      replicated = jax.sharding.NamedSharding(
          jax.sharding.Mesh(jax.devices(), ("devices",)), jax.sharding.PartitionSpec())
      abstract_params = jax.tree.map(
          lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype, sharding=replicated),
          stored[PARAMS], is_leaf=_is_metadata_leaf)
    else:
      self._check_abstract(abstract_params)
      self._check_shapes(step, {PARAMS: abstract_params}, {PARAMS: stored[PARAMS]})
    item = {PARAMS: abstract_params}
    restored = self._mngr.restore(step, args=ocp.args.Composite(**{
        STATE_ITEM: ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True)}))
    return restored[STATE_ITEM][PARAMS]

  # -- lifecycle -----------------------------------------------------------

  def wait(self) -> None:
    """Blocks until pending async saves are committed (and their manifests written)."""
    self._finish_pending_save()

  def close(self) -> None:
    """Waits for pending saves and their manifests, releases orbax resources."""
    try:
      self._finish_pending_save()
    finally:
      self._mngr.close()

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
