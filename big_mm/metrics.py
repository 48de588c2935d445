"""Metric writing, progress lines, throughput and MFU — without TensorFlow.

`clu.metric_writers` imports TensorFlow, so big_mm writes its own metrics:

* `MetricWriter` appends one JSON object per `write()` to ``WORKDIR/metrics.jsonl``
  (flushed per write, so it survives a crash; a restarted run first drops the rows of
  the steps it redoes, then appends) and writes TensorBoard scalars through
  `tensorboardX` into ``WORKDIR/tb``. `read_jsonl` reads the file back (tolerating a
  truncated last line) and `read_tb_scalars` reads the TensorBoard event files back
  (no TF needed).
* `Progress` prints one readable console line per call, with an ETA from a moving
  average of recent step times that leaves out the first (compile) interval.
* `Throughput` measures examples/s, step time and the fraction of wall time spent
  waiting for the input pipeline.
* `mfu`, `device_peak_flops`, `compiled_flops`: model FLOPs utilisation.

Typical use in the trainer::

    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    progress = Progress(total_steps, start_step=first_step)
    tput = Throughput()
    for step in range(first_step + 1, total_steps + 1):
      with tput.data_wait():
        batch = next(it)
      state, m = train_step(state, batch)
      if step % log_every == 0:
        m = jax.device_get(m)            # blocks, so step_time is real compute
        m.update(tput.step_done(step, batch_size))
        writer.write(step, m)
        progress.update(step, m)
"""
from __future__ import annotations

import collections
import contextlib
import datetime
import glob
import json
import math
import logging
import numbers
import os
import struct
import time
from typing import Any, Callable, Iterator, Mapping, Optional

import numpy as np

__all__ = [
    "MetricWriter",
    "read_jsonl",
    "read_tb_scalars",
    "Progress",
    "Throughput",
    "mfu",
    "device_peak_flops",
    "compiled_flops",
    "PEAK_BF16_FLOPS",
]

METRICS_FILENAME = "metrics.jsonl"
TEXT_FILENAME = "text.jsonl"
TB_DIRNAME = "tb"

