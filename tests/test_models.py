"""Tests for big_mm.models (ViT, text transformer, towers) and kernels.attention.

Tiny configs (width 32, depth 2, 16x16 images with 8x8 patches) to stay fast on CPU.
"""
import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from jax.sharding import PartitionSpec

from big_mm.kernels import attention as attn
from big_mm.models import MODELS, get_model, layers
from big_mm.models.text import TextTransformer, last_token_index
from big_mm.models.towers import Towers
from big_mm.models.vit import ViT, decode_variant

TINY = dict(width=32, depth=2, mlp_dim=64, num_heads=4)
IMG = dict(TINY, patch_size=8, pool="map")
TXT = dict(TINY, vocab_size=50)
LOGICAL_NAMES = {"embed", "mlp", "heads", "kv", "vocab", "patch", "layers", "length", None}


def _images(b=2, seed=0):
  return jax.random.normal(jax.random.PRNGKey(seed), (b, 16, 16, 3), jnp.float32)


def _text():
  return jnp.array([[5, 6, 7, 2, 0, 0], [3, 9, 2, 0, 0, 0]], jnp.int32)


def _flat(tree):
  return {"/".join(k): v for k, v in flatten_dict(tree).items()}


def _image_text(image, text, **kwargs):
  return Towers(towers={"image": image, "text": text}, **kwargs)


def _inputs(image, text):
  return {"image": image, "text": text}


def _apply(model, params, image, text):
  """-> (image embedding, text embedding, out); None for an input that is None."""
  z, out = model.apply({"params": params}, _inputs(image, text))
  return z.get("image"), z.get("text"), out


@pytest.fixture(scope="module")
def two_towers():
  model = _image_text(IMG, TXT, out_dim={"image": 16, "text": 24}, temperature_init=10.0,
                      bias_init=-10.0)
  variables = jax.jit(model.init)(jax.random.PRNGKey(0), _inputs(_images(), _text()))
  params = nn.unbox(variables)["params"]
  outs = jax.jit(lambda p, i, t: _apply(model, p, i, t))(params, _images(), _text())
  return model, params, outs


def test_param_names_and_shapes(two_towers):
  _, params, _ = two_towers
  flat = {k: v.shape for k, v in _flat(params).items()}
  expected = {
      "t": (1,), "b": (1,),
      "img/embedding/kernel": (8, 8, 3, 32),
      "img/embedding/bias": (32,),
      "img/pos_embedding": (1, 4, 32),
      "img/Transformer/encoderblock_0/LayerNorm_0/scale": (32,),
      "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/kernel": (32, 4, 8),
      "img/Transformer/encoderblock_0/MultiHeadDotProductAttention_0/query/bias": (4, 8),
      "img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/kernel": (4, 8, 32),
      "img/Transformer/encoderblock_1/MultiHeadDotProductAttention_0/out/bias": (32,),
      "img/Transformer/encoderblock_1/LayerNorm_1/bias": (32,),
      "img/Transformer/encoderblock_1/MlpBlock_0/Dense_0/kernel": (32, 64),
      "img/Transformer/encoderblock_1/MlpBlock_0/Dense_1/kernel": (64, 32),
      "img/Transformer/encoder_norm/scale": (32,),
      "img/MAPHead_0/probe": (1, 1, 32),
      "img/MAPHead_0/MultiHeadDotProductAttention_0/key/kernel": (32, 4, 8),
      "img/MAPHead_0/LayerNorm_0/scale": (32,),
      "img/MAPHead_0/MlpBlock_0/Dense_1/bias": (32,),
      "img/head/kernel": (32, 16),
      "txt/Embed_0/embedding": (50, 32),
      "txt/pos_embedding": (1, 6, 32),
      "txt/Encoder_0/encoderblock_1/MultiHeadDotProductAttention_0/value/kernel": (32, 4, 8),
      "txt/Encoder_0/encoder_norm/scale": (32,),
      "txt/head/kernel": (32, 24),
  }
  for k, shape in expected.items():
    assert k in flat, f"missing {k}"
    assert flat[k] == shape, (k, flat[k], shape)
  assert not any("encoderblock_2" in k for k in flat)
  assert not any(k.startswith("img/cls") for k in flat)  # only for pool="tok"
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(params))


