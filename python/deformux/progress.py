"""A text progress bar on stderr for long engine calls (segmentation, benchmarks).

    bar = ProgressBar("segment")        # draws only when the stream is a terminal
    engine_call(progress=bar)           # called with (done, total); returns True (never cancels)
    bar.close()                         # ends the line

Redrawn at most every 0.1 s; the time left is extrapolated from the progress made since the first
call (work counted done at the start, e.g. skipped windows, does not inflate the rate).
"""
import sys
import time

__all__ = ["ProgressBar", "progress_callback"]


def _clock(seconds):
    seconds = int(max(seconds, 0))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class ProgressBar:
    """A one-line bar: ``label  37% |#########               | 0:42 elapsed, 1:10 left``."""

    def __init__(self, label, stream=None, width=30, min_interval=0.1, force=False):
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.min_interval = min_interval
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = force or bool(isatty and isatty())
        self.start = time.perf_counter()
        self.first_done = None
        self.last_draw = 0.0
        self.drawn = False
        self.done = 0
        self.total = 0

    def __call__(self, done, total):
        now = time.perf_counter()
        if self.first_done is None:
            self.first_done, self.start = done, now
        self.done, self.total = done, total
        if self.enabled and (now - self.last_draw >= self.min_interval or done >= total):
            self.last_draw = now
            self._draw(now)
        return True

    def _draw(self, now):
        fraction = min(max(self.done / self.total, 0.0), 1.0) if self.total > 0 else 0.0
        filled = int(round(fraction * self.width))
        elapsed = now - self.start
        progressed = self.done - (self.first_done or 0)
        remaining = self.total - self.done
        left = f", {_clock(elapsed * remaining / progressed)} left" if progressed > 0 and remaining > 0 else ""
        line = (f"\r{self.label} {int(fraction * 100):3d}% |{'#' * filled}{' ' * (self.width - filled)}| "
                f"{_clock(elapsed)} elapsed{left}   ")
        self.stream.write(line)
        self.stream.flush()
        self.drawn = True

    def close(self):
        """Draws the final state and ends the line (if anything was drawn)."""
        if self.drawn:
            self._draw(time.perf_counter())
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False


def progress_callback(progress, label):
    """What to hand the engine for a `progress` argument: (callable or None, bar or None).

    True: a bar on stderr when it is a terminal (nothing otherwise); False or None: nothing; a callable:
    itself (called with (done, total); returning False cancels)."""
    if progress is True:
        bar = ProgressBar(label)
        return (bar, bar) if bar.enabled else (None, None)
    if progress is False or progress is None:
        return None, None
    if callable(progress):
        return progress, None
    raise TypeError(f"{label}: progress must be True, False or a callable(done, total), got {type(progress).__name__}")
