"""Checkpoint integrity: big_mm's manifest per step, its verification and the quarantine of
rejected steps, for the step directories that `big_mm.checkpoint.Checkpointer` has orbax write.

* Manifests: as soon as orbax has committed a step (a sync save returned; an async one's
  directory appeared under its final name, which a `ManifestWatch` thread polls for without
  ever blocking training), process 0 writes ``DIRECTORY/<step>/big_mm_manifest.json``: the
  relative path, size and zlib.crc32 of every file in the step (atomically: tmp file +
  os.replace).
* Verification: `StepIntegrity.verify(step)` re-checks them. A step without a manifest (the
  process died in the moment between orbax's commit and the manifest, or a checkpoint written
  before manifests existed) is committed but unverified: `verify` then checks what orbax
  itself recorded (its commit time and the items' metadata); the array data stays unchecked
  until it is read. `write_manifest(step)` adopts such a step after checking it by hand.
  Remote paths (gs://...): no manifests are written and `verify` checks nothing (object stores
  have their own checksums).
* Quarantine: rejected steps are moved aside to ``DIRECTORY/quarantine/`` (kept for
  inspection), so training saves those steps afresh when it reaches them again and no tool
  picks a known-bad step as the latest.
* Multi-host: integrity decisions are process 0's (`agreed_problems` broadcasts its verify
  result), so all processes restore the same step.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
import zlib
from typing import Callable, Optional, Sequence

import jax
from etils import epath

# The items of one step (orbax subdirectories), their metadata files as orbax names them, and
# orbax's step metadata (with the commit time, set just before the commit).
STATE_ITEM = "state"
DATA_ITEM = "data"
_ORBAX_ITEM_METADATA = {STATE_ITEM: "_METADATA", DATA_ITEM: "metadata"}
_ORBAX_STEP_METADATA = "_CHECKPOINT_METADATA"
MANIFEST_NAME = "big_mm_manifest.json"
QUARANTINE_DIRNAME = "quarantine"
MAX_LISTED = 20  # problems / paths listed in one message
_MANIFEST_FORMAT = 1
_COMMIT_POLL_S = 0.05
_CHUNK = 1 << 20


class CheckpointCorruptError(ValueError):
  """A checkpoint step is incomplete or corrupt (fails `Checkpointer.verify`)."""


class CheckpointDirectoryError(OSError):
  """The checkpoint directory cannot be created or written."""


def is_remote(path: str) -> bool:
  return "://" in path


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
  if len(items) <= MAX_LISTED:
    return items
  return items[:MAX_LISTED] + [f"... and {len(items) - MAX_LISTED} more"]


class ManifestWatch:
  """Writes a step's manifest from a background thread as soon as orbax has committed the
  step (its directory appears under its final name), so that a process killed any time
  after the commit leaves a verified step. `finish()`, called once orbax is done with the
  save, makes it look one last time, waits for it and re-raises its error."""

  def __init__(self, step_dir: str, write: Callable[[], None], name: str):
    self._step_dir = step_dir
    self._write = write
    self._stop = threading.Event()
    self._error: Optional[BaseException] = None
    self._thread = threading.Thread(target=self._run, name=name, daemon=True)
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


class StepIntegrity:
  """Manifests, verification and quarantine for the steps under `directory` (see the module
  docstring). `read_only`: never writes manifests or moves steps."""

  def __init__(self, directory: str, *, read_only: bool):
    self.directory = directory
    self.read_only = read_only

  def step_dir(self, step: int) -> str:
    return os.path.join(self.directory, str(int(step)))

  @property
  def manifests_enabled(self) -> bool:
    return not is_remote(self.directory) and not self.read_only

  # -- manifests ----------------------------------------------------------------

  def write_manifest(self, step: int) -> dict:
    """Writes DIRECTORY/<step>/big_mm_manifest.json for the files now in the step directory
    (atomically) and returns it. Local paths only."""
    if is_remote(self.directory):
      raise ValueError(f"Manifests are only supported on local paths, not {self.directory!r}.")
    step = int(step)
    step_dir = self.step_dir(step)
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

  def write_manifest_if_committed(self, step: int) -> None:
    """`write_manifest(step)` once orbax has committed the step; nothing if it never did."""
    if not os.path.isdir(self.step_dir(step)):
      return
    try:
      self.write_manifest(step)
    except FileNotFoundError as e:  # removed while we read it
      logging.info("Checkpoint step %d vanished while writing its manifest: %s", step, e)

  def watch_commit(self, step: int) -> ManifestWatch:
    """Writes the manifest of the async save of `step` from a thread once orbax commits it."""
    return ManifestWatch(self.step_dir(step), lambda: self.write_manifest_if_committed(step),
                         name=f"big_mm_manifest_{step}")

  def has_manifest(self, step: int) -> bool:
    return os.path.exists(os.path.join(self.step_dir(step), MANIFEST_NAME))

  # -- verification -------------------------------------------------------------

  def verify(self, step: int) -> list[str]:
    """Problems with checkpoint `step` ([] = good): an unreadable manifest, files missing, of
    the wrong size or checksum, or not in the manifest; without a manifest, orbax's own commit
    record and metadata. Reads every file of the step (crc32, ~GB/s). Remote paths: []."""
    step = int(step)
    if is_remote(self.directory):
      return []
    step_dir = self.step_dir(step)
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

  def agreed_problems(self, step: int) -> list[str]:
    """`verify(step)` as decided by process 0, so all processes agree."""
    problems = self.verify(step) if jax.process_index() == 0 else []
    if (not problems and jax.process_index() == 0 and not is_remote(self.directory)
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

  def corrupt_error(self, step: int, problems: Sequence[str]) -> CheckpointCorruptError:
    return CheckpointCorruptError(
        f"Checkpoint step {step} in {self.directory!r} is incomplete or corrupt:\n"
        + "\n".join(f"  {p}" for p in problems)
        + "\nUse restore_latest_good() to fall back to an earlier good step.")

  # -- quarantine ---------------------------------------------------------------

  def quarantine(self, steps: Sequence[int]) -> None:
    """Moves rejected `steps` into DIRECTORY/quarantine/ (process 0; every process waits for
    it), so they neither shadow the steps saved after the restored one nor stop this run from
    saving those step numbers again. The caller re-reads the directory afterwards."""
    if jax.process_index() == 0:
      quarantine = epath.Path(self.directory) / QUARANTINE_DIRNAME
      for step in steps:
        target = quarantine / f"{step}.{time.strftime('%Y%m%d-%H%M%S')}.{uuid.uuid4().hex[:6]}"
        try:
          quarantine.mkdir(parents=True, exist_ok=True)
          epath.Path(self.step_dir(step)).rename(target)
        except OSError as e:
          raise CheckpointDirectoryError(
              f"Cannot move the rejected checkpoint step {step} aside to {target}: "
              f"{type(e).__name__}: {e}. Move or delete {self.step_dir(step)} by hand, "
              "then run again.") from e
        logging.warning("Moved the rejected checkpoint step %d aside to %s (inspect it, "
                        "then delete it); this run saves step %d afresh when it gets there.",
                        step, target, step)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("big_mm_checkpoint_quarantine")