def test_outputs_normalised_and_scalars(two_towers):
  _, params, (zimg, ztxt, out) = two_towers
  assert zimg.shape == (2, 16) and ztxt.shape == (2, 24)
  assert zimg.dtype == jnp.float32 and ztxt.dtype == jnp.float32
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(ztxt, axis=-1), 1.0, rtol=1e-5)
  assert out["t"].shape == () and out["b"].shape == ()
  np.testing.assert_allclose(out["t"], 10.0, rtol=1e-5)
  np.testing.assert_allclose(out["t/parameterized"], np.log(10.0), rtol=1e-5)
  np.testing.assert_allclose(out["b"], -10.0)
  np.testing.assert_allclose(params["t"], [np.log(10.0)], rtol=1e-6)
  assert "img/encoded" in out and "img/pre_logits" in out and "txt/pre_logits" in out
  assert out["img/encoded"].shape == (2, 4, 32)
  assert out["img/pre_logits"].shape == (2, 32)


def test_either_input_may_be_none(two_towers):
  model, params, (zimg, ztxt, _) = two_towers
  zi, zt, out = _apply(model, params, _images(), None)
  assert zt is None and not any(k.startswith("txt/") for k in out)
  np.testing.assert_allclose(zi, zimg, atol=1e-6)
  zi, zt, out = _apply(model, params, None, _text())
  assert zi is None and not any(k.startswith("img/") for k in out)
  np.testing.assert_allclose(zt, ztxt, atol=1e-6)


def test_bias_none_gives_zero_b():
  model = _image_text(IMG, TXT, out_dim=8)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _inputs(_images(), _text()))
  assert nn.unbox(shapes)["params"]["b"].shape == (1,)
  p = nn.unbox(model.init(jax.random.PRNGKey(0), _inputs(None, _text())))["params"]
  np.testing.assert_array_equal(p["b"], [0.0])
  np.testing.assert_allclose(p["t"], [0.0])  # temperature_init 1.0


@pytest.mark.parametrize("scan", [False, True])
def test_every_param_has_logical_partition_spec(scan):
  model = _image_text(dict(IMG, scan=scan), dict(TXT, scan=scan, pool="map"), out_dim=8)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _inputs(_images(), _text()))
  specs = _flat(nn.get_partition_spec(shapes)["params"])
  arrays = _flat(nn.unbox(shapes)["params"])
  assert specs.keys() == arrays.keys()
  for k, spec in specs.items():
    assert isinstance(spec, PartitionSpec), (k, spec)
    assert len(spec) == arrays[k].ndim, (k, spec, arrays[k].shape)
    assert set(spec) <= LOGICAL_NAMES, (k, spec)
  if scan:
    k = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
    assert specs[k] == PartitionSpec("layers", "embed", "heads", "kv")
    assert arrays[k].shape == (2, 32, 4, 8)
  else:
    assert specs["txt/Embed_0/embedding"] == PartitionSpec("vocab", "embed")
    assert specs["img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"] == PartitionSpec(
        "embed", "mlp")


def _stack_blocks(tree, depth):
  """Unstacked encoderblock_{i} -> stacked `encoderblock` (leading layers axis)."""
  tree = dict(tree)
  blocks = [tree.pop(f"encoderblock_{i}") for i in range(depth)]
  tree["encoderblock"] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return tree


