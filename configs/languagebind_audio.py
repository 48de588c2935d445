r"""LanguageBind audio (Zhu et al., ICLR 2024, arXiv 2310.01852): an audio ViT-L/14 bound to a
frozen, trained text tower; zero-shot ESC-50 and Clotho text->audio retrieval.

  python -m big_mm.train --config configs/languagebind_audio.py:data=my_audio_text,\
init=gs://bucket/clip_l14_run,esc50=esc50_tfds,clotho=clotho_tfds --workdir gs://bucket/lb_audio

Facts from PKU-YuanGroup/LanguageBind@7070c53:
- Audio input (scripts/audio_language/train.sh, data/process_audio.py): 16 kHz, Kaldi fbank
  with 126 mel bins, 25 ms windows every 10 ms, 1,036 frames (10.4 s); longer clips give three
  random 1,036-frame chunks (front / middle / back thirds) stacked as the 3 input channels,
  shorter ones are repeated to length; normalised as (x - (-4.2677393)) / (2 * 4.5689974).
- Audio encoder (model/build_model.py, model/process_clip.py resize_pos): the image tower of
  OpenCLIP ViT-L/14 (laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K) over the [126, 1036]
  spectrogram, 14 x 14 patches (9 x 74 grid), position embeddings interpolated; patch dropout
  0.1. Text tower: that CLIP's text transformer (12 layers, width 768, 77 tokens), frozen
  (--lock-text). Temperature initialised to 1/0.07 and learned. Loss: open_clip's softmax
  CLIP loss over the gathered batch.
- Optimizer (train.sh): AdamW lr 1e-3, betas (0.9, 0.98), eps 1e-6, wd 0.2, 2,000 warmup steps,
  cosine; 16 epochs of 4.8M samples (--train-num-samples), batch 1,024 (16 GPUs on 2 nodes
  x 16 per GPU x 4 accumulation steps): 75,000 steps. That script tunes LoRA adapters (r 16) on the
  CLIP weights; the fully tuned LanguageBind_Audio_FT's command is not in the repo.
- Zero-shot prompts (a_cls/zero_shot_metadata.py): "a sound of {}." and the ESC-50 names.
Expected result (README assets/res1.jpg, res2.jpg; LoRA / full tuning): ESC-50 zero-shot top-1
91.8 / 94.0, AudioSet 27.7 / 30.0 (mAP), VGGSound 28.9 / 38.6; Clotho text->audio R@1 12.1 /
16.7, R@10 44.0 / 52.0; AudioCaps R@1 12.2 / 19.7, R@10 53.2 / 67.6.

Differences here (the published numbers are a target, not a promise):
- The audio tower trains fully (no LoRA in big_mm) and starts from random init: config.init
  copies params by name and shape, and a CLIP image tower (img/..., 3 input channels, a 16 x 16
  position grid) does not map onto the audio tower (aud/..., 1 channel, 74 x 9). No patch
  dropout. One spectrogram channel: a random 10.4 s crop (eval: the central one), shorter clips
  zero-padded; log_mel is not Kaldi's fbank (no dithering / pre-emphasis): measure your data's
  mean / std for normalize_audio (the AudioSet numbers below are LanguageBind's).
- The text tower (`init=`): the txt/ params of a trained big_mm run with this architecture and
  tokenizer (e.g. a CLIP L/14 run; OpenAI's byte-level BPE is not SentencePiece: train a BPE
  SentencePiece as configs/clip_b16.py says), frozen by optim.lr_mults 0. Without `init` the
  frozen text tower is random: a smoke test only.
- Data: `data=` the user's audio-text pairs (a TFDS / array_record / parquet / tar source with
  "audio" (encoded bytes) and "text"); `esc50=` ESC-50 (audio + label, the 50 classes in the
  order below; fold 1-5 "test" split); `clotho=` Clotho's evaluation split as one record per
  (audio, caption) with label = the audio's index: text2audio/class_R@1 is Clotho's R@1.
Hardware: train.sh runs 16 GPUs (2 nodes x 8; their type is not named): here 16 A100 / H100
in bf16, or a TPU v4-32.
Arguments: data, init, esc50, clotho, batch, examples.
"""
from big_mm import config as config_lib

# PKU-YuanGroup/LanguageBind@7070c53 a_cls/zero_shot_metadata.py CLASSNAMES["ESC50"].
ESC50 = (
    "airplane", "breathing", "brushing teeth", "can opening", "car horn", "cat", "chainsaw",
    "chirping birds", "church bells", "clapping", "clock alarm", "clock tick", "coughing", "cow",
    "crackling fire", "crickets", "crow", "crying baby", "dog", "door wood creaks",
    "door wood knock", "drinking sipping", "engine", "fireworks", "footsteps", "frog",
    "glass breaking", "hand saw", "helicopter", "hen", "insects", "keyboard typing", "laughing",
    "mouse click", "pig", "pouring water", "rain", "rooster", "sea waves", "sheep", "siren",
    "sneezing", "snoring", "thunderstorm", "toilet flush", "train", "vacuum cleaner",
    "washing machine", "water drops", "wind")
FRAMES, MELS = 1036, 126
SECONDS = ((FRAMES - 1) * 10 + 25) / 1000  # 10.375 s: what 1,036 frames of 25 ms every 10 ms cover
NORMALIZE = "normalize_audio(-4.2677393, 9.1379948)"  # LanguageBind's mean, 2 * std
TEXT = r"txt/.*"


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="languagebind_audio_text", init="",
                             esc50="esc50", clotho="clotho_captions", batch=1024,
                             examples=76_800_000)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.examples
  c.log_every_steps = 100

  train_pp = (f"decode_audio(16000, 60)|random_crop_audio({SECONDS})|log_mel({FRAMES}, {MELS})|"
              f"{NORMALIZE}")
  eval_pp = {"audio": f"decode_audio(16000, 60)|central_crop_audio({SECONDS})|"
                      f"log_mel({FRAMES}, {MELS})|{NORMALIZE}"}
  c.input = dict(data=arg.data, split="train", modalities=("audio", "text"),
                 pp_modalities={"audio": train_pp}, tokenizer="clip_bpe_49408.model",
                 text_len=77, num_workers=16)

  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          audio=dict(variant="L/14", pool="tok", posemb="learn", scan=True,
                     remat_policy="nothing_saveable", dtype="bfloat16"),
          text=dict(width=768, depth=12, mlp_dim=3072, num_heads=12, vocab_size=49_408,
                    causal=True, pool="last", scan=True, dtype="bfloat16"),
      ),
      out_dim=768,  # CLIP ViT-L/14's embedding
      temperature_init=1 / 0.07,
      bias_init=None,
  )
  c.objective = dict(name="binding", loss="softmax", strategy="all_gather",
                     pairs=(("audio", "text", 1.0),))
  c.init = dict(workdir=arg.init or None, include=TEXT)
  c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.98, eps=1e-6, wd=0.2, clip_norm=None,
                 lr_mults=((TEXT, 0.0), (r".*", 1.0)),
                 schedule=dict(name="cosine", warmup_steps=2_000))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.evals = dict(
      zeroshot_esc50=dict(type="zeroshot", data=arg.esc50, split="test", modality="audio",
                          every_steps=5_000, classnames=ESC50, templates=("a sound of {}.",),
                          pp_modalities=eval_pp),
      retrieval_clotho=dict(type="retrieval", data=arg.clotho, split="test",
                            modalities=("audio", "text"), every_steps=5_000, ks=(1, 10),
                            pp_modalities=eval_pp),
  )
  c.checkpoint = dict(every_steps=2_000, keep=3)
  return c
