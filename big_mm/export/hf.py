"""Hugging Face transformers export / import: SigLIP (SiglipModel), SigLIP 2 NaFlex
(Siglip2Model) and CLIP (CLIPModel).

  export_hf(params, model_kwargs, "out_dir", arch="siglip", tokenizer="data/digits_spm.model")
  flat, model_kwargs = import_hf("out_dir")        # big_mm '/'-paths -> np.ndarray

What maps (exactly; anything else is refused with the list of differences):

SigLIP (`transformers.SiglipModel`), usually big_mm `objective.loss="sigmoid"`:
  image: pool="map", no image head (out_dim image 0 or None): HF SigLIP's image embedding is
         the MAP head output itself; rep_size off, pre_norm off, square patches and grid;
         posemb "learn" or "sincos2d" (the fixed table is written as position_embedding).
  text:  pool="last_position" (the literal last position, as HF / big_vision), not causal;
         a head with or without bias (none: identity head when widths agree);
         pad_mask=False -> the tokenizer returns no attention_mask (pads attended, as in big_mm);
         pad_mask=True  -> it returns one (pads masked as keys, as in big_mm).
  t -> logit_scale (both log-scale), b -> logit_bias.
SigLIP 2 NaFlex (`transformers.Siglip2Model`): as SigLIP, the patch embedding as a Linear
  over (row, col, channel)-flattened patches, the position grid (num_patches = side**2, big_mm's
  posemb_grid) resized to each image's grid; its processor is `value_range(-1,1)|naflex(
  num_patches, patch_size)` (Siglip2ImageProcessor).
CLIP (`transformers.CLIPModel`), usually `objective.loss="softmax"`:
  image: pool="tok" and pre_norm=True (CLIP's pre_layrnorm); head without bias (head_bias=False,
         or an exactly-zero bias), or no head when widths agree (identity projection). The patch
         embedding bias (CLIP has none) is folded into the position embedding, the class token
         gets a zero position embedding: the same function, reparameterised.
  text:  causal=True, pool="last" (the EOS position; HF pools at the first eos_token_id=1);
         head without bias as for the image.
  t -> logit_scale; b must be 0 (CLIP has no logit bias; a softmax loss never moves it).
Both: the towers' activations (act: tanh-GELU "gelu_pytorch_tanh", "gelu", "quick_gelu") and
LayerNorm eps (norm_eps) as configured, float32 weights.
The tokenizer (`write_tokenizer`) encodes exactly as big_mm's: SentencePiece pieces, EOS, pads.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Mapping, Optional

import numpy as np

from big_mm.export import common
from big_mm.export.common import ExportError

ARCHS = ("siglip", "siglip2", "clip")
HF_CLASSES = {"siglip": "SiglipModel", "siglip2": "Siglip2Model", "clip": "CLIPModel"}
LN_EPS = 1e-6
ACT = "gelu_pytorch_tanh"  # flax nn.gelu defaults to the tanh approximation.
# big_mm's MLP activations (models/layers.py ACTIVATIONS) by their HF hidden_act names.
ACT_TO_HF = {"gelu_tanh": ACT, "gelu": "gelu", "quick_gelu": "quick_gelu"}


# ---- rules: (big_mm names, HF names, big_mm->HF, HF->big_mm) -------------------------------

class Rule:
  def __init__(self, bm, hf, fwd, inv):
    self.bm, self.hf, self.fwd, self.inv = list(bm), list(hf), fwd, inv


def _same(bm, hf):
  return Rule([bm], [hf], lambda a: [a[0]], lambda a: [a[0]])


def _dense(bm, hf, bias=True):
  rules = [Rule([f"{bm}/kernel"], [f"{hf}.weight"], lambda a: [a[0].T], lambda a: [a[0].T])]
  if bias:
    rules.append(_same(f"{bm}/bias", f"{hf}.bias"))
  return rules


def _ln(bm, hf):
  return [_same(f"{bm}/scale", f"{hf}.weight"), _same(f"{bm}/bias", f"{hf}.bias")]


def _attn(bm, hf, heads):
  rules = []
  for b, h in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
    rules.append(Rule([f"{bm}/{b}/kernel"], [f"{hf}.{h}.weight"],
                      lambda a: [a[0].reshape(a[0].shape[0], -1).T],
                      lambda a: [a[0].T.reshape(a[0].shape[1], heads, -1)]))
    rules.append(Rule([f"{bm}/{b}/bias"], [f"{hf}.{h}.bias"],
                      lambda a: [a[0].reshape(-1)], lambda a: [a[0].reshape(heads, -1)]))
  rules.append(Rule([f"{bm}/out/kernel"], [f"{hf}.out_proj.weight"],
                    lambda a: [a[0].reshape(-1, a[0].shape[-1]).T],
                    lambda a: [a[0].T.reshape(heads, -1, a[0].shape[0])]))
  rules.append(_same(f"{bm}/out/bias", f"{hf}.out_proj.bias"))
  return rules


def _mlp(bm, hf):
  return _dense(f"{bm}/Dense_0", f"{hf}.fc1") + _dense(f"{bm}/Dense_1", f"{hf}.fc2")


def _encoder(bm, hf, depth, heads):
  rules = []
  for i in range(depth):
    b, h = f"{bm}/encoderblock_{i}", f"{hf}.layers.{i}"
    rules += _ln(f"{b}/LayerNorm_0", f"{h}.layer_norm1")
    rules += _attn(f"{b}/MultiHeadDotProductAttention_0", f"{h}.self_attn", heads)
    rules += _ln(f"{b}/LayerNorm_1", f"{h}.layer_norm2")
    rules += _mlp(f"{b}/MlpBlock_0", f"{h}.mlp")
  return rules


def _packed_attn(att, hf, heads):
  """big_mm attention <-> torch.nn.MultiheadAttention (packed in_proj_weight [3D, D])."""
  qkv = ("query", "key", "value")

  def fwd_w(a):
    return [np.concatenate([k.reshape(k.shape[0], -1).T for k in a])]

  def inv_w(a):
    d = a[0].shape[1]
    return [w.T.reshape(d, heads, -1) for w in np.split(a[0], 3)]

  return [Rule([f"{att}/{n}/kernel" for n in qkv], [f"{hf}.in_proj_weight"], fwd_w, inv_w),
          Rule([f"{att}/{n}/bias" for n in qkv], [f"{hf}.in_proj_bias"],
               lambda a: [np.concatenate([b.reshape(-1) for b in a])],
               lambda a: [b.reshape(heads, -1) for b in np.split(a[0], 3)]),
          Rule([f"{att}/out/kernel"], [f"{hf}.out_proj.weight"],
               lambda a: [a[0].reshape(-1, a[0].shape[-1]).T],
               lambda a: [a[0].T.reshape(heads, -1, a[0].shape[0])]),
          _same(f"{att}/out/bias", f"{hf}.out_proj.bias")]


def _map_head(bm, hf, heads):
  rules = [_same(f"{bm}/probe", f"{hf}.probe")]
  rules += _packed_attn(f"{bm}/MultiHeadDotProductAttention_0", f"{hf}.attention", heads)
  rules += _ln(f"{bm}/LayerNorm_0", f"{hf}.layernorm")
  rules += _mlp(f"{bm}/MlpBlock_0", f"{hf}.mlp")
  return rules


def _conv(bm, hf, bias=True):
  rules = [Rule([f"{bm}/kernel"], [f"{hf}.weight"], lambda a: [a[0].transpose(3, 2, 0, 1)],
                lambda a: [a[0].transpose(2, 3, 1, 0)])]
  if bias:
    rules.append(_same(f"{bm}/bias", f"{hf}.bias"))
  return rules


def _posemb(bm, hf):
  return Rule([bm], [hf], lambda a: [a[0][0]], lambda a: [a[0][None]])


def _text_common(img_or_txt_prefix, hf, a):
  return [_same("txt/Embed_0/embedding", f"{hf}.embeddings.token_embedding.weight"),
          _posemb("txt/pos_embedding", f"{hf}.embeddings.position_embedding.weight")]


def siglip_rules(img: Mapping, txt: Mapping, txt_head_bias: bool = True) -> list[Rule]:
  v, t = "vision_model", "text_model"
  rules = _conv("img/embedding", f"{v}.embeddings.patch_embedding")
  rules.append(_posemb("img/pos_embedding", f"{v}.embeddings.position_embedding.weight"))
  rules += _encoder("img/Transformer", f"{v}.encoder", img["depth"], img["num_heads"])
  rules += _ln("img/Transformer/encoder_norm", f"{v}.post_layernorm")
  rules += _map_head("img/MAPHead_0", f"{v}.head", img["num_heads"])
  rules += _text_common("txt", t, txt)
  rules += _encoder("txt/Encoder_0", f"{t}.encoder", txt["depth"], txt["num_heads"])
  rules += _ln("txt/Encoder_0/encoder_norm", f"{t}.final_layer_norm")
  rules += _dense("txt/head", f"{t}.head", bias=txt_head_bias)
  rules += [_same("t", "logit_scale"), _same("b", "logit_bias")]
  return rules


def siglip2_rules(img: Mapping, txt: Mapping, txt_head_bias: bool = True) -> list[Rule]:
  """SigLIP's, with Siglip2's patch embedding: a Linear over patches flattened as (row, col,
  channel), the layout of big_mm's NaFlex patches (and of its Conv kernel, reshaped)."""
  p, width = img["patch_size"], img["width"]
  patch = [Rule(["img/embedding/kernel"], ["vision_model.embeddings.patch_embedding.weight"],
                lambda a: [a[0].reshape(-1, width).T],
                lambda a: [a[0].T.reshape(p[0], p[1], 3, width)]),
           _same("img/embedding/bias", "vision_model.embeddings.patch_embedding.bias")]
  return patch + [r for r in siglip_rules(img, txt, txt_head_bias)
                  if r.bm[0] not in ("img/embedding/kernel", "img/embedding/bias")]


