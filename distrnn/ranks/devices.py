"""What this machine's devices can do, and the numeric settings a run asks of them.

The precision check runs twice on purpose, with the same function: in `distrnn train` before any
worker starts, and in each worker (which `accelerate launch -m distrnn.train` reaches without the
distrnn CLI).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distrnn.errors import DistrnnError

# What says GPUs were allocated to this process, and the values that mean "none".
_GPU_ALLOCATION = {"CUDA_VISIBLE_DEVICES": ("", "-1", "NoDevFiles"), "SLURM_JOB_GPUS": ("",),
                   "SLURM_STEP_GPUS": ("",), "SLURM_GPUS_ON_NODE": ("", "0")}


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def runs_on_cpu(mode: str, gpus: int | None = None) -> bool:
    """`--mode`'s device: the launch side's one CPU-or-GPU decision, for both launchers (torchrun's and Ray's).
    cpu: the CPU; gpu and ddp: a GPU; auto: a GPU when this machine's torch sees one (`gpus`, counted here when
    None: only auto asks torch). auto refuses GPUs that were allocated but cannot be seen
    (check_allocated_gpus_usable) rather than train on the CPU without a word."""
    if mode != "auto":
        return mode == "cpu"
    gpus = visible_gpus() if gpus is None else gpus
    check_allocated_gpus_usable(gpus)
    return gpus == 0


# Accelerate's own switch: an Accelerator made where it is set takes the CPU even with GPUs visible
# (accelerate's `cpu` flag reads it). The launchers set it for their workers under --mode cpu.
USE_CPU_VARIABLE = "ACCELERATE_USE_CPU"


def will_run_on_cpu() -> bool:
    """What an Accelerator made in this process will choose: the CPU when asked (ACCELERATE_USE_CPU,
    which `--mode cpu` sets) or when no GPU is visible."""
    return os.environ.get(USE_CPU_VARIABLE, "").lower() in ("1", "true", "yes") or visible_gpus() == 0


def gpu_bf16_supported() -> bool:
    """Native bf16 only: the default also says True for GPUs that merely emulate it (pre-Ampere)."""
    import torch

    return torch.cuda.is_bf16_supported(including_emulation=False)


# CPU features with which torch runs bf16 matmuls and RNN cells in hardware (oneDNN): x86's AVX512-BF16 and AMX,
# Arm's BF16 and SVE-BF16. Without them bf16 is emulated in software: the fast config (batch 512) trained 24x
# slower than fp32 on an AMD EPYC with AVX2 only (105 vs 2,554 samples/s) and the bare loop ran 2.8x slower on an
# Intel Xeon with AVX-512 but neither (benchmarks/bare_loop.py, batch 512, 1,261 vs 3,518 samples/s).
NATIVE_BF16_FEATURES = {"avx512_bf16": "AVX512-BF16", "amx_bf16": "AMX", "bf16": "BF16", "sve_bf16": "SVE-BF16"}
EMULATED_BF16_SLOWDOWN = "2.8x (Intel Xeon, AVX-512) to 24x (AMD EPYC, AVX2 only)"


def cpu_capabilities() -> Mapping[str, Any]:
    """torch's own view of this CPU's instruction sets (what its kernels dispatch on), not /proc/cpuinfo's."""
    import torch

    return torch.cpu.get_capabilities()


def cpu_capability() -> str:
    """The vector level torch's CPU kernels run at: AVX2, AVX512, ... (torch.backends.cpu)."""
    import torch

    return torch.backends.cpu.get_cpu_capability()


def cpu_bf16_native() -> str | None:
    """The feature with which this CPU runs bf16 natively (e.g. 'AMX'), or None where bf16 is emulated."""
    capabilities = cpu_capabilities()
    return next((name for key, name in NATIVE_BF16_FEATURES.items() if capabilities.get(key)), None)


@dataclass(frozen=True)
class PrecisionChoice:
    """What train.precision asked for, what runs, and why (the start line, summary.json, distrnn env)."""

    requested: str
    chosen: str
    reason: str | None = None  # said for `auto` and for bf16 where it is emulated

    def describe(self) -> str:
        if self.requested == self.chosen:
            return self.chosen + (f" ({self.reason})" if self.reason else "")
        return f"{self.requested} -> {self.chosen} ({self.reason})"

    def to_dict(self) -> dict[str, str | None]:
        return {"requested": self.requested, "chosen": self.chosen, "reason": self.reason}


