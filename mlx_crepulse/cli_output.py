"""The command line's terminal: the progress bar, Ctrl-C between steps, and stdout's list of paths."""

import os
import signal
import sys


def err(*parts, end="\n"):
    print(*parts, end=end, file=sys.stderr, flush=True)


class _Bar:
    """One line on stderr, redrawn after each step: `step 3/8 [#####.....] 4 images  2.1s  eta 3.2s`."""

    def __init__(self, batches, quiet):
        self.batches, self.quiet, self.batch, self.drawn = batches, quiet, 0, False

    def __call__(self, p) -> bool:
        if self.quiet:
            return True
        filled = round(20 * p.step / p.steps)
        per_batch = p.elapsed / p.step * p.steps if p.step else 0.0
        eta = p.eta + per_batch * (self.batches - 1 - self.batch)
        prefix = f"batch {self.batch + 1}/{self.batches} " if self.batches > 1 else ""
        line = (f"{prefix}step {p.step}/{p.steps} [{'#' * filled}{'.' * (20 - filled)}] {p.n} image"
                f"{'s' if p.n != 1 else ''}  {p.elapsed:.1f}s  eta {eta:.1f}s")
        err(f"\r{line:<72}", end="")
        self.drawn = True
        return True

    def end(self):
        if self.drawn:
            err("")
            self.drawn = False


class _Interrupt:
    """Within the block, the first Ctrl-C asks to stop after the current step; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        def handler(signum, frame):
            if self.requested:
                raise KeyboardInterrupt
            self.requested = True
            err("\nstopping after this step (Ctrl-C again to stop at once)")
        try:
            self._old = signal.signal(signal.SIGINT, handler)
        except ValueError:  # not the main thread: leave Ctrl-C as it is
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
        return False


class _Paths:
    """stdout: the paths written, one a line, flushed at once; a closed pipe stops the printing only."""

    def __init__(self, out):
        self.out, self.closed = out, False

    def emit(self, path):
        if self.closed:
            return
        try:
            print(path, file=self.out, flush=True)
        except BrokenPipeError:
            self.closed = True
            try:  # keep the interpreter from complaining about the closed pipe at exit
                os.dup2(os.open(os.devnull, os.O_WRONLY), self.out.fileno())
            except (OSError, ValueError):
                pass


