"""open_clip export: a directory that open_clip_torch (3.3 tested) loads through its public API:

  model, _, preprocess = open_clip.create_model_and_transforms("local-dir:DIR")
  tokenizer = open_clip.get_tokenizer("local-dir:DIR")

DIR holds open_clip_config.json, open_clip_model.safetensors and, with a tokenizer, the exact
tokenizer (tokenizer.json + tokenizer_config.json, `hf.write_tokenizer`; text_cfg.hf_tokenizer_name
makes open_clip's HFTokenizer load it) plus spiece.model for big_mm's own Tokenizer.

Image tower, by image.pool:
  "tok": open_clip's native VisionTransformer (class token; pre_norm on -> ln_pre, off ->
         no_ln_pre=True), image head without bias (or none: identity projection). The
         patch-embedding bias is folded into the position embedding as for HF CLIP.
  "map" (SigLIP's MAP head) and "gap": open_clip's timm route, as its own SigLIP models
         (ViT-B-16-SigLIP: timm vit_*_siglip_*, global_pool "map"): timm's VisionTransformer
         without class token, global_pool "map" / "avg" (norm before pooling, fc_norm off),
         tanh-GELU; image head -> open_clip's visual.head.proj (timm_proj "linear", bias as
         trained), none -> timm_proj "none". open_clip 3.3 passes timm no architecture
         arguments, so the tower's sizes are a timm model config, DIR/timm_vision/config.json,
         which timm (>= 1.0.31 tested) reads through its "local-dir:" model name: open_clip_config
         names it by ABSOLUTE path, so after moving DIR export again (or edit
         vision_cfg.timm_model_name). With pre_norm the patch bias is folded into pos_embed
         (timm's patch embedding has no bias then).
  "0" and "none" are refused (neither route pools the first patch token without a class token).
Text tower: open_clip's native TextTransformer: pool "last" (pool_type "eos", eos_id=1),
"last_position" ("last") or "first", causal or not (no_causal_mask), head with or without bias.
b -> logit_bias. Also refused: text pool "mean"/"map", pad_mask=True unless causal with pool
"last" (open_clip's CLIP.encode_text masks no pads), non-integer mlp ratios, rep_size.
Activations and LayerNorm eps are the towers' own (act "gelu_tanh" -> act_kwargs / act_layer
"gelu_tanh", "gelu" -> torch's GELU, "quick_gelu" -> model_cfg.quick_gelu; norm_eps ->
norm_kwargs), so the function is big_mm's exactly. `import_open_clip` reads such directories,
and open_clip's / OpenAI CLIP's published ones, back (see its docstring).

Tokenizer: open_clip's HFTokenizer cleans every text before tokenizing (ftfy.fix_text,
html.unescape, runs of whitespace -> one space, stripped); for such clean text its ids equal
big_mm's (SentencePiece with its default remove_extra_whitespaces collapses spaces the same way).
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


def _fused_proj(att, parts, weight, bias, heads):
  """big_mm attention projections `parts` (e.g. query, key, value) <-> one torch Linear whose
  weight stacks them [len(parts) * D, D] (timm's attn.qkv, attn_pool.kv)."""
  def fwd_w(a):
    return [np.concatenate([k.reshape(k.shape[0], -1).T for k in a])]

  def inv_w(a):
    return [w.T.reshape(w.shape[1], heads, -1) for w in np.split(a[0], len(parts))]

  return [hf.Rule([f"{att}/{n}/kernel" for n in parts], [weight], fwd_w, inv_w),
          hf.Rule([f"{att}/{n}/bias" for n in parts], [bias],
                  lambda a: [np.concatenate([b.reshape(-1) for b in a])],
                  lambda a: [b.reshape(heads, -1) for b in np.split(a[0], len(parts))])]


def _out_proj(att, torch_name, heads):
  return [hf.Rule([f"{att}/out/kernel"], [f"{torch_name}.weight"],
                  lambda a: [a[0].reshape(-1, a[0].shape[-1]).T],
                  lambda a: [a[0].T.reshape(heads, -1, a[0].shape[0])]),
          hf._same(f"{att}/out/bias", f"{torch_name}.bias")]


def _timm_mlp(bm, t):
  return hf._dense(f"{bm}/Dense_0", f"{t}.fc1") + hf._dense(f"{bm}/Dense_1", f"{t}.fc2")


def timm_vision_rules(img) -> list:
  """big_mm ViT (pool map / gap) <-> open_clip TimmModel: visual.trunk = timm VisionTransformer
  (class_token=False), visual.head.proj = the image head."""
  t, heads = "visual.trunk", img["num_heads"]
  rules = hf._conv("img/embedding", f"{t}.patch_embed.proj", bias=not img.get("pre_norm"))
  if img.get("pre_norm"):  # timm's patch embedding has no bias then: fold it into pos_embed.
    rules.append(hf.Rule(["img/pos_embedding", "img/embedding/bias"], [f"{t}.pos_embed"],
                         lambda a: [a[0] + a[1]],
                         lambda a: [a[0], np.zeros(a[0].shape[-1], a[0].dtype)]))
    rules += hf._ln("img/norm_pre", f"{t}.norm_pre")
  else:
    rules.append(hf._same("img/pos_embedding", f"{t}.pos_embed"))
  for i in range(img["depth"]):
    b, o = f"img/Transformer/encoderblock_{i}", f"{t}.blocks.{i}"
    att = f"{b}/MultiHeadDotProductAttention_0"
    rules += hf._ln(f"{b}/LayerNorm_0", f"{o}.norm1")
    rules += _fused_proj(att, ("query", "key", "value"), f"{o}.attn.qkv.weight",
                         f"{o}.attn.qkv.bias", heads)
    rules += _out_proj(att, f"{o}.attn.proj", heads)
    rules += hf._ln(f"{b}/LayerNorm_1", f"{o}.norm2")
    rules += _timm_mlp(f"{b}/MlpBlock_0", f"{o}.mlp")
  rules += hf._ln("img/Transformer/encoder_norm", f"{t}.norm")
  if img["pool"] == "map":
    m, p = "img/MAPHead_0", f"{t}.attn_pool"
    att = f"{m}/MultiHeadDotProductAttention_0"
    rules.append(hf._same(f"{m}/probe", f"{p}.latent"))
    rules += _fused_proj(att, ("query",), f"{p}.q.weight", f"{p}.q.bias", heads)
    rules += _fused_proj(att, ("key", "value"), f"{p}.kv.weight", f"{p}.kv.bias", heads)
    rules += _out_proj(att, f"{p}.proj", heads)
    rules += hf._ln(f"{m}/LayerNorm_0", f"{p}.norm")
    rules += _timm_mlp(f"{m}/MlpBlock_0", f"{p}.mlp")
  return rules


def native_vision_rules(img, txt) -> list:
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
  return rules


def open_clip_rules(img, txt, *, image_head: str, text_proj_bias: bool) -> list:
  """`image_head`: "native" (visual.proj), "linear" / "linear_bias" (timm route with a head:
  visual.head.proj) or "none" (timm route without one)."""
  if image_head == "native":
    rules = native_vision_rules(img, txt)
  else:
    rules = timm_vision_rules(img)
    if image_head != "none":
      rules += hf._dense("img/head", "visual.head.proj", bias=image_head == "linear_bias")
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
TIMM_POOL = {"map": "map", "gap": "avg"}


def problems_for(img, txt, dims, flat) -> list[str]:
  problems = []
  if img["pool"] not in ("tok", *TIMM_POOL):
    problems.append(
        f"image.pool={img['pool']!r}: open_clip pools a class token (native ViT, pool='tok') or, "
        "through timm, a MAP head ('map') or the token mean ('gap'); neither pools the first "
        "patch token of a ViT without class token. Train with pool='map' (SigLIP) or 'tok'.")
  if img.get("rep_size"):
    problems.append("image.rep_size (tanh pre-logits layer) has no open_clip counterpart.")
  hf._square(img, problems)
  if (img["pool"] == "tok" and "img/head/bias" in flat
      and np.any(flat["img/head/bias"] != 0)):
    problems.append("image head has a non-zero bias; open_clip's native visual.proj has none "
                    "(train with model.towers.image.head_bias=False).")
  if txt["pool"] not in TEXT_POOL:
    problems.append(f"text.pool={txt['pool']!r}: open_clip pools 'eos', 'last' or 'first'.")
  if txt.get("pad_mask") and not (txt.get("causal") and txt["pool"] == "last"):
    problems.append("text.pad_mask=True: open_clip's CLIP.encode_text masks no pads (only the "
                    "causal mask), so this maps only with causal=True and pool='last'.")
  for tower, o in (("image", img), ("text", txt)):
    if o["width"] % o["num_heads"]:
      problems.append(f"{tower} width {o['width']} not divisible by num_heads.")
  native_acts = {txt["act"]} | ({img["act"]} if img["pool"] not in TIMM_POOL else set())
  if "quick_gelu" in native_acts and len(native_acts) > 1:
    problems.append(f"activations {sorted(native_acts)}: open_clip's model_cfg.quick_gelu "
                    "switches QuickGELU on for both native towers.")
  if img["pool"] in TIMM_POOL and img["norm_eps"] != 1e-6:
    problems.append(f"image.norm_eps={img['norm_eps']}: timm's ViT LayerNorms use 1e-6.")
  img_out, txt_out = dims[0] or img["width"], dims[1] or txt["width"]
  if img_out != txt_out:
    problems.append(f"embedding sizes differ: image {img_out} vs text {txt_out}.")
  return problems


def _timm_config(img, image_size) -> dict:
  """timm's model config (what `timm.create_model("local-dir:D")` reads from D/config.json)."""
  return dict(
      architecture="vit_base_patch16_siglip_224",  # its entrypoint; model_args set every size
      model_args=dict(img_size=image_size, patch_size=img["patch_size"][0],
                      embed_dim=img["width"], depth=img["depth"], num_heads=img["num_heads"],
                      mlp_ratio=img["mlp_dim"] / img["width"], class_token=False,
                      global_pool=TIMM_POOL[img["pool"]], fc_norm=False,
                      pre_norm=bool(img.get("pre_norm")), act_layer=img["act"]),
      pretrained_cfg=dict(input_size=[3, image_size, image_size], mean=[0.5] * 3,
                          std=[0.5] * 3, interpolation="bilinear", crop_pct=1.0,
                          num_classes=0))


def export_open_clip(params, model_kwargs: Mapping, out_dir: str, *,
                     image_size: Optional[int] = None, tokenizer: Optional[str] = None) -> str:
  save_file = common.requires("safetensors.numpy", what="Exporting to open_clip")[0].save_file
  kwargs = common.model_kwargs(model_kwargs)
  img, txt, dims = common.resolved_arch(kwargs)
  # Shape checks and sincos tables as for HF; the HF-specific refusals are replaced by ours.
  flat = common.unstack_layers(common.flatten(params))
  common.refuse_moe(flat, "open_clip")
  common.check_refusals(problems_for(img, txt, dims, flat), "open_clip")
  flat, img, txt, dims, image_size, text_len = hf.prepare(params, kwargs, "clip",
                                                          image_size=image_size, check=False)
  # prepare(.., "clip") added identity heads where there were none and dropped b and the head
  # biases; restore what open_clip carries.
  raw = common.flatten(params)
  text_proj_bias = "txt/head/bias" in raw and bool(dims[1])
  if text_proj_bias:
    flat["txt/head/bias"] = np.asarray(raw["txt/head/bias"], np.float32)
  flat["b"] = np.asarray(raw["b"], np.float32)
  timm_route = img["pool"] in TIMM_POOL
  image_head = "native"
  if timm_route:
    image_head = "none"
    if not dims[0]:
      flat.pop("img/head/kernel")
    elif "img/head/bias" in raw:
      flat["img/head/bias"] = np.asarray(raw["img/head/bias"], np.float32)
      image_head = "linear_bias"
    else:
      image_head = "linear"
  state = hf.to_hf_state_dict(flat, open_clip_rules(img, txt, image_head=image_head,
                                                    text_proj_bias=text_proj_bias))
  embed_dim = dims[0] or img["width"]

  def tower(o):
    act = {"gelu_tanh": {"act_kwargs": {"approximate": "tanh"}}, "gelu": {},
           "quick_gelu": {}}[o["act"]]  # quick_gelu: model_cfg.quick_gelu
    return dict(width=o["width"], layers=o["depth"], mlp_ratio=o["mlp_dim"] / o["width"],
                norm_kwargs={"eps": o["norm_eps"]}, **act)
  for name, o in (("image", img), ("text", txt)):
    if int(o["width"] * (o["mlp_dim"] / o["width"])) != o["mlp_dim"]:
      raise ExportError(f"{name} mlp_dim is not width * a float open_clip reproduces exactly.")
  out_dir = os.path.abspath(out_dir)
  timm_dir = os.path.join(out_dir, "timm_vision")
  if timm_route:
    vision_cfg = dict(image_size=image_size, timm_model_name="local-dir:" + timm_dir,
                      timm_model_pretrained=False, timm_pool=TIMM_POOL[img["pool"]],
                      timm_proj="none" if image_head == "none" else "linear",
                      timm_proj_bias=image_head == "linear_bias")
  else:
    vision_cfg = dict(tower(img), head_width=img["width"] // img["num_heads"],
                      patch_size=img["patch_size"][0], image_size=image_size,
                      no_ln_pre=not img.get("pre_norm"), pool_type="tok")
  text_cfg = dict(tower(txt), heads=txt["num_heads"], context_length=text_len,
                  vocab_size=flat["txt/Embed_0/embedding"].shape[0], pad_id=0, eos_id=1,
                  no_causal_mask=not txt.get("causal"), pool_type=TEXT_POOL[txt["pool"]],
                  proj_bias=text_proj_bias)
  if tokenizer:
    # open_clip's get_tokenizer("local-dir:DIR") loads DIR whenever this is set; the path
    # also serves a plain AutoTokenizer (point it at a hub repo after uploading DIR there).
    text_cfg["hf_tokenizer_name"] = out_dir
  model_cfg = dict(embed_dim=embed_dim, quick_gelu=txt["act"] == "quick_gelu", vision_cfg=vision_cfg,
                   text_cfg=text_cfg, init_logit_bias=float(flat["b"].reshape(-1)[0]))
  preprocess_cfg = dict(size=[image_size, image_size], mode="RGB", mean=[0.5] * 3,
                        std=[0.5] * 3, interpolation="bilinear", resize_mode="squash")
  with common.atomic_dir(out_dir) as tmp:  # open_clip_config names out_dir, the final place
    if timm_route:
      os.makedirs(os.path.join(tmp, "timm_vision"))
      with open(os.path.join(tmp, "timm_vision", "config.json"), "w") as f:
        json.dump(_timm_config(img, image_size), f, indent=2)
    with open(os.path.join(tmp, "open_clip_config.json"), "w") as f:
      json.dump({"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}, f, indent=2)
    save_file(state, os.path.join(tmp, "open_clip_model.safetensors"))
    if tokenizer:
      shutil.copyfile(tokenizer, os.path.join(tmp, "spiece.model"))
      hf.write_tokenizer(tmp, tokenizer, text_len=text_len, pad_mask=bool(txt.get("pad_mask")))
  return out_dir


# ---- import ---------------------------------------------------------------------------------

# open_clip text pool_type -> big_mm pool. "argmax" (OpenAI CLIP: the end-of-text token has the
# largest id) and "eos" (the first eos_id) both read the end-of-text token, which ends every
# text before the pads: big_mm's "last" (the last non-pad token).
IMPORT_TEXT_POOL = {"argmax": "last", "eos": "last", "last": "last_position", "first": "first"}
_UNSUPPORTED = ("ls_init_value", "qk_norm", "scaled_cosine_attn", "scale_heads",
                "scale_attn_inner", "scale_attn", "scale_fc")
VISION_DEFAULTS = dict(layers=12, width=768, head_width=64, mlp_ratio=4.0, patch_size=16,
                       image_size=224)
TEXT_DEFAULTS = dict(context_length=77, vocab_size=49408, width=512, heads=8, layers=12,
                     mlp_ratio=4.0)


def _act(quick_gelu: bool, act_kwargs) -> str:
  """open_clip's native towers: QuickGELU if quick_gelu else torch nn.GELU (erf), which
  act_kwargs={"approximate": "tanh"} makes tanh-GELU."""
  if quick_gelu:
    return "quick_gelu"
  return "gelu_tanh" if (act_kwargs or {}).get("approximate") == "tanh" else "gelu"


def _weights(path: str) -> tuple[str, dict]:
  """(directory, state dict as float32 numpy) of an open_clip directory or weights file."""
  d, file = (path, None) if os.path.isdir(path) else (os.path.dirname(path) or ".", path)
  if file is None:
    for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
      if os.path.isfile(os.path.join(d, name)):
        file = os.path.join(d, name)
        break
    else:
      raise ExportError(f"{path!r}: open_clip_config.json but no open_clip_model.safetensors "
                        "(or open_clip_pytorch_model.bin) beside it.")
  if file.endswith(".safetensors"):
    load_file = common.requires("safetensors.numpy", what="Reading safetensors")[0].load_file
    state = load_file(file)
  else:
    state = common.load_torch_weights(file)
  return d, {k: np.asarray(v, np.float32) for k, v in state.items()}


def _timm_tower(v: Mapping, image_size) -> dict:
  """big_mm ViT kwargs of open_clip's timm vision trunk (a timm VisionTransformer without class
  token, MAP or mean pooling), read off the trunk timm builds on the meta device."""
  timm, torch = common.requires("timm", "torch", what="Importing an open_clip timm tower")
  from timm.models.vision_transformer import VisionTransformer
  pool = v.get("timm_pool", "avg")
  if pool not in ("map", "avg"):
    raise ExportError(f"vision_cfg.timm_pool={pool!r}: big_mm imports timm towers pooled by a "
                      "MAP head ('map') or the token mean ('avg').")
  with torch.device("meta"):
    trunk = timm.create_model(v["timm_model_name"], pretrained=False, num_classes=0,
                              global_pool=pool, img_size=image_size)
  problems = []
  if not isinstance(trunk, VisionTransformer):
    raise ExportError(f"{v['timm_model_name']!r} is a timm {type(trunk).__name__}; big_mm "
                      "imports timm VisionTransformers.")
  if trunk.num_prefix_tokens:
    problems.append(f"{trunk.num_prefix_tokens} class / register tokens (big_mm's MAP / mean "
                    "pooled ViT has none)")
  if not isinstance(trunk.fc_norm, torch.nn.Identity):
    problems.append("fc_norm after pooling")
  block = trunk.blocks[0]
  act = block.mlp.act
  name = type(act).__name__
  if name == "QuickGELU":
    act_name = "quick_gelu"
  elif "GELU" in name:
    tanh = getattr(act, "approximate", "none") == "tanh" or "Tanh" in name
    act_name = "gelu_tanh" if tanh else "gelu"
  else:
    problems.append(f"activation {name}")
  if pool == "map":
    ap = trunk.attn_pool
    if ap.latent_len != 1 or ap.num_heads != block.attn.num_heads:
      problems.append("a MAP head with several latents or its own number of heads")
    if ap.mlp.fc1.out_features != block.mlp.fc1.out_features:
      problems.append("a MAP head MLP of another size")
  if problems:
    raise ExportError(f"open_clip timm tower {v['timm_model_name']!r} has no big_mm "
                      "equivalent: " + "; ".join(problems) + ".")
  p = trunk.patch_embed.patch_size
  return dict(width=trunk.embed_dim, depth=len(trunk.blocks), num_heads=block.attn.num_heads,
              mlp_dim=block.mlp.fc1.out_features, patch_size=tuple(p), posemb="learn",
              pool={"map": "map", "avg": "gap"}[pool],
              pre_norm=not isinstance(trunk.norm_pre, torch.nn.Identity), act=act_name,
              norm_eps=float(trunk.norm.eps))


def open_clip_kwargs(model_cfg: Mapping, state: Mapping) -> tuple[dict, dict]:
  """(big_mm Towers kwargs, facts the weight mapping needs) of an open_clip model config;
  ExportError naming what has no big_mm equivalent."""
  v = {**VISION_DEFAULTS, **(model_cfg.get("vision_cfg") or {})}
  t = {**TEXT_DEFAULTS, **(model_cfg.get("text_cfg") or {})}
  quick = bool(model_cfg.get("quick_gelu", False))
  problems = []
  if isinstance(v["layers"], (list, tuple)):
    problems.append("a ModifiedResNet image tower (vision_cfg.layers is a list)")
  if t.get("hf_model_name"):
    problems.append(f"a Hugging Face text tower ({t['hf_model_name']})")
  for tower, c in (("vision", v), ("text", t)):
    set_ = [k for k in _UNSUPPORTED if c.get(k)]
    if set_ or c.get("block_type") not in (None, "default"):
      problems.append(f"{tower}_cfg {set_ or ['block_type']} (custom blocks / layer scale)")
  if t.get("embed_cls"):
    problems.append("text_cfg.embed_cls (a text class token)")
  if t.get("pool_type", "argmax") not in IMPORT_TEXT_POOL:
    problems.append(f"text_cfg.pool_type={t.get('pool_type')!r}; importable: "
                    f"{sorted(IMPORT_TEXT_POOL)}")
  timm_route = bool(v.get("timm_model_name"))
  if not timm_route:
    if v.get("attentional_pool"):
      problems.append("vision_cfg.attentional_pool (CoCa's attentional pooler: queries with "
                      "their own LayerNorms, no MLP; big_mm's MAP head is SigLIP's)")
    if v.get("pool_type", "tok") != "tok":
      problems.append(f"vision_cfg.pool_type={v.get('pool_type')!r}: the native ViT keeps its "
                      "class token in attention, so only 'tok' pooling maps (big_mm pool='tok')")
  elif v.get("timm_proj", "linear") not in ("linear", "none", "", None):
    problems.append(f"vision_cfg.timm_proj={v.get('timm_proj')!r}")
  if problems:
    raise ExportError("This open_clip model has no exact big_mm equivalent:\n  - "
                      + "\n  - ".join(problems))
  image_size = v["image_size"]
  image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
  embed_dim = model_cfg["embed_dim"]
  if timm_route:
    image = _timm_tower(v, image_size)
    proj = v.get("timm_proj", "linear")
    image_head = {"linear": "linear_bias" if v.get("timm_proj_bias") else "linear",
                  "none": "none"}.get(proj, "trunk_head")
    image["head_bias"] = image_head in ("linear_bias", "trunk_head")
  else:
    p = v["patch_size"]
    image = dict(width=v["width"], depth=v["layers"], num_heads=v["width"] // v["head_width"],
                 mlp_dim=int(v["width"] * v["mlp_ratio"]), patch_size=(p, p), posemb="learn",
                 pool="tok", pre_norm=not v.get("no_ln_pre", False), head_bias=False,
                 act=_act(quick, v.get("act_kwargs")),
                 norm_eps=float((v.get("norm_kwargs") or {}).get("eps", 1e-5)))
    image_head = "native"
  text_proj = t.get("proj_type", "linear") != "none" and bool(embed_dim)
  text = dict(width=t["width"], depth=t["layers"], num_heads=t["heads"],
              mlp_dim=int(t["width"] * t["mlp_ratio"]), vocab_size=t["vocab_size"],
              pool=IMPORT_TEXT_POOL[t.get("pool_type", "argmax")],
              causal=not t.get("no_causal_mask", False), head_bias=bool(t.get("proj_bias")),
              act=_act(quick, t.get("act_kwargs")),
              norm_eps=float((t.get("norm_kwargs") or {}).get("eps", 1e-5)))
  has_bias = "logit_bias" in state
  kwargs = dict(towers=dict(image=image, text=text),
                out_dim=dict(image=0 if image_head == "none" else embed_dim,
                             text=embed_dim if text_proj else 0),
                temperature_init=1.0, bias_init=0.0 if has_bias else None)
  facts = dict(image_head=image_head, text_proj=text_proj, has_bias=has_bias,
               image_size=image_size, text_len=t["context_length"],
               prefix="text." if model_cfg.get("custom_text") else "")
  return kwargs, facts


def import_open_clip(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """An open_clip directory (open_clip_config.json + open_clip_model.safetensors, as open_clip
  and the Hugging Face hub publish CLIP / OpenAI CLIP / SigLIP models, and as export_open_clip
  writes) -> (flat big_mm params, Towers kwargs) computing the same embeddings.

  Native towers: class-token ViT (ln_pre or not), QuickGELU / GELU / tanh-GELU and the
  LayerNorm eps as the config says, text pooled at argmax / eos (big_mm "last"), last position
  or first, causal or not, projections with or without bias. timm towers (open_clip's SigLIP
  models, this module's MAP / mean-pooled exports): a timm VisionTransformer without class
  token, built on the meta device to read its sizes. Anything else is refused with the reason.
  """
  d, state = _weights(path)
  cfg_path = os.path.join(d, "open_clip_config.json")
  with open(cfg_path) as f:
    cfg = json.load(f)
  model_cfg = cfg.get("model_cfg", cfg)
  kwargs, facts = open_clip_kwargs(model_cfg, state)
  img, txt, _ = common.resolved_arch(kwargs)
  head = facts["image_head"]
  rules = open_clip_rules(img, txt, image_head="linear" if head == "trunk_head" else head,
                          text_proj_bias=txt["head_bias"] and facts["text_proj"])
  if head == "trunk_head":  # timm's own classifier head is the projection
    rules = [r for r in rules if r.hf[0] != "visual.head.proj.weight"]
    rules += hf._dense("img/head", "visual.trunk.head")
  if not facts["text_proj"]:
    rules = [r for r in rules if not r.bm[0].startswith("txt/head/")]
  if not facts["has_bias"]:
    rules = [r for r in rules if r.bm != ["b"]]
  prefix = facts["prefix"]
  if prefix:  # CustomTextCLIP: the text tower under `text.`
    for r in rules:
      r.hf = [n if n.startswith(("visual.", "logit_")) else prefix + n for n in r.hf]
  expected = {n for r in rules for n in r.hf}
  state = {k: v for k, v in state.items() if not k.endswith(("attn_mask", "position_ids"))}
  missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
  if missing or extra:
    raise ExportError(f"{path!r}: the weights do not match open_clip_config.json as big_mm "
                      f"reads it:\n  missing ({len(missing)}): {missing[:20]}\n  unexpected "
                      f"({len(extra)}): {extra[:20]}")
  flat = {}
  for r in rules:
    try:
      values = r.inv([state[n] for n in r.hf])
    except ValueError as e:
      raise ExportError(f"{r.hf}: cannot convert ({e}); shapes "
                        f"{[tuple(state[n].shape) for n in r.hf]}.") from None
    flat.update({n: np.asarray(x, np.float32) for n, x in zip(r.bm, values)})
  want = hf._expected_shapes(kwargs, facts["image_size"], facts["text_len"])
  if not facts["has_bias"]:
    want.pop("b")  # no logit_bias: `b` is not imported (config.init keeps the model's own)
  common.compare_keys(flat, want,
                      f"The weights of {path!r} converted to big_mm and the big_mm model of its "
                      "open_clip_config.json")
  return flat, kwargs
