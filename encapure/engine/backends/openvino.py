"""The OpenVINO backend (``--backend openvino``): the same exported ONNX file, run by OpenVINO's CPU plugin.

OpenVINO reads the ONNX graph itself, including the static int8 QDQ graphs our export writes (its
low-precision transformations turn QuantizeLinear/DequantizeLinear pairs into int8 kernels), so no
second export is needed. Optional: ``pip install openvino``.

Threading mirrors the ONNX Runtime backend: ``Settings.workers`` threads call ``run`` at once, so
the compiled model gets one stream per worker and ``threads_per_worker`` threads per stream, and
each calling thread keeps its own infer request (a request is not thread-safe; the compiled model is).
Inference precision is f32 unless ``Settings.openvino_inference_precision`` asks otherwise: on CPUs
with native bf16 (AVX-512 BF16, AMX, AVX2-VNNI-2) OpenVINO would compute in bf16 by default, and a
server's scores must not change with the CPU it runs on. ``bf16`` is honoured only where the device
reports the ``BF16`` optimization capability (native bf16) and refused elsewhere, because OpenVINO
itself does not refuse it: its CPU plugin (2026.4, ``precision_support.cpp``) accepts a bf16 hint on
any AVX-512 CPU and then emulates bf16 there (slower than f32, as OpenVINO's docs warn), and on a CPU
without AVX-512 (AVX2 only: AMD Zen 2/3, older Intel) keeps f32 without a word. ``auto`` is bf16 where
the capability is reported, else f32.

An OpenVINO IR (``model.xml`` + ``model.bin``, ``encapure export --format openvino``) loads here too,
and only here. Its weights are mapped from ``model.bin`` by default; with ``Settings.openvino_mmap``
off they are read into memory and the read copy is dropped once the plugin has compiled (repacked)
them. ``Settings.openvino_dynamic_quantization_group_size`` turns on int8 activations for
weight-compressed IR (off by default: see BENCHMARKS.md "bge-reranker-v2-m3 memory").

Why stream threads are not pinned (``ENABLE_CPU_PINNING`` off; OpenVINO pins by default): a stream's
thread pinned to one core waits for that core while the process's other threads (event loop,
tokenizing, the scheduler) or other processes hold it, even when another core is idle; ONNX Runtime
with one thread per worker runs on the calling thread, which the OS moves freely. Measured through the
server (int8 MiniLM reranker, WikiQA, 2 workers x 1 thread, AMD EPYC AVX-512 VNNI, 3 alternated
rounds, shared machine at load ~11, noisy): c=1 median p50 109.5 ms pinned, 90.7 ms unpinned (ONNX
Runtime 91.8 ms); every round the same way. c=8 best throughput about equal (98.6 vs 100.0 pairs/s).

Why batches are padded to a multiple of ``LENGTH_STEP`` tokens: the CPU plugin prepares kernels for
every new input shape at its first inferences (measured on the int8 MiniLM reranker, 2 rows: ~27 ms
extra at the first call of a new length, ~12 ms at the second, against ~15 ms for the inference
itself), and the engine pads each batch only to its longest item, so traffic brings a new shape in most
batches and a lone request paid for it in its latency. Rounding the length up to ``LENGTH_STEP`` makes
the shapes repeat (16 lengths up to 256 instead of 256), at the price of at most 15 padded positions.
Padding only adds masked positions, which no real position attends to, so scores are unchanged
(``--backend auto`` checks exactly this: rows alone vs padded in a batch); token outputs are cut back
to the batch's width. Only done with an attention mask in the feed and up to the manifest's
``max_length`` (the widest input the export was checked at), otherwise the feed runs as given.

Why the mapped weights are paged out after inference (``Settings.openvino_release_mapped_weights``):
the CPU plugin repacks the compressed weights into its own anonymous buffers at the first inference
of a shape, and the ``model.bin`` pages it read to do so stay resident in the mapping: the same
weights counted twice in RSS (~150 MB for bge-reranker-v2-m3 int4). ``madvise(MADV_PAGEOUT)`` asks
the kernel to reclaim them. Unlike ``MADV_DONTNEED`` (tried before and removed after scores came out
wrong in a full test run) it never changes what memory reads back as: clean file pages are re-read
from the file when touched, and anything else in the range (dirty or anonymous pages) is written
back or swapped, or simply left resident. Any wrong range is therefore only a missed saving.
Linux also skips pages other processes map too, and file pages unless this process owns the file
or may write it (a side-channel guard): a model folder shared read-only between users keeps its
pages, correctly, just without the saving.
"""

from __future__ import annotations

import functools
import logging
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from encapure.errors import ModelError
from encapure.settings import Settings


@dataclass(frozen=True)
class _Port:
    name: str
    shape: Sequence[Any]


log = logging.getLogger("encapure.openvino")

