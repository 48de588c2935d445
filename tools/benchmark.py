r"""Benchmarks a config's train step on synthetic batches: compile time, step time, examples/s,
FLOPs (from XLA's cost analysis of the compiled step), MFU and compiled memory. JSON output.

  python tools/benchmark.py --config configs/demo.py [--steps 20] [--config.batch_size=256] \
      [--image_size 224] [--out result.json]

Runs on any backend (CPU, GPU, TPU); MFU is reported where the device's peak is known.
Two FLOP counts are reported:
- `model_flops_per_step`: XLA's count for the whole (global) step of the same model built
  without `scan` and without remat, so it counts every layer once and no recomputation
  (XLA counts a while-loop body once, so a scanned model would be undercounted). MFU uses it.
- `compiled_flops_per_step_per_device`: XLA's count for the compiled, partitioned step as it
  runs (with remat recomputation; a scanned layer stack counted once).
Both include whatever the step runs besides the model, e.g. a SigLIP 2 teacher's forward pass
(objective.distill_*: it runs unrolled, so every teacher layer is counted; tests/test_distill.py).
"""
from __future__ import annotations

import json
import os
import re
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from big_mm import config as config_lib  # noqa: E402
from big_mm import metrics, sharding, train  # noqa: E402

USAGE = __doc__


def image_size_from_pp(pp: str) -> int:
  """The output size of the last resize/crop op in a pp string (the model's input size)."""
  sizes = re.findall(r"(?:resize|random_crop|central_crop|inception_crop)\((\d+)", pp)
  if not sizes:
    raise ValueError(f"Cannot tell the image size from pp_image={pp!r}; pass --image_size.")
  return int(sizes[-1])


def tower_configs(model_cfg) -> dict:
  """{modality: that tower's kwargs}: a towers model's model.towers, else (captioner, CoCa)
  model.image / model.text where present."""
  if "towers" in model_cfg:
    return dict(model_cfg.towers)
  return {m: model_cfg[m] for m in ("image", "text") if m in model_cfg}


def synthetic_batch(config, image_size: int, mesh) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  b, L = config.batch_size, config.input.text_len
  vocab = (tower_configs(config.model).get("text") or {}).get("vocab_size", 32_000)
  text = rng.integers(3, vocab, size=(b, L), dtype=np.int32)
  text[:, -3:] = 0  # padding at the end, as real captions have
  batch = {"image": rng.uniform(-1, 1, size=(b, image_size, image_size, 3)).astype(np.float32),
           "text": text}
  return {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}


def model_flops(config, abstract_batch: dict[str, jax.ShapeDtypeStruct]) -> float | None:
  """FLOPs of one global train step of the config's model, unrolled and without remat."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    for tower in tower_configs(config.model).values():
      tower["scan"] = False
      tower["remat_policy"] = "none"
  setup = train.build(config)
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    lowered = train.make_train_step(setup, ts).lower(ts.abstract, abstract_batch)
  return metrics.compiled_flops(lowered)


def run(config, *, steps: int, image_size: int | None) -> dict:
  with config.unlocked():
    # Timing only: a long horizon so any warmup fits; the lr schedule does not affect speed.
    config.total_steps, config.total_epochs, config.total_examples = 10**6, None, None
    config.input.tokenizer = None  # synthetic tokens: no tokenizer file needed
    if image_size:  # the model is built for pp_image's size
      config.input.pp_image = f"decode|resize({image_size})|value_range(-1,1)"
  setup = train.build(config)
  image_size = image_size or image_size_from_pp(config.input.pp_image)
  batch = synthetic_batch(config, image_size, setup.mesh)
  ts = train.make_train_state(setup)
  with train.use_mesh(setup):
    state = ts.init(jax.random.key(0))
    step = train.make_train_step(setup, ts)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch).compile()
    compile_s = time.perf_counter() - t0
  flops = metrics.compiled_flops(compiled)
  abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                    for k, v in batch.items()}
  total_flops = model_flops(config, abstract_batch)
  memory = compiled.memory_analysis()
  for _ in range(2):  # warm-up
    state, m = compiled(state, batch)
  jax.block_until_ready(m)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = compiled(state, batch)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  step_s = float(np.median(times))
  device = jax.devices()[0]
  peak = metrics.device_peak_flops(device)
  result = {
      "backend": jax.default_backend(),
      "device_kind": device.device_kind,
      "num_devices": jax.device_count(),
      "mesh": dict(setup.mesh.shape),
      "jax": jax.__version__,
      "batch_size": config.batch_size,
      "image_size": image_size,
      "text_len": config.input.text_len,
      "num_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state["params"]))),
      "compile_s": round(compile_s, 3),
      "step_s_median": step_s,
      "step_s_min": float(np.min(times)),
      "examples_per_s": config.batch_size / step_s,
      "model_flops_per_step": total_flops,
      "compiled_flops_per_step_per_device": flops,
      "mfu": (metrics.mfu(total_flops / jax.device_count(), step_s, peak)
              if total_flops and peak else None),
      "loss_finite": bool(np.isfinite(float(m["loss"]))),
  }
  if memory is not None:
    result["memory_bytes"] = {k: int(getattr(memory, k)) for k in (
        "argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
        "generated_code_size_in_bytes") if hasattr(memory, k)}
  return result


def main(argv: list[str]) -> int:
  flags, overrides = config_lib.parse_command_line(argv)
  if "config" not in flags or set(flags) - {"config", "steps", "image_size", "out"}:
    print(USAGE, file=sys.stderr)
    return 2
  config = config_lib.load(flags["config"], overrides)
  result = run(config, steps=int(flags.get("steps", 10)),
               image_size=int(flags["image_size"]) if "image_size" in flags else None)
  text = json.dumps(result, indent=2)
  print(text)
  if "out" in flags:
    with open(flags["out"], "w") as f:
      f.write(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
