r"""FILIP (Yao et al., ICLR 2022, arXiv 2111.07783) image-text pretraining from scratch: the
softmax contrastive loss on the token-wise late-interaction similarity (objective "filip").

  python -m big_mm.train --config configs/filip_b16.py:data=my_dataset --workdir gs://bucket/filip_b16

Intended hardware: 32+ H100s / TPU v4-64 (global batch 8k of 197-patch images against 77
text tokens; the ring strategy with the fused kernels keeps per-device loss memory at one
device's tokens plus one tile, docs/benchmarks.md). The paper trained on V100 GPUs and Ascend
cards with LAMB, on FILIP300M (its own 300M web pairs) plus CC3M, CC12M and YFCC100M.
Model: image ViT-B/16 at 224 px (the patch tokens, through the image head, are the image's
tokens), text B (12 layers, width 512) over 77 tokens, both projected to 256-d token features
(FILIP's embedding dim). The paper's models are FILIP_base = ViT-B/32 (`variant=B/32`) and
FILIP_large = ViT-L/14; it has no B/16. Its image token reduction is
`objective.image_token_keep` (here it trims the loss's work only; the tower sees every patch).
Target (not verified): the ImageNet zero-shot top-1 reported for FILIP_base (ViT-B/32) is
recalled as 68.8% and for FILIP_large as 77.1%; the paper's tables could not be read through
the search tool available when this recipe was written, so check them before relying on
these numbers. A B/16 is expected at or above FILIP_base's.
Optimizer: AdamW (CLIP-style lr 1e-3, beta2 0.98, wd 0.2) stands in for the paper's LAMB;
its lr / wd are not taken from the paper. Arguments: data, batch, examples (examples seen; the paper: 30 epochs of 340M pairs), variant,
res, keep (image_token_keep).
Before running: a 32k SentencePiece tokenizer (c4_en_32k.model, as configs/siglip_b16.py) and
TFDS imagenet2012 / coco_captions prepared for the evaluators (configs/common.paper_evals).
"""
from big_mm import config as config_lib
from configs import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="webli_tfds", batch=8_192,
                             examples=10_000_000_000, variant="B/16", res=224, keep=1.0)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.examples
  c.log_every_steps = 100

  pp = f"decode|resize({arg.res})|value_range(-1,1)"
  c.input = dict(data=arg.data, split="train", tokenizer="c4_en_32k.model", text_len=77,
                 pp_image=pp, num_workers=8)

  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          image=dict(variant=arg.variant, pool="tok", posemb="learn", scan=True,
                     remat_policy="nothing_saveable", dtype="bfloat16"),
          text=dict(width=512, depth=12, mlp_dim=2048, num_heads=8, vocab_size=32_000,
                    pool="last", scan=True, remat_policy="nothing_saveable",
                    dtype="bfloat16"),
      ),
      out_dim=256,  # the token features' (and global embeddings') dim
      temperature_init=1 / 0.07,
  )
  c.objective = dict(name="filip", loss="softmax", strategy="ring", implementation="pallas",
                     image_token_keep=arg.keep)
  c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.98, wd=0.2, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=10_000))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.evals = common.paper_evals(pp, every_steps=10_000)
  c.checkpoint = dict(every_steps=2_000, keep=3)
  return c
