"""Experiment config: loading, validation errors that list the valid keys, --set overrides."""

from __future__ import annotations

import json

import pytest

from rljax.cli import build_parser
from rljax.experiment.config import (
  ConfigError, ExperimentConfig, apply_overrides, from_dict, load_experiment, parse_value,
)


def test_parse_value_types():
  assert parse_value("3") == 3 and isinstance(parse_value("3"), int)
  assert parse_value("1e-4") == 1e-4
  assert parse_value("true") is True and parse_value("False") is False
  assert parse_value("null") is None and parse_value("None") is None
  assert parse_value("[16, 32]") == [16, 32]
  assert parse_value('{"beta": 0.2}') == {"beta": 0.2}
  assert parse_value("runs/x") == "runs/x"


def test_overrides_nested_fields_and_types():
  c = apply_overrides(ExperimentConfig("grpo"), [
    "steps=7", "grpo.kl_coef=0.0", "grpo.sampling.top_k=5", "grpo.sampling.top_k=None",
    "grpo.loss=gspo", "optimizer.learning_rate=3e-4",
    "data.buckets=[16,32]", "logging.tensorboard=false",
    'model.config={"vocab_size": 19, "hidden_size": 32, "intermediate_size": 64, '
    '"num_layers": 2, "num_heads": 4}', "model.config.num_layers=3"])
  assert c.steps == 7 and c.grpo.kl_coef == 0.0 and c.grpo.sampling.top_k is None
  assert c.grpo.clip_range == (3e-4, 4e-4)  # --set grpo.loss=gspo: GSPO's own clip pair
  assert c.optimizer.learning_rate == 3e-4 and c.data.buckets == (16, 32)
  assert c.logging.tensorboard is False and c.objective is None  # grpo: no objective section
  assert c.model.config.num_layers == 3 and c.model.config.hidden_size == 32
  # the original is untouched (frozen dataclasses, replaced not mutated)
  assert ExperimentConfig("grpo").grpo.kl_coef == 0.04


@pytest.mark.parametrize("override,where,valid", [
  ("stesp=3", "at the top level", "steps"),
  ("grpo.bta=1", "in 'grpo'", "kl_coef"),
  ("grpo.sampling.temp=1", "in 'grpo.sampling'", "temperature"),
  ("logging.out=x", "in 'logging'", "out_dir"),
  ("optimizer.lr=1", "in 'optimizer'", "learning_rate"),
])
def test_unknown_key_lists_valid_keys(override, where, valid):
  with pytest.raises(ConfigError, match=f"unknown key .*{where}.*valid keys: .*{valid}"):
    apply_overrides(ExperimentConfig("sft"), [override])


def test_bad_values_and_forms():
  with pytest.raises(ConfigError, match="num_samples"):
    apply_overrides(ExperimentConfig("grpo"), ["grpo.sampling.num_samples=1"])
  with pytest.raises(ConfigError, match="lam"):
    apply_overrides(ExperimentConfig("ppo"), ["ppo.lam=2"])
  with pytest.raises(ConfigError, match="algorithm must be one of"):
    apply_overrides(ExperimentConfig("sft"), ["algorithm=rlhf"])
  with pytest.raises(ConfigError, match="key=value"):
    apply_overrides(ExperimentConfig("sft"), ["steps"])
  with pytest.raises(ConfigError, match="model.config' is None"):
    apply_overrides(ExperimentConfig("sft"), ["model.config.num_layers=2"])
  with pytest.raises(ConfigError, match="batch_size"):
    apply_overrides(ExperimentConfig("sft"), ["data.batch_size=0"])


def test_packing_option_is_validated():
  from rljax.experiment.config import DataSection

  with pytest.raises(ConfigError, match="data.packing` must be"):
    DataSection(packing="yes")
  with pytest.raises(ConfigError, match="needs data.max_length"):
    ExperimentConfig("dpo", data=DataSection(packing=True))
  with pytest.raises(ConfigError, match="needs an algorithm"):
    ExperimentConfig("grpo", data=DataSection(packing=True, max_length=64))
  assert ExperimentConfig("simpo", data=DataSection(max_length=64)).packs  # auto
  assert not ExperimentConfig("simpo", data=DataSection(max_length=64, buckets=(64,))).packs
  assert not ExperimentConfig("grpo", data=DataSection(max_length=64)).packs
  assert not ExperimentConfig("sft", data=DataSection(max_length=64, packing=False)).packs


