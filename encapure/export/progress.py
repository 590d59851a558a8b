"""A small progress display for the long export steps.

On a terminal a spinner line shows the running step and its elapsed seconds; elsewhere (logs, CI)
one line per finished step. Nothing is printed unless asked, so the library stays quiet.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

_FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"


class Progress:
    def __init__(self, enabled: bool = False, stream: TextIO | None = None) -> None:
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.timings: dict[str, float] = {}

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Time a step (always recorded in ``timings``) and show it while it runs."""
        start = time.perf_counter()
        stop = threading.Event()
        spinner: threading.Thread | None = None
        tty = self.enabled and getattr(self.stream, "isatty", lambda: False)()
        if tty:
            def spin() -> None:
                i = 0
                while not stop.wait(0.2):
                    elapsed = time.perf_counter() - start
                    self.stream.write(f"\r{_FRAMES[i % len(_FRAMES)]} {name} … {elapsed:5.1f}s")
                    self.stream.flush()
                    i += 1

            spinner = threading.Thread(target=spin, daemon=True)
            spinner.start()
        ok = False
        try:
            yield
            ok = True
        finally:
            stop.set()
            if spinner is not None:
                spinner.join()
            elapsed = time.perf_counter() - start
            self.timings[name] = round(elapsed, 3)
            if self.enabled:
                mark = "✓" if ok else "✗"
                prefix = "\r\033[K" if tty else ""
                self.stream.write(f"{prefix}{mark} {name} ({elapsed:.1f}s)\n")
                self.stream.flush()
