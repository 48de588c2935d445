"""UL2's mixture of denoisers (big_mm/objectives/ul2.py) on the three model forms: "lm", the
prefix-LM captioner and the encoder-decoder captioner with a text-encoded prefix."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from big_mm import config as config_lib
from big_mm import decoding, objectives, sharding
from big_mm.input.tokenizer import Tokenizer
from big_mm.models import get_model
from big_mm.models.decoder import shift_right
from big_mm.objectives import cm3, denoising, ul2
from conftest import TOKENIZER, tiny_config, train_steps

TEXT_LEN = 12
PIECES = 128      # data/digits_spm.model
SENTINELS = 4
VOCAB = PIECES + SENTINELS + 3
PREFIX_LEN = 13   # 1 + the widest corrupted input (default mixture or MIXTURE), 12 tokens
TARGET_LEN = 9
BLOCK = dict(width=32, depth=1, mlp_dim=64, num_heads=2)
DEC = dict(BLOCK, vocab_size=VOCAB, max_len=TARGET_LEN)
IMG = dict(BLOCK, patch_size=(8, 8))
MODELS = {
    "lm": ("lm", dict(decoder=DEC, text_prefix_len=PREFIX_LEN)),
    "prefix_lm": ("captioner", dict(image=IMG, decoder=DEC, prefix_lm=True,
                                    text_prefix_len=PREFIX_LEN)),
    "enc_dec": ("captioner", dict(image=IMG, decoder=DEC, text_prefix_len=PREFIX_LEN,
                                  text_encoder=dict(depth=1))),
}
MIXTURE = (("R", 3, 0.15, 1.0), ("S", None, 0.25, 1.0), ("X", 3, 0.5, 1.0))
# sequence="document": N codes of CODES per image; documents of N + TEXT_LEN + 4 = 20 tokens.
CODES, N = 16, 4
DOC_VOCAB = cm3.DocumentVocab(PIECES, CODES, SENTINELS)
DOC_MODEL = dict(decoder=dict(DEC, vocab_size=DOC_VOCAB.size + 3, max_len=14), text_prefix_len=20)
DOC_SETTINGS = dict(sequence="document", image_tokens=N, image_vocab=CODES, denoisers=MIXTURE)
DOC_INPUT = dict(modalities=("tok_rgb", "text"))
CAPTIONS = ["a handwritten 3", "the digit 7 in ink", "zero", "a 5", "four", "a photo of a 1",
            "the number eight written by hand", "9"]


def _objective(kind="lm", model_changes=None, context_changes=None, **settings):
  name, kw = MODELS[kind]
  model = get_model(name, **{**kw, **(model_changes or {})})
  ctx = objectives.Context(**{**dict(text_len=TEXT_LEN, image_size=(32, 32),
                                     tokenizer=Tokenizer(TOKENIZER)), **(context_changes or {})})
  return ul2.UL2(model, ctx, **{"num_sentinels": SENTINELS, **settings})


def _batch(b=8, seed=0):
  text = Tokenizer(TOKENIZER).encode([CAPTIONS[i % len(CAPTIONS)] for i in range(b)],
                                     length=TEXT_LEN)
  image = np.random.default_rng(seed).normal(size=(b, 32, 32, 3)).astype(np.float32)
  return {"image": image, "text": np.asarray(text, np.int32)}


def _document_batch(b=8, seed=0):
  codes = np.random.default_rng(seed).integers(0, CODES, (b, N)).astype(np.int32)
  return {"tok_rgb": codes, "text": _batch(b)["text"]}


def _params(obj):
  return sharding.unbox(jax.jit(obj.init_params)(jax.random.key(0)))


def test_batch_reconstructs_the_captions_and_draws_by_weight():
  denoisers = (("R", 3, 0.5, 1.0), ("S", None, 0.25, 2.0), ("X", 2, 0.5, 1.0))
  obj = _objective(denoisers=denoisers, model_changes=dict(decoder=dict(DEC, max_len=16)))
  text = np.tile(_batch()["text"], (250, 1))  # 2,000 rows
  prefix, targets, choice = jax.jit(obj.corrupt)(jax.random.key(0), text)
  prefix, targets, choice = map(np.asarray, (prefix, targets, choice))
  assert prefix.shape == (len(text), obj.prefix_len) and targets.shape[1] == obj.target_len
  modes = {PIECES + SENTINELS + i: m for i, m in enumerate(ul2.MODES)}
  content = [row[row > 1].tolist() for row in text]
  got = []
  for p, t, c in zip(prefix, targets, choice):
    mode = modes[p[0]]
    assert mode == denoisers[c][0]
    if mode == "S":
      got += denoising.prefix_inverse(p[None, 1:], t[None])
    else:
      got += denoising.span_inverse(p[None, 1:], t[None], sentinel_start=PIECES,
                                    num_sentinels=SENTINELS)
  assert got == content
  # Weights 1 : 2 : 1 (4 standard errors of a binomial fraction over 2,000 rows: 0.045).
  np.testing.assert_allclose(np.bincount(choice, minlength=3) / len(choice), [0.25, 0.5, 0.25],
                             atol=0.045)


@pytest.fixture(scope="module")
def corrupted():
  """A batch's (prefix, targets) under MIXTURE: the same for every model form."""
  return jax.jit(_objective("lm", denoisers=MIXTURE).corrupt)(
      jax.random.key(2), jnp.asarray(_batch()["text"]))[:2]


