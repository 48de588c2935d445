"""Test set-up: 8 simulated CPU devices, so every sharding and collective is exercised."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import atexit
import json
import shutil
import sys
import tempfile

# One XLA compilation cache for the whole run, shared by the xdist workers and the processes
# tests start (they inherit the environment set here, in the controller): many tests compile
# the same tiny train steps. Measured on tests/test_train.py: 227 s without, 181 s with it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="big_mm_tests_xla_cache_")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
TOKENIZER = os.path.join(ROOT, "data", "digits_spm.model")



_TORCHVISION_OPS = []


def declare_torchvision_ops_if_unloadable():
  """open_clip, timm and transformers' image processors import torchvision. PyPI's Linux
  torchvision wheels are CUDA builds: against a CPU torch (torch==2.13.0+cpu here) their C
  extension cannot load, and torchvision then fails at import, registering a fake kernel for its
  own undefined `torchvision::nms` op (pytorch/vision#9085). Declaring the ops it registers
  fakes for lets the pure-Python parts import (the transforms open_clip's preprocess uses); the
  C ops (nms, roi_align, image decoding) stay unavailable, and no test uses them. Once per
  process (test files call it before importing those libraries)."""
  import glob  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("torchvision")
  if spec is None or _TORCHVISION_OPS:
    return
  try:
    for lib in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C.*")):
      torch.ops.load_library(lib)
  except OSError:
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
      lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_OPS.append(lib)  # the ops live as long as this object

@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The bundled digits_captions demo dataset, built once per test session."""
  from data import digits_captions
  d = str(tmp_path_factory.mktemp("tfds"))
  digits_captions.build(d)
  return d


@pytest.fixture(scope="session")
def scenes_dir(tmp_path_factory):
  """The bundled multimodal_scenes demo dataset (MultiMAE), built once per test session."""
  from data import scenes
  d = str(tmp_path_factory.mktemp("tfds_scenes"))
  scenes.build(d)
  return d


@pytest.fixture(scope="session")
def boxes_dir(tmp_path_factory):
  """The digits_boxes demo dataset (boxes, referring expressions), built once per session."""
  from data import digits_boxes
  d = str(tmp_path_factory.mktemp("tfds_boxes"))
  digits_boxes.build(d)
  return d


def tiny_config(data_dir, **changes):
  """The demo recipe shrunk: width 32, depth 1, batch 16, no evaluators."""
  from big_mm import config as config_lib
  user = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py"))
  user.batch_size = 16
  user.total_steps = 6
  user.log_every_steps = 1
  user.input.data_dir = data_dir
  user.input.tokenizer = TOKENIZER
  user.input.text_len = 8
  user.model.towers.image.update(width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=(8, 8))
  user.model.towers.text.update(width=32, depth=1, mlp_dim=64, num_heads=2)
  user.model.out_dim = dict(image=16, text=16)
  user.evals = {}
  user.optim.schedule.warmup_steps = 2
  # Attention key biases have an exactly-zero true gradient (softmax is shift-invariant); with
  # Adam's eps=1e-8 their float32 rounding noise becomes +-lr updates that differ between
  # layouts. A larger eps keeps the parameter comparison meaningful.
  user.optim.eps = 1e-6
  user.checkpoint = dict(every_steps=2, keep=5)
  for key, value in changes.items():
    node = user
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:
        node[p] = {}
      node = node[p]
    node[leaf] = value
  return config_lib.load(user)


def train_steps(config, devices, batches):
  """Trains on host `batches` with `config.mesh` over `devices` -> (setup, each step's metrics,
  the final params (host arrays), the params' shardings)."""
  import jax
  from big_mm import sharding, train
  setup = train.build(config, devices=devices)
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    step = train.make_train_step(setup, ts)
    metrics = []
    for batch in batches:
      batch = {k: jax.device_put(v, sharding.batch_sharding(setup.mesh)) for k, v in batch.items()}
      state, m = step(state, batch)
      metrics.append(jax.device_get(m))
  return setup, metrics, jax.device_get(state["params"]), ts.shardings["params"]


def final_params(workdir, step):
  """The params a run saved at `step` (host arrays)."""
  import jax
  from big_mm import checkpoint
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), save_every_steps=1,
                                 read_only=True)
  params = jax.device_get(ckpt.restore_params(step))
  ckpt.close()
  return params


def read_metrics(workdir):
  from big_mm import metrics
  return metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))


@pytest.fixture(scope="session")
def trained_demo(data_dir, tmp_path_factory):
  """The README's demo as a user runs it (its command on one CPU device, the only override
  input.data_dir: the session's build), trained once per test run: (workdir, the finished
  process). Under pytest-xdist the first worker that needs it trains it in the workers' shared
  temp dir; the others wait for it and reuse it."""
  import subprocess
  from filelock import FileLock
  # xdist workers' base temps are subfolders of the session's; without xdist, the parent would
  # be common to every past session, whose demo may come from older code.
  basetemp = tmp_path_factory.getbasetemp()
  shared = basetemp.parent if os.environ.get("PYTEST_XDIST_WORKER") else basetemp
  workdir = shared / "trained_demo" / "run"
  with FileLock(str(shared / "trained_demo.lock")):
    done = shared / "trained_demo" / "result.json"
    if done.exists():
      return workdir, subprocess.CompletedProcess(**json.loads(done.read_text()))
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device, as a laptop
    proc = subprocess.run(
        [sys.executable, "-m", "big_mm.train", "--config", "configs/demo.py",
         "--workdir", str(workdir), f"--config.input.data_dir={data_dir}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    done.write_text(json.dumps(dict(args=proc.args, returncode=proc.returncode,
                                    stdout=proc.stdout, stderr=proc.stderr)))
  return workdir, proc
