"""The training loop of one worker process, in named steps.

`Trainer.__init__` sets up (data, resume point, run folder, model, optimizer, trackers);
`Trainer.fit` is the loop, and reads like the seed notebook's: for each epoch, for each batch,
step; then evaluate. Everything a step may trigger (a log line, a checkpoint, a mid-epoch
evaluation, a stop) is decided in `after_step`.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from distrnn import checkpoint, faults, figures, loaders
from distrnn.checkpoint import Position
from distrnn.config import Config
from distrnn.distributed import agree, dist_mean, dist_sum, from_main, main_print
from distrnn.errors import DistrnnError
from distrnn.metrics import Evaluation, Mistake, evaluate_with_mistakes, exact_accuracy
from distrnn.mnist import Split, ensure_downloaded, load_split
from distrnn.model import StackedRNN, count_parameters
from distrnn.model_files import save_model, save_model_folder
from distrnn.nonfinite import CHECK_EVERY, NonFiniteGuard, total_norm

MISTAKES = 25  # the most confident mistakes of the final test evaluation kept for errors.png and W&B (a 5x5 grid)
from distrnn.preemption import Preempted, StopFlag
from distrnn.run_folder import RunFolder
from distrnn.tracking import RunLog


class Clock:
    """Training time only: evaluations and checkpoints are left out (paused)."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self._since = seconds, None

    def start(self) -> None:
        self._since = time.perf_counter()

    def now(self) -> float:
        """Seconds so far, including the stretch in progress."""
        return self.seconds + (time.perf_counter() - self._since if self._since is not None else 0.0)

    def stop(self) -> None:
        if self._since is not None:
            self.seconds += time.perf_counter() - self._since
            self._since = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        running = self._since is not None
        self.stop()
        try:
            yield
        finally:
            if running:
                self.start()