def _check_decoding(obj, params, images, prefix, targets, greedy):
  """The KV-cache decoding of the targets given [mode] + input equals the teacher-forced pass;
  the prefix's pad slots are never attended; log-likelihoods count the targets; greedy: each
  token decoding.greedy gives is the argmax of the teacher-forced logits before it."""
  width = int(np.max(np.sum(np.asarray(prefix) != 0, axis=1)))

  def pads_changed(params, images, prefix, targets):
    if not obj.has_image:  # "lm": fewer pad slots
      return obj._logits(params, images, targets, prefix[:, :width])
    enc = obj.encode(params, images, prefix)  # the text encoder's pad slots replaced by noise
    enc["tokens"] = jnp.where(enc["mask"][..., None], enc["tokens"], 7.0)
    return obj.model.apply({"params": params}, shift_right(targets), enc,
                           method=type(obj.model).decode)

  @jax.jit
  def full(params, images, prefix, targets):
    return (obj._logits(params, images, targets, prefix),
            pads_changed(params, images, prefix, targets),
            obj.log_likelihood(params, images, targets, prefix))

  @jax.jit
  def cached(params, images, prefix, targets):
    enc = obj.encode(params, images, prefix)
    def step(cache, x):
      logits, cache = obj.decode_step(params, enc, cache, x[0], x[1])
      return cache, logits
    inputs = jnp.pad(targets, ((0, 0), (1, 0)))[:, :-1]
    positions = jnp.arange(targets.shape[1], dtype=jnp.int32)
    _, logits = jax.lax.scan(step, obj.init_cache(params, enc, targets.shape[1]),
                             (inputs.T, positions))
    return jnp.swapaxes(logits, 0, 1)

  logits, pads, (logp, n) = full(params, images, prefix, targets)
  np.testing.assert_allclose(cached(params, images, prefix, targets), logits, atol=2e-5,
                             rtol=1e-5)
  np.testing.assert_allclose(pads, logits, atol=2e-5)
  np.testing.assert_array_equal(n, np.sum(np.asarray(targets) != 0, axis=1))
  assert np.all(np.asarray(logp) < 0)
  if greedy:
    gen = np.asarray(decoding.greedy(obj, params, images, prefix=prefix,
                                     max_len=targets.shape[1]))
    best = np.argmax(full(params, images, prefix, jnp.asarray(gen))[0], axis=-1)
    for g, b in zip(gen, best):
      end = list(g).index(1) + 1 if 1 in g else len(g)  # up to its EOS; pads after
      np.testing.assert_array_equal(g[:end], b[:end])
      assert not np.any(g[end:])


@pytest.mark.parametrize("kind", ["prefix_lm", "enc_dec"])
def test_captioner_trains_and_decodes(kind, corrupted):
  """A finite loss with per-mode metrics, lowered by a few gradient steps (the same noise: the
  batch is memorised); the encoder-decoder's decoding (_check_decoding; the prefix-LM
  captioner's is tests/test_generative.py's, "lm"'s in the sharded test)."""
  obj = _objective(kind, denoisers=MIXTURE)
  params = _params(obj)
  batch = {k: jnp.asarray(v) for k, v in _batch().items()}
  grad_fn = jax.jit(jax.value_and_grad(obj.loss_fn, has_aux=True))
  (loss, metrics), grads = grad_fn(params, batch, jax.random.key(1))
  assert np.isfinite(loss) and 0 <= metrics["ul2/token_accuracy"] <= 1
  assert {"ul2/R_loss", "ul2/S_loss", "ul2/X_loss", "ul2/S_fraction"} <= set(metrics)
  losses = [loss]
  for _ in range(3):
    params = jax.tree.map(lambda p, g: p - 0.05 * g, params, grads)
    (loss, _), grads = grad_fn(params, batch, jax.random.key(1))
    losses.append(loss)
  assert np.all(np.diff(losses) < 0), losses
  if kind == "enc_dec":
    _check_decoding(obj, params, batch["image"], *corrupted, greedy=True)


