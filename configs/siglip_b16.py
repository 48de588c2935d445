r"""SigLIP B/16 (arXiv 2303.15343) image-text pretraining from scratch, sigmoid loss.

  python -m big_mm.train --config configs/siglip_b16.py:data=my_dataset --workdir gs://bucket/siglip_b16

Intended hardware: TPU v4-32 or larger / 16+ H100s (global batch 32k, FSDP over hosts).
Model (big_vision SigLIP demo): image ViT-B/16 at 224 px, MAP pooling; text B (12 layers,
width 768), 64 tokens, 32k sentencepiece vocabulary; embedding = width (768); learned
temperature initialised t = log 10 and bias b = -10.
Expected result (open_clip's evaluation of the released ViT-B-16-SigLIP, WebLI, 40B+ examples
seen): ImageNet zero-shot 76.0%, COCO R@1 image->text 65.7, text->image 47.8.
Optimizer: the paper's exact lr / wd / beta2 are not verified here (big_vision-style configs
use lr 1e-3, wd 1e-4 decoupled, beta2 0.95); adamw's wd below is 1e-4 / lr = 0.1 (optax
scales wd by lr). Arguments: data, batch, examples (examples seen), variant.
Before running: the tokenizer c4_en_32k.model, big_vision's published c4_en SentencePiece
(`gsutil cp gs://t5-data/vocabs/cc_en.32000/sentencepiece.model c4_en_32k.model`; missing,
the run stops at start-up saying so), and TFDS imagenet2012 (zero-shot: CLIP's class names
and 80 templates) and coco_captions prepared in input.data_dir for the evaluators.
"""
from big_mm import config as config_lib
from configs import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="webli_tfds", batch=32_768, examples=9_000_000_000,
                             variant="B/16", res=224)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.examples
  c.log_every_steps = 100

  pp = f"decode|resize({arg.res})|value_range(-1,1)"
  c.input = dict(data=arg.data, split="train", tokenizer="c4_en_32k.model", text_len=64,
                 pp_image=pp, num_workers=8)

  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          image=dict(variant=arg.variant, pool="map", posemb="learn", scan=True,
                     remat_policy="nothing_saveable", dtype="bfloat16"),
          text=dict(variant=arg.variant.split("/")[0], vocab_size=32_000, pool="last", scan=True,
                    remat_policy="nothing_saveable", dtype="bfloat16"),
      ),
      out_dim=None,  # embedding = width
      temperature_init=10.0,
      bias_init=-10.0,
  )
  c.objective = dict(name="contrastive", loss="sigmoid", strategy="ring")
  c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.95, wd=0.1, clip_norm=1.0,
                 schedule=dict(name="rsqrt", warmup_steps=10_000, timescale=10_000,
                               cooldown_steps=20_000))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.evals = common.paper_evals(pp, every_steps=10_000)
  c.checkpoint = dict(every_steps=2_000, keep=3)
  return c