_NONFINITE_TO_STR = {math.inf: "inf", -math.inf: "-inf"}
_STR_TO_NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def _to_python_scalar(key: str, value: Any):
  """Converts a metric value (python/numpy/jax scalar) to a python int/float/bool."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, numbers.Integral):
    return int(value)
  if isinstance(value, numbers.Real):
    return float(value)
  arr = np.asarray(value)  # works for jax.Array (fetches) and numpy scalars
  if arr.size != 1:
    raise ValueError(
        f"Metric {key!r} must be a scalar, got an array of shape {arr.shape}. "
        "Reduce it (e.g. mean) before writing.")
  item = arr.reshape(()).item()
  if isinstance(item, (bool, int, float)):
    return item
  raise ValueError(f"Metric {key!r} has non-numeric value {value!r}.")


def _json_safe(value):
  """NaN/Inf are not valid JSON: write them as the strings "nan", "inf", "-inf"."""
  if isinstance(value, float) and not math.isfinite(value):
    return "nan" if math.isnan(value) else _NONFINITE_TO_STR[value]
  return value


class MetricWriter:
  """Writes scalar metrics to WORKDIR/metrics.jsonl and TensorBoard (WORKDIR/tb).

  Args:
    workdir: run directory (local path; created if missing).
    enabled: when False every method is a no-op and no files are created. In a
      multi-host run pass ``jax.process_index() == 0``.

  Each `write(step, metrics)` appends ``{"step": step, **metrics}`` as one JSON
  line and flushes it; floats are written as Python floats, and non-finite
  values as the strings "nan" / "inf" / "-inf" (so the file stays valid JSON;
  `read_jsonl` turns them back into floats). A restarted run appends to the
  same file (if the previous run died mid-line, a newline is inserted first).

  `resume_step`: the step a (re)started training run continues from. The rows of
  later steps, left by an earlier run that stopped before checkpointing them and
  about to be written again, are first removed from metrics.jsonl and text.jsonl
  (atomically: tmp file + os.replace) and TensorBoard is told to hide its later
  scalars (`purge_step`), so that each step appears once. None (the default, e.g.
  for evaluating a checkpoint) only appends.
  """

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: Optional[int] = None):
    self.workdir = os.fspath(workdir)
    self.enabled = bool(enabled)
    self.jsonl_path = os.path.join(self.workdir, METRICS_FILENAME)
    self.text_path = os.path.join(self.workdir, TEXT_FILENAME)
    self.tb_dir = os.path.join(self.workdir, TB_DIRNAME)
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    try:
      os.makedirs(self.tb_dir, exist_ok=True)
      if resume_step is not None:
        for path in (self.jsonl_path, self.text_path):
          _drop_records_after(path, int(resume_step))
      self._jsonl = _open_append(self.jsonl_path)
    except OSError as e:
      raise OSError(
          f"Cannot write metrics under workdir {self.workdir!r}: {e}") from e
    # Imported lazily so that disabled writers (non-zero hosts) need nothing.
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    self._tb = SummaryWriter(
        logdir=self.tb_dir, flush_secs=30,
        purge_step=None if resume_step is None else int(resume_step) + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends one JSON line and writes TensorBoard scalars for `metrics`."""
    if not self.enabled:
      return
    if self._jsonl is None:
      raise RuntimeError("MetricWriter.write() after close().")
    step = int(step)
    record = {"step": step}
    scalars = {}
    for key, value in metrics.items():
      key = str(key)
      if key == "step":
        continue
      if isinstance(value, str):
        record[key] = value
        continue
      value = _to_python_scalar(key, value)
      record[key] = _json_safe(value)
      scalars[key] = float(value)
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    self._jsonl.flush()
    for key, value in scalars.items():
      self._tb.add_scalar(key, value, global_step=step)
    self._tb.flush()

  def write_text(self, step: int, key: str, text: str) -> None:
    """Writes a text summary (TensorBoard text tab and WORKDIR/text.jsonl)."""
    if not self.enabled:
      return
    if self._tb is None:
      raise RuntimeError("MetricWriter.write_text() after close().")
    with _open_append(self.text_path) as f:
      f.write(json.dumps({"step": int(step), str(key): str(text)}) + "\n")
    self._tb.add_text(str(key), str(text), global_step=int(step))
    self._tb.flush()

  def flush(self) -> None:
    if self._jsonl is not None:
      self._jsonl.flush()
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

  def __enter__(self) -> "MetricWriter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def _open_append(path: str):
  """Opens `path` for appending; fixes a truncated last line of a crashed run."""
  needs_newline = False
  if os.path.exists(path) and os.path.getsize(path) > 0:
    with open(path, "rb") as f:
      f.seek(-1, os.SEEK_END)
      needs_newline = f.read(1) != b"\n"
  f = open(path, "a", encoding="utf-8")
  if needs_newline:
    f.write("\n")
    f.flush()
  return f


def _is_partial_record(line: str) -> bool:
  """A JSON object cut off by a crash (see `read_jsonl`)."""
  return line.lstrip().startswith("{") and not line.rstrip().endswith("}")


def rewrite_jsonl(path: str, edit: Callable[[dict], Optional[dict]]) -> int:
  """Rewrites the JSONL file at `path` (atomically) with each record passed through `edit`
  (None: drop it; the same object: keep its line as it is). Partial lines left by a crash
  go; other lines that do not parse stay for read_jsonl to report. -> records changed or
  dropped (0: the file is left untouched)."""
  if not os.path.exists(path):
    return 0
  with open(path, "r", encoding="utf-8") as f:
    lines = [line for line in f.read().split("\n") if line.strip()]
  kept, changed = [], 0
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if _is_partial_record(line):
        changed += 1
      else:
        kept.append(line)
      continue
    new = edit(record) if isinstance(record, dict) else record
    if new is not record:
      changed += 1
      if new is None:
        continue
      line = json.dumps(new)
    kept.append(line)
  if changed:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
      f.write("".join(line + "\n" for line in kept))
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  return changed


def _drop_records_after(path: str, step: int) -> None:
  """Drops the records of steps after `step` (and partial lines left by a crash)."""
  def edit(record):
    after = isinstance(record.get("step"), int) and record["step"] > step
    return None if after else record

  dropped = rewrite_jsonl(path, edit)
  if dropped:
    logging.getLogger("big_mm").info(
        "Dropped %d record(s) of steps after %d from %s (the resumed run redoes "
        "them).", dropped, step, path)


