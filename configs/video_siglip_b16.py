r"""Video-text SigLIP, ViT-B/16 on 16 x 224 x 224 clips, inflated from an image SigLIP B/16.

  python -m big_mm.train --config configs/video_siglip_b16.py:init=/ckpt/siglip-base-patch16-224 \
      --workdir gs://bucket/video_siglip_b16

The ViCLIP recipe (Wang et al. 2023, "InternVid", arXiv 2307.06942: a CLIP whose image tower
is made a space-time tower and trained on video-text pairs, text tower frozen) with SigLIP's
sigmoid loss and a SigLIP start. From ViCLIP-B's pretraining config
(OpenGVLab/InternVideo@e5460da InternVideo1/Pretrain/ViCLIP/exp/exp_pretrain_ViCLIP/
viclip_base/config.py, run.sh): init CLIP-ViT-B/16 (both towers), freeze_text=True, 8 frames
("rand" segment sampling in training, "middle" at test), 224 px without random augmentation,
max 32 text tokens, batch_size 512, AdamW lr 2e-4, betas (0.9, 0.98), weight decay 0.2,
cosine over 10 epochs with 0.5 warmup epochs to 0.01 x lr, video tokens masked with
probability 0.9 in training, MSR-VTT 1k test retrieval.
Here: `init` an HF SiglipModel directory (google/siglip-base-patch16-224 as the hub publishes
it, read by big_mm.export.load_params; its SentencePiece tokenizer too). `init.inflate`
builds the video tower `vid/` from its image tower `img/` (big_mm/models/video.py `inflate`:
the 16 x 16 patch kernel averaged over the 2-frame tubelet, the 14 x 14 space position
embedding kept, time embedding zeros), so before training a static clip embeds as its frame
does in the image model (SigLIP's gelu_tanh and LayerNorm eps 1e-6 are VideoViT's defaults; a
CLIP source would not inflate exactly). The text tower and its head are SigLIP's, frozen
(lr_mults); t and b start from SigLIP's and train.
Differences from ViCLIP-B: sigmoid loss (SigLIP, Zhai et al. 2023) instead of softmax; 16
frames in 2 x 16 x 16 tubelets (8 x 14 x 14 = 1,568 tokens, joint attention; Pallas / cuDNN
flash attention through attn_implementation="auto") instead of 8 frames of 16 x 16 patches;
no token masking (every token is encoded: about 10x ViCLIP's encoder cost per clip); SigLIP's
64 text tokens.
Data: webdataset tar shards of `{key}.mp4` + `{key}.txt` (big_mm/input/webdataset.py; WebVid
or InternVid clips cut to their captioned spans), `videos` clips per epoch; eval: MSR-VTT's
1k-A test clips as tar shards of .mp4 + .txt (one caption each), and a linear probe on TFDS
ucf101 (frames as uint8 arrays; the video pp reads them as it reads encoded files).
Intended hardware (an estimate, not run at this scale here): 64 H100 / A100-80G or a TPU
v5p-64, data-parallel with remat, batch 4,096 clips; decoding 16 frames per clip needs many
input workers (tools/benchmark_input.py measures clips/s per worker, docs/benchmarks.md).
Published numbers (not reproduced here): ViCLIP-B trained on InternVid-10M-FLT reaches 58.52%
zero-shot top-1 on Kinetics-400 (71.11 as the mean of top-1 and top-5; OpenGVLab/InternVideo
@8864aa1 InternVideo1/Pretrain/ViCLIP/README.md Table 1). Its MSR-VTT numbers were not
available here to quote. Zero-shot Kinetics is not wired in (big_mm ships no Kinetics class
names; add a zeroshot evaluator with modality="video" and classnames to evaluate it).
Arguments: data, videos, epochs, batch, frames, init, msrvtt, ucf101.
"""
from big_mm import config as config_lib


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="tar:/data/webvid/{000000..009999}.tar",
                             videos=10_000_000, epochs=10, batch=4096, frames=16,
                             init="siglip-base-patch16-224",
                             msrvtt="tar:/data/msrvtt/test_1k-{000000..000003}.tar",
                             ucf101="ucf101")
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.epochs * arg.videos
  c.log_every_steps = 100

  train_pp = (f"decode_video|sample_clip({arg.frames}, 1, 'segment')|video_resize_small(224)|"
              "video_random_crop(224)|video_value_range(-1, 1)")
  # Test: the segments' centre frames, one central crop; e.g. sample_clip(..., clips=2) and
  # video_views(3, 224) instead of the crop give 6 views, which the tower averages.
  eval_pp = (f"decode_video|sample_clip({arg.frames}, 1, 'segment_center')|"
             "video_resize_small(224)|video_central_crop(224)|video_value_range(-1, 1)")
  c.input = dict(data=arg.data, split="train", modalities=("video", "text"),
                 pp_modalities={"video": train_pp}, tokenizer=arg.init, text_len=64,
                 num_workers=32)

  # The HF SigLIP B/16 import's towers (big_mm/export/hf.py), the image tower made a video one.
  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          video=dict(tower="video_vit", variant="B/16", tubelet_size=2, pool="map",
                     posemb="learn", attention="joint", scan=True,
                     remat_policy="nothing_saveable", attn_implementation="auto",
                     dtype="bfloat16"),
          text=dict(variant="B", vocab_size=32_000, pool="last_position", scan=True,
                    dtype="bfloat16"),
      ),
      out_dim=dict(video=0, text=768),  # SigLIP: the MAP output, the text tower's head
      temperature_init=10.0,
      bias_init=-10.0,
  )
  c.init = dict(path=arg.init, inflate="average")
  c.objective = dict(name="contrastive", loss="sigmoid", strategy="ring",
                     modalities=("video", "text"))
  c.optim = dict(name="adamw", lr=2e-4, b1=0.9, b2=0.98, wd=0.2, clip_norm=1.0,
                 lr_mults=(("txt/.*", 0.0), (".*", 1.0)),  # ViCLIP's freeze_text
                 schedule=dict(name="cosine", warmup_examples=arg.videos // 2,
                               end_lr_fraction=0.01))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  every = 20_000
  c.evals = dict(
      msrvtt=dict(type="retrieval", data=arg.msrvtt, split="test", modalities=("video", "text"),
                  pp_modalities={"video": eval_pp}, ks=(1, 5, 10), every_steps=every),
      ucf101_probe=dict(type="fewshot", data=arg.ucf101, split="test", train_split="train",
                        modality="video", pp_modalities={"video": eval_pp},
                        shots=(1, 5, 10), every_steps=every),
  )
  c.checkpoint = dict(every_steps=2_000, keep=3)
  return c
