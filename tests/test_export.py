"""Export / import verified against Hugging Face transformers and open_clip (PyTorch, CPU,
float32), each loaded through its public API."""
import io
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")


import conftest  # noqa: E402

conftest.declare_torchvision_ops_if_unloadable()
transformers = pytest.importorskip("transformers")

from big_mm import config as config_lib  # noqa: E402
from big_mm import export, sharding  # noqa: E402
from big_mm.export import ExportError  # noqa: E402
from big_mm.input.tokenizer import Tokenizer  # noqa: E402
from big_mm.models.towers import Towers, from_two_towers  # noqa: E402
from conftest import ROOT, TOKENIZER  # noqa: E402

TOL = 1e-4
TEXTS = ["a photo of the number seven", "handwritten 7", "the digit one two three four five six"]
TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2)


def siglip_kwargs(image=None, text=None, **kw):
  """Towers kwargs; image / text update the towers' kwargs, out_dim may be (image, text)."""
  return from_two_towers(dict(image={**TOWER, "patch_size": (8, 8), "pool": "map", **(image or {})},
              text={**TOWER, "vocab_size": 128, "pool": "last_position", **(text or {})},
              **{"out_dim": (0, 32), "temperature_init": 10.0, "bias_init": -10.0, **kw}))


def clip_kwargs(image=None, text=None, **kw):
  return from_two_towers(dict(image={**TOWER, "patch_size": (8, 8), "pool": "tok", "pre_norm": True,
                     "head_bias": False, **(image or {})},
              text={**TOWER, "vocab_size": 128, "pool": "last", "causal": True,
                    "head_bias": False, **(text or {})},
              **{"out_dim": 24, "temperature_init": 10.0, "bias_init": None, **kw}))


def random_params(kwargs, image_size=32, text_len=16, seed=0):
  """Random values of the model's param shapes (numpy: no XLA compile), with LayerNorm scales,
  biases and probes away from their trivial init so every mapping is exercised."""
  model = Towers(**kwargs)
  shapes = jax.eval_shape(lambda: sharding.unbox(model.init(
      jax.random.key(0), {"image": jnp.zeros((1, image_size, image_size, 3)),
                          "text": jnp.zeros((1, text_len), jnp.int32)})["params"]))
  rng = np.random.RandomState(seed)
  flat = {}
  for path, s in jax.tree_util.tree_leaves_with_path(shapes):
    name = "/".join(p.key for p in path)
    shape = tuple(s.shape)
    if name.endswith("scale"):
      value = 1 + 0.1 * rng.randn(*shape)
    elif name in ("t", "b"):
      value = np.full(shape, np.log(10.0) if name == "t" else -10.0)
    elif name.endswith("kernel"):
      value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    else:  # biases, embeddings, position embeddings, probe, cls
      value = 0.1 * rng.randn(*shape)
    flat[name] = value.astype(np.float32)
  if kwargs.get("bias_init") is None:
    flat["b"] = np.zeros_like(flat["b"])  # softmax-trained models keep b = 0
  return export.unflatten(flat)


def apply(kwargs, params, img, txt):
  """-> (image embedding, text embedding, out)."""
  z, out = Towers(**kwargs).apply({"params": params}, {"image": img, "text": txt})
  return z["image"], z["text"], out


def images(n=3, size=32, seed=0):
  return np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)).astype(np.float32)


def compare(kwargs, params, out_dir, arch, image_size=32, text_len=16):
  """Exports, loads with transformers, checks embeddings / logits; returns max diffs."""
  export.export_hf(params, kwargs, out_dir, arch=arch, tokenizer=TOKENIZER, image_size=image_size)
  model = transformers.AutoModel.from_pretrained(out_dir).eval()
  assert type(model).__name__ == ("SiglipModel" if arch == "siglip" else "CLIPModel")
  tok = transformers.AutoTokenizer.from_pretrained(out_dir)
  enc = tok(TEXTS, padding="max_length", max_length=text_len, truncation=True,
            return_tensors="pt")
  ours = Tokenizer(TOKENIZER).encode(TEXTS, text_len)
  np.testing.assert_array_equal(enc["input_ids"].numpy(), ours)  # real padded inputs
  assert (ours == 0).any(), "the comparison must include padding"
  img = images(size=image_size)
  zimg, ztxt, out = apply(kwargs, params, img, ours)
  with torch.no_grad():
    o = model(pixel_values=torch.from_numpy(img).permute(0, 3, 1, 2), **enc)
  logits = np.asarray(zimg) @ np.asarray(ztxt).T * float(out["t"])
  if arch == "siglip":
    logits = logits + float(out["b"])
  diffs = {"image": np.abs(o.image_embeds.numpy() - np.asarray(zimg)).max(),
           "text": np.abs(o.text_embeds.numpy() - np.asarray(ztxt)).max(),
           "logits": np.abs(o.logits_per_image.numpy() - logits).max()}
  for k, d in diffs.items():
    assert d < TOL, (k, d)
  return diffs


SIGLIP_CASES = {
    "p8_learn": {},
    "p4_sincos_padmask_nobias": dict(image={"patch_size": (4, 4), "posemb": "sincos2d"},
                                     text={"pad_mask": True, "head_bias": False}),
    "depth2_scan_nohead": dict(image={"scan": True, "depth": 2},
                               text={"scan": True, "depth": 2}, out_dim=(0, 0)),
}


@pytest.mark.parametrize("case", list(SIGLIP_CASES))
def test_siglip_matches_transformers(case, tmp_path):
  kwargs = siglip_kwargs(**SIGLIP_CASES[case])
  params = random_params(kwargs)
  diffs = compare(kwargs, params, str(tmp_path / "hf"), "siglip")
  print(case, diffs)
  cfg = json.load(open(tmp_path / "hf" / "config.json"))
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  has_mask = "attention_mask" in tok("x")
  assert has_mask == bool(kwargs["towers"]["text"].get("pad_mask", False))
  assert cfg["text_config"]["max_position_embeddings"] == 16


CLIP_CASES = {
    "p8_heads": {},
    "p4_sincos_noheads": dict(image={"patch_size": (4, 4), "posemb": "sincos2d"},
                              text={"pad_mask": True}, out_dim=0),
}


@pytest.mark.parametrize("case", list(CLIP_CASES))
def test_clip_matches_transformers(case, tmp_path):
  kwargs = clip_kwargs(**CLIP_CASES[case])
  params = random_params(kwargs)
  print(case, compare(kwargs, params, str(tmp_path / "hf"), "clip"))


