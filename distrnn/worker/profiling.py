"""A profile on request: train.profile_steps=A-B records optimizer steps A to B (counted from 1, as the
logged steps) with torch.profiler on every rank, into RUN/profile/rank-R.json: Chrome trace files
(`traceEvents`) that Perfetto (ui.perfetto.dev) and chrome://tracing open. Each rank then prints one line
naming its three most expensive operations. Nothing is recorded when the key is unset.
"""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfile:
    def __init__(self, steps: str | None, folder: Path, rank: int, device: torch.device):
        self.first, self.last = (int(n) for n in steps.split("-")) if steps else (0, -1)
        self.path, self.rank, self.cuda = folder / f"rank-{rank}.json", rank, device.type == "cuda"
        self.profiler: torch.profiler.profile | None = None

    def at(self, global_step: int) -> None:
        """Call with the optimizer steps done so far (after each update, and once at the start)."""
        if global_step == self.first - 1 and self.profiler is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profiler = torch.profiler.profile(activities=activities, record_shapes=True)
            self.profiler.__enter__()
        elif global_step == self.last and self.profiler is not None:
            self._write()

    def _write(self) -> None:
        profiler, self.profiler = self.profiler, None
        profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.path))
        time_of = (lambda e: e.self_device_time_total) if self.cuda else (lambda e: e.self_cpu_time_total)
        events = [e for e in profiler.key_averages() if time_of(e) > 0]
        total = sum(time_of(e) for e in events) or 1
        top = ", ".join(f"{e.key} {100 * time_of(e) / total:.0f}%"
                        for e in sorted(events, key=time_of, reverse=True)[:3])
        print(f"profile: rank {self.rank}, steps {self.first}-{self.last} -> {self.path}; most time in: {top}",
              flush=True)
