"""Peak memory of a piece of work (a stage and its evaluation): :class:`PeakRSS`.

The resident set size of this process and of its child processes (the ONNX model builder,
DDP workers) is sampled in a background thread; on Linux the kernel's own high-water mark of
this process (``VmHWM``, reset on entry through ``/proc/self/clear_refs``) is added, so a
short spike between two samples of this process is not missed. What is reported is the
largest total seen, in bytes.

On entry, memory the allocator holds but no longer uses (a previous stage's model) is handed
back to the OS (``malloc_trim``), so that the peak belongs to the work measured and not to
what ran before it in the same process.
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
from pathlib import Path
from types import ModuleType

import psutil

INTERVAL_S = 0.05
STATUS = Path("/proc/self/status")
CLEAR_REFS = Path("/proc/self/clear_refs")


def drop_stored_tracebacks() -> int:
    """Detach the traceback of every exception kept in a module's globals; returns how many.

    Optional-dependency guards keep the exception for later (``except Exception as e:
    _IMPORT_ERROR = e``, GPTQModel's llama.cpp kernel among them). When such a module is first
    imported inside a stage (PEFT imports GPTQModel while wrapping a model for LoRA), the
    traceback holds the import's frame, and through it every caller's frame: the trainer and
    its model stayed alive after the stage, 1.9 GB on Gemma 3 270M, on top of the next stage.
    The exception itself stays, for the module to re-raise.
    """
    dropped = 0
    for module in list(sys.modules.values()):
        for value in list(vars(module).values()) if isinstance(module, ModuleType) else ():
            # type(), not isinstance(): some globals are deprecation proxies whose __class__
            # warns (torch.distributed.reduce_op)
            if issubclass(type(value), BaseException) and value.__traceback__ is not None:
                value.__traceback__ = None
                dropped += 1
    return dropped


def release_free_memory() -> None:
    """Collect garbage and hand the allocator's free memory back to the OS (glibc).

    What survives the collection is then frozen (``gc.freeze``): it is mostly the libraries'
    modules, classes and functions (about 600,000 objects once a stage has imported TRL), which
    every later collection would walk again for nothing. A full collection took 0.35-0.45 s in
    a `polm run` that way, twice per stage: 10 s of a 37 s merge recipe (measured, AMD EPYC).
    Frozen objects are still freed when their last reference goes; only a reference cycle among
    them would wait for ``gc.unfreeze``. A stage's model and trainer are made after the freeze,
    so the next collection still finds them."""
    drop_stored_tracebacks()
    gc.collect()
    gc.freeze()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _reset_high_water_mark() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS; False where the kernel does not let us."""
    try:
        CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


def _high_water_mark() -> int:
    for line in STATUS.read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


class PeakRSS:
    """``with PeakRSS() as rss: ...`` then ``rss.peak_bytes``: the largest resident set of this
    process plus its children while the block ran."""

    def __init__(self, interval_s: float = INTERVAL_S):
        self.interval_s = interval_s
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._proc = psutil.Process()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._hwm = False
        self._children_low: int | None = None  # the children's smallest sampled RSS

    def sample(self) -> int:
        """This process's RSS plus its live children's, now."""
        children = 0
        for child in self._proc.children(recursive=True):
            try:
                children += child.memory_info().rss
            except psutil.Error:  # it ended between listing and reading
                pass
        total = self._proc.memory_info().rss + children
        self.peak_bytes = max(self.peak_bytes, total)
        low = self._children_low
        self._children_low = children if low is None else min(low, children)
        return total

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> PeakRSS:
        release_free_memory()
        self._hwm = _reset_high_water_mark()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()
        if self._hwm:
            # the kernel's high-water mark is this process's alone: a spike between two samples
            # counts with what the children held throughout (a long-lived fork server, say)
            held = self._children_low or 0
            self.peak_bytes = max(self.peak_bytes, _high_water_mark() + held)