def clip_rules(img: Mapping, txt: Mapping) -> list[Rule]:
  v, t = "vision_model", "text_model"

  def fwd_emb(a):  # kernel, bias, cls, pos -> patch weight, class_embedding, position table
    kernel, bias, cls, pos = a
    table = np.concatenate([np.zeros_like(pos[0, :1]), pos[0] + bias[None]], axis=0)
    return [kernel.transpose(3, 2, 0, 1), cls.reshape(-1), table]

  def inv_emb(a):
    weight, cls, table = a
    return [weight.transpose(2, 3, 1, 0), np.zeros(weight.shape[0], weight.dtype),
            (cls + table[0])[None, None], table[None, 1:]]

  rules = [Rule(["img/embedding/kernel", "img/embedding/bias", "img/cls", "img/pos_embedding"],
                [f"{v}.embeddings.patch_embedding.weight", f"{v}.embeddings.class_embedding",
                 f"{v}.embeddings.position_embedding.weight"], fwd_emb, inv_emb)]
  rules += _ln("img/norm_pre", f"{v}.pre_layrnorm")
  rules += _encoder("img/Transformer", f"{v}.encoder", img["depth"], img["num_heads"])
  rules += _ln("img/Transformer/encoder_norm", f"{v}.post_layernorm")
  rules += _dense("img/head", "visual_projection", bias=False)
  rules += _text_common("txt", t, txt)
  rules += _encoder("txt/Encoder_0", f"{t}.encoder", txt["depth"], txt["num_heads"])
  rules += _ln("txt/Encoder_0/encoder_norm", f"{t}.final_layer_norm")
  rules += _dense("txt/head", "text_projection", bias=False)
  rules.append(Rule(["t"], ["logit_scale"], lambda a: [a[0].reshape(())],
                    lambda a: [a[0].reshape(1)]))  # CLIP's logit_scale is a scalar
  return rules


