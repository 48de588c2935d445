"""Checkpoints: a thin, explicit wrapper around orbax's `CheckpointManager`.

One checkpoint step holds two items in one composite orbax checkpoint::

    DIRECTORY/<step>/state/   the train-state pytree of jax.Arrays (StandardSave):
                              params, optimizer state, step, rng key data, ...
    DIRECTORY/<step>/data/    the data-iterator state dict (JsonSave), optional

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
* Async saves: with `async_save=True` the device->host copy happens inside
  `save()` (so donating the state to the next step is safe) and the write to
  storage runs in a background thread; the next `save()`, `wait()` and `close()`
  wait for it. A step directory only appears under its final name once orbax has
  committed it, so `latest_step()` never names a partial checkpoint.
* Integrity: as soon as orbax has committed a step (a sync save returned; an async
  one's directory appeared under its final name, which a background thread polls
  for without ever blocking training), process 0 writes
  ``DIRECTORY/<step>/big_mm_manifest.json``: the relative path, size and
  zlib.crc32 of every file in the step (atomically: tmp file + os.replace).
  `verify(step)` re-checks them; `restore()` refuses a step that fails (ValueError)
  and `restore_latest_good()` falls back to the newest step that passes, with a
  warning per rejected step, or raises RuntimeError if none does. A step without a
  manifest (the process died in the moment between orbax's commit and the manifest,
  or a checkpoint written before manifests existed) is committed but unverified:
  `verify` then checks what orbax itself recorded (its commit time and the items'
  metadata) and a read that fails still makes `restore_latest_good` fall back; use
  `write_manifest(step)` to adopt such a step after checking it by hand.
  Remote paths (gs://...): no manifests are written and `verify` checks nothing
  (object stores have their own checksums); orbax read errors still make
  `restore_latest_good` fall back.
* Healing: when a writable Checkpointer's `restore_latest_good()` falls back past
  rejected steps, it moves them aside to ``DIRECTORY/quarantine/`` (kept for
  inspection; delete them when done), so training saves those steps afresh when
  it reaches them again and no tool picks a known-bad step as the latest.
* Multi-host: call every method on every process (orbax synchronises them).
  Integrity decisions are process 0's (its verify result is broadcast), so all
  processes restore the same step.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import zlib
from typing import Any, Mapping, Optional, Sequence

import jax
import orbax.checkpoint as ocp
from etils import epath

__all__ = ["Checkpointer", "CheckpointDirectoryError", "CheckpointCorruptError",
           "CheckpointMismatchError", "STATE_ITEM", "DATA_ITEM", "MANIFEST_NAME",
           "QUARANTINE_DIRNAME"]

STATE_ITEM = "state"
DATA_ITEM = "data"
MANIFEST_NAME = "big_mm_manifest.json"
QUARANTINE_DIRNAME = "quarantine"
# What orbax itself writes into a step: its step metadata (with the commit time, set just
# before the commit) and each item's metadata.
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
_ORBAX_ITEM_METADATA = {STATE_ITEM: "_METADATA", DATA_ITEM: "metadata"}
_COMMIT_POLL_S = 0.05
_MANIFEST_FORMAT = 1
_CHUNK = 1 << 20
_MAX_LISTED = 20


class CheckpointDirectoryError(OSError):
  """The checkpoint directory cannot be created or written."""


class CheckpointCorruptError(ValueError):
  """A checkpoint step is incomplete or corrupt (fails `Checkpointer.verify`)."""


class CheckpointMismatchError(ValueError):
  """The stored tree structure / shapes differ from the expected train state
  (a config change, not corruption: never skipped by `restore_latest_good`)."""


def _crc32_file(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _is_manifest_file(rel: str) -> bool:
  return rel == MANIFEST_NAME or rel.startswith(MANIFEST_NAME + ".tmp")


def _list_files(step_dir: str) -> list[str]:
  """'/'-joined paths of all files under `step_dir`, relative to it, sorted; the
  manifest (and a leftover temporary manifest) excluded."""
  out = []
  for root, dirs, files in os.walk(step_dir):
    dirs.sort()
    for name in files:
      rel = os.path.relpath(os.path.join(root, name), step_dir).replace(os.sep, "/")
      if not _is_manifest_file(rel):
        out.append(rel)
  return sorted(out)


def _orbax_commit_problems(step_dir: str) -> list[str]:
  """What can be checked of a step without big_mm's manifest, from orbax's own records ([]
  = committed): its step metadata carries a commit time and names the items, whose
  metadata files are readable. The array data itself stays unchecked until it is read."""
  def unreadable(name, e):
    return [f"no manifest, and orbax's {name} is unreadable: {type(e).__name__}: {e}"]
  try:
    with open(os.path.join(step_dir, _ORBAX_STEP_METADATA)) as f:
      step_meta = json.load(f)
    committed, items = step_meta.get("commit_timestamp_nsecs"), step_meta.get("item_handlers")
  except (OSError, ValueError, AttributeError) as e:
    return unreadable(_ORBAX_STEP_METADATA, e)
  if not committed:
    return [f"no manifest, and orbax's {_ORBAX_STEP_METADATA} records no commit"]
  if not isinstance(items, dict) or STATE_ITEM not in items:
    return [f"no manifest, and orbax's {_ORBAX_STEP_METADATA} names no {STATE_ITEM!r} item"]
  problems = []
  for item, name in _ORBAX_ITEM_METADATA.items():
    if item not in items:
      continue
    try:
      with open(os.path.join(step_dir, item, name)) as f:
        item_meta = json.load(f)
    except (OSError, ValueError) as e:
      problems += unreadable(f"{item}/{name}", e)
      continue
    ocdbt_root = os.path.join(step_dir, item, "manifest.ocdbt")
    if isinstance(item_meta, dict) and item_meta.get("use_ocdbt") and not os.path.isfile(
        ocdbt_root):
      problems.append(f"no manifest, and orbax's {item}/manifest.ocdbt is missing")
  return problems


def _capped(items: list[str]) -> list[str]:
  if len(items) <= _MAX_LISTED:
    return items
  return items[:_MAX_LISTED] + [f"... and {len(items) - _MAX_LISTED} more"]


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


class _ManifestWatch:
  """Writes a step's manifest from a background thread as soon as orbax has committed the
  step (its directory appears under its final name), so that a process killed any time
  after the commit leaves a verified step. `finish()`, called once orbax is done with the
  save, makes it look one last time, waits for it and re-raises its error."""

  def __init__(self, checkpointer: "Checkpointer", step: int):
    self._step_dir = checkpointer._step_dir(step)  # pylint: disable=protected-access
    self._write = lambda: checkpointer._write_manifest_if_present(step)  # pylint: disable=protected-access
    self._stop = threading.Event()
    self._error: Optional[BaseException] = None
    self._thread = threading.Thread(target=self._run, name=f"big_mm_manifest_{step}",
                                    daemon=True)
    self._thread.start()

  def _run(self) -> None:
    try:
      while not os.path.isdir(self._step_dir):
        if self._stop.wait(_COMMIT_POLL_S):
          break
      self._write()  # nothing if the save never committed
    except BaseException as e:  # pylint: disable=broad-except
      self._error = e

  def finish(self) -> None:
    self._stop.set()
    self._thread.join()
    if self._error is not None:
      raise self._error


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
    self.read_only = bool(read_only)
    # The thread waiting for an async save to commit to write its manifest (see `save`).
    self._manifest_watch: Optional[_ManifestWatch] = None

  # -- queries -------------------------------------------------------------

  def all_steps(self) -> list[int]:
    """Committed checkpoint steps, ascending."""
    return sorted(int(s) for s in self._mngr.all_steps())

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
      if self._manifests_enabled() and jax.process_index() == 0:
        if self.async_save:
          self._manifest_watch = _ManifestWatch(self, step)
        else:  # committed already
          self._write_manifest_if_present(step)
    return bool(saved)

  def _finish_pending_save(self) -> None:
    """Waits for an async save in flight (raising if it failed) and for its manifest."""
    watch, self._manifest_watch = self._manifest_watch, None
    try:
      self._mngr.wait_until_finished()
    finally:
      if watch is not None:
        watch.finish()

  # -- integrity -------------------------------------------------------------

  def _step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  def _manifests_enabled(self) -> bool:
    return not _is_remote(self.directory) and not self.read_only

  def _write_manifest_if_present(self, step: int) -> None:
    if not os.path.isdir(self._step_dir(step)):  # never committed
      return
    try:
      self.write_manifest(step)
    except FileNotFoundError as e:  # removed while we read it
      logging.info("Checkpoint step %d vanished while writing its manifest: %s", step, e)

  def write_manifest(self, step: int) -> dict:
    """Writes DIRECTORY/<step>/big_mm_manifest.json for the files now in the step
    directory (atomically) and returns it. Called automatically after each save
    commits; call it by hand only to adopt a step you have checked otherwise
    (e.g. written before manifests existed). Local paths only."""
    if _is_remote(self.directory):
      raise ValueError(f"Manifests are only supported on local paths, not {self.directory!r}.")
    step = int(step)
    step_dir = self._step_dir(step)
    t0 = time.perf_counter()
    files = {}
    for rel in _list_files(step_dir):
      path = os.path.join(step_dir, rel)
      files[rel] = {"size": os.path.getsize(path), "crc32": _crc32_file(path)}
    manifest = {"format": _MANIFEST_FORMAT, "step": step, "files": files}
    final = os.path.join(step_dir, MANIFEST_NAME)
    tmp = f"{final}.tmp.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    try:
      with open(tmp, "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
      os.replace(tmp, final)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    try:  # make the rename durable
      fd = os.open(step_dir, os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    except OSError:
      pass
    logging.info("Wrote manifest for checkpoint step %d (%d files, %d bytes) in %.3fs.",
                 step, len(files), sum(v["size"] for v in files.values()),
                 time.perf_counter() - t0)
    return manifest

  def has_manifest(self, step: int) -> bool:
    """Whether `step` has big_mm's manifest (local paths; see `verify`)."""
    return os.path.exists(os.path.join(self._step_dir(step), MANIFEST_NAME))

  def verify(self, step: int) -> list[str]:
    """Problems with checkpoint `step` ([] = good): an unreadable manifest, files
    missing, of the wrong size or checksum, or not in the manifest.

    Reads every file of the step (crc32, ~GB/s). A step without a manifest
    (committed but unverified, see the module docstring) is checked against
    orbax's own records instead: a commit time and readable item metadata.
    On remote paths (gs://...) no manifests exist and this returns [] (nothing
    checked).
    """
    step = int(step)
    if _is_remote(self.directory):
      return []
    step_dir = self._step_dir(step)
    if not os.path.isdir(step_dir):
      return [f"step directory {step_dir} does not exist"]
    manifest_path = os.path.join(step_dir, MANIFEST_NAME)
    if not os.path.exists(manifest_path):
      return _orbax_commit_problems(step_dir)
    try:
      with open(manifest_path) as f:
        manifest = json.load(f)
      expected = manifest["files"]
      if not isinstance(expected, dict):
        raise TypeError("'files' is not a mapping")
    except (OSError, ValueError, KeyError, TypeError) as e:
      return [f"manifest unreadable: {type(e).__name__}: {e}"]
    problems = []
    present = set(_list_files(step_dir))
    for rel in sorted(expected):
      want = expected[rel]
      path = os.path.join(step_dir, rel)
      if rel not in present:
        problems.append(f"missing file {rel}")
        continue
      try:
        size = os.path.getsize(path)
        if size != want["size"]:
          problems.append(f"size mismatch {rel}: {size} bytes, manifest says {want['size']}")
        elif _crc32_file(path) != want["crc32"]:
          problems.append(f"checksum mismatch {rel} (same size {size}; contents changed)")
      except OSError as e:
        problems.append(f"unreadable file {rel}: {type(e).__name__}: {e}")
    for rel in sorted(present - set(expected)):
      problems.append(f"extra file {rel} (not in manifest)")
    return _capped(problems)

  def _agreed_problems(self, step: int) -> list[str]:
    """`verify(step)` as decided by process 0, so all processes agree."""
    problems = self.verify(step) if jax.process_index() == 0 else []
    if (not problems and jax.process_index() == 0 and not _is_remote(self.directory)
        and not self.has_manifest(step)):
      logging.warning(
          "Checkpoint step %d in %s has no big_mm manifest (the process stopped between "
          "orbax's commit and the manifest, or the step predates manifests); orbax's "
          "commit record and metadata are intact, so it is used unverified (file "
          "checksums unchecked).", step, self.directory)
    if jax.process_count() > 1:
      import numpy as np
      from jax.experimental import multihost_utils
      bad = int(multihost_utils.broadcast_one_to_all(np.int32(1 if problems else 0)))
      if bad and not problems:
        problems = ["rejected by process 0's integrity check (see its log)"]
      elif not bad:
        problems = []
    return problems

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

  def _check_abstract(self, abstract_state: Any) -> None:
    missing_sharding = [
        _path_str(p) for p, x in
        jax.tree_util.tree_flatten_with_path(abstract_state)[0]
        if getattr(x, "sharding", None) is None]
    if missing_sharding:
      raise ValueError(
          "abstract_state leaves need a .sharding so the state is restored "
          f"directly sharded; missing for: {missing_sharding[:_MAX_LISTED]}")

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    problems = _tree_mismatches(self.stored_shapes(step), _flat_shapes(abstract_state))
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

  def _corrupt_error(self, step: int, problems: Sequence[str]) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"Checkpoint step {step} in {self.directory!r} is incomplete or corrupt:\n"
        + "\n".join(f"  {p}" for p in problems)
        + "\nUse restore_latest_good() to fall back to an earlier good step.")

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
    step = self._check_step(step)
    self._check_abstract(abstract_state)
    problems = self._agreed_problems(step)
    if problems:
      raise self._corrupt_error(step, problems)
    self._check_shapes(step, abstract_state)
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
      problems = self._agreed_problems(step)
      if not problems:
        try:
          self._check_shapes(step, abstract_state)  # mismatch: propagates
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
          self._quarantine([s for s, _ in rejected])
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

  def _quarantine(self, steps: Sequence[int]) -> None:
    """Moves rejected `steps` into DIRECTORY/quarantine/ (process 0; then every process
    re-reads the directory), so they neither shadow the steps saved after the restored one
    nor stop this run from saving those step numbers again."""
    if jax.process_index() == 0:
      quarantine = epath.Path(self.directory) / QUARANTINE_DIRNAME
      for step in steps:
        target = quarantine / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
        try:
          quarantine.mkdir(parents=True, exist_ok=True)
          epath.Path(self._step_dir(step)).rename(target)
        except OSError as e:
          raise CheckpointDirectoryError(
              f"Cannot move the rejected checkpoint step {step} aside to {target}: "
              f"{type(e).__name__}: {e}. Move or delete {self._step_dir(step)} by hand, "
              "then run again.") from e
        logging.warning("Moved the rejected checkpoint step %d aside to %s (inspect it, "
                        "then delete it); this run saves step %d afresh when it gets there.",
                        step, target, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("big_mm_checkpoint_quarantine")
    self._mngr.reload()

  def restore_params(self, step: Optional[int] = None) -> Any:
    """The `params` subtree stored at `step`, replicated, whatever the rest of that run's
    state (optimizer, ...) was: for initialising one run from another (e.g. LiT)."""
    self._finish_pending_save()
    step = self._check_step(step)
    problems = self._agreed_problems(step)
    if problems:
      raise self._corrupt_error(step, problems)
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
