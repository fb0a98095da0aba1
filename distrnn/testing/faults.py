"""Fault injection for tests: the one switch, DISTRNN_FAULTS, read only here.

Comma-separated faults, set in the environment of the process (or of one node's launcher) that
should have them; unset in every real run:

    save-oserror        this process fails to write its part of a checkpoint (disk quota exceeded)
    startup-error=S:R   rank R fails at start-up stage S: checkpoint (loading it), trackers, prepare
    publish-delay=S     the main process waits S seconds between writing a checkpoint and renaming it
    slow-open=MS        each open for an fsync costs MS milliseconds more (a metadata round trip on NFS or Lustre),
                        the main process starts writing each checkpoint MS milliseconds late, and the other ranks
                        go on to their fsyncs only once its temporary model.safetensors (.tmp*) is there (or
                        renamed; at most 5 s): a rank opening a file that the main process renames under it
    cudnn-flat-weights  the RNN's weights become views of one flat buffer, as cuDNN lays them out on a GPU
    cuda-bf16-rnn       under bf16 the RNN runs by hand in bf16 outside autocast, as it does on a GPU
    fp16-init-scale=X   the fp16 grad scaler starts at scale X (a huge one forces overflows: make gpu-check)
    slow-rank=R:MS      rank R spends MS milliseconds more in every step's compute (a slow node)
    sample-ledger=DIR   at every optimizer step each rank appends the training indices of the micro-batches that
                        step really applied (the trainer's update boundary, not the loader's grouping) to
                        DIR/rank-R.jsonl (the tests' proof that a resume trains on exactly the same samples)
    takeover-pause=DIR  a run that judged a folder's hold stale writes DIR/judged-PID and waits (at most 60 s)
                        for DIR/go-PID before taking it over: the tests order two runs racing for one hold
    hold-launcher=FILE  the launcher, once its workers ended, waits until FILE exists (at most HOLD_LAUNCHER_S),
                        as torchrun's exit barrier holds it while other machines finish
    skip-collective=R:N rank R skips its first synchronous all_reduce from its Nth collective on (collective_log's
                        numbering), as a rank that took another branch does (the hang report's tests)
    shape-mismatch=R:N:D  rank R calls its first synchronous all_reduce from its Nth collective on with D elements
                        more (D > 0: gloo aborts the rank that receives them) or fewer (D < 0: rank R's sum is
                        silently wrong and the ranks' next collectives are paired wrongly) than the other ranks
    stop-at=STEP        every rank takes a stop request (as if SIGUSR1 had arrived) at optimizer step STEP, and
                        stops at that step's check (every step with train.log_every=1: a stop at a chosen step)
"""

from __future__ import annotations

import errno
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING

from distrnn.errors import DistrnnError

if TYPE_CHECKING:  # annotations only: the launcher imports this module and must not import torch; and
    # run.folder -> run.integrity -> testing.faults -> run.folder would be a cycle
    from torch import nn

    from distrnn.run.folder import CheckpointFolder

HOLD_LAUNCHER_S = 300  # a test that never releases the launcher ends in at most this


def _active() -> dict[str, str]:
    faults = {}
    for item in os.environ.get("DISTRNN_FAULTS", "").split(","):
        name, _, value = item.strip().partition("=")
        if name:
            faults[name] = value
    return faults


def injected() -> str | None:
    """DISTRNN_FAULTS as set in this process, or None: recorded in summary.json and shown by distrnn env."""
    return os.environ.get("DISTRNN_FAULTS", "").strip() or None


def for_workers() -> dict[str, str]:
    """DISTRNN_FAULTS for workers that do not inherit the launcher's environment (Ray's start in its raylets)."""
    value = injected()
    return {"DISTRNN_FAULTS": value} if value else {}


def announce(rank: int) -> None:
    """One line from each process that runs with faults: a DISTRNN_FAULTS left in a shell is never silent. One
    write, so that two ranks' lines are never interleaved on a shared terminal."""
    if value := injected():
        sys.stdout.write(f"warning: DISTRNN_FAULTS={value} is set on rank {rank}: test faults are injected into this "
                         "run; unset it for a real run\n")
        sys.stdout.flush()


def refuse_in_measurements(program: str) -> None:
    """Benchmarks and results tables measure real runs: faults in their environment would change every number."""
    if value := injected():
        raise SystemExit(f"{program}: DISTRNN_FAULTS={value} is set and would inject test faults into what is "
                         "measured; unset it (env -u DISTRNN_FAULTS ...) and run again")


def fail_save() -> None:
    if "save-oserror" in _active():
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))


def fail_startup(stage: str, rank: int) -> None:
    stage_rank = _active().get("startup-error")
    if stage_rank == f"{stage}:{rank}":
        raise DistrnnError(f"injected start-up fault: {stage} failed on rank {rank} (DISTRNN_FAULTS)")


def grad_scaler_init_scale() -> float | None:
    value = _active().get("fp16-init-scale")
    return float(value) if value else None


def slow_down(rank: int) -> None:
    value = _active().get("slow-rank")
    if value and int(value.split(":")[0]) == rank:
        time.sleep(float(value.split(":")[1]) / 1000)


