r"""Demo: video-text SigLIP on moving digits: a space-time tower against the frame-average
baseline at the same budget (issue claim: the space-time tower wins on held-out motion).

Data (`python data/build_demo.py --video`): moving_digits (data/moving_digits.py), 16-frame
32x32 clips of the bundled digits moving left / right / up / down, turning clockwise /
anticlockwise, bouncing, or one digit replaced by another, captioned ("a 3 moving to the
left", "the 7 appears after the 2"). Time-reversed classes show the same frames in reverse
order, so no single frame (and no average of frames) tells left from right: only a tower
that sees the order can. Test clips use held-out digit images.

Towers (`tower=`):
  video_vit  (default) a space-time ViT: 2x8x8 tubelets (8 x 4 x 4 = 128 tokens), joint
             space-time attention, learned separable position embeddings, MAP pooling.
  frame_vit  the CLIP4Clip mean-pooling baseline: the same ViT on every frame (8x8 patches, 16
             tokens a frame), its pooled features averaged over the 16 frames.
Both: width 64, depth 2, the same text tower, batch, steps and optimiser.

Evaluations on the test split (800 clips, at the end): video<->text retrieval (R@k: the
clip's own caption; class_R@k: a caption of the same motion class), zero-shot motion
classification with prompts that are never captions ("a video of a digit moving left"),
and a linear probe (ridge, big_vision's fewshot) on the video embedding, with 50 training
clips per class.

Commands (from the repo root; minutes on 2 CPU cores):

  python -m big_mm.train --config configs/demo_video_text.py --workdir /tmp/video_text
  python -m big_mm.train --config configs/demo_video_text.py:tower=frame_vit \
      --workdir /tmp/video_text_frames

README.md and docs/benchmarks.md give the measured metrics.

Arguments: tower (video_vit|frame_vit), attention (joint|factorised; video_vit), loss
(sigmoid|softmax), steps, batch.
"""
from big_mm import config as config_lib
from data import moving_digits

TOKENIZER = "data/moving_digits_spm.model"
# All 16 frames (the clips are 16 frames long); the digits already sit at random places, so no
# spatial augmentation (a horizontal flip would turn "left" into "right").
VIDEO_PP = "decode_video|sample_clip(16)|video_resize(32)|video_value_range(-1, 1)"
TOWER = dict(width=64, depth=2, mlp_dim=256, num_heads=4, posemb="learn", pool="map")


def video_evals(pp: str = VIDEO_PP, modality: str = "video") -> dict:
  """Retrieval, zero-shot and a linear probe of motion on moving_digits test."""
  test = dict(data="moving_digits", split="test", pp_modalities={modality: pp})
  return {
      "retrieval": dict(test, type="retrieval", modalities=(modality, "text"),
                        captions_per_image=1, ks=(1, 5)),
      "zeroshot": dict(test, type="zeroshot", modality=modality,
                       classnames=moving_digits.CLASS_NAMES,
                       templates=moving_digits.ZEROSHOT_TEMPLATES),
      "probe": dict(test, type="fewshot", modality=modality, train_split="train[:1600]",
                    shots=(50,)),
  }


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, tower="video_vit", attention="joint", loss="sigmoid",
                             steps=800, batch=64)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  c.input = dict(data="moving_digits", split="train", data_dir=None, tokenizer=TOKENIZER,
                 text_len=16, modalities=("video", "text"), pp_modalities={"video": VIDEO_PP},
                 num_workers=1)

  video = dict(TOWER, tower=arg.tower, patch_size=8)
  if arg.tower == "video_vit":
    video.update(tubelet_size=2, attention=arg.attention)
  c.model_name = "towers"
  c.model = dict(
      towers=dict(video=video,
                  text=dict(width=64, depth=2, mlp_dim=256, num_heads=4, vocab_size=224,
                            pool="last_position")),
      out_dim=64, temperature_init=10.0,
      bias_init=-10.0 if arg.loss == "sigmoid" else None)
  c.objective = dict(name="contrastive", modalities=("video", "text"), loss=arg.loss,
                     strategy="all_gather")
  c.optim = dict(name="adamw", lr=3e-3, b1=0.9, b2=0.95, wd=1e-4, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(50, arg.steps // 10)))
  c.evals = video_evals()
  c.checkpoint = dict(every_steps=400, keep=1)
  return c
