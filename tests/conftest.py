"""Shared fixtures: tiny real models built by polm itself; nothing is downloaded."""

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import ADD_SFT_STEPS, ALL_DATA, build_onnx_int4, shared

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    # `make test` runs two pytest-xdist workers: each (and each `polm` it starts) gets its share of
    # the cores. Tiny models are dispatch-bound, so two 1-thread workers beat one 2-thread run.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(workers))))


def pytest_runtest_setup(item):
    """Collect the last test's garbage, then freeze what is left (modules, session fixtures):
    Python's collector walks every tracked object on a full collection, and a worker holds
    about a million once the libraries are imported (see polm.resources.release_free_memory)."""
    import gc

    gc.collect()
    gc.freeze()


# Seconds each test file took in a `make test` run, longest first (pytest-xdist hands out whole
# files, `--no-loadscope-reorder` in the order collected): started last, a long file is the
# run's tail on one worker while the other waits. Rewritten by `make test-durations`; a file
# not listed counts as a short one.
DURATIONS = Path(__file__).with_name("durations.json")
_MEASURED: dict[str, float] = {}  # each file's seconds in this run, with POLM_TEST_DURATIONS


def _file(nodeid: str) -> str:
    return nodeid.split("::")[0]


def _longest_files_first(items):
    """Reorder whole files (a stable sort keeps each file's tests, and ties, as collected)."""
    import json

    seconds = json.loads(DURATIONS.read_text()) if DURATIONS.is_file() else {}
    items.sort(key=lambda item: -seconds.get(_file(item.nodeid), 0))


def pytest_runtest_logreport(report):
    if os.environ.get("POLM_TEST_DURATIONS"):
        _MEASURED[_file(report.nodeid)] = _MEASURED.get(_file(report.nodeid), 0.0) + report.duration


def pytest_sessionfinish(session):
    """With POLM_TEST_DURATIONS set, the controller writes DURATIONS from this run."""
    if _MEASURED and not os.environ.get("PYTEST_XDIST_WORKER"):
        import json

        ranked = sorted(_MEASURED.items(), key=lambda fs: -fs[1])
        DURATIONS.write_text(json.dumps({f: round(s, 1) for f, s in ranked}, indent=1) + "\n")


def pytest_collection_modifyitems(config, items):
    _longest_files_first(items)
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


@pytest.fixture(scope="session")
def add_sft(base_ckpt, tmp_path_factory):
    """A 200-step full SFT on add (about 70% exact match): the SFT tests' subject and the
    parent the optimize stages compress (read-only for tests)."""
    from align.sft import SFTSettings
    from align.sft import run as sft

    settings = SFTSettings(task="add", max_steps=ADD_SFT_STEPS, logging_steps=10, **ALL_DATA)
    return shared(tmp_path_factory, "add_sft", lambda out: sft([base_ckpt], settings, out))


@pytest.fixture(scope="session")
def chatml_sft(tmp_path_factory):
    """builtin:tiny-chatml (a ChatML template without {% generation %} markers) after a short
    SFT on add with polm's own assistant masks (read-only for tests)."""
    from align.sft import SFTSettings
    from align.sft import run as sft
    from polm.importer import import_model

    def build(out):
        base = import_model("builtin:tiny-chatml", out.parent / "chatml_base")
        return sft([base], SFTSettings(task="add", n_train=256, max_steps=20), out)

    return shared(tmp_path_factory, "chatml_sft", build)


@pytest.fixture(scope="session")
def onnx_int4(add_sft, tmp_path_factory):
    """The int4 ONNX export of ``add_sft``, built once per run (read-only for tests)."""
    return build_onnx_int4(add_sft, tmp_path_factory)


@pytest.fixture(scope="session")
def loras(base_ckpt, tmp_path_factory):
    """Two LoRA SFTs of tiny-base as ``peft-adapter`` checkpoints, one on add, one on compare,
    by the names they are served under (read-only for tests)."""
    from align.sft import SFTSettings
    from align.sft import run as sft

    def build(task):
        s = SFTSettings(
            task=task,
            method="lora",
            output_format="peft-adapter",
            max_steps=40,
            learning_rate=5e-3,
        )
        return shared(tmp_path_factory, f"lora_{task}", lambda out: sft([base_ckpt], s, out))

    return {"adder": build("add"), "comparer": build("compare")}


@pytest.fixture(scope="session")
def onnx_lora(base_ckpt, tmp_path_factory):
    """tiny-base exported to ONNX in fp32 with LoRA slots on every linear layer: the ONNX
    backend serves ``loras`` on it by name (read-only for tests)."""
    from optimize.onnx import OnnxSettings, run

    s = OnnxSettings(precision="fp32", lora_slots="all-linear", task="add", parity_n=10)
    return shared(tmp_path_factory, "onnx_lora", lambda out: run([base_ckpt], s, out))


@pytest.fixture
def base_copy(base_ckpt, tmp_path):
    """A private copy of the base checkpoint, for tests that modify it."""
    from polm.checkpoint import Checkpoint

    shutil.copytree(base_ckpt.path, tmp_path / "base")
    return Checkpoint.open(tmp_path / "base")