# ---- what maps ------------------------------------------------------------------------------

def _square(img, problems):
  p = img["patch_size"]
  if p[0] != p[1]:
    problems.append(f"image.patch_size={tuple(p)} is not square (HF supports square patches).")


def siglip_problems(img, txt, dims, flat) -> list[str]:
  problems = []
  if img["pool"] != "map":
    problems.append(f"image.pool={img['pool']!r}: HF SigLIP pools images with a MAP head only "
                    "(vision_use_head); use pool='map'.")
  if dims[0]:
    problems.append(f"image head (out_dim image={dims[0]}): HF SigLIP's image embedding is the "
                    "MAP output with no projection; use out_dim={'image': 0, 'text': D} with D = "
                    "image width.")
  if img.get("rep_size"):
    problems.append("image.rep_size (tanh pre-logits layer) has no HF SigLIP counterpart.")
  if img.get("pre_norm"):
    problems.append("image.pre_norm=True: HF SigLIP has no LayerNorm before the encoder.")
  _square(img, problems)
  if txt["pool"] != "last_position":
    hint = (" big_mm 'last' pools the last non-pad token; HF pools index -1 of the max_length-"
            "padded text." if txt["pool"] == "last" else "")
    problems.append(f"text.pool={txt['pool']!r}: HF SigLIP pools the literal last position; "
                    f"use text.pool='last_position'.{hint}")
  if txt.get("causal"):
    problems.append("text.causal=True: HF SigLIP's text tower is bidirectional.")
  txt_out = dims[1] or txt["width"]
  if txt_out != img["width"]:
    problems.append(f"embedding sizes differ: image {img['width']} (MAP output) vs text {txt_out}.")
  return problems