class Trainer:
    def __init__(self, cfg: Config, accelerator: Accelerator, stop: StopFlag):
        self.cfg, self.accelerator, self.stop = cfg, accelerator, stop
        accelerator.gradient_accumulation_steps = cfg.train.grad_accum_steps  # what accumulate() counts to
        self.folder = RunFolder(cfg.train.output_dir)
        self.say = main_print(accelerator)
        threads = f" ({torch.get_num_threads()} threads each)" if accelerator.device.type == "cpu" else ""
        self.global_batch = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
        self.say(f"distrnn: {accelerator.num_processes} process(es) on {accelerator.device}{threads}, precision "
                 f"{cfg.train.precision}, global batch {self.global_batch} ({cfg.train.batch_size} per process x "
                 f"{accelerator.num_processes} x {cfg.train.grad_accum_steps} accumulation), run folder "
                 f"{self.folder.root}\n--- resolved config ---\n{cfg.to_yaml()}-----------------------")
        # Data first: a missing or damaged data set stops the run before anything is written.
        self.train_split, self.val_set, self.test_set = self._load_data()
        model = StackedRNN(cfg.model)
        faults.flatten_like_cudnn(model.rnn)
        self.say(f"model: {count_parameters(model):,} parameters")
        self.checkpoint_bytes = checkpoint.estimated_bytes(count_parameters(model), accelerator.num_processes)
        resume_from, meta = self._resume_point()
        self.log = RunLog(accelerator, self.folder, cfg.wandb, cfg.to_dict(), resumed=meta is not None,
                          resumed_id=meta.get("wandb_run_id") if meta else None, tensorboard=cfg.tensorboard.enabled)
        # Fused: one kernel for the whole update, and it can skip a step on the device (see nonfinite.py).
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, fused=True)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_save_state_pre_hook(checkpoint.untie_weights)
        accelerator.register_load_state_pre_hook(checkpoint.load_weights)
        self.guard = NonFiniteGuard(self.optimizer.optimizer, accelerator.device,
                                    scaler_owns_skips=accelerator.scaler is not None)
        self.loader = self._make_loader()
        self.scheduler = self._make_scheduler()
        self.position = self._restore(resume_from, meta)
        self.clock, self.epoch_clock = Clock(self.position.train_seconds), Clock()
        self.samples_per_step = cfg.train.batch_size * accelerator.num_processes  # per batch (accumulation step)
        self.stopping = self.patience_exhausted()  # a run stopped early stays stopped when resumed
        self.last_test: Evaluation | None = None
        self.mistakes: list[Mistake] = []
        self.skipped_steps = 0  # updates the fp16 grad scaler skipped (overflow), since this start
        self.eval_seconds = 0.0  # spent evaluating, since this start (the benchmark weighs it against training)

    # --- set-up -------------------------------------------------------------------------------

    def _load_data(self) -> tuple[Split, Split | None, Split]:
        """(what is trained on, the validation holdout or None, the test split)."""
        data, device = self.cfg.data, self.accelerator.device
        # One process per node downloads missing files; then every rank reads and checks its own copy
        # (node-local disks can differ), and identical errors are printed once.
        agree(self.accelerator, lambda: ensure_downloaded(data.dir), here=self.accelerator.is_local_main_process)
        train_set, test_set = agree(self.accelerator, lambda: (load_split(data.dir, True), load_split(data.dir, False)))
        pool = train_set.first(data.train_samples)
        self.train_indices, held = loaders.hold_out(len(pool), data.val_samples, self.cfg.train.seed)
        val = pool.take(held).to(device) if data.val_samples else None
        return pool.take(self.train_indices), val, test_set.first(data.test_samples).to(device)

    def _resume_point(self) -> tuple[checkpoint.CheckpointFolder | None, dict[str, Any] | None]:
        """The main process decides (the folder is shared) and every rank uses its answer."""
        def decide():
            found, warnings = checkpoint.find_resume(self.folder, self.cfg.checkpoint.resume)
            meta = checkpoint.read_meta(found) if found else None
            changes = checkpoint.check_resume(self.folder, self.cfg, found, meta, self.accelerator.num_processes)
            self.folder.prepare(self.cfg.to_yaml(), needed_bytes=(self.cfg.checkpoint.keep + 2) * self.checkpoint_bytes
                                + 2**20)
            for warning in warnings:
                self.say(f"warning: {warning}")
            for change in changes:
                self.say(f"resume: {change.key} changed from {change.old} to {change.new} ({change.policy})")
            return found, meta

        return from_main(self.accelerator, agree(self.accelerator, decide, here=self.accelerator.is_main_process))

    def _make_loader(self):
        cfg, acc = self.cfg, self.accelerator
        if cfg.data.loader == "memory":
            return loaders.MemoryLoader(self.train_split.to(acc.device), cfg.train.batch_size, cfg.train.seed,
                                        acc.process_index, acc.num_processes, cfg.train.grad_accum_steps)
        return acc.prepare(loaders.torchvision_loader(cfg.data.dir, self.train_indices.tolist(), cfg.train.batch_size,
                                                      cfg.data.num_workers))

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps an epoch: batches / accumulation steps (a partial last group counts)."""
        return math.ceil(len(self.loader) / self.cfg.train.grad_accum_steps)

    def _make_scheduler(self):
        if self.cfg.optim.schedule != "onecycle":
            return None
        return self.accelerator.prepare(torch.optim.lr_scheduler.OneCycleLR(
            self.optimizer, max_lr=self.cfg.optim.lr, total_steps=self.cfg.train.epochs * self.steps_per_epoch,
            pct_start=self.cfg.optim.pct_start))

    def _restore(self, resume_from, meta) -> Position:
        if not meta:
            return Position()
        self.accelerator.load_state(str(resume_from.path))
        if self.scheduler is None:  # load_state restored the saved lr; a changed one applies from here on
            for group in self.optimizer.param_groups:
                group["lr"] = self.cfg.optim.lr
        position = Position(**meta["position"])
        self.say(f"resumed from {resume_from.path}: epoch {position.epoch + 1}, batch {position.step_in_epoch} of "
                 f"{len(self.loader)}, step {position.global_step}")
        return position

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        while self.position.epoch < self.cfg.train.epochs and not self.stopping:
            self.start_epoch()
            for images, labels in self.epoch_batches():
                self.train_step(images, labels)
                self.after_step()
                if self.stopping:  # early stopping: no better validation accuracy for a while
                    break
            self.end_epoch()
        if self.stopped_early():
            accuracy, step = self.best_validation()
            self.say(f"early stop at step {self.position.global_step}: no better validation accuracy in "
                     f"{self.cfg.train.early_stop_patience} evaluations (best {accuracy:.2f}% at step {step})")
        return self.finish()

    def stopped_early(self) -> bool:
        return self.stopping and self.position.epoch < self.cfg.train.epochs

    def start_epoch(self) -> None:
        self.model.train()
        self.epoch_clock = Clock()
        self.epoch_first_step = self.position.step_in_epoch
        # Accuracy on the training batches as they are trained (no extra pass; kept on the device).
        self.running_correct = torch.zeros((), dtype=torch.int64, device=self.accelerator.device)
        self.running_seen = 0
        self.clock.start()
        self.epoch_clock.start()

    def epoch_batches(self):
        """This rank's batches of the epoch in progress, from the next unseen one (a mid-epoch resume)."""
        epoch, skip = self.position.epoch, self.position.step_in_epoch
        self.loader.set_epoch(epoch)  # the shuffle is a function of (seed, epoch)
        if isinstance(self.loader, loaders.MemoryLoader):
            batches = self.loader.batches(skip)
        else:
            batches = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        # A live bar in a terminal; in a log file (SLURM, CI) a plain line every log_every steps instead.
        self.bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.cfg.train.epochs}", initial=skip,
                        total=len(self.loader), dynamic_ncols=True, leave=False,
                        disable=not (self.accelerator.is_main_process and sys.stderr.isatty()))
        return self.bar

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward, backward, and (every grad_accum_steps batches) an update: nothing here waits for the
        device (no host sync). Between updates accumulate() skips DDP's gradient all-reduce (no_sync)
        and makes the optimizer's step and zero_grad no-ops."""
        p = self.position
        with self.accelerator.accumulate(self.model):
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.optim.label_smoothing)
            self.running_correct += (logits.argmax(dim=1) == labels).sum()
            self.running_seen += labels.numel()
            self.accelerator.backward(self.guard.loss_for_backward(loss, p.global_step, p.step_in_epoch,
                                                                   (images, labels)))
            if self.accelerator.sync_gradients:
                self.guard_gradients()
            self.optimizer.step()
            if self.accelerator.sync_gradients:
                self.step_scheduler()
            self.optimizer.zero_grad(set_to_none=True)
        p.step_in_epoch += 1
        p.global_step += int(self.accelerator.sync_gradients)
        self.loss = loss.detach()

    def guard_gradients(self) -> None:
        """Clip, and let the guard see the (all-reduced) gradients' norm before they are applied."""
        norm = (self.accelerator.clip_grad_norm_(self.model.parameters(), self.cfg.optim.grad_clip)
                if self.cfg.optim.grad_clip is not None else None)
        if not self.guard.scaler_owns_skips:
            norm = total_norm(self.model.parameters()) if norm is None else norm
            self.guard.grads_computed(norm, self.position.global_step)

    def step_scheduler(self) -> None:
        """The schedule advances only with the weights: not on a step the fp16 grad scaler skipped (an
        overflow). Reading that flag is a host sync, which fp16's scaler makes every step anyway."""
        if self.guard.scaler_owns_skips and self.accelerator.optimizer_step_was_skipped:
            self.skipped_steps += 1
        elif self.scheduler is not None:
            self.scheduler.step()

    def check_health(self) -> None:
        """One host read and one tiny all-reduce: every rank stops at the same step on a stop signal,
        and on a non-finite loss or gradient (whose update the guard has kept out of the weights)."""
        stop, bad_losses, bad_grads = dist_sum(self.accelerator, self.stop.signal is not None, *self.guard.flags())
        if bad_losses or bad_grads:
            loss_step, loss_value, grad_step = self.guard.read()
            agree(self.accelerator, lambda: self.nonfinite(loss_step, loss_value, grad_step if not bad_losses else -1))
        if stop:
            path = self.save_checkpoint()
            why = self.stop.signal.name if self.stop.signal else "a stop signal on another rank"
            raise Preempted(f"stopped by {why} at step {self.position.global_step}; checkpoint {path} saved; "
                            "run the same command again to resume")

    def after_step(self) -> None:
        if not self.accelerator.sync_gradients:
            return  # an accumulation step: nothing is logged, checked or saved between updates
        step, mid_epoch = self.position.global_step, self.position.step_in_epoch < len(self.loader)
        log = step % self.cfg.train.log_every == 0
        save = bool(self.cfg.checkpoint.every_steps) and step % self.cfg.checkpoint.every_steps == 0 and mid_epoch
        evaluate = bool(self.cfg.train.eval_every) and step % self.cfg.train.eval_every == 0 and mid_epoch
        if step % CHECK_EVERY == 0 or log or save or evaluate:  # nothing is logged, saved or evaluated unchecked
            self.check_health()
        if log:
            self.log_progress()
        if save:
            self.save_checkpoint()
        if evaluate:
            self.evaluate(self.position.epoch + self.position.step_in_epoch / len(self.loader))

    def end_epoch(self) -> None:
        self.check_health()
        self.clock.stop()
        self.epoch_clock.stop()
        if self.position.step_in_epoch < len(self.loader):  # stopped early, mid-epoch: keep where it stopped
            self.save_checkpoint()
            return
        correct, seen = dist_sum(self.accelerator, int(self.running_correct), self.running_seen)
        epoch = self.position.epoch
        result = self.evaluate(epoch + 1, last=epoch + 1 == self.cfg.train.epochs)
        self.log.log({"train/epoch_samples_per_s": self.throughput(),
                      "train/running_accuracy": 100.0 * correct / max(seen, 1)}, self.position.global_step)
        self.say(f"epoch {epoch + 1}/{self.cfg.train.epochs}: {self.eval_name} {result.correct} / {result.seen} "
                 f"({result.percent:.2f}%), {self.throughput():.0f} samples/s, {self.epoch_clock.seconds:.1f} s")
        self.position.epoch, self.position.step_in_epoch = epoch + 1, 0
        self.save_checkpoint()

    # --- what a step may trigger --------------------------------------------------------------

    def throughput(self) -> float:
        """Training samples/s over this epoch so far (all ranks)."""
        steps = self.position.step_in_epoch - self.epoch_first_step
        with self.epoch_clock.paused():
            return steps * self.samples_per_step / max(self.epoch_clock.seconds, 1e-9)

    def log_progress(self) -> None:
        mean_loss, throughput = dist_mean(self.accelerator, self.loss), self.throughput()
        epoch = self.position.epoch + 1
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{throughput:.0f}")
        if not sys.stderr.isatty():
            self.say(f"epoch {epoch}/{self.cfg.train.epochs} step {self.position.global_step}: loss {mean_loss:.4f}, "
                     f"{throughput:.0f} samples/s")
        self.log.log({"train/loss": mean_loss, "train/lr": self.optimizer.param_groups[0]["lr"],
                      "train/samples_per_s": throughput, "train/seconds": self.clock.now(), "epoch": epoch},
                     self.position.global_step)

    @property
    def eval_name(self) -> str:
        """What training is evaluated on: the validation holdout when there is one, else test (the seed's way)."""
        return "val" if self.val_set is not None else "test"

    def evaluate(self, epoch_progress: float, last: bool = False) -> Evaluation:
        """An exact evaluation during training, recorded against the training time so far (evaluation
        not counted). The last test evaluation also keeps the most confident mistakes."""
        split = self.val_set if self.val_set is not None else self.test_set
        evaluation = self.count(split, mistakes=last and self.val_set is None)
        name = self.eval_name
        self.position.history.append({"epoch": round(epoch_progress, 3), "step": self.position.global_step,
                                      f"{name}_accuracy": evaluation.percent, "train_seconds": self.clock.seconds})
        self.log.log({f"{name}/accuracy": evaluation.percent, f"{name}/correct": evaluation.correct,
                      f"{name}/seen": evaluation.seen, "epoch": epoch_progress}, self.position.global_step)
        if name == "test":
            self.last_test = evaluation
        else:
            self.after_validation()
        return evaluation

    def count(self, split: Split, mistakes: bool = False) -> Evaluation:
        start = time.perf_counter()
        with self.clock.paused(), self.epoch_clock.paused():
            if not mistakes:
                evaluation = exact_accuracy(self.accelerator, self.model, split, self.cfg.train.eval_batch_size)
            else:
                evaluation, self.mistakes = evaluate_with_mistakes(self.accelerator, self.model, split,
                                                                   self.cfg.train.eval_batch_size, MISTAKES)
        self.eval_seconds += time.perf_counter() - start
        return evaluation

    def best_validation(self) -> tuple[float, int] | None:
        """(accuracy, step) of the best validation so far (the earliest of equals); from the history a
        checkpoint carries, so a resumed run knows it too."""
        scores = [(h["val_accuracy"], -h["step"]) for h in self.position.history if "val_accuracy" in h]
        return (max(scores)[0], -max(scores)[1]) if scores else None

    def patience_exhausted(self) -> bool:
        patience, best = self.cfg.train.early_stop_patience, self.best_validation()
        if patience is None or best is None:
            return False
        return sum(1 for h in self.position.history if "val_accuracy" in h and h["step"] > best[1]) >= patience

    def after_validation(self) -> None:
        """Keep the best model (checkpoint.keep_best) and stop when patience is exhausted."""
        accuracy, step = self.best_validation()
        if self.cfg.checkpoint.keep_best and step == self.position.global_step:
            state = self.accelerator.get_state_dict(self.model)
            agree(self.accelerator, lambda: save_model_folder(state, self.cfg.to_dict(), self.folder.best),
                  here=self.accelerator.is_main_process)
            self.say(f"best validation accuracy so far: {accuracy:.2f}% at step {step}; model saved in {self.folder.best}")
        self.stopping = self.patience_exhausted()

    def save_checkpoint(self):
        with self.clock.paused(), self.epoch_clock.paused():
            start = time.perf_counter()
            self.position.train_seconds = self.clock.seconds
            path = checkpoint.save(self.accelerator, self.folder, self.position,
                                   {"config": self.cfg.to_dict(), "wandb_run_id": self.log.wandb_id},
                                   keep=self.cfg.checkpoint.keep, needed_bytes=self.checkpoint_bytes + 2**20,
                                   tensors=list(self.accelerator.unwrap_model(self.model).state_dict()))
            self.say(f"checkpoint {path} ({time.perf_counter() - start:.2f} s)")
        return path

    def nonfinite(self, loss_step: int, loss_value: float, grad_step: int) -> None:
        """Raised by each rank whose loss was not finite (or by every rank, for gradients that became
        non-finite with finite losses), after saving the weights from before that step and the batch."""
        step = loss_step if loss_step >= 0 else grad_step
        if step < 0 or (loss_step < 0 and not self.accelerator.is_main_process):
            return  # another rank had it, or (gradients: the same on every rank) the main process reports it
        entry = self.guard.entry_at(step)
        in_epoch, batch = entry if entry else (None, None)
        debug = self.folder.debug
        debug.mkdir(parents=True, exist_ok=True)
        torch.save({"model": self.accelerator.unwrap_model(self.model).state_dict(), "loss": loss_value,
                    "images": batch[0].cpu() if batch else None, "labels": batch[1].cpu() if batch else None,
                    "global_step": step, "epoch": self.position.epoch + 1, "batch": in_epoch},
                   self.folder.debug_file(step, self.accelerator.process_index))
        what = f"the training loss became {loss_value}" if loss_step >= 0 else "the gradients became non-finite"
        raise DistrnnError(f"{what} at step {step} (epoch {self.position.epoch + 1}, batch {in_epoch}); model and "
                           f"batch saved in {debug}; lower --lr or set optim.grad_clip")

    # --- the end ------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        if self.last_test is None:  # with a holdout (or a finished run resumed): test once, at the end
            self.last_test = self.count(self.test_set, mistakes=True)
            self.log.log({"test/accuracy": self.last_test.percent, "test/correct": self.last_test.correct,
                          "test/seen": self.last_test.seen}, self.position.global_step)
        test = self.last_test
        train_acc = None
        if self.cfg.train.eval_train_set:
            train_acc = self.count(self.train_split.to(self.accelerator.device))
            self.say("Accuracy on training data:")
            self.say(train_acc.report())
        self.say("Accuracy on test data:")
        self.say(test.report())
        summary = self.summary(train_acc, test)
        self.log.log({**({"train/accuracy": train_acc.percent} if train_acc is not None else {}),
                      "final/test_accuracy": test.percent}, self.position.global_step)
        self.log.summary(summary)
        state = self.accelerator.get_state_dict(self.model)
        pictures = [(self.test_set.images[m.index].cpu().numpy(), m) for m in self.mistakes]

        def write() -> None:
            save_model(state, self.cfg.to_dict(), self.folder)
            figures.write_results(self.folder, test, pictures)
            self.log.results(test, pictures, self.folder, self.position.global_step)
            self.folder.summary.write_text(json.dumps({**summary, "history": self.position.history}, indent=2) + "\n")

        agree(self.accelerator, write, here=self.accelerator.is_main_process)
        return summary

    def summary(self, train_acc: Evaluation | None, test: Evaluation) -> dict[str, Any]:
        """train_* are null when train.eval_train_set is off."""
        seconds = self.clock.seconds
        train = (train_acc.percent, train_acc.correct, train_acc.seen) if train_acc is not None else (None,) * 3
        return {
            **dict(zip(("train_accuracy", "train_correct", "train_seen"), train)),
            "test_accuracy": test.percent, "test_correct": test.correct, "test_seen": test.seen,
            "train_seconds": seconds, "eval_seconds": self.eval_seconds,
            "samples_per_s": self.position.global_step * self.global_batch / max(seconds, 1e-9),
            "global_batch": self.global_batch,
            "steps": self.position.global_step, "num_processes": self.accelerator.num_processes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this (main) process
            "peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2**20
                            if self.accelerator.device.type == "cuda" else None),
            "grad_scaler_skipped_steps": self.skipped_steps if self.guard.scaler_owns_skips else None,
            "scheduler_steps": self.scheduler.scheduler.last_epoch if self.scheduler is not None else None,
            "test_per_class": test.per_class(), "test_confusion": [list(row) for row in test.confusion],
            **self.validation_summary(),
        }

    def validation_summary(self) -> dict[str, Any]:
        best = self.best_validation()
        return {"best_val_accuracy": best[0] if best else None, "best_val_step": best[1] if best else None,
                "early_stopped": self.stopped_early(),
                "best_model": str(self.folder.best) if best and self.cfg.checkpoint.keep_best else None}

    def close(self) -> None:
        self.log.close()