def test_scan_and_remat_match_loop():
  img = _images()
  base = ViT(**dict(IMG, pool="gap", num_classes=8, head_zeroinit=False))
  params = nn.unbox(base.init(jax.random.PRNGKey(1), img))["params"]
  ref, ref_out = base.apply({"params": params}, img)
  stacked = dict(params, Transformer=_stack_blocks(params["Transformer"], 2))

  scanned = ViT(**dict(IMG, pool="gap", num_classes=8, scan=True))
  shapes = nn.unbox(jax.eval_shape(scanned.init, jax.random.PRNGKey(0), img))["params"]
  assert jax.tree.map(lambda x: x.shape, shapes) == jax.tree.map(lambda x: x.shape, stacked)
  got, got_out = scanned.apply({"params": stacked}, img)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(got_out["encoded"], ref_out["encoded"], atol=1e-5, rtol=1e-5)

  # Remat changes memory, not values (forward and gradient), with and without scan.
  def loss(model, p):
    return jnp.sum(model.apply({"params": p}, img)[0] ** 2)
  g_ref = jax.grad(lambda p: loss(base, p))(params)
  for scan, p in ((False, params), (True, stacked)):
    for policy in ("nothing_saveable", "dots_saveable"):
      m = ViT(**dict(IMG, pool="gap", num_classes=8, scan=scan, remat_policy=policy))
      np.testing.assert_allclose(m.apply({"params": p}, img)[0], ref, atol=1e-5, rtol=1e-5)
      if policy == "nothing_saveable":
        g = jax.grad(lambda q: loss(m, q))(p)
        if scan:
          g = dict(g, Transformer=dict(g["Transformer"]))
          gref = dict(g_ref, Transformer=_stack_blocks(g_ref["Transformer"], 2))
        else:
          gref = g_ref
        for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(gref)):
          np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)

  # The comparison can fail: different params give different outputs.
  other = nn.unbox(base.init(jax.random.PRNGKey(2), img))["params"]
  assert not np.allclose(base.apply({"params": other}, img)[0], ref, atol=1e-5)


def test_bad_remat_policy():
  m = ViT(**dict(IMG, remat_policy="nothing_savable"))
  with pytest.raises(ValueError, match="nothing_saveable"):
    m.init(jax.random.PRNGKey(0), _images())


@pytest.mark.parametrize("causal", [True, False])
def test_causal_text(causal):
  model = TextTransformer(**TXT, pool="none", causal=causal)
  a = jnp.array([[5, 6, 7, 8, 9, 10]], jnp.int32)
  b = a.at[0, 4:].set(jnp.array([20, 21]))  # change tokens after position 3
  p = model.init(jax.random.PRNGKey(0), a)
  xa, _ = model.apply(p, a)
  xb, _ = model.apply(p, b)
  assert xa.shape == (1, 6, 32)
  assert not np.allclose(xa[:, 4:], xb[:, 4:], atol=1e-4)
  if causal:
    np.testing.assert_allclose(xa[:, :4], xb[:, :4], atol=1e-5)
  else:  # bidirectional: earlier positions see later tokens (shows the test can fail)
    assert not np.allclose(xa[:, :4], xb[:, :4], atol=1e-4)


def test_last_token_pooling():
  text = jnp.array([[5, 6, 7, 2, 0, 0], [3, 2, 0, 0, 0, 0], [4, 4, 4, 4, 4, 2],
                    [0, 0, 0, 0, 0, 0]], jnp.int32)
  np.testing.assert_array_equal(last_token_index(text), [3, 1, 5, 0])
  model = TextTransformer(**TXT, pool="last")
  p = model.init(jax.random.PRNGKey(0), text)
  x, out = model.apply(p, text)
  tr = out["transformed"]
  for i, j in enumerate([3, 1, 5, 0]):
    np.testing.assert_allclose(x[i], tr[i, j], atol=1e-6)
  assert not np.allclose(x[0], tr[0, -1], atol=1e-4)


@pytest.mark.parametrize("pool", ["last", "mean", "map"])
def test_pad_mask_makes_pooling_independent_of_padding(pool):
  short = jnp.array([[5, 6, 7, 2]], jnp.int32)
  long = jnp.array([[5, 6, 7, 2, 0, 0, 0, 0]], jnp.int32)

  def pooled(pad_mask, toks):
    m = TextTransformer(**TXT, pool=pool, pad_mask=pad_mask, num_classes=8,
                        scan=pool == "mean")  # the mask also goes through nn.scan
    # Posemb length differs, so init on the long sequence and slice for the short one.
    p = nn.unbox(m.init(jax.random.PRNGKey(0), long))["params"]
    p = dict(p, pos_embedding=p["pos_embedding"][:, :toks.shape[1]])
    return m.apply({"params": p}, toks)[0]

  np.testing.assert_allclose(pooled(True, short), pooled(True, long), atol=1e-5)
  # Default (big_vision) behaviour attends to pads, so padding changes the result.
  assert not np.allclose(pooled(False, short), pooled(False, long), atol=1e-5)


