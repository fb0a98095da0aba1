"""Goodput under faults: a distrnn run on machines of their own (network namespaces), faults drawn from a seeded
schedule, each failure answered as a scheduler would answer it (the same command again, on every machine), and
an uninterrupted run of the same seed to compare with.

    python -m benchmarks.faults                       # the campaign docs/faults.md quotes (as root)
    python -m benchmarks.faults --quick --out /tmp/f  # smoke config, 3 faults, ~2 min: the cluster tier's check

Faults (one machine each, chosen by the schedule): kill-worker (SIGKILL to its worker), lose-machine (SIGKILL
to every process on it), freeze (SIGSTOP to its worker: found by the collective timeout), cut (its network
link down), disk-full (the run folder's file system filled), corrupt (a byte of the newest checkpoint flipped,
then its worker killed: the resume must pass over that checkpoint), slow (its worker stopped half of every
0.3 s for 15 s; not fatal), preempt (SIGTERM to every machine's launcher, as SLURM's preemption sends it).
Packet delay and loss (`tc netem`) are not among them: this project's machines' kernel has no sch_netem
("Specified qdisc kind is unknown").

Each run writes the sample ledger (DISTRNN_FAULTS=sample-ledger): the training indices every optimizer step
applied, per rank. The last record of each step is the one kept; every epoch must use each sample exactly once,
and each step the same samples as the uninterrupted run's. Goodput is the uninterrupted run's wall time over
the interrupted one's, both whole commands, restarts included: the share of wall time that became kept
progress. Writes results.json and results.md into --out. Needs root and real MNIST (--data-dir).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from benchmarks.bench import machine as machine_info
from distrnn.testing import faults as fault_switch
from distrnn.testing import netns

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
KINDS = ("kill-worker", "lose-machine", "freeze", "cut", "disk-full", "corrupt", "slow", "preempt")
NOT_FATAL = ("slow",)
COLLECTIVE_TIMEOUT_S = 30  # how long a frozen or cut-off rank is waited for (the default, 300 s, would dominate)
START_LIMIT_S = 240  # an attempt that has not trained a step by then is ended and started again
END_LIMIT_S = COLLECTIVE_TIMEOUT_S + 90  # after one machine ended: the others end by then, or are killed
GRACE_S = 10  # after one machine failed, before the others are killed
SLOW_S, SLOW_PERIOD_S = 15.0, 0.3
DISK_BYTES = 256 * 2**20  # the run folder's own file system (tmpfs), so that filling it touches nothing else


FULL = {"mtbf": 60.0, "faults": 8, "kinds": ",".join(KINDS), "cadence": "100,500,auto", "config": "default"}
# A few minutes: the smoke model on 150 steps; faults each found at once (no collective timeout to wait out)
QUICK = {"mtbf": 6.0, "faults": 3, "kinds": "kill-worker,corrupt,preempt", "cadence": "20", "config": "smoke"}
QUICK_SETS = ["data.train_samples=19200", "data.test_samples=2000"]


@dataclass(frozen=True)
class Fault:
    after_s: float  # seconds of training after the previous fault was recovered from (or the first step)
    kind: str
    machine: int


def schedule(seed: int, mtbf_s: float, count: int, machines: int, kinds: tuple[str, ...] = KINDS) -> list[Fault]:
    """The same seed, the same faults: exponential gaps (mean mtbf_s), every kind once before any twice."""
    rng = random.Random(seed)
    order: list[str] = []
    while len(order) < count:
        round_ = list(kinds)
        rng.shuffle(round_)
        order += round_
    return [Fault(round(rng.expovariate(1 / mtbf_s), 1), order[i], rng.randrange(machines)) for i in range(count)]


@dataclass
class FaultResult:
    kind: str
    machine: int
    at_s: float  # since the run's first start
    step: int  # the last step recorded before it
    detected_s: float | None = None  # until the first machine's launcher ended (None: not fatal)
    recovered_s: float | None = None  # from then until the restarted run's first new step
    resumed_from: int | None = None
    steps_redone: int = 0
    exit_codes: list[int] = field(default_factory=list)
    note: str = ""


class Ledger:
    """Reads rank 0's sample-ledger file as it grows: every step recorded, in order (a step trained again after
    a restart appears again)."""

    def __init__(self, folder: Path):
        self.path, self.offset, self.steps = folder / "rank-0.jsonl", 0, []

    @property
    def lines(self) -> int:
        return len(self.steps)

    @property
    def last_step(self) -> int:
        return self.steps[-1] if self.steps else 0

    def poll(self) -> int:
        if self.path.exists():
            with self.path.open() as f:
                f.seek(self.offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]
            self.offset += len(complete)
            self.steps += [json.loads(line)["step"] for line in complete.splitlines()]
        return self.last_step


def kept_steps(folder: Path) -> dict[int, tuple[int, list[int]]]:
    """step -> (epoch, its samples over all ranks, sorted): each rank's last record of the step (a step redone
    after a restart replaces the lost attempt's). A line cut off by a SIGKILL is not a record."""
    per_rank: dict[tuple[str, int], tuple[int, list[int]]] = {}
    for path in sorted(folder.glob("rank-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            indices = [i for batch in record["micro_batches"] for i in batch]
            per_rank[(path.name, record["step"])] = (record["epoch"], indices)
    steps: dict[int, tuple[int, list[int]]] = {}
    for (_, step), (epoch, indices) in sorted(per_rank.items(), key=lambda item: item[0][1]):
        steps[step] = (epoch, sorted(steps.get(step, (epoch, []))[1] + indices))
    return steps


def exactness(run: Path, clean: Path) -> dict:
    """Samples of an epoch the run used fewer or more times than the uninterrupted run (not than once: with 2
    processes an epoch's last global batch is filled up with samples from its start, 32 of the default config's
    60,000 = 468 x 128 + 96, in both runs alike), and steps whose samples differ from the uninterrupted run's."""
    got, want = kept_steps(run), kept_steps(clean)
    lost = duplicated = repeats = 0
    for epoch in {e for e, _ in want.values()}:
        seen = Counter(i for e, indices in got.values() if e == epoch for i in indices)
        expected = Counter(i for e, indices in want.values() if e == epoch for i in indices)
        lost += sum((expected - seen).values())
        duplicated += sum((seen - expected).values())
        repeats += expected.total() - len(expected)
    return {"steps": len(got), "steps_clean": len(want), "samples_lost": lost, "samples_duplicated": duplicated,
            "steps_unlike_clean": sum(got.get(s) != v for s, v in want.items()) + len(set(got) - set(want)),
            "clean_repeats": repeats}


class Cluster:
    """The machines, the run folder's file system, and one attempt's launchers (the same command each time)."""

    def __init__(self, machines: list[netns.Machine], work: Path, args: list[str], data_dir: str):
        self.machines, self.args, self.data_dir = machines, args, data_dir
        self.disk = work / "disk"
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.port = 29_700

    def start(self, run: Path, ledger: Path, name: str) -> None:
        self.port += 1  # a fresh port each attempt: the killed one's store may still hold the last
        env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
               "DISTRNN_FAULTS": f"sample-ledger={ledger}"}
        env.pop("GLOO_SOCKET_IFNAME", None)
        self.procs = []
        for rank, m in enumerate(self.machines):
            args = [str(BIN / "distrnn"), "train", "--mode", "cpu", "--num-machines", str(len(self.machines)),
                    "--machine-rank", str(rank), "--main-process-ip", self.machines[0].address,
                    "--main-process-port", str(self.port), "--output-dir", str(run), "--data-dir", self.data_dir,
                    "--no-wandb", "--set", f"train.collective_timeout_s={COLLECTIVE_TIMEOUT_S}", *self.args]
            log = (self.logs / f"{name}-m{rank}.log").open("w")
            self.procs.append(m.popen(args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True))

    def ended(self) -> bool:
        return any(p.poll() is not None for p in self.procs)

    def end(self) -> list[int]:
        """As a scheduler ends a job one of whose machines failed (SLURM's --kill-on-bad-exit, a JobSet's
        failure policy): the others get GRACE_S to end by themselves, then are killed. A stop on request
        (exit 75) or success gives them END_LIMIT_S: each saves or finishes on its own."""
        while not self.ended():
            time.sleep(0.05)
        first = next(p.returncode for p in self.procs if p.poll() is not None)
        return self.wait_all(END_LIMIT_S if first in (0, 75) else GRACE_S)

    def wait_all(self, limit_s: float) -> list[int]:
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline and any(p.poll() is None for p in self.procs):
            time.sleep(0.1)
        if any(p.poll() is None for p in self.procs):
            self.clear()
        return [p.wait(timeout=30) for p in self.procs]

    def clear(self) -> None:
        """Nothing of an attempt survives it (a frozen or cut-off worker): every process on every machine."""
        for m in self.machines:
            m.lose()

    def worker(self, index: int) -> psutil.Process | None:
        """The machine's worker: its process with a LOCAL_RANK (the launcher has none)."""
        for pid in self.machines[index].pids():
            try:
                process = psutil.Process(pid)
                if "LOCAL_RANK" in process.environ():
                    return process
            except psutil.Error:
                continue
        return None


def flip_newest_checkpoint(run: Path) -> str | None:
    """A byte of the newest complete checkpoint's weights flipped, where an older one remains to resume from
    (with none, the resume refuses to start afresh by itself: a person decides)."""
    done = sorted(p for p in (run / "checkpoints").glob("step-*") if (p / "meta.json").exists())
    if len(done) < 2:
        return None
    weights = done[-1] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    return done[-1].name


def inject(fault: Fault, cluster: Cluster, run: Path) -> str:
    """The fault, and what it did where that varies."""
    worker, note = cluster.worker(fault.machine), ""
    if fault.kind in ("kill-worker", "corrupt") and worker is not None:
        if fault.kind == "corrupt":
            flipped = flip_newest_checkpoint(run)
            note = f"flipped a byte of {flipped}" if flipped else "fewer than 2 checkpoints: only the kill"
        worker.send_signal(signal.SIGKILL)
    elif fault.kind == "lose-machine":
        cluster.machines[fault.machine].lose()
    elif fault.kind == "freeze" and worker is not None:
        worker.send_signal(signal.SIGSTOP)
    elif fault.kind == "cut":
        cluster.machines[fault.machine].cut()
    elif fault.kind == "disk-full":
        free = shutil.disk_usage(cluster.disk).free
        with (cluster.disk / "ballast").open("wb") as f:
            os.posix_fallocate(f.fileno(), 0, max(free - 4096, 1))
    elif fault.kind == "slow" and worker is not None:
        until = time.monotonic() + SLOW_S
        try:
            while time.monotonic() < until:
                worker.send_signal(signal.SIGSTOP)
                time.sleep(SLOW_PERIOD_S / 2)
                worker.send_signal(signal.SIGCONT)
                time.sleep(SLOW_PERIOD_S / 2)
        except psutil.NoSuchProcess:
            pass
    elif fault.kind == "preempt":
        for proc in cluster.procs:
            proc.send_signal(signal.SIGTERM)
    return note


def mend(cluster: Cluster) -> None:
    """What the operator (or a replaced node) fixes before the restart: links up, space freed."""
    for m in cluster.machines:
        m.mend()
    (cluster.disk / "ballast").unlink(missing_ok=True)


def final_test(log: Path) -> tuple[int, int] | None:
    found = re.findall(r"^Got (\d+) / (\d+) with accuracy [\d.]+$", log.read_text(), re.M)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def one_run(cluster: Cluster, name: str, cadence: list[str], faults: list[Fault], limit_s: float) -> dict:
    """Start, inject the faults in order, restart after each failure, until the run completes."""
    run, ledger = cluster.disk / name, cluster.disk.parent / "ledgers" / name
    ledger.mkdir(parents=True)
    reader, pending, results = Ledger(ledger), list(faults), []
    started = time.monotonic()
    attempt, open_fault, detected_at = 0, None, started
    while True:
        if time.monotonic() - started > limit_s:
            cluster.clear()
            raise RuntimeError(f"{name}: not finished within {limit_s:.0f} s; logs in {cluster.logs}")
        attempt += 1
        cluster.start(run, ledger, f"{name}-{attempt}")
        before, start_wait = reader.lines, time.monotonic()
        while reader.lines == before and not cluster.ended() and time.monotonic() - start_wait < START_LIMIT_S:
            reader.poll()
            time.sleep(0.1)
        if reader.lines == before:  # trained nothing: ended (a run resumed at its last step), or stuck starting
            codes = cluster.wait_all(END_LIMIT_S if cluster.ended() else 0)
            cluster.clear()
            mend(cluster)
            if codes == [0] * len(codes):
                if open_fault is not None:
                    open_fault.recovered_s = round(time.monotonic() - detected_at, 1)
                break
            continue
        if open_fault is not None:  # the restart that answers the last fault has trained a step
            open_fault.recovered_s = round(time.monotonic() - detected_at, 1)
            open_fault.resumed_from = reader.steps[before] - 1
            open_fault.steps_redone = max(0, open_fault.step - open_fault.resumed_from)
            open_fault = None
        armed = time.monotonic()
        while not cluster.ended():
            reader.poll()
            if pending and time.monotonic() - armed >= pending[0].after_s:
                fault = pending.pop(0)
                result = FaultResult(fault.kind, fault.machine, round(time.monotonic() - started, 1), reader.last_step)
                results.append(result)
                injected = time.monotonic()
                result.note = inject(fault, cluster, run)
                if fault.kind in NOT_FATAL:
                    armed = time.monotonic()
                    continue
                # found: when a machine the fault did not take itself ends (a lost machine's own launcher
                # ends at once, having been killed; a scheduler learns of it from the others)
                survivors = [p for i, p in enumerate(cluster.procs)
                             if not (fault.kind == "lose-machine" and i == fault.machine)]
                while all(p.poll() is None for p in survivors) and time.monotonic() - injected < END_LIMIT_S:
                    reader.poll()
                    time.sleep(0.05)
                detected_at = time.monotonic()
                result.detected_s = round(detected_at - injected, 1)
                open_fault = result
                break
            time.sleep(0.1)
        codes = cluster.end()
        reader.poll()
        if open_fault is not None:
            open_fault.step = max(open_fault.step, reader.last_step)
            open_fault.exit_codes = codes
        elif codes != [0] * len(codes):  # a failure no fault explains: the campaign cannot vouch for its figures
            raise RuntimeError(f"{name}: attempt {attempt} failed by itself ({codes}); logs in {cluster.logs}")
        cluster.clear()
        mend(cluster)
        if codes == [0] * len(codes) and open_fault is None:
            break
    wall = time.monotonic() - started
    return {"name": name, "cadence": cadence, "wall_s": round(wall, 1), "attempts": attempt,
            "faults": [asdict(r) for r in results], "test": final_test(cluster.logs / f"{name}-{attempt}-m0.log")}


@contextmanager
def disk(path: Path):
    path.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(path)], check=True, timeout=30)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False, timeout=30)


