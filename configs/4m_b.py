r"""4M-B (arXiv 2312.06647) pretraining over RGB, depth and semseg tokens and captions.

  python tools/tokenize_dataset.py --data my_dataset --tokenizer rgb=RUN_rgb \
      --tokenizer depth=RUN_depth --tokenizer semseg=RUN_semseg
  python -m big_mm.train --config configs/4m_b.py:data=my_dataset_tokens,tokenizers=RUN \
      --workdir gs://bucket/4m_b

Intended hardware: 64 A100s as in apple/ml-4m (global batch 8192), or a TPU v4-128.
Recipe (apple/ml-4m@cda590f cfgs/default/4m/models/main/4m-b_mod7_500b.yaml and
fourm/data/modality_info.py): encoder 12 and decoder 12 blocks of width 768, 12 heads;
224 px at patch 16, so 196 tokens per image-like modality; vocabularies tok_rgb 16,384,
tok_depth 8,192, tok_semseg 4,096, captions 30,000 word pieces up to 256 tokens; 128 input and
128 target tokens per example; 500B tokens (input + target) in all with 10B of warmup, i.e.
~1.95B examples, ~238k steps of 8192 and ~4.8k warmup steps; AdamW b=(0.9, 0.95), eps 1e-8,
wd 0.05, base lr 1e-4 x batch / 256 = 3.2e-3, cosine to 0, bf16, no clipping; loss = mean of
the per-modality losses.
Differences:
- 4M-7 has 7 modalities (also RGB pixels as input, surface normals, CLIP features, boxes);
  this config has the three image-like ones that big_mm tokenizes and the caption.
- 4M mixes two Dirichlet settings (half the batch RGB -> all, half all -> all with alpha
  0.5); here one symmetric Dirichlet(0.5) splits both budgets.
- 4M's blocks are SwiGLU without biases, and its captions are span-masked T5-style. Here the
  blocks are big_mm's ViT blocks (GELU MLP, biases), and a caption is wholly input or
  wholly target (see objectives/fourm.py).
- 4M's RGB and depth tokenizers have ViT-B encoders and diffusion (UNet) decoders, its semseg
  tokenizer is a VQ-VAE (ml-4m cfgs/default/tokenization/divae/, vqvae/semseg_coco/);
  big_mm's are conv VQ / FSQ tokenizers (configs/demo_4m_tokenizer.py is the recipe at demo
  scale). Train one per modality on your data at 224 px, downsample 16, and set VOCAB to
  their codebooks.
Data: any dataset with image / depth / semseg / caption fields, pre-tokenized with
tools/tokenize_dataset.py (CC12M with pseudo labels, as 4M, is not in TFDS).
Size (tests/test_fourm.py): 199.5M params besides 113.2M in token embeddings and output
heads (ml-4m lists 198M for 4M-B).
Expected result: ml-4m's README publishes no pretraining metric for 4M-B, so none is
claimed here.
Arguments: data, tokenizers (the vq_tokenizer workdirs' prefix: PREFIX_rgb, ...), batch,
text_tokenizer (a SentencePiece model of your captions), text_vocab.
"""
from big_mm import config as config_lib

TOKENS_PER_EXAMPLE = 128 + 128
TOTAL_TOKENS = 500e9
WARMUP_TOKENS = 10e9
VOCAB = (("tok_rgb", 16_384), ("tok_depth", 8_192), ("tok_semseg", 4_096))
GRID = (14, 14)  # 224 px / 16


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="cc12m_tokens", tokenizers="gs://bucket/4m_tok",
                             batch=8192, text_tokenizer="gs://bucket/captions_spm.model",
                             text_vocab=30_000)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_examples = int(TOTAL_TOKENS / TOKENS_PER_EXAMPLE)
  c.log_every_steps = 100

  c.input = dict(data=arg.data, split="train",
                 modalities=("tok_rgb", "tok_depth", "tok_semseg", "text"),
                 pp_image="decode|resize(224)|value_range(-1,1)", tokenizer=arg.text_tokenizer,
                 text_len=256, num_workers=16)

  c.model_name = "fourm"
  c.model = dict(
      modalities=("tok_rgb", "tok_depth", "tok_semseg", "text"),
      vocab_sizes=VOCAB + (("text", arg.text_vocab),),
      grids=tuple((m, GRID) for m, _ in VOCAB), text_len=256,
      encoder=dict(variant="B"), decoder=dict(variant="B"), dtype="bfloat16")
  c.objective = dict(
      name="fourm", num_input_tokens=128, num_target_tokens=128, dirichlet_alpha=0.5,
      target_dirichlet_alpha=0.5, text_target_prob=0.5,
      tokenizers=tuple((m, f"{arg.tokenizers}_{m}") for m in ("rgb", "depth", "semseg")))
  c.optim = dict(name="adamw", lr=1e-4 * arg.batch / 256, b1=0.9, b2=0.95, eps=1e-8, wd=0.05,
                 clip_norm=None,
                 schedule=dict(name="cosine",
                               warmup_examples=int(WARMUP_TOKENS / TOKENS_PER_EXAMPLE)))
  c.evals = {}
  c.checkpoint = dict(every_steps=5_000, keep=3)
  return c
