r"""Starts N local processes of a big_mm command as one multi-process JAX job (for testing
multi-host code on one machine: CPU devices, gloo collectives).

  python tools/launch_local.py --num_processes 2 --devices_per_process 4 -- \
      -m big_mm.train --config configs/demo.py --workdir /tmp/mp

Each process gets `--coordinator_address`, `--num_processes` and `--process_id` appended,
`XLA_FLAGS` for its simulated devices and `BIG_MM_CPU_COLLECTIVES=gloo`. Output lines are
prefixed with the process id. If any process fails, the others are terminated and the
launcher exits with that process's code.
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _pump(proc: subprocess.Popen, prefix: str) -> None:
  for line in proc.stdout:
    sys.stdout.write(f"[{prefix}] {line}")
    sys.stdout.flush()


def launch(args: list[str], *, num_processes: int, devices_per_process: int,
           timeout: float | None = None, env: dict[str, str] | None = None,
           cwd: str | None = None) -> int:
  port = free_port()
  procs = []
  for pid in range(num_processes):
    proc_env = dict(env if env is not None else os.environ)
    proc_env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices_per_process}"
    proc_env["JAX_PLATFORMS"] = "cpu"
    proc_env["BIG_MM_CPU_COLLECTIVES"] = "gloo"
    cmd = [sys.executable, *args, f"--coordinator_address=127.0.0.1:{port}",
           f"--num_processes={num_processes}", f"--process_id={pid}"]
    proc = subprocess.Popen(cmd, env=proc_env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    threading.Thread(target=_pump, args=(proc, f"p{pid}"), daemon=True).start()
    procs.append(proc)
  deadline = None if timeout is None else time.monotonic() + timeout
  code = 0
  while procs:
    for proc in list(procs):
      rc = proc.poll()
      if rc is None:
        continue
      procs.remove(proc)
      if rc != 0 and code == 0:
        code = rc
        for other in procs:  # one failed: do not leave the rest waiting on it
          other.terminate()
    if deadline is not None and time.monotonic() > deadline:
      for proc in procs:
        proc.kill()
      return 124
    time.sleep(0.1)
  return code


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=4)
  parser.add_argument("--timeout", type=float, default=None, help="seconds; kills all after")
  parser.add_argument("command", nargs=argparse.REMAINDER,
                      help="after --: python arguments, e.g. -m big_mm.train ...")
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("give the python arguments to run after --")
  return launch(command, num_processes=args.num_processes,
                devices_per_process=args.devices_per_process, timeout=args.timeout)


if __name__ == "__main__":
  sys.exit(main())
