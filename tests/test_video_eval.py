"""Video evaluation, captioning and export: the fewshot probe, zero-shot and retrieval on video
features (multi-view test inputs through the tower), a captioner / CoCa over video tokens and
the export refusal. The eval splits are fake binding-mode batches of tiny synthetic clips: a
square moving left or right, whose frames alone do not tell the direction."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from big_mm import config as config_lib, evaluators, export, sharding
from big_mm import tree_paths
from big_mm.evaluators import fewshot
from big_mm.input import pipeline
from big_mm.input.tokenizer import Tokenizer
from big_mm.models import get_model, video
from big_mm.models.towers import Towers
from big_mm.objectives import Context, get_objective
from conftest import ROOT, TOKENIZER

T, S, VIEWS, L = 4, 16, 2, 8  # frames, pixels, test views (clips x crops), text length
VIDEO_TOWER = dict(tower="video_vit", width=32, depth=1, mlp_dim=64, num_heads=2, patch_size=4,
                   tubelet_size=2)
TEXT_TOWER = dict(width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=128)
# The eval pp (never run: the fake split stands for it): 2 centre clips, [2, 4, 16, 16, 3].
PP = ("decode_video|sample_clip(4, 1, 'center', clips=2)|video_resize(16)|"
      "video_value_range(-1, 1)")


def clips(labels, rng, views=VIEWS):
  """float32 [N, views, T, S, S, 3] (views=0: [N, T, S, S, 3]) on -1: a 4 x 4 square at
  x = c - 3, c - 1, c + 1, c + 3 over the frames (label 1: moving right) or the reverse (0:
  left), c and its row random per view; both directions show the same frames."""
  out = np.full((len(labels), max(views, 1), T, S, S, 3), -1.0, np.float32)
  for i, label in enumerate(labels):
    for v in range(max(views, 1)):
      c, row = rng.integers(3, S - 6), rng.integers(0, S - 4)
      for t in range(T):
        x = c + (2 * t - 3) * (1 if label else -1)
        out[i, v, t, row:row + 4, x:x + 4] = 1.0
  return out if views else out[:, 0]


class _FakeSplits:
  """make_eval_batches in binding mode over {split: records} ({"video", "text", "label"},
  any subset): the modalities input_cfg.modalities lists with their `<m>_present` flags."""

  def __init__(self, monkeypatch, splits):
    self.splits, self.asked = splits, []
    monkeypatch.setattr(pipeline, "make_eval_batches", self)

  def __call__(self, input_cfg, split, batch_size, batch_sharding, **kwargs):
    assert not kwargs and batch_sharding is not None
    self.asked.append(input_cfg)
    records, names = self.splits[split], tuple(input_cfg.modalities)
    video = next(r["video"] for r in records if r and "video" in r)
    zero = {"video": np.zeros_like(video), "text": np.zeros(L, np.int32)}

    def row(r):
      out = {"mask": np.int32(r is not None), "label": np.int32((r or {}).get("label", 0))}
      for m in names:
        out[m] = (r or {}).get(m, zero[m])
        out[m + "_present"] = np.int32(m in (r or {}))
      return out

    class Batches:
      num_examples = len(records)

      def __iter__(self):
        for start in range(0, len(records), batch_size):
          rows = [row(r) for r in records[start:start + batch_size]]
          rows += [row(None)] * (batch_size - len(rows))
          yield {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return Batches()


@pytest.fixture(scope="module")
def contrastive():
  """A video-text Contrastive objective (random init) and its params."""
  model = Towers(towers={"video": VIDEO_TOWER, "text": TEXT_TOWER}, out_dim=16)
  objective = get_objective("contrastive")(
      model, Context(text_len=L, shapes={"video": (T, S, S, 3)}), modalities=("video", "text"))
  params = sharding.unbox(jax.jit(objective.init_params)(jax.random.key(0)))
  return objective, params


def _evaluate(contrastive, ev, **inputs):
  """evals.e = ev of a run with `inputs` (input.* overrides) over the fake splits."""
  objective, params = contrastive
  config = config_lib.load(ml_collections.ConfigDict(dict(
      total_steps=1, input=dict(data="tar:clips-{split}-*.tar", tokenizer=TOKENIZER, text_len=L,
                                **inputs),
      evals={"e": dict(ev, batch_size=16)})))
  context = evaluators.EvalContext(config, sharding.make_mesh(config.mesh), objective,
                                   Tokenizer(TOKENIZER))
  return evaluators.build("e", config.evals.e, context)(params)


def _embed(contrastive, modality, x):
  objective, params = contrastive
  return np.asarray(jax.jit(objective.embed, static_argnums=1)(params, modality, x))


def test_fewshot_probe_on_video_features_separates_motion(contrastive, monkeypatch):
  """A random space-time tower's features already hold the direction (its tubelets span two
  frames), so the linear probe separates the classes; the evaluator's numbers are the probe on
  the tower's multi-view embeddings of both splits."""
  rng = np.random.default_rng(0)
  y_train, y_test = np.tile([0, 1], 24), np.tile([0, 1], 16)
  x_train, x_test = clips(y_train, rng), clips(y_test, rng)
  splits = {"train": [{"video": x, "label": y} for x, y in zip(x_train, y_train)],
            "test": [{"video": x, "label": y} for x, y in zip(x_test, y_test)]}
  splits["test"].insert(3, {"label": 0})  # no video: skipped
  fake = _FakeSplits(monkeypatch, splits)
  probe = dict(shots=(2, 20), l2_reg=1.0, repeats=2, seed=0)
  out = _evaluate(contrastive, dict(type="fewshot", modality="video", pp_modalities={
      "video": PP}, **probe))
  assert [(c.split, tuple(c.modalities), dict(c.pp_modalities)) for c in fake.asked] == [
      ("train", ("video",), {"video": PP}), ("test", ("video",), {"video": PP})]
  expected = fewshot.fewshot_accuracies(
      _embed(contrastive, "video", x_train), y_train, _embed(contrastive, "video", x_test),
      y_test, **probe)
  assert out == pytest.approx({"eval/e/2shot_accuracy": expected["2shot_accuracy"],
                               "eval/e/20shot_accuracy": expected["20shot_accuracy"],
                               "eval/e/num_examples": 32.0})
  assert out["eval/e/20shot_accuracy"] >= 0.9