def test_encoder_decoder_param_tree():
  """The text encoder (txt/) exists only for the encoder-decoder with a text prefix; the
  other captioners keep their trees."""
  def tree(**kw):
    model = get_model("captioner", **{**dict(image=IMG, decoder=DEC), **kw})
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)),
                                               jnp.zeros((1, 4), jnp.int32)))["params"]
    return jax.tree.map(jnp.shape, sharding.unbox(shapes))
  plain, enc_dec = tree(), tree(text_prefix_len=5)
  assert set(enc_dec) == set(plain) | {"txt"} and enc_dec["dec"] == plain["dec"]
  assert enc_dec["txt"]["pos_embedding"] == (1, 5, 32)
  assert enc_dec["txt"]["Embed_0"]["embedding"] == (VOCAB, 32)
  assert "prefix_pos_embedding" in tree(prefix_lm=True, text_prefix_len=5)["dec"]
  with pytest.raises(ValueError, match="text_encoder.width is set by the captioner"):
    get_model("captioner", decoder=DEC, text_prefix_len=5, text_encoder=dict(width=8))
  with pytest.raises(ValueError, match="needs model.prefix_lm=False and model.text_prefix_len"):
    get_model("captioner", decoder=DEC, prefix_lm=True, text_prefix_len=5,
              text_encoder=dict(depth=1))


@pytest.mark.parametrize("settings,match", [
    (dict(denoisers=(("Q", 3, 0.15, 1.0),)), r"mode must be one of \['R', 'S', 'X'\]"),
    (dict(denoisers=(("R", 3, 0.15, -1.0),)), "weight must be a number >= 0, got -1.0"),
    (dict(denoisers=(("R", 3, 0.15, 0.0),)), "every weight is 0"),
    (dict(denoisers=(("S", 3, 0.25, 1.0),)), "S denoiser has no spans; set its mean_span"),
    (dict(denoisers=(("X", 3, 1.5, 1.0),)), r"rate must be in \(0, 1\)"),
    (dict(denoisers=("R", 3, 0.15, 1.0)), r"must be \(mode, mean_span, rate, weight\)"),
    (dict(num_sentinels=0), "num_sentinels must be a positive integer"),
    (dict(sequence="documents"), r"sequence='documents' is not valid; choose one of"),
    (dict(image_first_prob=1.5), r"image_first_prob must be in \[0, 1\]"),
])
def test_settings_errors(settings, match):
  with pytest.raises(config_lib.ConfigError, match=match):
    objectives.settings(dict(name="ul2", **settings))


def test_model_errors():
  with pytest.raises(config_lib.ConfigError, match=r"set model.decoder.vocab_size=135"):
    _objective(model_changes=dict(decoder=dict(DEC, vocab_size=PIECES)))
  with pytest.raises(config_lib.ConfigError, match=r"set model.text_prefix_len=13"):
    _objective(model_changes=dict(text_prefix_len=8))
  with pytest.raises(config_lib.ConfigError, match=r"set model.decoder.max_len=9"):
    _objective(model_changes=dict(decoder=dict(DEC, max_len=6)))
  with pytest.raises(config_lib.ConfigError, match=r"set objective.num_sentinels=4 "):
    _objective("lm", context_changes=dict(text_len=24), denoisers=(("X", 3, 0.5, 1.0),),
               num_sentinels=2, model_changes=dict(decoder=dict(DEC, vocab_size=PIECES + 5)))
  with pytest.raises(config_lib.ConfigError, match="text_prefix_len=0 but UL2's prefix"):
    _objective("enc_dec", model_changes=dict(text_prefix_len=0, text_encoder=None))
  with pytest.raises(config_lib.ConfigError, match="needs input.tokenizer"):
    _objective(context_changes=dict(tokenizer=None))


def test_trains_sharded_exactly_as_on_one_device(data_dir, corrupted):
  """model_name "lm", objective "ul2" through config.load / train.build / the train step: two
  steps on 8 devices (data 4 x fsdp 2) equal the same steps on one device (the noise drawn per
  row is the same under any sharding); then the LM's decoding (_check_decoding)."""
  def config(mesh):
    return tiny_config(data_dir, **{
        "batch_size": 8, "total_steps": 2, "mesh": mesh, "input.text_len": TEXT_LEN,
        "model_name": "lm", "model": MODELS["lm"][1],
        "objective": dict(name="ul2", num_sentinels=SENTINELS, denoisers=MIXTURE)})

  batches = [{"text": _batch()["text"][::1 - 2 * i]} for i in range(2)]
  setup, ref, ref_params, _ = train_steps(config(dict(data=1, fsdp=1, tensor=1)),
                                          jax.devices()[:1], batches)
  _, got, params, shardings = train_steps(config(dict(data=4, fsdp=2, tensor=1)),
                                          jax.devices(), batches)
  for r, g in zip(ref, got):
    for key in ("loss", "ul2/nll", "ul2/R_loss", "ul2/X_fraction"):
      np.testing.assert_allclose(g[key], r[key], rtol=2e-5, err_msg=key)
  assert got[-1]["loss"] != got[0]["loss"]
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params,
               ref_params)
  assert shardings["dec"]["Embed_0"]["embedding"].spec != P()  # FSDP really shards
  assert {"ul2/R_loss", "ul2/S_loss", "ul2/X_loss", "ul2/token_accuracy"} <= set(got[0])
  prefix, targets = corrupted
  _check_decoding(setup.objective, ref_params, prefix, prefix, targets, greedy=False)


