"""open_clip export: `open_clip_config.json` + `open_clip_model.safetensors` in a directory,
the layout `open_clip.create_model_and_transforms("local-dir:DIR")` (and `hf-hub:` repos) read.

Targets open_clip's native `CLIP` model (VisionTransformer + TextTransformer), configured with
tanh-GELU (`act_kwargs={"approximate": "tanh"}`) and LayerNorm eps 1e-6 (`norm_kwargs`) so the
function is big_mm's exactly. State-dict keys (open_clip/model.py, transformer.py):

  visual.conv1.weight, visual.class_embedding, visual.positional_embedding, visual.ln_pre.*,
  visual.transformer.resblocks.{i}.{ln_1,attn.in_proj_weight,attn.in_proj_bias,attn.out_proj,
  ln_2,mlp.c_fc,mlp.c_proj}.*, visual.ln_post.*, visual.proj [D, P],
  token_embedding.weight, positional_embedding [L, D], transformer.resblocks.{i}..., ln_final.*,
  text_projection [D, P] (or text_projection.{weight,bias} with proj_bias), logit_scale [],
  logit_bias [] (when init_logit_bias is set).

What maps: image pool="tok" (pre_norm on -> ln_pre, off -> no_ln_pre=True), image head without
bias (or none: identity projection); text pool "last" (open_clip pool_type "eos", eos_id=1),
"last_position" ("last") or "first", causal or not (no_causal_mask), text head with or without
bias; b -> logit_bias. Refused: MAP / gap image pooling (open_clip's native ViT always carries
a class token; SigLIP-style MAP towers need timm in open_clip), text pool "mean"/"map",
pad_mask=True unless causal with pool "last" (open_clip's CLIP.encode_text masks no pads),
non-integer head_width / mlp_ratio, rep_size. The patch-embedding bias is folded into the
position embedding as for HF CLIP. The tokenizer is not converted: open_clip has no
SentencePiece-file tokenizer option, so tokenize with big_mm's tokenizer (spiece.model is copied).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping, Optional

import numpy as np

from big_mm.export import common, hf
from big_mm.export.common import ExportError


def _resblocks(bm, oc, depth, heads):
  rules = []
  for i in range(depth):
    b, o = f"{bm}/encoderblock_{i}", f"{oc}.resblocks.{i}"
    rules += hf._ln(f"{b}/LayerNorm_0", f"{o}.ln_1")
    rules += hf._packed_attn(f"{b}/MultiHeadDotProductAttention_0", f"{o}.attn", heads)
    rules += hf._ln(f"{b}/LayerNorm_1", f"{o}.ln_2")
    rules += hf._dense(f"{b}/MlpBlock_0/Dense_0", f"{o}.mlp.c_fc")
    rules += hf._dense(f"{b}/MlpBlock_0/Dense_1", f"{o}.mlp.c_proj")
  return rules


def open_clip_rules(img, txt, *, text_proj_bias: bool) -> list:
  rules = [hf.Rule(["img/embedding/kernel", "img/embedding/bias", "img/cls", "img/pos_embedding"],
                   ["visual.conv1.weight", "visual.class_embedding",
                    "visual.positional_embedding"],
                   lambda a: hf.clip_rules(img, txt)[0].fwd(a),
                   lambda a: hf.clip_rules(img, txt)[0].inv(a))]
  if img.get("pre_norm"):
    rules += hf._ln("img/norm_pre", "visual.ln_pre")
  rules += _resblocks("img/Transformer", "visual.transformer", img["depth"], img["num_heads"])
  rules += hf._ln("img/Transformer/encoder_norm", "visual.ln_post")
  rules.append(hf._same("img/head/kernel", "visual.proj"))  # x @ proj: kernel orientation
  rules.append(hf._same("txt/Embed_0/embedding", "token_embedding.weight"))
  rules.append(hf._posemb("txt/pos_embedding", "positional_embedding"))
  rules += _resblocks("txt/Encoder_0", "transformer", txt["depth"], txt["num_heads"])
  rules += hf._ln("txt/Encoder_0/encoder_norm", "ln_final")
  if text_proj_bias:
    rules += hf._dense("txt/head", "text_projection")
  else:
    rules.append(hf._same("txt/head/kernel", "text_projection"))
  scalar = lambda a: [a[0].reshape(())]  # noqa: E731
  rules.append(hf.Rule(["t"], ["logit_scale"], scalar, lambda a: [a[0].reshape(1)]))
  rules.append(hf.Rule(["b"], ["logit_bias"], scalar, lambda a: [a[0].reshape(1)]))
  return rules


TEXT_POOL = {"last": "eos", "last_position": "last", "first": "first"}


def problems_for(img, txt, dims, flat) -> list[str]:
  problems = []
  if img["pool"] != "tok":
    problems.append(f"image.pool={img['pool']!r}: open_clip's native ViT pools a class token "
                    "('tok'); MAP/gap towers need timm there. Use pool='tok'.")
  if img.get("rep_size"):
    problems.append("image.rep_size (tanh pre-logits layer) has no open_clip counterpart.")
  hf._square(img, problems)
  if "img/head/bias" in flat and np.any(flat["img/head/bias"] != 0):
    problems.append("image head has a non-zero bias; open_clip's visual.proj has none "
                    "(train with model.image.head_bias=False).")
  if txt["pool"] not in TEXT_POOL:
    problems.append(f"text.pool={txt['pool']!r}: open_clip pools 'eos', 'last' or 'first'.")
  if txt.get("pad_mask") and not (txt.get("causal") and txt["pool"] == "last"):
    problems.append("text.pad_mask=True: open_clip's CLIP.encode_text masks no pads (only the "
                    "causal mask), so this maps only with causal=True and pool='last'.")
  for tower, o in (("image", img), ("text", txt)):
    if o["width"] % o["num_heads"]:
      problems.append(f"{tower} width {o['width']} not divisible by num_heads.")
  img_out, txt_out = dims[0] or img["width"], dims[1] or txt["width"]
  if img_out != txt_out:
    problems.append(f"embedding sizes differ: image {img_out} vs text {txt_out}.")
  return problems


def export_open_clip(params, model_kwargs: Mapping, out_dir: str, *,
                     image_size: Optional[int] = None, tokenizer: Optional[str] = None) -> str:
  from safetensors.numpy import save_file
  kwargs = common.model_kwargs(model_kwargs)
  img, txt, dims = common.resolved_arch(kwargs)
  # Shape checks and sincos tables as for HF; the HF-specific refusals are replaced by ours.
  flat = common.unstack_layers(common.flatten(params))
  common.check_refusals(problems_for(img, txt, dims, flat), "open_clip (native CLIP)")
  flat, img, txt, dims, image_size, text_len = hf.prepare(params, kwargs, "clip",
                                                          image_size=image_size, check=False)
  # prepare(.., "clip") added identity heads where there were none and dropped b / head bias;
  # restore what open_clip can carry.
  raw = common.flatten(params)
  text_proj_bias = "txt/head/bias" in raw and bool(dims[1])
  if text_proj_bias:
    flat["txt/head/bias"] = np.asarray(raw["txt/head/bias"], np.float32)
  flat["b"] = np.asarray(raw["b"], np.float32)
  state = hf.to_hf_state_dict(flat, open_clip_rules(img, txt, text_proj_bias=text_proj_bias))
  embed_dim = dims[0] or img["width"]

  def tower(o):
    return dict(width=o["width"], layers=o["depth"], mlp_ratio=o["mlp_dim"] / o["width"],
                act_kwargs={"approximate": "tanh"}, norm_kwargs={"eps": hf.LN_EPS})
  vision_cfg = dict(tower(img), head_width=img["width"] // img["num_heads"],
                    patch_size=img["patch_size"][0], image_size=image_size,
                    no_ln_pre=not img.get("pre_norm"), pool_type="tok")
  text_cfg = dict(tower(txt), heads=txt["num_heads"], context_length=text_len,
                  vocab_size=flat["txt/Embed_0/embedding"].shape[0], pad_id=0, eos_id=1,
                  no_causal_mask=not txt.get("causal"), pool_type=TEXT_POOL[txt["pool"]],
                  proj_bias=text_proj_bias)
  for name, cfg in (("vision", vision_cfg), ("text", text_cfg)):
    if int(cfg["width"] * cfg["mlp_ratio"]) != (img if name == "vision" else txt)["mlp_dim"]:
      raise ExportError(f"{name} mlp_dim is not width * a float open_clip reproduces exactly.")
  model_cfg = dict(embed_dim=embed_dim, quick_gelu=False, vision_cfg=vision_cfg,
                   text_cfg=text_cfg, init_logit_bias=float(flat["b"].reshape(-1)[0]))
  preprocess_cfg = dict(size=[image_size, image_size], mode="RGB", mean=[0.5] * 3,
                        std=[0.5] * 3, interpolation="bilinear", resize_mode="squash")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
  save_file(state, os.path.join(out_dir, "open_clip_model.safetensors"))
  if tokenizer:
    shutil.copyfile(tokenizer, os.path.join(out_dir, "spiece.model"))
  return out_dir
