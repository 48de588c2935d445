r"""MultiMAE B/16 (arXiv 2204.01678) pretraining: RGB + depth + semantic segmentation.

  python -m big_mm.train --config configs/multimae_b16.py:data=my_dataset --workdir gs://bucket/mmae

Intended hardware: 8 A100s as in the paper (global batch 2048), or a TPU v4-32.
Recipe (EPFL-VILAB/MultiMAE cfgs/pretrain/multimae-b_98_rgb+-depth-semseg_1600e.yaml,
and run_pretraining_multimae.py's defaults): ViT-B/16 at 224 px, three modalities of 196 tokens,
98 visible tokens in all, split per example by Dirichlet(alpha=1); 1 global token; semseg
with 133 (COCO panoptic) classes through a 64-d class embedding; one decoder per modality of
dim 256, 8 heads, 1 cross-attention + 2 self-attention blocks; losses on masked tokens only,
unweighted sum. AdamW b=(0.9, 0.95), wd 0.05, base lr 1e-4 x batch/256 = 8e-4, 40 warmup
epochs, cosine to 0, 1600 epochs of ImageNet-1K (1,281,167 images), hflip, no clipping.
Differences: the paper standardises depth per image (robust, 10-90% truncation); big_mm
standardises with fixed model.depth_mean / depth_std (absolute depth; set them for your
data). Its RGB decoder predicts normalised pixels; big_mm's also predicts each patch's mean
and std so that RGB can be rebuilt from other modalities (see objectives/masked.py).
Data: the paper's ImageNet-1K pseudo labels (DPT depth, Mask2Former COCO semseg) are not in
TFDS; give any dataset with fields image / depth ([H, W] metres) / semseg ([H, W] class ids)
(a TFDS name or a parquet / tar spec, see big_mm/input/sources.py). NYU depth v2 in TFDS
has image + depth: `data=nyu_depth_v2,modalities=rgb+depth`.
Expected result (paper, after fine-tuning; not reproduced here): IN-1K 83.3% top-1, ADE20K
46.2 mIoU, NYUv2 depth delta1 86.4.
Arguments: data, batch, epochs, modalities (joined by +), res, classes.
"""
from big_mm import config as config_lib

IMAGENET_TRAIN = 1_281_167


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="imagenet_multimae_pseudo", batch=2048, epochs=1600,
                             modalities="rgb+depth+semseg", res=224, classes=133)
  modalities = tuple(arg.modalities.split("+"))
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.epochs * IMAGENET_TRAIN
  c.log_every_steps = 100

  c.input = dict(data=arg.data, split="train", modalities=modalities,
                 pp_image=f"decode|resize({arg.res})|flip_lr|normalize('imagenet')",
                 num_workers=16)

  c.model_name = "multimae"
  c.model = dict(
      modalities=modalities, image_size=arg.res, patch_size=16, encoder=dict(variant="B"),
      decoder=dict(width=256, depth=2, num_heads=8), num_global_tokens=1,
      num_semseg_classes=arg.classes, semseg_embed_dim=64, depth_mean=2.5, depth_std=1.5,
      scan=True, dtype="bfloat16")
  c.objective = dict(name="multimae", num_visible=98, dirichlet_alpha=1.0)
  c.optim = dict(name="adamw", lr=1e-4 * arg.batch / 256, b1=0.9, b2=0.95, eps=1e-8, wd=0.05,
                 clip_norm=None,
                 schedule=dict(name="cosine", warmup_examples=40 * IMAGENET_TRAIN))
  c.evals = {}
  c.checkpoint = dict(every_steps=5_000, keep=3)
  return c