MADV_PAGEOUT = 21  # linux/mman.h, since Linux 5.4
# A release (reading /proc/self/maps, walking the mapping, reclaiming) is allowed again only after
# this many times its own duration: at most ~1% of the time goes to it, and it runs after nearly
# every inference when there is nothing to reclaim (fast) or the model is slow (bge: ~1 s a batch).
RELEASE_COST_FACTOR = 100.0
# The first inferences (the engine's warm-up shapes, the first requests) each may repack weights from
# new pages: they always page out, so RSS at ready does not hold what the throttle skipped.
RELEASE_ALWAYS_FIRST = 8
# Batches run padded to a multiple of this many tokens (see the module docstring).
LENGTH_STEP = 16


def mapped_ranges(path: Path) -> list[tuple[int, int]]:
    """Address ranges of this process's non-writable mappings of ``path`` (Linux; empty elsewhere)."""
    if not sys.platform.startswith("linux"):
        return []
    target = str(path.resolve())
    try:
        with open("/proc/self/maps", encoding="utf-8") as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5].rstrip("\n") == target and "w" not in parts[1]:
            start, end = (int(x, 16) for x in parts[0].split("-"))
            out.append((start, end))
    return out


def page_out(ranges: Sequence[tuple[int, int]]) -> bool:
    """``madvise(MADV_PAGEOUT)`` each range; False where the kernel refuses it (before Linux 5.4).

    Content-preserving by the kernel's contract (see the module docstring), so a range that is no
    longer what it was when /proc/self/maps was read costs at most a needless page-in or swap-out.
    """
    if not ranges:
        return True
    madvise = _madvise()
    ok = True
    for start, end in ranges:
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            ok = False
    return ok


@functools.cache
def _madvise() -> Any:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return libc.madvise


def _ports(ports: Any) -> list[_Port]:
    out = []
    for p in ports:
        dims = [d.get_length() if d.is_static else "?" for d in p.get_partial_shape()]
        out.append(_Port(p.get_any_name(), dims))
    return out


