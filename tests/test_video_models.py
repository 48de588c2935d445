"""Video towers (big_mm/models/video.py): VideoViT, FrameViT and inflation from an image ViT."""
import functools
import itertools
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from big_mm import config as config_lib, sharding, train, tree_paths
from big_mm.models import video
from big_mm.models.towers import Towers
from big_mm.models.video import FrameViT, VideoViT
from big_mm.models.vit import ViT

TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "data", "moving_digits_spm.model")
TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=4)
B, T, S = 2, 4, 8  # clips of T frames of S x S: a 2 x 2 x 2 tubelet grid with 2 x 4 x 4 tubelets


def _clip(seed=0, shape=(B, T, S, S, 3)):
  return jax.random.normal(jax.random.key(seed), shape)


def _init(model, x, seed=1, **kw):
  """Random params of init's shapes, drawn in numpy (a jitted init compiles for seconds); the
  time attention's `out` zeros, as its init (test_factorised_attention_is_space_then_time)."""
  shapes = jax.eval_shape(lambda x: sharding.unbox(model.init(jax.random.key(0), x, **kw)), x)
  rng = np.random.default_rng(seed)
  flat = {n: (np.zeros if "TimeAttention/out" in n else
              lambda s: rng.normal(0, 0.3, s).astype(np.float32))(v.shape)
          for n, v in tree_paths.flat_dict(shapes["params"]).items()}
  return _unflat(flat)


def _flat(params):
  return {n: np.asarray(v) for n, v in tree_paths.flat_dict(params).items()}


def _unflat(flat):
  tree = {}
  for name, v in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(v)
  return tree


@pytest.mark.parametrize("attention", video.ATTENTION_TYPES)
def test_shapes_for_every_pool_and_posemb(attention):
  """Shapes (traced, not compiled) for every pool x posemb, a head, and ViT's param names."""
  x = jax.ShapeDtypeStruct((B, T, S, S, 3), jnp.float32)
  for pool, posemb in itertools.product(video.POOL_TYPES, video.POSEMB_TYPES):
    model = VideoViT(**TINY, attention=attention, pool=pool, posemb=posemb, num_classes=5)
    params = jax.eval_shape(lambda x: sharding.unbox(model.init(jax.random.key(0), x)), x)[
        "params"]
    y, out = jax.eval_shape(lambda p, x: model.apply({"params": p}, x), params, x)
    assert y.shape == ((B, 8, 5) if pool == "none" else (B, 5)), (pool, posemb)
    assert out["stem"].shape == (B, 2, 2, 2, 32) and out["encoded"].shape == (B, 8, 32)
    shapes = {n: v.shape for n, v in tree_paths.flat_dict(params).items()}
    assert shapes["embedding/kernel"] == (2, 4, 4, 3, 32)
    assert ("pos_embedding" in shapes) == ("time_embedding" in shapes) == (posemb == "learn")
    if posemb == "learn":
      assert shapes["pos_embedding"] == (1, 4, 32) and shapes["time_embedding"] == (1, 2, 32)
    assert ("cls" in shapes) == (pool == "tok") and ("MAPHead_0/probe" in shapes) == (pool == "map")
    block = "Transformer/encoderblock_1/"
    assert block + "MultiHeadDotProductAttention_0/query/kernel" in shapes
    assert (block + "TimeAttention/out/kernel" in shapes) == (attention == "factorised")
  with pytest.raises(ValueError, match="tubelets"):
    jax.eval_shape(VideoViT(**TINY).init, jax.random.key(0), jnp.zeros((1, 3, S, S, 3)))


def test_multi_view_is_the_mean_of_single_views():
  """[B, V, T, H, W, 3]: the pooled features (and the head's output) averaged over V."""
  model = VideoViT(**TINY, pool="map", attention="factorised", num_classes=3)
  views = _clip(shape=(B, 3, T, S, S, 3))
  params = _init(model, views[:, 0])
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  y, out = apply(views)
  singles = [apply(views[:, v]) for v in range(3)]
  np.testing.assert_allclose(out["pre_logits"], np.mean([o["pre_logits"] for _, o in singles], 0),
                             atol=1e-5)
  np.testing.assert_allclose(y, np.mean([s for s, _ in singles], 0), atol=1e-5)
  assert y.shape == (B, 3)


