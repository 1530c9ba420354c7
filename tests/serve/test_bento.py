"""`polm package bento`: a bento that carries its checkpoint, for a GGUF and an ONNX checkpoint.
Each is built with the real BentoML into a store of its own, copied to a fresh directory, and
served by a real `bentoml serve` of the copy after the checkpoint, the package and the store
are deleted, in a Python that cannot import polm's repository or any training code: the
official `openai` client gets the checkpoint's own greedy answers and its lineage."""

import os
import shutil
import subprocess
import textwrap

import pytest

from polm.checkpoint import Checkpoint
from serve.bento import check_package
from tests.helpers import BENTOML, REPO, Server, chat, polm_cli, shared

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPTS = ["12+34", "5+7", "103+9"]

# Loaded first in every process of the server: polm's code may come only from the bento (never
# from the repository the tests run in), and nothing that trains may be imported at all.
SITECUSTOMIZE = textwrap.dedent(
    """
    import sys
    from importlib.machinery import PathFinder

    REPO = {repo!r}
    TRAINING = ("align", "merge", "optimize", "trl", "datasets", "polm.training",
                "polm.runner", "polm.evaluate")

    class OnlyTheBento:
        def find_spec(self, name, path=None, target=None):
            if name in TRAINING or name.split(".")[0] in TRAINING[:5]:
                raise ModuleNotFoundError(f"{{name}} is not in the bento (training code)")
            if name.split(".")[0] in ("polm", "serve"):
                spec = PathFinder.find_spec(name, path)
                if spec is None or (spec.origin or "").startswith(REPO):
                    raise ModuleNotFoundError(f"{{name}} is not in the bento")
                return spec
            return None

    sys.meta_path.insert(0, OnlyTheBento())
    """
)


@pytest.fixture(scope="module")
def gguf_f16(add_sft, tmp_path_factory):
    from optimize.gguf import GgufSettings, run

    s = GgufSettings(outtype="f16", task="add", parity_n=100)  # as test_gguf's, shared with it
    return shared(tmp_path_factory, "gguf_f16", lambda out: run([add_sft], s, out))


def _greedy(ckpt: Checkpoint) -> list[str]:
    if ckpt.format == "gguf":
        from polm.llamacpp import GgufLM

        return GgufLM(ckpt.path).greedy(PROMPTS, 48)
    from polm.onnxrt import OnnxLM

    return OnnxLM(ckpt.path).greedy(PROMPTS, 48)


@pytest.mark.parametrize("fmt", ["gguf", "onnx"])
def test_a_bento_serves_its_checkpoint_from_a_fresh_directory(fmt, request, tmp_path):
    source = request.getfixturevalue({"gguf": "gguf_f16", "onnx": "onnx_int4"}[fmt])
    ckpt_dir = tmp_path / f"tiny-{fmt}"
    shutil.copytree(source.path, ckpt_dir)
    expected = _greedy(Checkpoint.open(ckpt_dir))
    store = tmp_path / "store"
    env = {**_env(), "BENTOML_HOME": str(store)}
    r = polm_cli("package", "bento", str(ckpt_dir), "--out", "pkg/bento", "--tar", cwd=tmp_path,
                 env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "pkg" / "bento"
    tag = check_package(out)
    assert tag.startswith(f"polm-tiny-{fmt}:")

    src = {p.relative_to(out / "src").as_posix() for p in (out / "src").rglob("*.py")}
    assert {"serve/service.py", "serve/app.py", "polm/checkpoint.py"} <= src
    assert not {p for p in src if p.split("/")[0] in ("align", "merge", "optimize")}, src
    assert not {"polm/training.py", "polm/runner.py", "polm/evaluate.py"} & src
    requirements = (out / "env" / "python" / "requirements.txt").read_text()
    backend_pkg = {"gguf": "llama-cpp-python", "onnx": "onnxruntime-genai"}[fmt]
    assert backend_pkg in requirements and "torch" not in requirements, requirements

    fresh = tmp_path / "elsewhere"
    shutil.copytree(out, fresh / "bento")
    archive = tmp_path / "pkg" / "bento.bento"
    for gone in (ckpt_dir, out, store):
        shutil.rmtree(gone)
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE.format(repo=str(REPO)))

    server = Server(tmp_path, target=str(fresh / "bento"), cwd=fresh, home=tmp_path / "home2",
                    process_env={"PYTHONPATH": str(blocker)})  # fmt: skip
    try:
        card = server.client.models.list().data[0]
        assert card.id == f"tiny-{fmt}"
        lineage = card.model_extra["polm"]["lineage"]
        assert lineage[0]["content_hash"] == source.manifest.content_hash[:12]
        assert [n["stage"] for n in lineage[:2]] == [source.manifest.stage, "align.sft"]
        assert card.model_extra["polm"]["backend"] == {"gguf": "llamacpp", "onnx": "onnx"}[fmt]
        answers = [
            chat(server, p, temperature=0, max_tokens=48).choices[0].message.content
            for p in PROMPTS
        ]
        assert answers == expected
        log = server.read_log()
        assert "not in the bento" not in log, log
    finally:
        server.stop()

    # the archive is what `bentoml import` takes (into yet another store)
    r = subprocess.run([BENTOML, "import", str(archive)], capture_output=True, text=True,
                       env={**_env(), "BENTOML_HOME": str(tmp_path / "home3")})  # fmt: skip
    assert r.returncode == 0 and tag.split(":")[0] in r.stdout + r.stderr, r.stdout + r.stderr


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_a_directory_that_is_not_a_polm_bento_is_refused(tmp_path):
    from polm.errors import PolmError

    with pytest.raises(PolmError, match="not a bento"):
        check_package(tmp_path)
    (tmp_path / "bento.yaml").write_text("service: other:Svc\n")
    with pytest.raises(PolmError, match="not a polm bento"):
        check_package(tmp_path)


def test_the_bento_carries_no_training_code():
    from serve.bento import serving_modules

    files = {p.as_posix() for p in serving_modules()}
    assert "serve/service.py" in files and "serve/backends/llamacpp.py" in files
    assert not {f for f in files if not f.startswith(("serve/", "polm/"))}, files
    assert "polm/training.py" not in files and "serve/edge.py" not in files
