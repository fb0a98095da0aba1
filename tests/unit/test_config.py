from __future__ import annotations

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from distrnn.config.schema import (
    CONSTANT_SCHEDULE,
    FREE,
    GLOBAL_BATCH,
    MATCH,
    Config,
    all_keys,
    build_config,
    changes_since,
    flatten,
    key_fields,
    load_config,
    read_yaml,
)
from distrnn.errors import ConfigError
from tests.helpers import REPO

REFERENCE = {  # the seed notebook's hyperparameters
    "model.cell": "rnn", "model.input_size": 28, "model.hidden_size": 256, "model.num_layers": 2,
    "model.num_classes": 10, "model.sequence_length": 28, "model.nonlinearity": "tanh", "model.head": "all-steps",
    "optim.lr": 0.001, "optim.schedule": "constant", "optim.grad_clip": None,
    "train.batch_size": 64, "train.epochs": 3, "train.precision": "no",
}


def flat(cfg: Config) -> dict:
    return flatten(cfg.to_dict())


@pytest.mark.parametrize("cfg", [Config(), load_config(REPO / "configs" / "default.yaml")],
                         ids=["defaults", "default.yaml"])
def test_defaults_and_default_yaml_are_the_reference(cfg):
    values = flat(cfg)
    assert {k: values[k] for k in REFERENCE} == REFERENCE


def test_data_dir_default_comes_from_environment(monkeypatch):  # the one place it is read
    monkeypatch.setenv("DISTRNN_DATA_DIR", "/somewhere/mnist")
    assert Config().data.dir == "/somewhere/mnist"
    monkeypatch.delenv("DISTRNN_DATA_DIR")
    assert Config().data.dir == "./data"


def test_file_overrides_defaults_and_flags_override_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  hidden_size: 128\n  cell: gru\ntrain:\n  epochs: 5\n")
    cfg = load_config(path)
    assert (cfg.model.hidden_size, cfg.model.cell, cfg.train.epochs, cfg.train.batch_size) == (128, "gru", 5, 64)
    cfg = load_config(path, ["model.hidden_size=64", "optim.lr=3e-3", "train.epochs=7", "train.epochs=8"])
    assert (cfg.model.hidden_size, cfg.optim.lr, cfg.train.epochs, cfg.model.cell) == (64, 0.003, 8, "gru")


def test_override_text_is_parsed_by_type():
    cfg = build_config(overrides=["wandb.enabled=false", "optim.grad_clip=1.5", "data.train_samples=100",
                                  "wandb.tags=a,b", "wandb.run_name=x"])
    assert cfg.wandb.enabled is False and cfg.optim.grad_clip == 1.5 and cfg.data.train_samples == 100
    assert cfg.wandb.tags == ["a", "b"] and cfg.wandb.run_name == "x"
    assert build_config(overrides=["optim.grad_clip=null"]).optim.grad_clip is None


def test_checkpoint_every_steps_is_a_number_auto_or_null_from_text_and_yaml(tmp_path):
    assert [build_config(overrides=[f"checkpoint.every_steps={v}"]).checkpoint.every_steps
            for v in ("25", "auto", "null")] == [25, "auto", None]
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint:\n  every_steps: auto\n  mtbf_s: 60\n")
    assert (load_config(path).checkpoint.every_steps, load_config(path).checkpoint.mtbf_s) == ("auto", 60.0)


