"""The training worker: one process of a run, started by `accelerate launch -m distrnn.train`.

Reads top to bottom: config -> accelerator -> resume point -> data -> model -> loop -> exact accuracy.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch
import torch.nn.functional as F
from tqdm import tqdm

from distrnn import checkpoint, data, run_folder
from distrnn.checkpoint import Position
from distrnn.config import Config, load_config
from distrnn.distributed import (dist_mean, dist_sum, main_print, main_then_agree, make_accelerator, peer_failure,
                                 teardown)
from distrnn.errors import DistrnnError, run_cli
from distrnn.evaluate import MODEL_FILE, Accuracy, exact_accuracy, save_model
from distrnn.model import StackedRNN, count_parameters
from distrnn.options import config_options, overrides_from
from distrnn.preemption import Preempted, StopFlag
from distrnn.tracking import RunLog



def nonfinite_loss(accelerator, run_dir: Path, position: Position, model, loss, images, labels) -> DistrnnError:
    """Every rank whose loss is not finite saves what helps to debug it; all ranks then stop together."""
    debug_dir = run_dir / "debug"
    loss = loss.detach()
    if not torch.isfinite(loss):
        debug_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"model": accelerator.unwrap_model(model).state_dict(), "images": images.cpu(),
                    "labels": labels.cpu(), "loss": float(loss), "global_step": position.global_step,
                    "epoch": position.epoch + 1, "batch": position.step_in_epoch},
                   debug_dir / f"nonfinite-step-{position.global_step}-rank-{accelerator.process_index}.pt")
    value = float(loss) if not torch.isfinite(loss) else "non-finite on another rank"
    return DistrnnError(f"the training loss became {value} at step {position.global_step} "
                        f"(epoch {position.epoch + 1}, batch {position.step_in_epoch}); "
                        f"model and batch saved in {debug_dir}; lower --lr or set optim.grad_clip")


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    if cfg.optim.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=cfg.optim.lr, total_steps=cfg.train.epochs * steps_per_epoch, pct_start=cfg.optim.pct_start
        )
    return None


def train(cfg: Config) -> dict[str, Any]:
    stop = StopFlag()  # first, so a signal during start-up is not lost
    run_dir = Path(cfg.train.output_dir)
    accelerator = run_log = None
    try:
        accelerator = make_accelerator(cfg, str(run_dir), log_with="wandb" if cfg.wandb.enabled else None)
        say = main_print(accelerator)
        say(f"distrnn: {accelerator.num_processes} process(es) on {accelerator.device}, "
            f"precision {cfg.train.precision}, run folder {run_dir}\n--- resolved config ---\n"
            f"{cfg.to_yaml()}-----------------------")
        # Data first: a missing or damaged data set stops the run before anything is written.
        train_set = data.load_mnist(cfg.data.dir, True, accelerator)
        test_set = data.Split.of(data.load_mnist(cfg.data.dir, False, accelerator), cfg.data.test_samples)
        test_set = test_set.to(accelerator.device)

        resume_from, warnings = checkpoint.find_resume(run_dir, cfg.checkpoint.resume)
        meta = checkpoint.read_meta(resume_from) if resume_from else None
        if meta:
            checkpoint.check_compatible(meta, cfg, accelerator.num_processes, resume_from)
        model = StackedRNN(cfg.model)
        say(f"model: {count_parameters(model):,} parameters")
        checkpoint_size = run_folder.checkpoint_bytes(count_parameters(model), accelerator.num_processes)
        main_then_agree(accelerator, lambda: (
            run_folder.check_finished_run(run_dir, cfg),
            run_folder.prepare(run_dir, cfg, needed_bytes=(cfg.checkpoint.keep + 2) * checkpoint_size + 2**20)))
        for warning in warnings:
            say(f"warning: {warning}")
        run_log = RunLog(accelerator, cfg, run_dir, resumed_id=meta.get("wandb_run_id") if meta else None)

        optimizer = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
        model, optimizer = accelerator.prepare(model, optimizer)
        loader = data.train_loader(cfg, train_set, accelerator)
        scheduler = make_scheduler(cfg, optimizer, len(loader))
        if scheduler is not None:
            scheduler = accelerator.prepare(scheduler)

        position = Position()
        if meta:
            accelerator.load_state(str(resume_from))
            position = Position(**meta["position"])
            say(f"resumed from {resume_from}: epoch {position.epoch + 1}, "
                f"batch {position.step_in_epoch} of {len(loader)}, step {position.global_step}")

        def save() -> Path:
            start = time.perf_counter()
            path = checkpoint.save(accelerator, run_dir, position, cfg, {"wandb_run_id": run_log.wandb_id},
                                   needed_bytes=checkpoint_size + 2**20)
            say(f"checkpoint {path} ({time.perf_counter() - start:.2f} s)")
            return path

        def test_now(epoch_progress: float) -> Accuracy:
            """Exact test accuracy, recorded against the training time so far (evaluation not counted)."""
            accuracy = exact_accuracy(accelerator, model, test_set, cfg.train.eval_batch_size)
            position.history.append({"epoch": round(epoch_progress, 3), "step": position.global_step,
                                     "test_accuracy": accuracy.percent, "train_seconds": position.train_seconds})
            run_log.log({"test/accuracy": accuracy.percent, "test/correct": accuracy.correct,
                         "test/seen": accuracy.seen, "epoch": epoch_progress}, position.global_step)
            model.train()
            return accuracy

        samples_per_step = cfg.train.batch_size * accelerator.num_processes
        main, interactive = accelerator.is_main_process, sys.stderr.isatty()
        test = None
        while position.epoch < cfg.train.epochs:
            epoch = position.epoch
            model.train()
            # Mid-epoch resume: the same shuffled order (a function of seed and epoch), from the next unseen batch.
            batches = data.epoch_batches(accelerator, loader, epoch, position.step_in_epoch)
            # A live bar in a terminal; in a log file (SLURM, CI) a plain line every log_every steps instead.
            with tqdm(batches, desc=f"epoch {epoch + 1}/{cfg.train.epochs}", disable=not (main and interactive),
                           initial=position.step_in_epoch, total=len(loader), dynamic_ncols=True, leave=False) as bar:
                start, first_step, epoch_seconds = time.perf_counter(), position.step_in_epoch, 0.0
                # Accuracy on the training batches as they are trained (no extra pass; kept on the device).
                running_correct, running_seen = torch.zeros((), dtype=torch.int64, device=accelerator.device), 0
                for images, labels in bar:
                    logits = model(images)
                    loss = F.cross_entropy(logits, labels)
                    running_correct += (logits.argmax(dim=1) == labels).sum()
                    running_seen += labels.numel()
                    # One tiny all-reduce a step, before the update, so that every rank agrees to stop at the
                    # same step (a signal) or not to apply a non-finite loss (the model stays debuggable).
                    stop_requested, nonfinite = dist_sum(accelerator, stop.signal is not None, not torch.isfinite(loss))
                    if nonfinite:
                        raise nonfinite_loss(accelerator, run_dir, position, model, loss, images, labels)
                    if stop_requested:
                        position.train_seconds += time.perf_counter() - start
                        path = save()
                        why = stop.signal.name if stop.signal else "a stop signal on another rank"
                        raise Preempted(f"stopped by {why} at step {position.global_step}; checkpoint {path} saved; "
                                        "run the same command again to resume")
                    optimizer.zero_grad(set_to_none=True)
                    accelerator.backward(loss)
                    if cfg.optim.grad_clip is not None:
                        accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
                    optimizer.step()
                    if scheduler is not None:
                        scheduler.step()
                    position.step_in_epoch += 1
                    position.global_step += 1
                    if position.global_step % cfg.train.log_every == 0:
                        elapsed = epoch_seconds + time.perf_counter() - start
                        throughput = (position.step_in_epoch - first_step) * samples_per_step / elapsed
                        mean_loss = dist_mean(accelerator, loss)
                        bar.set_postfix(loss=f"{mean_loss:.4f}", samples_s=f"{throughput:.0f}")
                        if main and not interactive:
                            print(f"epoch {epoch + 1}/{cfg.train.epochs} step {position.global_step}: "
                                  f"loss {mean_loss:.4f}, {throughput:.0f} samples/s", flush=True)
                        run_log.log({"train/loss": mean_loss, "train/lr": optimizer.param_groups[0]["lr"],
                                     "train/samples_per_s": throughput, "epoch": epoch + 1}, position.global_step)
                    every = cfg.checkpoint.every_steps
                    if every and position.global_step % every == 0 and position.step_in_epoch < len(loader):
                        save()
                    test_every = cfg.train.eval_every
                    if test_every and position.global_step % test_every == 0 and position.step_in_epoch < len(loader):
                        now = time.perf_counter()
                        epoch_seconds += now - start
                        position.train_seconds += now - start
                        test_now(epoch + position.step_in_epoch / len(loader))
                        start = time.perf_counter()
            epoch_seconds += time.perf_counter() - start
            position.train_seconds += time.perf_counter() - start
            throughput = (position.step_in_epoch - first_step) * samples_per_step / epoch_seconds
            correct, seen = dist_sum(accelerator, int(running_correct), running_seen)
            test = test_now(epoch + 1)
            run_log.log({"train/epoch_samples_per_s": throughput, "train/running_accuracy": 100.0 * correct / max(seen, 1)},
                        position.global_step)
            say(f"epoch {epoch + 1}/{cfg.train.epochs}: test {test.correct} / {test.seen} "
                              f"({test.percent:.2f}%), {throughput:.0f} samples/s, {epoch_seconds:.1f} s")
            position.epoch, position.step_in_epoch = epoch + 1, 0
            save()

        if test is None:  # resumed from a finished run: nothing left to train
            test = exact_accuracy(accelerator, model, test_set, cfg.train.eval_batch_size)
        train_split = data.Split.of(train_set, cfg.data.train_samples).to(accelerator.device)
        train_acc = exact_accuracy(accelerator, model, train_split, cfg.train.eval_batch_size)
        say("Accuracy on training data:")
        say(train_acc.report())
        say("Accuracy on test data:")
        say(test.report())

        summary = {
            "train_accuracy": train_acc.percent, "train_correct": train_acc.correct, "train_seen": train_acc.seen,
            "test_accuracy": test.percent, "test_correct": test.correct, "test_seen": test.seen,
            "train_seconds": position.train_seconds,
            "samples_per_s": position.global_step * samples_per_step / max(position.train_seconds, 1e-9),
            "steps": position.global_step, "num_processes": accelerator.num_processes,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # this (main) process
            "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if accelerator.device.type == "cuda" else None,
        }
        run_log.log({"train/accuracy": train_acc.percent, "final/test_accuracy": test.percent}, position.global_step)
        run_log.summary(summary)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            save_model(accelerator, model, cfg, run_dir / MODEL_FILE)
            summary["history"] = position.history
            (run_dir / run_folder.SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    except Exception as e:
        lost = peer_failure(accelerator, e)
        if lost is None:
            raise
        raise lost from None
    finally:
        if run_log is not None:
            run_log.close()
        teardown(accelerator)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@config_options
def main(config_file: str | None, **params: Any) -> None:
    """Train the stacked RNN on MNIST (one worker process; start it with `accelerate launch` or `distrnn train`)."""
    train(load_config(config_file, overrides_from(params)))


if __name__ == "__main__":
    run_cli(main, prog="distrnn.train")
