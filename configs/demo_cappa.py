r"""Demo: a tiny CapPa captioner on the bundled digits captions, on a 2-core CPU.

Command (from the repo root, after `python data/build_demo.py --data_dir DIR`):

  python -m big_mm.train --config configs/demo_cappa.py --workdir /tmp/big_mm_cappa \
      --config.input.data_dir=DIR

A ViT (width 64, depth 2, 4x4 patches on 32x32 images: 64 image tokens) and a 2-layer
decoder cross-attending to them. Half of each batch is trained with CapPa's parallel
prediction (all decoder inputs [MASK]); the paper uses 0.75 (configs/cappa_b16.py).
Measured (600 steps, one CPU device; about 4 min wall alone on 2 cores, see README): greedy
captions of the 300 held-out images name the right digit (word or numeral) and no other
for 95.0% of them (87.7% at step 200); chance is 10%. The scoring classifier, whose prompts
are templates no caption uses (common.HELD_OUT_PROMPTS), reaches 57.3%.

Arguments (`configs/demo_cappa.py:steps=300,parallel=0.0,prefix_lm`): steps, batch,
parallel (objective.parallel_fraction), prefix_lm (decoder-only prefix-LM instead of
the encoder-decoder).
"""
from big_mm import config as config_lib
from configs import common

def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=600, batch=128, parallel=0.5, prefix_lm=False)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  c.input = common.digits_train_input()

  c.model_name = "captioner"
  c.model = dict(
      image=dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=(4, 4),
                 posemb="learn"),
      decoder=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=128, max_len=16),
      prefix_lm=arg.prefix_lm,
  )
  c.objective = dict(name="captioning", parallel_fraction=arg.parallel, label_smoothing=0.0)

  c.optim = dict(name="adamw", lr=3e-3, b1=0.9, b2=0.95, wd=1e-4, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(50, arg.steps // 10)))
  c.evals = common.digits_caption_evals(every_steps=200)
  c.checkpoint = dict(every_steps=200, keep=2)
  return c
