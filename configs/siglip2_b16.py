r"""SigLIP 2 B/16 (Tschannen et al. 2025, arXiv:2502.14786) image-text pretraining from scratch:
the sigmoid loss, LocCa's decoder losses, and self-distillation + masked prediction for the
last 20% of training (objective.name="siglip2"; big_mm/objectives/siglip2.py).

  python -m big_mm.train --config configs/siglip2_b16.py:data=my_dataset --workdir gs://bucket/s2
  python -m big_mm.train --config configs/siglip2_b16.py:naflex=true,data=... --workdir ...

Intended hardware: TPU v5e-256 / 32+ H100s (global batch 32k, FSDP over hosts; the paper
trains on up to 2048 TPUv5e chips). Stages (one run, switched by the step):
  0-100%   sigmoid image-text loss + LocCa (caption / referring expression / grounded caption;
           the decoder cross-attends to the un-pooled image tokens; needs boxes and referring
           expressions in the data: input.box_column / box_text_column — without them every
           example is captioned);
  80-100%  + SILC local-to-global distillation and TIPS masked prediction from an EMA teacher
           (weights 1 and 0.25, times 0.25 for B: objectives/self_distill.py's docstring).
Paper setup (SigLIP 2 section 2 and big_vision's README_siglip2.md): WebLI, 40B examples seen,
batch 32k, cosine schedule with 20k warmup steps, patch 16 at 256 px (256 tokens), text
length 64, the 256k Gemma tokenizer, the SigLIP architecture (MAP head, learned position
embeddings) so checkpoints load into SigLIP code. Adam lr 1e-3 with decoupled weight decay
1e-4 and gradient clipping to norm 1 are our reading of the paper, not verified here (adamw's
wd below is 1e-4 / lr = 0.1: optax scales wd by lr). The LocCa weight (1) and decoder size
(width 768, 6 layers, as a B text tower of half depth) are our choices, not the paper's stated
values. Online data curation (ACID) and the multilingual de-biased mixture are not part of
this config.
Published results (big_vision README_siglip2.md): B/16 at 256 px ImageNet zero-shot 79.1%,
COCO R@1 text->image 53.2, image->text 69.7 (224 px: 78.2 / 52.1 / 68.9). NaFlex B/16
(naflex=true), evaluated at 256 tokens: 78.5 / 51.1 / 67.3.
naflex=true: native aspect ratio with `naflex(1024, 16, lengths=...)` (each example at a
budget drawn from 128 / 256 / 576 / 784 / 1024 patches, padded to 1024; our choice of
lengths, the ones the NaFlex checkpoints are commonly evaluated at) and a stored 16x16
position grid (Siglip2's 256 position embeddings); the paper trains its NaFlex variant with
sampled sequence lengths per mini-batch, which saves compute this static-shape version does
not. Self-distillation is refused with NaFlex inputs, so naflex=true drops it.
Before running: a Gemma (or other) SentencePiece tokenizer at `gemma_256k.model` (the run
stops at start-up naming it when it is missing), TFDS imagenet2012 and coco_captions in
input.data_dir for the evaluators. Arguments: data, batch, examples, variant, res, naflex.
"""
from big_mm import config as config_lib
from configs import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="webli_tfds", batch=32_768, examples=40_000_000_000,
                             variant="B/16", res=256, naflex=False)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.examples
  c.log_every_steps = 100

  if arg.naflex:
    pp = "decode|value_range(-1,1)|naflex(1024, 16, lengths=(128, 256, 576, 784, 1024))"
    eval_pp = "decode|value_range(-1,1)|naflex(256, 16)"
  else:
    pp = eval_pp = f"decode|resize({arg.res})|value_range(-1,1)"
  c.input = dict(data=arg.data, split="train", tokenizer="gemma_256k.model", text_len=64,
                 pp_image=pp, num_workers=8)

  width = {"B": 768, "L": 1024, "So400m": 1152, "g-opt": 1536}[arg.variant.split("/")[0]]
  c.model_name = "towers"
  image = dict(variant=arg.variant, pool="map", posemb="learn", scan=True,
               remat_policy="nothing_saveable", dtype="bfloat16")
  if arg.naflex:
    image.update(posemb_grid=16)
  c.model = dict(
      towers=dict(
          image=image,
          text=dict(variant=arg.variant.split("/")[0], vocab_size=256_000, pool="last",
                    scan=True, remat_policy="nothing_saveable", dtype="bfloat16"),
      ),
      out_dim=None,  # embedding = width
      temperature_init=10.0,
      bias_init=-10.0,
  )
  c.objective = dict(
      name="siglip2", loss="sigmoid", strategy="ring",
      locca_weight=1.0, locca_loc_bins=1024,
      locca_decoder=dict(width=width, depth=6, num_heads=width // 64, mlp_dim=4 * width,
                         dtype="bfloat16"))
  if not arg.naflex:
    c.objective.update(silc_weight=0.25 * 1.0, tips_weight=0.25 * 0.25,
                       self_distill_start_fraction=0.8)
  c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.95, wd=0.1, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=20_000))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.evals = common.paper_evals(eval_pp, every_steps=10_000)
  c.checkpoint = dict(every_steps=2_000, keep=3)
  return c
