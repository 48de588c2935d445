"""What big_mm's command-line tools share (big_mm.train, big_mm.evaluate, tools/export.py): the
usage text, `--list_configs`, user errors without tracebacks, and the run's stored config.

A user error (a bad config, path, data spec, checkpoint or export target: `USER_ERRORS`) ends
the command with its message and exit code 1, without a traceback; `--debug` (or the
environment variable BIG_MM_DEBUG=1) shows the traceback too. Any other exception is a bug in
big_mm and keeps its traceback.

big_mm.train writes the resolved config to WORKDIR/config.json (`write_config`), so that
big_mm.evaluate and tools/export.py need only the workdir (`config_for_workdir`).
"""
from __future__ import annotations

import ast
import json
import logging
import os
import sys
import traceback
from typing import Any, Callable

from etils import epath

from big_mm import checkpoint as checkpoint_lib
from big_mm import config as config_lib
from big_mm import sharding
from big_mm.export.common import ExportError
from big_mm.input import files, pipeline, sources

log = logging.getLogger("big_mm")

CONFIG_FILENAME = "config.json"
DEBUG_ENV = "BIG_MM_DEBUG"
REPO_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "configs")

# Errors whose message is the whole story for the user (what is wrong, what to do).
USER_ERRORS = (
    config_lib.ConfigError,  # bad config (keys, values, durations, model kwargs)
    sharding.ShardingError,  # mesh / batch size that do not fit the devices
    sources.SpecError, sources.DatasetNotFound, files.FilesNotFound,  # data specs and paths
    pipeline.SourceFailed,  # a source whose records are mostly bad
    checkpoint_lib.CheckpointMismatchError, checkpoint_lib.CheckpointCorruptError,
    checkpoint_lib.CheckpointDirectoryError,
    ExportError,  # a model the export target cannot represent, bad import files
    FileNotFoundError,  # a missing tokenizer, workdir, checkpoint step, init.path
    FloatingPointError,  # nan_policy="stop" stopped the run (the last good state is saved)
)

_RECIPES_SHOWN = (os.path.join(os.path.relpath(REPO_CONFIGS), "") if os.path.isdir(REPO_CONFIGS)
                  else "configs/")
CONFIG_SYNTAX = f"""\
Configs:
  --config PATH.py[:ARG]  a recipe: a Python file whose get_config(arg) returns the config;
                          ARG is the file's own argument string, e.g. configs/demo.py:steps=300
                          (each recipe's docstring lists its arguments).
  --config.a.b=VALUE      overrides one key (VALUE is a Python literal where it parses, else a
                          string: --config.optim.lr=1e-3, --config.input.data='tar:/d/*.tar').
                          Every key is checked against the schema (big_mm/config.py) first.
  Recipes live in {_RECIPES_SHOWN}; list them with: python -m big_mm.train --list_configs
  A run stores its resolved config in WORKDIR/{CONFIG_FILENAME}.

Errors: a user error (config, path, data, checkpoint, export target) prints its message and
exits 1; add --debug (or set {DEBUG_ENV}=1) for the traceback."""


def usage(doc: str) -> str:
  return f"{doc.strip()}\n\n{CONFIG_SYNTAX}\n"


def list_configs(directory: str | None = None) -> str:
  """One line per recipe in `directory` (default: the repo's configs/): its path and the first
  line of its docstring. Files are parsed, not run; those without get_config() are left out."""
  directory = directory or (REPO_CONFIGS if os.path.isdir(REPO_CONFIGS) else "configs")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"No recipe directory {directory!r}; give one: --list_configs=DIR.")
  rows = []
  for name in sorted(os.listdir(directory)):
    path = os.path.join(directory, name)
    if not name.endswith(".py") or name.startswith("_"):
      continue
    with open(path, encoding="utf-8") as f:
      module = ast.parse(f.read(), path)
    if not any(isinstance(node, ast.FunctionDef) and node.name == "get_config"
               for node in module.body):
      continue
    doc = (ast.get_docstring(module) or "").strip()
    rows.append((os.path.relpath(path), doc.splitlines()[0] if doc else ""))
  width = max((len(path) for path, _ in rows), default=0)
  return "\n".join(f"{path:<{width}}  {summary}" for path, summary in rows)