class OpenVINOSession:
    """A compiled OpenVINO model behind the engine's ``Session`` calls."""

    def __init__(self, path: Path, settings: Settings) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise ModelError("the openvino backend needs the openvino package: pip install openvino") from e
        streams = settings.workers
        core = ov.Core()
        self.inference_precision = inference_precision(core, settings)
        config: dict[str, Any] = {
            "INFERENCE_NUM_THREADS": settings.resolved_threads() * streams,
            "NUM_STREAMS": str(streams),
            "INFERENCE_PRECISION_HINT": self.inference_precision,
        }
        if settings.openvino_device.upper().startswith("CPU"):
            config["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = int(settings.openvino_dynamic_quantization_group_size)
            # Unpinned stream threads (see the module docstring, "Why stream threads are not pinned").
            config["ENABLE_CPU_PINNING"] = False
        try:
            core.set_property({"ENABLE_MMAP": bool(settings.openvino_mmap)})
            model = core.read_model(str(path))
            self._compiled = core.compile_model(model, settings.openvino_device, config)
            # The compiled model holds what it needs (repacked weights); the read copy can go.
            del model
        except Exception as e:  # OpenVINO raises RuntimeError with multi-line text
            raise ModelError(f"OpenVINO cannot load {path}: {str(e).strip().splitlines()[0]}") from e
        self._inputs = _ports(self._compiled.inputs)
        self._outputs = _ports(self._compiled.outputs)
        self._pad_limit, self._pad_id = _padding(path)
        # Outputs with a token axis (``[batch, length, ...]``) are cut back after padding.
        self._token_outputs = {p.name for p in self._outputs if len(p.shape) >= 3}
        self._local = threading.local()
        release = settings.openvino_release_mapped_weights and settings.openvino_mmap
        self._bin: Path | None = path.with_suffix(".bin") if release and path.suffix.lower() == ".xml" else None
        self._release_lock = threading.Lock()
        self._gate = threading.Lock()  # held by release_memory; inferences count themselves under it
        self._active = 0
        self._next_release = 0.0
        self._calls = 0  # inferences so far (unlocked increments: an approximate count is enough)

    def get_inputs(self) -> list[_Port]:
        return self._inputs

    def get_outputs(self) -> list[_Port]:
        return self._outputs

    def run(self, output_names: list[str] | None, feed: dict[str, Any]) -> list[Any]:
        request = getattr(self._local, "request", None)
        if request is None:
            request = self._local.request = self._compiled.create_infer_request()
        width = _width(feed)
        padded = self._padded(feed, width)
        with self._gate:
            self._active += 1
        try:
            result = request.infer(padded)
            names = output_names or [p.name for p in self._outputs]
            # Copies: the request reuses its output buffers on the next call from this thread.
            out = [self._cut(n, result[self._compiled.output(n)], width) for n in names]
        finally:
            with self._gate:
                self._active -= 1
        if self._bin is not None:
            self._release_mapped_weights()
        return out

    def release_memory(self) -> bool:
        """Free the plugin's intermediate tensors (sized by the largest batch run so far) while no
        inference runs; the next inference allocates what it needs. False if one was running.

        The server calls it when idle (``--malloc-trim``). bge-reranker-v2-m3 int4 IR, 2 threads (AMD
        EPYC AVX-512 VNNI): 418 MB after a 16 x 64 batch, 366 MB after this, 337 MB after malloc_trim;
        the next 8 x 64 batch took no longer (2.0 s vs 1.8 s, load ~1)."""
        with self._gate:  # an inference starting now waits the few ms this takes
            if self._active:
                return False
            self._compiled.release_memory()
            return True

    def _padded(self, feed: dict[str, Any], width: int) -> dict[str, Any]:
        """``feed`` with its length axis rounded up to ``LENGTH_STEP`` (masked), or as given."""
        target = -(-width // LENGTH_STEP) * LENGTH_STEP
        if target == width or target > self._pad_limit or "attention_mask" not in feed:
            return feed
        out = {}
        for name, value in feed.items():
            arr = np.asarray(value)
            if arr.ndim != 2 or arr.shape[1] != width:
                return feed  # not a [batch, length] feed we understand: run it as given
            fill = self._pad_id if name == "input_ids" else 0
            wide = np.full((arr.shape[0], target), fill, dtype=arr.dtype)
            wide[:, :width] = arr
            out[name] = wide
        return out

    def _cut(self, name: str, value: Any, width: int) -> Any:
        """A copy of one output, its token axis cut back to ``width`` (the request reuses its buffers)."""
        if name in self._token_outputs and value.ndim >= 3 and value.shape[1] != width:
            return value[:, :width].copy()
        return value.copy()

    def _release_mapped_weights(self) -> None:
        """Page out the mapped ``model.bin`` (see the module docstring); one thread at a time."""
        self._calls += 1
        first = self._calls <= RELEASE_ALWAYS_FIRST
        if (not first and time.monotonic() < self._next_release) or not self._release_lock.acquire(False):
            return
        try:
            start = time.monotonic()
            bin_path = self._bin
            if bin_path is not None and not page_out(mapped_ranges(bin_path)):
                log.info("madvise(MADV_PAGEOUT) refused (Linux < 5.4?): mapped IR weights stay resident")
                self._bin = None
            end = time.monotonic()
            self._next_release = end + RELEASE_COST_FACTOR * (end - start)
        finally:
            self._release_lock.release()


def _width(feed: dict[str, Any]) -> int:
    ids = feed.get("input_ids")
    shape: tuple[int, ...] = tuple(getattr(ids, "shape", ()))
    return int(shape[1]) if len(shape) == 2 else 0


def _padding(path: Path) -> tuple[int, int]:
    """(widest padded length, pad id) from the model folder's manifest; (0, 0) = no padding.

    Without a manifest the widest input the graph accepts is unknown (position embeddings), so a
    third-party file runs unpadded.
    """
    from encapure.manifest import Manifest

    try:
        manifest = Manifest.load(path.parent)
    except Exception:  # no or unreadable manifest: the loader reports that, not the backend
        return 0, 0
    return int(manifest.max_length), int(manifest.pad_token_id)


def native_bf16(core: Any, device: str) -> bool:
    """Whether OpenVINO reports native bf16 for ``device`` (the ``BF16`` optimization capability: on
    x86 CPUs AVX-512 BF16, AMX or AVX2-VNNI-2). False where the device cannot say (``AUTO:...``)."""
    try:
        return "BF16" in core.get_property(device, "OPTIMIZATION_CAPABILITIES")
    except Exception:  # OpenVINO raises RuntimeError for devices without the property
        return False


@functools.cache
def cpu_native_bf16() -> bool:
    """Whether openvino is installed and reports native bf16 on this machine's CPU (cached: CPUID)."""
    try:
        import openvino as ov
    except ImportError:
        return False
    return native_bf16(ov.Core(), "CPU")


def inference_precision(core: Any, settings: Settings) -> str:
    """The ``INFERENCE_PRECISION_HINT`` for ``settings.openvino_inference_precision`` on this device:
    ``f32``, or ``bf16`` where the device has native bf16; an explicit bf16 elsewhere is refused
    (emulated or silently dropped by OpenVINO, see the module docstring)."""
    want = settings.openvino_inference_precision
    if want == "f32":
        return "f32"
    device = settings.openvino_device
    native = native_bf16(core, device)
    if want == "bf16" and not native:
        raise ModelError(
            f"openvino_inference_precision=bf16: OpenVINO device {device!r} reports no native bf16 "
            "(OPTIMIZATION_CAPABILITIES lacks BF16; CPUs need AVX-512 BF16 or AMX); there bf16 would be "
            "emulated (slower than f32) or silently run as f32: use f32 or auto"
        )
    return "bf16" if native else "f32"


def create_session(path: Path, settings: Settings) -> OpenVINOSession:
    return OpenVINOSession(path, settings)