def test_document_batch_reconstructs_the_documents():
  """sequence="document": each row's document (image and text blocks, image or caption first)
  is what the denoisers corrupt, image codes included: inputs + targets give it back exactly."""
  obj = _objective("lm", DOC_MODEL, DOC_INPUT, **DOC_SETTINGS)
  assert (obj.prefix_len, obj.target_len, obj.mode_ids["R"]) == (20, 14, DOC_VOCAB.size)
  batch = {k: jnp.asarray(v) for k, v in _document_batch(64).items()}

  @jax.jit
  def corrupt(rng, batch):
    rng_order, rng_noise = jax.random.split(rng)
    docs = obj.documents(rng_order, batch)
    return (docs, *obj.corrupt(rng_noise, docs))

  docs, prefix, targets, choice = map(np.asarray, corrupt(jax.random.key(0), batch))
  assert docs.shape == (64, N + TEXT_LEN + 4) and set(choice.tolist()) == {0, 1, 2}
  image_first = docs[:, 0] == DOC_VOCAB.img_start
  assert 16 <= np.sum(image_first) <= 48
  for d, codes, text, first, p, t, c in zip(docs, *map(np.asarray, batch.values()), image_first,
                                           prefix, targets, choice):
    blocks = [DOC_VOCAB.image_block(codes), DOC_VOCAB.text_block(text[text > 1])]
    assert d[d != 0].tolist() == np.concatenate(blocks if first else blocks[::-1]).tolist()
    mode = MIXTURE[c][0]
    assert p[0] == obj.mode_ids[mode]
    if mode == "S":
      got = denoising.prefix_inverse(p[None, 1:], t[None])
    else:
      got = denoising.span_inverse(p[None, 1:], t[None], sentinel_start=DOC_VOCAB.sentinel_start,
                                   num_sentinels=SENTINELS)
    assert got == [d[d != 0].tolist()]
  assert np.any((targets >= DOC_VOCAB.code_start) & (targets < DOC_VOCAB.img_start))


def test_document_lm_trains():
  """sequence="document" on "lm": a finite loss and gradients from tok_rgb + text."""
  obj = _objective("lm", DOC_MODEL, DOC_INPUT, **DOC_SETTINGS)
  assert set(obj.example_batch()) == {"tok_rgb", "text"}
  params = _params(obj)
  batch = {k: jnp.asarray(v) for k, v in _document_batch().items()}
  grad_fn = jax.jit(jax.value_and_grad(obj.loss_fn, has_aux=True))
  (loss, metrics), grads = grad_fn(params, batch, jax.random.key(1))
  assert np.isfinite(loss) and {"ul2/R_loss", "ul2/S_loss", "ul2/X_loss"} <= set(metrics)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  codes = grads["dec"]["Embed_0"]["embedding"][DOC_VOCAB.code_start:DOC_VOCAB.img_start]
  assert np.any(codes)  # the image codes are embedded (the head is not tied)


def test_document_errors():
  with pytest.raises(config_lib.ConfigError, match="sequence='document' needs model_name='lm'"):
    _objective("prefix_lm", DOC_MODEL, DOC_INPUT, **DOC_SETTINGS)
  with pytest.raises(config_lib.ConfigError, match=r"set input.modalities=\('tok_rgb', 'text'\)"):
    _objective("lm", DOC_MODEL, **DOC_SETTINGS)
  vocab = (r"needs 155 ids \(128 text pieces \+ objective.image_vocab=16 image codes \+ 4 "
           r"boundary tokens \+ objective.num_sentinels=4 sentinels \+ 3 mode tokens\); set "
           r"model.decoder.vocab_size=155")
  with pytest.raises(config_lib.ConfigError, match=vocab):
    _objective("lm", dict(DOC_MODEL, decoder=DEC), DOC_INPUT, **DOC_SETTINGS)
  with pytest.raises(config_lib.ConfigError, match=r"image_tokens=4 \+ input.text_len=12 \+ 4 = "
                     r"20 tokens\) takes 20 slots; set model.text_prefix_len=20"):
    _objective("lm", dict(DOC_MODEL, text_prefix_len=PREFIX_LEN), DOC_INPUT, **DOC_SETTINGS)
