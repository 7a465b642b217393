"""Training health: loss spikes and router collapse warn (non-finite losses and
gradients are the trainer's to stop or skip, before the update)."""

from __future__ import annotations

import statistics
from collections import deque

from ..errors import NonFiniteError

NonFiniteLoss = NonFiniteError  # the older name


class HealthMonitor:
    """Watches training: warns on loss spikes (loss > factor x running median) and on router collapse (a layer's max-
    violation above a threshold for a window of logged steps); its state is saved in checkpoints."""

    def __init__(
        self,
        spike_factor: float,
        spike_window: int,
        collapse_max_violation: float,
        collapse_window: int,
        state: dict | None = None,
    ):
        self.spike_factor, self.collapse_mv, self.collapse_window = (
            spike_factor,
            collapse_max_violation,
            collapse_window,
        )
        state = state or {}
        self.losses = deque(state.get("losses", []), maxlen=spike_window)
        self.collapse_run: list[int] = list(state.get("collapse_run", []))
        self.spikes = int(state.get("spikes", 0))

    def state(self) -> dict:
        """The monitor's state (recent losses, collapse counters, spike count) for a checkpoint."""
        return {"losses": list(self.losses), "collapse_run": self.collapse_run, "spikes": self.spikes}

    def check_loss(self, step: int, loss: float) -> str | None:
        """A warning on a spike (a finite loss > factor x the running median), else None."""
        warning = None
        if len(self.losses) >= min(10, self.losses.maxlen or 10):
            med = statistics.median(self.losses)
            if loss > self.spike_factor * med:
                self.spikes += 1
                warning = f"loss spike at step {step}: {loss:.3f} > {self.spike_factor} x median {med:.3f}"
        self.losses.append(loss)
        return warning

    def check_router(self, step: int, max_violations: list[float]) -> list[str]:
        """Warn when a layer's max-violation stays above the threshold for the window."""
        if len(self.collapse_run) != len(max_violations):
            self.collapse_run = [0] * len(max_violations)
        out = []
        for i, mv in enumerate(max_violations):
            self.collapse_run[i] = self.collapse_run[i] + 1 if mv > self.collapse_mv else 0
            if self.collapse_run[i] == self.collapse_window:
                out.append(
                    f"router collapse in MoE layer {i} at step {step}: max-violation above "
                    f"{self.collapse_mv} for {self.collapse_window} logged steps"
                )
        return out
