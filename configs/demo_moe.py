r"""Demo: mixture-of-experts towers (V-MoE / Switch routing) on the bundled digits captions.

The SigLIP demo (configs/demo.py) with the MLP of every other block (`layers="every_2"`: the
second of the two blocks of each tower) replaced by `experts` routed experts of the same size.
With top_k=1 a token runs one expert MLP of the dense demo's size, so the active FLOPs per token
equal the dense demo's apart from the router (a [width, experts] matmul): the experts add
parameters, not compute (big_mm/models/moe.py).

Commands (from the repo root, after `python data/build_demo.py`), the runs of the MoE table in
README.md (600 steps each, as the dense demo):

  python -m big_mm.train --config configs/demo_moe.py --workdir /tmp/moe
  python -m big_mm.train --config configs/demo_moe.py:top_k=2 --workdir /tmp/moe_top2
  python -m big_mm.train --config configs/demo_moe.py:routing=expert_choice --workdir /tmp/moe_ec
  # on 8 simulated devices, experts over an expert axis of 4:
  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m big_mm.train \
      --config configs/demo_moe.py:expert_axis=4 --workdir /tmp/moe_ep4
  # sparse upcycling: every expert starts as the trained dense demo's MLP (top-2 weights
  # renormalised to 1: the upcycled model starts computing what the dense one does)
  python -m big_mm.train --config configs/demo_moe.py:steps=200,top_k=2 --workdir /tmp/moe_up \
      --config.init.workdir=/tmp/big_mm_demo

Hardware: any CPU (2 cores). Expected result: held-out zero-shot accuracy about the dense demo's
(>= 0.80; README.md has the measured numbers), with every expert used (the logged
`img/moe_load/expert_<e>`, `txt/moe_load/expert_<e>` near 1/experts) and few dropped tokens
(`img/moe_dropped`, `txt/moe_dropped`).

Arguments (`configs/demo_moe.py:top_k=2,experts=4`): experts, top_k, capacity (the capacity
factor), routing (token_choice|expert_choice), bpr (V-MoE's batch prioritized routing),
expert_axis (the size of mesh.expert; the batch and the rest of the devices go over data),
loss (sigmoid|softmax), steps, batch.
"""
from big_mm import config as config_lib
from configs import demo


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, experts=8, top_k=1, capacity=1.25, routing="token_choice",
                             bpr=False, expert_axis=1, loss="sigmoid", steps=600, batch=128)
  c = demo.get_config(f"loss={arg.loss},steps={arg.steps},batch={arg.batch}")
  moe = dict(layers="every_2", num_experts=arg.experts, top_k=arg.top_k,
             capacity_factor=arg.capacity, routing=arg.routing, batch_priority=arg.bpr,
             renormalize=arg.top_k > 1)
  for tower in ("image", "text"):
    c.model.towers[tower].moe = dict(moe)
  c.mesh = dict(data=-1, fsdp=1, tensor=1, expert=arg.expert_axis)
  return c
