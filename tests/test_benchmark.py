"""tools/benchmark.py: synthetic batches fit the model and FLOPs count every layer."""
import os
import sys

import numpy as np

from big_mm import config as config_lib

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tools"))
import benchmark  # noqa: E402  pylint: disable=wrong-import-position

SMALL = {"batch_size": 8, "model.towers.image.depth": 1, "model.towers.text.depth": 1}


def test_towers_model_benchmarks_finitely_and_counts_every_layer():
  """Synthetic tokens come from the text tower's vocabulary (before, a towers config drew ids
  up to 32,000 for a 128-piece vocabulary: a NaN loss), and a scanned tower is unrolled for
  the FLOP count (before, model.towers was not: the scanned stack counted once)."""
  scanned = config_lib.load("configs/demo.py", dict(SMALL, **{
      "model.towers.image.scan": True, "model.towers.text.scan": True,
      "model.towers.image.depth": 2, "model.towers.text.depth": 2}))
  plain = config_lib.load("configs/demo.py", dict(SMALL, **{
      "model.towers.image.depth": 2, "model.towers.text.depth": 2}))
  assert set(benchmark.tower_configs(plain.model)) == {"image", "text"}
  results = [benchmark.run(c, steps=1, image_size=None) for c in (scanned, plain)]
  assert all(r["loss_finite"] for r in results)
  assert results[0]["model_flops_per_step"] == results[1]["model_flops_per_step"]


def test_active_params_count_top_k_of_the_experts_and_collectives_are_counted():
  """A token uses every non-expert param (routers included) and top_k / E of the experts'."""
  config = config_lib.load("configs/demo.py", {"model.towers.image.moe": {
      "layers": "all", "num_experts": 4, "top_k": 2}})
  expert = {"Dense_0": {"kernel": np.zeros((4, 8, 16)), "bias": np.zeros((4, 16))},
            "router": np.zeros((8, 4))}
  params = {"img": {"Transformer": {"encoderblock_0": {"MoeMlp_0": expert}}},
            "txt": {"head": {"kernel": np.zeros((3, 1))}}}
  assert benchmark.active_params(params, config) == 32 + 3 + (512 + 64) * 2 // 4
  hlo = ("%a = f32[4] all-to-all(f32[4] %x)\n%b = f32[8] all-gather-start(f32[2] %y)\n"
         "%c = f32[8] all-gather-done(f32[8] %b)\n%d = f32[8] all-to-all(f32[8] %z)")
  assert benchmark.collectives(hlo) == {"all-gather": 1, "all-to-all": 2}
