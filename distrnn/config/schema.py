"""One typed config: dataclass defaults, then a YAML file, then `key=value` overrides.

Every key is declared once, below, with its help text and its resume policy (what happens when a
run folder is resumed or reused with another value). Unknown keys, wrong types and out-of-range
values raise ConfigError with one line that names the key and what would be valid.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import yaml

from distrnn.config.values import coerce, parse_override, read_yaml
from distrnn.errors import ConfigError

CELLS = ("rnn", "gru", "lstm")
NONLINEARITIES = ("tanh", "relu")
HEADS = ("all-steps", "last-step")
RECURRENT_INITS = ("pytorch", "orthogonal")
PRECISIONS = ("auto", "no", "fp16", "bf16")
SCHEDULES = ("constant", "onecycle")
LOADERS = ("memory", "torchvision")

MNIST_PIXELS = 28 * 28
MNIST_TRAIN_SIZE = 60_000
MNIST_TEST_SIZE = 10_000


# --- resume policy ------------------------------------------------------------------------------
# What a changed value means when a run folder is resumed (or a finished run continued):
MATCH = "must match"  # the checkpoint would mean something else: refused
FREE = "may change"  # applied from the resume on, and printed as a change
CONSTANT_SCHEDULE = "may change with a constant schedule"  # OneCycle fixes lr and length at the start
GLOBAL_BATCH = "may change if the global batch is kept"  # another number of processes: distrnn.run.layout.resume_layout


def key(default: Any = dataclasses.MISSING, *, help: str, resume: str, factory: Any = dataclasses.MISSING,
        shown_default: str | None = None) -> Any:
    """A config key: its default, its help text and its resume policy, declared together. The help text is
    the only description of the key: the CLI's flags and the config table in docs/configuration.md are made
    from it.
    `shown_default`: how to show a default computed at run time (a factory)."""
    metadata = {"help": help, "resume": resume, "shown_default": shown_default}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def default_data_dir() -> str:
    """The one place DISTRNN_DATA_DIR is read: CI and clusters point every run at shared data."""
    return os.environ.get("DISTRNN_DATA_DIR", "./data")


@dataclass
class ModelConfig:
    cell: str = key("rnn", help="Recurrent cell: rnn, gru or lstm.", resume=MATCH)
    input_size: int = key(28, help="Pixels per step (one image row).", resume=MATCH)
    hidden_size: int = key(256, help="Hidden units per layer.", resume=MATCH)
    num_layers: int = key(2, help="Stacked recurrent layers.", resume=MATCH)
    num_classes: int = key(10, help="Output classes (MNIST digits).", resume=MATCH)
    sequence_length: int = key(28, help="Steps per image; input_size x sequence_length must be 784.", resume=MATCH)
    nonlinearity: str = key("tanh", help="tanh or relu (rnn cell only).", resume=MATCH)
    head: str = key("all-steps", help="all-steps: linear over every step's output (the seed); last-step: the last.",
                    resume=MATCH)
    recurrent_init: str = key("pytorch", help="Recurrent (hidden-to-hidden) weights: pytorch (its uniform default, as "
                              "the seed) or orthogonal (keeps the hidden state's norm through 28 tanh steps).",
                              resume=MATCH)
    normalize_input: bool = key(False, help="Standardise pixels with MNIST's mean and std (0.1307, 0.3081) inside the "
                                "model, so evaluate, predict and export apply it too; no parameters.", resume=MATCH)


@dataclass
class DataConfig:
    dir: str = key(help="Folder holding MNIST/raw.", resume=FREE, factory=default_data_dir,
                   shown_default="$DISTRNN_DATA_DIR or ./data")
    loader: str = key("memory", help="memory: uint8 tensors on the device, sliced per batch; torchvision: the "
                      "seed's DataLoader + ToTensor, sharded by Accelerate.", resume=MATCH)
    train_samples: int | None = key(None, help="Train on the first N training images; null: all 60000.", resume=MATCH)
    test_samples: int | None = key(None, help="Evaluate on the first N test images; null: all 10000.", resume=FREE)
    val_samples: int = key(0, help="Hold out N seeded training images, never trained on, for the evaluations during "
                           "training (test is then evaluated once, at the end); 0: test after each epoch, as the "
                           "seed does.", resume=MATCH)
    num_workers: int = key(0, help="DataLoader workers per process (torchvision loader).", resume=FREE)


@dataclass
class OptimConfig:
    lr: float = key(1e-3, help="Adam learning rate (the peak with schedule=onecycle).", resume=CONSTANT_SCHEDULE)
    schedule: str = key("constant", help="constant or onecycle.", resume=MATCH)
    pct_start: float = key(0.3, help="onecycle: fraction of steps spent warming up.", resume=CONSTANT_SCHEDULE)
    grad_clip: float | None = key(None, help="Max global gradient norm; null: no clipping.", resume=FREE)
    label_smoothing: float = key(0.0, help="Cross-entropy label smoothing (0: none, as the seed).", resume=MATCH)


@dataclass
class TrainConfig:
    epochs: int = key(3, help="Training epochs.", resume=CONSTANT_SCHEDULE)
    batch_size: int = key(64, help="Batch size per process (per accumulation step). A resume on another number of "
                          "processes keeps the checkpoint's global batch and chooses this and "
                          "train.grad_accum_steps itself.", resume=GLOBAL_BATCH)
    grad_accum_steps: int = key(1, help="Batches per optimizer step (Accelerate's accumulate; DDP's gradient "
                                "all-reduce is skipped in between): global batch = batch_size x processes x this, "
                                "printed at start and in summary.json.", resume=GLOBAL_BATCH)
    eval_batch_size: int = key(1000, help="Evaluation batch size per process.", resume=FREE)
    eval_train_set: bool = key(True, help="At the end, evaluate the final model on every training image too (the "
                               "seed's 'Accuracy on training data'); a forward pass over 60,000 images: ~4 s on "
                               "2 CPU cores.", resume=FREE)
    precision: str = key("no", help="Mixed precision: no (fp32), fp16 (GPU only), bf16 (emulated, so slower, on a CPU "
                         "without AVX512-BF16 or AMX) or auto (bf16 where the CPU or GPU runs it natively, else fp32).",
                         resume=MATCH)
    tf32: bool = key(False, help="Allow TF32 in fp32 matmuls and cuDNN RNNs on Ampere+ GPUs (faster; a 10-bit "
                     "mantissa). Off: fp32 means fp32.", resume=MATCH)
    deterministic: bool = key(False, help="Deterministic GPU kernels (torch.use_deterministic_algorithms, "
                              "CUBLAS_WORKSPACE_CONFIG), for bit-exact GPU resumes; slower.", resume=FREE)
    seed: int = key(0, help="Seed for weights, shuffling and every RNG.", resume=MATCH)
    log_every: int = key(50, help="Optimizer steps between loss logs (a progress line in non-interactive logs).",
                         resume=FREE)
    eval_every: int | None = key(None, help="Optimizer steps between extra evaluations (besides each epoch end).",
                                 resume=FREE)
    early_stop_patience: int | None = key(None, help="Stop after N evaluations without a better validation accuracy "
                                          "(needs data.val_samples); null: never.", resume=FREE)
    profile_steps: str | None = key(None, help="Record optimizer steps A-B (e.g. 10-15) with torch.profiler on every "
                                    "rank into RUN/profile/rank-R.json (Chrome/Perfetto traces); null: no profile.",
                                    resume=FREE)
    output_dir: str = key("runs/default", help="The run folder: config, metrics, checkpoints, the model, W&B and "
                          "TensorBoard files.", resume=FREE)
    collective_timeout_s: int = key(300, help="A collective waiting longer (a rank died or hangs) ends the run.",
                                    resume=FREE)


@dataclass
class CheckpointConfig:
    resume: str = key("auto", help="auto: the newest complete checkpoint in the run folder; never: start afresh; or a "
                      "PATH (a checkpoints/step-* folder or a run folder).",
                      resume=FREE)
    every_steps: int | Literal["auto"] | None = key(
        500, help="Optimizer steps between checkpoints (also at every epoch end); null: epoch ends only; auto: the "
        "interval that wastes least time for the measured save cost and checkpoint.mtbf_s (Young/Daly: "
        "sqrt(2 x save seconds x mtbf_s), re-measured at every save; docs/checkpoints.md).", resume=FREE)
    mtbf_s: float | None = key(None, help="Expected seconds of training between failures, for every_steps: auto; "
                               "null: from this run's own history, (training seconds so far + 3600) / "
                               "(interruptions so far + 1), where an interruption is any resume.", resume=FREE)
    keep: int = key(3, help="Newest complete checkpoints kept.", resume=FREE)
    keep_best: bool = key(False, help="Keep the model with the best validation accuracy in RUN/best/ (needs "
                          "data.val_samples).", resume=FREE)


@dataclass
class WandbConfig:
    enabled: bool = key(True, help="Log to Weights & Biases (offline without an API key).", resume=FREE)
    project: str = key("distrnn", help="W&B project.", resume=FREE)
    entity: str | None = key(None, help="W&B entity (team or user); null: your default.", resume=FREE)
    run_name: str | None = key(None, help="W&B run name; null: the run folder's name.", resume=FREE)
    tags: list[str] = key(help="W&B tags.", resume=FREE, factory=list)


@dataclass
class TensorboardConfig:
    enabled: bool = key(False, help="Log to TensorBoard in RUN/tensorboard/ (pip install 'distrnn[tensorboard]').",
                        resume=FREE)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    tensorboard: TensorboardConfig = field(default_factory=TensorboardConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)



def flatten(config: dict[str, Any]) -> dict[str, Any]:
    """{"model": {"cell": "rnn"}} -> {"model.cell": "rnn"}: the keys as --set spells them. The one
    flattener: a config is sections of keys, and a key's value is never unpacked (a mapping where a
    number belongs is a type error that names the key)."""
    return {f"{section}.{name}": value for section, values in config.items() for name, value in values.items()}


def _sections() -> dict[str, type]:
    return {f.name: typing.get_type_hints(Config)[f.name] for f in dataclasses.fields(Config)}


def key_fields() -> dict[str, dataclasses.Field]:
    """Every config key as --set spells it, with its dataclass field (help text and resume policy)."""
    return {f"{name}.{f.name}": f for name, section in _sections().items() for f in dataclasses.fields(section)}


def all_keys() -> list[str]:
    return list(key_fields())


# --- shipped configs ----------------------------------------------------------------------------

def shipped_configs() -> dict[str, Path]:
    """configs/*.yaml, installed with the package: `--config fast` names configs/fast.yaml."""
    folder = resources.files("distrnn.configs")
    return {Path(entry.name).stem: Path(str(entry)) for entry in folder.iterdir() if entry.name.endswith(".yaml")}


def resolve_config_path(name: str | Path) -> Path:
    """A path that exists, else the shipped config of that name (`fast` or `fast.yaml`)."""
    path = Path(name)
    if path.is_file():
        return path
    shipped = shipped_configs()
    stem = path.name.removesuffix(".yaml")
    if path.parent == Path(".") and stem in shipped:
        return shipped[stem]
    raise ConfigError(f"config file '{name}' does not exist; check the path, or name a shipped config "
                      f"({', '.join(sorted(shipped))})")


# --- parsing ------------------------------------------------------------------------------------

def _unknown(name: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'?" if close else "valid keys: " + ", ".join(valid)
    return ConfigError(f"unknown config key {name!r} ({hint})")


def _apply(cfg: Config, name: str, value: Any, from_text: bool) -> None:
    section_name, _, field_name = name.partition(".")
    sections = _sections()
    if section_name not in sections or not field_name:
        raise _unknown(name, all_keys())
    hints = typing.get_type_hints(sections[section_name])
    if field_name not in hints:
        raise _unknown(name, all_keys())
    setattr(getattr(cfg, section_name), field_name, coerce(name, value, hints[field_name], from_text))


def _check_sections(data: Any, where: str) -> dict[str, Any]:
    """`data` as a mapping of known sections, each a mapping of keys (empty sections dropped)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping of sections ({', '.join(_sections())}), "
                          f"got {type(data).__name__}")
    for section, values in data.items():
        if section not in _sections():
            close = difflib.get_close_matches(str(section), list(_sections()), n=1)
            hint = f"did you mean '{close[0]}'?" if close else "valid sections: " + ", ".join(_sections())
            raise ConfigError(f"unknown config section {section!r} in {where} ({hint})")
        if values is not None and not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} in {where} must be a mapping of keys, got {values!r}")
    return {section: values for section, values in data.items() if values is not None}


def build_config(
    data: dict[str, Any] | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    where: str = "config",
) -> Config:
    """Defaults, then `data` (a nested mapping as in YAML), then `key=value` overrides; validated."""
    cfg = Config()
    for name, value in flatten(_check_sections(data or {}, where)).items():
        _apply(cfg, name, value, from_text=False)
    for text in overrides:
        name, value = parse_override(text)
        _apply(cfg, name, value, from_text=True)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """`path` is a YAML file or the name of a shipped config (`fast`); None: the defaults."""
    data = read_yaml(resolve_config_path(path)) if path is not None else {}
    return build_config(data, overrides, where=f"'{path}'" if path else "config")


# --- validation ---------------------------------------------------------------------------------

def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"config key '{name}' must be one of {', '.join(choices)}, got {value!r}")


def _validate_choices(cfg: Config) -> None:
    m = cfg.model
    for name, value, choices in [
        ("model.cell", m.cell, CELLS), ("model.nonlinearity", m.nonlinearity, NONLINEARITIES),
        ("model.head", m.head, HEADS), ("model.recurrent_init", m.recurrent_init, RECURRENT_INITS),
        ("optim.schedule", cfg.optim.schedule, SCHEDULES), ("train.precision", cfg.train.precision, PRECISIONS),
        ("data.loader", cfg.data.loader, LOADERS),
    ]:
        _choice(name, value, choices)


def validate(cfg: Config) -> None:
    m, d, o, t = cfg.model, cfg.data, cfg.optim, cfg.train
    _validate_choices(cfg)
    for name, value in [
        ("model.input_size", m.input_size),
        ("model.hidden_size", m.hidden_size),
        ("model.num_layers", m.num_layers),
        ("model.sequence_length", m.sequence_length),
        ("train.epochs", t.epochs),
        ("train.batch_size", t.batch_size),
        ("train.grad_accum_steps", t.grad_accum_steps),
        ("train.eval_batch_size", t.eval_batch_size),
        ("train.log_every", t.log_every),
        ("train.collective_timeout_s", t.collective_timeout_s),
        ("checkpoint.keep", cfg.checkpoint.keep),
    ]:
        _check(value > 0, f"config key '{name}' must be > 0, got {value}")
    _check(m.input_size * m.sequence_length == MNIST_PIXELS,
           f"model.input_size x model.sequence_length must be {MNIST_PIXELS} (one 28x28 MNIST image), "
           f"got {m.input_size} x {m.sequence_length}; use 28 x 28")
    _check(m.num_classes == 10, f"config key 'model.num_classes' must be 10 for MNIST, got {m.num_classes}")
    _check(
        m.cell == "rnn" or m.nonlinearity == "tanh",
        f"model.nonlinearity={m.nonlinearity} applies only to model.cell=rnn (got cell {m.cell}); leave it at tanh",
    )
    _check(o.lr > 0, f"config key 'optim.lr' must be > 0, got {o.lr}")
    _check(0 < o.pct_start < 1, f"config key 'optim.pct_start' must be between 0 and 1, got {o.pct_start}")
    _check(o.grad_clip is None or o.grad_clip > 0,
           f"config key 'optim.grad_clip' must be > 0 or null, got {o.grad_clip}")
    _check(0 <= o.label_smoothing < 1,
           f"config key 'optim.label_smoothing' must be in [0, 1), got {o.label_smoothing}")
    _check(t.seed >= 0, f"config key 'train.seed' must be >= 0, got {t.seed}")
    _check(d.num_workers >= 0, f"config key 'data.num_workers' must be >= 0, got {d.num_workers}")
    for name, value, limit in [
        ("data.train_samples", d.train_samples, MNIST_TRAIN_SIZE),
        ("data.test_samples", d.test_samples, MNIST_TEST_SIZE),
    ]:
        _check(value is None or 0 < value <= limit, f"config key '{name}' must be null or 1..{limit}, got {value}")
    _validate_holdout(cfg)
    _check(bool(d.dir), "config key 'data.dir' must not be empty")
    _check(bool(t.output_dir), "config key 'train.output_dir' must not be empty")
    _check(t.eval_every is None or t.eval_every > 0,
           f"config key 'train.eval_every' must be > 0 or null, got {t.eval_every}")
    profile = t.profile_steps
    _check(profile is None or (profile.count("-") == 1 and all(p.isdigit() for p in profile.split("-"))
                               and 1 <= int(profile.split("-")[0]) <= int(profile.split("-")[1])),
           f"config key 'train.profile_steps' must be A-B with 1 <= A <= B (e.g. 10-15) or null, got {profile!r}")
    _validate_checkpoint(cfg.checkpoint)


def _validate_checkpoint(c: CheckpointConfig) -> None:
    _check(c.every_steps is None or c.every_steps == "auto" or c.every_steps > 0,
           f"config key 'checkpoint.every_steps' must be > 0, auto or null, got {c.every_steps}")
    _check(c.mtbf_s is None or c.mtbf_s > 0, f"config key 'checkpoint.mtbf_s' must be > 0 or null, got {c.mtbf_s}")
    _check(bool(c.resume), "config key 'checkpoint.resume' must be auto, never or a path")


def _validate_holdout(cfg: Config) -> None:
    """The validation holdout and what needs it."""
    d, t = cfg.data, cfg.train
    pool = d.train_samples or MNIST_TRAIN_SIZE
    _check(0 <= d.val_samples < pool, f"config key 'data.val_samples' must be 0..{pool - 1} (fewer than the training "
                                      f"images), got {d.val_samples}")
    patience = t.early_stop_patience
    _check(patience is None or patience > 0,
           f"config key 'train.early_stop_patience' must be > 0 or null, got {patience}")
    _check(patience is None or d.val_samples > 0,
           "train.early_stop_patience needs a validation holdout: set data.val_samples (e.g. 5000)")
    _check(not cfg.checkpoint.keep_best or d.val_samples > 0,
           "checkpoint.keep_best needs a validation holdout: set data.val_samples (e.g. 5000)")


# --- resume: one table, used by the resume check and the finished-run guard ---------------------

@dataclass(frozen=True)
class Change:
    key: str
    old: Any
    new: Any
    policy: str

    def allowed(self, cfg: Config) -> bool:
        """GLOBAL_BATCH changes are checked against the checkpoint's global batch (distrnn.run.layout.resume_layout)."""
        if self.policy in (FREE, GLOBAL_BATCH):
            return True
        return self.policy == CONSTANT_SCHEDULE and cfg.optim.schedule == "constant"


def changes_since(saved: dict[str, Any], cfg: Config) -> list[Change]:
    """Every key whose value differs from the saved (nested) config, with its policy.

    A key the saved config lacks (saved by an older distrnn) counts as its default.
    """
    old, fields = {**flatten(Config().to_dict()), **flatten(saved)}, key_fields()
    return [Change(name, old.get(name), value, fields[name].metadata["resume"])
            for name, value in flatten(cfg.to_dict()).items() if old.get(name) != value]
