r"""Demo: FILIP (token-wise late interaction) against a global-embedding SigLIP on digits_pairs.

digits_pairs (data/digits_pairs.py): 32x32 images of two digits side by side, captions naming
both in order ("3 to the left of 7", "7 to the right of 3", ...); the 100 classes are the
ordered pairs, so an embedding that pools the image into a bag of digits cannot tell 37 from
73. Both runs use configs/demo.py's towers, optimiser and budget; only the objective differs:
objective=filip scores a pair by FILIP's token-wise similarity (the image's patch tokens
against the caption's tokens), objective=contrastive by the dot product of the pooled
embeddings (the SigLIP / CLIP demo).

Commands (from the repo root, after `python data/build_demo.py`), the 600-step runs of the
FILIP table in README.md / docs/benchmarks.md (its 300-step rows add steps=300):

  python -m big_mm.train --config configs/demo_filip.py:keep=0.25 --workdir /tmp/filip
  python -m big_mm.train --config configs/demo_filip.py:objective=contrastive,loss=sigmoid \
      --workdir /tmp/siglip_pairs

Hardware: any CPU (measured on 2 shared cores, 1 device). Metrics at the end of the run:
eval/retrieval/txt2img/R@1 (1,000 held-out pairs, one caption each) and the zero-shot accuracy
over the 100 ordered pairs with each held-out prompt template (eval/zeroshot_t0, _t1; chance
0.01). Measured at 600 steps: FILIP txt2img class_R@1 0.328 and zero-shot 0.069 / 0.139
against SigLIP's 0.050 and 0.039 / 0.032 (README.md).

Arguments (`configs/demo_filip.py:objective=contrastive,loss=sigmoid`): objective
(filip|contrastive), loss (softmax|sigmoid), steps, batch, keep (FILIP's image_token_keep).
"""
from big_mm import config as config_lib
from configs import common


def pair_zeroshot_evals() -> dict:
  """One zero-shot evaluator per held-out template of data/digits_pairs.py (its prompts name
  both digits, so each class name is its whole prompt)."""
  from data import digits_pairs  # pylint: disable=g-import-not-at-top
  prompts = digits_pairs.class_prompts()
  return {f"zeroshot_t{k}": dict(type="zeroshot", split="test", pp_image=common.EVAL_PP,
                                 classnames=tuple(p[k] for p in prompts), templates=("{}",))
          for k in range(len(prompts[0]))}


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, objective="filip", loss="softmax", steps=600, batch=128,
                             keep=1.0)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  # The held-out prompts are up to 20 pieces long; captions up to 9.
  c.input = dict(common.digits_train_input(), data="digits_pairs",
                 tokenizer="data/digits_pairs_spm.model", text_len=24)

  c.model_name = "towers"
  c.model = dict(  # configs/demo.py's towers: image tokens (MAP-pooled for SigLIP) are 64-d
      towers=dict(
          image=dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=(4, 4),
                     posemb="learn", pool="map"),
          text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=128,
                    pool="last_position"),
      ),
      out_dim=dict(image=0, text=64),
      temperature_init=10.0,
      bias_init=-10.0 if arg.loss == "sigmoid" else None,
  )
  c.objective = dict(name=arg.objective, loss=arg.loss, strategy="all_gather")
  if arg.objective == "filip":
    c.objective.image_token_keep = arg.keep

  c.optim = dict(name="adamw", lr=3e-3, b1=0.9, b2=0.95, wd=1e-4, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(50, arg.steps // 10)))

  # At the end of the run only (no every_steps).
  c.evals = dict(pair_zeroshot_evals(),
                 retrieval=dict(type="retrieval", split="test", pp_image=common.EVAL_PP))
  c.checkpoint = dict(every_steps=200, keep=2)
  return c