def clip_problems(img, txt, dims, flat) -> list[str]:
  problems = []
  if img["pool"] != "tok":
    problems.append(f"image.pool={img['pool']!r}: HF CLIP pools the class token; use pool='tok'.")
  if not img.get("pre_norm"):
    problems.append("image.pre_norm=False: HF CLIP applies pre_layrnorm before the encoder; "
                    "train with model.towers.image.pre_norm=True.")
  if img.get("rep_size"):
    problems.append("image.rep_size (tanh pre-logits layer) has no HF CLIP counterpart.")
  _square(img, problems)
  if not txt.get("causal"):
    problems.append("text.causal=False: HF CLIP's text tower is causal; use text.causal=True.")
  if txt["pool"] != "last":
    problems.append(f"text.pool={txt['pool']!r}: HF CLIP pools the EOS token; use pool='last'.")
  for tower, key in (("image", "img/head/bias"), ("text", "txt/head/bias")):
    if key in flat and np.any(flat[key] != 0):
      problems.append(f"{tower} head has a non-zero bias ({key}); CLIP projections have no bias "
                      f"(train with model.towers.{tower}.head_bias=False).")
  img_out, txt_out = dims[0] or img["width"], dims[1] or txt["width"]
  if img_out != txt_out:
    problems.append(f"embedding sizes differ: image {img_out} vs text {txt_out}.")
  if "b" in flat and np.any(flat["b"] != 0):
    problems.append(f"b={float(flat['b'].reshape(-1)[0])} != 0: HF CLIP has no logit bias.")
  return problems


# ---- export ---------------------------------------------------------------------------------

def _expected_shapes(model_kwargs, image_size, text_len):
  import jax
  import jax.numpy as jnp

  from big_mm.models.towers import Towers
  model = Towers(**model_kwargs)
  inputs = {"image": jnp.zeros((1, image_size, image_size, 3), jnp.float32),
            "text": jnp.zeros((1, text_len), jnp.int32)}
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), inputs))["params"]
  from big_mm import sharding, tree_paths
  return {name: tuple(leaf.shape)
          for name, leaf in tree_paths.flat_dict(sharding.unbox(shapes)).items()}


def _identity_head(flat, name, width):
  flat[f"{name}/kernel"] = np.eye(width, dtype=np.float32)
  flat[f"{name}/bias"] = np.zeros(width, np.float32)