def _naive_attention(q, k, v, mask):
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  b, lq, h, d = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      s = q[bi, :, hi] @ k[bi, :, hi].T / np.sqrt(d)
      m = np.broadcast_to(mask, (b, h, lq, k.shape[1]))[bi, hi]
      s = np.where(m, s, -np.inf)
      e = np.exp(s - s.max(-1, keepdims=True))
      out[bi, :, hi] = (e / e.sum(-1, keepdims=True)) @ v[bi, :, hi]
  return out


def test_attention_reference_matches_naive():
  kq, kk, kv, km = jax.random.split(jax.random.PRNGKey(0), 4)
  b, lq, lk, h, d = 2, 5, 7, 3, 4
  q = jax.random.normal(kq, (b, lq, h, d))
  k = jax.random.normal(kk, (b, lk, h, d))
  v = jax.random.normal(kv, (b, lk, h, d))
  mask = jax.random.bernoulli(km, 0.7, (b, 1, lq, lk)).at[..., 0].set(True)
  np.testing.assert_allclose(attn.dot_product_attention(q, k, v, mask=mask),
                             _naive_attention(q, k, v, mask), atol=1e-5)
  full = np.ones((1, 1, lq, lk), bool)
  np.testing.assert_allclose(attn.dot_product_attention(q, k, v), _naive_attention(q, k, v, full),
                             atol=1e-5)
  causal = np.tril(np.ones((lq, lk), bool), k=lk - lq)[None, None]
  np.testing.assert_allclose(attn.dot_product_attention(q, k, v, causal=True),
                             _naive_attention(q, k, v, causal), atol=1e-5)
  np.testing.assert_allclose(attn.dot_product_attention(q, k, v, mask=mask, causal=True),
                             _naive_attention(q, k, v, np.logical_and(mask, causal)), atol=1e-5)
  # Key-padding mask of shape [B, 1, 1, Lk].
  kpm = jnp.arange(lk)[None, None, None, :] < jnp.array([3, 6])[:, None, None, None]
  np.testing.assert_allclose(attn.dot_product_attention(q, k, v, mask=kpm),
                             _naive_attention(q, k, v, kpm), atol=1e-5)
  # bf16 in -> bf16 out, close to the float32 result.
  o16 = attn.dot_product_attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16),
                                   v.astype(jnp.bfloat16), mask=mask)
  assert o16.dtype == jnp.bfloat16
  np.testing.assert_allclose(o16.astype(np.float32), _naive_attention(q, k, v, mask), atol=5e-2)


def test_attention_errors():
  q = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="'xla'"):
    attn.dot_product_attention(q, q, q, implementation="pallas_tpu_typo")
  with pytest.raises(ValueError, match="broadcast"):
    attn.dot_product_attention(q, q, q, mask=jnp.ones((1, 1, 3, 2), bool))
  with pytest.raises(ValueError, match="rank 4"):
    attn.dot_product_attention(q[0], q[0], q[0])


