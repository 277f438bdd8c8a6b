"""The command line's terminal: the progress bar, Ctrl-C between steps, and stdout's list of paths."""

import os
import signal
import sys
import threading


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
    """Within the block, the first Ctrl-C asks to stop after the current step; a second one stops at once
    (the images already written are whole: each file appears complete or not at all).

    Python runs signal handlers on the main thread between bytecodes, never while MLX evaluates a step
    there, so a handler alone answers only when the step ends. Python's own low-level handler also writes
    the signal to a wakeup file descriptor at once, whichever thread receives it: a thread of ours waits
    on that pipe and answers immediately."""

    def __init__(self):
        self.requested = False
        self._thread = None

    def __enter__(self):
        if threading.current_thread() is not threading.main_thread():
            return self  # signals belong to the main thread: leave Ctrl-C as it is
        self._read, write = os.pipe()
        os.set_blocking(write, False)
        self._write = write
        self._old_fd = signal.set_wakeup_fd(write)
        self._old_handler = signal.signal(signal.SIGINT, lambda *_: None)  # the pipe's reader answers
        self._thread = threading.Thread(target=self._wait, name="crepulse-ctrl-c", daemon=True)
        self._thread.start()
        return self

    def _wait(self):
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:  # the block ended
                return
            for _ in (b for b in data if b == signal.SIGINT):
                if self.requested:
                    err("\ninterrupted")
                    os._exit(130)  # a step may be running in MLX, which nothing in Python can stop
                self.requested = True
                err("\nstopping after this step (Ctrl-C again to stop at once)")

    def __exit__(self, *exc):
        if self._thread is not None:
            signal.set_wakeup_fd(self._old_fd)
            signal.signal(signal.SIGINT, self._old_handler)
            os.close(self._write)
            self._thread.join()
            os.close(self._read)
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