def choose_precision(requested: str, on_cpu: bool) -> PrecisionChoice:
    """`auto`: bf16 where the device runs it natively, else fp32 (fp16 stays an explicit GPU choice: it needs a
    grad scaler and can skip updates). An explicit precision runs as asked; bf16 on a CPU that emulates it says so."""
    if on_cpu:
        native = cpu_bf16_native()
        if native is None and requested in ("auto", "bf16"):
            return PrecisionChoice(requested, "no" if requested == "auto" else "bf16",
                                   f"this CPU has no native bf16: {cpu_capability()}")
        if native is not None and requested == "auto":
            return PrecisionChoice(requested, "bf16", f"this CPU runs bf16 natively: {native}")
        return PrecisionChoice(requested, requested)
    if requested == "auto":
        native = gpu_bf16_supported()
        return PrecisionChoice(requested, "bf16" if native else "no",
                               "this GPU runs bf16 natively" if native else "this GPU has no native bf16")
    return PrecisionChoice(requested, requested)


def emulated_bf16_warning(choice: PrecisionChoice) -> str | None:
    """One line for an explicit bf16 on a CPU that emulates it, with the measured cost and the fix."""
    if choice.requested != "bf16" or choice.reason is None:
        return None
    return (f"warning: precision bf16 is emulated on this CPU ({choice.reason}); measured {EMULATED_BF16_SLOWDOWN} "
            "slower than fp32: use --precision auto or --precision no")


def check_precision(precision: str, on_cpu: bool, gpu_bf16: bool | None = None) -> None:
    """Refuse a precision the chosen device cannot run."""
    if on_cpu and precision == "fp16":
        # Measured: Accelerate silently trains in fp32 when asked for fp16 on a CPU.
        raise DistrnnError("precision fp16 needs a GPU; on CPU use --precision bf16 or --precision no")
    if not on_cpu and precision == "bf16":
        if not (gpu_bf16_supported() if gpu_bf16 is None else gpu_bf16):
            raise DistrnnError("precision bf16 is not supported by this GPU; use --precision fp16 or --precision no")


def set_numerics(tf32: bool, deterministic: bool) -> None:
    """fp32 means fp32 unless TF32 is asked for; `deterministic` sets what bit-exact GPU runs need.

    cuDNN RNNs default to TF32 on Ampere and newer (torch.backends.cudnn.rnn.fp32_precision is
    'tf32' in torch 2.14): a 10-bit mantissa in every recurrent matmul of a `--precision no` run.
    """
    import torch

    mode = "tf32" if tf32 else "ieee"
    if hasattr(torch.backends.cudnn, "rnn"):  # torch >= 2.9: per-backend fp32 precision
        torch.backends.cudnn.rnn.fp32_precision = mode
        torch.backends.cuda.matmul.fp32_precision = mode
    else:
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
    if deterministic:
        # cuBLAS reads this when it creates its handle (the first matmul), so before any GPU work.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def nvidia_driver() -> str | None:
    """The NVIDIA kernel driver's version, or None where there is none."""
    version = Path("/proc/driver/nvidia/version")
    if version.is_file():
        words = version.read_text().split()
        numbers = [w for w in words if w.count(".") >= 1 and w.replace(".", "").isdigit()]
        if numbers:
            return numbers[0]
    if shutil.which("nvidia-smi"):
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode == 0 and result.stdout.strip():
            return result.stdout.splitlines()[0].strip()
    return None


def allocated_gpus() -> str | None:
    """'VAR=value' for the first variable saying GPUs were allocated to this process, else None."""
    for name, none in _GPU_ALLOCATION.items():
        value = os.environ.get(name)
        if value is not None and value not in none:
            return f"{name}={value}"
    return None


def check_allocated_gpus_usable(gpus: int) -> None:
    """GPUs were allocated but this torch sees none (a CPU build, a driver too old for its CUDA, an
    architecture it was not built for): stop rather than train on the CPU without a word."""
    allocated = allocated_gpus()
    if gpus or allocated is None:
        return
    import torch

    build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    driver = nvidia_driver() or "no NVIDIA driver found"
    raise DistrnnError(f"GPUs were allocated ({allocated}) but torch {torch.__version__} ({build}) sees none "
                       f"(driver: {driver}); install a torch built for this driver and GPU, or use --mode cpu")
