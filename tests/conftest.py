"""Shared fixtures: tiny real models built by polm itself; nothing is downloaded."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs two pytest-xdist workers: each (and each `polm` it starts) gets its share of
    # the cores. Tiny models are dispatch-bound, so two 1-thread workers beat one 2-thread run.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def base_ckpt(tmp_path_factory):
    """builtin:tiny-base imported once per session (read-only for tests)."""
    from polm.importer import import_model

    return import_model("builtin:tiny-base", tmp_path_factory.mktemp("models") / "base")


def shared(tmp_path_factory, name: str, build):
    """A checkpoint built once per test run and shared by the pytest-xdist workers (read-only
    for tests): the first worker to ask builds it under a file lock, the others wait and open it."""
    from filelock import FileLock

    from polm.checkpoint import Checkpoint

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's directory, above each worker's own
    if keep := os.environ.get("POLM_TEST_KEEP"):
        # a developer's option (never CI's): keep built models across runs in this directory;
        # delete it after changing what a fixture builds
        root = Path(keep)
    out = root / "shared" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / "polm.json").exists():
            return Checkpoint.open(out)
        return build(out)


# The shared SFT models train on the whole task split, as when the tests downstream (GRPO, DPO,
# RLAIF, distillation) were calibrated; a capped run otherwise takes only the examples it uses.
ALL_DATA = {"n_train": 20_000}


@pytest.fixture(scope="session")
def warm_sft(base_ckpt, tmp_path_factory):
    """A 120-step SFT on add: the answer format learned, ~20% exact match; the start for the
    RL stages (read-only for tests)."""
    from align.sft import SFTSettings
    from align.sft import run as sft

    return shared(
        tmp_path_factory,
        "warm_sft",
        lambda out: sft([base_ckpt], SFTSettings(task="add", max_steps=120, **ALL_DATA), out),
    )


ADD_SFT_STEPS = 200


@pytest.fixture(scope="session")
def add_sft(base_ckpt, tmp_path_factory):
    """A 200-step full SFT on add (about 70% exact match): the SFT tests' subject and the
    parent the optimize stages compress (read-only for tests)."""
    from align.sft import SFTSettings
    from align.sft import run as sft

    settings = SFTSettings(task="add", max_steps=ADD_SFT_STEPS, logging_steps=10, **ALL_DATA)
    return shared(tmp_path_factory, "add_sft", lambda out: sft([base_ckpt], settings, out))


def onnx_int4(add_sft, tmp_path_factory):
    """The int4 ONNX export of ``add_sft`` (with a 100-prompt parity check), built once per run:
    the ONNX tests' subject and the model the serving and edge tests serve."""
    from optimize.onnx import OnnxSettings, run

    s = OnnxSettings(precision="int4", task="add", parity_n=100)
    return shared(tmp_path_factory, "onnx_int4", lambda out: run([add_sft], s, out))


@pytest.fixture
def base_copy(base_ckpt, tmp_path):
    """A private copy of the base checkpoint, for tests that modify it."""
    from polm.checkpoint import Checkpoint

    shutil.copytree(base_ckpt.path, tmp_path / "base")
    return Checkpoint.open(tmp_path / "base")


def polm_cli(*args, cwd=None, timeout=600):
    """Run the real `polm` command line in a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "polm.cli", *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "TQDM_DISABLE": "1"},
    )


REPO = Path(__file__).resolve().parents[1]
