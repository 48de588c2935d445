r"""Demo: Symile's synthetic XOR claim (Saporta et al. 2024, section 5.1) on `symile_xor`.

vec_a, vec_b ~ Bernoulli(0.5)^5 and vec_c = a XOR b (data/symile_xor.py): every pair of the
three is independent, so a pairwise objective (CLIP over the pairs (a, b), (b, c), (a, c))
learns nothing that predicts a from (b, c), while Symile's multilinear inner product of the
three embeddings can. GRAM's volume is the third objective of the comparison.

Setup as the paper's example (rajesh-lab/symile examples/binary_xor.py): one linear encoder
with bias per modality into d = 16, L2-normalised, learned logit scale initialised at
exp(-0.3), AdamW lr 0.1, batch 1,000, 50 epochs of the 10,000 training records (500 steps).
The test: given (vec_b, vec_c) of each of the 5,000 held-out records, rank the 5,000
vec_a embeddings; class_R@1 counts the top candidate right when it is the query's a vector
(32 possible; chance 1/32 = 0.031).

Commands (from the repo root, after `python data/build_demo.py --binding`):

  python -m big_mm.train --config configs/demo_symile.py --workdir /tmp/symile
  python -m big_mm.train --config configs/demo_symile.py:objective=pairwise --workdir /tmp/pairs
  python -m big_mm.train --config configs/demo_symile.py:objective=gram --workdir /tmp/gram

Hardware: any CPU (2 shared cores, 1 device; a minute each). Metric:
eval/xor/vec_b+vec_c2vec_a/class_R@1 (README.md and docs/benchmarks.md give the measured values).

Arguments: objective (symile|pairwise|gram), negatives (Symile's n|n2), steps, batch.
"""
from big_mm import config as config_lib

MODALITIES = ("vec_a", "vec_b", "vec_c")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, objective="symile", negatives="n", steps=500, batch=1000)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  c.input = dict(data="symile_xor", split="train", modalities=MODALITIES,
                 pp_modalities={m: "vector(5)" for m in MODALITIES}, num_workers=0)

  c.model_name = "towers"
  c.model = dict(towers={m: dict(depth=0) for m in MODALITIES}, out_dim=16,
                 temperature_init=0.7408, bias_init=None)  # exp(-0.3), the paper's init
  if arg.objective == "pairwise":
    c.objective = dict(name="binding", loss="softmax",
                       pairs=(("vec_a", "vec_b", 1.0), ("vec_b", "vec_c", 1.0),
                              ("vec_a", "vec_c", 1.0)))
  else:
    c.objective = dict(name="binding", pairs=(), higher_order=arg.objective,
                       higher_order_modalities=MODALITIES, symile_negatives=arg.negatives,
                       gram_anchor="vec_a")

  c.optim = dict(name="adamw", lr=0.1, wd=0.0, clip_norm=None,
                 schedule=dict(name="constant", warmup_steps=0))
  c.evals = dict(xor=dict(type="higher_order_retrieval", split="test", batch_size=1000,
                          query=("vec_b", "vec_c"), target="vec_a", ks=(1,)))
  c.checkpoint = dict(every_steps=500, keep=1)
  return c