def test_bf16_compute_keeps_float32_params():
  model = _image_text(dict(IMG, dtype="bfloat16"), dict(TXT, dtype=jnp.bfloat16), out_dim=8)
  variables = model.init(jax.random.PRNGKey(0), _inputs(_images(), _text()))
  params = nn.unbox(variables)["params"]
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  zimg, ztxt, out = _apply(model, params, _images(), _text())
  assert out["img/encoded"].dtype == jnp.bfloat16
  assert out["txt/transformed"].dtype == jnp.bfloat16
  assert zimg.dtype == jnp.float32 and ztxt.dtype == jnp.float32
  assert np.all(np.isfinite(zimg)) and np.all(np.isfinite(ztxt))
  np.testing.assert_allclose(np.linalg.norm(zimg, axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("pool,posemb", [("tok", "sincos2d"), ("gap", "learn"),
                                              ("none", "learn")])
def test_vit_pool_and_posemb(pool, posemb):
  model = ViT(**dict(IMG, pool=pool, posemb=posemb))
  variables = model.init(jax.random.PRNGKey(0), _images())
  flat = _flat(nn.unbox(variables)["params"])
  assert ("cls" in flat) == (pool == "tok")
  assert ("pos_embedding" in flat) == (posemb == "learn")
  x, out = model.apply(variables, _images())
  assert out["encoded"].shape == (2, 4 + (pool == "tok"), 32)
  assert out["pre_logits_2d"].shape == (2, 2, 2, 32)
  assert x.shape == ((2, 4, 32) if pool == "none" else (2, 32))


def test_posemb_sincos_2d_values():
  pe = layers.posemb_sincos_2d(2, 3, 8)
  assert pe.shape == (1, 6, 8)
  # Position (y=1, x=2) -> index 5; first quarter is sin(x * omega), omega = [1, 1e-4].
  np.testing.assert_allclose(pe[0, 5, :2], np.sin([2.0, 2e-4]), rtol=1e-5)
  np.testing.assert_allclose(pe[0, 5, 4:6], np.sin([1.0, 1e-4]), rtol=1e-5)


def test_decode_variant_table():
  assert decode_variant("B/16") == dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
                                        patch_size=(16, 16))
  assert decode_variant("So400m/14") == dict(width=1152, depth=27, mlp_dim=4304, num_heads=16,
                                             patch_size=(14, 14))
  assert decode_variant("L") == dict(width=1024, depth=24, mlp_dim=4096, num_heads=16)
  assert decode_variant(None) == {}
  with pytest.raises(ValueError, match=r"Unknown variant 'X/16'.*So400m"):
    decode_variant("X/16")
  with pytest.raises(ValueError, match="Did you mean 'So400m'"):
    decode_variant("So400M/14")
  with pytest.raises(ValueError, match="patch size"):
    decode_variant("B/x")


def test_variant_with_overrides():
  # Explicit fields override the variant; the rest comes from the table.
  m = ViT(variant="B/16", width=32, depth=1, mlp_dim=64, num_heads=4)
  assert m.arch() == dict(width=32, depth=1, mlp_dim=64, num_heads=4, patch_size=(16, 16))
  t = TextTransformer(variant="So400m", depth=2)
  assert t.arch() == dict(width=1152, depth=2, mlp_dim=4304, num_heads=16)
  assert TextTransformer().arch() == dict(width=512, depth=12, mlp_dim=2048, num_heads=8)


def test_invalid_kwargs_messages():
  with pytest.raises(TypeError, match=r"'poool'.*Did you mean 'pool'.*Valid options"):
    _image_text(dict(IMG, poool="map"), TXT)
  with pytest.raises(TypeError, match=r"model.towers.text.*'vocab'.*vocab_size"):
    _image_text(IMG, dict(TXT, vocab=100))
  with pytest.raises(TypeError, match="temperature_init"):
    get_model("towers", towers={"image": IMG, "text": TXT}, temperature=10.0)
  with pytest.raises(ValueError, match=r"Unknown model 'tower'.*towers"):
    get_model("tower")
  assert MODELS["towers"] is Towers
  assert set(MODELS) == {"towers", "captioner", "coca", "multimae", "limoe", "fourm",
                         "vq_tokenizer", "lm", "videomae"}
  with pytest.raises(ValueError, match=r"Unknown pool 'avg'"):
    ViT(**dict(IMG, pool="avg")).init(jax.random.PRNGKey(0), _images())


def test_dropout_train_mode_scan_and_remat():
  img = _images()
  for scan, policy in ((False, "none"), (True, "nothing_saveable")):
    m = ViT(**dict(IMG, pool="gap", dropout=0.5, scan=scan, remat_policy=policy))
    v = m.init(jax.random.PRNGKey(0), img)
    ev1, _ = m.apply(v, img)
    ev2, _ = m.apply(v, img, train=False)
    np.testing.assert_array_equal(ev1, ev2)
    tr1, _ = m.apply(v, img, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    tr2, _ = m.apply(v, img, train=True, rngs={"dropout": jax.random.PRNGKey(1)})
    tr3, _ = m.apply(v, img, train=True, rngs={"dropout": jax.random.PRNGKey(2)})
    np.testing.assert_array_equal(tr1, tr2)
    assert not np.allclose(tr1, ev1, atol=1e-4) and not np.allclose(tr1, tr3, atol=1e-4)


def test_sharded_init_and_apply_match_single_device():
  from jax.sharding import AxisType
  mesh = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)
  rules = (("batch", "data"), ("heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
           ("embed", None), ("kv", None), ("length", None), ("layers", None), ("patch", None))
  model = _image_text(dict(IMG, scan=True), dict(TXT, vocab_size=64), out_dim=8)
  imgs, text = _images(b=8), jnp.tile(_text(), (4, 1))
  init = lambda: model.init(jax.random.PRNGKey(0), _inputs(imgs, text))
  ref_params = nn.unbox(init())["params"]
  ref = _apply(model, ref_params, imgs, text)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    specs = nn.get_partition_spec(jax.eval_shape(init))
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    params = nn.unbox(jax.jit(init, out_shardings=shardings)())["params"]
    k = "img/Transformer/encoderblock/MultiHeadDotProductAttention_0/query/kernel"
    assert _flat(params)[k].sharding.spec == PartitionSpec(None, None, "tensor", None)
    zimg, ztxt, _ = jax.jit(lambda p, i, t: _apply(model, p, i, t))(params, imgs, text)
  np.testing.assert_allclose(zimg, ref[0], atol=1e-5)
  np.testing.assert_allclose(ztxt, ref[1], atol=1e-5)


def test_attention_module_matches_flax_mha():
  """Same params -> same outputs as flax's MultiHeadDotProductAttention (big_vision uses it)."""
  kx, ky = jax.random.split(jax.random.PRNGKey(3))
  xq = jax.random.normal(kx, (2, 3, 32))
  xkv = jax.random.normal(ky, (2, 5, 32))
  mask = jnp.arange(5)[None, None, None, :] < jnp.array([2, 5])[:, None, None, None]
  ours = layers.MultiHeadDotProductAttention(num_heads=4)
  theirs = nn.MultiHeadDotProductAttention(num_heads=4)
  p_ours = nn.unbox(ours.init(jax.random.PRNGKey(0), xq, xkv))
  p_theirs = theirs.init(jax.random.PRNGKey(0), xq, xkv)
  assert (jax.tree.map(jnp.shape, p_ours) == jax.tree.map(jnp.shape, p_theirs))
  # Same init distribution (xavier on the flattened kernel): compare the spread.
  for name in ("query", "out"):
    np.testing.assert_allclose(np.std(p_ours["params"][name]["kernel"]),
                               np.std(p_theirs["params"][name]["kernel"]), rtol=0.2)
  for m in (None, mask):
    np.testing.assert_allclose(ours.apply(p_theirs, xq, xkv, mask=m),
                               theirs.apply(p_theirs, xq, xkv, mask=m), atol=1e-5)


def test_captioner_text_prefix_params_and_errors():
  """The text prefix params exist (with logical axes) whether or not init sees a prefix;
  its length is >= 0."""
  from big_mm.models.captioner import Captioner
  dec = dict(TINY, vocab_size=50, max_len=6)
  model = Captioner(image=dict(TINY, patch_size=8), decoder=dec, prefix_lm=True,
                    text_prefix_len=3)
  prefix = jnp.array([[4, 5, 0], [6, 0, 0]], jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), _images(), _text())
  with_prefix = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _images(), _text(),
                                                  prefix=prefix))
  assert jax.tree.map(jnp.shape, nn.unbox(shapes)) == jax.tree.map(jnp.shape,
                                                                   nn.unbox(with_prefix))
  specs = _flat(nn.get_partition_spec(shapes)["params"])
  assert nn.unbox(shapes)["params"]["dec"]["prefix_pos_embedding"].shape == (1, 3, 32)
  assert specs["dec/prefix_pos_embedding"] == PartitionSpec(None, "length", "embed")
  with pytest.raises(ValueError, match="text_prefix_len must be >= 0, got -1"):
    Captioner(decoder=dec, text_prefix_len=-1)
  with pytest.raises(ValueError, match="model.text_prefix_len, not model.decoder"):
    Captioner(decoder=dict(dec, text_prefix_len=2), prefix_lm=True)
  plain = Captioner(image=dict(TINY, patch_size=8), decoder=dec, prefix_lm=True)
  with pytest.raises(ValueError, match="text_prefix_len=0"):
    jax.eval_shape(lambda: plain.init(jax.random.PRNGKey(0), _images(), _text(), prefix=prefix))
  with pytest.raises(ValueError, match=r"P <= text_prefix_len=3"):
    jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), _images(), _text(),
                                      prefix=jnp.ones((2, 4), jnp.int32)))


