"""One worker's training step, in this process: it never waits for the device, and a non-finite loss
never reaches the weights (real MNIST, one CPU process)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
import yaml
from torch.overrides import TorchFunctionMode

from distrnn.config.schema import build_config
from distrnn.errors import DistrnnError
from distrnn.ranks.collectives import make_accelerator, teardown
from distrnn.ranks.preemption import STOP_SIGNALS, StopRequest
from distrnn.worker.nonfinite import CHECK_EVERY
from distrnn.worker.trainer import build_trainer

# The tensor methods that make the host wait for the device (on a GPU) to read a value.
SYNCS = {"item", "__bool__", "__int__", "__float__", "tolist", "numpy", "__index__", "nonzero"}


class SyncCounter(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def make_trainer(tmp_path, data_dir, *overrides: str, scaler: torch.amp.GradScaler | None = None):
    """A real Trainer in this process; `scaler`: fp16's grad scaler, which Accelerate gives CPUs none of."""
    from accelerate.state import AcceleratorState

    handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    cfg = build_config(overrides=["data.train_samples=1280", "data.test_samples=100", "train.batch_size=32",
                                  f"data.dir={data_dir}", f"train.output_dir={tmp_path / 'run'}", "wandb.enabled=false",
                                  "train.log_every=1000", "checkpoint.every_steps=null", *overrides])
    accelerator = make_accelerator("no", 0, 300, str(tmp_path))
    accelerator.scaler = scaler  # what prepare() wraps the optimizer with, and backward() scales by
    t = build_trainer(cfg, accelerator, StopRequest())
    reduces = []
    real_reduce = accelerator.reduce
    accelerator.reduce = lambda *a, **k: reduces.append(1) or real_reduce(*a, **k)
    t.collectives = reduces
    t.progress.start_epoch(0)
    t.batches = iter(t.epoch_batches())

    def close() -> None:
        t.close()
        teardown(accelerator)
        AcceleratorState._reset_state(True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)

    return t, close


@pytest.fixture
def trainer(tmp_path, data_dir):
    t, close = make_trainer(tmp_path, data_dir)
    yield t
    close()


@pytest.fixture
def fp16_trainer(tmp_path, data_dir):
    """fp16's update path on a CPU: a real GradScaler, a fused Adam, and the OneCycle schedule that must
    wait when an update is skipped."""
    t, close = make_trainer(tmp_path, data_dir, "optim.schedule=onecycle", scaler=torch.amp.GradScaler("cpu"))
    yield t
    close()


def test_fp16_skip_of_an_overflowing_update_is_counted_and_the_schedule_waits(fp16_trainer):
    """fp32 gradients on a CPU do not overflow at any fp32 scale, so an overflow is made the way fp16 makes
    one: an inf in a gradient (steps 3, 4 and 8 here). Accelerate's step_was_skipped stays False with a
    fused Adam under the scaler; distrnn counts each skipped update, keeps the weights, and steps the
    schedule only on applied updates."""
    t = fp16_trainer
    model = t.accelerator.unwrap_model(t.model)
    overflow = {3, 4, 8}
    model.fc.bias.register_hook(lambda g: torch.full_like(g, float("inf")) if t.position.global_step in overflow
                                else g)
    for step in range(12):
        before = [p.detach().clone() for p in model.parameters()]
        t.train_step(*next(t.batches))
        applied = any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
        assert applied == (step not in overflow), step
        assert not t.accelerator.optimizer_step_was_skipped  # accelerate's flag: never set
    assert t.position.skipped_updates == len(overflow) and t.position.global_step == 12
    assert t.scheduler.state_dict()["last_epoch"] == 12 - len(overflow)


def test_fp16_skip_is_seen_through_accelerates_optimizer_with_a_fused_adam(tmp_path):
    """The unit itself: AcceleratedOptimizer + GradScaler("cpu") + an inf gradient."""
    from accelerate.optimizer import AcceleratedOptimizer
    from accelerate.state import AcceleratorState

    from distrnn.worker.nonfinite import ScalerSkips

    accelerator = make_accelerator("no", 0, 300, str(tmp_path))  # the state AcceleratedOptimizer reads
    model = torch.nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    optimizer = AcceleratedOptimizer(torch.optim.Adam(model.parameters(), fused=True), device_placement=False,
                                     scaler=scaler)
    skips = ScalerSkips(scaler)
    for poisoned in (False, True, False):
        optimizer.zero_grad()
        scaler.scale(model(torch.ones(3, 4)).sum()).backward()
        if poisoned:
            model.weight.grad[0, 0] = float("inf")
        before = model.weight.detach().clone()
        optimizer.step()
        assert skips.last_update_skipped() == poisoned
        assert torch.equal(before, model.weight) == poisoned
        assert optimizer.step_was_skipped is False  # why accelerate's flag cannot be used
    teardown(accelerator)
    AcceleratorState._reset_state(True)