def campaign(args: argparse.Namespace) -> dict:
    faults = schedule(args.seed, args.mtbf, args.faults, args.machines, args.kinds)
    base = ["--config", args.config, *[a for s in args.set for a in ("--set", s)]]
    command = " ".join(["python -m benchmarks.faults", *sys.argv[1:]])
    results = {"machine": machine_info(), "command": command, "seed": args.seed, "mtbf_s": args.mtbf,
               "collective_timeout_s": COLLECTIVE_TIMEOUT_S, "schedule": [asdict(f) for f in faults], "runs": []}
    work = Path(tempfile.mkdtemp(prefix="distrnn-faults-"))
    try:
        with netns.machines(args.machines) as made, disk(work / "disk"):
            cluster = Cluster(made, work, base, args.data_dir)
            clean = one_run(cluster, "uninterrupted", [], [], args.limit)
            results["runs"].append(clean)
            for cadence in args.cadence:
                keys = ["--set", f"checkpoint.every_steps={cadence}"]
                if cadence == "auto":
                    keys += ["--set", f"checkpoint.mtbf_s={args.mtbf}"]
                name = f"every-{cadence}"
                print(f"{name}: {len(faults)} faults ...", flush=True)
                cluster.args = [*base, *keys]
                run = one_run(cluster, name, keys, faults, args.limit)
                run["exact"] = exactness(work / "ledgers" / name, work / "ledgers" / "uninterrupted")
                run["goodput"] = round(clean["wall_s"] / run["wall_s"], 3)
                results["runs"].append(run)
                print(json.dumps({k: run[k] for k in ("wall_s", "goodput", "attempts", "exact", "test")}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def render(results: dict) -> str:
    m = results["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cpu_capability']}, bf16: {m['cpu_bf16']}), {m['cores']} cores; torch "
             f"{m['torch']}. Seed {results['seed']}, a fault every {results['mtbf_s']:.0f} s of training on average, "
             f"collective timeout {results['collective_timeout_s']} s.", f"Command: `{results['command']}`", "",
             "| run | wall s | goodput | attempts | faults | steps redone | samples lost | samples used again | "
             "steps unlike the uninterrupted run's | final test |", "|" + " --- |" * 10]
    for run in results["runs"]:
        exact = run.get("exact", {})
        redone = sum(f["steps_redone"] for f in run["faults"])
        test = run["test"]
        lines.append(f"| {run['name']} | {run['wall_s']} | {run.get('goodput', 1.0)} | {run['attempts']} | "
                     f"{len(run['faults'])} | {redone} | {exact.get('samples_lost', 0)} | "
                     f"{exact.get('samples_duplicated', 0)} | {exact.get('steps_unlike_clean', 0)} | "
                     f"{f'{test[0]} / {test[1]}' if test else 'none'} |")
    repeats = next((r["exact"]["clean_repeats"] for r in results["runs"] if "exact" in r), 0)
    lines += ["", f"Samples lost or used again: fewer or more uses than in the uninterrupted run, which itself uses "
              f"{repeats} samples twice (each epoch's last global batch filled up from the epoch's start)."]
    lines += ["", "| run | fault | machine | at s | step | detected after s | recovered after s (to the next "
              "step) | resumed from step | steps redone | exit codes | note |", "|" + " --- |" * 11]
    for run in results["runs"]:
        for f in run["faults"]:
            lines.append(f"| {run['name']} | {f['kind']} | {f['machine']} | {f['at_s']} | {f['step']} | "
                         f"{f['detected_s'] if f['detected_s'] is not None else '-'} | "
                         f"{f['recovered_s'] if f['recovered_s'] is not None else '-'} | "
                         f"{f['resumed_from'] if f['resumed_from'] is not None else '-'} | {f['steps_redone']} | "
                         f"{','.join(map(str, f['exit_codes'])) or '-'} | {f['note']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    # the campaign's own switch (sample-ledger) is set for the runs it starts; one set in this shell is refused
    fault_switch.refuse_in_measurements("benchmarks.faults")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("DISTRNN_DATA_DIR", "./data"))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "faults"))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--machines", type=int, default=2)
    parser.add_argument("--limit", type=float, default=1800, help="seconds one run may take, restarts included")
    parser.add_argument("--print-schedule", action="store_true", help="print the seed's faults and exit")
    parser.add_argument("--quick", action="store_true", help="QUICK's values where not given: the cluster tier's")
    parser.add_argument("--mtbf", type=float, help=f"mean seconds of training between faults ({FULL['mtbf']})")
    parser.add_argument("--faults", type=int, help=f"faults in the schedule ({FULL['faults']})")
    parser.add_argument("--kinds", help=f"the faults drawn from ({FULL['kinds']})")
    parser.add_argument("--cadence", help=f"checkpoint.every_steps values, one run each ({FULL['cadence']})")
    parser.add_argument("--config", help=f"the config of every run ({FULL['config']})")
    parser.add_argument("--set", action="append", default=[], help="a config override for every run")
    args = parser.parse_args()
    for name, value in (QUICK if args.quick else FULL).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.set = [*QUICK_SETS, *args.set]
    args.cadence, args.kinds = args.cadence.split(","), tuple(args.kinds.split(","))
    if unknown := set(args.kinds) - set(KINDS):
        sys.exit(f"benchmarks.faults: unknown fault kinds {sorted(unknown)}; choose from {', '.join(KINDS)}")
    if args.print_schedule:
        print(json.dumps([asdict(f) for f in schedule(args.seed, args.mtbf, args.faults, args.machines, args.kinds)]))
        return
    if (why := netns.available()) is not None:
        sys.exit(f"benchmarks.faults: {why}")
    results = campaign(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