def test_zeroshot_and_retrieval_on_multiview_video(contrastive, monkeypatch):
  """Both evaluators embed [B, V, T, H, W, 3] test views with the video tower and rank as a
  direct computation does; a record without video is skipped and counted."""
  rng = np.random.default_rng(1)
  labels = np.array([0, 1, 1, 0, 1, 0])
  videos = clips(labels, rng)
  texts = rng.integers(2, 128, (len(labels), L)).astype(np.int32)
  records = [{"video": v, "text": t, "label": y} for v, t, y in zip(videos, texts, labels)]
  records.insert(2, {"text": texts[0], "label": 1})
  fake = _FakeSplits(monkeypatch, {"test": records})
  zv, zt = _embed(contrastive, "video", videos), _embed(contrastive, "text", texts)
  sim = zv @ zt.T
  out = _evaluate(contrastive, dict(type="retrieval", modalities=("video", "text"), ks=(1,),
                                    pp_modalities={"video": PP}))
  assert tuple(fake.asked[-1].modalities) == ("video", "text")
  rows = np.arange(len(labels))
  assert out == pytest.approx({
      "eval/e/video2text/R@1": np.mean(sim.argmax(1) == rows),
      "eval/e/text2video/R@1": np.mean(sim.argmax(0) == rows),
      "eval/e/video2text/class_R@1": np.mean(labels[sim.argmax(1)] == labels),
      "eval/e/text2video/class_R@1": np.mean(labels[sim.argmax(0)] == labels),
      "eval/e/num_examples": 6.0, "eval/e/num_skipped": 1.0})

  templates = ("{}", "a square moving {}")
  out = _evaluate(contrastive, dict(type="zeroshot", modality="video",
                                    classnames=("left", "right"), templates=templates,
                                    pp_modalities={"video": PP}))
  assert tuple(fake.asked[-1].modalities) == ("video",)
  prompts = Tokenizer(TOKENIZER).encode([t.format(c) for c in ("left", "right")
                                         for t in templates], L)
  classes = _embed(contrastive, "text", prompts).reshape(2, 2, -1).mean(1)
  pred = (zv @ classes.T).argmax(1)  # normalising the class means changes no argmax
  assert out == pytest.approx({
      "eval/e/accuracy": np.mean(pred == labels),
      "eval/e/balanced_accuracy": np.mean([np.mean(pred[labels == c] == c) for c in (0, 1)]),
      "eval/e/num_examples": 6.0, "eval/e/num_skipped": 1.0})


