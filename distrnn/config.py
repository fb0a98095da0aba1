"""One typed config: dataclass defaults, then a YAML file, then `key=value` overrides.

Unknown keys, wrong types and out-of-range values raise ConfigError with one line that
names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distrnn.errors import ConfigError

CELLS = ("rnn", "gru", "lstm")
NONLINEARITIES = ("tanh", "relu")
HEADS = ("all-steps", "last-step")
PRECISIONS = ("no", "fp16", "bf16")
SCHEDULES = ("constant", "onecycle")
LOADERS = ("memory", "torchvision")

MNIST_PIXELS = 28 * 28
MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000


@dataclass
class ModelConfig:
    cell: str = "rnn"
    input_size: int = 28
    hidden_size: int = 256
    num_layers: int = 2
    num_classes: int = 10
    sequence_length: int = 28
    nonlinearity: str = "tanh"
    head: str = "all-steps"


@dataclass
class DataConfig:
    # A folder holding MNIST/raw; DISTRNN_DATA_DIR lets CI and clusters point at shared data.
    dir: str = field(default_factory=lambda: os.environ.get("DISTRNN_DATA_DIR", "./data"))
    # memory: uint8 tensors on the device, sliced per batch; torchvision: the seed's DataLoader + ToTensor
    loader: str = "memory"
    train_samples: int | None = None  # the first N training images; None means all 60000
    test_samples: int | None = None  # the first N test images; None means all 10000
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 1e-3  # Adam; with schedule=onecycle this is the peak learning rate
    schedule: str = "constant"
    pct_start: float = 0.3  # onecycle: fraction of steps spent warming up
    grad_clip: float | None = None  # max global grad norm; None disables clipping


@dataclass
class TrainConfig:
    epochs: int = 3
    batch_size: int = 64  # per process
    eval_batch_size: int = 1000
    precision: str = "no"
    seed: int = 0
    log_every: int = 50  # optimizer steps between loss logs
    eval_every: int | None = None  # steps between extra test evaluations (besides each epoch end)
    output_dir: str = "runs/default"
    # A collective that waits longer than this (a rank died or hangs) ends the run with an error.
    collective_timeout_s: int = 300


@dataclass
class CheckpointConfig:
    resume: str = "auto"  # auto: newest complete checkpoint in the run folder; never; or a PATH
    every_steps: int | None = 500  # also at every epoch end; null: epoch ends only
    keep: int = 3  # newest complete checkpoints kept


@dataclass
class WandbConfig:
    enabled: bool = True
    project: str = "distrnn"
    entity: str | None = None
    run_name: str | None = None
    tags: list[str] = field(default_factory=list)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"model": {"cell": "rnn"}} -> {"model.cell": "rnn"}: the keys as --set spells them."""
    return {f"{section}.{key}": value for section, values in config.items() for key, value in values.items()}


def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def all_keys() -> list[str]:
    keys = []
    for name, section in _sections().items():
        keys += [f"{name}.{f.name}" for f in dataclasses.fields(section)]
    return keys


