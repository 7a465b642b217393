"""Progress for humans: a tqdm bar on a terminal; in a log file (stderr not a terminal)
one plain line per ~5% of the run instead of thousands of carriage-return redraws."""

from __future__ import annotations

import sys

from tqdm import tqdm


class Progress:
    """A progress bar on a terminal; otherwise a plain line every ~5% of the run (log files stay readable)."""

    def __init__(self, end: int, start: int, name: str, quiet: bool, stream=None):
        self.stream = stream or sys.stderr
        self.name, self.quiet, self.end = name, quiet, end
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.bar = (
            tqdm(total=end, initial=start, file=self.stream, dynamic_ncols=True, desc=name, unit="step")
            if self.tty and not quiet
            else None
        )
        self.every = max(1, end // 20)
        self._last_line = start

    def update(self, step: int) -> None:
        """Advance the bar to `step`."""
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, step: int, loss: float, val_loss: float | None, tokens_per_s: float) -> None:
        """Called at each logged step; on a terminal updates the bar, else prints a line now and then."""
        val = f"{val_loss:.3f}" if val_loss is not None else "-"
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.3f}", val=val, tok_s=f"{tokens_per_s:,.0f}")
        elif not self.quiet and (step - self._last_line >= self.every or step == self.end):
            self._last_line = step
            print(
                f"{self.name}: step {step}/{self.end} loss {loss:.3f} val {val} {tokens_per_s:,.0f} tok/s",
                file=self.stream,
                flush=True,
            )

    def write(self, msg: str) -> None:
        """A message that must not be lost under the bar."""
        if self.bar is not None:
            tqdm.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()
