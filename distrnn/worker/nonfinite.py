"""Keeping a non-finite loss from updating the weights, without a host sync per step.

Reading a loss on the host (`if not torch.isfinite(loss)`) every step stops a GPU's queue; so all
of this stays on the device, and the training loop reads it every CHECK_EVERY steps:

- a non-finite local loss is multiplied by NaN before backward (finite ones by 1.0, exactly), so its
  gradients are NaN, and DDP's gradient all-reduce spreads them to every rank: every rank sees the
  same non-finite gradients, with no extra collective;
- the fused Adam kernel skips its update where `found_inf` is non-zero (GradScaler's protocol), and
  the flag stays set, so every later update is skipped too: the weights stay those from before the
  first bad step until the check stops the run.
With fp16 the grad scaler owns `found_inf` (it skips overflowing steps and lowers its scale); a
non-finite loss still stops the run at the next check, and ScalerSkips tells which updates it skipped.
"""

from __future__ import annotations

from collections import deque

import torch
from accelerate import Accelerator
from torch import nn

from distrnn.data.loaders import Batch
from distrnn.errors import DistrnnError
from distrnn.run.folder import RunFolder

CHECK_EVERY = 10  # steps between host reads: a stop signal waits at most this many steps


class NonFiniteGuard:
    def __init__(self, optimizer: torch.optim.Optimizer, device: torch.device, scaler_owns_skips: bool):
        self.skip = torch.zeros((), dtype=torch.float32, device=device)
        self.first_bad_loss_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.first_bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        self.first_bad_grad_step = torch.full((), -1, dtype=torch.int64, device=device)
        self.recent: deque[tuple[int, int, Batch]] = deque(maxlen=CHECK_EVERY)
        self.scaler_owns_skips = scaler_owns_skips
        if not scaler_owns_skips:
            optimizer.found_inf = self.skip  # read by the fused Adam step

    def loss_for_backward(self, loss: torch.Tensor, step: int, step_in_epoch: int, batch: Batch) -> torch.Tensor:
        """`loss`, or NaN when it is not finite (x * 1.0 is x: finite losses train bit-identically)."""
        value = loss.detach().float()
        bad = ~torch.isfinite(value)
        first = bad & (self.first_bad_loss_step < 0)
        self.first_bad_loss_step = torch.where(first, step, self.first_bad_loss_step)
        self.first_bad_loss = torch.where(first, value, self.first_bad_loss)
        self.recent.append((step, step_in_epoch, batch))
        return loss * torch.where(bad, torch.nan, 1.0).to(loss.dtype)

    def grads_computed(self, grad_norm: torch.Tensor, step: int) -> None:
        """Mark this and every later update to be skipped once the (all-reduced) gradients are not finite."""
        bad = ~torch.isfinite(grad_norm)
        self.first_bad_grad_step = torch.where(bad & (self.first_bad_grad_step < 0), step, self.first_bad_grad_step)
        self.skip.copy_(torch.maximum(self.skip, bad.float()))

    def clip_and_check(self, accelerator: Accelerator, model: nn.Module, grad_clip: float | None, step: int) -> None:
        """Clip the gradients (optim.grad_clip) and mark the update to be skipped if their norm is not finite."""
        norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if grad_clip is not None else None
        if not self.scaler_owns_skips:
            self.grads_computed(total_norm(model.parameters()) if norm is None else norm, step)

    def flags(self) -> tuple[torch.Tensor, torch.Tensor]:
        """On the device: did this rank see a non-finite loss, a non-finite gradient."""
        return self.first_bad_loss_step >= 0, self.first_bad_grad_step >= 0

    def read(self) -> tuple[int, float, int]:
        """On the host (a sync): this rank's first non-finite loss (step or -1, value) and first skipped step."""
        steps = torch.stack([self.first_bad_loss_step, self.first_bad_grad_step]).tolist()
        return steps[0], float(self.first_bad_loss), steps[1]

    def entry_at(self, step: int) -> tuple[int, Batch] | None:
        """(batch number in its epoch, the batch) of a recent step."""
        return next(((in_epoch, batch) for s, in_epoch, batch in self.recent if s == step), None)


class ScalerSkips:
    """fp16: whether the grad scaler skipped the update just made (an overflow), so that the schedule
    advances only with the weights and summary.json counts the skips.

    Accelerate's `step_was_skipped` cannot tell with a fused optimizer: GradScaler passes found_inf to
    the fused kernel (`_step_supports_amp_scaling`), so the patched step accelerate watches is always
    called and the flag is always False, while the kernel leaves the weights unchanged. The scaler
    lowers its scale exactly when it skips (backoff after an inf or NaN; it only grows otherwise), so a
    lower scale than after the previous update means this one was skipped. Reading it is one host sync
    per update, the one the scaler's unfused path makes anyway (it reads found_inf before stepping).
    """

    def __init__(self, scaler: torch.amp.GradScaler | None):
        self.scaler = scaler
        self.scale = scaler.get_scale() if scaler is not None else None  # after a resume: the restored one

    def last_update_skipped(self) -> bool:
        """Call once after each optimizer update (accelerate's step, which also updates the scaler)."""
        if self.scaler is None:
            return False
        before, self.scale = self.scale, self.scaler.get_scale()
        return self.scale < before


def total_norm(parameters) -> torch.Tensor:
    grads = [p.grad for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))


def raise_nonfinite(accelerator: Accelerator, model: nn.Module, guard: NonFiniteGuard, folder: RunFolder, epoch: int,
                    loss_step: int, loss_value: float, grad_step: int) -> None:
    """Raised by each rank whose loss was not finite (or by every rank, for gradients that became
    non-finite with finite losses), after saving the weights from before that step and the batch
    (`epoch`: the 0-based epoch in progress)."""
    step = loss_step if loss_step >= 0 else grad_step
    if step < 0 or (loss_step < 0 and not accelerator.is_main_process):
        return  # another rank had it, or (gradients: the same on every rank) the main process reports it
    entry = guard.entry_at(step)
    in_epoch, batch = entry if entry else (None, None)
    folder.debug.mkdir(parents=True, exist_ok=True)
    torch.save({"model": accelerator.unwrap_model(model).state_dict(), "loss": loss_value,
                "images": batch[0].cpu() if batch else None, "labels": batch[1].cpu() if batch else None,
                "global_step": step, "epoch": epoch + 1, "batch": in_epoch},
               folder.debug_file(step, accelerator.process_index))
    what = f"the training loss became {loss_value}" if loss_step >= 0 else "the gradients became non-finite"
    raise DistrnnError(f"{what} at step {step} (epoch {epoch + 1}, batch {in_epoch}); model and batch saved in "
                       f"{folder.debug}; lower --lr or set optim.grad_clip")
