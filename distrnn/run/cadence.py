"""When the trainer writes a periodic checkpoint: every `checkpoint.every_steps` optimizer steps, or, with
`every_steps: auto`, at the interval that wastes least wall time for what a save costs and how often the run
fails (Young 1974, Daly 2006: first-order optimum sqrt(2 x save cost x mean time between failures)).

Both inputs are measured here, not guessed: the save cost is the last save's wall time and the step time the
training seconds per optimizer step since the save before it, both the main process's (one broadcast after
every save, so that every rank decides the same next step). The mean time between failures is
`checkpoint.mtbf_s`, or this run's own history: (training seconds so far + PRIOR_MTBF_S) /
(interruptions so far + 1); a run never interrupted keeps close to the prior, one interrupted often moves to
what it has seen. Epoch ends save regardless (trainer.end_epoch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from accelerate import Accelerator

from distrnn.ranks.collectives import from_main

# A fresh run's first save under auto: 20 steps measure a step time past the first steps' warm-up (allocator,
# thread pools: the first 2-3 steps of the default config take 2-5x the rest) and cost one save of ~0.1-0.5 s
# (docs/checkpoints.md's save cost), after which every interval is computed.
PROBE_STEPS = 20
PRIOR_MTBF_S = 3600.0  # one failure an hour: the assumption before the run has seen any


def young_daly_interval_s(save_s: float, mtbf_s: float) -> float:
    """Seconds of training between checkpoints that minimise the expected waste (saves plus work redone)."""
    return math.sqrt(2 * save_s * mtbf_s)


def expected_mtbf_s(configured: float | None, train_seconds: float, interruptions: int) -> float:
    if configured is not None:
        return configured
    return (train_seconds + PRIOR_MTBF_S) / (interruptions + 1)


@dataclass
class Cadence:
    every_steps: int | str | None  # the config's value: N, "auto" or None (epoch ends only)
    mtbf_s: float | None  # checkpoint.mtbf_s
    next_step: int | None = None  # auto: the step of the next periodic save
    interval_steps: int | None = None  # auto: the last interval computed (printed, and read by the tests)

    def start(self, global_step: int) -> None:
        if self.every_steps == "auto":
            self.next_step = global_step + PROBE_STEPS

    def due(self, global_step: int) -> bool:
        if self.every_steps == "auto":
            return global_step >= self.next_step
        return bool(self.every_steps) and global_step % self.every_steps == 0

    def saved(self, accelerator: Accelerator, global_step: int, save_s: float, step_s: float | None,
              train_seconds: float, interruptions: int) -> str | None:
        """After any save (periodic, epoch end, stop): under auto, the next periodic one's step, and the line
        that says why. `step_s`: training seconds per optimizer step since the previous save (None: no step)."""
        if self.every_steps != "auto" or step_s is None:
            return None
        save_s, step_s = from_main(accelerator, (save_s, step_s))
        mtbf_s = expected_mtbf_s(self.mtbf_s, train_seconds, interruptions)
        interval_s = young_daly_interval_s(save_s, mtbf_s)
        self.interval_steps = max(1, round(interval_s / max(step_s, 1e-6)))
        self.next_step = global_step + self.interval_steps
        return (f"checkpoint every {self.interval_steps} steps ({interval_s:.1f} s): a save costs {save_s:.2f} s, "
                f"a step {step_s * 1000:.1f} ms, failures expected every {mtbf_s:.0f} s")