def test_visible_tokens():
  """visible= every token (in order) is the full encoder; a subset gives [B, K, D] tokens, each
  example's own subset."""
  model = VideoViT(**TINY, pool="none")
  x = _clip()
  params = _init(model, x)
  apply = jax.jit(lambda x, vis: model.apply({"params": params}, x, visible=vis))
  full, out = jax.jit(lambda x: model.apply({"params": params}, x))(x)
  everything, vis_out = apply(x, jnp.tile(jnp.arange(8)[None], (B, 1)))
  np.testing.assert_allclose(vis_out["encoded"], out["encoded"], atol=1e-5)
  np.testing.assert_allclose(everything, full, atol=1e-5)
  subset = jnp.array([[0, 5, 7], [1, 2, 3]])
  _, sub_out = apply(x, subset)
  assert sub_out["encoded"].shape == (B, 3, 32)
  assert not np.allclose(sub_out["encoded"][:, 0], out["encoded"][:, 0], atol=1e-3)
  with pytest.raises(ValueError, match="joint"):
    jax.eval_shape(functools.partial(VideoViT(**TINY, attention="factorised").init,
                                     visible=subset), jax.random.key(0), x)


def test_factorised_attention_is_space_then_time():
  """Factorised blocks differ from joint ones on the same shared params; with the time
  attention's zero `out` (its init, checked) a slice never sees the others, with a non-zero one
  it does."""
  time_init = sharding.unbox(jax.jit(video.TimeAttention(num_heads=2).init)(
      jax.random.key(0), jnp.ones((1, 2, 32))))
  assert not time_init["params"]["out"]["kernel"].any()
  assert time_init["params"]["query"]["kernel"].any()
  x = _clip()
  fact = VideoViT(**TINY, pool="none", attention="factorised")
  joint = VideoViT(**TINY, pool="none")
  params = _init(fact, x)
  shared = {k: v for k, v in _flat(params).items() if "Time" not in k and "_time" not in k}
  assert set(shared) == set(_flat(_init(joint, x)))
  run = jax.jit(lambda p, x: fact.apply({"params": p}, x)[1]["encoded"])
  enc = run(params, x)
  joint_enc = jax.jit(joint.apply)({"params": _unflat(shared)}, x)[1]["encoded"]
  assert np.abs(enc - joint_enc).max() > 1e-2
  changed = x.at[:, 2:].set(-x[:, 2:])  # the second time slice (frames 2, 3) only
  np.testing.assert_allclose(run(params, changed)[:, :4], enc[:, :4], atol=1e-6)
  flat = _flat(params)
  for i in range(2):
    name = f"Transformer/encoderblock_{i}/TimeAttention/out/kernel"
    assert not flat[name].any()
    flat[name] = np.asarray(jax.random.normal(jax.random.key(i), flat[name].shape))
  mixed = _unflat(flat)
  assert np.abs(run(mixed, changed)[:, :4] - run(mixed, x)[:, :4]).max() > 1e-3


def _image_vit(pool):
  return ViT(**TINY, pool=pool, num_classes=6, head_zeroinit=False)


@pytest.mark.parametrize("pool,method,attention,size", [
    ("gap", "central", "joint", 12), ("tok", "average", "factorised", S)])
