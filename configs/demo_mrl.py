r"""Demo: Matryoshka embeddings (MRL, Kusupati et al. 2022) on the bundled digits captions.

The digits demo (configs/demo.py) with a 64-d embedding on both towers (an image head too, so
every prefix is a prefix of a projection) trained with objective.matryoshka_dims = (8, 16, 32,
64): one SigLIP loss per nested prefix of the embedding, each prefix re-normalised. Its
evaluators report zero-shot, retrieval and few-shot at every prefix (`accuracy@d8`, ...).

Commands (from the repo root, after `python data/build_demo.py`), the three runs of the MRL
table in README.md / docs/benchmarks.md (the same 600 steps each):

  python -m big_mm.train --config configs/demo_mrl.py --workdir /tmp/mrl
  python -m big_mm.train --config configs/demo_mrl.py:mrl=false,dim=8 --workdir /tmp/mrl_d8
  python -m big_mm.train --config configs/demo_mrl.py:mrl=false --workdir /tmp/mrl_plain
  # the plain model's truncated embeddings, evaluated at the same prefixes:
  python -m big_mm.evaluate --workdir /tmp/mrl_plain \
      --config.objective.matryoshka_dims="(8, 16, 32, 64)"

Hardware: any CPU (measured on 2 cores: 7–13 min per run while shared with other jobs).
Expected result: the MRL model's 8-d prefix (D/8) close to the model trained at 8 dims alone
and well above the plain model's embedding truncated to 8 dims; measured (README.md table):
held-out zero-shot 86.3% vs 79.0% vs 71.0%.

Arguments (`configs/demo_mrl.py:mrl=false,dim=8`): mrl (train the nested prefixes D/8, D/4,
D/2, D; false: the plain loss), dim (the embedding dim D), loss (sigmoid|softmax), steps, batch.
"""
from big_mm import config as config_lib
from configs import common, demo


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, mrl=True, dim=64, loss="sigmoid", steps=600, batch=128)
  c = demo.get_config(f"loss={arg.loss},steps={arg.steps},batch={arg.batch}")
  # A head of `dim` on both towers (the demo has no image head): prefixes of both embeddings.
  with c.model.ignore_type():
    c.model.out_dim = arg.dim
  dims = tuple(arg.dim // k for k in (8, 4, 2, 1)) if arg.mrl else ()
  c.objective.matryoshka_dims = dims

  # At the end of the run only (no every_steps).
  c.evals = dict(
      zeroshot=common.digits_zeroshot_eval(every_steps=None),
      retrieval=dict(type="retrieval", split="test", pp_image=common.EVAL_PP),
      fewshot=dict(type="fewshot", split="test", train_split="train", shots=(1, 10),
                   pp_image=common.EVAL_PP),
  )
  c.checkpoint = dict(every_steps=100, keep=2)
  return c