DECODER = dict(width=32, depth=1, mlp_dim=64, num_heads=2, vocab_size=128, max_len=L)
CAPTIONS = np.array([[5, 6, 7, 1, 0, 0, 0, 0], [5, 9, 1, 0, 0, 0, 0, 0]], np.int32)  # left/right
GENERATIVE = {
    "captioning": ("captioner", dict(image=dict(VIDEO_TOWER), decoder=DECODER)),
    "coca": ("coca", dict(image=dict(VIDEO_TOWER), text=DECODER,
                          multimodal=dict(depth=1), out_dim=16)),
}


def _generative(name):
  model_name, kwargs = GENERATIVE[name]
  objective = get_objective(name)(
      get_model(model_name, **kwargs),
      Context(batch_size=4, text_len=L, tokenizer=Tokenizer(TOKENIZER),
              shapes={"video": (T, S, S, 3)}), modality="video")
  return objective, sharding.unbox(jax.jit(objective.init_params)(jax.random.key(0)))


def test_video_captioner_trains_and_decodes(monkeypatch):
  """The captioner's encoder is the video tower (model.image.tower, params under img/); a few
  steps fit the direction captions, which the captioning evaluator's greedy decoding of the
  clips (input.modalities = (video, text)) then gives back."""
  objective, params = _generative("captioning")
  assert params["img"]["embedding"]["kernel"].shape == (2, 4, 4, 3, 32)  # a tubelet kernel
  assert objective.example_batch()["video"].shape == (1, T, S, S, 3)
  labels = np.array([0, 1, 1, 0])
  batch = {"video": jnp.asarray(clips(labels, np.random.default_rng(2), views=0)),
           "text": jnp.asarray(CAPTIONS[labels])}
  opt = optax.adam(3e-3)

  @jax.jit
  def step(params, state, rng):
    (loss, _), grads = jax.value_and_grad(objective.loss_fn, has_aux=True)(params, batch, rng)
    updates, state = opt.update(grads, state)
    return optax.apply_updates(params, updates), state, loss

  # Binding mode (input.modalities lists video): rows without the clip or the caption change
  # nothing, whatever they hold.
  present = {"video_present": np.array([1, 1, 0, 1], np.int32),
             "text_present": np.array([1, 1, 1, 0], np.int32)}
  loss_fn = jax.jit(objective.loss_fn)
  masked = [loss_fn(params, {"video": batch["video"][rows], "text": batch["text"][rows],
                             **present}, jax.random.key(0))[0]
            for rows in (np.array([0, 1, 2, 3]), np.array([0, 1, 3, 2]))]
  np.testing.assert_allclose(masked[0], masked[1], rtol=1e-5)
  every, _ = loss_fn(params, {**batch, **{k: np.ones(4, np.int32) for k in present}},
                     jax.random.key(0))
  assert abs(float(every) - float(masked[0])) > 1e-4  # the flags do change the loss

  state, losses = opt.init(params), []
  for i in range(40):
    params, state, loss = step(params, state, jax.random.key(i))
    losses.append(float(loss))
  assert losses[-1] < 0.1 * losses[0]
  _FakeSplits(monkeypatch, {"test": [{"video": v, "text": t, "label": y} for v, t, y in zip(
      np.asarray(batch["video"]), CAPTIONS[labels], labels)]})
  out = _evaluate((objective, params), dict(type="captioning"), modalities=("video", "text"),
                  pp_modalities={"video": PP.replace(", clips=2", "")})
  assert out["eval/e/exact_match"] == 1.0 and out["eval/e/num_decoded"] == 4.0
  assert out["eval/e/perplexity"] < 1.2


def test_coca_over_video_tokens():
  """CoCa takes the video encoder and objective.modality too (shapes only: its loss in
  binding mode, with present flags, traces)."""
  model_name, kwargs = GENERATIVE["coca"]
  objective = get_objective("coca")(
      get_model(model_name, **kwargs),
      Context(batch_size=4, text_len=L, tokenizer=Tokenizer(TOKENIZER),
              shapes={"video": (T, S, S, 3)}), modality="video")
  params = jax.eval_shape(objective.init_params, jax.random.key(0))
  assert params["img"]["embedding"]["kernel"].value.shape == (2, 4, 4, 3, 32)
  batch = {"video": jax.ShapeDtypeStruct((4, T, S, S, 3), jnp.float32),
           "text": jax.ShapeDtypeStruct((4, L), jnp.int32),
           "video_present": jax.ShapeDtypeStruct((4,), jnp.int32),
           "text_present": jax.ShapeDtypeStruct((4,), jnp.int32)}
  loss, metrics = jax.eval_shape(objective.loss_fn, sharding.unbox(params), batch,
                                 jax.random.key(0))
  assert loss.shape == () and "contrastive_loss" in metrics


