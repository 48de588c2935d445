r"""Demo: a tiny SigLIP on the bundled digits captions, on a laptop / 2-core CPU.

Command (from the repo root, after `python data/build_demo.py`):

  python -m big_mm.train --config configs/demo.py --workdir /tmp/big_mm_demo

Hardware: any CPU (measured on 2 cores); runs on 1 device or a simulated 8-device mesh.
Expected result: held-out zero-shot accuracy >= 0.80 (chance 0.10) after 600 steps
(measured 0.953); see README.md for the measured numbers and wall time. The zero-shot prompts
("a photo of the number {}", "the digit {}", "a scan of a handwritten {}": common.HELD_OUT_PROMPTS)
are the templates data/digits_captions.py holds out of every caption.

Arguments (`configs/demo.py:loss=softmax,steps=300`): loss (sigmoid|softmax), steps, batch.
"""
from big_mm import config as config_lib
from configs import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, loss="sigmoid", steps=600, batch=128)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  c.input = common.digits_train_input()

  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          image=dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=(4, 4),
                     posemb="learn", pool="map"),
          # HF-SigLIP-compatible (tools/export.py --format hf): the image embedding is the MAP
          # output itself (no image head) and the text embedding is read at the last position.
          text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=128,
                    pool="last_position"),
      ),
      out_dim=dict(image=0, text=64),
      temperature_init=10.0,
      bias_init=-10.0 if arg.loss == "sigmoid" else None,
  )
  c.objective = dict(name="contrastive", loss=arg.loss, strategy="all_gather")

  c.optim = dict(name="adamw", lr=3e-3, b1=0.9, b2=0.95, wd=1e-4, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(50, arg.steps // 10)))

  c.evals = dict(
      zeroshot=common.digits_zeroshot_eval(every_steps=200),
      retrieval=dict(type="retrieval", split="test", every_steps=200, pp_image=common.EVAL_PP),
  )
  c.checkpoint = dict(every_steps=200, keep=2)
  return c
