"""`polm package edge`: the package holds the int4 ONNX model, tokenizer, genai config, the
manifest with its whole lineage and SHA256SUMS; its runner, installed into a fresh venv that has
only onnxruntime-genai (no torch, no transformers), gives the service's greedy answers from the
terminal and from its OpenAI-compatible endpoint; a tampered or added file is refused."""

import asyncio
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import httpx
import pytest

from polm.errors import PolmError
from polm.tasks import get_task
from serve.edge import check_package, package_edge
from serve.state import ServerState, load_state
from tests.helpers import answers, free_port, polm_cli, wait_healthy

pytestmark = pytest.mark.slow
PROMPTS = [ex.prompt for ex in get_task("add").examples("test", 5)]


@pytest.fixture(scope="module")
def package(onnx_int4, tmp_path_factory):
    out = tmp_path_factory.mktemp("edge") / "pkg"
    r = polm_cli("package", "edge", onnx_int4.path, "--out", out, "--tar")
    assert r.returncode == 0, r.stderr
    return out


@pytest.fixture(scope="module")
def edge_python(tmp_path_factory, package):
    """A fresh venv with the package's requirements alone (onnxruntime-genai and its needs)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run(
        [py, "-m", "pip", "install", "-q", "-r", package / "requirements.txt"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot install onnxruntime-genai into a fresh venv here: {r.stderr[-300:]}")
    return py


def test_the_package_has_model_lineage_and_checksums(package, onnx_int4):
    model = package / "model"
    for name in (
        "model.onnx",
        "model.onnx.data",
        "genai_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
    ):
        assert (model / name).is_file(), name
    manifest = json.loads((package / "polm.json").read_text())
    assert manifest["format"] == "onnx" and manifest["settings"]["precision"] == "int4"
    stages = [n["stage"] for n in manifest["lineage"]]
    assert stages[0] == "optimize.onnx" and "align.sft" in stages and stages[-1] == "import"
    assert manifest["lineage"][0]["content_hash"] == onnx_int4.manifest.content_hash
    sums = (package / "SHA256SUMS").read_text().splitlines()
    listed = {line.split("  ", 1)[1] for line in sums}
    assert {"polm.json", "polm_edge.py", "requirements.txt", "model/model.onnx"} <= listed
    assert check_package(package) == len(listed)
    with tarfile.open(package.with_name("pkg.tar.gz")) as t:
        names = set(t.getnames())
    assert {f"pkg/{n}" for n in listed} | {"pkg/SHA256SUMS"} <= names


def test_the_runner_in_a_bare_venv_answers_like_the_service(package, onnx_int4, edge_python):
    # the fresh venv has no torch and no transformers: the runner does not need them
    probe = subprocess.run(
        [
            edge_python,
            "-c",
            "import importlib.util as u; "
            "print([m for m in ('torch', 'transformers', 'polm') if u.find_spec(m)])",
        ],
        capture_output=True,
        text=True,
        cwd=package,  # not the repository, whose polm/ would be importable
        check=True,
    )
    assert probe.stdout.strip() == "[]"
    state = load_state(ServerState(), str(onnx_int4.path))
    try:
        served = asyncio.run(answers(state, PROMPTS, temperature=0, max_tokens=48))
    finally:
        state.backend.close()
    edge = []
    for p in PROMPTS:
        r = subprocess.run(
            [edge_python, package / "polm_edge.py", "generate", p, "--max-tokens", "48"],
            capture_output=True,
            text=True,
            cwd=package,  # not the repository, whose polm/ would be importable
            timeout=120,
        )
        assert r.returncode == 0, r.stderr
        edge.append(r.stdout.rstrip("\n"))
    assert edge == served
    assert (
        sum(
            get_task("add").score(a, ex) for a, ex in zip(edge, get_task("add").examples("test", 5))
        )
        >= 4
    )

    # the runner's endpoint, driven by the official client from this side
    from openai import OpenAI

    port = free_port()
    proc = subprocess.Popen(
        [edge_python, package / "polm_edge.py", "serve", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=package,  # not the repository, whose polm/ would be importable
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", proc, timeout=60)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=0)
        model = client.models.list().data[0].id
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": PROMPTS[0]}],
            temperature=0,
            max_tokens=48,
        )
        assert r.choices[0].message.content == served[0]
        streamed = "".join(
            c.choices[0].delta.content or ""
            for c in client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": PROMPTS[1]}],
                temperature=0,
                max_tokens=48,
                stream=True,
            )
        )
        assert streamed == served[1]
        bad = httpx.post(
            f"http://127.0.0.1:{port}/v1/chat/completions", json={"messages": [], "max_tokens": 5}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("tamper", ["change", "add", "remove"])
def test_a_tampered_package_is_refused(package, edge_python, tmp_path, tamper):
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(package, copy)
    if tamper == "change":
        data = copy / "model" / "model.onnx.data"
        raw = bytearray(data.read_bytes())
        raw[len(raw) // 2] ^= 0x01
        data.write_bytes(bytes(raw))
    elif tamper == "add":
        (copy / "model" / "extra.onnx").write_bytes(b"\0")
    else:
        os.remove(copy / "model" / "tokenizer.json")
    r = subprocess.run(
        [edge_python, copy / "polm_edge.py", "generate", "1+1"],
        capture_output=True,
        text=True,
        cwd=copy,  # not the repository, whose polm/ would be importable
        timeout=60,
    )
    assert r.returncode == 3 and "checksum failed" in r.stderr, (r.returncode, r.stderr)
    with pytest.raises(PolmError, match="checksum failed"):
        check_package(copy)


def test_a_format_the_export_cannot_read_is_refused_and_nothing_is_left(base_ckpt, tmp_path):
    """An hf checkpoint is exported first (next test); a 1-bit one is refused by the export,
    before any weights load, and neither a package nor an intermediate export stays behind."""
    import shutil

    from polm.checkpoint import MANIFEST, Checkpoint

    shutil.copytree(base_ckpt.path, tmp_path / "in" / "onebit")
    manifest = json.loads((tmp_path / "in" / "onebit" / MANIFEST).read_text())
    (tmp_path / "in" / "onebit" / MANIFEST).write_text(json.dumps({**manifest, "format": "onebit"}))
    with pytest.raises(PolmError, match="expects a checkpoint of format 'hf'.*'onebit'"):
        package_edge(Checkpoint.open(tmp_path / "in" / "onebit"), tmp_path / "out" / "p")
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_the_cli_exports_an_hf_checkpoint_to_int4_first(base_ckpt, tmp_path):
    r = polm_cli("package", "edge", base_ckpt.path, "--out", tmp_path / "pkg")
    assert r.returncode == 0, r.stderr
    manifest = json.loads((tmp_path / "pkg" / "polm.json").read_text())
    assert manifest["settings"]["precision"] == "int4"
    assert [n["stage"] for n in manifest["lineage"]] == ["optimize.onnx", "import"]
    assert check_package(tmp_path / "pkg") > 5
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "pkg"]
    assert leftovers == [], leftovers  # the intermediate export is not left behind


def test_the_runner_needs_nothing_but_the_standard_library_and_genai():
    src = (Path(__file__).resolve().parents[2] / "serve" / "edge_runner.py").read_text()
    imports = {
        line.split()[1].split(".")[0]
        for line in src.splitlines()
        if line.strip().startswith(("import ", "from "))
    }
    allowed = set(sys.stdlib_module_names) | {"onnxruntime_genai", "numpy", "__future__"}
    assert imports <= allowed, imports - allowed
