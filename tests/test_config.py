"""Config loading, overrides, validation and durations."""
import pytest

from big_mm import config as config_lib
from big_mm.config import ConfigError


def _demo(**overrides):
  return config_lib.load("configs/demo.py", overrides)


def test_demo_loads_locked_with_defaults_filled():
  c = _demo()
  assert c.batch_size == 128 and c.total_steps == 600
  assert c.optim.b2 == 0.95 and c.optim.eps == 1e-8  # from the file / from the schema
  assert c.evals.zeroshot.batch_size == 256  # eval schema default filled in
  with pytest.raises(AttributeError):
    c.new_key = 1


def test_arg_string_and_overrides():
  c = config_lib.load("configs/demo.py:loss=softmax,steps=7",
                      {"optim.lr": 1, "model.towers.image.pool": "gap", "mesh.fsdp": 2})
  assert c.objective.loss == "softmax" and c.total_steps == 7
  assert c.optim.lr == 1.0 and isinstance(c.optim.lr, float)
  assert c.model.towers.image.pool == "gap" and c.mesh.fsdp == 2


def test_unknown_override_names_closest_key():
  with pytest.raises(ConfigError, match=r"'optim.lrr'.*Did you mean 'lr'"):
    _demo(**{"optim.lrr": 0.1})


def test_unknown_key_in_file(tmp_path):
  path = tmp_path / "bad.py"
  path.write_text("import ml_collections\n"
                  "def get_config():\n"
                  "  return ml_collections.ConfigDict(dict(total_steps=1, optim=dict(warmup=3)))\n")
  with pytest.raises(ConfigError, match=r"'optim.warmup'.*Valid keys under optim"):
    config_lib.load(str(path))


def test_unknown_config_arg():
  with pytest.raises(ConfigError, match="Unknown config argument 'stpes'.*'steps'"):
    config_lib.load("configs/demo.py:stpes=3")


def test_bad_values():
  with pytest.raises(ConfigError, match="objective.loss='sigmod'.*sigmoid"):
    _demo(**{"objective.loss": "sigmod"})
  with pytest.raises(ConfigError, match="Set only one of total_steps, total_epochs"):
    _demo(total_epochs=2, total_steps=5)
  with pytest.raises(ConfigError, match="evals.zeroshot.every_step'.*every_steps"):
    _demo(**{"evals.zeroshot.every_step": 3})
  with pytest.raises(ConfigError, match="not found"):
    config_lib.load("configs/nope.py")


def test_durations():
  c = config_lib.ConfigDict(dict(total_steps=None, total_epochs=2.5, total_examples=None))
  assert config_lib.resolve_steps(c, "total", batch_size=100, num_examples=1000) == 25
  c = config_lib.ConfigDict(dict(total_steps=None, total_epochs=None, total_examples=1001))
  assert config_lib.resolve_steps(c, "total", batch_size=100, num_examples=None) == 11
  c = config_lib.ConfigDict(dict(every_steps=None, every_epochs=None, every_examples=None))
  assert config_lib.resolve_steps(c, "every", batch_size=8, num_examples=10, default=None) is None


def test_durations_from_the_command_line_win():
  """configs/demo.py sizes its warmup (50 steps) for its 600 steps: --config.total_steps=50
  shrinks it with the run rather than leaving the run in warmup; a longer run or a warmup of
  its own keeps it. A unit given on the command line replaces the recipe's other unit."""
  assert _demo(total_steps=50).optim.schedule.warmup_steps == 4  # 50 x 50 / 600
  assert _demo(total_steps=6000).optim.schedule.warmup_steps == 50
  assert _demo(**{"total_steps": 50, "optim.schedule.warmup_steps": 20}
               ).optim.schedule.warmup_steps == 20
  c = _demo(total_examples=6400)  # 50 steps of 128
  assert (c.total_steps, c.total_examples, c.optim.schedule.warmup_steps) == (None, 6400, 4)
  c = config_lib.load("configs/siglip_b16.py", {"total_steps": 50})
  assert c.total_examples is None and 1 <= c.optim.schedule.warmup_steps < 50


def test_command_line_parsing():
  flags, overrides = config_lib.parse_command_line(
      ["--config", "configs/demo.py:steps=3", "--workdir=/tmp/x", "--config.optim.lr=2e-3",
       "--config.model.image.patch_size=(2,2)", "--config.input.pp_image=decode|resize(8)"])
  assert flags == {"config": "configs/demo.py:steps=3", "workdir": "/tmp/x"}
  assert overrides == {"optim.lr": 2e-3, "model.image.patch_size": (2, 2),
                       "input.pp_image": "decode|resize(8)"}


@pytest.mark.parametrize("name", ["demo", "siglip_b16", "clip_b16", "lit_b16",
                                  "siglip_moe_b16", "msiglip_b16", "demo_moe",
                                  "demo_multilingual"])
def test_every_recipe_config_is_valid(name):
  c = config_lib.load(f"configs/{name}.py")
  assert c.model_name == "towers" and set(c.model.towers) == {"image", "text"}


