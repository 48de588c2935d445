r"""Demo: SigLIP 2's NaFlex (native aspect ratio) against squashing to a square, on wide
compositional canvases: digits_pairs_wide (data/digits_pairs.py; 32x64 images of two digits,
captions naming them in order, 100 ordered-pair classes).

Commands (from the repo root, after `python data/build_demo.py`):

  python -m big_mm.train --config configs/demo_naflex.py --workdir /tmp/naflex
  python -m big_mm.train --config configs/demo_naflex.py:naflex=false --workdir /tmp/squash

naflex=true: `naflex(32, 8, lengths=(8, 16, 32))` keeps the 32x64 canvas's aspect ratio as a
grid of 8x8 patches, each training example at a patch budget drawn from 8 / 16 / 32 (grids 2x4,
3x5, 4x8; padded to 32), as SigLIP 2 trains NaFlex over several sequence lengths;
`:lengths=false` trains at 32 only. naflex=false: `resize(48)` squashes the canvas to 48x48, a
6x6 grid (36 tokens). Both store a 6x6 position grid (NaFlex resizes it to each grid), so the
two models have the same parameters. The NaFlex run is evaluated at 32, 16 and 8 tokens
(evals.*.naflex_lengths), SigLIP 2's "one checkpoint, several sequence lengths".
Hardware: any CPU (measured on 2 cores, 1 device). Results: README.md (NaFlex section).

Arguments (`configs/demo_naflex.py:naflex=false,steps=300`): naflex, lengths, steps, batch.
"""
from big_mm import config as config_lib
from configs import demo
from data import digits_pairs


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, naflex=True, lengths=True, steps=600, batch=128)
  c = demo.get_config(f"steps={arg.steps},batch={arg.batch}")
  sampled = ", lengths=(8, 16, 32)" if arg.lengths else ""
  pp = (f"decode|value_range(-1,1)|naflex(32, 8{sampled})" if arg.naflex else
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
