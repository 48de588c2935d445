"""Audio pp ops (big_mm/input/audio.py) and the AST-style tower (big_mm/models/audio.py)."""
import io

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import soundfile

from big_mm.input import preprocess
from big_mm.models.audio import AudioTransformer
from big_mm.models.towers import Towers

BadRecord = preprocess.BadRecord


def _run(pp, value, seed=0):
  return preprocess.apply_pp(preprocess.parse_pp(pp), value, np.random.default_rng(seed))


def _tone(freq, seconds, rate, amplitude=0.5):
  return (amplitude * np.sin(2 * np.pi * freq * np.arange(round(seconds * rate)) / rate)
          ).astype(np.float32)


def _encode(x, rate, fmt):
  buf = io.BytesIO()
  soundfile.write(buf, x, rate, format=fmt)
  return buf.getvalue()


def _peak_hz(x, rate):
  return np.argmax(np.abs(np.fft.rfft(x))) * rate / len(x)


# ---- decode_audio ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["WAV", "FLAC"])
@pytest.mark.parametrize("rate", [8000, 44100])
def test_decode_resamples_and_keeps_the_frequency(fmt, rate):
  data = _encode(_tone(1000, 0.5, rate), rate, fmt)
  x = _run("decode_audio(16000)", data)
  assert x.dtype == np.float32 and x.shape == (8000,)  # 0.5 s at 16 kHz
  assert abs(_peak_hz(x, 16000) - 1000) <= 2
  assert 0.45 < np.abs(x[1000:-1000]).max() < 0.55  # the amplitude survives resampling


def test_decode_averages_channels_and_scales_int_arrays():
  tone = _tone(440, 0.25, 16000)
  stereo = _encode(np.stack([tone, 0.5 * tone], -1), 16000, "FLAC")
  np.testing.assert_allclose(_run("decode_audio", stereo), 0.75 * tone, atol=1e-4)
  pcm = np.array([-32768, 0, 16384, 32767], np.int16)
  np.testing.assert_allclose(_run("decode_audio", pcm), [-1, 0, 0.5, 32767 / 32768])
  np.testing.assert_allclose(_run("decode_audio", np.stack([pcm, -pcm], -1)[1:3]), [0, 0])
  np.testing.assert_array_equal(_run("decode_audio", tone.astype(np.float64)), tone)
  assert not _run("decode_audio", np.zeros(100, np.float32)).any()  # silence is fine


@pytest.mark.parametrize("value,reason", [
    (b"RIFF\x24\x00\x00\x00WAVEfmt not really", "corrupt_audio"),
    (np.zeros((2, 1000), np.int16), "corrupt_audio"),  # channels first
    (b"", "empty_audio"),
    (np.zeros(0, np.int16), "empty_audio"),
    (np.array([0.1, np.nan], np.float32), "nonfinite_audio"),
    (np.zeros(16000 * 3, np.float32), "audio_too_long"),
    (_encode(np.zeros(16000 * 3, np.float32), 16000, "WAV"), "audio_too_long"),
])
def test_decode_bad_records(value, reason):
  with pytest.raises(BadRecord) as e:
    _run("decode_audio(16000, max_seconds=2)", value)
  assert e.value.reason == reason


# ---- waveform ops ----------------------------------------------------------------------

def test_crops_and_gain():
  x = np.arange(48000, dtype=np.float32)
  a, b = _run("random_crop_audio(1)", x, seed=1), _run("random_crop_audio(1)", x, seed=1)
  np.testing.assert_array_equal(a, b)
  assert a.shape == (16000,) and np.all(np.diff(a) == 1)
  assert _run("central_crop_audio(1)", x)[0] == 16000
  assert _run("random_crop_audio(5)", x).shape == x.shape  # shorter clips stay whole
  gains = [_run("gain(-6, 6)", np.ones(4, np.float32), seed=s)[0] for s in range(50)]
  assert 10 ** (-6 / 20) <= min(gains) < 0.7 and 1.5 < max(gains) <= 10 ** (6 / 20)


# ---- log_mel ---------------------------------------------------------------------------

@pytest.mark.parametrize("freq", [300, 1000, 2500, 6000])
def test_log_mel_of_a_tone_peaks_at_its_mel_bin(freq):
  spec = _run("log_mel(20, n_mels=40)", _tone(freq, 0.3, 16000))
  mel = lambda f: 2595 * np.log10(1 + f / 700)  # HTK; filter centres are mel-spaced
  centres = 700 * (10 ** (np.linspace(0, mel(8000), 42)[1:-1] / 2595) - 1)
  assert spec.shape == (20, 40) and spec.dtype == np.float32
  np.testing.assert_array_equal(spec.argmax(-1), np.argmin(np.abs(centres - freq)))


@pytest.mark.parametrize("seconds", [0.1, 3.0])
def test_output_shape_of_the_pp_string(seconds):
  pp = "decode_audio(16000)|random_crop_audio(2)|gain(-6, 6)|log_mel(50, 32)|spec_augment"
  assert preprocess.output_shape(pp) == (50, 32)
  data = _encode(_tone(440, seconds, 16000), 16000, "FLAC")
  spec = preprocess.Preprocessor(pp)({"audio": data}, np.random.default_rng(0))[0]["audio"]
  assert spec.shape == (50, 32) and np.isfinite(spec).all()


def test_log_mel_pads_the_end_with_silence():
  spec = _run("log_mel(50, 32, log_offset=1e-6)", _tone(440, 0.1, 16000))  # 0.1 s: 8 frames
  assert (spec[:8].max(-1) > 0).all()
  np.testing.assert_allclose(spec[12:], np.log(np.float32(1e-6)))


