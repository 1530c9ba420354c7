import ast
import re

import pytest
import yaml

from polm.errors import PolmError
from polm.recipe import check_models, load_recipe, parse_recipe
from polm.registry import STAGES, settings_class, stage_function
from tests.helpers import REPO

STAGE_PACKAGES = ("align", "merge", "optimize")
GOOD = {
    "name": "t",
    "seed": 3,
    "models": {"base": "builtin:tiny-base"},
    "eval": ["add"],
    "stages": {
        "b": {"uses": "align.sft", "from": "a", "with": {"task": "add"}},
        "a": {"uses": "align.sft", "from": "base", "with": {"task": "reverse", "epochs": 2}},
    },
}


def _with(**changes):
    raw = yaml.safe_load(yaml.safe_dump(GOOD))
    for path, value in changes.items():
        node = raw
        *keys, last = path.split("__")
        for k in keys:
            node = node[k]
        node[last] = value
    return raw


def test_good_recipe_orders_by_from_and_fills_seed():
    r = parse_recipe(GOOD)
    assert r.order() == ["a", "b"]
    assert r.settings["a"].seed == 3 and r.settings["a"].num_train_epochs == 2


@pytest.mark.parametrize(
    "changes, pattern",
    [
        (
            {"stages__a__uses": "align.sfft"},
            r"unknown stage 'align.sfft' \(did you mean 'align.sft'"
            r"\?\); the known stages are: .*align.sft",
        ),
        (
            {"stages__a__with": {"task": "add", "learning_rat": 0.1}},
            r"stage 'a' \(align.sft\): unknown field 'learning_rat' \(did you mean 'learning_rate'",
        ),
        (
            {"stages__a__with": {"task": "add", "max_steps": "many"}},
            r"stage 'a' \(align.sft\): field 'max_steps'.*integer.*'many'",
        ),
        ({"stages__b__from": "nowhere"}, r"stage 'b': 'from' names 'nowhere'"),
        ({"stages__a__from": "b"}, r"cycle: (a -> b -> a|b -> a -> b)"),
        ({"eval": ["add", "multiply"]}, r"unknown task 'multiply'; the built-in tasks are"),
        ({"stages__a__with": {}}, r"stage 'a' \(align.sft\).*exactly one of `task`"),
        ({"stages__a__colour": 1}, r"unknown field 'stages.a.colour'"),
        (
            {"eval": ["tool"], "self_refine": 2},
            r"self_refine needs an eval task with a critic \(add, reverse, compare\)",
        ),
    ],
)
def test_bad_recipes_fail_with_a_clear_message(changes, pattern):
    with pytest.raises(PolmError, match=pattern):
        parse_recipe(_with(**changes))


BAD_NAMES = ["../escape", "a/b", "a\\b", ".hidden", ".", "..", "", "a b", "é"]
SFT = {"uses": "align.sft", "from": "base", "with": {"task": "add"}}


@pytest.mark.parametrize("bad", BAD_NAMES)
@pytest.mark.parametrize("kind", ["stage id", "model name", "name"])
def test_names_that_are_not_plain_are_refused(kind, bad):
    """They become directories under the workdir: `../escape` once wrote a checkpoint outside."""
    raw = _with()
    if kind == "stage id":
        raw["stages"][bad] = SFT
    elif kind == "model name":
        raw["models"][bad] = "builtin:tiny-base"
    else:
        raw["name"] = bad
    with pytest.raises(PolmError, match=re.escape(f"{kind} {bad!r} is not a plain name")):
        parse_recipe(raw)


@pytest.mark.parametrize("sid", ["models", "logs", "report.json"])
def test_stage_ids_the_runner_uses_are_reserved(sid):
    raw = _with()
    raw["stages"][sid] = SFT
    with pytest.raises(PolmError, match=f"stage id '{sid}' is reserved"):
        parse_recipe(raw)


def test_plain_names_with_dots_dashes_and_digits_pass():
    raw = _with(name="run-1.2_x")
    raw["models"]["base.v2"] = "builtin:tiny-llama"
    raw["stages"]["sft-3.b_"] = {**SFT, "from": "base.v2"}
    assert parse_recipe(raw).order() == ["a", "b", "sft-3.b_"]


def test_every_shipped_recipe_validates():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes
    for path in recipes:
        assert path.read_text().startswith("# Launch: polm run recipes/")
        recipe = load_recipe(path)
        try:
            check_models(recipe)
        except PolmError as e:
            # a model shipped as a Python package (pypi:NAME, gemma3-270m.yaml) need not be
            # installed where the tests run: then the error must say how to install it
            assert any(s.startswith("pypi:") for s in recipe.models.values()), e
            assert "pip install" in str(e), e


def test_registry_entries_resolve_and_settings_are_strict():
    for name, entry in STAGES.items():
        assert callable(stage_function(name))
        cls = settings_class(name)
        assert cls.model_config.get("extra") == "forbid"
        missing = [f for f, info in cls.model_fields.items() if not info.description]
        assert not missing, f"{name}: fields without a description: {missing}"
        module = entry.run.split(":")[0]
        assert (REPO / (module.replace(".", "/") + ".py")).is_file()


def test_every_package_target_resolves_with_its_check_and_use(tmp_path):
    from polm.registry import PACKAGE_CHECKS, PACKAGE_USE, PACKAGERS, packager, packager_check

    assert set(PACKAGERS) == set(PACKAGE_CHECKS) == set(PACKAGE_USE) >= {"edge", "bento"}
    for target in PACKAGERS:
        assert callable(packager(target)), target
        with pytest.raises(PolmError):  # an empty directory is no package of any target
            packager_check(target, tmp_path)


def stage_files() -> dict[str, list[str]]:
    """Every module under align/, merge/ and optimize/ with a top-level ``run`` function (a
    stage, by the house convention), with run's parameter names: ``{"align.sft": ["inputs",
    "settings", "out"]}``. Read from the source (nothing imported), so a new stage file is found
    before anything imports it; ``__init__.py`` and helper modules without a run are left out."""
    found = {}
    for package in STAGE_PACKAGES:
        for path in sorted((REPO / package).glob("*.py")):
            if path.name == "__init__.py":
                continue
            for node in ast.parse(path.read_text(), filename=str(path)).body:
                if isinstance(node, ast.FunctionDef) and node.name == "run":
                    found[f"{package}.{path.stem}"] = [a.arg for a in node.args.args]
    return found


def test_every_stage_file_is_registered_and_recipes_use_only_registered_stages():
    files = stage_files()
    assert {"align.sft", "merge.mergekit", "optimize.onnx"} <= set(files)  # the scan works
    for module, params in files.items():
        assert params == ["inputs", "settings", "out"], f"{module}.run{tuple(params)}"
    registered = {entry.run for entry in STAGES.values()}
    missing = sorted(m for m in files if f"{m}:run" not in registered)
    assert not missing, f"stage files with a run() that polm/registry.py lacks: {missing}"
    assert registered == {f"{m}:run" for m in files}  # and the registry names no other run
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        uses = {spec["uses"] for spec in yaml.safe_load(path.read_text())["stages"].values()}
        assert uses <= set(STAGES), f"{path.name} uses unregistered stages: {uses - set(STAGES)}"
