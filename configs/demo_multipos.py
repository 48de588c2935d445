r"""Demo: multi-positive SigLIP (several captions per image, DreamLIP-style) on the digits.

Command (from the repo root, after `python data/build_demo.py` and
`python data/digits_multicaption.py`):

  python -m big_mm.train --config configs/demo_multipos.py:k=2 --workdir /tmp/big_mm_multipos_k2
  python -m big_mm.train --config configs/demo_multipos.py:k=1 --workdir /tmp/big_mm_multipos_k1

configs/demo.py's model and optimizer, trained on data/digits_multicaption.py's table: the
digits_captions training images with 3 different captions each. Each step takes `batch`
images and k of each image's captions (input.captions_per_example; k = 1: one caption drawn
per step, pp_text's choose_caption), all k positives of their image in the loss; so every run
sees the same images per step, and the text tower embeds batch * k captions. Evaluated like the demo: zero-shot with the
held-out prompts and retrieval on digits_captions' 300 held-out images.
`text=paragraph` trains on the same 3 captions written as one long caption (16-29 tokens, over
the 16-token text length), split back into sentences by input.split_long_captions.

Hardware: any CPU (measured on 2 cores). Expected result and measured numbers: README.md
("Multi-positive captions") and docs/benchmarks.md.

Arguments (`configs/demo_multipos.py:k=3,loss=softmax`): k, loss (sigmoid|softmax), steps,
batch, text (captions|paragraph), data (the table's path; default
data/digits_multicaption.py's).
"""
from big_mm import config as config_lib
from configs import demo
from data import digits_multicaption


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, k=2, loss="sigmoid", steps=300, batch=128, text="captions",
                             data="")
  c = demo.get_config(f"loss={arg.loss},steps={arg.steps},batch={arg.batch}")
  c.input.data = f"parquet:{arg.data or digits_multicaption.default_path()}"
  c.input.image_column = "image"
  c.input.text_column = arg.text
  c.input.captions_per_example = arg.k
  if arg.k == 1:  # one caption drawn per step (without choose_caption: always the first)
    c.input.pp_text = f"choose_caption|tokenize({c.input.text_len})"
  c.input.split_long_captions = arg.text == "paragraph"
  c.evals.zeroshot.data = "digits_captions"
  c.evals.retrieval.data = "digits_captions"
  c.evals.zeroshot.every_steps = c.evals.retrieval.every_steps = arg.steps
  c.checkpoint.every_steps = arg.steps
  return c
