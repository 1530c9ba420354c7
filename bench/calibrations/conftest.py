"""The long quality calibrations: how far a stage moves tiny-base in a real training budget,
measured against a bar (``make bench``, row ``calibrations``; alone:
``.venv/bin/python -m pytest bench/calibrations -n 2``). The test suite keeps a short check of
each (the stage runs, moves the model the right way, records what it should); these keep the
thresholds, which take minutes of training each. They share the suite's fixtures."""

from tests.conftest import *  # noqa: F403  (the fixtures and hooks of tests/conftest.py)
