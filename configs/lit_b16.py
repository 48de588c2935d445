r"""LiT (arXiv 2111.07991): locked-image text tuning, B/16 image tower frozen, B text tower.

  python -m big_mm.train --config configs/lit_b16.py:init=gs://bucket/img_run --workdir gs://bucket/lit

The image tower is initialised from another big_mm run's checkpoint (`init=` a workdir; its
`img/...` params are copied) and frozen through the optimizer (lr multiplier 0: no gradient, no
optimizer state). Without `init` the image tower stays random and frozen, which is only useful
as a smoke test.
Intended hardware: big_vision used 64 TPU chips (B16B: 0.125 days).
Recipe (big_vision lit_coco / README_lit): image B/16 (AugReg i21k), `tok` pooling, no image
head; text B (BERT-base in the paper; here a from-scratch B text transformer, 16 tokens);
softmax contrastive loss, temperature init 10 learned; Adam lr 1e-3, wd 0.01 (big_vision's
decoupled wd, not scaled by lr: optax adamw's wd = 0.01 / lr = 10), clip 1, cosine with
warmup max(3%, 100) steps. Expected (B16B, 30k steps on CC12M+YFCC100M): ImageNet
zero-shot 72.1%, COCO R@1 image->text 49.4, text->image 31.1. Global batch is not verified.
Arguments: data, init, batch, steps.
Before running: the tokenizer c4_en_32k.model, big_vision's published c4_en SentencePiece
(`gsutil cp gs://t5-data/vocabs/cc_en.32000/sentencepiece.model c4_en_32k.model`; missing,
the run stops at start-up saying so), and TFDS imagenet2012 (zero-shot: CLIP's class names
and 80 templates) and coco_captions prepared in input.data_dir for the evaluators.
"""
from big_mm import config as config_lib
from configs import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cc12m", init="", batch=16_384, steps=30_000)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 100

  pp = "decode|resize(224)|value_range(-1,1)"
  c.input = dict(data=arg.data, split="train", tokenizer="c4_en_32k.model", text_len=16,
                 pp_image=pp, num_workers=8)
  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          image=dict(variant="B/16", pool="tok", posemb="learn", dtype="bfloat16"),
          text=dict(variant="B", vocab_size=32_000, pool="last", scan=True,
                    remat_policy="nothing_saveable", dtype="bfloat16"),
      ),
      out_dim=dict(image=None, text=768),  # no image head: the frozen features as they are
      temperature_init=10.0,
      bias_init=None,
  )
  c.objective = dict(name="contrastive", loss="softmax", strategy="all_gather")
  # big_vision wd 0.01 is decoupled and not scaled by lr; optax adamw multiplies by lr: 0.01/1e-3.
  c.optim = dict(name="adamw", lr=1e-3, wd=10.0, clip_norm=1.0,
                 lr_mults=((r"img/.*", 0.0), (r".*", 1.0)),
                 schedule=dict(name="cosine", warmup_steps=max(100, int(0.03 * arg.steps))))
  c.init = dict(workdir=arg.init or None, include=r"img/.*")
  c.evals = common.paper_evals(pp, every_steps=2_000)
  c.checkpoint = dict(every_steps=1_000, keep=3)
  return c