def prepare(params, model_kwargs: Mapping, arch: str, *, image_size: Optional[int] = None,
            check: bool = True):
  """Checks that `params` fit `model_kwargs` and that `arch` can represent them exactly.

  Returns (flat params ready for the rules, img options, txt options, dims, image_size,
  text_len). Raises ExportError listing what differs.
  """
  if arch not in ARCHS:
    raise ExportError(f"Unknown HF architecture {arch!r}; valid: {ARCHS}.")
  kwargs = common.model_kwargs(model_kwargs)
  img, txt, dims = common.resolved_arch(kwargs)
  flat = common.unstack_layers(common.flatten(params))
  common.refuse_moe(flat, "transformers." + HF_CLASSES[arch])
  img_k = {**kwargs, "towers": {m: {**t, "scan": False} for m, t in kwargs["towers"].items()}}
  p = img["patch_size"]
  if "img/pos_embedding" in flat:
    n = flat["img/pos_embedding"].shape[1]
    grid = int(round(np.sqrt(n)))
    if grid * grid != n:
      raise ExportError(f"img/pos_embedding has {n} positions, not a square grid; HF needs "
                        "square images.")
    if image_size is not None and image_size != grid * p[0]:
      raise ExportError(f"image_size={image_size} but the position embedding is for "
                        f"{grid * p[0]} pixels.")
    image_size = grid * p[0]
  if image_size is None:
    raise ExportError("image_size is needed for posemb='sincos2d' (no position parameter to "
                      "read it from); pass image_size= (tools/export.py reads it from the "
                      "config's eval pp_image).")
  if "txt/pos_embedding" not in flat:
    raise ExportError("params have no txt/pos_embedding: HF SigLIP/CLIP need both towers.")
  text_len = flat["txt/pos_embedding"].shape[1]
  common.compare_keys(flat, _expected_shapes(img_k, image_size, text_len),
                      "The parameters to export and the model built from the config (is it the "
                      "run's --config with the same overrides?)")
  problems = (clip_problems if arch == "clip" else siglip_problems)(img, txt, dims, flat)
  if check:
    common.check_refusals(problems, "transformers." + HF_CLASSES[arch])
  flat = {k: np.asarray(v, np.float32) for k, v in flat.items()}
  if img["posemb"] == "sincos2d":
    from big_mm.models import layers
    g = image_size // p[0]
    flat["img/pos_embedding"] = np.asarray(layers.posemb_sincos_2d(g, g, img["width"]))
  if arch != "clip" and not dims[1]:
    _identity_head(flat, "txt/head", txt["width"])
  if arch == "clip":
    for tower, opts, d in (("img", img, dims[0]), ("txt", txt, dims[1])):
      if not d:
        _identity_head(flat, f"{tower}/head", opts["width"])
      flat.pop(f"{tower}/head/bias", None)
    flat.pop("b", None)
  return flat, img, txt, dims, image_size, text_len


