r"""Demo: SigLIP 2's NaFlex (native aspect ratio) against squashing to a square, on wide
compositional canvases: digits_pairs_wide (data/digits_pairs.py; 32x64 images of two digits,
captions naming them in order, 100 ordered-pair classes).

Commands (from the repo root, after `python data/build_demo.py`):

  python -m big_mm.train --config configs/demo_naflex.py --workdir /tmp/naflex
  python -m big_mm.train --config configs/demo_naflex.py:naflex=false --workdir /tmp/squash

naflex=true: `naflex(32, 8)` keeps the 32x64 canvas as a 4x8 grid of 8x8 patches (32 tokens);
naflex=false: `resize(48)` squashes it to 48x48, a 6x6 grid (36 tokens). Both store a 6x6
position grid (NaFlex resizes it to 4x8), so the two models have the same parameters. The
NaFlex run is also evaluated at 16 and 8 tokens (evals.*.naflex_lengths; grids 3x5 and 2x4),
SigLIP 2's "one checkpoint, several sequence lengths".
Hardware: any CPU (measured on 2 cores, 1 device). Results: README.md (NaFlex section).

Arguments (`configs/demo_naflex.py:naflex=false,steps=300`): naflex, steps, batch.
"""
from big_mm import config as config_lib
from configs import demo
from data import digits_pairs


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, naflex=True, steps=600, batch=128)
  c = demo.get_config(f"steps={arg.steps},batch={arg.batch}")
  pp = ("decode|value_range(-1,1)|naflex(32, 8)" if arg.naflex else
        "decode|resize(48)|value_range(-1,1)")
  c.input = dict(data="digits_pairs_wide", split="train", data_dir=None,
                 tokenizer="data/digits_pairs_spm.model", text_len=24, pp_image=pp,
                 num_workers=0)
  c.model.towers["image"].update(patch_size=(8, 8), posemb_grid=6)
  lengths = dict(naflex_lengths=(32, 16, 8)) if arg.naflex else {}
  # The first held-out template's prompt per class (the zeroshot evaluator's templates have
  # one slot; the class prompts name two digits).
  prompts = tuple(p[0] for p in digits_pairs.class_prompts())
  c.evals = dict(
      zeroshot=dict(type="zeroshot", split="test", every_steps=200, pp_image=None,
                    classnames=prompts, templates=("{}",), **lengths),
      retrieval=dict(type="retrieval", split="test", every_steps=200, pp_image=None,
                     **lengths),
  )
  return c