def test_a_training_step_never_waits_for_the_device(trainer):
    with SyncCounter() as counter:
        for _ in range(2 * CHECK_EVERY):
            images, labels = next(trainer.batches)
            before, collectives = len(counter.calls), len(trainer.collectives)
            trainer.train_step(images, labels)
            assert counter.calls[before:] == [] and len(trainer.collectives) == collectives  # the step itself
            before = len(counter.calls)
            trainer.after_step()
            checked = trainer.position.global_step % CHECK_EVERY == 0
            syncs, reduces = len(counter.calls) - before, len(trainer.collectives) - collectives
            assert (syncs, reduces) == ((1, 1) if checked else (0, 0)), (trainer.position.global_step, counter.calls)


def test_a_nonfinite_loss_never_reaches_the_weights_and_stops_the_run_at_the_next_check(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainer.train_step(*next(trainer.batches))
    trainer.after_step()
    before = {name: t.clone() for name, t in model.state_dict().items()}
    images, labels = next(trainer.batches)
    images = images.clone()
    images[0, 3, 5] = float("nan")
    trainer.train_step(images, labels)  # step 1: the loss is nan
    for _ in range(3):  # the next steps are finite, but the run is already condemned: nothing is applied
        trainer.train_step(*next(trainer.batches))
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    with pytest.raises(DistrnnError, match=r"^the training loss became nan at step 1 \(epoch 1, batch 1\); model and "
                                           r"batch saved in .*/debug; lower --lr or set optim.grad_clip$"):
        trainer.stop_if_requested_or_nonfinite()
    saved = torch.load(trainer.folder.debug_file(1, 0), weights_only=True, map_location="cpu")
    assert torch.isnan(saved["images"]).any() and torch.equal(saved["labels"], labels.cpu())
    assert all(torch.equal(before[name].cpu(), t) for name, t in saved["model"].items())


def test_finite_steps_train_exactly_as_a_plain_adam_loop(trainer):
    """The guard costs nothing in exactness: x * 1.0 is x, and a fused Adam step with found_inf = 0 is a step."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    plain = StackedRNNCopy(model)
    optimizer = torch.optim.Adam(plain.parameters(), lr=trainer.cfg.optim.lr, fused=True)
    for _ in range(5):
        images, labels = next(trainer.batches)
        trainer.train_step(images, labels)
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(plain(images), labels).backward()
        optimizer.step()
    for (name, a), b in zip(model.state_dict().items(), plain.state_dict().values()):
        assert torch.equal(a, b), name


def StackedRNNCopy(model):
    import copy

    return copy.deepcopy(model)


def test_a_resume_on_another_layout_builds_every_component_from_the_one_final_config(tmp_path, data_dir):
    """A checkpoint of 2 processes x 32 (global batch 64), resumed here on 1 process that asks for 32 x 1:
    the start decides 32 x 2 accumulation before anything is built, and the Trainer, its Checkpointer,
    Accelerate's accumulation, the loader and the run folder's config.yaml all have that one config."""
    t, close = make_trainer(tmp_path, data_dir)
    try:
        t.train_step(*next(t.batches))
        saved = t.save_checkpoint()
    finally:
        close()
    meta = json.loads((saved / "meta.json").read_text())
    meta["layout"].update(processes=2, global_batch=64)  # as a 2-process run of the same config saves it
    meta["num_processes"] = 2
    (saved / "meta.json").write_text(json.dumps(meta))
    t, close = make_trainer(tmp_path, data_dir)
    try:
        assert (t.cfg.train.batch_size, t.cfg.train.grad_accum_steps) == (32, 2)
        assert t.checkpointer.cfg is t.cfg
        assert t.accelerator.gradient_accumulation_steps == 2 and t.global_batch == 64
        assert len(t.loader) == 2 * t.steps_per_epoch  # 20 batches of 32 a 1280-image epoch: 10 updates
        written = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
        assert written["train"]["grad_accum_steps"] == 2
    finally:
        close()
