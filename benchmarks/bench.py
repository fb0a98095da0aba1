"""Side-by-side benchmark: the seed notebook's loop vs distrnn (default config) vs distrnn (fast config).

One invocation runs all contestants on the same data and machine, in interleaved rounds, each in
its own process, and reports per contestant (median over rounds): training samples/s, training
time, the whole command's wall time (what a user waits for, process start to exit), test accuracy
after each epoch, time to 97.5% test accuracy, peak RSS (and GPU memory on GPU), and the ratios
against the seed. The fast config runs twice a round: as a user runs it (its whole-command time)
and with `train.eval_every` for a fine accuracy-against-time curve (its time to 97.5%; training
time excludes evaluations, so the extra evaluations do not move it). Beside them, in the same
rounds: the fixed cost (a run of 64 training images against `python -c "import torch, accelerate"`)
and the bare-loop ceilings (benchmarks/bare_loop.py) at the default and the fast config's batch
size and precision. The targets table gives each ratio with met / missed. Once per invocation it
also runs the default config with 2 processes (gloo on CPU, DDP on GPUs).

    python -m benchmarks.bench                      # the full run docs/performance.md quotes
    python -m benchmarks.bench --quick --out /tmp/b # a few hundred steps: checks that it works

Writes results.json, results.md and accuracy_vs_time.png into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from distrnn.testing import faults

REPO = Path(__file__).resolve().parent.parent
TARGET = 97.5
CURVE_EVERY = 20  # optimizer steps between evaluations in the fast config's curve run (~6 an epoch)
FIXED_REPEATS = 3  # the fixed-cost pair is short (seconds): a median of 3 per round (1 in the quick mode)


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    from distrnn.ranks import devices

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        # bf16 is 2.8x-24x slower where it is emulated: every number here depends on these two
        "cpu_capability": devices.cpu_capability(), "cpu_bf16": devices.cpu_bf16_native() or "emulated",
    }


def timed(cmd: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, float]:
    start = time.perf_counter()
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"benchmark step failed ({' '.join(cmd)}):\n{result.stderr[-3000:]}")
    return result, wall


def run_seed(args, env) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.seed_loop", "--data-dir", args.data_dir]
    if args.quick:
        cmd += ["--max-steps", "100", "--epochs", "1"]
    result, wall = timed(cmd, env)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return {**json.loads(line[len("RESULT "):]), "wall_seconds": wall}


def distrnn_command(args, config: str, processes: int, out: Path) -> list[str]:
    mode = "cpu" if args.device == "cpu" else ("gpu" if processes == 1 else "ddp")
    return [str(Path(sys.executable).parent / "distrnn"), "train", "--mode", mode, "--num-processes", str(processes),
            "--config", config, "--data-dir", args.data_dir, "--output-dir", str(out), "--no-wandb",
            "--resume", "never"]


def run_distrnn(args, env, config: str, processes: int, workdir: Path, extra: tuple[str, ...] = ()) -> dict:
    out = workdir / f"{Path(config).stem}-{processes}p-{time.monotonic_ns()}"
    cmd = distrnn_command(args, config, processes, out) + list(extra)
    if args.quick:
        cmd += ["--epochs", "1", "--set", "data.train_samples=3200", "--set", "data.test_samples=1000"]
    _, wall = timed(cmd, env)
    summary = json.loads((out / "summary.json").read_text())
    return {**summary, "wall_seconds": wall}


def run_fixed(args, env, workdir: Path) -> dict:
    """The fixed cost a user pays on every run: a whole `distrnn train` of 64 training images (one
    step, the full test evaluation, every file written), against importing torch and accelerate."""
    imports, runs = [], []
    for _ in range(1 if args.quick else FIXED_REPEATS):
        imports.append(timed([sys.executable, "-c", "import torch, accelerate"], env)[1])
        out = workdir / f"fixed-{time.monotonic_ns()}"
        runs.append(timed(distrnn_command(args, "default", 1, out) + ["--epochs", "1", "--set",
                                                                      "data.train_samples=64"], env)[1])
    return {"import_seconds": statistics.median(imports), "run_64_seconds": statistics.median(runs)}


def run_bare(env, batch_size: int, precision: str, quick: bool) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bare_loop", "--batch-size", str(batch_size), "--precision", precision]
    if quick:
        cmd += ["--samples", str(20 * batch_size)]
    result, _ = timed(cmd, env)
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def fast_settings(on_cpu: bool) -> tuple[int, str]:
    """The fast config's batch size and the precision it runs at here (its `auto` resolved as a run does)."""
    from distrnn.config.schema import load_config
    from distrnn.ranks.devices import choose_precision

    cfg = load_config("fast")
    return cfg.train.batch_size, choose_precision(cfg.train.precision, on_cpu=on_cpu).chosen


