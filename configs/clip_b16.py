r"""CLIP ViT-B/16 (arXiv 2103.00020) as trained by OpenCLIP on LAION-400M, softmax loss.

  python -m big_mm.train --config configs/clip_b16.py:data=laion400m --workdir gs://bucket/clip_b16

Intended hardware: the OpenCLIP run used 176 A100s (global batch 33,792, ~61 h); on TPU a
v4-128 or larger with FSDP.
Model (open_clip ViT-B-16): image ViT-B/16 at 224 px, class-token pooling, 512-d embedding;
text 12 layers, width 512, 8 heads, 77 tokens, causal, pooled at the end-of-text token.
Optimizer (open_clip defaults, "from the paper"): AdamW lr 5e-4, betas (0.9, 0.98),
eps 1e-6, wd 0.2, 10k warmup steps, cosine, 32 epochs of LAION-400M (~13B examples), no clip.
Temperature initialised to 1/0.07 (open_clip also clamps it at 100; big_mm does not clamp).
Expected result (OpenCLIP B/16 laion400m_e32): ImageNet zero-shot 67.07%,
COCO R@1 text->image 38.4, image->text 55.4.
Arguments: data, batch, examples.
Before running: a tokenizer. open_clip's is OpenAI's byte-level BPE, which is not
SentencePiece: train a BPE SentencePiece of the same size on your captions
(`python tools/make_tokenizer.py --data DATA --model_type bpe --vocab_size 49408 --out
clip_bpe_49408.model`; missing, the run stops at start-up saying so), and TFDS imagenet2012
(zero-shot: CLIP's class names and 80 templates) and coco_captions prepared in input.data_dir
for the evaluators.
"""
from big_mm import config as config_lib
from configs import common


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="laion400m", batch=33_792, examples=12_800_000_000)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = arg.examples
  c.log_every_steps = 100

  pp = "decode|resize(224)|value_range(-1,1)"
  c.input = dict(data=arg.data, split="train", tokenizer="clip_bpe_49408.model", text_len=77,
                 pp_image=pp, num_workers=8)
  c.model_name = "towers"
  c.model = dict(
      towers=dict(
          image=dict(variant="B/16", pool="tok", posemb="learn", scan=True,
                     remat_policy="nothing_saveable", dtype="bfloat16"),
          text=dict(width=512, depth=12, mlp_dim=2048, num_heads=8, vocab_size=49_408,
                    causal=True, pool="last", scan=True, remat_policy="nothing_saveable",
                    dtype="bfloat16"),
      ),
      out_dim=512,
      temperature_init=1 / 0.07,
      bias_init=None,
  )
  c.objective = dict(name="contrastive", loss="softmax", strategy="ring")
  c.optim = dict(name="adamw", lr=5e-4, b1=0.9, b2=0.98, eps=1e-6, wd=0.2, clip_norm=None,
                 wd_mask=r".*/kernel$",
                 schedule=dict(name="cosine", warmup_steps=10_000))
  c.evals = common.paper_evals(pp, every_steps=10_000)
  c.checkpoint = dict(every_steps=2_000, keep=3)
  return c