def test_inflated_tower_on_a_static_clip_is_the_image_tower(pool, method, attention, size):
  """inflate(): a clip of one repeated frame gives the image ViT's output (head included), also
  at a larger grid (position embeddings resized as ViT's posemb_shape does) and with factorised
  attention (its time attention starts as the identity). Not for pool="tok" with joint
  attention: the cls token then attends over t copies of every patch, which shifts the softmax
  weight between it and the patches (checked too)."""
  image_vit = _image_vit(pool)
  image_params = _init(image_vit, jnp.zeros((1, S, S, 3)))
  source = {"img/" + k: v for k, v in _flat(image_params).items()}
  source["txt/other"] = np.ones(3)
  frame = _clip(2, (B, size, size, 3))
  want, _ = jax.jit(lambda f: image_vit.apply({"params": image_params}, f,
                                              posemb_shape=(2, 2)))(frame)
  clip = jnp.repeat(frame[:, None], T, axis=1)
  for attn in {attention, "joint"}:
    model = VideoViT(**TINY, pool=pool, attention=attn, num_classes=6)
    init = _flat(_init(model, clip))
    flat, fresh = video.inflate(source, {"vid/" + k: v.shape for k, v in init.items()}, method)
    assert flat["txt/other"] is source["txt/other"]
    assert bool(fresh) == (attn == "factorised")
    mine = {k[4:]: v for k, v in flat.items() if k.startswith("vid/")}
    assert set(mine) | {k[4:] for k in fresh} == set(init)
    assert not mine["time_embedding"].any()
    kernel = mine["embedding/kernel"]
    if method == "central":
      assert not kernel[0].any() and np.array_equal(kernel[1], image_params["embedding"]["kernel"])
    params = _unflat({**mine, **{k: v for k, v in init.items() if "vid/" + k in fresh}})
    got, _ = jax.jit(model.apply)({"params": params}, clip)
    if pool != "tok" or attn == "factorised":
      np.testing.assert_allclose(got, want, atol=2e-5)
    else:
      assert np.abs(got - want).max() > 1e-3


def test_inflate_errors():
  source = {"img/embedding/kernel": np.zeros((4, 4, 3, 8))}
  with pytest.raises(ValueError, match="valid"):
    video.inflate(source, {}, "middle")
  with pytest.raises(ValueError, match="no img/ params"):
    video.inflate({"txt/x": np.zeros(1)}, {}, "average")
  with pytest.raises(ValueError, match="does not inflate"):
    video.inflate(source, {"vid/embedding/kernel": (2, 8, 8, 3, 8)}, "average")


def test_frame_vit_is_the_image_vit_per_frame():
  """FrameViT has ViT's params; on a static clip it is the image ViT; on a moving one the mean
  of the per-frame outputs; test views are averaged."""
  image_vit = _image_vit("map")
  frames = _clip(3, (B, T, S, S, 3))
  model = FrameViT(**TINY, pool="map", num_classes=6, head_zeroinit=False)
  params = _init(model, frames)
  assert jax.tree.map(np.shape, params) == jax.tree.map(
      np.shape, _init(image_vit, frames[:, 0]))
  image = jax.jit(lambda f: image_vit.apply({"params": params}, f)[0])
  apply = jax.jit(lambda x: model.apply({"params": params}, x))
  static = jnp.repeat(frames[:, :1], T, axis=1)
  np.testing.assert_allclose(apply(static)[0], image(frames[:, 0]), atol=1e-5)
  got, out = apply(jnp.stack([static, frames], axis=1))
  want = (image(frames[:, 0]) + np.mean([image(frames[:, i]) for i in range(T)], axis=0)) / 2
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert out["encoded"].shape == (2 * B, T * 4, 32) and out["logits"].shape == (B, 6)


def test_towers_take_video_towers():
  x = jax.ShapeDtypeStruct((B, 2, T, S, S, 3), jnp.float32)
  for tower in ("video_vit", "frame_vit"):
    model = Towers(towers={"video": dict(TINY, tower=tower)}, out_dim=8)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), {"video": x}), x)
    z, _ = jax.eval_shape(lambda p, x: model.apply(p, {"video": x}), params, x)
    assert z["video"].shape == (B, 8) and "vid" in params["params"]


