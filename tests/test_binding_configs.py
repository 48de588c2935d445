"""The binding recipes: configs/demo_points.py, languagebind_audio.py and ulip2_points.py load
and build their models (shapes only, no data); demo_points trains on a small cgal_shapes build."""

import math

import jax
import pytest
import tensorflow_datasets as tfds

from big_mm import config as config_lib
from big_mm import optim, sharding, train
from configs import demo_points
from data import cgal_shapes

SHAPES = ("cow", "octahedron", "pyramid")  # three of CGAL's meshes, in file name order


def _abstract_params(name, **overrides):
  """(config, abstract params, {path: shape}) of configs/<name>.py built on one device."""
  config = config_lib.load(f"configs/{name}.py", overrides)
  setup = train.build(config, num_train_examples=10**6, devices=jax.devices()[:1])
  with train.use_mesh(setup):
    params = sharding.unbox(jax.eval_shape(setup.objective.init_params, jax.random.key(0)))
  flat = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  return config, params, flat


def _frozen(config, params, flat):
  mask = optim.frozen_mask(config.optim, params)
  frozen = {"/".join(str(getattr(k, "key", k)) for k in path): bool(m)
            for path, m in jax.tree_util.tree_leaves_with_path(mask)}
  assert frozen.keys() == flat.keys()
  return {p for p, f in frozen.items() if f}


def test_languagebind_audio_builds_an_l14_audio_tower_and_freezes_the_text_tower():
  # No tokenizer file needed for shapes (the recipe's is a user-trained BPE SentencePiece).
  config, params, flat = _abstract_params("languagebind_audio", **{"input.tokenizer": None})
  # 1,036 frames x 126 mels in 14 x 14 patches: a 74 x 9 grid (LanguageBind's 666 tokens).
  assert flat["aud/pos_embedding"] == (1, 74 * 9, 1024)
  assert flat["aud/embedding/kernel"] == (14, 14, 1, 1024)
  assert flat["aud/Transformer/encoderblock/MlpBlock_0/Dense_0/kernel"] == (24, 1024, 4096)
  assert flat["txt/Embed_0/embedding"] == (49_408, 768)
  assert flat["aud/head/kernel"] == (1024, 768) and flat["txt/head/kernel"] == (768, 768)
  frozen = _frozen(config, params, flat)
  assert frozen == {p for p in flat if p.startswith("txt/")}
  assert config.init.include == r"txt/.*" and config.total_examples // config.batch_size == 75_000


def test_ulip2_points_builds_point_bert_against_frozen_siglip_towers():
  config, params, flat = _abstract_params("ulip2_points", **{"input.tokenizer": None})
  # Point-BERT (ULIP-2): width 384, 18 blocks, projected into SigLIP So400m's 1152-d space.
  assert flat["pts/Transformer/encoderblock_17/MlpBlock_0/Dense_0/kernel"] == (384, 1536)
  assert flat["pts/head/kernel"] == (384, 1152)
  assert flat["img/pos_embedding"] == (1, (384 // 14) ** 2, 1152)
  assert flat["txt/Embed_0/embedding"] == (32_000, 1152)
  frozen = _frozen(config, params, flat)
  assert frozen == {p for p in flat if p.startswith(("img/", "txt/"))}
  assert config.init.path and config.init.include == r"(img|txt)/.*"
  assert len(config.evals.zeroshot_modelnet40.classnames) == 40


@pytest.fixture(scope="module")
def small_cgal(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("cgal"))
  cgal_shapes.build(data_dir, names=SHAPES)
  return data_dir


def test_demo_points_names_are_the_builders(small_cgal):
  """demo_points.NAMES is cgal_shapes' label order: the small build's names keep it."""
  ds = tfds.data_source("cgal_shapes", data_dir=small_cgal, split="test")
  names = {int(r["label"]): r["name"].decode() for r in (ds[i] for i in range(len(ds)))}
  assert [names[i] for i in range(len(SHAPES))] == list(SHAPES)
  index = [demo_points.NAMES.index(n) for n in SHAPES]
  assert index == sorted(index) and len(demo_points.NAMES) == len(set(demo_points.NAMES)) == 121


def test_demo_points_trains_and_evaluates(small_cgal, tmp_path):
  pp_eval = "fps_points(32)|normalize_points"
  config = config_lib.load("configs/demo_points.py:steps=2,batch=6", {
      "input.data_dir": small_cgal,
      "input.pp_modalities.points": ("sample_points(32)|normalize_points|"
                                     "random_rotate_points('so3')|jitter_points(0.01, 0.05)"),
      "model.towers.points": dict(width=16, depth=1, num_heads=2, num_groups=4, group_size=8),
      "model.towers.image": dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=(8, 8)),
      "model.towers.text": dict(width=16, depth=1, mlp_dim=32, num_heads=2, vocab_size=192),
      "model.out_dim": 8,
      # image_text2points embeds with every tower; the other evaluators are off (CI time).
      **{f"evals.{name}.every_steps": 0
         for name in ("retrieval_points_text", "retrieval_points_image", "zeroshot_points")},
      "evals.image_text2points.pp_modalities.points": pp_eval,
  })
  metrics = train.train(config, str(tmp_path / "w"), devices=jax.devices()[:1])
  assert math.isfinite(metrics["loss"])
  for pair in ("points_text", "points_image", "image_text"):
    assert metrics[f"binding/{pair}/rows"] == 6 and math.isfinite(metrics[f"binding/{pair}/loss"])
  for key in ("R@1", "class_R@1", "R@10"):
    assert 0 <= metrics[f"eval/image_text2points/image+text2points/{key}"] <= 1, key
  assert metrics["eval/image_text2points/num_examples"] == 2 * len(SHAPES)  # the test views
  assert metrics["eval/image_text2points/num_skipped"] == 0
  # R@10 over 6 candidates is 1 (the metric is real: k >= candidates).
  assert metrics["eval/image_text2points/image+text2points/R@10"] == 1
  assert not any(k.startswith(("eval/retrieval_points", "eval/zeroshot")) for k in metrics)
