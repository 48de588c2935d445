r"""Demo: a tiny 4M (any-to-any masked modelling over discrete tokens) on the scenes, on CPU.

Commands (from the repo root, after `python data/build_demo.py --data_dir DIR`):

  for m in rgb depth semseg; do  # the tokenizers (configs/demo_4m_tokenizer.py)
    python -m big_mm.train --config configs/demo_4m_tokenizer.py:modality=$m \
        --workdir /tmp/big_mm_4m_tok_$m --config.input.data_dir=DIR
  done
  python tools/tokenize_dataset.py --data multimodal_scenes --data_dir DIR \
      --tokenizer rgb=/tmp/big_mm_4m_tok_rgb --tokenizer depth=/tmp/big_mm_4m_tok_depth \
      --tokenizer semseg=/tmp/big_mm_4m_tok_semseg
  python -m big_mm.train --config configs/demo_4m.py --workdir /tmp/big_mm_4m \
      --config.input.data_dir=DIR

The scenes' RGB, depth and semseg are 8x8 = 64 codes each (FSQ, 1000 codes) and the caption
is up to 24 word pieces (data/scenes_spm.model): 216 tokens per example. Each step every
example gets 64 input and 64 target tokens, split across the modalities by Dirichlet(alpha)
(objective "fourm"; the caption is wholly input or wholly target). A width-128 encoder
(depth 4) and decoder (depth 2) over the tokens. Evaluated on the 500 held-out scenes with
the cross_modal evaluator, as the MultiMAE demo: depth / semseg / caption generated from RGB
alone (MaskGIT, 8 steps; captions greedily), chained RGB -> depth -> semseg, and RGB from
depth + semseg, each generated token grid decoded by its tokenizer and scored against the
true map beside the training-mean baseline. The tokenizers' own round trip bounds what 4M
can reach (configs/demo_4m_tokenizer.py).
Targets that share their inputs are generated in the order listed, each added to the inputs
of the next (4M's chained generation): semseg_from_rgb is RGB -> depth -> semseg and
text_from_rgb RGB -> depth -> semseg -> caption.

Measured (2026-12-06, 2-core CPU, 1 device, 1,500 steps of batch 64: 23 min 15 s of training,
0.67 s/step alone and 1.1-1.3 s/step while other jobs shared the CPU, then 3 min 15 s of
evaluation), held-out 500 scenes, 4M vs the training-mean baseline (the MultiMAE demo's
numbers in brackets): depth from RGB abs-rel 0.152 vs 0.230 (0.160), delta<1.25 0.795 vs
0.671 (0.784); semseg from RGB (chained through generated depth) mIoU 0.359 vs 0.223 (0.384),
pixel accuracy 0.906 vs 0.893 (0.919); semseg from RGB + true depth mIoU 0.385; caption from
RGB exact match 1.6% vs 0.6% (the most frequent caption), token accuracy 0.319 vs 0.208; RGB
from depth + semseg PSNR 16.21 vs 17.10 dB (17.47): the scene colours are random, and a
generated image commits to some (argmax codes), so it scores below the blurred mean image. Final training accuracies on target tokens:
depth 0.47, semseg 0.33, caption 0.63, rgb 0.06.

Arguments (`configs/demo_4m.py:steps=1500,batch=64`): steps, batch, inputs / targets (token
budgets), alpha (Dirichlet of both splits), tokenizers (the workdirs' prefix: PREFIX_rgb,
PREFIX_depth, PREFIX_semseg).
"""
from big_mm import config as config_lib

EVAL_PP = "decode|value_range(-1,1)"
GRID_NAMES = ("rgb", "depth", "semseg")


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, steps=1500, batch=64, inputs=64, targets=64, alpha=0.5,
                             tokenizers="/tmp/big_mm_4m_tok")
  c = config_lib.ConfigDict()
  c.seed = 0
  c.batch_size = arg.batch
  c.total_steps = arg.steps
  c.log_every_steps = 100

  # The dense maps are loaded for the evaluators' ground truth; training reads only the codes
  # and the caption. No flips: the codes were computed on the unflipped images.
  c.input = dict(data="multimodal_scenes_tokens", split="train", data_dir=None,
                 modalities=("tok_rgb", "tok_depth", "tok_semseg", "text", "depth", "semseg"),
                 pp_image=EVAL_PP, tokenizer="data/scenes_spm.model", text_len=24,
                 num_workers=0)

  c.model_name = "fourm"
  c.model = dict(
      modalities=("tok_rgb", "tok_depth", "tok_semseg", "text"),
      vocab_sizes=(("tok_rgb", 1000), ("tok_depth", 1000), ("tok_semseg", 1000),
                   ("text", 19)),
      grids=tuple((f"tok_{m}", (8, 8)) for m in GRID_NAMES), text_len=24,
      encoder=dict(width=128, depth=4, mlp_dim=512, num_heads=4),
      decoder=dict(width=128, depth=2, mlp_dim=512, num_heads=4))
  c.objective = dict(
      name="fourm", num_input_tokens=arg.inputs, num_target_tokens=arg.targets,
      dirichlet_alpha=arg.alpha, target_dirichlet_alpha=arg.alpha, text_target_prob=0.5,
      tokenizers=tuple((m, f"{arg.tokenizers}_{m}") for m in GRID_NAMES), num_steps=8)

  c.optim = dict(name="adamw", lr=2e-3, b1=0.9, b2=0.95, wd=0.05, clip_norm=1.0,
                 schedule=dict(name="cosine", warmup_steps=min(100, arg.steps // 10)))
  c.evals = dict(
      cross_modal=dict(
          type="cross_modal", split="test", every_steps=arg.steps, pp_image=EVAL_PP,
          baseline_examples=1024,
          predictions=(("depth", ("rgb",)), ("semseg", ("rgb",)), ("text", ("rgb",)),
                       ("semseg", ("rgb", "depth")), ("rgb", ("depth", "semseg")))),
  )
  c.checkpoint = dict(every_steps=max(arg.steps // 4, 1), keep=2)
  return c
