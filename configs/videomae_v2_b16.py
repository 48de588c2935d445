r"""VideoMAE V2 ViT-B/16 self-supervised pretraining (Wang et al., CVPR 2023, arXiv 2303.16727):
tube masking (90%) for the encoder, running-cell dual masking (50%) for the decoder.

  python -m big_mm.train --workdir gs://bucket/videomae_v2_b16 \
      --config configs/videomae_v2_b16.py:data=tar:/data/k400/{000000..000999}.tar

Intended hardware: the recipe's scale, 32 GPUs (OpenGVLab/VideoMAEv2@29eab1e
scripts/pretrain/vit_b_hybrid_pt.sh; docs/PRETRAIN.md names 64 A100-80G for ViT-g), i.e. 32
A100 / H100 or a TPU v4-64; not run at this scale here.
Recipe (that script and run_mae_pretraining.py's defaults): 16 frames every 4th, 224 px,
2x16x16 tubelets (8x14x14 = 1,568 tokens); ViT-B encoder on the 160 tube-visible tokens;
decoder width 384, 4 blocks, 6 heads (pretrain_videomae_base_patch16_224); the decoder
reconstructs the 704 encoder-masked tokens that running-cell masking keeps; per-tubelet
normalised pixel targets. 32 videos per GPU x 32 GPUs, each sampled 4 times (num_sample 4:
repeated augmentation), so 4,096 clips per step; AdamW b=(0.9, 0.95), wd 0.05, lr 1e-3 x
1,024 videos / 256 with 20 warmup epochs then cosine to min_lr 1e-5 x 1,024 / 256; 200 epochs
(of UnlabeledHybrid there). Augmentation: GroupMultiScaleCrop(224, scales 1 / .875 / .75 / .66)
without flip, ImageNet mean / std (the targets are normalised per tubelet anyway).
Differences: big_mm has no repeated augmentation, so a step is 4,096 distinct clips
(`samples` keeps the repo's steps and clips per epoch: total = epochs x videos x samples);
the multi-scale corner crop is approximated by video_inception_crop over 43-100% of the area;
the encoder's fixed position embedding is VideoViT's separable sin-cos (2-D space + 1-D time)
instead of the repo's 1-D table over the 1,568 indices (the decoder keeps the 1-D table).
Data: any video source of the input pipeline, e.g. webdataset tar shards of .mp4 members
(big_mm/input/webdataset.py); `videos` is its size: Kinetics-400 has 240,436 training
videos, Something-Something V2 168,913 (the repo's docs/DATASET.md).
Published numbers (fine-tuned, top-1; not reproduced here): the paper's abstract gives
ViT-g 90.0% on K400, 89.9% on K600, 68.7% on SSv1 and 77.0% on SSv2; the repo's
docs/MODEL_ZOO.md: ViT-g pretrained on UnlabeledHybrid and fine-tuned on K400 87.2%
(16x5x3 views; 88.4% with K710 post-pretraining), on SSv2 77.0% (16x2x3); ViT-B distilled
from that ViT-g on K710: K400 86.6% (16x5x3), 87.1% after a further fine-tune (16x7x3). The
paper's ViT-B dual-masking ablation (its Table 1) was not available here to quote.
Fine-tuning is not part of this config: train a classifier from the `vid/` params (a video_vit
tower) or probe them (objective.embed: mean-pooled encoder features).
Arguments: data, videos, batch, samples, epochs, frames, stride, res, decoder_mask_ratio.
"""
from big_mm import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="tar:/data/k400/{000000..000999}.tar", videos=240_436,
                             batch=4096, samples=4, epochs=200, frames=16, stride=4, res=224,
                             decoder_mask_ratio=0.5)
  epoch = arg.videos * arg.samples  # clips per epoch, as the repo counts them
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.epochs * epoch
  c.log_every_steps = 100

  pp = (f"decode_video|sample_clip({arg.frames}, {arg.stride})|"
        f"video_inception_crop({arg.res}, 43, 100)|video_normalize('imagenet')")
  c.input = dict(data=arg.data, split="train", modalities=("video",),
                 pp_modalities={"video": pp}, num_workers=16)

  c.model_name = "videomae"
  c.model = dict(
      encoder=dict(variant="B", patch_size=16, tubelet_size=2, posemb="sincos", scan=True),
      decoder=dict(width=384, depth=4, num_heads=6, posemb="sincos"), dtype="bfloat16")
  c.objective = dict(name="videomae", mask_ratio=0.9, decoder_mask_ratio=arg.decoder_mask_ratio,
                     norm_pix_loss=True)
  videos_per_step = arg.batch / arg.samples
  lr = 1e-3 * videos_per_step / 256
  c.optim = dict(name="adamw", lr=lr, b1=0.9, b2=0.95, eps=1e-8, wd=0.05, clip_norm=None,
                 schedule=dict(name="cosine", warmup_examples=20 * epoch,
                               end_lr_fraction=(1e-5 * videos_per_step / 256) / lr))
  c.evals = {}
  c.checkpoint = dict(every_steps=5_000, keep=3)
  return c
