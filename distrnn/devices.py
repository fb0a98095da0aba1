"""What this machine's devices can do: GPUs visible to torch, and which precisions they run.

Checked twice on purpose, with the same function: by `distrnn train` before any worker starts, and
by each worker (which `accelerate launch -m distrnn.train` reaches without the distrnn CLI).
"""

from __future__ import annotations

from distrnn.errors import DistrnnError


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def gpu_bf16_supported() -> bool:
    import torch

    return torch.cuda.is_bf16_supported()


def check_precision(precision: str, on_cpu: bool, gpu_bf16: bool | None = None) -> None:
    """Refuse a precision the chosen device cannot run."""
    if on_cpu and precision == "fp16":
        # Measured: Accelerate silently trains in fp32 when asked for fp16 on a CPU.
        raise DistrnnError("precision fp16 needs a GPU; on CPU use --precision bf16 or --precision no")
    if not on_cpu and precision == "bf16":
        if not (gpu_bf16_supported() if gpu_bf16 is None else gpu_bf16):
            raise DistrnnError("precision bf16 is not supported by this GPU; use --precision fp16 or --precision no")
