"""NaFlex (SigLIP 2 native-aspect inputs): the `naflex` pp op and the position-embedding
resize, against transformers' Siglip2 image processor and Siglip2VisionEmbeddings."""
import numpy as np
from PIL import Image
import pytest

from big_mm.input import preprocess
from big_mm.models import naflex
import conftest

torch = pytest.importorskip("torch")
conftest.declare_torchvision_ops_if_unloadable()
siglip2_processing = pytest.importorskip("transformers.models.siglip2.image_processing_siglip2")
siglip2_modeling = pytest.importorskip("transformers.models.siglip2.modeling_siglip2")

SIZES = [(32, 32), (20, 70), (70, 20), (1, 500), (333, 17), (224, 224), (480, 640), (5, 5)]


@pytest.mark.parametrize("patch,max_patches", [(16, 256), (16, 64), (4, 12), (14, 729)])
def test_size_equals_transformers(patch, max_patches):
  for h, w in SIZES + [(37 * i + 3, 91 * i % 400 + 7) for i in range(1, 30)]:
    want = siglip2_processing.get_image_size_for_max_num_patches(h, w, patch, max_patches)
    assert preprocess.naflex_size(h, w, patch, max_patches) == tuple(want), (h, w)


def test_patches_grid_and_mask_equal_the_processor():
  """Same images through transformers' Siglip2ImageProcessor and `decode|value_range(-1,1)|
  naflex(N, p)`: identical grids and masks; patches equal where the resize is the identity
  (pixel values through one layout), and close otherwise (PIL vs torchvision resampling)."""
  proc = siglip2_processing.Siglip2ImageProcessor(patch_size=4, max_num_patches=12)
  rng = np.random.default_rng(0)
  pp = preprocess.parse_pp("value_range(-1,1)|naflex(12, 4)", preprocess.IMAGE)
  for h, w in [(8, 24), (12, 16), (16, 12), (30, 7), (9, 9)]:
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    ours = preprocess.apply_pp(pp, image, rng)
    theirs = proc(images=[Image.fromarray(image)], return_tensors="np")
    np.testing.assert_array_equal(ours.shape, theirs["spatial_shapes"][0])
    np.testing.assert_array_equal(ours.mask, theirs["pixel_attention_mask"][0].astype(bool))
    if (h, w) in ((8, 24), (12, 16), (16, 12)):  # already of the chosen size: no resampling
      np.testing.assert_allclose(ours.data, theirs["pixel_values"][0], atol=1e-6)
    assert ours.data.dtype == np.float32 and not ours.data[~ours.mask].any()


def test_naflex_must_be_the_last_image_op():
  with pytest.raises(ValueError, match="'naflex' must be the last op"):
    preprocess.parse_pp("decode|naflex(16)|value_range(-1,1)", preprocess.IMAGE)


@pytest.mark.parametrize("grid", [4, 7])
def test_posemb_resize_equals_transformers(grid):
  rng = np.random.default_rng(grid)
  posemb = rng.normal(size=(grid, grid, 6)).astype(np.float32)
  shapes = np.array([[2, 3], [4, 4], [7, 1], [1, 9], [3, 5], [grid, grid]], np.int64)
  length = int(shapes.prod(-1).max()) + 3
  with torch.no_grad():
    want = siglip2_modeling.Siglip2VisionEmbeddings.resize_positional_embeddings(
        torch.from_numpy(posemb), torch.from_numpy(shapes), max_length=length).numpy()
  got = np.asarray(naflex.resize_posemb(posemb, shapes, length))
  real = np.arange(length)[None] < shapes.prod(-1)[:, None]
  np.testing.assert_allclose(got[real], want[real], atol=1e-5)
  # The stored grid at its own size comes back unchanged.
  own = np.asarray(naflex.resize_posemb(posemb, np.array([[grid, grid]]), grid * grid))
  np.testing.assert_allclose(own[0], posemb.reshape(-1, 6), atol=1e-6)