def test_yaml_float_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n")  # PyYAML reads this as the string '1e-3'
    assert load_config(path).optim.lr == 0.001


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.hiden_size=3"], "unknown config key 'model.hiden_size' (did you mean 'model.hidden_size'?)"),
        (["modle.cell=rnn"], "unknown config key 'modle.cell' (did you mean 'model.cell'?)"),
        (["train.batch_size=abc"], "config key 'train.batch_size' must be an integer, got 'abc'"),
        (["train.batch_size=0"], "config key 'train.batch_size' must be > 0, got 0"),
        (["train.epochs=-1"], "config key 'train.epochs' must be > 0, got -1"),
        (["optim.lr=0"], "config key 'optim.lr' must be > 0, got 0.0"),
        (["model.cell=transformer"], "config key 'model.cell' must be one of rnn, gru, lstm, got 'transformer'"),
        (["train.precision=fp8"], "config key 'train.precision' must be one of auto, no, fp16, bf16, got 'fp8'"),
        (["model.recurrent_init=xavier"],
         "config key 'model.recurrent_init' must be one of pytorch, orthogonal, got 'xavier'"),
        (["optim.label_smoothing=1.0"], "config key 'optim.label_smoothing' must be in [0, 1), got 1.0"),
        (["train.eval_train_set=maybe"], "config key 'train.eval_train_set' must be true or false, got 'maybe'"),
        (["model.sequence_length=27"], "must be 784 (one 28x28 MNIST image), got 28 x 27"),
        (["model.cell=gru", "model.nonlinearity=relu"], "model.nonlinearity=relu applies only to model.cell=rnn"),
        (["wandb.enabled=maybe"], "config key 'wandb.enabled' must be true or false, got 'maybe'"),
        (["epochs"], "override 'epochs' must look like key=value"),
        (["data.test_samples=10001"], "config key 'data.test_samples' must be null or 1..10000, got 10001"),
        (["checkpoint.every_steps=often"],
         "config key 'checkpoint.every_steps' must be an integer or auto or null, got 'often'"),
        (["checkpoint.every_steps=0"], "config key 'checkpoint.every_steps' must be > 0, auto or null, got 0"),
        (["checkpoint.mtbf_s=0"], "config key 'checkpoint.mtbf_s' must be > 0 or null, got 0.0"),
    ],
)
def test_bad_overrides_are_rejected_with_a_clear_message(overrides, message):
    with pytest.raises(ConfigError) as e:
        build_config(overrides=overrides)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, message",
    [
        ("train:\n  epochs: three\n", "config key 'train.epochs' must be an integer, got 'three'"),
        ("train:\n  epochs: true\n", "config key 'train.epochs' must be an integer, got True"),
        ("train:\n  epochs: 2.5\n", "config key 'train.epochs' must be an integer, got 2.5"),
        ("trian:\n  epochs: 3\n", "unknown config section 'trian'"),
        ("model:\n  layers: 3\n", "unknown config key 'model.layers'"),
        ("model: [1, 2]\n", "config section 'model'"),
        ("model:\n  cell: rnn\n   bad: indent\n", "line 3 is not valid YAML"),
        ("- a\n- b\n", "must be a mapping of sections"),
    ],
)
def test_bad_files_are_rejected_with_a_clear_message(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert message in str(e.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_resolved_config_round_trips_through_yaml():
    cfg = build_config(overrides=["model.cell=lstm", "wandb.tags=x"])
    assert build_config(yaml.safe_load(cfg.to_yaml())) == cfg


def test_every_key_round_trips_through_override_text_and_yaml():
    """Each key's own default, written as a user would on the command line, parses back to itself."""
    defaults = flatten(Config().to_dict())
    for name, value in defaults.items():
        text = "null" if value is None else ",".join(value) if isinstance(value, list) else str(value)
        if name == "wandb.tags":
            continue  # [] has no text form: "--set wandb.tags=" means []
        assert flatten(build_config(overrides=[f"{name}={text}"]).to_dict())[name] == value, name
    assert build_config(overrides=["wandb.tags="]).wandb.tags == []


def test_every_key_has_help_and_a_resume_policy():
    for name, f in key_fields().items():
        assert f.metadata.get("help"), f"{name} has no help text"
        assert f.metadata.get("resume") in (MATCH, FREE, CONSTANT_SCHEDULE, GLOBAL_BATCH), (
            f"{name} has no resume policy")


def test_every_key_is_in_the_readme_table():
    table = (REPO / "docs" / "configuration.md").read_text()
    missing = [name for name in all_keys() if f"`{name}`" not in table and f"`{name.split('.')[0]}.{{" not in table]
    assert not missing, f"docs/configuration.md's config table lacks {missing}"


@pytest.mark.parametrize("name", ["default", "fast", "smoke"])
def test_shipped_configs_load_by_name_and_by_path(name):
    by_name, by_path = load_config(name), load_config(REPO / "configs" / f"{name}.yaml")
    assert by_name == by_path
    assert by_name.model.hidden_size == 256 and by_name.model.cell == "rnn"  # the reference architecture
    assert by_name.train.output_dir == f"runs/{name}"


def test_shipped_configs_differ_where_they_say():
    fast, smoke = load_config("fast"), load_config("smoke")
    assert (fast.train.batch_size, fast.train.precision, fast.optim.schedule) == (512, "auto", "onecycle")
    assert (fast.train.epochs, fast.model.recurrent_init, fast.model.normalize_input, fast.optim.label_smoothing,
            fast.train.eval_train_set, fast.train.eval_every, fast.data.val_samples) == (
        2, "orthogonal", True, 0.1, False, None, 0)  # tuned on a holdout, shipped without one
    assert (smoke.data.train_samples, smoke.train.epochs) == (10_000, 1)


def test_the_fast_ablation_lines_each_undo_what_fast_yaml_says():
    """sweeps/fast_ablation.txt (quoted in fast.yaml's header): each line loads on top of the fast config."""
    lines = (REPO / "sweeps" / "fast_ablation.txt").read_text().splitlines()
    base = read_yaml(REPO / "configs" / "fast.yaml")
    steps = [build_config(base, ["data.val_samples=5000", *line.split()]) for line in lines]
    assert [(c.model.normalize_input, c.model.recurrent_init, c.optim.label_smoothing, c.train.seed)
            for c in steps] == [(False, "pytorch", 0.0, 0), (True, "pytorch", 0.0, 0), (True, "orthogonal", 0.0, 0),
                                (True, "orthogonal", 0.1, 0), (True, "orthogonal", 0.1, 1)]


@pytest.mark.parametrize(
    "overrides, changed, allowed",
    [
        (["optim.lr=0.005"], ["optim.lr"], True),  # constant schedule: applied from the resume on
        (["train.epochs=5"], ["train.epochs"], True),
        (["optim.schedule=onecycle", "optim.lr=0.005"], ["optim.lr", "optim.schedule"], False),
        (["model.hidden_size=128"], ["model.hidden_size"], False),
        (["train.batch_size=32"], ["train.batch_size"], True),  # checked against the global batch (test_elastic)
        (["wandb.project=x", "train.log_every=7", "data.dir=/elsewhere"], ["data.dir", "train.log_every",
                                                                           "wandb.project"], True),
    ],
)
def test_resume_policy_table(overrides, changed, allowed):
    saved = Config().to_dict()
    cfg = build_config(overrides=overrides)
    changes = changes_since(saved, cfg)
    assert sorted(c.key for c in changes) == changed
    assert all(c.allowed(cfg) for c in changes) == allowed


def test_onecycle_fixes_lr_and_epochs_at_the_start():
    saved = build_config(overrides=["optim.schedule=onecycle"]).to_dict()
    for override in ["optim.lr=0.005", "train.epochs=5", "optim.pct_start=0.2"]:
        cfg = build_config(overrides=["optim.schedule=onecycle", override])
        [change] = changes_since(saved, cfg)
        assert change.policy == CONSTANT_SCHEDULE and not change.allowed(cfg)


def test_a_key_missing_from_an_older_saved_config_counts_as_its_default():
    saved = Config().to_dict()
    del saved["optim"]["grad_clip"]
    assert changes_since(saved, Config()) == []



VALUES = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.floats(allow_nan=True, allow_infinity=True),
                   st.text(max_size=8),
                   st.sampled_from(["rnn", "gru", "lstm", "bf16", "fp16", "memory", "auto", "1e-3"]),
                   st.lists(st.text(max_size=4), max_size=3))
KEYS = st.one_of(st.sampled_from(all_keys()), st.text(min_size=1, max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(KEYS, VALUES, max_size=6))
def test_config_loader_accepts_or_rejects_cleanly(flat):
    nested: dict = {}
    for key, value in flat.items():
        section, _, name = key.partition(".")
        nested.setdefault(section, {})
        if isinstance(nested[section], dict):
            nested[section][name or key] = value
    try:
        cfg = build_config(nested)
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)
    else:
        assert cfg.train.batch_size > 0 and cfg.model.cell in ("rnn", "gru", "lstm")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(KEYS, st.text(max_size=10)), max_size=5))
def test_override_parser_accepts_or_rejects_cleanly(pairs):
    try:
        build_config(overrides=[f"{k}={v}" for k, v in pairs])
    except ConfigError as e:
        assert str(e) and "\n" not in str(e)


@pytest.mark.parametrize("value, ok", [("10-15", True), ("5-5", True), ("0-3", False), ("8-5", False), ("7", False),
                                       ("a-b", False), ("null", True)])
def test_profile_steps_are_a_range_of_optimizer_steps(value, ok):
    if ok:
        build_config(overrides=[f"train.profile_steps={value}"])
    else:
        with pytest.raises(ConfigError, match=r"config key 'train.profile_steps' must be A-B with 1 <= A <= B"):
            build_config(overrides=[f"train.profile_steps={value}"])