def test_two_towers_configs_are_migrated(caplog):
  old = config_lib.load_file("configs/demo.py")
  towers = old.model.towers
  old.model_name = "two_towers"
  old.model = dict(image=towers.image.to_dict(), text=towers.text.to_dict(), out_dim=(0, 64),
                   temperature_init=10.0)
  c = config_lib.load(old, {"model.image.pool": "gap"})
  assert c.model_name == "towers" and c.model.towers.image.pool == "gap"
  assert c.model.towers.text.vocab_size == 128 and c.model.out_dim.to_dict() == {
      "image": 0, "text": 64}
  assert "model.towers.image" in caplog.text
  with pytest.raises(ConfigError, match=r"model.image is not a towers-model key.*"
                                        r"model.towers.image"):
    config_lib.load("configs/demo.py", {"model.image.pool": "gap"})


def test_text_prefix_only_for_captioning():
  c = config_lib.load_file("configs/demo.py")
  c.input.prefix_column = "question"
  c.input.prefix_len = 8
  with pytest.raises(config_lib.ConfigError, match="read only by captioners with a text prefix"):
    config_lib.load(c)


def test_eval_reading_training_files_is_refused_unless_it_never_runs():
  """README's tar-shard command: zero-shot switched off (every_steps=0) needs no eval data."""
  shards = "tar:/data/shards/{00000..00099}.tar"
  with pytest.raises(ConfigError, match=r"evals.zeroshot reads split 'test'.*no \{split\}"):
    _demo(**{"input.data": shards, "evals.retrieval.data": "tar:/data/val/*.tar"})
  c = _demo(**{"input.data": shards, "evals.retrieval.data": "tar:/data/val/*.tar",
               "evals.zeroshot.every_steps": 0})
  assert c.evals.zeroshot.every_steps == 0


def test_objective_section_is_the_named_objectives_settings():
  """config.objective holds `name` + that objective's keys, defaults filled in; naming another
  objective (here by override) gives that one's keys and defaults."""
  assert _demo().objective.to_dict() == dict(
      name="contrastive", loss="sigmoid", strategy="all_gather", implementation="xla",
      micro_batches=1, modalities=("image", "text"), matryoshka_dims=(),
      matryoshka_weights=())
  coca = _demo(**{"objective.name": "coca", "objective.caption_weight": 1})
  assert coca.objective.to_dict() == dict(
      name="coca", loss="sigmoid", strategy="all_gather", implementation="xla",
      label_smoothing=0.0, contrastive_weight=1.0, caption_weight=1, modality="image")
  assert config_lib.load("configs/demo_cappa.py").objective.to_dict() == dict(
      name="captioning", parallel_fraction=0.5, label_smoothing=0.0, modality="image")


def test_objective_keys_of_another_objective_are_unknown():
  with pytest.raises(ConfigError, match=r"Unknown config key 'objective.micro_batches' for "
                                        r"objective.name='captioning': GradCache is implemented "
                                        r"for the contrastive objective only"):
    config_lib.load("configs/demo_cappa.py", {"objective.micro_batches": 2})
  with pytest.raises(ConfigError, match=r"'objective.num_visibel'.*Did you mean 'num_visible'"):
    config_lib.load("configs/demo_multimae.py", {"objective.num_visibel": 2})
  with pytest.raises(ConfigError, match=r"objective.name='captionning'.*Did you mean "
                                        r"'captioning'"):
    _demo(**{"objective.name": "captionning"})


def test_every_objective_declares_the_contract():
  """One explicit registry; each objective's defaults pass its own checks."""
  from big_mm import objectives
  for name, cls in objectives.OBJECTIVES.items():
    assert cls.NAME == name
    assert objectives.settings({"name": name}) == {"name": name, **cls.SETTINGS}
    assert cls.BATCH_KEYS and all(isinstance(k, str) for k in cls.BATCH_KEYS), name
    for method in ("loss_fn", "example_batch", "init_params"):
      assert callable(getattr(cls, method)), (name, method)


def test_binding_mode_input_checks():
  """input.modalities with pp-shaped modalities (audio, points, vec_*): each needs a pp
  string in input.pp_modalities that acts on its kind and fixes its shape; input.columns and
  pp_modalities name listed modalities only; a listed image needs a fixed size."""
  ok = {"input.modalities": ("image", "vec_a", "text"),
        "input.pp_modalities": {"vec_a": "vector(5)"}, "input.pp_image": "decode|resize(8)"}
  assert _demo(**ok).input.pp_modalities.to_dict() == {"vec_a": "vector(5)"}
  cases = [
      ({"input.pp_modalities": None}, r"set input.pp_modalities\['vec_a'\].*vector\(dim\)"),
      ({"input.pp_modalities": {"vec_a": "decode"}}, r"pp_modalities\['vec_a'\].*do not act on "
                                                     r"'vector'"),
      ({"input.pp_modalities": {"vec_a": "vector(5)", "audio": "vector(2)"}},
       r"pp_modalities\['audio'\] is given but input.modalities.*does not list 'audio'"),
      ({"input.columns": {"vec_b": "x"}}, r"input.columns\['vec_b'\]"),
      ({"input.pp_image": "decode|value_range(-1,1)"}, r"makes the image optional.*fixed size"),
      ({"input.modalities": ("image", "vec_a", "depth")}, r"the others are only 'image' and "
                                                          r"'text' \(got \['depth'\]\)"),
  ]
  for change, message in cases:
    with pytest.raises(ConfigError, match=message):
      _demo(**{**ok, **change})