def _unknown(key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(valid)
    return ConfigError(f"unknown config key {key!r} ({hint})")


def _type_name(tp: Any) -> str:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
    if typing.get_origin(tp) is list:
        return f"a list of {_type_name(args[0])}"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[tp]


def _coerce(key: str, value: Any, tp: Any, from_text: bool) -> Any:
    """Check `value` against the annotation `tp`; text from the command line is parsed first."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (from_text and str(value).lower() in ("null", "none")):
            return None
        inner = [a for a in typing.get_args(tp) if a is not type(None)][0]
        return _coerce(key, value, inner, from_text)
    wrong = ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is list:
        if from_text and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise wrong
        return [_coerce(key, v, typing.get_args(tp)[0], from_text) for v in value]
    if tp is bool:
        if from_text and isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise wrong
    if tp is int:
        if from_text and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise wrong
    if tp is float:
        # PyYAML reads `1e-3` (no dot) as a string, so numeric strings are accepted for floats.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise wrong from None
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise wrong
    if tp is str:
        if isinstance(value, str):
            return value
        raise wrong
    raise AssertionError(f"unsupported config type {tp}")


def _apply(cfg: Config, key: str, value: Any, from_text: bool) -> None:
    section_name, _, field_name = key.partition(".")
    sections = _sections()
    if section_name not in sections or not field_name:
        raise _unknown(key, all_keys())
    hints = typing.get_type_hints(sections[section_name])
    if field_name not in hints:
        raise _unknown(key, all_keys())
    setattr(getattr(cfg, section_name), field_name, _coerce(key, value, hints[field_name], from_text))


def _flatten_checked(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of sections ({', '.join(_sections())}), got {type(data).__name__}")
    flat = {}
    for section, values in data.items():
        if section not in _sections():
            close = difflib.get_close_matches(str(section), list(_sections()), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "valid sections: " + ", ".join(_sections())
            raise ConfigError(f"unknown config section {section!r} in {where} ({hint})")
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} in {where} must be a mapping of keys, got {values!r}")
        for name, value in values.items():
            flat[f"{section}.{name}"] = value
    return flat


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist; check the path (the shipped configs are in configs/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file '{path}'{line} is not valid YAML: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {e}") from None
    return data if data is not None else {}


def parse_override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} must look like key=value, for example model.hidden_size=128")
    return key.strip(), value.strip()


def build_config(
    data: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    where: str = "config",
) -> Config:
    """Defaults, then `data` (a nested mapping as in YAML), then `key=value` overrides; validated."""
    cfg = Config()
    for key, value in _flatten_checked(data or {}, where).items():
        _apply(cfg, key, value, from_text=False)
    for text in overrides:
        key, value = parse_override(text)
        _apply(cfg, key, value, from_text=True)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = read_yaml(path) if path is not None else {}
    return build_config(data, overrides, where=f"'{path}'" if path else "config")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"config key '{key}' must be one of {', '.join(choices)}, got {value!r}")


def validate(cfg: Config) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _choice("model.cell", m.cell, CELLS)
    _choice("model.nonlinearity", m.nonlinearity, NONLINEARITIES)
    _choice("model.head", m.head, HEADS)
    _choice("optim.schedule", o.schedule, SCHEDULES)
    _choice("train.precision", t.precision, PRECISIONS)
    _choice("data.loader", d.loader, LOADERS)
    for key, value in [
        ("model.input_size", m.input_size),
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.sequence_length", m.sequence_length),
        ("train.epochs", t.epochs),
        ("train.batch_size", t.batch_size),
        ("train.eval_batch_size", t.eval_batch_size),
        ("train.log_every", t.log_every),
        ("train.collective_timeout_s", t.collective_timeout_s),
        ("checkpoint.keep", cfg.checkpoint.keep),
    ]:
        _check(value > 0, f"config key '{key}' must be > 0, got {value}")
    _check(
        m.input_size * m.sequence_length == MNIST_PIXELS,
        f"model.input_size x model.sequence_length must be {MNIST_PIXELS} (one 28x28 MNIST image), "
        f"got {m.input_size} x {m.sequence_length}; use 28 x 28",
    )
    _check(m.num_classes == 10, f"config key 'model.num_classes' must be 10 for MNIST, got {m.num_classes}")
    _check(
        m.cell == "rnn" or m.nonlinearity == "tanh",
        f"model.nonlinearity={m.nonlinearity} applies only to model.cell=rnn (got cell {m.cell}); leave it at tanh",
    )
    _check(o.lr > 0, f"config key 'optim.lr' must be > 0, got {o.lr}")
    _check(0 < o.pct_start < 1, f"config key 'optim.pct_start' must be between 0 and 1, got {o.pct_start}")
    _check(o.grad_clip is None or o.grad_clip > 0, f"config key 'optim.grad_clip' must be > 0 or null, got {o.grad_clip}")
    _check(t.seed >= 0, f"config key 'train.seed' must be >= 0, got {t.seed}")
    _check(d.num_workers >= 0, f"config key 'data.num_workers' must be >= 0, got {d.num_workers}")
    for key, value, limit in [
        ("data.train_samples", d.train_samples, MNIST_TRAIN_SIZE),
        ("data.test_samples", d.test_samples, MNIST_TEST_SIZE),
    ]:
        _check(value is None or 0 < value <= limit, f"config key '{key}' must be null or 1..{limit}, got {value}")
    _check(bool(d.dir), "config key 'data.dir' must not be empty")
    _check(bool(t.output_dir), "config key 'train.output_dir' must not be empty")
    _check(t.eval_every is None or t.eval_every > 0, f"config key 'train.eval_every' must be > 0 or null, got {t.eval_every}")
    every = cfg.checkpoint.every_steps
    _check(every is None or every > 0, f"config key 'checkpoint.every_steps' must be > 0 or null, got {every}")
    _check(bool(cfg.checkpoint.resume), "config key 'checkpoint.resume' must be auto, never or a path")
