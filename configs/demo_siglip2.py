r"""Demo: the SigLIP 2 recipe (objective.name="siglip2") at toy scale on 2 CPU cores.

Commands (from the repo root, after `python data/build_demo.py`):

  python -m big_mm.train --config configs/demo_siglip2.py --workdir /tmp/siglip2
  python -m big_mm.train --config configs/demo_siglip2.py:locca=false --workdir /tmp/siglip
  python -m big_mm.train --config configs/demo_siglip2.py:data=scenes,locca=false,sd=true \
      --workdir /tmp/siglip2_sd

data=boxes: digits_boxes (data/digits_boxes.py; 48x48 canvases with 2-3 digits at random places
and scales, captions naming them left to right, a box and a referring expression per digit):
the sigmoid loss plus, with locca=true, LocCa's decoder losses (captioning, referring
expressions, grounded captions; objectives/locca.py), evaluated by image-text retrieval, the
referring evaluator (Acc@0.5 of the decoded box; chance levels in data/digits_boxes.py) and
captioning. The crop and flip move the boxes with the image (big_mm/input/boxes.py).
data=scenes: multimodal_scenes (data/scenes.py; rendered 3-D scenes with captions, depth and
semantic maps; tokenizer data/scenes_spm.model, one piece per word: `python tools/make_tokenizer.py
--data multimodal_scenes --out data/scenes_spm.model --vocab_size 19 --model_type word
--normalization identity`): the sigmoid loss plus, with sd=true, self-distillation and masked prediction
from 80% of training on (SILC + TIPS with an EMA teacher; objectives/self_distill.py), measured
by retrieval and the dense linear probe (evaluators/dense_probe.py: semseg mIoU, depth RMSE).
patch_dropout=0.5: FLIP patch dropout with the last 10% of steps unmasked.
Towers: the demo's 2-layer width-64 towers (configs/demo.py); 6x6 patches on 48x48 canvases
(64 tokens), 4x4 on the 32x32 scenes. Hardware: any CPU (measured on 2 cores, 1 device).
Results: README.md (SigLIP 2 section), docs/benchmarks.md.

Arguments (`configs/demo_siglip2.py:locca=false,steps=300`): data (boxes|scenes), locca, sd,
patch_dropout, crop (boxes: a random 48-pixel crop of the canvas resized to 56, else the whole
canvas; the crop clips a fifth of the boxes to the image edge), steps, batch.
"""
from big_mm import config as config_lib
from configs import demo

BOX_TEXT_LEN = 12  # digits_boxes_spm: an expression is at most 10 pieces, + EOS


def _boxes(c, arg):
  c.input = dict(data="digits_boxes", split="train", data_dir=None,
                 tokenizer="data/digits_boxes_spm.model", text_len=16,
                 pp_image=("decode|resize(56)|random_crop(48)|flip_lr|value_range(-1,1)"
                           if arg.crop else "decode|resize(48)|flip_lr|value_range(-1,1)"),
                 box_column="boxes", box_text_column="box_texts", max_boxes=3,
                 box_text_len=BOX_TEXT_LEN, num_workers=0)
  c.model.towers["image"]["patch_size"] = (6, 6)
  c.model.towers["text"]["vocab_size"] = 128
  eval_pp = "decode|resize(48)|value_range(-1,1)"
  c.evals = dict(retrieval=dict(type="retrieval", split="test", every_steps=200,
                                pp_image=eval_pp))
  if arg.locca:
    c.objective.update(locca_weight=1.0, locca_loc_bins=48, locca_box_text_len=BOX_TEXT_LEN,
                       locca_decoder=dict(width=64, depth=2, mlp_dim=256, num_heads=4))
    c.evals.update(
        referring=dict(type="referring", split="test", every_steps=200, pp_image=eval_pp),
        captioning=dict(type="captioning", split="test", pp_image=eval_pp,  # at the end
                        max_examples=200))


def _scenes(c, arg):
  c.input = dict(data="multimodal_scenes", split="train", data_dir=None,
                 tokenizer="data/scenes_spm.model", text_len=24,
                 pp_image="decode|resize(32)|flip_lr|value_range(-1,1)", num_workers=0)
  c.evals = dict(
      retrieval=dict(type="retrieval", split="test", every_steps=200,
                     pp_image="decode|resize(32)|value_range(-1,1)"),
      dense_probe=dict(type="dense_probe", split="test",  # at the end
                       pp_image="decode|resize(32)|value_range(-1,1)"))
  c.model.towers["text"]["vocab_size"] = 19
  if arg.sd:
    # Heads 16-64x smaller than DINO's; EMA decay 0.99 (0.996 barely moves the teacher over
    # the demo's 120 self-distillation steps).
    c.objective.update(silc_weight=1.0, tips_weight=0.25, self_distill_start_fraction=0.8,
                       self_distill_ema_decay=0.99, self_distill_head_hidden=256,
                       self_distill_head_bottleneck=64, silc_head_dim=1024, tips_head_dim=1024)


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, data="boxes", locca=True, sd=False, patch_dropout=0.0,
                             crop=True, steps=600, batch=128)
  c = demo.get_config(f"steps={arg.steps},batch={arg.batch}")
  c.objective = dict(name="siglip2", loss="sigmoid", strategy="all_gather")
  if arg.data == "boxes":
    _boxes(c, arg)
  elif arg.data == "scenes":
    _scenes(c, arg)
  else:
    raise config_lib.ConfigError(f"configs/demo_siglip2.py: data={arg.data!r}; choose boxes "
                                 "or scenes.")
  if arg.patch_dropout:
    c.model.towers["image"]["patch_dropout"] = float(arg.patch_dropout)
    c.objective.update(unmasked_tuning_fraction=0.1)
  return c
