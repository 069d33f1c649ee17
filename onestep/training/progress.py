"""Training progress on stderr: a tqdm bar on a terminal, one plain line every N seconds in a log file.

The bar counts toward whichever budget ends first: `max_steps`, or the step the `max_minutes` budget will reach at
the speed so far (so a 10-minute run shows the steps it will take, and ETA = the time left, not a 100000-step ETA).
"""

from __future__ import annotations

import math
import sys
import time

from tqdm.auto import tqdm


def expected_total(step: int, elapsed_s: float, max_steps: int, max_minutes: float | None) -> int:
    """The step the run will end at: max_steps, or earlier where the time budget ends first at the speed so far."""
    if max_minutes is None or step <= 0 or elapsed_s <= 0:
        return max_steps
    at_budget = math.ceil(step * 60 * max_minutes / elapsed_s)
    return max(step, min(max_steps, at_budget))


class Progress:
    """Progress of the training loop; `update` once per step with the training time so far.

    On a terminal it redraws a tqdm bar; otherwise (CI, nohup, a pipe) it prints one line every `every_s` seconds
    and a last one at `close`, in tqdm's format, so that a log holds a few lines rather than thousands of redraws.
    """

    def __init__(self, max_steps: int, max_minutes: float | None, initial: int, every_s: float,
                 enabled: bool = True, desc: str = "train"):
        self.max_steps, self.max_minutes, self.every_s, self.desc = max_steps, max_minutes, every_s, desc
        self.enabled, self.terminal = enabled, sys.stderr.isatty()
        self.initial = self.step = initial
        self.total = max_steps
        self.postfix = ""
        self.printed: tuple[int, int] | None = None  # (step, total) of the last line printed
        self.bar = tqdm(total=max_steps, initial=initial, dynamic_ncols=True, desc=desc,
                        disable=not (enabled and self.terminal))
        self.start = self.last_line = time.monotonic()

    def update(self, step: int, elapsed_s: float, postfix: dict[str, str] | None = None) -> None:
        self.step, self.total = step, expected_total(step, elapsed_s, self.max_steps, self.max_minutes)
        if postfix is not None:
            self.postfix = ", ".join(f"{k}={v}" for k, v in postfix.items())
        if self.terminal:
            self.bar.total = self.total
            if postfix is not None:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(step - self.bar.n)
        elif time.monotonic() - self.last_line >= self.every_s:
            self._print_line()

    def _print_line(self) -> None:
        if not self.enabled or self.printed == (self.step, self.total):
            return
        now = time.monotonic()
        self.last_line, self.printed = now, (self.step, self.total)
        line = tqdm.format_meter(self.step, self.total, now - self.start, prefix=self.desc, postfix=self.postfix,
                                 initial=self.initial, ncols=0)
        print(line.strip(), file=sys.stderr, flush=True)

    def close(self, finished: bool) -> None:
        """`finished`: the loop reached its end (either budget), so the last step is the total."""
        if finished:
            self.total = self.bar.total = self.step
        if self.terminal:
            self.bar.refresh()
        else:
            self._print_line()
        self.bar.close()
