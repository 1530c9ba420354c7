"""PeakRSS sees memory allocated and freed inside the block, in this process and in a child;
memory a library keeps alive through a stored exception is released between stages."""

import subprocess
import sys

from polm.resources import PeakRSS, release_free_memory

MB = 2**20


def test_a_spike_freed_inside_the_block_is_the_peak():
    with PeakRSS() as before:
        pass
    with PeakRSS() as rss:
        block = bytearray(200 * MB)  # zero-filled, so every page is touched
        del block
    assert rss.peak_bytes >= before.peak_bytes + 150 * MB
    assert rss.sample() < rss.peak_bytes - 100 * MB  # freed again


def test_a_spike_between_samples_counts_beside_a_child_that_holds_more():
    """The kernel's high-water mark is this process's alone: a spike the sampler misses still
    counts, on top of what a long-lived child (a test worker's fork server) holds."""
    code = "import sys, time; b = bytearray(400 * 2**20); print(flush=True); time.sleep(60)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        child.stdout.readline()  # its 400 MB are resident
        with PeakRSS(interval_s=60) as before:  # one sample on entry, one on exit
            pass
        with PeakRSS(interval_s=60) as rss:
            block = bytearray(200 * MB)
            del block
        assert rss.peak_bytes >= before.peak_bytes + 150 * MB
    finally:
        child.kill()
        child.wait()


def test_a_child_process_counts():
    code = "import time; b = bytearray(300 * 2**20); time.sleep(1)"  # zero-filled: resident
    with PeakRSS() as rss:
        own = rss.sample()
        subprocess.run([sys.executable, "-c", code], check=True)
    assert rss.peak_bytes >= own + 250 * MB


def test_an_exception_a_module_keeps_no_longer_keeps_its_callers_alive(monkeypatch):
    """The GPTQModel pattern: a module imported inside a stage keeps its import error, whose
    traceback holds the stage's frames and their locals (the model)."""
    import types
    import weakref

    class Model:  # stands for the trainer and its weights
        pass

    module = types.ModuleType("polm_test_optional_dep")

    def stage():
        model = Model()
        try:
            raise ImportError("optional kernel missing")
        except ImportError as e:  # as `import` would do it: the module keeps the error
            module._IMPORT_ERROR = e
        return weakref.ref(model)

    monkeypatch.setitem(sys.modules, module.__name__, module)
    ref = stage()
    import gc

    gc.collect()
    assert ref() is not None  # the leak, as it was
    release_free_memory()
    assert ref() is None
    assert isinstance(module._IMPORT_ERROR, ImportError)  # still there to re-raise


def test_what_survives_is_frozen_and_later_cycles_are_still_collected():
    import gc
    import weakref

    class Node:
        pass

    gc.unfreeze()  # the test workers freeze before each test (conftest): start from none
    release_free_memory()
    assert gc.get_freeze_count() > 10_000  # the libraries' objects: not walked again
    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle made after the freeze
    alive = weakref.ref(a)
    del a, b
    release_free_memory()
    assert alive() is None