def test_from_dict_nested_and_unknown():
  c = from_dict(ExperimentConfig, {"algorithm": "dpo", "grpo": {"sampling": {"num_samples": 4}},
                                   "logging": {"seed": 3}, "data": {"buckets": [8]}})
  assert c.grpo.sampling.num_samples == 4 and c.logging.seed == 3 and c.data.buckets == (8,)
  with pytest.raises(ConfigError, match="unknown key 'sede' in 'logging'.*seed"):
    from_dict(ExperimentConfig, {"algorithm": "dpo", "logging": {"sede": 3}})


def test_json_and_yaml_files(tmp_path):
  path = tmp_path / "exp.json"
  path.write_text(json.dumps({"algorithm": "sft", "steps": 3, "optimizer": {"learning_rate": 1}}))
  exp = load_experiment(str(path), ["steps=5"])
  assert exp.config.steps == 5 and exp.config.optimizer.learning_rate == 1
  yaml = pytest.importorskip("yaml")
  path = tmp_path / "exp.yaml"
  path.write_text(yaml.safe_dump({"algorithm": "kto", "ppo": {"update": {"num_epochs": 2}}}))
  assert load_experiment(str(path)).config.ppo.update.num_epochs == 2
  path.write_text(yaml.safe_dump({"algorithm": "kto", "ppo": {"update": {"epochs": 2}}}))
  with pytest.raises(ConfigError, match="num_epochs"):
    load_experiment(str(path))


def test_python_experiment_with_hooks(tmp_path):
  path = tmp_path / "exp.py"
  path.write_text("from rljax.experiment.config import ExperimentConfig\n"
                  "config = ExperimentConfig('grpo', steps=2)\n"
                  "def evaluate(run, state):\n  return {'x': 1.0}\n")
  exp = load_experiment(str(path), ["steps=4"])
  assert exp.config.steps == 4 and exp.evaluate is not None and exp.build_model is None
  (tmp_path / "bad.py").write_text("config = {'algorithm': 'sft'}\n")
  with pytest.raises(ConfigError, match="must define `config = ExperimentConfig"):
    load_experiment(str(tmp_path / "bad.py"))


def test_cli_parser_has_train_and_convert():
  args = build_parser().parse_args(["train", "exp.py", "--set", "a=1", "--set", "b.c=x",
                                    "--resume", "--out", "runs/x"])
  assert args.overrides == ["a=1", "b.c=x"] and args.resume and args.out == "runs/x"
  assert build_parser().parse_args(["convert", "m.gguf", "out"]).command == "convert"


@pytest.mark.parametrize("override,message", [
  ("grpo.kl_coef=abc", r"grpo.kl_coef='abc': expected float, got str"),
  ("logging.seed=abc", r"logging.seed='abc': expected int, got str"),
  ("logging.seed=1.5", r"logging.seed=1.5: expected int, got float"),
  ("logging.tensorboard=3", r"logging.tensorboard=3: expected bool, got int"),
  ("data.buckets=[16, \"x\"]", r"data.buckets=\[16, 'x'\]: expected tuple\[int, \.\.\.\] \| None"),
  ("grpo.sampling=7", r"grpo.sampling=7: expected SamplingConfig, got int"),
  ("objective.beta=abc", r"objective.beta='abc': expected float"),
])
def test_override_values_are_type_checked_before_anything_runs(override, message):
  with pytest.raises(ConfigError, match=message):
    apply_overrides(ExperimentConfig("dpo"), [override])


def test_override_values_take_the_fields_type():
  c = apply_overrides(ExperimentConfig("dpo"), [
    "optimizer.learning_rate=1", "logging.out_dir=2024", "objective.beta=1",
    "grpo.sampling.top_p=null", "objective.variant=ipo", "logging.save_every=3"])
  assert isinstance(c.optimizer.learning_rate, float) and c.optimizer.learning_rate == 1.0
  assert c.logging.out_dir == "2024"  # a string field keeps the text as typed
  assert c.objective.beta == 1.0 and c.objective.variant == "ipo" and c.logging.save_every == 3
  with pytest.raises(ConfigError, match=r"algorithm 'grpo' has no objective section.*grpo\.\*"):
    apply_overrides(ExperimentConfig("grpo"), ["objective.beta=0.1"])
  with pytest.raises(ConfigError, match="variant"):
    apply_overrides(ExperimentConfig("dpo"), ["objective.variant=nope"])


