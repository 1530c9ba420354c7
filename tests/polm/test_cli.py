"""Bad input: one clear paragraph on stderr, exit code 2, never a traceback."""

import shutil

import pytest
import yaml

from tests import helpers


def polm_cli(*args, **kw):
    """`polm` from a cold start, as a user runs it: these tests read everything it prints."""
    return helpers.polm_cli(*args, fresh=True, **kw)


def _recipe(tmp_path, **stage_changes):
    stage = {"uses": "align.sft", "from": "base", "with": {"task": "add"}, **stage_changes}
    raw = {"name": "bad", "models": {"base": "builtin:tiny-base"}, "stages": {"sft": stage}}
    p = tmp_path / f"r{len(list(tmp_path.glob('r*.yaml')))}.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    err = proc.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err


def test_bad_recipes_exit_2_with_one_paragraph(tmp_path):
    cases = [
        (_recipe(tmp_path, uses="align.nope"), ["unknown stage 'align.nope'", "align.sft"]),
        (
            _recipe(tmp_path, **{"with": {"task": "add", "epoch": 2}}),
            ["stage 'sft' (align.sft)", "unknown field 'epoch'"],
        ),
        (_recipe(tmp_path, **{"from": "basse"}), ["'from' names 'basse'", "did you mean 'base'"]),
        (_recipe(tmp_path, **{"with": {"task": "multiply"}}), ["unknown task 'multiply'"]),
    ]
    for path, needles in cases:
        _assert_clean_error(polm_cli("validate", path), *needles)
        path.unlink()


def test_cycle_is_reported(tmp_path):
    raw = {
        "name": "c",
        "models": {"base": "builtin:tiny-base"},
        "stages": {
            "x": {"uses": "align.sft", "from": "y", "with": {"task": "add"}},
            "y": {"uses": "align.sft", "from": "x", "with": {"task": "add"}},
        },
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    _assert_clean_error(polm_cli("run", tmp_path / "c.yaml", "--workdir", tmp_path / "w"), "cycle")
    assert not (tmp_path / "w").exists()


def test_bad_checkpoints_and_models(tmp_path, base_ckpt):
    d = tmp_path / "pickled"
    shutil.copytree(base_ckpt.path, d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    _assert_clean_error(polm_cli("import", d, "--out", tmp_path / "o"), "--allow-pickle")
    c = tmp_path / "corrupt"
    shutil.copytree(base_ckpt.path, c)
    (c / "polm.json").unlink()
    (c / "model.safetensors").write_bytes(b"\x00" * 10)
    _assert_clean_error(polm_cli("import", c, "--out", tmp_path / "o"), "not a valid safetensors")
    _assert_clean_error(polm_cli("eval", tmp_path, "--task", "add"), "not a polm checkpoint")
    _assert_clean_error(polm_cli("eval", base_ckpt.path, "--task", "nope"), "unknown task 'nope'")
    _assert_clean_error(
        polm_cli(
            "align",
            "sft",
            "--from",
            base_ckpt.path,
            "--out",
            tmp_path / "o",
            "--set",
            "task=add",
            "--set",
            "method=qlora",
        ),
        "field 'method'",
        "qlora",
    )


@pytest.mark.parametrize("cmd", [["stages"], ["--help"]])
def test_listing_commands(cmd):
    proc = polm_cli(*cmd)
    assert proc.returncode == 0
    if cmd == ["stages"]:
        from polm.registry import STAGES

        listed = [line.split()[0] for line in proc.stdout.splitlines()]
        assert listed == sorted(STAGES)


def test_corrupt_weights_inside_a_checkpoint(tmp_path, base_ckpt):
    c = tmp_path / "ckpt"
    shutil.copytree(base_ckpt.path, c)
    data = (c / "model.safetensors").read_bytes()
    (c / "model.safetensors").write_bytes(data[: len(data) // 3])
    _assert_clean_error(polm_cli("eval", c, "--task", "add"), "not a valid safetensors file")
    _assert_clean_error(
        polm_cli("align", "sft", "--from", c, "--out", tmp_path / "o", "--set", "task=add"),
        "not a valid safetensors file",
    )
    assert not (tmp_path / "o").exists()


def _models_recipe(tmp_path, source):
    raw = {
        "name": "m",
        "models": {"base": str(source)},
        "stages": {"sft": {"uses": "align.sft", "from": "base", "with": {"task": "add"}}},
    }
    p = tmp_path / "m.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def test_validate_resolves_every_model_without_running(tmp_path, base_ckpt):
    not_gguf = tmp_path / "garbage.gguf"
    not_gguf.write_bytes(b"GGUF" + b"\x00" * 32)
    no_config = tmp_path / "no-config"
    shutil.copytree(base_ckpt.path, no_config)
    (no_config / "config.json").unlink()
    bad = [
        (tmp_path / "no-such-dir", ["model 'base'", "no-such-dir", "no such file or directory"]),
        (tmp_path / "no-such.gguf", ["model 'base'", "no-such.gguf", "no such file or directory"]),
        ("builtin:tiny-huge", ["model 'base'", "unknown built-in model 'tiny-huge'"]),
        (not_gguf, ["model 'base'", "cannot read", "garbage.gguf", "as a GGUF model"]),
        (no_config, ["model 'base'", "config.json is missing"]),
    ]
    for source, needles in bad:
        _assert_clean_error(polm_cli("validate", _models_recipe(tmp_path, source)), *needles)


def test_validate_accepts_builtins_directories_and_gguf_files(tmp_path, base_ckpt):
    from tests.polm.gguf_writer import write_llama_gguf

    gguf_file = write_llama_gguf(base_ckpt.path, tmp_path / "tiny.gguf")
    for source in ("builtin:tiny-base", base_ckpt.path, gguf_file):
        proc = polm_cli("validate", _models_recipe(tmp_path, source))
        assert proc.returncode == 0, proc.stderr
        assert "ok (1 models, 1 stages: sft)" in proc.stdout


def test_run_with_a_missing_model_fails_before_any_stage(tmp_path):
    recipe = _models_recipe(tmp_path, tmp_path / "gone")
    proc = polm_cli("run", recipe, "--workdir", tmp_path / "w")
    _assert_clean_error(proc, "model 'base'", "gone", "no such file or directory")
    assert not (tmp_path / "w").exists()


def test_a_stage_id_that_escapes_the_workdir_is_refused(tmp_path):
    raw = {
        "name": "e",
        "models": {"base": "builtin:tiny-base"},
        "stages": {"../escape": {"uses": "align.sft", "from": "base", "with": {"task": "add"}}},
    }
    (tmp_path / "e.yaml").write_text(yaml.safe_dump(raw))
    proc = polm_cli("run", tmp_path / "e.yaml", "--workdir", tmp_path / "w" / "run")
    _assert_clean_error(proc, "stage id '../escape' is not a plain name")
    assert not (tmp_path / "w").exists() and not (tmp_path / "escape").exists()
