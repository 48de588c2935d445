"""Two local processes (4 simulated CPU devices each, gloo collectives) train like one
process with 8 devices; a dead peer makes the survivor fail within the heartbeat timeout."""
import os
import subprocess
import sys
import time

import numpy as np

from big_mm import train
from conftest import ROOT, TOKENIZER, read_metrics, tiny_config

sys.path.insert(0, os.path.join(ROOT, "tools"))
import launch_local  # noqa: E402

# The command-line form of conftest.tiny_config (same model, data and schedule).
TINY_FLAGS = [
    "--config.batch_size=16", "--config.total_steps=4", "--config.log_every_steps=1",
    f"--config.input.tokenizer={TOKENIZER}", "--config.input.text_len=8",
    "--config.model.towers.image.width=32", "--config.model.towers.image.depth=1",
    "--config.model.towers.image.mlp_dim=64", "--config.model.towers.image.num_heads=2",
    "--config.model.towers.image.patch_size=(8,8)", "--config.model.towers.text.width=32",
    "--config.model.towers.text.depth=1", "--config.model.towers.text.mlp_dim=64",
    "--config.model.towers.text.num_heads=2", "--config.model.out_dim=16",
    "--config.optim.schedule.warmup_steps=2", "--config.optim.eps=1e-6",
    "--config.evals.zeroshot.every_steps=4", "--config.evals.retrieval.every_steps=4",
    "--config.checkpoint.every_steps=2",
]


def _env():
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def test_two_processes_match_one(data_dir, tmp_path):
  workdir = str(tmp_path / "mp")
  rc = launch_local.launch(
      ["-m", "big_mm.train", "--config", "configs/demo.py", f"--workdir={workdir}",
       f"--config.input.data_dir={data_dir}", *TINY_FLAGS],
      num_processes=2, devices_per_process=4, timeout=600, env=_env(), cwd=ROOT)
  assert rc == 0
  single = str(tmp_path / "single")
  config = tiny_config(data_dir, total_steps=4)  # no evaluators: losses are what we compare
  train.train(config, single)
  got = {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}
  want = {r["step"]: r["loss"] for r in read_metrics(single) if "loss" in r}
  assert sorted(got) == [1, 2, 3, 4]
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)],
                             rtol=1e-5)
  # Evaluators ran across both processes and saw the whole held-out split.
  evals = [r for r in read_metrics(workdir) if "eval/zeroshot/num_examples" in r]
  assert evals and evals[-1]["eval/zeroshot/num_examples"] == 300
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]


def test_dead_peer_makes_the_other_exit(data_dir, tmp_path):
  port = launch_local.free_port()
  env = {**_env(), "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
         "JAX_PLATFORMS": "cpu", "BIG_MM_CPU_COLLECTIVES": "gloo"}
  procs = []
  for pid in range(2):
    cmd = [sys.executable, "-m", "big_mm.train", "--config", "configs/demo.py",
           f"--workdir={tmp_path / 'run'}", f"--config.input.data_dir={data_dir}", *TINY_FLAGS,
           "--config.total_steps=100000", "--config.checkpoint.every_steps=100000",
           "--heartbeat_timeout_s=10", f"--coordinator_address=127.0.0.1:{port}",
           "--num_processes=2", f"--process_id={pid}"]
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True))
  survivor, victim = procs
  # Wait until training is under way (process 0 logs steps), then kill the peer hard.
  deadline = time.monotonic() + 300
  seen = ""
  while "step 2/" not in seen and time.monotonic() < deadline:
    seen += survivor.stderr.readline()
  assert "step 2/" in seen, seen[-2000:]
  victim.kill()
  killed_at = time.monotonic()
  try:
    rc = survivor.wait(timeout=120)
  finally:
    survivor.kill()
  assert rc != 0
  assert time.monotonic() - killed_at < 120
