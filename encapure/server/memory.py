"""glibc malloc settings of the server process: fewer arenas, and free heap given back when idle.

glibc gives threads that meet a locked arena their own (up to 8 per core), and memory freed in an
arena mostly stays there for that arena's next allocations: the server's threads (event loop,
tokenizing, inference workers, the runtimes' pools) each hold some free heap that the others cannot
use, counted in RSS. ``cap_arenas`` calls ``mallopt(M_ARENA_MAX)`` at start, before those threads
exist; ``trim`` (``malloc_trim(0)``) returns the free pages of every arena to the kernel, run once the
server has no request in flight. Both only change where free memory sits, never what a program
reads: elsewhere than glibc (musl, macOS) they do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger("encapure.server")

M_ARENA_MAX = -8  # malloc.h
# A trim walks every arena's free lists under its lock: at most one per this many seconds, and only
# after the server has been idle this long (a client sending request after request is not idle).
TRIM_INTERVAL_S = 1.0
TRIM_IDLE_S = 0.25


@functools.cache
def _glibc() -> Any | None:
    """The C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        libc.malloc_trim.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


def cap_arenas(arenas: int) -> bool:
    """At most ``arenas`` malloc arenas from now on (0: leave glibc's default, as does a
    ``MALLOC_ARENA_MAX`` in the environment, which glibc has already applied). True if applied."""
    libc = _glibc()
    if arenas <= 0 or libc is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(libc.mallopt(M_ARENA_MAX, arenas))


class IdleTrim:
    """``malloc_trim(0)``, at most once per ``TRIM_INTERVAL_S`` (the caller checks it is idle)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and _glibc() is not None
        self._last = -TRIM_INTERVAL_S
        # Runtimes' own idle release (OpenVINO's intermediate tensors), run first: what they free
        # goes back to malloc, which the trim then returns to the kernel.
        self.releasers: list[Callable[[], object]] = []

    def delay(self) -> float:
        """Seconds to wait, once idle, before trimming."""
        return max(TRIM_IDLE_S, self._last + TRIM_INTERVAL_S - time.monotonic())

    def __call__(self) -> bool:
        """Trim now; True if it ran."""
        libc = _glibc()
        if not self.enabled or libc is None:
            return False
        self._last = time.monotonic()
        for release in self.releasers:
            try:
                release()
            except Exception:  # a runtime that cannot release now keeps its memory; serving goes on
                log.warning("idle memory release failed", exc_info=True)
        libc.malloc_trim(0)
        return True