def _export_tool():
  spec = importlib.util.spec_from_file_location("export_tool",
                                                os.path.join(ROOT, "tools", "export.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("model_name,model,objective", [
    ("towers", dict(towers={"video": VIDEO_TOWER, "text": TEXT_TOWER}, out_dim=16),
     dict(name="contrastive", modalities=("video", "text"))),
    ("captioner", dict(image=VIDEO_TOWER, decoder=DECODER),
     dict(name="captioning", modality="video")),
])
def test_export_refuses_video_towers(contrastive, monkeypatch, tmp_path, model_name, model,
                                     objective):
  """tools/export.py: hf and open_clip refuse with the reason and the alternatives; npz keeps
  every param (of the towers model here), read back by export.load_params."""
  tool = _export_tool()
  params = contrastive[1]
  monkeypatch.setattr(tool, "restore_params", lambda workdir, step: (params, 1))
  config = ml_collections.ConfigDict(dict(model_name=model_name, model=model,
                                          objective=objective, evals={},
                                          input=dict(tokenizer=TOKENIZER, pp_image=None)))
  for fmt in ("hf", "open_clip"):
    with pytest.raises(export.ExportError, match=r"(?s)video tower.*hf / open_clip cannot hold.*"
                       r"Keep the big_mm checkpoint.*--format npz"):
      tool.run(config, "workdir", fmt, str(tmp_path / fmt))
  if model_name == "towers":
    path = tool.run(config, "workdir", "npz", str(tmp_path / "video.npz"))
    flat, back = export.flatten(params), export.load_params(path)
    assert sorted(back) == sorted(flat) and any(k.startswith("vid/") for k in back)
    for k, v in flat.items():
      np.testing.assert_array_equal(back[k], v)


def test_video_siglip_config_inflates_from_an_hf_siglip_b16():
  """configs/video_siglip_b16.py loads, and every param of its towers comes from an HF SigLIP
  B/16 import (the towers export/hf.py builds for it; shapes only): vid/ inflated from img/
  (the time embedding zeros), txt/, t and b as they are."""
  config = config_lib.load(os.path.join(ROOT, "configs", "video_siglip_b16.py"))
  assert (config.init.inflate, config.objective.modalities) == ("average", ("video", "text"))

  def shapes(model, inputs):
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), inputs)["params"]
    return {n: v.shape for n, v in tree_paths.flat_dict(sharding.unbox(params)).items()}

  text = jax.ShapeDtypeStruct((1, config.input.text_len), jnp.int32)
  towers = config.model.to_dict()
  targets = shapes(Towers(**towers), {"video": jax.ShapeDtypeStruct((1, 16, 224, 224, 3),
                                                                     jnp.float32),
                                      "text": text})
  b16 = dict(width=768, depth=12, mlp_dim=3072, num_heads=12, scan=True)
  hf = Towers(towers=dict(image=dict(b16, patch_size=(16, 16), posemb="learn", pool="map"),
                          text=dict(b16, vocab_size=32_000, pool="last_position")),
              out_dim=dict(image=0, text=768))
  source = {n: np.zeros(s, np.float32) for n, s in shapes(hf, {
      "image": jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32), "text": text}).items()}
  inflated, fresh = video.inflate(source, targets, config.init.inflate)
  assert not fresh and {n: inflated[n].shape for n in targets} == targets
  assert targets["vid/embedding/kernel"] == (2, 16, 16, 3, 768)


def test_objective_modality_config_errors():
  for value, error in (("txt", r"objective.modality: Unknown modality 'txt'.*Did you mean "
                                r"'text'"),
                       ("text", r"objective.modality='text' is token ids")):
    with pytest.raises(config_lib.ConfigError, match=error):
      config_lib.load(os.path.join(ROOT, "configs", "demo_cappa.py"),
                      {"objective.modality": value})