def _siglip2_vision(patch=4, grid=4):
  """A random HF Siglip2VisionModel (every weight drawn, so each mapping is exercised) and
  the same weights as big_mm ViT params."""
  from big_mm.export import common, hf  # pylint: disable=g-import-not-at-top
  config = siglip2_modeling.Siglip2VisionConfig(
      hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
      patch_size=patch, num_patches=grid * grid, hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6)
  torch.manual_seed(0)
  model = siglip2_modeling.Siglip2VisionModel(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.2)
  state = {"vision_model." + k: v.numpy() for k, v in model.state_dict().items()}
  # Siglip2's patch embedding is a Linear over (row, col, channel)-flattened patches; SigLIP's
  # (and big_mm's kernel as the rules read it) a Conv weight [D, 3, p, p].
  key = "vision_model.embeddings.patch_embedding.weight"
  state[key] = state[key].reshape(32, patch, patch, 3).transpose(0, 3, 1, 2)
  vit = dict(width=32, depth=2, mlp_dim=64, num_heads=4, patch_size=patch, pool="map",
             posemb_grid=grid)
  img, txt, _ = common.resolved_arch({"towers": {"image": vit, "text": {}}, "out_dim": 0})
  flat = {}
  for rule in hf.siglip_rules(img, txt):
    if all(n in state for n in rule.hf) and rule.bm[0].startswith("img/"):
      for name, value in zip(rule.bm, rule.inv([state[n] for n in rule.hf])):
        flat[name[len("img/"):]] = np.asarray(value, np.float32)
  return model, common.unflatten(flat), vit


def test_vit_on_naflex_patches_equals_siglip2_vision_model():
  """Images of several aspect ratios, through transformers' own processor, into
  Siglip2VisionModel and big_mm's ViT (same weights): equal pooled embeddings; and padding
  changes nothing (the same image padded to more patches)."""
  from big_mm.models.vit import ViT  # pylint: disable=g-import-not-at-top
  model, params, vit = _siglip2_vision()
  proc = siglip2_processing.Siglip2ImageProcessor(patch_size=4, max_num_patches=20)
  rng = np.random.default_rng(1)
  images = [Image.fromarray(rng.integers(0, 256, s + (3,), dtype=np.uint8))
            for s in [(8, 24), (30, 9), (16, 16), (5, 40)]]
  inputs = proc(images=images, return_tensors="pt")
  with torch.no_grad():
    want = model(**inputs).pooler_output.numpy()
  got, _ = ViT(**vit).apply({"params": params}, inputs["pixel_values"].numpy(),
                            mask=inputs["pixel_attention_mask"].numpy().astype(bool),
                            shape=inputs["spatial_shapes"].numpy())
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)
  # More padding: same outputs.
  pad = np.zeros((4, 12, 48), np.float32)
  longer = np.concatenate([inputs["pixel_values"].numpy(), pad], axis=1)
  mask = np.concatenate([inputs["pixel_attention_mask"].numpy().astype(bool),
                         np.zeros((4, 12), bool)], axis=1)
  got_longer, _ = ViT(**vit).apply({"params": params}, longer, mask=mask,
                                   shape=inputs["spatial_shapes"].numpy())
  np.testing.assert_allclose(np.asarray(got_longer), np.asarray(got), atol=1e-5)


