"""Atomic training checkpoints: restoring one, saving, pruning, and the best model (`Checkpointer`, the
trainer's component; the functions below are its parts). Which one to resume from: run/resume.py.

A checkpoint is what `accelerator.save_state` writes (model, optimizer, scheduler, sampler, every
rank's RNG states) plus meta.json (training position, resolved config, number of processes, W&B
run id). It is written as .tmp-step-N and renamed when complete, so a save killed half-way leaves
the previous checkpoint usable. The main process decides every question about the shared folder
(whether a checkpoint exists, where to write) and the other ranks use its answer.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from accelerate import Accelerator
from accelerate.utils import RNG_STATE_NAME, SCALER_NAME, set_seed

from distrnn.errors import DistrnnError
from distrnn.ranks.collectives import agree, from_main, main_print
from distrnn.run import integrity
from distrnn.run.cadence import Cadence
from distrnn.run.folder import CheckpointFolder, RunFolder
from distrnn.run.hold import FolderHold
from distrnn.run.layout import Layout, position_in, resumed_rng_seed
from distrnn.run.model_files import save_model_folder
from distrnn.testing import faults

if TYPE_CHECKING:
    from distrnn.run.resume import ResumePoint


@dataclass
class Position:
    """Where training stands: resume continues at the next unseen batch of `epoch`."""

    epoch: int = 0  # the epoch in progress, 0-based
    step_in_epoch: int = 0  # batches of that epoch already trained
    global_step: int = 0  # optimizer steps, applied or skipped
    skipped_updates: int = 0  # of those, the fp16 grad scaler skipped (an overflow): the schedule did not advance
    train_seconds: float = 0.0
    interruptions: int = 0  # resumes so far: checkpoint.every_steps auto's history of failures (run/cadence.py)
    history: list[dict[str, Any]] = field(default_factory=list)  # every evaluation during training


def estimated_bytes(parameters: int, num_processes: int) -> int:
    """Weights + Adam's two moments in fp32, plus each rank's RNG state (~20 KB)."""
    return 3 * 4 * parameters + 20_000 * num_processes


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_checkpoint(accelerator: Accelerator, folder: RunFolder, position: Position, meta: dict[str, Any], keep: int,
         needed_bytes: int, tensors: list[str]) -> Path:
    """Collective: every rank calls it (Accelerate saves each rank's RNG state)."""
    final, tmp = folder.checkpoint(position.global_step), folder.checkpoint(position.global_step, tmp=True)
    if from_main(accelerator, final.is_complete()):  # e.g. a stop right after a periodic save
        return final.path

    def make_room() -> None:
        folder.check_free_space(needed_bytes)
        shutil.rmtree(tmp.path, ignore_errors=True)
        tmp.path.mkdir(parents=True)

    agree(accelerator, make_room, here=accelerator.is_main_process)
    agree(accelerator, lambda: _save_state(accelerator, tmp))

    def publish() -> None:
        """Record every file's size and checksum (read back after every rank fsynced its files) in meta.json,
        make meta.json and the folder durable, publish by renaming, and only then prune older checkpoints.
        Not read back again after the rename: that would read this machine's page cache, not the disk."""
        check_complete(tmp, tensors)
        # The checksums are read while the fsyncs wait for the disk (they see the same bytes): measured, the
        # record then costs nothing a save can notice, against ~10% of it one after the other.
        with ThreadPoolExecutor(1) as pool:
            synced = pool.submit(integrity.fsync_tree, tmp.path)
            files = integrity.record(tmp.path, leave_out=(tmp.meta.name,))
            synced.result()
        meta_all = {"position": asdict(position), "num_processes": accelerator.num_processes,
                    "saved_at": time.time(), "files": files, **meta}
        _write_atomic(tmp.meta, json.dumps(meta_all, indent=2))
        integrity.fsync_folder(tmp.path)
        faults.delay_publish()
        os.replace(tmp.path, final.path)
        integrity.fsync_folder(folder.checkpoints)
        prune(folder, keep)

    agree(accelerator, publish, here=accelerator.is_main_process)
    return final.path


def _save_state(accelerator: Accelerator, tmp: CheckpointFolder) -> None:
    try:
        faults.fail_save()
        faults.delay_main_save(accelerator.is_main_process)
        accelerator.save_state(str(tmp.path))
        if accelerator.is_main_process:
            integrity.give_ordinary_mode(tmp.weights)
        else:  # fsync flushes this host's writes, so its own files only (the main's: publish)
            faults.await_main_file_in_flight(tmp)
            for path in files_of_another_rank(accelerator, tmp):
                integrity.fsync_file(path)
    except OSError as e:  # the previous checkpoint is untouched: only tmp was being written
        raise DistrnnError(f"could not write checkpoint {tmp.path} ({e.strerror or e}); the previous checkpoint "
                           "is intact: free some space and run the same command again to resume") from None


def files_of_another_rank(accelerator: Accelerator, tmp: CheckpointFolder) -> list[Path]:
    """What save_state writes on a rank other than the main one (accelerate's save_accelerator_state): its RNG
    states and, under fp16, scaler.pt, which every rank writes. Nothing else is its to open: the main process
    writes model.safetensors through a temporary file and renames it, which failed a rank that fsynced it."""
    names = ([f"{RNG_STATE_NAME}_{accelerator.process_index}.pkl"]
             + ([SCALER_NAME] if accelerator.scaler is not None else []))
    return [tmp.path / name for name in names]


def untie_weights(models: list, weights: list[dict[str, Any]], output_dir: str) -> None:
    """accelerate's save_state pre-hook: every tensor gets its own storage before it is written.

    On CUDA nn.RNN keeps its weights as views of one flat cuDNN buffer; safetensors keeps one name per
    storage (accelerate's clean_state_dict_for_safetensors), and 7 of the 8 RNN tensors were dropped.
    """
    for i, state in enumerate(weights):
        weights[i] = type(state)((name, tensor.clone()) for name, tensor in state.items())


def load_weights(models: list, input_dir: str) -> None:
    """accelerate's load_state pre-hook: the model's weights through load_state_dict, which copies into
    the existing tensors; safetensors' load_model, which load_state would use, refuses a model whose
    tensors share storage (cuDNN's flat buffer on a GPU). Loaded models leave the list, as the hook
    contract asks, so accelerate does not load them again."""
    from accelerate.utils import extract_model_from_parallel
    from safetensors.torch import load_file

    for model in list(models):
        net = extract_model_from_parallel(model)
        net.load_state_dict(load_file(str(CheckpointFolder(Path(input_dir)).weights),
                                      device=str(next(net.parameters()).device)))
        models.remove(model)


def check_complete(folder: CheckpointFolder, expected: list[str]) -> None:
    """A checkpoint missing any model tensor is never published: it would not resume or evaluate."""
    from safetensors import safe_open

    with safe_open(str(folder.weights), framework="pt") as f:
        missing = sorted(set(expected) - set(f.keys()))
    if missing:
        raise DistrnnError(f"checkpoint {folder.path} is incomplete ({len(missing)} of {len(expected)} model tensors "
                           f"missing, e.g. {missing[0]}); it was not published and the previous one is intact")


def prune(folder: RunFolder, keep: int) -> None:
    """Keep the newest `keep` published checkpoints (called once a newer one verified); never the set-aside ones."""
    complete = [c for c in folder.all_checkpoints() if c.is_complete()]
    for old in complete[:-keep]:
        shutil.rmtree(old.path, ignore_errors=True)
    integrity.fsync_folder(folder.checkpoints)


# Called on every rank with (folder, global step) once a checkpoint is published (Ray's launcher reports it)
OnSaved = Callable[[Path, int], None]


class Checkpointer:
    """The trainer's checkpoints: restoring, saving (and pruning), the best model.

    Collectives (every rank calls each, the main process alone touches the shared folder):
    `restore` (accelerate's load_state, which reads every rank's own RNG file), `save` (three agreements
    around save_state), `save_best` (one agreement).
    """

    def __init__(self, accelerator: Accelerator, start: ResumePoint, folder: RunFolder, checkpoint_bytes: int,
                 hold: FolderHold, on_saved: OnSaved | None = None):
        """`start`: where the run started (its config is the one every checkpoint records); `checkpoint_bytes`:
        what one checkpoint needs (estimated_bytes)."""
        self.accelerator, self.folder, self.hold, self.on_saved = accelerator, folder, hold, on_saved
        self.cfg, self.requested = start.cfg, start.requested
        # The checkpoints of this run: resumed from or saved here (refuse_anothers)
        self.written: set[Path] = {start.checkpoint.path} if start.checkpoint else set()
        self.say = main_print(accelerator)
        self.bytes = checkpoint_bytes
        self.cadence = Cadence(self.cfg.checkpoint.every_steps, self.cfg.checkpoint.mtbf_s)
        self.last_save = (0, 0.0)  # (global step, training seconds) of the last save or the start: the step time
        accelerator.register_save_state_pre_hook(untie_weights)
        accelerator.register_load_state_pre_hook(load_weights)

    def restore(self, start: ResumePoint, optimizer, constant_lr: bool, batches_per_epoch: int) -> Position:
        """Model, optimizer, scheduler, sampler and RNG states from the checkpoint `start` names; where training
        stands (the beginning for a fresh start)."""
        found, meta, acc = start.checkpoint, start.meta, self.accelerator
        if found is None:
            return self.planned(Position())

        def load() -> None:
            faults.fail_startup("checkpoint", acc.process_index)
            # Accelerate's own choice: "on_device" for DDP on GPUs, "cpu" on gloo. "on_device" cannot run on
            # gloo (tried: it maps to cpu:0, which torch.load refuses: "don't know how to restore data location
            # ... cpu:0"), so the GPU branch is covered by make gpu-check's 2-GPU resume check.
            acc.load_state(str(found.path))

        agree(acc, load)  # every rank reads its own RNG file: one failing must stop the others at once
        if constant_lr:  # load_state restored the saved lr; a changed one applies from here on
            for group in optimizer.param_groups:
                group["lr"] = self.cfg.optim.lr
        now = Layout.configured(self.cfg, acc.num_processes)
        position = Position(**position_in(meta, now))
        position.interruptions += 1
        if now.processes != Layout.saved_in(meta).processes:  # the saved RNG states cannot be shared out
            set_seed(resumed_rng_seed(self.cfg.train.seed, position.global_step, acc.process_index))
        # accumulate() ends an update when Accelerate's micro-batch counter (Accelerator.step) reaches a multiple
        # of the accumulation. load_state restored this rank's count of the saved layout: 25 after 25 updates of
        # 2 processes x 1 made a resume on 1 x 2 apply 1 micro-batch first, then straddle every update and drop
        # the epoch's last micro-batch; a rank new to the layout restored none (0), so ranks disagreed on no_sync.
        # Every rank sets it to this epoch's micro-batches done (a multiple of the accumulation; 0 at an epoch's
        # end), so each update ends where a global batch ends. Accelerator.step is the public attribute that
        # load_state itself sets (GradientAccumulationPlugin sets the accumulation, not the count).
        acc.step = position.step_in_epoch % batches_per_epoch
        self.say(f"resumed from {found.path}: epoch {position.epoch + 1}, batch {position.step_in_epoch} of "
                 f"{batches_per_epoch}, step {position.global_step}")
        return self.planned(position)

    def planned(self, position: Position) -> Position:
        """The periodic saves are planned from where training starts."""
        self.cadence.start(position.global_step)
        self.last_save = (position.global_step, position.train_seconds)
        return position

    def due(self, global_step: int) -> bool:
        """A periodic checkpoint at this optimizer step (the trainer adds epoch ends and stops)."""
        return self.cadence.due(global_step)

    def save(self, position: Position, model, wandb_id: str | None) -> Path:
        start = time.perf_counter()
        agree(self.accelerator, lambda: self.refuse_anothers(position.global_step),
              here=self.accelerator.is_main_process)
        steps_in_epoch = position.step_in_epoch // self.cfg.train.grad_accum_steps
        layout = Layout.configured(self.cfg, self.accelerator.num_processes).record(steps_in_epoch, self.requested)
        meta = {"config": self.cfg.to_dict(), "wandb_run_id": wandb_id, "layout": layout}
        path = write_checkpoint(self.accelerator, self.folder, position, meta, keep=self.cfg.checkpoint.keep,
                                needed_bytes=self.bytes + 2**20,
                                tensors=list(self.accelerator.unwrap_model(model).state_dict()))
        seconds = time.perf_counter() - start
        self.say(f"checkpoint {path} ({seconds:.2f} s)")
        self.written.add(path)
        self.plan_next(position, seconds)
        if self.on_saved is not None:
            self.on_saved(path, position.global_step)
        return path

    def plan_next(self, position: Position, save_s: float) -> None:
        """checkpoint.every_steps auto: the next periodic save from this one's cost and the steps since the last."""
        steps, seconds = position.global_step - self.last_save[0], position.train_seconds - self.last_save[1]
        self.last_save = (position.global_step, position.train_seconds)
        line = self.cadence.saved(self.accelerator, position.global_step, save_s,
                                  seconds / steps if steps > 0 else None, position.train_seconds,
                                  position.interruptions)
        if line:
            self.say(line)

    def refuse_anothers(self, step: int) -> None:
        """save() keeps a published step-N as it is: this run's (a stop right after a periodic save), never
        another run's (--resume never moves an earlier run aside; --resume PATH further back than the folder's
        newest checkpoint meets that one's successors)."""
        existing = self.folder.checkpoint(step)
        if existing.is_complete() and existing.path not in self.written:
            raise DistrnnError(f"{existing.path} is another run's checkpoint of step {step}, which this run was "
                               f"about to save; move {self.folder.checkpoints} away, or pass another --output-dir")

    def save_best(self, model, accuracy: float, step: int) -> None:
        """checkpoint.keep_best: the model with the best validation accuracy so far, in RUN/best/."""
        state = self.accelerator.get_state_dict(model)
        agree(self.accelerator, lambda: save_model_folder(state, self.cfg.to_dict(), self.folder.best),
              here=self.accelerator.is_main_process)
        self.say(f"best validation accuracy so far: {accuracy:.2f}% at step {step}; model saved in {self.folder.best}")