def hf_config(arch, img, txt, dims, image_size, text_len, vocab_size,
              logit_scale: float) -> dict:
  def tower(o):
    return dict(hidden_size=o["width"], intermediate_size=o["mlp_dim"],
                num_hidden_layers=o["depth"], num_attention_heads=o["num_heads"],
                hidden_act=ACT_TO_HF[o["act"]], layer_norm_eps=o["norm_eps"],
                attention_dropout=0.0)
  vision = dict(tower(img), image_size=image_size, patch_size=img["patch_size"][0],
                num_channels=3)
  text = dict(tower(txt), vocab_size=vocab_size, max_position_embeddings=text_len,
              pad_token_id=0, eos_token_id=1, bos_token_id=None)
  if arch in ("siglip", "siglip2"):
    text["projection_size"] = dims[1] or txt["width"]
    vision["vision_use_head"] = True
    if arch == "siglip2":  # NaFlex: a position grid of num_patches, no fixed image size
      vision["num_patches"] = (image_size // img["patch_size"][0]) ** 2
      del vision["image_size"]
    return dict(model_type=arch, architectures=[HF_CLASSES[arch]], text_config=text,
                vision_config=vision)
  proj = dims[0] or img["width"]
  # The towers' own projection_dim (CLIPTextModelWithProjection / CLIPVisionModelWithProjection)
  # and the logit scale describe this model too, not transformers' defaults (512, log(1/0.07)).
  text["projection_dim"] = vision["projection_dim"] = proj
  return dict(model_type="clip", architectures=["CLIPModel"], text_config=text,
              vision_config=vision, projection_dim=proj, logit_scale_init_value=logit_scale)


def to_hf_state_dict(flat, rules) -> dict[str, np.ndarray]:
  out = {}
  for r in rules:
    missing = [n for n in r.bm if n not in flat]
    if missing:
      raise ExportError(f"params lack {missing} (needed for {r.hf}).")
    for name, value in zip(r.hf, r.fwd([flat[n] for n in r.bm])):
      out[name] = np.array(value, np.float32, order="C")  # (ascontiguousarray makes 0-d 1-d)
  used = {n for r in rules for n in r.bm}
  left = sorted(set(flat) - used)
  if left:
    raise ExportError(f"params not mapped to the HF model (would be silently dropped): {left}")
  return out


def export_hf(params, model_kwargs: Mapping, out_dir: str, *, arch: str = "siglip",
              tokenizer: Optional[str] = None, image_size: Optional[int] = None) -> str:
  """Writes config.json + model.safetensors (+ tokenizer / processor files when `tokenizer`,
  a SentencePiece .model path, is given) loadable with `SiglipModel/CLIPModel.from_pretrained`.
  """
  save_file = common.requires("safetensors.numpy",
                              what="Exporting to Hugging Face")[0].save_file
  flat, img, txt, dims, image_size, text_len = prepare(params, model_kwargs, arch,
                                                       image_size=image_size)
  if arch == "clip":
    rules = clip_rules(img, txt)
  else:
    if "txt/head/bias" not in flat:  # head_bias=False: HF's head always has a bias.
      flat["txt/head/bias"] = np.zeros(flat["txt/head/kernel"].shape[1], np.float32)
    rules = (siglip_rules if arch == "siglip" else siglip2_rules)(img, txt)
  state = to_hf_state_dict(flat, rules)
  vocab = flat["txt/Embed_0/embedding"].shape[0]
  cfg = hf_config(arch, img, txt, dims, image_size, text_len, vocab,
                  logit_scale=float(flat["t"].reshape(-1)[0]))
  cfg["big_mm"] = dict(text_pad_mask=bool(txt.get("pad_mask")), image_posemb=img["posemb"])
  with common.atomic_dir(out_dir) as tmp:
    with open(os.path.join(tmp, "config.json"), "w") as f:
      json.dump(cfg, f, indent=2)
    save_file(state, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
      write_processor(tmp, tokenizer, image_size=image_size, text_len=text_len,
                      pad_mask=bool(txt.get("pad_mask")),
                      naflex=(img["patch_size"][0], cfg["vision_config"]["num_patches"])
                      if arch == "siglip2" else None)
  return out_dir


def write_tokenizer(out_dir, tokenizer_path, *, text_len, pad_mask) -> None:
  """tokenizer.json + tokenizer_config.json: a PreTrainedTokenizerFast (AutoTokenizer in
  transformers 4.x and 5.x; open_clip's HFTokenizer) that encodes as big_mm's Tokenizer does:
  the SentencePiece pieces truncated to text_len - 1, EOS, then pad ids up to text_len.

  transformers' SentencePiece converter follows the model's own normalizer spec (charsmap, extra
  whitespace removal, dummy prefix) and ranks BPE merges by piece score. Special-token strings
  inside a text ("</s>") are tokenized as text, as SentencePiece does (split_special_tokens).
  With pad_mask=False it returns no attention_mask, so pads are attended as in big_mm.
  """
  try:
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import SpmConverter, import_protobuf
    build = SpmConverter.build_tokenizer_from_spm_proto
  except (ImportError, AttributeError) as e:
    raise ExportError(f"Writing the tokenizer needs transformers 5 (its SentencePiece "
                      f"converter build_tokenizer_from_spm_proto; {e}): "
                      "pip install -e \".[export]\" (or pip install -U transformers).") from None
  proto = import_protobuf().ModelProto()
  with open(tokenizer_path, "rb") as f:
    proto.ParseFromString(f.read())
  spec = proto.trainer_spec
  if spec.model_type == 1:  # unigram
    vocab = [(p.piece, p.score) for p in proto.pieces]
  elif spec.model_type == 2:  # BPE
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
  else:
    raise ExportError(f"{tokenizer_path!r}: SentencePiece model_type {spec.model_type} (char / "
                      "word) has no tokenizers converter; train a unigram or BPE model.")
  tok = build(proto, vocab)
  eos = proto.pieces[spec.eos_id].piece
  tok.post_processor = processors.TemplateProcessing(single=f"$A {eos}",
                                                     special_tokens=[(eos, spec.eos_id)])
  tok.save(os.path.join(out_dir, "tokenizer.json"))
  config = dict(tokenizer_class="PreTrainedTokenizerFast", eos_token=eos,
                pad_token=proto.pieces[spec.pad_id].piece,
                unk_token=proto.pieces[spec.unk_id].piece, model_max_length=text_len,
                padding_side="right", truncation_side="right", split_special_tokens=True,
                clean_up_tokenization_spaces=False,
                model_input_names=["input_ids", "attention_mask"] if pad_mask else ["input_ids"])
  with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2)


def write_processor(out_dir, tokenizer_path, *, image_size, text_len, pad_mask, naflex=None):
  """The exact tokenizer (`write_tokenizer`, plus the SentencePiece model as spiece.model for
  big_mm's own Tokenizer) + an image processor matching big_mm's eval preprocessing
  `resize(image_size)|value_range(-1,1)` (bilinear, mean=std=0.5), as a SiglipProcessor; with
  naflex=(patch_size, max_num_patches) `value_range(-1,1)|naflex(max_num_patches, patch_size)`,
  as a Siglip2Processor.
  """
  shutil.copyfile(tokenizer_path, os.path.join(out_dir, "spiece.model"))
  write_tokenizer(out_dir, tokenizer_path, text_len=text_len, pad_mask=pad_mask)
  processor = "Siglip2Processor" if naflex else "SiglipProcessor"
  image_proc = dict(
      processor_class=processor, resample=2,  # bilinear
      do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=True)
  if naflex:
    image_proc.update(image_processor_type="Siglip2ImageProcessor", patch_size=naflex[0],
                      max_num_patches=naflex[1])
  else:
    image_proc.update(image_processor_type="SiglipImageProcessor", do_resize=True,
                      size={"height": image_size, "width": image_size})
  with open(os.path.join(out_dir, "preprocessor_config.json"), "w") as f:
    json.dump(image_proc, f, indent=2)
  with open(os.path.join(out_dir, "processor_config.json"), "w") as f:
    json.dump({"processor_class": processor}, f, indent=2)


# ---- import ---------------------------------------------------------------------------------

HF_ACT = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu": "gelu",
          "quick_gelu": "quick_gelu"}