def test_batches_and_towers_carry_mask_and_shape():
  """The pipeline's NaFlex entries follow the modality contract (image, image_mask,
  image_shape) and a towers model passes them to the image tower."""
  import jax  # pylint: disable=g-import-not-at-top
  from big_mm import modalities  # pylint: disable=g-import-not-at-top
  from big_mm.input import pipeline  # pylint: disable=g-import-not-at-top
  from big_mm.models.towers import Towers  # pylint: disable=g-import-not-at-top
  pp = preprocess.parse_pp("value_range(-1,1)|naflex(12, 4)", preprocess.IMAGE)
  rng = np.random.default_rng(0)
  examples = [pipeline.image_outputs(preprocess.apply_pp(
      pp, rng.integers(0, 256, s, dtype=np.uint8), rng)) for s in [(8, 24, 3), (16, 12, 3)]]
  batch = {k: np.stack([e[k] for e in examples]) for k in examples[0]}
  assert batch["image"].shape == (2, 12, 48) and batch["image_mask"].sum(1).tolist() == [12, 12]
  assert batch["image_shape"].tolist() == [[2, 6], [4, 3]]
  inputs = {"image": modalities.model_input(batch, "image")}
  assert set(inputs["image"]) == {"x", "mask", "shape"}
  model = Towers(towers={"image": dict(width=16, depth=1, mlp_dim=32, num_heads=2,
                                       patch_size=4, pool="map", posemb_grid=3)}, out_dim=8)
  params = model.init(jax.random.key(0), inputs)
  z, _ = model.apply(params, inputs)
  assert z["image"].shape == (2, 8)
  np.testing.assert_allclose(np.linalg.norm(z["image"], axis=-1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="need mask="):
    model.apply(params, {"image": batch["image"]})


def test_naflex_trains_sharded_and_with_gradcache_like_one_device(data_dir):
  """The contrastive objective on NaFlex batches (image, image_mask, image_shape): the same
  losses on one device and on 8 with GradCache's micro-batches; evaluation embeds them."""
  import jax  # pylint: disable=g-import-not-at-top
  from big_mm import sharding, train  # pylint: disable=g-import-not-at-top
  from big_mm.input import pipeline  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  changes = {"input.pp_image": "decode|value_range(-1,1)|naflex(16, 8)",
             "model.towers.image.posemb_grid": 4, "model.towers.image.pool": "map"}
  config = tiny_config(data_dir, **changes)
  it = pipeline.make_train_iterator(config.input, global_batch_size=16, seed=0, sharding=None)
  batches = [{k: v for k, v in next(it).items() if not k.startswith("_")}]
  assert batches[0]["image"].shape == (16, 16, 192) and "image_shape" in batches[0]

  def losses(config, devices):
    setup = train.build(config, devices=devices)
    ts = train.make_train_state(setup)
    with train.use_mesh(setup):
      state, step = ts.init(jax.random.key(0)), train.make_train_step(setup, ts)
      out = []
      for b in batches:
        state, metrics = step(state, jax.device_put(b, sharding.batch_sharding(setup.mesh)))
        out.append(float(metrics["loss"]))
      z = jax.jit(setup.objective.embed_images)(state["params"], {  # eager compiles op by op
          "x": batches[0]["image"], "mask": batches[0]["image_mask"],
          "shape": batches[0]["image_shape"]})
    return out, z

  one, z_one = losses(tiny_config(data_dir, mesh=dict(data=1, fsdp=1, tensor=1), **changes),
                      jax.devices()[:1])
  eight, z_eight = losses(tiny_config(data_dir, **changes, **{"objective.micro_batches": 2}),
                          jax.devices())
  np.testing.assert_allclose(eight, one, rtol=2e-5)
  np.testing.assert_allclose(np.asarray(z_eight), np.asarray(z_one), atol=2e-5)


def test_export_to_siglip2_model_and_back(tmp_path):
  """A NaFlex big_mm model exported as transformers' Siglip2Model (NaFlex): on images of
  several aspect ratios through transformers' own processor (loaded from the export) and
  through big_mm's naflex pp, and on texts through the exported tokenizer, equal image and
  text embeddings and logits (1e-5); importing the export gives the params back."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from big_mm import export  # pylint: disable=g-import-not-at-top
  from big_mm.input.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from big_mm.models.towers import Towers  # pylint: disable=g-import-not-at-top
  from conftest import TOKENIZER  # pylint: disable=g-import-not-at-top
  tower = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
  kwargs = dict(towers={"image": dict(tower, patch_size=4, pool="map", posemb_grid=4),
                        "text": dict(tower, vocab_size=128, pool="last_position")},
                out_dim={"image": 0, "text": 32}, temperature_init=10.0, bias_init=-10.0)
  model = Towers(**kwargs)
  rng = np.random.default_rng(0)
  pp = preprocess.parse_pp("value_range(-1,1)|naflex(16, 4)", preprocess.IMAGE)
  sizes = [(8, 32), (16, 16), (32, 8), (12, 20)]  # of their NaFlex size: no resampling
  pixels = [rng.integers(0, 256, s + (3,), dtype=np.uint8) for s in sizes]
  ours = [preprocess.apply_pp(pp, p, rng) for p in pixels]
  images = {"x": np.stack([o.data for o in ours]), "mask": np.stack([o.mask for o in ours]),
            "shape": np.stack([o.shape for o in ours])}
  texts = ["handwritten 7", "a small handwritten seven", "the number 1 written by hand",
           "an image of the numeral zero"]
  tokens = Tokenizer(TOKENIZER).encode(texts, 16)
  params = jax.tree.map(
      lambda x: x + 0.05 * rng.standard_normal(x.shape).astype(np.float32),
      jax.device_get(nn.unbox(model.init(jax.random.key(0), {"image": images,
                                                             "text": tokens}))["params"]))
  params = jax.tree.map(np.asarray, params)
  z, out = model.apply({"params": params}, {"image": images, "text": tokens})

  out_dir = str(tmp_path / "siglip2")
  export.export_hf(params, kwargs, out_dir, arch="siglip2", tokenizer=TOKENIZER)
  hf = transformers.AutoModel.from_pretrained(out_dir).eval()
  assert type(hf).__name__ == "Siglip2Model"
  # transformers loads any siglip2 directory's tokenizer as Gemma's Siglip2Tokenizer (its own
  # normaliser), so the exported SentencePiece tokenizer is read by its class; the image
  # processor is the export's Siglip2ImageProcessor (Siglip2Processor's defaults, 256 patches
  # of 16, would override its sizes).
  image_processor = transformers.AutoImageProcessor.from_pretrained(out_dir)
  assert type(image_processor).__name__ == "Siglip2ImageProcessor"
  tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)
  inputs = dict(image_processor(images=[Image.fromarray(p) for p in pixels],
                                return_tensors="pt"),
                **tokenizer(texts, padding="max_length", max_length=16, return_tensors="pt"))
  np.testing.assert_array_equal(inputs["spatial_shapes"].numpy(), images["shape"])
  np.testing.assert_array_equal(inputs["input_ids"].numpy(), tokens)
  with torch.no_grad():
    o = hf(**inputs)
  np.testing.assert_allclose(o.image_embeds.numpy(), np.asarray(z["image"]), atol=1e-5)
  np.testing.assert_allclose(o.text_embeds.numpy(), np.asarray(z["text"]), atol=1e-5)
  logits = np.asarray(z["image"] @ z["text"].T) * float(out["t"]) + float(out["b"])
  np.testing.assert_allclose(o.logits_per_image.numpy(), logits, atol=1e-4)

  back, back_kwargs = export.load_params(out_dir, with_model_kwargs=True)
  flat = export.flatten(params)
  assert set(back) == set(flat)
  for k in flat:
    np.testing.assert_allclose(back[k], flat[k], atol=1e-6, err_msg=k)
  assert back_kwargs["towers"]["image"]["posemb_grid"] == 4


def test_one_evaluator_run_at_several_sequence_lengths(data_dir, monkeypatch):
  """evals.*.naflex_lengths: the same checkpoint evaluated at each length in one run, the
  metrics named by length; refused without a naflex pp."""
  import jax  # pylint: disable=g-import-not-at-top
  from big_mm import config as config_lib, evaluators, train  # pylint: disable=g-import-not-at-top
  from conftest import tiny_config  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  changes = {"input.pp_image": "decode|value_range(-1,1)|naflex(16, 8)",
             "model.towers.image.posemb_grid": 4, "mesh": dict(data=1, fsdp=1, tensor=1),
             "evals": {"zeroshot": dict(common.digits_zeroshot_eval(every_steps=0),
                                        split="test[:32]", pp_image=None, batch_size=32,
                                        naflex_lengths=(4, 16))}}
  config = tiny_config(data_dir, **changes)
  setup = train.build(config, devices=jax.devices()[:1])
  params = train.make_train_state(setup).init(jax.random.key(0))["params"]
  context = evaluators.EvalContext(config, setup.mesh, setup.objective, setup.tokenizer)
  from big_mm.input import pipeline  # pylint: disable=g-import-not-at-top
  seen, make = [], pipeline.make_eval_batches

  def recording(input_cfg, *args, **kwargs):
    for batch in make(input_cfg, *args, **kwargs):
      seen.append((input_cfg.pp_image, batch["image"].shape[1]))
      yield batch

  monkeypatch.setattr(pipeline, "make_eval_batches", recording)
  with train.use_mesh(setup):
    results = evaluators.build("zeroshot", config.evals.zeroshot, context)(params)
  assert {"eval/zeroshot/accuracy@n4", "eval/zeroshot/accuracy@n16"} <= set(results)
  assert all(0 <= v <= 1 for k, v in results.items() if "accuracy" in k)
  assert sorted(set(seen)) == [("decode|value_range(-1,1)|naflex(16, 8)", 16),
                               ("decode|value_range(-1,1)|naflex(4, 8)", 4)]
  plain = tiny_config(data_dir, mesh=dict(data=1, fsdp=1, tensor=1), evals={"zeroshot": dict(
      common.digits_zeroshot_eval(every_steps=0), naflex_lengths=(4,))})
  with pytest.raises(config_lib.ConfigError, match=r"naflex_lengths=\(4,\) needs an image pp"):
    evaluators.build("zeroshot", plain.evals.zeroshot, context)


def test_sampled_lengths_vary_the_grid_and_keep_the_padded_shape():
  """naflex(N, p, lengths=...): each example is resized for a budget drawn from `lengths`
  and padded to N, so batch shapes stay static; every budget is drawn."""
  pp = preprocess.parse_pp("value_range(-1,1)|naflex(32, 4, lengths=(8, 16, 32))",
                           preprocess.IMAGE)
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (24, 48, 3), dtype=np.uint8)
  seen = set()
  for _ in range(60):
    out = preprocess.apply_pp(pp, image, rng)
    assert out.data.shape == (32, 48) and out.mask.shape == (32,)
    patches = int(out.shape.prod())
    assert out.mask.sum() == patches
    budget = min(b for b in (8, 16, 32) if patches <= b)
    assert tuple(out.shape) == tuple(s // 4 for s in preprocess.naflex_size(24, 48, 4, budget))
    seen.add(budget)
  assert seen == {8, 16, 32}
  with pytest.raises(ValueError, match="more than max_num_patches"):
    preprocess.parse_pp("naflex(16, 4, lengths=(8, 32))", preprocess.IMAGE)
