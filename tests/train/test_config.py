"""Config: the seed's defaults, TOML + --set + flag precedence, and unknown keys named with the valid ones."""

from __future__ import annotations

import pytest

from grpoctl.config import SEVEN_PROJECTIONS, TrainConfig, load_config, parse_overrides
from grpoctl.errors import ConfigError


def test_defaults_are_the_seed_recipe():
    cfg = load_config()
    assert cfg.model.max_seq_length == 1024
    assert (cfg.lora.r, cfg.lora_alpha, cfg.lora.target_modules) == (32, 64, SEVEN_PROJECTIONS)
    t = cfg.trainer
    assert (t.learning_rate, t.weight_decay, t.warmup_ratio, t.lr_scheduler_type) == (5e-6, 0.01, 0.1, "linear")
    assert (t.num_generations, t.temperature, t.min_p, t.max_steps, t.seed) == (4, 1.0, 0.1, 100, 3407)
    assert cfg.data.prompt_field == "question" and cfg.data.extract_hash_answer
    assert "Indonesian" in cfg.data.system_prompt and cfg.rewards.language == "id"
    assert cfg.batch_size == 4  # one prompt x 4 generations per step


def test_precedence_toml_then_set_then_flags(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('[lora]\nr = 8\n[trainer]\nmax_steps = 7\nlearning_rate = 1e-4\n[rewards]\nweights = {answer = 2.0}\n')
    cfg = load_config(f, ["trainer.max_steps=9", "lora.target_modules=[\"q_proj\", \"v_proj\"]",
                          "data.system_prompt=Think in French."], {"trainer": {"max_steps": 11}})
    assert cfg.lora.r == 8 and cfg.lora_alpha == 16
    assert cfg.trainer.learning_rate == 1e-4
    assert cfg.trainer.max_steps == 11
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.system_prompt == "Think in French."
    assert cfg.rewards.weights == {"answer": 2.0}


def test_set_values_are_typed():
    assert parse_overrides(["a.b=3", "a.c=true", "a.d=x y", "a.e=0.5"]) == {"a": {"b": 3, "c": True, "d": "x y",
                                                                                   "e": 0.5}}
    cfg = load_config(overrides=["trainer.top_k=none", "trainer.generation=hf",
                                 "lora.target_modules=q_proj,k_proj"])
    assert cfg.trainer.top_k is None and cfg.trainer.generation == "hf"
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]


def test_unknown_key_names_the_key_and_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key lora\.rank; valid keys in \[lora\]: r, alpha"):
        load_config(overrides=["lora.rank=8"])
    with pytest.raises(ConfigError, match="unknown section or key 'lorra'"):
        load_config(overrides=["lorra.r=8"])


def test_bad_values_and_choices_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="lora.r expects an integer"):
        load_config(overrides=["lora.r=eight"])
    with pytest.raises(ConfigError, match="trainer.backend must be one of"):
        load_config(overrides=["trainer.backend=jax"])
    with pytest.raises(ConfigError, match="divisible by trainer.num_generations"):
        load_config(overrides=["trainer.per_device_train_batch_size=3"])
    with pytest.raises(ConfigError, match="weights names bogus"):
        load_config(overrides=["rewards.weights={bogus = 1.0}"])
    bad = tmp_path / "bad.toml"
    bad.write_text("[lora\nr=1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_a_string_setting_keeps_the_text_typed_after_set():
    cfg = load_config(overrides=["data.system_prompt=true", "tracking.experiment=1e3", "data.prompt_field=\"q\"",
                                 "data.answer_field=none", "lora.r=16", "trainer.top_k=50"])
    assert cfg.data.system_prompt == "true" and cfg.tracking.experiment == "1e3"  # not True, not 1000.0
    assert cfg.data.prompt_field == "q" and cfg.data.answer_field is None  # a quoted TOML string, none unsets
    assert cfg.lora.r == 16 and cfg.trainer.top_k == 50  # numbers stay numbers where numbers are meant


def test_a_toml_value_of_the_wrong_type_for_a_string_setting_is_refused(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[data]\nsystem_prompt = true\n")
    with pytest.raises(ConfigError, match="data.system_prompt expects a string, got true; quote it"):
        load_config(cfg)


def test_divisibility_counts_processes():
    with pytest.raises(ConfigError, match=r"2 x 3 process\(es\)"):
        load_config(overrides=["trainer.per_device_train_batch_size=2", "trainer.num_generations=4",
                               "distributed.num_processes=3"])
    assert load_config(overrides=["trainer.per_device_train_batch_size=2", "trainer.num_generations=4",
                                  "distributed.num_processes=2"]).distributed.num_processes == 2


def test_to_dict_resolves_derived_values():
    d = TrainConfig().to_dict()
    assert d["lora"]["alpha"] == 64 and d["trainer"]["per_device_train_batch_size"] == 4


def test_gradient_checkpointing_follows_the_backend_unless_set():
    """Unset, it is the tutorial's "unsloth" checkpointing with unsloth and off with trl; a set value wins."""
    from grpoctl.train.backends import gradient_checkpointing

    cfg = load_config()
    assert cfg.lora.gradient_checkpointing is None
    assert gradient_checkpointing(cfg, "unsloth") and not gradient_checkpointing(cfg, "trl")
    off = load_config(overrides=["lora.gradient_checkpointing=false"])
    on = load_config(overrides=["lora.gradient_checkpointing=true"])
    assert not gradient_checkpointing(off, "unsloth") and gradient_checkpointing(on, "trl")


def _optional_keys() -> list[tuple[str, str]]:
    import dataclasses
    import typing

    cfg = TrainConfig()
    out = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        if dataclasses.is_dataclass(obj):
            out += [(section.name, k) for k, hint in typing.get_type_hints(type(obj)).items()
                    if type(None) in typing.get_args(hint)]
    return out


def test_set_none_unsets_every_key_that_can_be_unset():
    """As documented: `--set key=none` leaves a key unset. Every optional key, the system prompt (no system
    message) and the weights table (every reward weighs 1.0)."""
    optional = _optional_keys()
    assert ("data", "system_prompt") in optional and len(optional) >= 15
    loaded = load_config(overrides=[f"{s}.{k}=none" for s, k in optional] + ["rewards.weights=none"])
    for s, k in optional:
        assert getattr(getattr(loaded, s), k) is None, f"{s}.{k}"
    assert loaded.rewards.weights == {}
    assert load_config(overrides=["rewards.weights={answer = 2.0}", "rewards.weights=none"]).rewards.weights == {}
    # "none" stays a value where it is one
    assert load_config(overrides=["tracking.mode=none", "lora.bias=none"]).lora.bias == "none"
