"""PeakRSS sees memory allocated and freed inside the block, in this process and in a child."""

import subprocess
import sys

from polm.resources import PeakRSS

MB = 2**20


def test_a_spike_freed_inside_the_block_is_the_peak():
    with PeakRSS() as before:
        pass
    with PeakRSS() as rss:
        block = bytearray(200 * MB)  # zero-filled, so every page is touched
        del block
    assert rss.peak_bytes >= before.peak_bytes + 150 * MB
    assert rss.sample() < rss.peak_bytes - 100 * MB  # freed again


def test_a_child_process_counts():
    code = "import time; b = bytearray(300 * 2**20); time.sleep(1)"  # zero-filled: resident
    with PeakRSS() as rss:
        own = rss.sample()
        subprocess.run([sys.executable, "-c", code], check=True)
    assert rss.peak_bytes >= own + 250 * MB