def _collective_chosen(fault: str, seq: int, op: str, async_op: bool) -> list[str] | None:
    """`fault`=R:N[:...]: its values on rank R's first synchronous all_reduce from its Nth collective on (once per
    process, for skip-collective and shape-mismatch together), else None."""
    if f"{fault}=" not in os.environ.get("DISTRNN_FAULTS", ""):  # every collective of every run passes here
        return None
    values = _active()[fault].split(":")
    if op != "all_reduce" or async_op or values[0] != os.environ.get("RANK", "0") or seq < int(values[1]) \
            or _changed:
        return None
    _changed.append(seq)
    return values


_changed: list[int] = []  # the one collective this process's skip-collective or shape-mismatch changed


def skip_collective(seq: int, op: str, async_op: bool) -> bool:
    """skip-collective=R:N, in collective_log's wrapper: True for rank R's first synchronous all_reduce from its
    Nth collective on (skipped: its tensor keeps its own values, as when the call is not made)."""
    return _collective_chosen("skip-collective", seq, op, async_op) is not None


def mismatch_shape(seq: int, op: str, async_op: bool, args: tuple) -> tuple:
    """shape-mismatch=R:N:D, in collective_log's wrapper: rank R's first synchronous all_reduce from its Nth
    collective on gets a tensor D elements longer or shorter (its own tensor is left as it was)."""
    chosen = _collective_chosen("shape-mismatch", seq, op, async_op) if args else None
    if chosen is None:
        return args
    import torch  # only here: this module is imported by the launcher, which must not import torch for it

    flat, delta = args[0].flatten(), int(chosen[2])
    changed = torch.cat([flat, flat[:delta]]) if delta > 0 else flat[:delta].clone()
    return (changed, *args[1:])


_micro_batches: list[list[int]] = []  # sample-ledger: this rank's micro-batches since its last optimizer step


def record_micro_batch(indices) -> None:
    """sample-ledger: a micro-batch the loader gave this rank; update_applied says which update applied it."""
    if "sample-ledger" in _active():
        _micro_batches.append(indices.tolist())


def update_applied(epoch: int, step: int, stop_request) -> None:
    """The trainer's update boundary: optimizer step `step` (1-based, over the run) just applied the micro-batches
    given since the last one. sample-ledger records them (a micro-batch never applied, its gradient dropped,
    appears in no line); stop-at puts SIGUSR1 in `stop_request` (a preemption.StopRequest) at its step."""
    folder, stop = _active().get("sample-ledger"), _active().get("stop-at")
    if folder:
        with open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.jsonl"), "a") as f:
            f.write(json.dumps({"epoch": epoch, "step": step, "micro_batches": _micro_batches}) + "\n")
        _micro_batches.clear()
    if stop and int(stop) == step:
        stop_request.signal = signal.SIGUSR1


def delay_publish() -> None:
    time.sleep(float(_active().get("publish-delay", "0") or 0))


def pause_before_takeover() -> None:
    folder = _active().get("takeover-pause")
    if not folder:
        return
    pid = os.getpid()
    with open(os.path.join(folder, f"judged-{pid}"), "w"):
        pass
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(folder, f"go-{pid}")) and time.monotonic() < deadline:
        time.sleep(0.02)


def _slow_open_s() -> float:
    return float(_active().get("slow-open", "0") or 0) / 1000


def slow_open() -> None:
    time.sleep(_slow_open_s())


def delay_main_save(is_main: bool) -> None:
    """slow-open: the main process writes late, so that the other ranks are watching the folder by then."""
    if is_main:
        slow_open()


def await_main_file_in_flight(checkpoint: CheckpointFolder) -> None:
    """slow-open, on a rank other than the main one: return once the main process's temporary
    model.safetensors (safetensors writes it as .tmpXXXXXX, then renames it) is in `checkpoint`, or renamed
    already (missed: no race at this save)."""
    if not _slow_open_s():
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(name.startswith(".tmp") or name == checkpoint.weights.name
                                                  for name in os.listdir(checkpoint.path)):
        time.sleep(0.0001)  # the temporary file lives about 1 ms (1.1 MB for the smoke model)


def flatten_like_cudnn(rnn: nn.RNNBase) -> None:
    """Make every weight of `rnn` a view of one flat buffer, as `flatten_parameters` does on CUDA.

    Reproduces on a CPU the layout that made safetensors keep one of the eight RNN tensors.
    """
    if "cudnn-flat-weights" not in _active():
        return
    import torch
    from torch import nn

    names = list(rnn._flat_weights_names)
    tensors = [getattr(rnn, name).detach() for name in names]
    flat = torch.cat([t.reshape(-1) for t in tensors])
    offset = 0
    for name, tensor in zip(names, tensors):
        setattr(rnn, name, nn.Parameter(flat[offset : offset + tensor.numel()].view_as(tensor)))
        offset += tensor.numel()
    rnn._init_flat_weights()


def run_rnn_as_on_a_gpu() -> None:
    """cuda-bf16-rnn: make model.py choose, on a CPU, what it chooses on a GPU under bf16 autocast (the RNN
    run by hand with bf16 copies of its weights, model.recurrent_in), so that DDP's gradient hooks and
    accumulation through that path run in CPU tests."""
    if "cuda-bf16-rnn" not in _active():
        return
    from distrnn import model

    choose = model.rnn_dtype_outside_autocast
    model.rnn_dtype_outside_autocast = lambda device_type, enabled, dtype: choose("cuda", enabled, dtype)


def hold_launcher() -> None:
    path = _active().get("hold-launcher")
    deadline = time.monotonic() + HOLD_LAUNCHER_S
    while path and not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.05)