def test_config_files_are_type_checked(tmp_path):
  path = tmp_path / "exp.json"
  path.write_text(json.dumps({"algorithm": "kto", "logging": {"seed": "1"},
                              "objective": {"beta": 0.2}}))
  with pytest.raises(ConfigError, match=r"logging.seed='1': expected int, got str"):
    load_experiment(str(path))
  path.write_text(json.dumps({"algorithm": "kto", "objective": {"beta": 0.2}}))
  assert load_experiment(str(path)).config.objective.beta == 0.2
  path.write_text('{"algorithm": "kto",\n "steps": }')
  with pytest.raises(ConfigError, match=r"exp.json: line 2: invalid JSON"):
    load_experiment(str(path))


@pytest.mark.parametrize("target", ["no_such_experiment.py", "no/such/experiment.yaml",
                                    "no_such_experiment_module"])
def test_a_missing_experiment_is_one_config_error(tmp_path, target, capsys):
  with pytest.raises(ConfigError, match="experiment.*(does not exist|neither a file)"):
    load_experiment(str(tmp_path / target) if "/" in target else target)
  from rljax.cli import main

  assert main(["train", target]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("rljax train: error:") and "\n" not in err and target in err


def test_module_attr_resolves_next_to_the_experiment_file(tmp_path):
  (tmp_path / "my_reward_module.py").write_text(
    "def fn(prompts, completions, **fields):\n  return [1.0] * len(completions)\n")
  (tmp_path / "my_rows.py").write_text("def rows():\n  return [{'prompt': 'a'}]\n")
  (tmp_path / "exp.json").write_text(json.dumps({
    "algorithm": "grpo", "reward": "my_reward_module:fn", "data": {"train": "my_rows:rows"}}))
  from rljax.experiment import build

  exp = load_experiment(str(tmp_path / "exp.json"))
  assert exp.config.reward == "my_reward_module:fn"  # config.json records what was written
  assert build.build_reward(exp, None).__name__ == "fn"
  assert build.load_rows(exp.config.data.train, "data.train") == [{"prompt": "a"}]
  # A Python experiment can import its neighbours, and its own references resolve there too.
  (tmp_path / "exp.py").write_text(
    "import my_rows\nfrom rljax.experiment.config import DataSection, ExperimentConfig\n"
    "config = ExperimentConfig('grpo', reward='my_reward_module:fn',\n"
    "                          data=DataSection(train=my_rows.rows))\n")
  exp = load_experiment(str(tmp_path / "exp.py"))
  assert build.build_reward(exp, None).__name__ == "fn"
  (tmp_path / "bad.json").write_text(json.dumps({"algorithm": "grpo", "reward": "nomodule:fn"}))
  with pytest.raises(ConfigError, match=r"reward: cannot import 'nomodule:fn' \(looked next to"):
    load_experiment(str(tmp_path / "bad.json"))


def test_model_remat_overrides_reach_the_built_policy(tmp_path):
  """`model.remat`, `.remat_policy`, `.remat_group` set those of a from-scratch config and of a
  pretrained directory's; a group that does not divide the layers is a config error."""
  from flax import nnx

  from rljax.experiment import build
  from rljax.experiment.config import ModelSection
  from rljax.models.config import ModelConfig
  from rljax.models.io import save_pretrained
  from rljax.models.transformer import Transformer

  tiny = ModelConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_layers=2,
                     num_heads=2, num_kv_heads=1)
  save_pretrained(Transformer(tiny, rngs=nnx.Rngs(0)), None, tmp_path / "tiny")
  for source in (dict(config=tiny), dict(path=str(tmp_path / "tiny"))):
    section = ModelSection(**source, remat=True, remat_policy="dots", remat_group=2)
    built = build.build_model(load_experiment(ExperimentConfig("sft", model=section)), None)
    assert (built.config.remat, built.config.remat_policy, built.config.remat_group) == (
      True, "dots", 2)
    assert built.layers.config == built.config
  with pytest.raises(ConfigError, match="remat_group"):
    build.build_model(load_experiment(ExperimentConfig(
      "sft", model=ModelSection(config=tiny, remat=True, remat_group=3))), None)


def test_a_missing_model_directory_is_a_config_error(tmp_path, monkeypatch):
  from rljax.experiment import build
  from rljax.experiment.config import ModelSection

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
  config = ExperimentConfig("sft", model=ModelSection(path=str(tmp_path / "nope")))
  with pytest.raises(ConfigError, match=r"model.path: no config.json in .*nope"):
    build.build_model(load_experiment(config), None)
  config = ExperimentConfig("sft", model=ModelSection(path="no-org/no-model"))
  with pytest.raises(ConfigError, match=r"tokenizer: 'no-org/no-model' is not a local directory"):
    build.build_tokenizer(config)