class _SowingMlp(nn.Module):
  """Stands in for a mixture-of-experts MLP: another class (so its own param names) built by
  BlockConfig.mlp, with a setting of its own, that sows an auxiliary loss term."""
  mlp_dim: int = None
  dropout: float = 0.0
  dtype: str = "float32"
  weight: float = 1.0

  @nn.compact
  def __call__(self, x, deterministic=True):
    y = layers.MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype)(
        x, deterministic)
    self.sow(layers.AUX_LOSS, "toy", self.weight * jnp.mean(y ** 2))
    return y


def test_block_config_mlp_factory_and_aux_loss_under_scan():
  """BlockConfig.mlp swaps the blocks' MLP (params under its class name); its sown aux loss is
  collected per layer, and a scanned stack gives the same sum as the loop."""
  import functools
  from big_mm.models import aux_loss
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 32))
  block = layers.BlockConfig(num_heads=4, mlp_dim=64,
                             mlp=functools.partial(_SowingMlp, weight=0.5))
  loop = layers.Encoder(depth=2, block=block)
  params = nn.unbox(loop.init(jax.random.PRNGKey(1), x))["params"]
  names = set(_flat(params))
  assert "encoderblock_1/_SowingMlp_0/MlpBlock_0/Dense_0/kernel" in names
  assert not any(k.startswith("encoderblock_0/MlpBlock_0") for k in names)
  # The default factory keeps big_vision's names.
  dense = nn.unbox(jax.eval_shape(layers.Encoder(depth=2, block=layers.BlockConfig(
      num_heads=4, mlp_dim=64)).init, jax.random.PRNGKey(1), x))["params"]
  assert "encoderblock_1/MlpBlock_0/Dense_0/kernel" in _flat(dense)

  (y, _), aux = aux_loss.apply(loop, params, x)
  _, sown = loop.apply({"params": params}, x, mutable=[layers.AUX_LOSS])
  per_layer = [sown[layers.AUX_LOSS][f"encoderblock_{i}"]["_SowingMlp_0"]["toy"][0]
               for i in range(2)]
  assert set(aux) == {"aux_loss/toy"} and all(float(v) > 0 for v in per_layer)
  np.testing.assert_allclose(aux["aux_loss/toy"], sum(per_layer), rtol=1e-6)
  # Without the collection mutable (evaluation), sow does nothing.
  np.testing.assert_array_equal(loop.apply({"params": params}, x)[0], y)

  scanned = layers.Encoder(depth=2, block=block, scan=True, remat_policy="nothing_saveable")
  (y_scan, _), aux_scan = aux_loss.apply(scanned, _stack_blocks(params, 2), x)
  np.testing.assert_allclose(y_scan, y, atol=1e-5)
  np.testing.assert_allclose(aux_scan["aux_loss/toy"], aux["aux_loss/toy"], rtol=1e-5)