def _hf_to_options(cfg: Mapping, arch: str) -> dict:
  v, t = cfg["vision_config"], cfg["text_config"]
  opts = {}
  for c, what in ((v, "vision"), (t, "text")):
    act = c.get("hidden_act", "quick_gelu" if arch == "clip" else "gelu_pytorch_tanh")
    if act not in HF_ACT:
      raise ExportError(f"HF {what} hidden_act={act!r}: big_mm's MLP activations are "
                        f"{sorted(HF_ACT)} (HF names); importing would change the function.")
    eps = c.get("layer_norm_eps", 1e-5 if arch == "clip" else 1e-6)
    opts[what] = dict(act=HF_ACT[act], norm_eps=float(eps))

  def tower(c):
    return dict(width=c["hidden_size"], depth=c["num_hidden_layers"],
                mlp_dim=c["intermediate_size"], num_heads=c["num_attention_heads"])
  image = dict(tower(v), patch_size=(v["patch_size"], v["patch_size"]), posemb="learn",
               **opts["vision"])
  text = dict(tower(t), vocab_size=t["vocab_size"], **opts["text"])
  extra = cfg.get("big_mm", {})
  if arch in ("siglip", "siglip2"):
    if not v.get("vision_use_head", True):
      raise ExportError("HF SigLIP vision_use_head=False has no big_mm equivalent.")
    image["pool"] = "map"
    if arch == "siglip2":
      image["posemb_grid"] = int(round(v["num_patches"] ** 0.5))
    text.update(pool="last_position", pad_mask=bool(extra.get("text_pad_mask", False)))
    return dict(towers=dict(image=image, text=text),
                out_dim=dict(image=0, text=t.get("projection_size", t["hidden_size"])),
                temperature_init=1.0, bias_init=0.0)
  # eos_token_id=2 (OpenAI's configs): HF pools at argmax(input_ids), the end-of-text token that
  # CLIP's tokenizer gives the largest id and puts last before the pads: big_mm's "last" too.
  image.update(pool="tok", pre_norm=True, head_bias=False)
  text.update(pool="last", causal=True, head_bias=False,
              pad_mask=bool(extra.get("text_pad_mask", False)))
  return dict(towers=dict(image=image, text=text), out_dim=cfg["projection_dim"],
              temperature_init=1.0, bias_init=None)


