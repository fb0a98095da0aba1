"""`make gpu-check`: what only a GPU can show, in one command (under 6 minutes on one modern GPU).

    python -m benchmarks.gpu_check --data-dir DIR [--out benchmarks/results]

Runs against the torch already installed (install distrnn with `pip install --no-deps -e .`), with
W&B off. Each check passes, fails, or is skipped with the reason (a GPU-only check on a machine
without one, a 2-GPU check on one GPU): a skipped check is never reported as passed. Writes
gpu-<gpu name>.json and .md into --out; exits non-zero if any check failed. On a CPU machine the
CPU-runnable checks run (CI does this).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.bench import REPO, machine

CHECKS: list[tuple[str, str | None, Callable]] = []  # (name, what it needs, function)
BIN = Path(sys.executable).parent


def check(name: str, needs: str | None = None):
    def register(function: Callable) -> Callable:
        CHECKS.append((name, needs, function))
        return function

    return register


class Context:
    def __init__(self, data_dir: str, work: Path):
        self.data_dir, self.work = data_dir, work
        self.gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.mode = "gpu" if self.gpus else "cpu"
        self.results: dict[str, dict] = {}
        self.env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}

    def distrnn(self, *args: str, env: dict | None = None,
                timeout: float = 600) -> tuple[subprocess.CompletedProcess, float]:
        start = time.perf_counter()
        result = subprocess.run([str(BIN / "distrnn"), *args], cwd=REPO, env={**self.env, **(env or {})},
                                capture_output=True, text=True, timeout=timeout)
        return result, time.perf_counter() - start

    def train(self, name: str, *args: str, env: dict | None = None) -> dict:
        out = self.work / name
        result, wall = self.distrnn("train", "--no-wandb", "--resume", "never", "--data-dir", self.data_dir,
                                    "--output-dir", str(out), *args, env=env)
        assert result.returncode == 0, f"{name}: exit {result.returncode}: {result.stderr[-1500:]}"
        return {**json.loads((out / "summary.json").read_text()), "wall_seconds": round(wall, 1), "run": str(out)}


def counts(output: str) -> list[list[int]]:
    return [[int(c), int(n)] for c, n in re.findall(r"^Got (\d+) / (\d+) with accuracy", output, re.M)]


# --- the checks -----------------------------------------------------------------------------------

@check("distrnn env")
def environment(ctx: Context) -> dict:
    result, _ = ctx.distrnn("env")
    assert result.returncode == 0, result.stderr
    return {"output": result.stdout}


@check("bf16 and fp16 run the RNN in that dtype (dtype probe)", needs="gpu")
def dtype_probe(ctx: Context) -> dict:
    from distrnn.config.schema import build_config
    from distrnn.model import StackedRNN

    model = StackedRNN(build_config().model).cuda()
    seen = {}
    model.rnn.register_forward_hook(lambda module, args, output: seen.__setitem__("rnn", output[0].dtype))
    x = torch.rand(64, 28, 28, device="cuda")
    found = {}
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast("cuda", dtype=dtype):
            model(x)
            distrnn_dtype = seen["rnn"]
            raw, _ = model.rnn(x)  # what autocast alone does with nn.RNN
        found[str(dtype)] = {"distrnn": str(distrnn_dtype), "autocast alone": str(raw.dtype)}
        assert distrnn_dtype == dtype, f"under {dtype} autocast the RNN ran in {distrnn_dtype}"
    return found


@check("fp32 means fp32: no TF32 in the RNN unless train.tf32")
def fp32_is_fp32(ctx: Context) -> dict:
    from distrnn.ranks.devices import set_numerics

    set_numerics(tf32=False, deterministic=False)
    if hasattr(torch.backends.cudnn, "rnn"):  # torch >= 2.9
        details = {"cudnn.rnn.fp32_precision": torch.backends.cudnn.rnn.fp32_precision,
                   "cuda.matmul.fp32_precision": torch.backends.cuda.matmul.fp32_precision}
        assert details["cudnn.rnn.fp32_precision"] == "ieee", details
    else:
        details = {"cudnn.allow_tf32": torch.backends.cudnn.allow_tf32}
        assert not details["cudnn.allow_tf32"], details
    if ctx.gpus:
        torch.set_grad_enabled(False)
        rnn = torch.nn.RNN(28, 256, 2, batch_first=True).cuda()
        x = torch.rand(256, 28, 28, device="cuda")
        exact = rnn.double()(x.double())[0]
        rnn.float()
        details["max error vs fp64"] = float((rnn(x)[0].double() - exact).abs().max())
        set_numerics(tf32=True, deterministic=False)
        details["max error vs fp64 with tf32"] = float((rnn(x)[0].double() - exact).abs().max())
        set_numerics(tf32=False, deterministic=False)
        torch.set_grad_enabled(True)
        assert details["max error vs fp64"] < 1e-4, details
    return details


@check("no host sync inside a training step")
def no_host_sync(ctx: Context) -> dict:
    """The unit test's counter on this device; on a GPU also CUDA's own sync detector."""
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "tests/unit/test_train_step.py", "-k", "not plain_adam"],
                            cwd=REPO, capture_output=True, text=True,
                            env={**ctx.env, "DISTRNN_DATA_DIR": ctx.data_dir}, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:]
    details = {"unit tests on this device": result.stdout.strip().splitlines()[-1]}
    if ctx.gpus:
        details["cuda sync warnings per step"] = _cuda_sync_warnings(ctx)
        assert details["cuda sync warnings per step"]["steps between checks"] == 0, details
    return details


def _cuda_sync_warnings(ctx: Context) -> dict:
    from accelerate.state import AcceleratorState

    from distrnn.config.schema import build_config
    from distrnn.ranks.collectives import make_accelerator, teardown
    from distrnn.ranks.preemption import StopRequest
    from distrnn.worker.nonfinite import CHECK_EVERY
    from distrnn.worker.trainer import build_trainer

    cfg = build_config(overrides=["data.train_samples=6400", "data.test_samples=100", f"data.dir={ctx.data_dir}",
                                  f"train.output_dir={ctx.work / 'sync-probe'}", "wandb.enabled=false",
                                  "train.log_every=1000", "checkpoint.every_steps=null"])
    accelerator = make_accelerator("no", 0, 300, str(ctx.work))
    trainer = build_trainer(cfg, accelerator, StopRequest())
    trainer.progress.start_epoch(0)
    batches, between, at_checks = iter(trainer.epoch_batches()), 0, 0
    for _ in range(3):  # warm-up: cuDNN picks kernels, the allocator grows
        trainer.train_step(*next(batches))
    torch.cuda.set_sync_debug_mode("warn")
    try:
        for _ in range(3 * CHECK_EVERY):
            images, labels = next(batches)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                trainer.train_step(images, labels)
                trainer.after_step()
            syncs = sum("synchronizing" in str(w.message) for w in caught)
            if trainer.position.global_step % CHECK_EVERY:
                between += syncs
            else:
                at_checks += syncs
    finally:
        torch.cuda.set_sync_debug_mode(0)
        trainer.close()
        teardown(accelerator)
        AcceleratorState._reset_state(True)
    assert "wandb" not in sys.modules, "W&B was imported with W&B off"
    return {"steps between checks": between, f"at the {3} checks": at_checks}


@check("default config, 3 epochs, one GPU", needs="gpu")
def default_config(ctx: Context) -> dict:
    summary = ctx.train("default", "--mode", "gpu", "--config", "default")
    assert summary["test_accuracy"] >= 97.0, summary["test_accuracy"]
    return _keep(summary)


@check("fast config, 3 epochs, one GPU", needs="gpu")
def fast_config(ctx: Context) -> dict:
    summary = ctx.train("fast", "--mode", "gpu", "--config", "fast")
    assert summary["test_accuracy"] >= 97.0, summary["test_accuracy"]
    return _keep(summary)


@check("the seed notebook's loop on the same GPU, side by side", needs="gpu")
def seed_loop(ctx: Context) -> dict:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "benchmarks.seed_loop", "--data-dir", ctx.data_dir], cwd=REPO,
                            env=ctx.env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    seed = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    seed = {**seed, "wall_seconds": round(time.perf_counter() - start, 1)}
    details = {"seed": _keep(seed)}
    for name in ("default config, 3 epochs, one GPU", "fast config, 3 epochs, one GPU"):
        other = ctx.results.get(name, {}).get("details")
        if other:
            details[f"{name.split(',')[0]}: x seed samples/s"] = round(
                other["samples_per_s"] / seed["samples_per_s"], 2)
            details[f"{name.split(',')[0]}: x seed wall time"] = round(other["wall_seconds"] / seed["wall_seconds"], 2)
    return details


@check("checkpoint, SIGUSR1 mid-epoch, deterministic resume: the same final counts")
def deterministic_resume(ctx: Context) -> dict:
    args = ["--mode", ctx.mode, "--config", "smoke", "--set", "train.deterministic=true", "--set",
            "train.log_every=5", "--set", "checkpoint.every_steps=40"]
    reference = ctx.train("uninterrupted", *args)
    out = ctx.work / "interrupted"
    proc = subprocess.Popen([str(BIN / "distrnn"), "train", "--no-wandb", "--data-dir", ctx.data_dir, "--output-dir",
                             str(out), *args], cwd=REPO, env=ctx.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    _wait_for_step(proc, out / "metrics.jsonl", 45)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, f"exit {proc.returncode}: {stderr[-1500:]}"
    checkpoint = ctx.work / "stopped-checkpoint"  # a copy: the resumed run prunes the original
    shutil.copytree(sorted((out / "checkpoints").glob("step-*"))[-1], checkpoint)
    resumed, _ = ctx.distrnn("train", "--no-wandb", "--data-dir", ctx.data_dir, "--output-dir", str(out), *args)
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    got = json.loads((out / "summary.json").read_text())
    pair = lambda s: [[s["train_correct"], s["train_seen"]], [s["test_correct"], s["test_seen"]]]  # noqa: E731
    assert pair(got) == pair(reference), (pair(got), pair(reference))
    ctx.resumed_checkpoint = checkpoint
    return {"stopped at step": json.loads((checkpoint / "meta.json").read_text())["position"]["global_step"],
            "counts (train, test)": pair(got), "uninterrupted": pair(reference)}


def _evaluate_stopped_checkpoint(ctx: Context, mode: str) -> dict:
    checkpoint = getattr(ctx, "resumed_checkpoint", None)
    assert checkpoint is not None, "the resume check did not leave a checkpoint"
    result, wall = ctx.distrnn("evaluate", "--checkpoint", str(checkpoint), "--mode", mode, "--data-dir", ctx.data_dir)
    assert result.returncode == 0, result.stderr[-1500:]
    assert [n for _, n in counts(result.stdout)] == [60000, 10000], counts(result.stdout)
    return {"counts (train, test)": counts(result.stdout), "seconds": round(wall, 1)}


@check("evaluate that checkpoint on the CPU")
def evaluate_on_cpu(ctx: Context) -> dict:
    return _evaluate_stopped_checkpoint(ctx, "cpu")


@check("evaluate that checkpoint on the GPU", needs="gpu")
def evaluate_on_gpu(ctx: Context) -> dict:
    return _evaluate_stopped_checkpoint(ctx, "gpu")


FORCED_OVERFLOW = {"DISTRNN_FAULTS": "fp16-init-scale=1e30"}  # fp16's largest is 65504: the first updates overflow


def _fp16(ctx: Context, name: str, *args: str) -> dict:
    summary = ctx.train(name, *args, "--config", "smoke", "--precision", "fp16", "--set", "optim.schedule=onecycle",
                        env=FORCED_OVERFLOW)
    assert summary["test_accuracy"] > 80, summary["test_accuracy"]
    assert summary["grad_scaler_skipped_steps"] >= 1, summary["grad_scaler_skipped_steps"]  # the overflow was seen
    assert summary["scheduler_steps"] + summary["grad_scaler_skipped_steps"] == summary["steps"], summary
    return {k: summary[k] for k in ("test_accuracy", "steps", "grad_scaler_skipped_steps", "scheduler_steps")}


@check("fp16 with a forced overflow: the skips are counted, the schedule skips them", needs="gpu")
def fp16(ctx: Context) -> dict:
    return _fp16(ctx, "fp16", "--mode", "gpu")


@check("CUDA_VISIBLE_DEVICES chooses the GPU (the second of two)", needs="2 gpus")
def visible_devices(ctx: Context) -> dict:
    summary = ctx.train("second-gpu", "--mode", "gpu", "--config", "smoke", "--epochs", "1",
                        env={"CUDA_VISIBLE_DEVICES": "1"})
    return _keep(summary)


@check("DDP on 2 GPUs; evaluate on 1 and 2 GPU processes: identical counts", needs="2 gpus")
def ddp(ctx: Context) -> dict:
    summary = ctx.train("ddp", "--mode", "ddp", "--num-processes", "2", "--config", "smoke")
    found = {}
    for n in ("1", "2"):
        mode = "gpu" if n == "1" else "ddp"
        result, _ = ctx.distrnn("evaluate", "--checkpoint", summary["run"], "--mode", mode, "--num-processes", n,
                                "--data-dir", ctx.data_dir)
        assert result.returncode == 0, result.stderr[-1500:]
        found[n] = counts(result.stdout)
    assert found["1"] == found["2"] and [s for _, s in found["1"]] == [60000, 10000], found
    return {"train": _keep(summary), "evaluate": found}


DDP2 = ["--mode", "ddp", "--num-processes", "2"]


@check("DDP on 2 GPUs, fp16 with a forced overflow: the skips are counted, the schedule skips them", needs="2 gpus")
def ddp_fp16(ctx: Context) -> dict:
    return _fp16(ctx, "ddp-fp16", *DDP2)


@check("DDP on 2 GPUs: the bf16 fast config, and gradient accumulation (2 steps)", needs="2 gpus")
def ddp_bf16_accumulation(ctx: Context) -> dict:
    fast = ctx.train("ddp-fast", *DDP2, "--config", "fast")
    assert fast["test_accuracy"] > 97.0, fast["test_accuracy"]
    accumulated = ctx.train("ddp-accum", *DDP2, "--config", "smoke", "--set", "train.grad_accum_steps=2")
    assert accumulated["global_batch"] == 256 and accumulated["test_seen"] == 10000, accumulated
    return {"fast": _keep(fast), "accumulation": _keep(accumulated)}


def _ddp_run(ctx: Context, name: str, *args: str) -> tuple[subprocess.Popen, Path]:
    out = ctx.work / name
    proc = subprocess.Popen([str(BIN / "distrnn"), "train", "--no-wandb", "--data-dir", ctx.data_dir, "--output-dir",
                             str(out), *DDP2, "--config", "smoke", "--set", "train.log_every=5", *args], cwd=REPO,
                            env=ctx.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return proc, out


def _rank(proc: subprocess.Popen, rank: str):
    import psutil

    workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if "distrnn.train" in " ".join(p.cmdline())]
    return next(w for w in workers if w.environ().get("RANK") == rank)


@check("DDP on 2 GPUs: SIGUSR1 mid-epoch, then resume: the same counts as uninterrupted (deterministic)",
       needs="2 gpus")
def ddp_resume(ctx: Context) -> dict:
    args = ["--set", "train.deterministic=true", "--set", "checkpoint.every_steps=20"]
    reference = ctx.train("ddp-uninterrupted", *DDP2, "--config", "smoke", "--set", "train.log_every=5", *args)
    proc, out = _ddp_run(ctx, "ddp-interrupted", *args)
    _wait_for_step(proc, out / "metrics.jsonl", 25)
    proc.send_signal(signal.SIGUSR1)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, f"exit {proc.returncode}: {stderr[-1500:]}"
    resumed, _ = ctx.distrnn("train", "--no-wandb", "--data-dir", ctx.data_dir, "--output-dir", str(out), *DDP2,
                             "--config", "smoke", "--set", "train.log_every=5", *args)
    assert resumed.returncode == 0, resumed.stderr[-1500:]
    got = json.loads((out / "summary.json").read_text())
    pair = lambda s: [[s["train_correct"], s["train_seen"]], [s["test_correct"], s["test_seen"]]]  # noqa: E731
    assert pair(got) == pair(reference), (pair(got), pair(reference))
    return {"counts (train, test)": pair(got)}


@check("DDP on 2 GPUs: kill -9 of rank 1 ends the run in seconds, naming it", needs="2 gpus")
def ddp_killed_rank(ctx: Context) -> dict:
    proc, out = _ddp_run(ctx, "ddp-killed")
    _wait_for_step(proc, out / "metrics.jsonl", 10)
    _rank(proc, "1").send_signal(signal.SIGKILL)
    start = time.monotonic()
    _, stderr = proc.communicate(timeout=120)
    seconds = time.monotonic() - start
    assert "worker rank 1 was killed by SIGKILL" in stderr and proc.returncode == 137, stderr[-1500:]
    assert seconds < 30, seconds
    return {"seconds to end": round(seconds, 1), "exit": proc.returncode}


@check("DDP on 2 GPUs: SIGSTOP of rank 1 ends the run within the collective timeout, naming it", needs="2 gpus")
def ddp_frozen_rank(ctx: Context) -> dict:
    proc, out = _ddp_run(ctx, "ddp-frozen", "--set", "train.collective_timeout_s=30")
    _wait_for_step(proc, out / "metrics.jsonl", 10)
    frozen = _rank(proc, "1")
    frozen.suspend()
    start = time.monotonic()
    try:
        _, stderr = proc.communicate(timeout=180)
    finally:
        with contextlib.suppress(Exception):  # a stopped rank left behind would hold its GPU
            frozen.resume()
    seconds = time.monotonic() - start
    assert "rank 1 (node" in stderr and "is frozen or unreachable" in stderr and proc.returncode == 3, stderr[-1500:]
    assert seconds < 30 + 20, seconds
    return {"seconds to end": round(seconds, 1), "exit": proc.returncode}


# --- running and reporting ------------------------------------------------------------------------

def _keep(summary: dict) -> dict:
    keys = ("test_accuracy", "train_accuracy", "samples_per_s", "train_seconds", "wall_seconds", "peak_gpu_mb",
            "steps", "history")
    return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in summary.items() if k in keys and k != "history"}


def _wait_for_step(proc: subprocess.Popen, metrics: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"training ended early: {proc.communicate()[1][-1500:]}"
        if metrics.is_file() and any(json.loads(line).get("step", 0) >= step
                                     for line in metrics.read_text().splitlines()):
            return
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def run_checks(ctx: Context) -> None:
    for name, needs, function in CHECKS:
        missing = needs == "gpu" and ctx.gpus < 1 or needs == "2 gpus" and ctx.gpus < 2
        if missing:
            ctx.results[name] = {"status": "skipped", "reason": f"needs {'a GPU' if needs == 'gpu' else needs}; "
                                                                 f"this machine has {ctx.gpus}"}
            print(f"SKIPPED  {name} ({ctx.results[name]['reason']})", flush=True)
            continue
        start = time.perf_counter()
        try:
            details = function(ctx)
            ctx.results[name] = {"status": "passed", "details": details}
        except Exception as e:  # a failed check is reported, and the others still run
            ctx.results[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"[:2000],
                                 "where": traceback.format_exc()[-1500:]}
        ctx.results[name]["seconds"] = round(time.perf_counter() - start, 1)
        print(f"{ctx.results[name]['status'].upper():<8} {name} ({ctx.results[name]['seconds']} s)", flush=True)


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# make gpu-check: {m['gpu'] or 'no GPU'}", "",
             f"torch {m['torch']}, python {m['python']}, {m['cores']} CPU cores; {report['seconds']} s in all; "
             f"command: `{report['command']}`", "", "| check | status | seconds | details |",
             "| --- | --- | --- | --- |"]
    for name, r in report["checks"].items():
        details = r.get("details", r.get("reason", r.get("error", "")))
        if isinstance(details, dict):
            details = "; ".join(f"{k}: {v}" for k, v in details.items() if k != "output")
        lines.append(f"| {name} | {r['status']} | {r.get('seconds', '')} | {str(details).replace('|', '/')[:600]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("DISTRNN_DATA_DIR", "./data"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        ctx = Context(args.data_dir, Path(work))
        run_checks(ctx)
    info = machine()
    report = {"machine": info, "seconds": round(time.perf_counter() - start), "command": "make gpu-check",
              "checks": ctx.results}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["gpu"] or "none").strip("-").lower()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"gpu-{slug}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"gpu-{slug}.md").write_text(markdown(report))
    print(markdown(report))
    failed = [name for name, r in ctx.results.items() if r["status"] == "failed"]
    if failed:
        sys.exit(f"gpu-check: {len(failed)} check(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