def test_load_init_inflates_an_image_text_checkpoint(tmp_path):
  """train.load_init with init.inflate: vid/ from the file's img/ (tubelet kernel averaged),
  txt/ copied, time attention at its init; an unknown method is a config error."""
  image = {"img/" + k: v for k, v in _flat(_init(_image_vit("gap"), jnp.zeros((1, S, S, 3))))
           .items()}
  image["txt/embedding"] = np.full((5, 4), 0.5, np.float32)
  path = str(tmp_path / "image_text.npz")
  np.savez(path, **{"params/" + k: v for k, v in image.items()})
  model = VideoViT(**TINY, pool="gap", attention="factorised", num_classes=6)
  params = {"vid": _init(model, _clip()), "txt": {"embedding": jnp.zeros((5, 4))}}
  ts = types.SimpleNamespace(shardings={"params": jax.tree.map(lambda _: None, params),
                                        "opt": None},
                             tx=optax.sgd(0.1), init_extra=None)
  config = ConfigDict(dict(init=dict(workdir=None, path=path, step=None, include=".*",
                                     inflate="average")))
  loaded = _flat(train.load_init(config, ts, {"params": params})["params"])
  np.testing.assert_array_equal(loaded["txt/embedding"], image["txt/embedding"])
  np.testing.assert_allclose(loaded["vid/embedding/kernel"][1],
                             image["img/embedding/kernel"] / 2)
  name = "vid/Transformer/encoderblock_0/TimeAttention/query/kernel"
  np.testing.assert_array_equal(loaded[name], _flat(params)[name])
  for k, v in image.items():
    if k.startswith("img/") and "embedding/kernel" not in k:
      np.testing.assert_array_equal(loaded["vid/" + k[4:]], v, err_msg=k)
  # A captioner's video encoder lives under img/: inflated in place.
  captioner = {"img": params["vid"]}
  ts.shardings["params"] = jax.tree.map(lambda _: None, captioner)
  loaded = _flat(train.load_init(config, ts, {"params": captioner})["params"])
  np.testing.assert_allclose(loaded["img/embedding/kernel"][0],
                             image["img/embedding/kernel"] / 2)
  np.testing.assert_array_equal(loaded["img/time_embedding"], 0)
  config.init.inflate = "middle"
  with pytest.raises(config_lib.ConfigError, match="init.inflate"):
    train.load_init(config, ts, {"params": params})


def test_video_text_steps_on_8_devices_equal_one_device(tmp_path):
  """Video-text SigLIP (the contrastive objective over objective.modalities=("video",
  "text"), ring strategy): two steps on 8 devices (data 4 x fsdp 2) equal 1 device, metrics
  and params."""
  from conftest import train_steps
  table = tmp_path / "clips.jsonl"
  table.write_text('{"video": "a.mp4", "text": "a clip"}\n')
  rng = np.random.default_rng(0)
  batches = [{"video": rng.normal(size=(8, T, S, S, 3)).astype(np.float32),
              "video_present": np.ones(8, np.int32),
              "text": rng.integers(1, 20, size=(8, 6)).astype(np.int32),
              "text_present": np.ones(8, np.int32)} for _ in range(2)]

  def config(**mesh):
    video_kw = dict(TINY, depth=1, tubelet_size=2)
    return config_lib.load(ConfigDict(dict(
        seed=0, batch_size=8, total_steps=2, log_every_steps=1,
        input=dict(data=f"jsonl:{table}", modalities=("video", "text"), num_workers=0,
                   text_len=6, tokenizer=TOKENIZER,
                   pp_modalities={"video": f"decode_video|sample_clip({T})|video_resize({S})"}),
        model_name="towers",
        model=dict(towers=dict(video=video_kw, text=dict(width=16, depth=1, num_heads=2,
                                                         vocab_size=224)),
                   out_dim=8, temperature_init=10.0, bias_init=-10.0),
        objective=dict(name="contrastive", modalities=("video", "text"), loss="sigmoid",
                       strategy="ring"),
        optim=dict(lr=1e-2, eps=1e-6, schedule=dict(name="constant", warmup_steps=0)),
        evals={}, checkpoint=dict(every_steps=100, keep=1), mesh={"data": -1, "fsdp": 1, **mesh})))

  _, one, p1, _ = train_steps(config(), jax.devices()[:1], batches)
  _, eight, p8, _ = train_steps(config(data=4, fsdp=2), jax.devices()[:8], batches)
  for m1, m8 in zip(one, eight):
    for key in m1:
      np.testing.assert_allclose(m8[key], m1[key], rtol=2e-5, atol=1e-6, err_msg=key)
  # Attention key biases have an exactly-zero true gradient (softmax ignores a constant per
  # query), so Adam turns their float noise into updates that differ between layouts; for the
  # rest, Adam's normalised step (1e-2) turns float noise in tiny gradients into ~1e-6.
  flat1, flat8 = tree_paths.flat_dict(p1), tree_paths.flat_dict(p8)
  for name, value in flat1.items():
    if not name.endswith("key/bias"):
      np.testing.assert_allclose(flat8[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