def _decode_nonfinite(value):
  if isinstance(value, str) and value in _STR_TO_NONFINITE:
    return _STR_TO_NONFINITE[value]
  return value


def read_jsonl(path: str) -> list[dict]:
  """Reads a metrics JSONL file into a list of dicts.

  "nan"/"inf"/"-inf" strings are turned back into floats. Blank lines are
  skipped. Lines that are not valid JSON are skipped only if they are the last
  line of the file, or are followed by a newline that a restarted writer added
  (i.e. a crash left a partial line); a bad line in the middle of the file, i.e.
  real corruption, raises ValueError naming the line number.
  """
  with open(path, "r", encoding="utf-8") as f:
    lines = f.read().split("\n")
  records = []
  last = len(lines) - 1
  while last >= 0 and not lines[last].strip():
    last -= 1
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      # A truncated record is a partial JSON object: tolerate it anywhere a crash
      # could have left it (the writer starts a new line after it on restart).
      if i == last or _is_partial_record(line):
        continue
      raise ValueError(f"{path}:{i + 1}: invalid JSON line: {e}") from e
    if not isinstance(record, dict):
      raise ValueError(f"{path}:{i + 1}: expected a JSON object, got {record!r}")
    records.append({k: _decode_nonfinite(v) for k, v in record.items()})
  return records


def _iter_tfrecords(path: str) -> Iterator[bytes]:
  """Yields raw records of a TFRecord file (CRCs are not checked)."""
  with open(path, "rb") as f:
    while True:
      header = f.read(12)
      if len(header) < 12:
        return
      (length,) = struct.unpack("<Q", header[:8])
      data = f.read(length)
      if len(data) < length:
        return
      f.read(4)  # data crc
      yield data


def read_tb_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
  """Reads scalar summaries from all event files in `logdir` (no TF needed).

  Returns {tag: [(step, value), ...]} in file order. As in TensorBoard, a restart
  marker (SessionLog.START at step s, written for `MetricWriter(resume_step=s - 1)`)
  hides the values read before it at steps >= s.
  """
  from tensorboardX.proto import event_pb2  # pylint: disable=g-import-not-at-top
  out: dict[str, list[tuple[int, float]]] = collections.defaultdict(list)
  for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents*"))):
    for raw in _iter_tfrecords(path):
      event = event_pb2.Event()
      event.ParseFromString(raw)
      if (event.HasField("session_log")
          and event.session_log.status == event_pb2.SessionLog.START):
        for tag, values in out.items():
          out[tag] = [(s, v) for s, v in values if s < event.step]
        continue
      if not event.HasField("summary"):
        continue
      for v in event.summary.value:
        if v.HasField("simple_value"):
          out[v.tag].append((int(event.step), float(v.simple_value)))
        elif v.HasField("tensor") and v.tensor.float_val:
          out[v.tag].append((int(event.step), float(v.tensor.float_val[0])))
  return dict(out)


# ---------------------------------------------------------------------------
# Console progress.


def _fmt_duration(seconds: float) -> str:
  if seconds is None or not math.isfinite(seconds):
    return "?"
  return str(datetime.timedelta(seconds=int(round(max(seconds, 0.0)))))


def _fmt_value(key: str, value: Any) -> str:
  if isinstance(value, str):
    return value
  try:
    value = _to_python_scalar(key, value)
  except ValueError:
    return str(value)
  if isinstance(value, bool):
    return str(value)
  if isinstance(value, int):
    return str(value)
  if not math.isfinite(value):
    return str(value)
  if key == "lr" or key.startswith(("lr/", "lr_")) or key.endswith(
      ("/lr", "learning_rate")):
    return f"{value:.1e}"
  return f"{value:.4g}"