def test_aux_loss_add_and_gradient():
  """aux_loss.add: the loss gains every aux_loss/* term (its gradient too) and the metrics
  report them; with no terms the loss and metrics are the objective's own."""
  from big_mm.models import aux_loss
  model = layers.Encoder(depth=1, block=layers.BlockConfig(num_heads=4, mlp=_SowingMlp))
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 32))
  params = nn.unbox(model.init(jax.random.PRNGKey(1), x))["params"]

  def loss_fn(p):
    (y, _), aux = aux_loss.apply(model, p, x)
    return aux_loss.add(jnp.mean(y), {"own": jnp.mean(y)}, aux)

  def own_loss(p):
    return jnp.mean(model.apply({"params": p}, x)[0])

  def aux_term(p):
    _, sown = model.apply({"params": p}, x, mutable=[layers.AUX_LOSS])
    return sown[layers.AUX_LOSS]["encoderblock_0"]["_SowingMlp_0"]["toy"][0]

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
  assert sorted(metrics) == ["aux_loss/toy", "own"]
  np.testing.assert_allclose(loss, own_loss(params) + aux_term(params), rtol=1e-6)
  np.testing.assert_allclose(metrics["aux_loss/toy"], aux_term(params), rtol=1e-6)
  want = jax.tree.map(jnp.add, jax.grad(own_loss)(params), jax.grad(aux_term)(params))
  for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-7)
  assert float(jnp.abs(jax.grad(aux_term)(params)["encoderblock_0"]["_SowingMlp_0"]["MlpBlock_0"]
                       ["Dense_1"]["kernel"]).max()) > 1e-4

  own = jnp.float32(2.5)
  loss, metrics = aux_loss.add(own, {"own": own}, {})
  assert loss is own and metrics == {"own": own}