def main(run: Callable[[dict[str, str], dict[str, Any]], int], argv: list[str], *, doc: str,
         flags: tuple[str, ...], required: tuple[str, ...] = ()) -> int:
  """A tool's entry point: `run(flags, overrides)` with --help, --debug, --list_configs, the
  flag checks and user errors handled. `flags`: the tool's own flags; `required`: those it
  cannot run without. Returns the exit code."""
  from big_mm import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  if any(arg in ("-h", "--help", "-help") for arg in argv):
    print(usage(doc))
    return 0
  debug = os.environ.get(DEBUG_ENV, "").lower() in ("1", "true", "yes")
  try:
    parsed, overrides = config_lib.parse_command_line(argv)
    debug = debug or parsed.pop("debug", "false").lower() in ("1", "true", "yes")
    if "list_configs" in parsed:
      value = parsed["list_configs"]
      print(list_configs(None if value == "true" else value))
      return 0
    unknown = sorted(set(parsed) - set(flags))
    missing = sorted(set(required) - set(parsed))
    if unknown or missing:
      problem = "; ".join(filter(None, [
          f"unknown flag(s) {', '.join('--' + f for f in unknown)}" if unknown else "",
          f"missing {', '.join('--' + f for f in missing)}" if missing else ""]))
      print(f"{problem[0].upper()}{problem[1:]}. Valid flags: "
            f"{', '.join('--' + f for f in flags)}, --debug, --help.\nRun with --help for "
            "the usage.", file=sys.stderr)
      return 2
    metrics_lib.setup_logging()
    return run(parsed, overrides)
  except USER_ERRORS as e:
    if debug:
      traceback.print_exc()
    print(f"Error: {e}", file=sys.stderr)
    if not debug:
      print(f"(A user error: no traceback shown; add --debug or set {DEBUG_ENV}=1 for it.)",
            file=sys.stderr)
    return 1


def int_flag(flags: dict[str, str], name: str) -> int | None:
  if name not in flags:
    return None
  try:
    return int(flags[name])
  except ValueError:
    raise config_lib.ConfigError(f"--{name} must be an integer, got {flags[name]!r}.") from None


# ---------------------------------------------------------------------------------------
# The run's stored config.

def _jsonable(value):
  if isinstance(value, dict):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if value is None or isinstance(value, (bool, int, float, str)):
    return value
  raise config_lib.ConfigError(
      f"The config holds {value!r} ({type(value).__name__}), which {CONFIG_FILENAME} cannot "
      "store: use numbers, strings, None, tuples and dicts in configs.")


def _tuples(value):
  """JSON lists back to the tuples configs use (the schema has no lists)."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def write_config(config, workdir: str) -> str:
  """Writes the whole resolved config to WORKDIR/config.json (replaced atomically)."""
  path = epath.Path(workdir) / CONFIG_FILENAME
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.parent / f"{CONFIG_FILENAME}.tmp.{os.getpid()}"
  tmp.write_text(json.dumps(_jsonable(config.to_dict()), indent=2) + "\n")
  tmp.replace(path)
  return os.fspath(path)


def read_config(workdir: str) -> config_lib.ConfigDict | None:
  """The config stored in WORKDIR/config.json (as written, not validated), or None."""
  path = epath.Path(workdir) / CONFIG_FILENAME
  if not path.exists():
    return None
  try:
    return config_lib.ConfigDict(_tuples(json.loads(path.read_text())))
  except json.JSONDecodeError as e:
    raise config_lib.ConfigError(f"{os.fspath(path)} is not valid JSON ({e}); pass the run's "
                                 "--config instead.") from None


def config_for_workdir(workdir: str, spec: str | None, overrides: dict[str, Any]):
  """The config of the run in `workdir`, for a tool that reads it (evaluate, export): the
  `--config` spec when given, else the stored WORKDIR/config.json; command-line overrides on
  top. Logs the keys that differ from the stored config."""
  stored = read_config(workdir)
  if spec is None and stored is None:
    if not epath.Path(workdir).exists():
      raise FileNotFoundError(f"Workdir {workdir!r} does not exist.")
    raise FileNotFoundError(
        f"{workdir!r} has no {CONFIG_FILENAME} (runs store it since big_mm.train wrote one): "
        "pass the run's --config (and its overrides) as for training.")
  config = config_lib.load(stored if spec is None else spec, overrides)
  if stored is not None and (spec is not None or overrides):
    changes = config_lib.diff(config_lib.load(stored), config)
    if changes:
      log.info("Using a config that differs from the run's stored %s in:\n%s", CONFIG_FILENAME,
               config_lib.format_diff(changes))
  return config


def restore_params(workdir: str, step: int | None, abstract_params=None):
  """(params, step) of the run's checkpoint at `step` (default: the newest). No checkpoint:
  FileNotFoundError; no checkpoint for `step`: ConfigError listing the steps there are."""
  directory = os.path.join(workdir, "checkpoints")
  if not epath.Path(directory).is_dir():
    raise FileNotFoundError(f"No checkpoints in workdir {workdir!r} (no {directory!r}); train "
                            "first with python -m big_mm.train, or check --workdir.")
  ckpt = checkpoint_lib.Checkpointer(directory, keep=None, save_every_steps=1,
                                     async_save=False, read_only=True)
  try:
    steps = ckpt.all_steps()
    if not steps:
      raise FileNotFoundError(f"No checkpoint in {directory!r} yet; train first.")
    if step is not None and step not in steps:
      raise config_lib.ConfigError(f"No checkpoint for step {step} in {directory!r}; available "
                                   f"steps: {steps}. Give one of them as --step.")
    step = steps[-1] if step is None else step
    return ckpt.restore_params(step, abstract_params), step
  finally:
    ckpt.close()
