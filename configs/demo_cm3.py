r"""Demo: CM3 (causally masked documents of image tokens and captions) on the bundled digits.

Commands (from the repo root, after `python data/build_demo.py --data_dir DIR`): an image
tokenizer, the digits' codes, the judge of generated images, then CM3:

  python -m big_mm.train --config configs/demo_cm3_tokenizer.py --workdir /tmp/big_mm_cm3_tok \
      --config.input.data_dir=DIR
  python tools/tokenize_dataset.py --data digits_captions --data_dir DIR \
      --tokenizer rgb=/tmp/big_mm_cm3_tok
  python tools/train_digit_classifier.py --data_dir DIR --out /tmp/big_mm_digit_judge.npz
  python -m big_mm.train --config configs/demo_cm3.py --workdir /tmp/big_mm_cm3 \
      --config.input.data_dir=DIR

A causal decoder (model "lm": width 128, depth 4, 0.9M parameters) over documents of the
image's 16 codes (the tokenizer's FSQ 8-6-5: 240 codes) and its caption, image first or caption
first, with CM3's causal masking (objective "cm3": k ~ Poisson(1) spans, at most 4). min_spans
is 0 here: CM3 masks at least one span per document, but these documents are ~30 tokens, so a
span almost always falls where a left-to-right prompt will generate, and a model that never saw
an unmasked document expects a sentinel there (measured below: min_spans=1 halves left-to-right
captioning).

Measured (2026-12-07, 2-core CPU, 1 device, jax 0.10.2; 3,000 steps of batch 64, 11.5 min at
0.22 s/step, plus ~1 min per evaluation) by the cm3 evaluator on the 300 held-out digits, chance
10% everywhere:
                                       min_spans=0 (default)   min_spans=1 (CM3's clamp)
  caption, left to right                     75.0%                   49.3%
  caption by infilling                       69.0%                   68.3%
  digit word infilled (image 1st / 2nd)      55.8% (58.0 / 53.7)     61.7% (62.0 / 61.3)
  caption -> image, judged                   29.7%                   21.3%
  generated image tokens that are codes      71.8%                   59.6%
The judge reads 96.3% of the test digits' tokenizer round trips right (the ceiling for judged
images; configs/demo_cm3_tokenizer.py); a CapPa captioner on the pixels names 95.0%
(configs/demo_cappa.py).

Arguments (`configs/demo_cm3.py:steps=3000,min_spans=1`): steps, batch, tokenizer (the
vq_tokenizer workdir), judge (the classifier .npz), codes (the tokenizer's codebook size),
tokens (its codes per image), min_spans (objective.min_spans).
"""
from big_mm import config as config_lib
from configs import common

TEXT_LEN = 16
MAX_SPANS = 4
TEXT_VOCAB = 128  # data/digits_spm.model


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=3000, batch=64, tokenizer="/tmp/big_mm_cm3_tok",
                             judge="/tmp/big_mm_digit_judge.npz", codes=240, tokens=16,
                             min_spans=0)
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 50

  c.input = dict(data="digits_captions_tokens", split="train", data_dir=None,
                 modalities=("tok_rgb", "text"), tokenizer="data/digits_spm.model",
                 text_len=TEXT_LEN, pp_image="decode|value_range(-1,1)", num_workers=0)

  seq_len = arg.tokens + TEXT_LEN + 4 + 2 * MAX_SPANS + 1
  vocab = TEXT_VOCAB + arg.codes + 4 + MAX_SPANS
  c.model_name = "lm"
  c.model = dict(decoder=dict(width=128, depth=4, mlp_dim=512, num_heads=4, vocab_size=vocab,
                              max_len=seq_len))
  c.objective = dict(name="cm3", image_tokens=arg.tokens, image_vocab=arg.codes,
                     image_tokenizer=arg.tokenizer, image_first_prob=0.5, mean_spans=1.0,
                     min_spans=arg.min_spans, max_spans=MAX_SPANS)

  c.optim = dict(name="adamw", lr=1e-3, b1=0.9, b2=0.95, wd=1e-4, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(100, arg.steps // 10)))
  c.evals = dict(tasks=dict(type="cm3", split="test", every_steps=arg.steps // 2,
                            max_examples=300, classnames=common.CAPTION_CLASSES, judge=arg.judge,
                            image_temperature=1.0, image_top_k=0))
  c.checkpoint = dict(every_steps=1000, keep=2)
  return c
