"""The training loop of one worker process.

`build_trainer` decides where the run starts (run/resume.py) and so the final config; `Trainer.__init__`
builds every component from that config and creates all the state a step touches; `Trainer.fit` is the
loop, and reads like the seed notebook's: for each epoch, for each batch, step; then evaluate. Everything a
step may trigger (a log line, a checkpoint, a mid-epoch evaluation, a stop) is decided in `after_step`. The
components own their state: `Checkpointer` (run/checkpoint.py), `Evaluator` (evaluation/evaluator.py),
`Progress` (progress.py), `RunLog` (the trackers, tracking.py) and `NonFiniteGuard` (nonfinite.py).
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from distrnn.config.schema import Config
from distrnn.data import loaders
from distrnn.evaluation import figures
from distrnn.evaluation.evaluator import (
    Evaluator,
    best_validation,
    logged_accuracy,
    patience_exhausted,
    summary_counts,
    validation_summary,
)
from distrnn.model import StackedRNN, count_parameters
from distrnn.ranks.collectives import agree, dist_sum, main_print
from distrnn.ranks.devices import PrecisionChoice, choose_precision
from distrnn.ranks.preemption import StoppedOnRequest, StopRequest
from distrnn.run.checkpoint import Checkpointer, OnSaved, estimated_bytes
from distrnn.run.folder import RunFolder
from distrnn.run.hold import FolderHold
from distrnn.run.model_files import save_model
from distrnn.run.resume import ResumePoint, decide_resume
from distrnn.testing import faults
from distrnn.worker.nonfinite import CHECK_EVERY, NonFiniteGuard, ScalerSkips, raise_nonfinite
from distrnn.worker.profiling import StepProfile
from distrnn.worker.progress import Progress
from distrnn.worker.tracking import RunLog


def onecycle(accelerator: Accelerator, optimizer, cfg: Config, steps_per_epoch: int):
    """optim.schedule=onecycle's scheduler (prepared), or None for a constant learning rate."""
    if cfg.optim.schedule != "onecycle":
        return None
    return accelerator.prepare(torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=cfg.optim.lr, total_steps=cfg.train.epochs * steps_per_epoch, pct_start=cfg.optim.pct_start))


def start_lines(cfg: Config, accelerator: Accelerator, precision: PrecisionChoice, folder: RunFolder,
                parameters: int) -> str:
    """What a run prints first: processes, device, precision (and why), the global batch, the resolved config."""
    processes, per_process, accumulation = accelerator.num_processes, cfg.train.batch_size, cfg.train.grad_accum_steps
    threads = f" ({torch.get_num_threads()} threads each)" if accelerator.device.type == "cpu" else ""
    return (f"distrnn: {processes} process(es) on {accelerator.device}{threads}, precision {precision.describe()}, "
            f"global batch {per_process * processes * accumulation} ({per_process} per process x {processes} x "
            f"{accumulation} accumulation), run folder {folder.root}\n--- resolved config ---\n{cfg.to_yaml()}"
            f"-----------------------\nmodel: {parameters:,} parameters")


def build_trainer(cfg: Config, accelerator: Accelerator, stop_request: StopRequest, hold: FolderHold | None = None,
                  on_checkpoint: OnSaved | None = None) -> Trainer:
    """A start, in order: the data (a missing or damaged data set stops the run before anything is written),
    then where the run starts and the config that implies (the main process decides once, holding the run
    folder), then the Trainer, every component of which is built from that final config. `hold`: the run
    folder's (its owner releases it; by default the Trainer's, released by Trainer.close)."""
    hold = hold or FolderHold(RunFolder(cfg.train.output_dir).hold)
    data = loaders.load_run_data(accelerator, cfg)  # reads data.* and train.seed, which a resume never changes
    model = StackedRNN(cfg.model)
    faults.flatten_like_cudnn(model.rnn)
    faults.run_rnn_as_on_a_gpu()
    checkpoint_bytes = estimated_bytes(count_parameters(model), accelerator.num_processes)
    start = decide_resume(accelerator, cfg, RunFolder(cfg.train.output_dir), hold,
                          needed_bytes=(cfg.checkpoint.keep + 2) * checkpoint_bytes + 2**20)
    return Trainer(start, accelerator, data, model, checkpoint_bytes, stop_request, hold, on_checkpoint)