def test_patch_dropout_trains_on_a_random_subset_and_never_at_eval():
  """FLIP patch dropout: in training, round((1 - p) * N) tokens per example (drawn per example
  and per rng); at evaluation every token; NaFlex padding is dropped before real patches, so
  dropping only padding changes nothing."""
  base = dict(TINY, patch_size=4, pool="map")
  img = _images(b=3)  # 16x16 / 4: 16 patches
  model = ViT(**dict(base, patch_dropout=0.5))
  params = nn.unbox(model.init(jax.random.PRNGKey(0), img))["params"]
  ev, _ = model.apply({"params": params}, img)
  ref, _ = ViT(**base).apply({"params": params}, img)
  np.testing.assert_array_equal(ev, ref)
  rngs = lambda k: {"dropout": jax.random.PRNGKey(k)}
  tr1, out = model.apply({"params": params}, img, train=True, rngs=rngs(1))
  tr2, _ = model.apply({"params": params}, img, train=True, rngs=rngs(2))
  assert out["encoded"].shape == (3, 8, 32)
  assert not np.allclose(tr1, tr2, atol=1e-5) and not np.allclose(tr1, ev, atol=1e-5)
  grad = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, img, train=True,
                                                rngs=rngs(1))[0] ** 2))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grad))
  # NaFlex: 8 real patches padded to 16; dropping half drops exactly the padding.
  patches = jnp.concatenate([img.reshape(3, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5)
                             .reshape(3, 16, 48)[:, :8], jnp.zeros((3, 8, 48))], axis=1)
  mask = jnp.arange(16)[None].repeat(3, 0) < 8
  shape = jnp.array([[2, 4]] * 3)
  model = ViT(**dict(base, patch_dropout=0.5, posemb_grid=4))
  kept, out = model.apply({"params": params}, patches, mask=mask, shape=shape, train=True,
                          rngs=rngs(3))
  full, _ = ViT(**dict(base, posemb_grid=4)).apply({"params": params}, patches, mask=mask,
                                                   shape=shape, train=True, rngs=rngs(3))
  assert out["encoded"].shape == (3, 8, 32)
  np.testing.assert_allclose(kept, full, atol=1e-5)
