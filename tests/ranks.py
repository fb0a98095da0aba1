"""Scenarios run on N real gloo processes by tests/unit/test_distributed.py:

    python -m torch.distributed.run --standalone --nproc-per-node N tests/ranks.py SCENARIO

Each rank builds the same Accelerator the workers build, runs the scenario through the same
run_cli that prints worker errors, and prints its results as `RESULT <json>`.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click
import torch

from distrnn.config.schema import build_config
from distrnn.data.mnist import Split
from distrnn.errors import DistrnnError
from distrnn.evaluation.counting import evaluate_with_mistakes
from distrnn.model import StackedRNN
from distrnn.ranks.collectives import agree, from_main, make_accelerator, run_worker, teardown


def tiny_model_and_data(n: int = 1001) -> tuple[StackedRNN, Split]:
    torch.manual_seed(0)
    model = StackedRNN(build_config(overrides=["model.hidden_size=8"]).model)
    split = Split(torch.randint(0, 256, (n, 28, 28), dtype=torch.uint8), torch.randint(0, 10, (n,)))
    return model, split


def fail(message: str) -> None:
    raise DistrnnError(message)


def accumulate(acc) -> None:
    """A real Trainer on 2 ranks with grad_accum_steps=3: at which batches DDP all-reduced gradients."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from distrnn.ranks.preemption import StopRequest
    from distrnn.worker.trainer import build_trainer

    cfg = build_config(overrides=["data.train_samples=640", "data.test_samples=100", "train.batch_size=16",
                                  "train.grad_accum_steps=3", "train.epochs=1", "wandb.enabled=false",
                                  "checkpoint.every_steps=null", f"train.output_dir={os.environ['RUN_DIR']}"])
    trainer = build_trainer(cfg, acc, StopRequest())
    reduced_at: set[int] = set()
    real = default_hooks.allreduce_hook  # what the trainer's own (timing) communication hook calls

    def count(state, bucket):
        reduced_at.add(trainer.position.step_in_epoch)  # the batch being trained (0-based)
        return real(state, bucket)

    default_hooks.allreduce_hook = count
    summary = trainer.fit()
    trainer.close()
    print("RESULT " + json.dumps({"reduced_at": sorted(reduced_at), "steps": summary["steps"],
                                  "batches": len(trainer.loader)}), flush=True)


SCENARIOS = {
    "exact": None,
    # only rank 1 has the problem (a node-local file, a full disk on one node)
    "rank1-error": lambda acc: agree(acc, lambda: fail("rank 1's own problem") if acc.process_index == 1 else None),
    # every rank has the same problem (a shared file): printed once
    "same-error": lambda acc: agree(acc, lambda: fail("the same problem everywhere")),
    # every rank uses the main process's answer (a shared file system can show ranks different folders)
    "from-main": lambda acc: print(f"RESULT [{from_main(acc, acc.process_index)}]", flush=True),
    "accumulate": accumulate,
    # what tests/collective_check refuses: a bool, and ranks calling different collectives
    "bool-collective": lambda acc: torch.distributed.all_reduce(torch.ones(2, dtype=torch.bool)),
    "mismatched-collectives": lambda acc: torch.distributed.all_reduce(torch.ones(2 + acc.process_index)),
    # not a DistrnnError, on the main process only: the others must not wait for the collective timeout
    "main-raises": lambda acc: agree(acc, lambda: {}["missing key"], here=acc.is_main_process),
}


@click.command()
@click.argument("scenario", type=click.Choice(list(SCENARIOS)))
def main(scenario: str) -> None:
    accelerator = make_accelerator("no", 0, collective_timeout_s=300, project_dir=".")
    assert accelerator.num_processes == int(os.environ["WORLD_SIZE"]), "not one process group"
    start = time.monotonic()
    try:
        if scenario == "exact":
            model, split = tiny_model_and_data()
            evaluation, mistakes = evaluate_with_mistakes(accelerator, model, split, batch_size=64, keep=7)
            print("RESULT " + json.dumps({"counts": [evaluation.correct, evaluation.seen],
                                          "confusion": evaluation.confusion,
                                          "mistakes": [[m.index, m.prediction] for m in mistakes]}), flush=True)
        else:
            SCENARIOS[scenario](accelerator)
    finally:
        print(f"LEFT rank {os.environ.get('RANK')} after {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)
        teardown(accelerator)


if __name__ == "__main__":
    run_worker(main, prog="distrnn.train")
