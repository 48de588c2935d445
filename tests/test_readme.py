"""Every shell block in README.md runs as written, on the bundled data.

Each ```bash block runs in a sandbox: cwd the repo root, TFDS_DATA_DIR the session's built
digits (`data/build_demo.py`'s output), absolute /tmp/... and /data/... paths moved into a
temporary directory, where data/shards/{00000..00099}.tar and data/val/00000.tar hold digits
in img2dataset's layout (for the "your own data" example). Training commands run 2 steps:
`python -m big_mm.train` gets `--config.total_steps=2` (the recipe's warmup scales with it; the
README's own flags come after, so they still apply). Blocks run in README order, so a
block may use what an earlier one wrote (the demo's workdir).

A block too slow for this (installs, the test suite, full demo trainings) carries a marker on
the line before it:

  <!-- readme-test: skip: REASON -->          not run; every big_mm.train / big_mm.evaluate /
                                               tools/*.py command in it that names --config
                                               still has its config loaded and checked
  <!-- readme-test: big_mm only: REASON -->    only its `python -m big_mm.*` commands run
                                               (e.g. the demo without `pip install`)
"""
import io
import os
import re
import shlex
import subprocess
import sys
import tarfile

from conftest import ROOT

README = os.path.join(ROOT, "README.md")
SHELLS = ("bash", "sh", "shell", "console")
MARKER = re.compile(r"<!--\s*readme-test:\s*(skip|big_mm only)\s*:\s*(.+?)\s*-->")
SHRINK = "--config.total_steps=2"
CONFIG_COMMANDS = re.compile(r"^-m big_mm\.(train|evaluate)$|^tools/\w+\.py$")


def shell_blocks(text: str) -> list[dict]:
  """The README's shell blocks: line (of the fence), code (dedented), marker."""
  lines = text.splitlines()
  blocks, i = [], 0
  while i < len(lines):
    fence = re.match(r"^(\s*)```(\w*)\s*$", lines[i])
    if not fence:
      i += 1
      continue
    indent, lang = fence.groups()
    end = next(j for j in range(i + 1, len(lines)) if re.match(r"^\s*```\s*$", lines[j]))
    if lang in SHELLS:
      marker = MARKER.search(lines[i - 1]) if i else None
      code = "\n".join(l[len(indent):] if l.startswith(indent) else l for l in lines[i + 1:end])
      blocks.append(dict(line=i + 1, code=code, marker=marker and marker.group(1)))
    i = end + 1
  return blocks


def commands(code: str) -> list[list[str]]:
  """The block's commands as argv lists (continuation lines joined, `&&` chains split)."""
  out = []
  for line in code.replace("\\\n", " ").splitlines():
    for part in line.split("&&"):
      if part.strip() and not part.strip().startswith("#"):
        out.append(shlex.split(part))
  return out


def check_configs(code: str) -> None:
  """Loads and validates (config.load) the config of every big_mm command that names one."""
  from big_mm import config as config_lib  # pylint: disable=g-import-not-at-top
  for argv in commands(code):
    if argv[0] != "python" or len(argv) < 2:
      continue
    head = " ".join(argv[1:3]) if argv[1] == "-m" else argv[1]
    if not CONFIG_COMMANDS.match(head):
      continue
    flags, overrides = config_lib.parse_command_line(argv[3:] if argv[1] == "-m" else argv[2:])
    if "config" in flags:
      config_lib.load(flags["config"], overrides)


def write_shards(root) -> None:
  """The digits as img2dataset tar shards: 100 training shards of 3, one held-out shard."""
  from data import digits_captions  # pylint: disable=g-import-not-at-top

  def write(path, examples):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with tarfile.open(path, "w") as tar:
      for key, ex in examples:
        for ext, payload in (("png", ex["image"]), ("txt", ex["text"].encode())):
          info = tarfile.TarInfo(f"{key}.{ext}")
          info.size = len(payload)
          tar.addfile(info, io.BytesIO(payload))

  train = list(digits_captions.generate("train"))
  for shard in range(100):
    write(os.path.join(root, "data", "shards", f"{shard:05d}.tar"), train[3 * shard:3 * shard + 3])
  write(os.path.join(root, "data", "val", "00000.tar"), list(digits_captions.generate("test"))[:64])


def sandboxed(code: str, root: str) -> str:
  code = re.sub(r"(?<![\w.~/-])/(tmp|data)/", lambda m: f"{root}/{m.group(1)}/", code)
  return code.replace("python -m big_mm.train", f"python -m big_mm.train {SHRINK}")


def test_readme_markers_are_known_and_placed():
  """A marker the test does not understand, or not right above a shell block, would silently
  leave its block run as written."""
  with open(README) as f:
    lines = f.read().splitlines()
  for n, line in enumerate(lines, 1):
    if "readme-test" in line:
      assert MARKER.search(line), f"README.md:{n}: unknown marker {line.strip()!r}"
      fence = re.match(r"^\s*```(\w*)\s*$", lines[n] if n < len(lines) else "")
      assert fence and fence.group(1) in SHELLS, (
          f"README.md:{n}: a readme-test marker must be the line right above a ```bash block")


def test_readme_shell_blocks_run(data_dir, tmp_path, monkeypatch):
  with open(README) as f:
    blocks = shell_blocks(f.read())
  assert blocks, "no ```bash blocks found in README.md"
  root = str(tmp_path)
  write_shards(root)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a laptop
  env.update(TFDS_DATA_DIR=data_dir, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1",
             PATH=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""),
             # Blocks that train or evaluate the same model share compilations.
             JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  monkeypatch.chdir(ROOT)
  failures = []
  for block in blocks:
    where = f"README.md:{block['line']}"
    try:
      check_configs(block["code"])
    except Exception as e:  # pylint: disable=broad-except
      failures.append(f"{where}: a config does not load: {type(e).__name__}: {e}\n"
                      f"{block['code']}")
      continue
    if block["marker"] == "skip":
      continue
    code = block["code"]
    if block["marker"] == "big_mm only":
      code = "\n".join(shlex.join(argv) for argv in commands(code)
                       if argv[:2] == ["python", "-m"] and argv[2].startswith("big_mm."))
    script = sandboxed(code, root)
    proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", script], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
      failures.append(f"{where} exited {proc.returncode}:\n{script}\n--- stderr (end) ---\n"
                      f"{proc.stderr[-3000:]}")
  assert not failures, "\n\n".join(failures) + (
      "\n\nA block that cannot run on the bundled data in seconds gets a marker on the line "
      "before it (see tests/test_readme.py): <!-- readme-test: skip: REASON -->")
