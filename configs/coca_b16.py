r"""CoCa (arXiv 2205.01917) at B-size: contrastive + captioning pretraining from scratch.

  python -m big_mm.train --config configs/coca_b16.py:data=my_dataset --workdir gs://bucket/coca_b16

Intended hardware: TPU v4-64 or larger / 32+ H100s (global batch 32k unverified).
Model, after open_clip's model_configs/coca_ViT-B-32.json with a /16
image tower: ViT-B/16 at 224 px whose tokens feed the multimodal decoder and whose MAP
pooler gives the contrastive embedding (512); unimodal causal text decoder 12L/512/8H with
an appended cls token (the text embedding); multimodal decoder 12L/512/8H with
cross-attention to the image tokens. Differences from open_clip: no 256-query attentional
pooler in front of the multimodal decoder (it reads the image tokens directly); every
multimodal layer cross-attends (the paper omits cross-attention in its first half).
Loss (verified, open_clip defaults): 1.0 * contrastive (softmax, as CLIP) + 2.0 * captioning,
caption CE ignores pads. Unverified: the paper's batch (65,536), lr, steps, optimizer; the
values below follow configs/clip_b16.py-style settings. Expected result: not verified here
(open_clip's coca_ViT-B-32 on laion2b_s13b_b90k: ImageNet 0-shot 63.3%).
Arguments: data, batch, examples, loss (softmax|sigmoid).
Before running: the tokenizer c4_en_32k.model, big_vision's published c4_en SentencePiece
(`gsutil cp gs://t5-data/vocabs/cc_en.32000/sentencepiece.model c4_en_32k.model`; missing,
the run stops at start-up saying so), and TFDS imagenet2012 (zero-shot: CLIP's class names
and 80 templates) and coco_captions prepared in input.data_dir for the evaluators.
"""
from big_mm import config as config_lib
from configs import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="laion2b_tfds", batch=32_768, examples=13_000_000_000,
                             loss="softmax", res=224)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.examples
  c.log_every_steps = 100

  pp = f"decode|resize({arg.res})|value_range(-1,1)"
  c.input = dict(data=arg.data, split="train", tokenizer="c4_en_32k.model", text_len=76,
                 pp_image=pp, num_workers=8)

  c.model_name = "coca"
  c.model = dict(
      image=dict(variant="B/16", posemb="learn", scan=True, remat_policy="nothing_saveable",
                 dtype="bfloat16"),
      text=dict(width=512, depth=12, mlp_dim=2048, num_heads=8, vocab_size=32_000, max_len=76,
                dtype="bfloat16"),
      multimodal=dict(depth=12),
      out_dim=512,
      temperature_init=1 / 0.07,
      bias_init=-10.0 if arg.loss == "sigmoid" else None,
  )
  c.objective = dict(name="coca", loss=arg.loss, strategy="all_gather",
                     contrastive_weight=1.0, caption_weight=2.0)
  c.optim = dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, wd=0.2, clip_norm=None,
                 schedule=dict(name="cosine", warmup_steps=10_000))
  c.mesh = dict(data=-1, fsdp=1, tensor=1)
  c.evals = common.paper_evals(pp, every_steps=10_000)
  c.checkpoint = dict(every_steps=2_000, keep=3)
  return c