# ---- spec_augment ----------------------------------------------------------------------

def _masked(axis, pp, seed):
  out = _run(pp, np.ones((100, 64), np.float32), seed)
  lines = np.flatnonzero((out == 0).all(axis=1 - axis))
  assert np.all(np.diff(lines) == 1)  # one mask: contiguous
  assert ((out == 0).sum() == lines.size * out.shape[1 - axis])  # nothing else masked
  return lines.size


def test_spec_augment_masks_the_configured_widths():
  freq = [_masked(1, "spec_augment(1, 8, 0, 10)", s) for s in range(60)]
  time = [_masked(0, "spec_augment(0, 8, 1, 10)", s) for s in range(60)]
  assert set(freq) == set(range(9)) and set(time) == set(range(11))
  pp = "spec_augment(freq_masks=2, time_masks=2, value=-5.0)"
  x = np.random.default_rng(0).normal(size=(100, 64)).astype(np.float32)
  np.testing.assert_array_equal(_run(pp, x, seed=3), _run(pp, x, seed=3))
  assert not np.array_equal(_run(pp, x, seed=3), _run(pp, x, seed=4))
  assert _run(pp, x, seed=3).shape == x.shape and (_run(pp, x, seed=3) == -5).any()


@pytest.mark.parametrize("pp,match", [
    ("decode_audio|log_mel(0)", r"pp op 'log_mel\(0\)': frames must be an int >= 1"),
    ("gain(6, -6)", r"pp op 'gain\(6, -6\)': min_db=6 must be <= max_db=-6"),
    ("log_mel(10, fmax=9000)", r"pp op 'log_mel\(10, fmax=9000\)': fmax must be .*8000"),
    ("spec_augment(freq_width=-1)", r"'spec_augment\(freq_width=-1\)': freq_width must be"),
    ("decode_audio(sample_rate=16000.5)", r"'decode_audio\(.*sample_rate must be an int"),
])
def test_bad_arguments_name_the_op(pp, match):
  with pytest.raises(ValueError, match=match):
    preprocess.parse_pp(pp)


def test_ops_in_the_wrong_order_say_where_to_put_them():
  with pytest.raises(ValueError, match="after 'log_mel'"):
    _run("spec_augment", np.zeros(100, np.float32))


# ---- the tower -------------------------------------------------------------------------

TINY = dict(width=32, depth=2, num_heads=2, mlp_dim=64, patch_size=(8, 8))


def _shapes(tree):
  return jax.tree_util.tree_map(lambda v: tuple(v.shape), tree)


def test_audio_transformer_param_tree_and_outputs():
  model = AudioTransformer(**TINY, patch_stride=(4, 4), pool="tok", num_classes=16)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 40, 32))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), x)
  params = nn.unbox(abstract["params"])
  assert set(params) == {"embedding", "pos_embedding", "cls", "Transformer", "head"}
  assert set(params["Transformer"]) == {"encoderblock_0", "encoderblock_1", "encoder_norm"}
  grid = ((40 - 8) // 4 + 1) * ((32 - 8) // 4 + 1)  # 9 x 7 overlapping patches
  assert _shapes(params["embedding"]) == {"kernel": (8, 8, 1, 32), "bias": (32,)}
  assert params["pos_embedding"].shape == (1, grid, 32)
  assert params["head"]["kernel"].shape == (32, 16)
  specs = nn.get_partition_spec(abstract)["params"]
  assert tuple(specs["embedding"]["kernel"]) == (None, None, None, "embed")

  variables = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  y, out = jax.jit(model.apply)(variables, x)
  assert y.shape == (2, 16) and not np.asarray(y).any()  # head_zeroinit
  assert out["stem"].shape == (2, 9, 7, 32) and out["encoded"].shape == (2, grid, 32)
  assert out["pre_logits"].shape == (2, 32)

  mapped = AudioTransformer(**TINY, pool="map", posemb="sincos2d", scan=True)
  params = jax.eval_shape(mapped.init, jax.random.PRNGKey(0), x)["params"]
  assert set(params) == {"embedding", "Transformer", "MAPHead_0"}
  assert set(params["Transformer"]) == {"encoderblock", "encoder_norm"}
  with pytest.raises(ValueError, match="smaller than one patch"):
    jax.eval_shape(mapped.init, jax.random.PRNGKey(0), x[:, :4])


def test_towers_with_audio_and_text_give_normalised_embeddings():
  model = Towers(towers={"audio": dict(TINY, depth=1, pool="gap"),
                         "text": dict(width=32, depth=1, num_heads=2, mlp_dim=64,
                                      vocab_size=50)}, out_dim=16)
  spec = _run("log_mel(24, 16)", _tone(440, 0.3, 16000))
  inputs = {"audio": jnp.stack([spec, spec * 0.5]), "text": jnp.array([[3, 4, 1], [5, 1, 0]])}
  params = jax.jit(model.init)(jax.random.PRNGKey(0), inputs)["params"]
  assert {"aud", "txt", "t", "b"} == set(params)
  z, out = jax.jit(model.apply)({"params": params}, inputs)
  for m in ("audio", "text"):
    assert z[m].shape == (2, 16)
    np.testing.assert_allclose(jnp.linalg.norm(z[m], axis=-1), 1.0, rtol=1e-5)
  assert out["aud/encoded"].shape == (2, 3 * 2, 32)