class Trainer:
    def __init__(self, start: ResumePoint, accelerator: Accelerator, data: loaders.RunData, model: StackedRNN,
                 checkpoint_bytes: int, stop_request: StopRequest, hold: FolderHold, on_checkpoint: OnSaved | None):
        """Built from `start.cfg`, final: the run's config in the layout its resume implies (build_trainer).
        `hold`: the run folder's, taken by decide_resume; its owner releases it. `on_checkpoint(path, step)`."""
        cfg = self.cfg = start.cfg
        self.accelerator, self.data, self.stop_request, self.hold = accelerator, data, stop_request, hold
        self.folder = RunFolder(cfg.train.output_dir)
        self.say = main_print(accelerator)
        self.checkpointer = Checkpointer(accelerator, start, self.folder, checkpoint_bytes, hold, on_checkpoint)
        accelerator.gradient_accumulation_steps = cfg.train.grad_accum_steps  # what accumulate() counts to
        self.global_batch = cfg.train.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps
        self.precision = choose_precision(cfg.train.precision, on_cpu=accelerator.device.type == "cpu")  # as made
        self.say(start_lines(cfg, accelerator, self.precision, self.folder, count_parameters(model)))
        faults.announce(accelerator.process_index)
        # Each start-up step that one rank alone can fail runs under agree: the others stop at once with it,
        # instead of waiting in the next collective (DDP's constructor: 30-300 s on NCCL).
        self.trackers = agree(accelerator, lambda: self._start_locally(start.meta, model))
        # Fused: one kernel for the whole update, and it can skip a step on the device (see nonfinite.py).
        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr, fused=True)
        self.guard = NonFiniteGuard(optimizer, accelerator.device, scaler_owns_skips=accelerator.scaler is not None)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.loader = loaders.make_train_loader(accelerator, cfg, data)
        self.steps_per_epoch = -(-len(self.loader) // cfg.train.grad_accum_steps)  # a partial last group counts
        self.scheduler = onecycle(accelerator, self.optimizer, cfg, self.steps_per_epoch)
        self.position = self.checkpointer.restore(start, self.optimizer, self.scheduler is None, len(self.loader))
        self.scaler_skips = ScalerSkips(accelerator.scaler)  # after restore: it starts from the restored scale
        self.progress = Progress(accelerator, cfg.train.batch_size * accelerator.num_processes,
                                 self.position.train_seconds)
        self.progress.timing.attach(self.model)  # times DDP's gradient all-reduce
        self.profile = StepProfile(cfg.train.profile_steps, self.folder.profile, accelerator.process_index,
                                   accelerator.device)
        self.profile.at(self.position.global_step)
        self.evaluator = Evaluator(accelerator, self.model, cfg.train.eval_batch_size, data.val, data.test,
                                   self.progress)
        self.early_stopped = patience_exhausted(self.position.history, cfg.train.early_stop_patience)  # stays so
        self.bar: tqdm | None = None  # the epoch's progress bar (a terminal only)
        self.loss = torch.zeros((), device=accelerator.device)  # this rank's last training loss

    def _start_locally(self, meta, model: StackedRNN) -> RunLog:
        """The trackers, and the part of accelerator.prepare that one rank can fail (out of memory) before DDP's
        collective."""
        rank = self.accelerator.process_index
        faults.fail_startup("trackers", rank)
        log = RunLog(self.accelerator, self.folder, self.cfg.wandb, self.cfg.to_dict(), resumed=meta is not None,
                     resumed_id=meta.get("wandb_run_id") if meta else None, tensorboard=self.cfg.tensorboard.enabled)
        faults.fail_startup("prepare", rank)
        model.to(self.accelerator.device)
        return log

    # --- the loop -----------------------------------------------------------------------------

    def fit(self) -> dict[str, Any]:
        while self.position.epoch < self.cfg.train.epochs and not self.early_stopped:
            self.model.train()
            self.progress.start_epoch(self.position.step_in_epoch)
            for images, labels in self.epoch_batches():
                self.train_step(images, labels)
                self.after_step()
                if self.early_stopped:  # no better validation accuracy for a while
                    break
            self.end_epoch()
        if self.early_stopped and self.position.epoch < self.cfg.train.epochs:
            accuracy, step = best_validation(self.position.history)
            self.say(f"early stop at step {self.position.global_step}: no better validation accuracy in "
                     f"{self.cfg.train.early_stop_patience} evaluations (best {accuracy:.2f}% at step {step})")
        return self.finish()

    def epoch_batches(self):
        """This rank's batches of the epoch in progress, from the next unseen one (with its progress bar)."""
        epoch, skip = self.position.epoch, self.position.step_in_epoch
        self.bar = self.progress.bar(loaders.epoch_batches(self.accelerator, self.loader, epoch, skip), epoch,
                                     self.cfg.train.epochs, skip, len(self.loader))
        return self.bar

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """Forward, backward, and (every grad_accum_steps batches) an update, with no host sync. Between
        updates accumulate() skips DDP's gradient all-reduce (no_sync) and the optimizer's step and zero_grad."""
        p, acc, timing = self.position, self.accelerator, self.progress.timing
        timing.mark("data")  # since the last step: waiting for this batch
        with acc.accumulate(self.model):
            logits = self.model(images)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.optim.label_smoothing)
            self.progress.count(logits, labels)
            faults.slow_down(acc.process_index)
            acc.backward(self.guard.loss_for_backward(loss, p.global_step, p.step_in_epoch, (images, labels)))
            timing.mark("compute")  # forward and backward (the gradient all-reduce is moved out by its hook)
            if acc.sync_gradients:  # clip; the guard sees the (all-reduced) gradients before they are applied
                self.guard.clip_and_check(acc, self.model, self.cfg.optim.grad_clip, p.global_step)
            self.optimizer.step()
            if acc.sync_gradients:
                self.step_scheduler()
                faults.update_applied(p.epoch, p.global_step + 1, self.stop_request)  # sample-ledger, stop-at
            self.optimizer.zero_grad(set_to_none=True)
            timing.mark("optimizer")
        p.step_in_epoch += 1
        p.global_step += int(acc.sync_gradients)
        if acc.sync_gradients:
            timing.count_update()
        self.loss = loss.detach()

    def step_scheduler(self) -> None:
        """The schedule advances only with the weights: not on an update the fp16 grad scaler skipped (an
        overflow; one host read per update under fp16, see ScalerSkips)."""
        if self.scaler_skips.last_update_skipped():
            self.position.skipped_updates += 1
        elif self.scheduler is not None:
            self.scheduler.step()

    def after_step(self) -> None:
        if not self.accelerator.sync_gradients:
            return  # an accumulation step: nothing is logged, checked or saved between updates
        self.profile.at(self.position.global_step)
        step, mid_epoch = self.position.global_step, self.position.step_in_epoch < len(self.loader)
        log = step % self.cfg.train.log_every == 0
        save = self.checkpointer.due(step) and mid_epoch
        evaluate = bool(self.cfg.train.eval_every) and step % self.cfg.train.eval_every == 0 and mid_epoch
        if step % CHECK_EVERY == 0 or log or save or evaluate:  # nothing is logged, saved or evaluated unchecked
            self.stop_if_requested_or_nonfinite()
        if log:
            self.log_progress()
        if save:
            self.save_checkpoint()
        if evaluate:
            self.evaluate_and_record(self.position.epoch + self.position.step_in_epoch / len(self.loader))
        self.progress.timing.restart()  # checks, logs, saves and evaluations are not waiting for data

    def stop_if_requested_or_nonfinite(self) -> None:
        """Collective (one host read, one tiny all-reduce): every rank stops at the same step on a stop request
        (after saving a checkpoint), a hold another run took (saving nothing), a non-finite loss or gradient."""
        stop, lost, bad_losses, bad_grads = dist_sum(self.accelerator, self.stop_request.signal is not None,
                                                     self.hold.lost is not None, *self.guard.flags())
        self.hold.stop_if_lost(lost, self.position.global_step)
        if bad_losses or bad_grads:
            loss_step, loss_value, grad_step = self.guard.read()
            agree(self.accelerator, lambda: raise_nonfinite(self.accelerator, self.model, self.guard, self.folder,
                                                            self.position.epoch, loss_step, loss_value,
                                                            grad_step if not bad_losses else -1))
        if stop:
            path = self.save_checkpoint()
            why = self.stop_request.signal.name if self.stop_request.signal else "a stop signal on another rank"
            raise StoppedOnRequest(f"stopped by {why} at step {self.position.global_step}; checkpoint {path} saved; "
                                   "run the same command again to resume")

    def end_epoch(self) -> None:
        self.stop_if_requested_or_nonfinite()
        self.progress.stop_epoch()
        if self.position.step_in_epoch < len(self.loader):  # stopped early, mid-epoch: keep where it stopped
            self.save_checkpoint()
            return
        running_accuracy, epoch = self.progress.epoch_accuracy(), self.position.epoch
        result = self.evaluate_and_record(epoch + 1, last=epoch + 1 == self.cfg.train.epochs)
        throughput = self.progress.throughput(self.position.step_in_epoch)
        self.trackers.log({"train/epoch_samples_per_s": throughput, "train/running_accuracy": running_accuracy},
                     self.position.global_step)
        self.say(f"epoch {epoch + 1}/{self.cfg.train.epochs}: {self.evaluator.name} {result.correct} / {result.seen} "
                 f"({result.percent:.2f}%), {throughput:.0f} samples/s, {self.progress.epoch_clock.seconds:.1f} s")
        self.position.epoch, self.position.step_in_epoch = epoch + 1, 0
        self.save_checkpoint()

    # --- what a step may trigger --------------------------------------------------------------

    def log_progress(self) -> None:
        epoch, step = self.position.epoch + 1, self.position.global_step
        logged = self.progress.interval(self.loss, self.position.step_in_epoch, self.say)  # collective
        loss, throughput = logged["train/loss"], logged["train/samples_per_s"]
        self.bar.set_postfix(loss=f"{loss:.4f}", samples_s=f"{throughput:.0f}")
        if not sys.stderr.isatty():
            self.say(f"epoch {epoch}/{self.cfg.train.epochs} step {step}: loss {loss:.4f}, {throughput:.0f} samples/s")
        self.trackers.log({**logged, "train/lr": self.optimizer.param_groups[0]["lr"], "epoch": epoch}, step)

    def evaluate_and_record(self, epoch_progress: float, last: bool = False):
        """An exact evaluation during training, recorded against the training time so far (evaluation
        not counted). Validation keeps the best model and decides early stopping."""
        evaluation, name = self.evaluator.during_training(last), self.evaluator.name
        self.position.history.append({"epoch": round(epoch_progress, 3), "step": self.position.global_step,
                                      f"{name}_accuracy": evaluation.percent,
                                      "train_seconds": self.progress.train_seconds})
        self.trackers.log({**logged_accuracy(name, evaluation), "epoch": epoch_progress}, self.position.global_step)
        if name == "val":
            accuracy, step = best_validation(self.position.history)
            if self.cfg.checkpoint.keep_best and step == self.position.global_step:
                self.checkpointer.save_best(self.model, accuracy, step)
            self.early_stopped = patience_exhausted(self.position.history, self.cfg.train.early_stop_patience)
        return evaluation

    def save_checkpoint(self):
        with self.progress.paused():
            self.position.train_seconds = self.progress.train_seconds
            return self.checkpointer.save(self.position, self.model, self.trackers.wandb_id)

    # --- the end ------------------------------------------------------------------------------

    def finish(self) -> dict[str, Any]:
        made_now = self.evaluator.last_test is None  # with a holdout (or a finished run resumed): test once, now
        test = self.evaluator.final_test()
        if made_now:
            self.trackers.log(logged_accuracy("test", test), self.position.global_step)
        train_acc = self.evaluator.training_set(self.data.train) if self.cfg.train.eval_train_set else None
        if train_acc is not None:
            self.say("Accuracy on training data:")
            self.say(train_acc.report())
        self.say("Accuracy on test data:")
        self.say(test.report())
        results = self.summary_json(train_acc, test)
        self.trackers.log({**({"train/accuracy": train_acc.percent} if train_acc is not None else {}),
                      "final/test_accuracy": test.percent}, self.position.global_step)
        self.trackers.summary(results)
        state, pictures = self.accelerator.get_state_dict(self.model), self.evaluator.mistake_pictures()

        def write() -> None:
            save_model(state, self.cfg.to_dict(), self.folder)
            figures.write_results(self.folder, test, pictures)
            self.trackers.results(test, pictures, self.folder, self.position.global_step)
            self.folder.summary.write_text(json.dumps({**results, "history": self.position.history}, indent=2) + "\n")

        agree(self.accelerator, write, here=self.accelerator.is_main_process)
        return results

    def summary_json(self, train_acc, test) -> dict[str, Any]:
        """summary.json (collective: every rank's figures are gathered for "ranks")."""
        seconds, best = self.progress.train_seconds, self.folder.best if self.cfg.checkpoint.keep_best else None
        ended_early = self.early_stopped and self.position.epoch < self.cfg.train.epochs
        return {
            **summary_counts(train_acc, test), "train_seconds": seconds, "eval_seconds": self.evaluator.seconds,
            "samples_per_s": self.position.global_step * self.global_batch / max(seconds, 1e-9),
            "global_batch": self.global_batch, "steps": self.position.global_step,
            "precision": self.precision.to_dict(), "faults": faults.injected(),
            "num_processes": self.accelerator.num_processes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this (main) process
            "peak_gpu_mb": (torch.cuda.max_memory_allocated() / 2**20 if self.accelerator.device.type == "cuda"
                            else None),
            "grad_scaler_skipped_steps": self.position.skipped_updates if self.guard.scaler_owns_skips else None,
            "scheduler_steps": self.scheduler.state_dict()["last_epoch"] if self.scheduler is not None else None,
            **validation_summary(self.position.history, ended_early, best),
            "ranks": self.progress.timing.per_rank(self.global_batch // self.accelerator.num_processes),
        }

    def close(self) -> None:
        self.trackers.close()
        self.hold.release()
