"""The autotuner's stored table (big_mm/kernels/tuning.py) and kernel_config's use of it."""
import json

import jax
import jax.numpy as jnp
import pytest

from big_mm.kernels import contrastive as kc
from big_mm.kernels import tuning


def _entry(batch, tile, loss="sigmoid", implementation="chunked", kind=None, dim=64,
           dtype="float32"):
  return dict(device_kind=kind or jax.devices()[0].device_kind, implementation=implementation,
              loss=loss, dim=dim, dtype=dtype, batch=batch, config={"tile_rows": tile},
              ms=1.0, peak_GiB=0.1)


@pytest.fixture
def table(tmp_path, monkeypatch):
  path = tmp_path / "tuning.json"
  monkeypatch.setenv(tuning.ENV, str(path))
  return path


def test_lookup_prefers_loss_then_nearest_batch(table):
  tuning.record([_entry(1024, 64), _entry(65536, 512), _entry(8192, 128, loss="softmax"),
                 _entry(4096, 999, kind="another device"),
                 _entry(4096, 777, dim=768), _entry(4096, 555, dtype="bfloat16"),
                 _entry(4096, 333, implementation="pallas")])
  look = lambda **kw: tuning.lookup("chunked", dim=64, dtype=jnp.float32, **kw)
  assert look(loss="sigmoid", batch=2048) == {"tile_rows": 64}
  assert look(loss="sigmoid", batch=40000) == {"tile_rows": 512}
  assert look(loss="softmax", batch=1024) == {"tile_rows": 128}  # the only softmax entry
  assert look(loss="sigmoid") == {"tile_rows": 512}  # no batch: the largest
  assert look(loss=None, batch=8000) == {"tile_rows": 128}
  assert tuning.lookup("chunked", dim=32, dtype=jnp.float32) == {}


def test_record_replaces_same_key_and_keeps_the_rest(table):
  tuning.record([_entry(1024, 64), _entry(2048, 64)])
  tuning.record([_entry(1024, 256)])
  stored = json.loads(table.read_text())["entries"]
  assert sorted((e["batch"], e["config"]["tile_rows"]) for e in stored) == [(1024, 256),
                                                                            (2048, 64)]


def test_kernel_config_applies_the_table_and_overrides_win(table):
  assert kc.kernel_config("cpu", mode="chunked", dim=64, dtype=jnp.float32).tile_rows == \
      kc.CHUNK_ROWS
  tuning.record([_entry(4096, 48), _entry(4096, 24, implementation="pallas")])
  cfg = kc.kernel_config("cpu", mode="chunked", dim=64, dtype=jnp.float32, batch=4096)
  assert (cfg.mode, cfg.tile_rows) == ("chunked", 48)
  assert kc.kernel_config("cpu", dim=64, dtype=jnp.float32).tile_rows == 24  # pallas entry
  assert kc.kernel_config("cpu", mode="chunked", dim=64, dtype=jnp.float32,
                          tile_rows=8).tile_rows == 8
  # Without dim / dtype nothing is looked up; a TPU config asked for on a CPU host neither.
  assert kc.kernel_config("cpu", mode="chunked").tile_rows == kc.CHUNK_ROWS
  assert kc.kernel_config("tpu", dim=64, dtype=jnp.float32).tile_rows == 256


def test_contrastive_loss_uses_the_table(table):
  """A chunk from the table reaches the compiled loss (its [chunk, B] slab)."""
  from big_mm.objectives import losses
  tuning.record([_entry(40, 8, dim=16)])
  z = jax.random.normal(jax.random.key(0), (40, 16))
  fn = lambda zi, zt: losses.contrastive_loss(zi, zt, 10.0, -10.0, loss="sigmoid",
                                              strategy="local", implementation="chunked")
  assert "[8,40]" in jax.jit(fn).lower(z, z).compile().as_text()


def test_bad_table_says_what_to_do(table):
  table.write_text("{not json")
  with pytest.raises(ValueError, match="not valid JSON.*autotune --write"):
    tuning.entries()
  table.write_text("[]")
  with pytest.raises(ValueError, match=r"must be \{\"entries\""):
    tuning.entries()