class Progress:
  """Prints a readable progress line per `update(step, metrics)` call, e.g.

      step 120/1000 (12.0%) | loss 0.4123 | lr 1.0e-03 | 812 ex/s | 0.15 s/step
        | elapsed 0:00:21 | ETA 0:02:34

  ``examples_per_sec`` and ``step_time`` from the metrics (e.g. from `Throughput`)
  are shown as "ex/s" and "s/step"; other scalar metrics as "name value".
  The ETA uses a moving average (the last `window` intervals between calls) of
  the time per step, excluding the first interval — from construction to the
  first call — which contains compilation. Until a second call, the first
  interval is used as a (pessimistic) estimate.

  Args:
    total_steps: the last step of the run.
    start_step: the step the run starts (or resumes) from.
    log: called with each line (default `print`; e.g. `logging.info`).
    window: number of recent intervals averaged for the ETA.
    max_metrics: show at most this many other metrics (keeps lines readable).
  """

  def __init__(self, total_steps: int, *, start_step: int = 0,
               log: Callable[[str], Any] = print, window: int = 20,
               max_metrics: int = 8, clock: Callable[[], float] = time.perf_counter):
    self.total_steps = int(total_steps)
    self.start_step = int(start_step)
    self.log = log
    self.max_metrics = max_metrics
    self._clock = clock
    self._t0 = clock()
    self._last_time = self._t0
    self._last_step = self.start_step
    self._first_interval: Optional[tuple[float, int]] = None
    self._intervals: collections.deque = collections.deque(maxlen=window)

  def seconds_per_step(self) -> Optional[float]:
    """Moving-average seconds per step (None before any update)."""
    samples = list(self._intervals)
    if not samples and self._first_interval is not None:
      samples = [self._first_interval]
    dt = sum(s[0] for s in samples)
    n = sum(s[1] for s in samples)
    return dt / n if n > 0 else None

  def eta_seconds(self, step: int) -> Optional[float]:
    sps = self.seconds_per_step()
    return None if sps is None else sps * max(self.total_steps - int(step), 0)

  def update(self, step: int, metrics: Optional[Mapping[str, Any]] = None) -> str:
    """Records `step`, builds the progress line, passes it to `log`, returns it."""
    now = self._clock()
    step = int(step)
    dsteps = step - self._last_step
    if dsteps > 0:
      interval = (now - self._last_time, dsteps)
      if self._first_interval is None:
        self._first_interval = interval
      else:
        self._intervals.append(interval)
    self._last_time, self._last_step = now, step
    line = self.format_line(step, metrics or {}, elapsed=now - self._t0)
    if self.log is not None:
      self.log(line)
    return line

  def format_line(self, step: int, metrics: Mapping[str, Any], *,
                  elapsed: float) -> str:
    total = max(self.total_steps, 1)
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / total:.1f}%)"]
    metrics = dict(metrics)
    eps = metrics.pop("examples_per_sec", None)
    step_time = metrics.pop("step_time", None)
    for name in ("steps_per_sec", "data_wait_fraction"):
      metrics.pop(name, None)
    ordered = [k for k in ("loss", "lr") if k in metrics]
    ordered += [k for k in metrics if k not in ("loss", "lr")]
    for key in ordered[: self.max_metrics]:
      parts.append(f"{key} {_fmt_value(key, metrics[key])}")
    if eps is not None:
      parts.append(f"{float(np.asarray(eps)):.0f} ex/s")
    if step_time is None:
      step_time = self.seconds_per_step()
    if step_time is not None:
      parts.append(f"{float(np.asarray(step_time)):.3g} s/step")
    parts.append(f"elapsed {_fmt_duration(elapsed)}")
    parts.append(f"ETA {_fmt_duration(self.eta_seconds(step))}")
    return " | ".join(parts)


# ---------------------------------------------------------------------------
# Throughput.