def import_hf(path: str) -> tuple[dict[str, np.ndarray], dict]:
  """HF SiglipModel / CLIPModel directory (config.json + model.safetensors, or
  pytorch_model.bin read with torch weights_only=True) -> (flat big_mm params, Towers kwargs).
  A CLIPModel has no logit bias, so its params hold no `b` (config.init keeps the model's own;
  to apply the model directly, add b = zeros(1))."""
  cfg_path, st_path = os.path.join(path, "config.json"), os.path.join(path, "model.safetensors")
  bin_path = os.path.join(path, "pytorch_model.bin")
  if not os.path.isfile(cfg_path) or not (os.path.isfile(st_path) or os.path.isfile(bin_path)):
    raise ExportError(f"{path!r} is not an HF model directory: it needs config.json and "
                      "model.safetensors (or pytorch_model.bin).")
  with open(cfg_path) as f:
    cfg = json.load(f)
  arch = cfg.get("model_type")
  if arch not in ARCHS:
    raise ExportError(f"{path!r}: model_type={arch!r}; big_mm imports {ARCHS}.")
  if os.path.isfile(st_path):
    load_file = common.requires("safetensors.numpy", what="Reading safetensors")[0].load_file
    state = load_file(st_path)
  else:
    st_path = bin_path
    state = common.load_torch_weights(bin_path)
  state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
  kwargs = _hf_to_options(cfg, arch)
  img, txt, dims = common.resolved_arch(kwargs)
  rules = {"siglip": siglip_rules, "siglip2": siglip2_rules, "clip": clip_rules}[arch](img, txt)
  expected_hf = {n for r in rules for n in r.hf}
  if arch == "clip" and "logit_bias" in state:
    expected_hf.add("logit_bias")
  missing = sorted(expected_hf - set(state))
  extra = sorted(set(state) - expected_hf)
  if missing or extra:
    raise ExportError(f"{st_path}: weights do not match the {arch} config:\n  missing "
                      f"({len(missing)}): {missing[:20]}\n  unexpected ({len(extra)}): {extra[:20]}")
  flat = {}
  for r in rules:
    try:
      values = r.inv([np.asarray(state[n], np.float32) for n in r.hf])
    except ValueError as e:
      raise ExportError(f"{r.hf}: cannot convert ({e}); shapes "
                        f"{[tuple(state[n].shape) for n in r.hf]}.") from None
    for name, value in zip(r.bm, values):
      flat[name] = np.asarray(value, np.float32)
  t_cfg, v_cfg = cfg["text_config"], cfg["vision_config"]
  image_size = (v_cfg["image_size"] if arch != "siglip2" else
                int(round(v_cfg["num_patches"] ** 0.5)) * v_cfg["patch_size"])
  want = _expected_shapes(kwargs, image_size, t_cfg["max_position_embeddings"])
  if arch == "clip":
    want.pop("b")  # CLIP has no logit bias: `b` is not imported (config.init keeps the model's)
  common.compare_keys(flat, want,
                      f"The weights of {path!r} converted to big_mm and the big_mm model of its "
                      "config.json")
  return flat, kwargs
