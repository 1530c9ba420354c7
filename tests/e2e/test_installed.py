"""polm as a user gets it: a wheel built from this tree, installed into a fresh virtual
environment, run from a directory outside the repository. `polm import`, `polm package edge`
and `polm serve` (a real BentoML server on 127.0.0.1, asked for /v1/models and one chat
completion with the `openai` client) must work without the source tree.

The venv takes its dependencies from the environment running the tests (a .pth file naming its
site-packages) and the wheel is installed with --no-deps: nothing is downloaded."""

import os
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest
from openai import OpenAI

from tests.helpers import REPO, free_port, stop_process_tree

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
# what the wheel is built from (pyproject.toml's packages and its readme)
SOURCES = ("pyproject.toml", "README.md", "polm", "align", "merge", "optimize", "serve")


def _run(argv, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(map(str, argv)), capture_output=True, text=True, timeout=300, **kw)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv directory, environment for its commands, a working directory outside the repo)."""
    pytest.importorskip("setuptools", reason="the wheel is built without build isolation")
    tmp = tmp_path_factory.mktemp("installed")
    src = tmp / "src"  # a copy, so the build's build/ and *.egg-info stay out of the repository
    src.mkdir()
    for name in SOURCES:
        if (REPO / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
            shutil.copytree(REPO / name, src / name, ignore=ignore)
        else:
            shutil.copy2(REPO / name, src / name)
    py = sys.executable
    _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp, src])
    (wheel,) = tmp.glob("polm-*.whl")
    venv = tmp / "venv"
    _run([py, "-m", "venv", "--without-pip", venv])
    vpy = venv / "bin" / "python"
    site = Path(
        _run(
            [vpy, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
        ).stdout.strip()
    )
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    # plain path lines: the test environment's own .pth files (an editable polm's finder
    # among them) are not run, so only the wheel can provide polm and serve
    (site / "_polm_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    _run(
        [vpy, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", wheel]
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        PATH=f"{venv / 'bin'}{os.pathsep}/usr/bin{os.pathsep}/bin",  # no repo or test venv
        OMP_NUM_THREADS="1",
        TQDM_DISABLE="1",
        POLM_CACHE=str(tmp / "cache"),
    )
    work = tmp / "elsewhere"
    # a decoy: BentoML must import the installed serve package, not a serve/ in the cwd
    (work / "serve").mkdir(parents=True)
    (work / "serve" / "__init__.py").write_text("raise ImportError('decoy serve/ in the cwd')\n")
    return venv, env, work


def test_the_installed_polm_is_imported_not_the_repository(installed):
    venv, env, work = installed
    code = "import polm, serve; print(polm.__file__); print(serve.__file__)"
    out = _run([venv / "bin" / "python", "-c", code], cwd=work.parent, env=env).stdout.split()
    for f in out:
        assert Path(f).is_relative_to(venv), out
        assert not Path(f).resolve().is_relative_to(REPO), out


def test_import_package_edge_and_serve_outside_the_repository(installed):
    venv, env, work = installed
    polm = venv / "bin" / "polm"
    _run([polm, "import", "builtin:tiny-base", "--out", "m"], cwd=work, env=env)
    _run([polm, "package", "edge", "m", "--out", "edge"], cwd=work, env=env)
    assert (work / "edge" / "polm_edge.py").is_file() and (work / "edge" / "SHA256SUMS").is_file()
    assert list((work / "edge" / "model").glob("*.onnx"))

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = open(work / "server.log", "w")
    proc = subprocess.Popen(
        [str(polm), "serve", "m", "--host", "127.0.0.1", "--port", str(port)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        _wait_ready(proc, url, work / "server.log")
        import psutil

        # BentoML's worker runs in its working directory: where the wheel installed serve
        (worker,) = psutil.Process(proc.pid).children(recursive=True)
        assert Path(worker.cwd()).is_relative_to(venv), worker.cwd()
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"]
        assert [m["id"] for m in models] == ["m"]
        assert models[0]["polm"]["lineage"][0]["source"] == "builtin:tiny-base"
        client = OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "3+4="}], max_tokens=8, seed=0
        )
        assert reply.choices[0].message.content is not None
        assert 0 < reply.usage.completion_tokens <= 8
    finally:
        stop_process_tree(proc)
        log.close()


def _wait_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    deadline = time.time() + 180
    while time.time() < deadline:
        assert proc.poll() is None, log.read_text()[-4000:]
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise AssertionError("server never became ready:\n" + log.read_text()[-4000:])