class Throughput:
  """Examples/s, step time and input-pipeline wait fraction between calls.

  Wrap the fetch of each batch in ``with tput.data_wait():`` (or call
  `data_start()` / `data_end()`), and call `step_done(step, num_examples)`
  whenever you want numbers (every step or every log interval). Each call
  reports on the interval since the previous call (or since construction /
  `reset()`), so the first call includes compilation.

  Note: with JAX's asynchronous dispatch the wall time between calls reflects
  device compute only if something blocks in between (e.g. fetching metrics with
  `jax.device_get` before calling `step_done`).

  `num_examples` is the number of examples per step (the global batch size);
  the interval's example count is num_examples * (steps advanced).
  """

  def __init__(self, *, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self.reset()

  def reset(self, step: Optional[int] = None) -> None:
    self._last_time = self._clock()
    self._last_step = step
    self._wait = 0.0
    self._data_t0: Optional[float] = None

  def data_start(self) -> None:
    self._data_t0 = self._clock()

  def data_end(self) -> None:
    if self._data_t0 is None:
      raise RuntimeError("Throughput.data_end() without data_start().")
    self._wait += self._clock() - self._data_t0
    self._data_t0 = None

  @contextlib.contextmanager
  def data_wait(self):
    """Context manager around fetching the next batch."""
    self.data_start()
    try:
      yield
    finally:
      self.data_end()

  def step_done(self, step: int, num_examples: int) -> dict[str, float]:
    now = self._clock()
    step = int(step)
    dsteps = 1 if self._last_step is None else step - self._last_step
    dsteps = max(dsteps, 1)
    dt = max(now - self._last_time, 1e-12)
    wait = self._wait
    self._last_time, self._last_step, self._wait = now, step, 0.0
    return {
        "examples_per_sec": float(num_examples) * dsteps / dt,
        "steps_per_sec": dsteps / dt,
        "step_time": dt / dsteps,
        "data_wait_fraction": float(min(max(wait / dt, 0.0), 1.0)),
    }


# ---------------------------------------------------------------------------
# MFU.

# bf16 dense peak FLOP/s per chip (TPU) or per GPU, from vendor data sheets.
# Ordered: the first key contained in the device_kind (lower-cased) wins.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6 lite", 918e12),   # v6e (Trillium)
    ("tpu v6e", 918e12),
    ("tpu v5 lite", 197e12),   # v5e
    ("tpu v5e", 197e12),
    ("tpu v5p", 459e12),
    ("tpu v5", 459e12),        # jax reports v5p as "TPU v5"
    ("tpu v4", 275e12),
    ("h200", 989e12),
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),          # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("a100", 312e12),
)


def device_peak_flops(device: Any = None) -> Optional[float]:
  """bf16 dense peak FLOP/s of one device, or None if unknown (e.g. CPU).

  `device` is a jax Device, a device_kind string, or None (jax.devices()[0]).
  """
  if device is None:
    import jax  # pylint: disable=g-import-not-at-top
    device = jax.devices()[0]
  kind = device if isinstance(device, str) else getattr(device, "device_kind", "")
  kind = str(kind).lower()
  for key, flops in PEAK_BF16_FLOPS:
    if key in kind:
      return flops
  return None


def mfu(flops_per_step: Optional[float], step_time: Optional[float],
        peak_flops: Optional[float]) -> Optional[float]:
  """Model FLOPs utilisation = flops_per_step / step_time / peak_flops.

  `flops_per_step` and `peak_flops` must count the same devices: either both
  per device (e.g. `compiled_flops` of an SPMD program, which XLA reports per
  device, with `device_peak_flops`) or both for the whole mesh. Returns None if
  any input is missing or step_time/peak is not positive.
  """
  if flops_per_step is None or step_time is None or peak_flops is None:
    return None
  if step_time <= 0 or peak_flops <= 0:
    return None
  return float(flops_per_step) / float(step_time) / float(peak_flops)


def compiled_flops(compiled: Any) -> Optional[float]:
  """FLOPs of a compiled jax computation from `cost_analysis()`, or None.

  `compiled` is e.g. ``jax.jit(f).lower(*args).compile()``. cost_analysis() may
  return a dict, a list of dicts (one per program; summed), None, or raise on
  backends without support — all handled.
  """
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if analysis is None:
    return None
  if isinstance(analysis, Mapping):
    analysis = [analysis]
  total, found = 0.0, False
  try:
    for entry in analysis:
      if not isinstance(entry, Mapping):
        continue
      value = entry.get("flops")
      if value is None:
        continue
      value = float(value)
      if math.isfinite(value) and value >= 0:
        total += value
        found = True
  except TypeError:
    return None
  return total if found else None


def setup_logging() -> None:
  """Console logging for the command-line tools: big_mm at INFO, libraries at WARNING.

  `force`: absl (imported by grain / orbax) installs its own root handler.
  """
  logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(message)s",
                      datefmt="%H:%M:%S", force=True)
  logging.getLogger("big_mm").setLevel(logging.INFO)