def time_to_target(history: list[dict]) -> float | None:
    return next((h["train_seconds"] for h in history if h["test_accuracy"] >= TARGET), None)


def aggregate(runs: list[dict]) -> dict:
    """Median over rounds; the accuracy curve of the first round."""
    def med(key):
        values = [r[key] for r in runs if r.get(key) is not None]
        return statistics.median(values) if values else None

    reached = [time_to_target(r["history"]) for r in runs]
    return {
        "rounds": len(runs), "samples_per_s": med("samples_per_s"), "train_seconds": med("train_seconds"),
        "eval_seconds": med("eval_seconds"), "wall_seconds": med("wall_seconds"), "test_accuracy": med("test_accuracy"),
        "time_to_97_5_s": statistics.median(reached) if all(t is not None for t in reached) else None,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "peak_gpu_mb": med("peak_gpu_mb"),
        "history": runs[0]["history"], "all_rounds": runs,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def time_ratio(r: dict, seed: dict) -> str:
    """Time to the target against the seed's; if the seed never got there, its whole run is a lower bound."""
    if r["time_to_97_5_s"] is None:
        return "-"
    if seed["time_to_97_5_s"] is None:
        return f"< {r['time_to_97_5_s'] / seed['train_seconds']:.2f} (seed never reached it)"
    return f"{r['time_to_97_5_s'] / seed['time_to_97_5_s']:.2f}"


def fmt(value, spec: str = ".1f", none: str = "not reached") -> str:
    return none if value is None else format(value, spec)


def targets(results: dict) -> list[dict]:
    """The performance issue's targets, each a ratio (or a number) measured in this run, met or missed."""
    c, fixed, bare = results["contestants"], results["fixed"], results["bare"]
    seed, default, fast, curve = c["seed loop"], c["distrnn default"], c["distrnn fast"], c["distrnn fast, curve"]
    rows = [
        ("fast config whole command / seed notebook whole run", ratio(fast["wall_seconds"], seed["wall_seconds"]),
         "<= 0.20", lambda v: v <= 0.20, ".2f"),
        ("fast config final test accuracy (%)", fast["test_accuracy"], ">= 98.0", lambda v: v >= 98.0, ".2f"),
        ("64-image run, whole command / `import torch, accelerate`",
         ratio(fixed["run_64_seconds"], fixed["import_seconds"]), "<= 1.3", lambda v: v <= 1.3, ".2f"),
        ("fast config evaluation time / its training time", ratio(fast["eval_seconds"], fast["train_seconds"]),
         "<= 0.10", lambda v: v <= 0.10, ".3f"),
        (f"fast config training time to {TARGET}% test (s, curve run)", curve["time_to_97_5_s"], "<= 10",
         lambda v: v <= 10, ".1f"),
        ("default config samples/s / bare loop (batch 64, fp32)",
         ratio(default["samples_per_s"], bare["default"]["samples_per_s"]), ">= 0.90", lambda v: v >= 0.90, ".2f"),
        (f"fast config samples/s / bare loop (batch {bare['fast']['batch_size']}, {bare['fast']['precision']})",
         ratio(fast["samples_per_s"], bare["fast"]["samples_per_s"]), ">= 0.90", lambda v: v >= 0.90, ".2f"),
        ("fast config whole command / default config whole command",
         ratio(fast["wall_seconds"], default["wall_seconds"]), "< 1", lambda v: v < 1, ".2f"),
    ]
    return [{"measure": name, "value": value, "target": goal,
             "status": "-" if check is None else ("missed" if value is None or not check(value) else "met"),
             "text": fmt(value, spec)} for name, value, goal, check, spec in rows]


def markdown(results: dict) -> str:
    seed = results["contestants"]["seed loop"]
    lines = [
        f"Machine: {results['machine']['cpu']} ({results['machine']['cpu_capability']}, bf16: "
        f"{results['machine']['cpu_bf16']}), {results['machine']['cores']} cores, "
        f"GPU {results['machine']['gpu'] or 'none'}; torch {results['machine']['torch']}; "
        f"{'quick mode' if results['quick'] else 'full run'}, {results['rounds']} interleaved round(s), medians.",
        f"Command: `{results['command']}`",
        "",
        "| contestant | samples/s | x seed | train s | eval s | wall s (whole command) | x seed | "
        f"test acc after each epoch | final test | time to {TARGET}% | x seed | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results["contestants"].items():
        per_epoch = ", ".join(f"{h['test_accuracy']:.2f}" for h in r["history"] if float(h["epoch"]).is_integer())
        memory = f"{r['peak_rss_mb']:.0f}" + ("" if r["peak_gpu_mb"] is None else f" (GPU {r['peak_gpu_mb']:.0f})")
        lines.append(
            f"| {name} | {r['samples_per_s']:.0f} | {fmt(ratio(r['samples_per_s'], seed['samples_per_s']), '.2f')} | "
            f"{r['train_seconds']:.1f} | {fmt(r['eval_seconds'], '.1f', '-')} | {r['wall_seconds']:.1f} | "
            f"{fmt(ratio(r['wall_seconds'], seed['wall_seconds']), '.2f')} | {per_epoch} | {r['test_accuracy']:.2f} | "
            f"{fmt(r['time_to_97_5_s'])} | {time_ratio(r, seed)} | {memory} |"
        )
    fixed, bare = results["fixed"], results["bare"]
    lines += ["", f"Fixed cost: a 64-image run (`distrnn train --config default --epochs 1 --set "
              f"data.train_samples=64`, whole command) {fixed['run_64_seconds']:.2f} s; "
              f"`python -c \"import torch, accelerate\"` {fixed['import_seconds']:.2f} s (medians of "
              f"{'1 pair' if results['quick'] else f'{FIXED_REPEATS} pairs'} a round)."]
    lines += ["Bare loop (forward + backward + fused Adam on in-memory batches, `benchmarks/bare_loop.py`): "
              + "; ".join(f"batch {b['batch_size']} {b['precision']}: {b['samples_per_s']:.0f} samples/s"
                          for b in bare.values()) + "."]
    ddp = results.get("ddp")
    if ddp:
        lines += ["", f"2 processes ({ddp['backend']}), default config: {ddp['samples_per_s']:.0f} samples/s, "
                  f"{ddp['ratio_to_1_process']:.2f}x one process; final test {ddp['test_accuracy']:.2f}%."]
    lines += ["", "| target | measured | goal | |", "| --- | --- | --- | --- |"]
    lines += [f"| {t['measure']} | {t['text']} | {t['target']} | {t['status']} |" for t in targets(results)]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results["contestants"].items():
        xs = [0.0] + [h["train_seconds"] for h in r["history"]]
        ys = [10.0] + [h["test_accuracy"] for h in r["history"]]
        ax.plot(xs, ys, marker="o", label=name)
    ax.axhline(TARGET, color="grey", linestyle="--", linewidth=1, label=f"{TARGET}%")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(85 if not results["quick"] else 0, 100)
    ax.set_title(f"MNIST stacked RNN, {results['machine']['cores']} CPU cores"
                 + (f", {results['machine']['gpu']}" if results["machine"]["gpu"] else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    faults.refuse_in_measurements("benchmarks.bench")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("DISTRNN_DATA_DIR", "./data"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few hundred steps each; checks only that it runs")
    parser.add_argument("--no-ddp", action="store_true", help="skip the 2-process run")
    parser.add_argument("--render", metavar="RESULTS_JSON",
                        help="only rewrite results.md and the plot from a results.json")
    args = parser.parse_args()
    if args.render:
        results = json.loads(Path(args.render).read_text())
        out = Path(args.render).parent
        (out / "results.md").write_text(markdown(results))
        plot(results, out / "accuracy_vs_time.png")
        print(markdown(results))
        return
    import torch

    args.device = "gpu" if torch.cuda.is_available() else "cpu"
    rounds = 1 if args.quick else args.rounds
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    fast_batch, fast_precision = fast_settings(on_cpu=args.device == "cpu")
    curve = ("--set", f"train.eval_every={CURVE_EVERY}")
    with tempfile.TemporaryDirectory() as tmp:
        contestants = {
            "seed loop": lambda: run_seed(args, env),
            "distrnn default": lambda: run_distrnn(args, env, "configs/default.yaml", 1, Path(tmp)),
            "distrnn fast": lambda: run_distrnn(args, env, "configs/fast.yaml", 1, Path(tmp)),
            "distrnn fast, curve": lambda: run_distrnn(args, env, "configs/fast.yaml", 1, Path(tmp), curve),
        }
        if fast_precision == "bf16":  # native bf16 here: the fast config in fp32 too, side by side
            contestants["distrnn fast, fp32"] = lambda: run_distrnn(args, env, "configs/fast.yaml", 1, Path(tmp),
                                                                    ("--precision", "no"))
        runs: dict[str, list[dict]] = {name: [] for name in contestants}
        fixed, bare_default, bare_fast = [], [], []
        for round_index in range(rounds):
            for name, run in contestants.items():
                print(f"round {round_index + 1}/{rounds}: {name} ...", flush=True)
                runs[name].append(run())
                r = runs[name][-1]
                print(f"  {r['samples_per_s']:.0f} samples/s, test {r['test_accuracy']:.2f}%, "
                      f"train {r['train_seconds']:.1f} s, wall {r['wall_seconds']:.1f} s", flush=True)
            print(f"round {round_index + 1}/{rounds}: fixed cost and bare loops ...", flush=True)
            fixed.append(run_fixed(args, env, Path(tmp)))
            bare_default.append(run_bare(env, 64, "no", args.quick))
            bare_fast.append(run_bare(env, fast_batch, fast_precision, args.quick))
        ddp = None
        if not args.no_ddp and (args.device == "cpu" or torch.cuda.device_count() > 1):
            print("2 processes: distrnn default ...", flush=True)
            two = run_distrnn(args, env, "configs/default.yaml", 2, Path(tmp))
            one = statistics.median(r["samples_per_s"] for r in runs["distrnn default"])
            ddp = {"backend": "gloo" if args.device == "cpu" else "nccl", "samples_per_s": two["samples_per_s"],
                   "ratio_to_1_process": two["samples_per_s"] / one, "test_accuracy": two["test_accuracy"],
                   "peak_rss_mb": two["peak_rss_mb"]}

    def median_of(items: list[dict]) -> dict:
        return {k: statistics.median(i[k] for i in items) if isinstance(items[0][k], float) else items[0][k]
                for k in items[0]}

    results = {
        "machine": machine(), "quick": args.quick, "rounds": rounds,
        "command": "python -m benchmarks.bench" + (" --quick" if args.quick else f" --rounds {rounds}"),
        "contestants": {name: aggregate(r) for name, r in runs.items()}, "ddp": ddp,
        "fixed": median_of(fixed), "bare": {"default": median_of(bare_default), "fast": median_of(bare_fast)},
    }
    results["targets"] = targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(markdown(results))
    plot(results, out / "accuracy_vs_time.png")
    print(markdown(results))
    print(f"wrote {out}/results.json, results.md, accuracy_vs_time.png")


if __name__ == "__main__":
    main()