def fuzz_texts(n, seed=0):
  """Captions with punctuation, case, digits, odd spacing, unicode that NFKC changes, unknown
  characters and special-token strings."""
  rng = np.random.RandomState(seed)
  alphabet = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"-()  \t\n")
              + ["ｆ", "①", "é", "e\u0301", "ß", "中", "😀", "\u00a0"]
              + ["<unk>", "</s>", "<pad>"])
  return ["".join(rng.choice(alphabet, rng.randint(0, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def sentencepiece_models(tmp_path_factory):
  """The demo's BPE model (identity normalizer) and a unigram one with NMT-NFKC (the
  tools/make_tokenizer.py defaults)."""
  import sys
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import make_tokenizer
  words = "a photo of the number seven handwritten digit Café naïve ｆｕｌｌ ① Ⅻ".split()
  rng = np.random.RandomState(0)
  texts = [" ".join(rng.choice(words, rng.randint(1, 8))) + rng.choice([".", "!", ""])
           for _ in range(500)]
  unigram = str(tmp_path_factory.mktemp("spm") / "unigram.model")
  make_tokenizer.train(texts, unigram, vocab_size=100)
  return {"bpe_identity": TOKENIZER, "unigram_nmt_nfkc": unigram}


@pytest.mark.parametrize("model", ["bpe_identity", "unigram_nmt_nfkc"])
def test_hf_tokenizer_encodes_as_big_mm(model, sentencepiece_models, tmp_path):
  """The exported tokenizer reproduces big_mm's ids exactly (truncation, EOS, padding), also
  for punctuation, case and unicode (the SiglipTokenizer exported before dropped punctuation)."""
  path = sentencepiece_models[model]
  kwargs = siglip_kwargs(text={"vocab_size": Tokenizer(path).vocab_size})
  export.export_hf(random_params(kwargs), kwargs, str(tmp_path), arch="siglip", tokenizer=path)
  tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
  texts = ["itap of a seven.", "A photo of the number 7!", "the digit " + "nine " * 20,
           ""] + fuzz_texts(500)
  if model.startswith("unigram"):
    # A unigram vocabulary holds the control pieces themselves ("</s>"), which tokenizers'
    # Unigram can match inside a text while SentencePiece never does.
    texts = [t for t in texts if not any(c in t for c in ("<unk>", "</s>", "<pad>"))]
  got = tok(texts, padding="max_length", max_length=16, truncation=True)["input_ids"]
  want = Tokenizer(path).encode(texts, 16)
  bad = [(t, g, w.tolist()) for t, g, w in zip(texts, got, want) if list(g) != w.tolist()]
  assert not bad, bad[:3]


def test_hf_config_describes_the_model(tmp_path):
  """transformers loads the exported configs without a warning of its own about them, and
  every field with a model meaning (token ids, projection sizes, logit scale) is the model's."""
  records = []
  handler = logging.Handler()
  handler.emit = lambda r: records.append(r.getMessage())
  tf_logger = logging.getLogger("transformers")
  for arch, kwargs in (("siglip", siglip_kwargs()), ("clip", clip_kwargs())):
    d = str(tmp_path / arch)
    params = random_params(kwargs)
    export.export_hf(params, kwargs, d, arch=arch, tokenizer=TOKENIZER)
    tf_logger.addHandler(handler)
    try:
      transformers.utils.logging.warning_once.cache_clear()
      records.clear()
      cfg = transformers.AutoConfig.from_pretrained(d)
      transformers.AutoTokenizer.from_pretrained(d)
      transformers.AutoModel.from_pretrained(d)
      loaded = set(records)
      # transformers' own default sub-configs, which its config __repr__ builds while loading,
      # warn by themselves: SiglipTextConfig() has eos_token_id 49407 for 32000 tokens.
      transformers.utils.logging.warning_once.cache_clear()
      records.clear()
      type(cfg)(), type(cfg.text_config)(), type(cfg.vision_config)()
      assert not loaded - set(records), loaded - set(records)
      transformers.utils.logging.warning_once.cache_clear()
      records.clear()
      for c in (cfg, cfg.text_config, cfg.vision_config):
        c.validate()  # the checks behind those warnings, on the exported values
      assert not records, records
    finally:
      tf_logger.removeHandler(handler)
    text = cfg.text_config
    ours = Tokenizer(TOKENIZER)
    assert (text.pad_token_id, text.eos_token_id, text.bos_token_id) == (ours.pad_id,
                                                                        ours.eos_id, None)
    assert text.vocab_size == ours.vocab_size
    flat = export.flatten(params)
    if arch == "clip":
      assert cfg.projection_dim == text.projection_dim == cfg.vision_config.projection_dim == 24
      assert cfg.logit_scale_init_value == pytest.approx(float(flat["t"][0]))
    else:
      assert text.projection_size == 32


def test_round_trips(tmp_path):
  kwargs = siglip_kwargs(image={"depth": 2}, text={"depth": 2})
  params = random_params(kwargs)
  flat = export.flatten(params)
  export.export_hf(params, kwargs, str(tmp_path / "hf"), arch="siglip")
  back, back_kwargs = export.load_params(str(tmp_path / "hf"), with_model_kwargs=True)
  assert set(back) == set(flat)
  for k in flat:
    np.testing.assert_array_equal(back[k], flat[k], err_msg=k)
  # The derived kwargs build the same model: identical outputs.
  img, txt = images(), Tokenizer(TOKENIZER).encode(TEXTS, 16)
  a = apply(kwargs, params, img, txt)
  b = apply(back_kwargs, export.unflatten(back), img, txt)
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(b[0]))
  np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))

  export.export_npz(params, str(tmp_path / "m.npz"))
  back = export.load_params(str(tmp_path / "m.npz"))
  assert set(back) == set(flat) and all(np.array_equal(back[k], flat[k]) for k in flat)
  scanned = export.load_params(str(tmp_path / "m.npz"), scan=True)
  assert scanned["img/Transformer/encoderblock/LayerNorm_0/scale"].shape == (2, 32)

  # CLIP: the patch-embedding bias is folded into the position embedding (CLIP's conv has no
  # bias); every other parameter comes back identical, and the function is the same.
  kwargs = clip_kwargs()
  params = random_params(kwargs)
  flat = export.flatten(params)
  export.export_hf(params, kwargs, str(tmp_path / "clip"), arch="clip")
  back, back_kwargs = export.load_params(str(tmp_path / "clip"), with_model_kwargs=True)
  assert set(back) == set(flat) - {"b"}  # CLIP has no logit bias: b is not imported
  back["b"] = flat["b"]
  changed = sorted(k for k in flat if not np.array_equal(back[k], flat[k]))
  assert changed == ["img/cls", "img/embedding/bias", "img/pos_embedding"] or changed == [
      "img/embedding/bias", "img/pos_embedding"], changed
  a = apply(kwargs, params, img, txt)
  b = apply(back_kwargs, export.unflatten(back), img, txt)
  assert np.abs(np.asarray(a[0]) - np.asarray(b[0])).max() < 1e-5


def test_refuses_what_does_not_map(tmp_path):
  demo = siglip_kwargs(text={"pool": "last"}, out_dim=32)  # the demo's options
  with pytest.raises(ExportError) as e:
    export.export_hf(random_params(demo), demo, str(tmp_path / "a"), arch="siglip")
  msg = str(e.value)
  assert "text.pool='last'" in msg and "last_position" in msg and "image head" in msg
  no_pre = clip_kwargs(image={"pre_norm": False, "head_bias": True})
  with pytest.raises(ExportError) as e:
    export.export_hf(random_params(no_pre), no_pre, str(tmp_path / "b"), arch="clip")
  assert "pre_norm" in str(e.value) and "non-zero bias" in str(e.value)
  sig = siglip_kwargs()
  with pytest.raises(ExportError, match="b=.* != 0"):
    export.export_hf(random_params(sig), sig, str(tmp_path / "c"), arch="clip")
  assert not os.path.exists(tmp_path / "a")  # nothing half-written


def test_refuses_mixture_of_experts_except_npz(tmp_path):
  """HF / open_clip blocks have one dense MLP: a model with MoeMlp_0 params is refused with the
  reason and the way out (npz), also when the given kwargs lack the moe dict, and by
  tools/export.py's towers_params before it leaves a scope out (LIMoE's shared encoder); npz
  keeps them."""
  moe = siglip_kwargs(image={"moe": {"layers": "all", "num_experts": 2}})
  params = random_params(moe)
  for kwargs in (moe, siglip_kwargs()):
    for fn, extra in ((export.export_hf, {"arch": "siglip"}),
                      (export.export_open_clip, {"image_size": 32})):
      with pytest.raises(ExportError) as e:
        fn(params, kwargs, str(tmp_path / "out"), **extra)
      msg = str(e.value)
      assert "mixture-of-experts" in msg and "img/Transformer/encoderblock_0/MoeMlp_0" in msg
      assert "--format npz" in msg and not (tmp_path / "out").exists()
  from big_mm.export import common as export_common
  shared = {"shared": {"Transformer": {"encoderblock_1": {"MoeMlp_0": {"router": np.zeros(2)}}}},
            "img": {}, "txt": {}, "t": np.zeros(1), "b": np.zeros(1)}  # LIMoE's shared tower
  with pytest.raises(ExportError, match="'shared/Transformer/encoderblock_1/MoeMlp_0'"):
    export_common.towers_params(shared, siglip_kwargs())
  flat = export.load_params(export.export_npz(params, str(tmp_path / "moe.npz")))
  assert flat["img/Transformer/encoderblock_0/MoeMlp_0/Dense_0/kernel"].shape == (2, 32, 64)


def test_bad_inputs(tmp_path):
  from safetensors.numpy import load_file, save_file
  kwargs = siglip_kwargs()
  params = random_params(kwargs)
  # Params that do not fit the config.
  flat = export.flatten(params)
  del flat["txt/head/bias"]
  flat["img/extra"] = np.zeros(3, np.float32)
  with pytest.raises(ExportError, match=r"(?s)missing.*txt/head/bias.*unexpected.*img/extra"):
    export.export_hf(flat, kwargs, str(tmp_path / "x"), arch="siglip")
  # HF directory with a missing / extra / misshapen weight.
  d = str(tmp_path / "hf")
  export.export_hf(params, kwargs, d, arch="siglip")
  st = os.path.join(d, "model.safetensors")
  good = load_file(st)
  bad = dict(good)
  bad.pop("logit_bias")
  bad["vision_model.foo"] = np.zeros(2, np.float32)
  save_file(bad, st)
  with pytest.raises(ExportError, match=r"(?s)missing.*logit_bias.*unexpected.*vision_model.foo"):
    export.load_params(d)
  bad = dict(good)
  bad["text_model.head.weight"] = np.zeros((16, 32), np.float32)
  save_file(bad, st)
  with pytest.raises(ExportError, match="txt/head/kernel: got \\(32, 16\\), expected \\(32, 32\\)"):
    export.load_params(d)
  # Pickles are never loaded.
  np.save(str(tmp_path / "obj.npy"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
  np.savez(str(tmp_path / "obj.npz"), a=np.array([{"a": 1}], dtype=object))
  with pytest.raises(ExportError, match="pickle"):
    export.load_params(str(tmp_path / "obj.npz"))
  with pytest.raises(ExportError, match="pickled"):
    export.load_params(str(tmp_path / "pytorch_model.bin"))


def open_clip_expected(depth_v, depth_t, d=32, mlp=64, patches=16, text_len=16, proj=24):
  """open_clip native CLIP state-dict keys / shapes (open_clip/model.py, transformer.py)."""
  def blocks(prefix, depth):
    out = {}
    for i in range(depth):
      b = f"{prefix}.resblocks.{i}"
      out.update({f"{b}.ln_1.weight": (d,), f"{b}.ln_1.bias": (d,),
                  f"{b}.attn.in_proj_weight": (3 * d, d), f"{b}.attn.in_proj_bias": (3 * d,),
                  f"{b}.attn.out_proj.weight": (d, d), f"{b}.attn.out_proj.bias": (d,),
                  f"{b}.ln_2.weight": (d,), f"{b}.ln_2.bias": (d,),
                  f"{b}.mlp.c_fc.weight": (mlp, d), f"{b}.mlp.c_fc.bias": (mlp,),
                  f"{b}.mlp.c_proj.weight": (d, mlp), f"{b}.mlp.c_proj.bias": (d,)})
    return out
  return {"visual.conv1.weight": (d, 3, 8, 8), "visual.class_embedding": (d,),
          "visual.positional_embedding": (patches + 1, d), "visual.ln_pre.weight": (d,),
          "visual.ln_pre.bias": (d,), **blocks("visual.transformer", depth_v),
          "visual.ln_post.weight": (d,), "visual.ln_post.bias": (d,), "visual.proj": (d, proj),
          "token_embedding.weight": (128, d), "positional_embedding": (text_len, d),
          **blocks("transformer", depth_t), "ln_final.weight": (d,), "ln_final.bias": (d,),
          "text_projection": (d, proj), "logit_scale": (), "logit_bias": ()}


def test_open_clip_layout(tmp_path):
  """The native-CLIP layout against open_clip's documented names (the model itself is run in
  test_open_clip_matches)."""
  from safetensors.numpy import load_file
  kwargs = clip_kwargs()
  d = str(tmp_path / "oc")
  export.export_open_clip(random_params(kwargs), kwargs, d, image_size=32, tokenizer=TOKENIZER)
  state = load_file(os.path.join(d, "open_clip_model.safetensors"))
  assert {k: tuple(v.shape) for k, v in state.items()} == open_clip_expected(1, 1)
  cfg = json.load(open(os.path.join(d, "open_clip_config.json")))
  m = cfg["model_cfg"]
  assert m["embed_dim"] == 24 and m["quick_gelu"] is False
  assert m["vision_cfg"]["act_kwargs"] == {"approximate": "tanh"}
  assert m["text_cfg"]["norm_kwargs"] == {"eps": 1e-6}
  assert m["text_cfg"]["pool_type"] == "eos" and m["text_cfg"]["eos_id"] == 1
  assert m["text_cfg"]["no_causal_mask"] is False and m["vision_cfg"]["no_ln_pre"] is False
  assert cfg["preprocess_cfg"]["mean"] == [0.5] * 3 and cfg["preprocess_cfg"]["size"] == [32, 32]
  first_patch = siglip_kwargs(image={"pool": "0"})
  with pytest.raises(ExportError, match=r"image.pool='0'.*Train with pool='map'"):
    export.export_open_clip(random_params(first_patch), first_patch, str(tmp_path / "x"),
                            image_size=32)


OPEN_CLIP_CASES = {
    # The README demo's options: MAP pooling (timm route), no image head, last position.
    "siglip_map": siglip_kwargs(),
    "map_prenorm_sincos_scan_head_causal": siglip_kwargs(
        image={"pre_norm": True, "posemb": "sincos2d", "scan": True, "depth": 2},
        text={"pool": "last", "causal": True}, out_dim=24),
    "gap_head_nobias": siglip_kwargs(image={"pool": "gap", "head_bias": False}, out_dim=32),
    "clip_tok": clip_kwargs(),  # native route
    "tok_noprenorm_bidirectional": clip_kwargs(
        image={"pre_norm": False}, bias_init=-5.0,
        text={"head_bias": True, "causal": False, "pool": "last_position"}),
}


def pil_images(n=3, seed=0):
  from PIL import Image
  rng = np.random.RandomState(seed)
  return [Image.fromarray(rng.randint(0, 256, (27, 40, 3), np.uint8)) for _ in range(n)]


def big_mm_eval_pixels(pil, size=32):
  from big_mm.input import preprocess
  pp = preprocess.parse_pp(f"decode|resize({size})|value_range(-1,1)")
  return np.stack([preprocess.apply_pp(pp, np.asarray(p), np.random.default_rng(0))
                   for p in pil]).astype(np.float32)


def load_open_clip(d):
  """Everything an open_clip user does, through open_clip's public API only."""
  import open_clip
  model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
  return model.eval(), preprocess, open_clip.get_tokenizer("local-dir:" + d)


@pytest.mark.parametrize("case", list(OPEN_CLIP_CASES))
def test_open_clip_matches(case, tmp_path):
  """open_clip's own model, preprocess and tokenizer compute big_mm's embeddings and logits."""
  kwargs = OPEN_CLIP_CASES[case]
  params = random_params(kwargs)
  d = str(tmp_path / "oc")
  export.export_open_clip(params, kwargs, d, image_size=32, tokenizer=TOKENIZER)
  model, preprocess, tokenizer = load_open_clip(d)
  texts = TEXTS + ["itap of a Seven.", "the digit " + "nine " * 20]  # punctuation, truncation
  ids = tokenizer(texts)
  want = Tokenizer(TOKENIZER).encode(texts, 16)
  np.testing.assert_array_equal(ids.numpy(), want)
  pil = pil_images()
  pixels = torch.stack([preprocess(p) for p in pil])
  ours_pixels = big_mm_eval_pixels(pil)
  assert np.abs(pixels.permute(0, 2, 3, 1).numpy() - ours_pixels).max() < 1e-5
  zimg, ztxt, out = apply(kwargs, params, ours_pixels, want)
  with torch.no_grad():
    a, b, scale, bias = model(pixels, ids)
    theirs = (scale * a @ b.T + bias).numpy()
  logits = np.asarray(zimg) @ np.asarray(ztxt).T * float(out["t"]) + float(out["b"])
  diffs = {"image": np.abs(a.numpy() - np.asarray(zimg)).max(),
           "text": np.abs(b.numpy() - np.asarray(ztxt)).max(),
           "logits": np.abs(theirs - logits).max()}
  print(case, diffs)
  for k, v in diffs.items():
    assert v < TOL * (10 if k == "logits" else 1), (k, v)  # logits: x t = 10


def test_processor_matches_big_mm_preprocessing(tmp_path, data_dir):
  from PIL import Image

  from big_mm.input import preprocess, sources
  kwargs = siglip_kwargs()
  d = str(tmp_path / "hf")
  export.export_hf(random_params(kwargs), kwargs, d, arch="siglip", tokenizer=TOKENIZER)
  proc = transformers.AutoProcessor.from_pretrained(d)
  assert type(proc).__name__ == "SiglipProcessor"
  src = sources.open_source("digits_captions", "test", data_dir)
  ex = src[0]
  pp = preprocess.parse_pp("decode|resize(32)|value_range(-1,1)")
  ours = preprocess.apply_pp(pp, ex["image"], np.random.default_rng(0))
  # A non-square, differently sized image exercises the resize too.
  raw = Image.open(io.BytesIO(bytes(ex["image"]))).convert("RGB").resize((40, 27))
  ours_resized = preprocess.apply_pp(pp, np.asarray(raw), np.random.default_rng(0))
  # transformers 5 picks its torchvision image processor when torchvision imports (the test
  # extra installs it): its resize rounds differently, by at most one uint8 level (2/255 in
  # [-1, 1]). backend="pil" is big_mm's preprocessing exactly.
  pil_proc = transformers.AutoImageProcessor.from_pretrained(d, backend="pil")
  for pil, want in ((Image.open(io.BytesIO(bytes(ex["image"]))), ours), (raw, ours_resized)):
    got = pil_proc(images=pil, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(got - want).max() < 1e-5
    got = proc(images=pil, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
    assert np.abs(got - want).max() < 2 / 255 + 1e-5
  texts = ["a photo of the number seven", "the digit " + "nine " * 20]  # one truncated
  got = proc(text=texts, padding="max_length", truncation=True, return_tensors="np")
  np.testing.assert_array_equal(got["input_ids"], Tokenizer(TOKENIZER).encode(texts, 16))


@pytest.fixture(scope="module")
def demo_run(trained_demo, data_dir):
  """The README demo (configs/demo.py, 600 steps), trained once per session by conftest."""
  workdir, _ = trained_demo
  config = config_lib.load(os.path.join(ROOT, "configs", "demo.py"),
                           {"input.data_dir": data_dir})
  return config, str(workdir)


def export_tool_module():
  import sys
  sys.path.insert(0, os.path.join(ROOT, "tools"))
  import export as export_tool
  return export_tool


@pytest.fixture(scope="module")
def demo_zeroshot(demo_run, data_dir):
  """big_mm's own zero-shot evaluator on the trained demo (step 600): class embeddings, image
  embeddings, predictions; plus the prompts and the test images as PIL images."""
  from PIL import Image

  from big_mm import evaluators, models, train
  from big_mm.evaluators import common, zeroshot
  from big_mm.input import sources
  config, workdir = demo_run
  params, _ = export_tool_module().restore_params(workdir, 600)
  mesh = sharding.make_mesh(config.mesh)
  model = models.get_model(config.model_name, **config.model.to_dict())
  embedder = evaluators.Embedder(train.make_objective(config, model, mesh, None), mesh)
  ev = config.evals.zeroshot
  classes = zeroshot.class_embeddings(embedder, params, Tokenizer(TOKENIZER),
                                      list(ev.classnames), list(ev.templates),
                                      config.input.text_len, 64)
  data = embedder.split(params, common.eval_input_config(config, ev), 64, texts=False)
  src = sources.open_source("digits_captions", "test", data_dir)
  return dict(classes=classes, zimg=data["zimg"], label=data["label"],
              ours=np.argmax(data["zimg"] @ classes.T, axis=-1),
              num_templates=len(ev.templates),
              prompts=[t.format(c) for c in ev.classnames for t in ev.templates],
              pil=[Image.open(io.BytesIO(bytes(src[i]["image"]))) for i in range(len(src))])


def check_zeroshot(name, zi, zt, demo):
  """Per-prompt text embeddings zt / image embeddings zi (unnormalised, torch) from another
  library give big_mm's zero-shot predictions, scores and embeddings."""
  zt = torch.nn.functional.normalize(zt, dim=-1).numpy()
  zt = zt.reshape(-1, demo["num_templates"], zt.shape[-1]).mean(1)
  zt /= np.linalg.norm(zt, axis=-1, keepdims=True)
  zi = torch.nn.functional.normalize(zi, dim=-1).numpy()
  theirs = np.argmax(zi @ zt.T, axis=-1)
  assert len(theirs) == len(demo["ours"]) == 300
  np.testing.assert_array_equal(theirs, demo["ours"])
  # Stronger than equal argmaxes: the whole score matrix and the embeddings agree.
  score_diff = np.abs(zi @ zt.T - demo["zimg"] @ demo["classes"].T).max()
  diffs = (np.abs(zi - demo["zimg"]).max(), np.abs(zt - demo["classes"]).max(), score_diff)
  print(f"demo zero-shot via {name}: max |diff| image, class embeddings, scores", diffs,
        "accuracy", float(np.mean(theirs == demo["label"])))
  assert max(diffs) < TOL
  # The demo really learned: the exported model's zero-shot accuracy clears the demo's bar too.
  assert np.mean(theirs == demo["label"]) >= 0.8


def test_demo_zeroshot_predictions_match(demo_run, demo_zeroshot, tmp_path):
  """Trained tiny demo -> tools/export.py -> transformers zero-shot == big_mm's evaluator."""
  export_tool = export_tool_module()
  config, workdir = demo_run
  out = str(tmp_path / "hf")
  with pytest.raises(ValueError, match=r"No checkpoint for step 3\b.*\[400, 600\]"):
    export_tool.run(config, workdir, "hf", out, step=3)
  export_tool.run(config, workdir, "hf", out)  # latest: 600
  export_tool.run(config, workdir, "npz", str(tmp_path / "m.npz"), step=400)
  assert "img/MAPHead_0/probe" in export.load_params(str(tmp_path / "m.npz"))
  assert export_tool.main(["--workdir", workdir]) == 2  # usage
  assert export_tool.check_pp(config.evals.zeroshot.pp_image) is None
  assert "central_crop" in export_tool.check_pp("decode|resize(36)|central_crop(32)")

  hf = transformers.AutoModel.from_pretrained(out).eval()
  proc = transformers.AutoProcessor.from_pretrained(out)
  with torch.no_grad():
    inputs = proc(text=demo_zeroshot["prompts"], images=demo_zeroshot["pil"],
                  padding="max_length", return_tensors="pt")
    zt = hf.get_text_features(input_ids=inputs["input_ids"])
    zi = hf.get_image_features(pixel_values=inputs["pixel_values"])
  check_zeroshot("transformers", getattr(zi, "pooler_output", zi),
                 getattr(zt, "pooler_output", zt), demo_zeroshot)


def test_demo_open_clip_zeroshot_matches(demo_run, demo_zeroshot, tmp_path):
  """The README demo (MAP pooling) -> tools/export.py --format open_clip -> open_clip's model,
  preprocess and tokenizer (public API only) give big_mm's zero-shot predictions."""
  config, workdir = demo_run
  out = str(tmp_path / "oc")
  assert export_tool_module().main(
      ["--config", os.path.join(ROOT, "configs", "demo.py"), "--workdir", workdir,
       f"--config.input.data_dir={config.input.data_dir}", "--format", "open_clip",
       "--out", out]) == 0
  model, preprocess, tokenizer = load_open_clip(out)
  with torch.no_grad():
    zt = model.encode_text(tokenizer(demo_zeroshot["prompts"]))
    zi = model.encode_image(torch.stack([preprocess(p) for p in demo_zeroshot["pil"]]))
  check_zeroshot("open_clip", zi, zt, demo_zeroshot)


def test_run_starts_from_an_hf_export(demo_run, tmp_path):
  """`config.init.path` = an exported HF SigLIP directory: the run starts from its params."""
  from big_mm import train
  export_tool = export_tool_module()
  config, workdir = demo_run
  hf_dir = export_tool.run(config, workdir, "hf", str(tmp_path / "hf"))
  exported = export.load_params(hf_dir)
  user = config_lib.load_file(os.path.join(ROOT, "configs", "demo.py"))
  user.input.data_dir = config.input.data_dir
  user.total_steps = 1
  user.evals = {}
  user.init = dict(path=hf_dir, include=r"img/.*|t|b")
  user.optim.lr_mults = ((r"img/.*|t|b", 0.0), (r".*", 1.0))  # loaded and kept as loaded
  user.optim.schedule.warmup_steps = 0
  run = str(tmp_path / "from_hf")
  train.train(config_lib.load(user), run)
  params, _ = export_tool.restore_params(run, 1)
  flat = export.flatten(params)
  loaded = [n for n in exported if n.startswith("img/") or n in ("t", "b")]
  assert len(loaded) > 10
  for name in loaded:
    np.testing.assert_array_equal(flat[name], exported[name], err_msg=name)
  # The text tower was not included: it starts from a fresh init, not the export.
  assert not np.array_equal(flat["txt/Embed_0/embedding"], exported["txt/Embed_0/embedding"])


def test_truncated_embedding_export(tmp_path):
  """--embed_dim: a model with heads exports the first k dims of its embedding, re-normalised
  (the Matryoshka prefix), exactly, here to HF CLIP; a tower without a head (HF SigLIP's image
  tower) is refused with the reason."""
  from big_mm.evaluators.common import matryoshka_prefix
  from big_mm.export.matryoshka import truncate_embedding
  kwargs = clip_kwargs()
  params = random_params(kwargs)
  small_params, small_kwargs = truncate_embedding(params, kwargs, 8)
  assert small_kwargs["out_dim"] == 8 and params["img"]["head"]["kernel"].shape[-1] == 24
  img, txt = images(), Tokenizer(TOKENIZER).encode(TEXTS, 16)
  full = apply(kwargs, params, img, txt)
  small = apply(small_kwargs, small_params, img, txt)
  for z_full, z_small in zip(full[:2], small[:2]):
    assert z_small.shape[-1] == 8
    np.testing.assert_allclose(z_small, matryoshka_prefix(np.asarray(z_full), 8), atol=1e-6)
  compare(small_kwargs, small_params, str(tmp_path / "hf"), "clip")
  with pytest.raises(ExportError, match=r"\['image'\] tower\(s\) have no head .*HF SigLIP"):
    truncate_embedding(random_params(siglip_kwargs()), siglip_kwargs(), 8)
  with pytest.raises(ExportError, match=r"--embed_dim=32 is larger than the embedding dim"):
    truncate_embedding(params, kwargs, 32)


# ---- checkpoints people already have: big_vision npz, open_clip / OpenAI CLIP -------------

STRICT = 1e-5  # issue 18: the same embeddings within 1e-5 (float32)


def hf_embeddings(d, img, ids):
  """Normalised image / text embeddings of the HF model in `d` (the independent forward)."""
  model = transformers.AutoModel.from_pretrained(d).eval()
  with torch.no_grad():
    o = model(pixel_values=torch.from_numpy(img).permute(0, 3, 1, 2),
              input_ids=torch.from_numpy(np.asarray(ids, np.int64)))
  return o.image_embeds.numpy(), o.text_embeds.numpy()


def assert_embeddings(kwargs, flat, img, ids, want_img, want_txt):
  zimg, ztxt, _ = apply(kwargs, export.unflatten(flat), img, ids)
  diffs = (np.abs(np.asarray(zimg) - want_img).max(), np.abs(np.asarray(ztxt) - want_txt).max())
  assert max(diffs) < STRICT, diffs


def test_big_vision_npz_as_published(tmp_path):
  """A SigLIP .npz as big_vision saves it (`params/` prefix; unscanned as released or scanned
  as trained with scan=True) loads through load_params with the embeddings of transformers'
  SiglipModel holding the same weights; `file.npz:img` is the image tower alone; bfloat16
  arrays (numpy's 2-byte void) are read back."""
  kwargs = siglip_kwargs(image={"depth": 2}, text={"depth": 2})
  params = random_params(kwargs)
  export.export_hf(params, kwargs, str(tmp_path / "hf"), arch="siglip")
  img, ids = images(), Tokenizer(TOKENIZER).encode(TEXTS, 16)
  want = hf_embeddings(str(tmp_path / "hf"), img, ids)
  flat = export.flatten(params)
  published = str(tmp_path / "webli.npz")
  np.savez(published, **{"params/" + k: v for k, v in flat.items()})
  scanned = str(tmp_path / "scanned.npz")
  np.savez(scanned, **{"params/" + k: v for k, v in export.stack_layers(flat).items()})
  assert "params/img/Transformer/encoderblock/LayerNorm_0/scale" in np.load(scanned).files
  for path in (published, scanned):
    assert_embeddings(kwargs, export.load_params(path), img, ids, *want)
    scan_kwargs = siglip_kwargs(image={"depth": 2, "scan": True}, text={"depth": 2, "scan": True})
    assert_embeddings(scan_kwargs, export.load_params(path, scan=True), img, ids, *want)
  img_only = export.load_params(published + ":img")
  assert set(img_only) == {k for k in flat if k.startswith("img/")}
  with pytest.raises(ExportError, match=r"no sub-tree 'image'.*\['b', 'img', 't', 'txt'\]"):
    export.load_params(published + ":image")
  import ml_dtypes
  bf16 = np.asarray([1.5, -2.25, 3.0078125], ml_dtypes.bfloat16)
  np.savez(str(tmp_path / "bf16.npz"), **{"params/t": bf16.view(np.dtype("V2"))})
  np.testing.assert_array_equal(export.load_params(str(tmp_path / "bf16.npz"))["t"],
                                bf16.astype(np.float32))


def test_vit_classifier_npz_into_image_tower(tmp_path):
  """A plain ViT classifier .npz in the layout the ViT releases use (no `img/`, pre-linen
  module numbers, the class token's position inside Transformer/posembed_input, a class head)
  becomes big_mm's image tower computing what transformers' ViTModel computes."""
  from big_mm.models.vit import ViT
  d, heads, p, depth = 32, 2, 8, 2
  cfg = transformers.ViTConfig(hidden_size=d, num_hidden_layers=depth, num_attention_heads=heads,
                               intermediate_size=64, image_size=32, patch_size=p,
                               hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
  torch.manual_seed(0)
  ref = transformers.ViTModel(cfg, add_pooling_layer=False).eval()
  with torch.no_grad():
    for name, w in ref.named_parameters():
      w.copy_(torch.randn_like(w) * (0.1 if w.ndim == 1 else 1 / np.sqrt(w.shape[-1]))
              + (1.0 if "layernorm" in name and name.endswith("weight") else 0.0))
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  heads_split = lambda w: w.T.reshape(d, heads, d // heads)  # noqa: E731  torch [out, in]
  npz = {"embedding/kernel": sd["embeddings.patch_embeddings.projection.weight"].transpose(
             2, 3, 1, 0),
         "embedding/bias": sd["embeddings.patch_embeddings.projection.bias"],
         "cls": sd["embeddings.cls_token"],
         "Transformer/posembed_input/pos_embedding": sd["embeddings.position_embeddings"],
         "Transformer/encoder_norm/scale": sd["layernorm.weight"],
         "Transformer/encoder_norm/bias": sd["layernorm.bias"],
         "head/kernel": np.zeros((d, 10), np.float32), "head/bias": np.zeros(10, np.float32)}
  for i in range(depth):
    b, h = f"Transformer/encoderblock_{i}", f"layers.{i}"
    att = f"{b}/MultiHeadDotProductAttention_1"
    for ours, theirs in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
      npz[f"{att}/{ours}/kernel"] = heads_split(sd[f"{h}.attention.{theirs}.weight"])
      npz[f"{att}/{ours}/bias"] = sd[f"{h}.attention.{theirs}.bias"].reshape(heads, -1)
    npz[f"{att}/out/kernel"] = sd[f"{h}.attention.o_proj.weight"].T.reshape(heads, -1, d)
    npz[f"{att}/out/bias"] = sd[f"{h}.attention.o_proj.bias"]
    for ln, theirs in (("LayerNorm_0", "layernorm_before"), ("LayerNorm_2", "layernorm_after")):
      npz[f"{b}/{ln}/scale"], npz[f"{b}/{ln}/bias"] = (sd[f"{h}.{theirs}.weight"],
                                                       sd[f"{h}.{theirs}.bias"])
    for dense, theirs in (("Dense_0", "mlp.fc1"), ("Dense_1", "mlp.fc2")):
      npz[f"{b}/MlpBlock_3/{dense}/kernel"] = sd[f"{h}.{theirs}.weight"].T
      npz[f"{b}/MlpBlock_3/{dense}/bias"] = sd[f"{h}.{theirs}.bias"]
  path = str(tmp_path / "vit_classifier.npz")
  np.savez(path, **npz)
  flat = export.load_params(path)
  assert all(k.startswith("img/") for k in flat) and "img/head/kernel" not in flat
  assert "img/Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel" in flat
  tower = {k[len("img/"):]: v for k, v in flat.items()}
  img = images()
  x, _ = ViT(width=d, depth=depth, mlp_dim=64, num_heads=heads, patch_size=p, pool="tok").apply(
      {"params": export.unflatten(tower)}, img)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(img).permute(0, 3, 1, 2)).last_hidden_state[:, 0]
  assert np.abs(np.asarray(x) - want.numpy()).max() < STRICT


def test_init_path_subtree_and_checkpoint_without_b(data_dir, tmp_path, caplog):
  """config.init.path takes big_vision's `file.npz:img` (only the image tower is loaded) and a
  CLIP-style checkpoint without the SigLIP bias `b` (b keeps its init, said in the log) with the
  default init.include; a param missing inside a tower the file has is still an error."""
  from big_mm import train
  from conftest import tiny_config
  config = tiny_config(data_dir)
  setup = train.build(config)
  ts = train.make_train_state(setup)
  state = ts.init(jax.random.key(0))
  fresh = export.flatten(state["params"])
  source = export.flatten(ts.init(jax.random.key(1))["params"])  # another model's weights
  clip_like = {k: v for k, v in source.items() if k != "b"}
  path = str(tmp_path / "clip_like.npz")
  np.savez(path, **{"params/" + k: v for k, v in clip_like.items()})

  def load(init_path):
    with config.unlocked():
      config.init.path = init_path
    with caplog.at_level(logging.INFO, logger="big_mm"):
      return export.flatten(train.load_init(config, ts, state)["params"])

  loaded = load(path)
  for k in fresh:
    np.testing.assert_array_equal(loaded[k], fresh[k] if k == "b" else source[k], err_msg=k)
  assert "b not in" in caplog.text and "keep their init" in caplog.text
  loaded = load(path + ":img")
  for k in fresh:
    want = source[k] if k.startswith("img/") else fresh[k]
    np.testing.assert_array_equal(loaded[k], want, err_msg=k)
  np.savez(path, **{"params/" + k: v for k, v in clip_like.items()
                    if k != "txt/pos_embedding"})
  with pytest.raises(config_lib.ConfigError, match=r"txt/pos_embedding.*is not in"):
    load(path)


def test_text_pool_type_has_big_vision_semantics():
  """pool_type is big_vision's key with its meanings: 'last' reads the last POSITION (big_mm's
  'last_position', not 'last'), 'mean' / 'map' pool every position, pads included;
  pool_masks_pads switches that for big_mm's own pool names."""
  from big_mm.models.text import TextTransformer
  ids = Tokenizer(TOKENIZER).encode(TEXTS, 16)
  assert (ids == 0).any()
  base = dict(TOWER, vocab_size=128)
  shapes = jax.eval_shape(lambda: sharding.unbox(TextTransformer(**base, pool="map").init(
      jax.random.key(0), ids)["params"]))
  rng = np.random.RandomState(0)  # random values (numpy: no per-op compiles of an eager init)
  params = jax.tree.map(lambda s: (0.3 * rng.randn(*s.shape)).astype(np.float32), shapes)

  def run(**kw):
    m = TextTransformer(**base, **kw)
    p = params if m.pooling()["pool"] == "map" else {k: v for k, v in params.items()
                                                     if k != "MAPHead_0"}
    x, out = m.apply({"params": p}, ids)
    return np.asarray(x), out

  last_position, out = run(pool="last_position")
  np.testing.assert_array_equal(run(pool_type="last")[0], last_position)
  assert np.abs(run(pool="last")[0] - last_position).max() > 1e-3
  np.testing.assert_allclose(run(pool_type="gap")[0],
                             np.asarray(out["transformed"]).mean(axis=1), atol=1e-6)
  bv_map = run(pool_type="map")[0]
  np.testing.assert_array_equal(bv_map, run(pool="map", pool_masks_pads=False)[0])
  assert np.abs(run(pool="map")[0] - bv_map).max() > 1e-3
  with pytest.raises(ValueError, match="set one of them"):
    run(pool="first", pool_type="last")
  with pytest.raises(ValueError, match=r"Unknown pool_type 'tok'"):
    run(pool_type="tok")
  from big_mm.models.vit import ViT  # the image tower takes big_vision's key too (same values)
  assert ViT(pool_type="tok").pooling() == {"pool": "tok"}
  with pytest.raises(ValueError, match="set one of them"):
    ViT(pool="map", pool_type="tok").pooling()


def write_open_clip(d, model_cfg, state, *, as_bin=False):
  """A directory as open_clip / the Hugging Face hub publish it."""
  from safetensors.torch import save_file
  os.makedirs(d, exist_ok=True)
  with open(os.path.join(d, "open_clip_config.json"), "w") as f:
    json.dump({"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}},
              f)
  if as_bin:
    torch.save(state, os.path.join(d, "open_clip_pytorch_model.bin"))
  else:
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(d, "open_clip_model.safetensors"))


def test_openai_clip_in_open_clip_layout(tmp_path):
  """An OpenAI-style CLIP (QuickGELU, LayerNorm eps 1e-5, ln_pre, class token, causal text
  pooled at the argmax token, no logit bias) as open_clip publishes it imports into a big_mm
  Towers model with open_clip's embeddings; the .bin form is read with weights_only=True and
  a pickle of anything else is refused."""
  import open_clip
  model_cfg = {"embed_dim": 24, "quick_gelu": True,
               "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16,
                              "patch_size": 8},
               "text_cfg": {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2,
                            "layers": 2}}
  torch.manual_seed(0)
  ref = open_clip.model.CLIP(**model_cfg)
  with torch.no_grad():
    for name, w in ref.named_parameters():
      if "ln" in name and name.endswith("weight"):
        w.copy_(1 + 0.1 * torch.randn_like(w))
      elif w.ndim <= 1 and name != "logit_scale":
        w.copy_(0.1 * torch.randn_like(w))
  d = str(tmp_path / "openai_clip")
  write_open_clip(d, model_cfg, ref.state_dict())
  published, _, _ = open_clip.create_model_and_transforms("local-dir:" + d)  # open_clip reads it
  rng = np.random.RandomState(0)
  lengths = [5, 16, 9]
  ids = np.zeros((3, 16), np.int64)
  for row, n in enumerate(lengths):  # CLIP tokens: text ids, then the largest id (EOT), then pads
    ids[row, :n - 1] = rng.randint(1, 127, n - 1)
    ids[row, n - 1] = 127
  img = images()
  with torch.no_grad():
    zi = published.eval().encode_image(torch.from_numpy(img).permute(0, 3, 1, 2), normalize=True)
    zt = published.encode_text(torch.from_numpy(ids), normalize=True)
  flat, kwargs = export.load_params(d, with_model_kwargs=True)
  assert kwargs["towers"]["image"]["act"] == kwargs["towers"]["text"]["act"] == "quick_gelu"
  assert kwargs["towers"]["text"]["norm_eps"] == 1e-5 and kwargs["bias_init"] is None
  assert "b" not in flat
  full = {**flat, "b": np.zeros((1,), np.float32)}
  assert_embeddings(kwargs, full, img, ids.astype(np.int32), zi.numpy(), zt.numpy())
  np.testing.assert_allclose(flat["t"], [float(ref.logit_scale.detach())], rtol=1e-6)

  d_bin = str(tmp_path / "openai_clip_bin")
  write_open_clip(d_bin, model_cfg, ref.state_dict(), as_bin=True)
  from_bin = export.load_params(d_bin)
  assert set(from_bin) == set(flat)
  assert all(np.array_equal(from_bin[k], flat[k]) for k in flat)
  import datetime
  torch.save({"state_dict": {"x": torch.zeros(1)}, "not_a_tensor": datetime.date(2026, 1, 1)},
             os.path.join(d_bin, "open_clip_pytorch_model.bin"))
  with pytest.raises(ExportError, match=r"weights_only=True.*never unpickles"):
    export.load_params(d_bin)
  attn_pool = dict(model_cfg, vision_cfg=dict(model_cfg["vision_cfg"], attentional_pool=True))
  write_open_clip(str(tmp_path / "coca"), attn_pool, ref.state_dict())
  with pytest.raises(ExportError, match="attentional_pool"):
    export.load_params(str(tmp_path / "coca"))


def test_open_clip_siglip_timm_tower_imports(tmp_path):
  """open_clip's SigLIP layout (timm trunk with a MAP head, custom text tower, logit bias), as
  export_open_clip writes it, imports back with open_clip's own embeddings."""
  kwargs = siglip_kwargs(image={"act": "gelu"}, text={"act": "gelu"})
  params = random_params(kwargs)
  d = str(tmp_path / "oc")
  export.export_open_clip(params, kwargs, d, image_size=32)
  model, _, _ = load_open_clip(d)
  img, ids = images(), Tokenizer(TOKENIZER).encode(TEXTS, 16)
  with torch.no_grad():
    zi = model.encode_image(torch.from_numpy(img).permute(0, 3, 1, 2), normalize=True)
    zt = model.encode_text(torch.from_numpy(np.asarray(ids, np.int64)), normalize=True)
  flat, back = export.load_params(d, with_model_kwargs=True)
  assert back["towers"]["image"]["pool"] == "map" and back["towers"]["image"]["act"] == "gelu"
  assert_embeddings(back, flat, img, ids, zi.numpy(), zt.numpy())
  np.testing.assert_array_equal(flat["b"], export.flatten(params)["b"])


def test_open_clip_hub_siglip_layout_imports(tmp_path):
  """open_clip's SigLIP layout as the hub publishes it (CustomTextCLIP: the text tower under
  `text.`, a timm trunk with a MAP head and no projection, exact GELU, a text projection with
  bias, pool_type 'last', a logit bias) imports with open_clip's own embeddings."""
  import open_clip
  tdir = str(tmp_path / "timm_trunk")
  os.makedirs(tdir)
  with open(os.path.join(tdir, "config.json"), "w") as f:
    json.dump({"architecture": "vit_base_patch16_siglip_224",
               "model_args": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                              "num_heads": 2, "mlp_ratio": 2.0, "class_token": False,
                              "global_pool": "map"},
               "pretrained_cfg": {"input_size": [3, 32, 32], "num_classes": 0}}, f)
  model_cfg = {"embed_dim": 32, "init_logit_bias": -10.0,
               "vision_cfg": {"image_size": 32, "timm_model_name": "local-dir:" + tdir,
                              "timm_model_pretrained": False, "timm_pool": "map",
                              "timm_proj": "none"},
               "text_cfg": {"context_length": 16, "vocab_size": 128, "width": 32, "heads": 2,
                            "layers": 2, "mlp_ratio": 2.0, "no_causal_mask": True,
                            "proj_bias": True, "pool_type": "last",
                            "norm_kwargs": {"eps": 1e-6}}}
  torch.manual_seed(0)
  ref = open_clip.model.CustomTextCLIP(**model_cfg)
  with torch.no_grad():
    for name, w in ref.named_parameters():
      if w.ndim <= 1 and "logit" not in name:
        w.copy_((1.0 if "norm" in name and name.endswith("weight") else 0.0)
                + 0.1 * torch.randn_like(w))
  d = str(tmp_path / "siglip_hub")
  write_open_clip(d, {**model_cfg, "custom_text": True}, ref.state_dict())
  published, _, _ = open_clip.create_model_and_transforms("local-dir:" + d)
  assert any(k.startswith("text.transformer.") for k in published.state_dict())
  img, ids = images(), Tokenizer(TOKENIZER).encode(TEXTS, 16)
  with torch.no_grad():
    zi = published.eval().encode_image(torch.from_numpy(img).permute(0, 3, 1, 2),
                                       normalize=True)
    zt = published.encode_text(torch.from_numpy(np.asarray(ids, np.int64)), normalize=True)
  flat, kwargs = export.load_params(d, with_model_kwargs=True)
  image, text = kwargs["towers"]["image"], kwargs["towers"]["text"]
  assert (image["pool"], image["act"], text["pool"], text["causal"]) == (
      "map", "gelu", "last_position", False)
  assert_embeddings(kwargs, flat, img, ids, zi.numpy(), zt.numpy())
  np.testing.assert_allclose(flat["b"], [-10.0])


def test_exports_are_atomic_and_name_the_extra(tmp_path, monkeypatch):
  """A failing export leaves no half-written directory (and an earlier export intact); a
  missing export dependency names `pip install -e ".[export]"`."""
  import sys

  import safetensors.numpy
  kwargs = siglip_kwargs()
  params = random_params(kwargs)
  out = tmp_path / "hf"
  export.export_hf(params, kwargs, str(out), arch="siglip")
  before = sorted(os.listdir(out))

  def broken(*a, **k):
    raise OSError("disk full")

  monkeypatch.setattr(safetensors.numpy, "save_file", broken)
  for fn, target in ((export.export_hf, out), (export.export_open_clip, tmp_path / "oc")):
    with pytest.raises(OSError, match="disk full"):
      fn(params, kwargs, str(target), **({"arch": "siglip"} if fn is export.export_hf
                                         else {"image_size": 32}))
  monkeypatch.setattr(np, "savez", broken)
  with pytest.raises(OSError, match="disk full"):
    export.export_npz(params, str(tmp_path / "m.npz"))
  assert sorted(os.listdir(out)) == before and not (tmp_path / "oc").exists()
  assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary files or directories left
  monkeypatch.undo()
  monkeypatch.setitem(sys.modules, "safetensors.numpy", None)
  with pytest.raises(ExportError, match=r'pip install -e "\.\[export\]"'):
    export.export_hf(params, kwargs, str(tmp_path / "x"), arch="siglip")


def test_exports_keep_the_towers_and_name_the_training_only_scopes():
  """A SigLIP 2 run's checkpoint also holds its LocCa decoder (dec) and self-distillation heads
  (sd); the HF / open_clip exports take the towers and t / b only."""
  from big_mm.export import common as export_common
  params = {k: {"w": np.zeros(1)} for k in ("img", "txt", "t", "b", "dec", "sd")}
  kwargs = {"towers": {"image": {}, "text": {}}}
  kept, dropped = export_common.towers_params(params, kwargs)
  assert sorted(kept) == ["b", "img", "t", "txt"] and dropped == ["dec", "sd"]
