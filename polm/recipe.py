"""The recipe: one YAML file naming the models, the evaluation suite and the stages.

    name: quickstart
    seed: 0
    models: {base: builtin:tiny-base}
    eval: [add, reverse]
    stages:
      sft: {uses: align.sft, from: base, with: {task: add}}

Validation happens in full before anything runs: unknown stages, unknown or mistyped fields,
``from`` naming nothing, cycles, unknown eval tasks and names that are not plain names are all
reported up front; :func:`check_models` then resolves every model source without loading it.
"""

from __future__ import annotations

import difflib
import re
import sys
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from polm.errors import PolmError
from polm.gates import Gate
from polm.registry import get_stage, settings_class
from polm.settings import StageSettings, format_validation_error, parse_settings, short_repr
from polm.tasks import get_task

# The recipe name, model names and stage ids become directories (runs/<name>/<stage id>/,
# runs/<name>/models/<model>/), so each must be one plain path component: no separators, not
# "." or "..", no leading dot (the runner's own temporary and lock files start with one).
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
# what the runner itself writes beside the stage directories
RESERVED_STAGE_IDS = ("models", "logs", "packages", "report.json", "report.md", "report.html")


def check_name(kind: str, name: str, where: str) -> None:
    """Refuse a ``name`` that is not one plain path component (letters, digits, ``_ . -``)."""
    if not PLAIN_NAME.fullmatch(name):
        raise PolmError(
            f"{where}: {kind} {short_repr(name)} is not a plain name: use letters, digits, "
            "'_', '.' and '-' only, not starting with '.' (it names a directory under the run's "
            "workdir)."
        )


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uses: str = Field(description="The registered stage, e.g. align.sft.")
    from_: list[str] = Field(
        alias="from", min_length=1, description="Model names or earlier stage ids (at least one)."
    )
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="The stage's settings."
    )
    nproc: int = Field(default=1, ge=1, description="Processes for training stages (DDP).")

    @field_validator("from_", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


class PackageSpec(BaseModel):
    """A deployment package made from a stage's output after the run (``polm package``)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    target: str = Field(default="edge", description="The packager, e.g. edge.")
    from_: str = Field(alias="from", description="The stage (or model) to package.")
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="The packager's options, e.g. tar: true."
    )


class Recipe(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Run name (a plain name); outputs go to runs/<name>/.")
    seed: int = Field(default=0, description="Default seed for every stage that takes one.")
    models: dict[str, str] = Field(
        description="name -> builtin:NAME, local HF dir, .gguf file or pypi:PACKAGE (a GGUF)."
    )
    eval: list[str] = Field(default_factory=list, description="Tasks evaluated on every output.")
    eval_n: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate on the first N test examples of each task (default: all 500); "
        "polm run --eval-n overrides it.",
    )
    self_refine: int = Field(
        default=0,
        ge=0,
        description="Also evaluate each language-model output with N rounds of self-refine "
        "(the eval tasks that have a critic; polm.refine).",
    )
    self_refine_critic: Literal["self", "verifier", "both"] = Field(
        default="both", description="Who critiques in that evaluation (both: side by side)."
    )
    stages: dict[str, StageSpec] = Field(default_factory=dict)
    gates: dict[str, Gate] = Field(
        default_factory=dict, description="stage id -> what its output must reach (polm.gates)."
    )
    packages: dict[str, PackageSpec] = Field(
        default_factory=dict,
        description="name -> a package made after the run, in <workdir>/packages/<name>/.",
    )

    # filled by parse_recipe; private, so that a recipe cannot set them (`settings:` in a
    # recipe is an unknown field like any other)
    _settings: dict[str, StageSettings] = PrivateAttr(default_factory=dict)
    _source: Path | None = PrivateAttr(default=None)

    @property
    def settings(self) -> dict[str, StageSettings]:
        """Each stage's validated settings, by stage id."""
        return self._settings

    @property
    def source(self) -> Path | None:
        """The file the recipe was read from."""
        return self._source

    def order(self) -> list[str]:
        """Stage ids in dependency order (stable: recipe order among independent stages)."""
        order, state = [], {}

        def visit(sid: str, path: list[str]) -> None:
            if state.get(sid) == "done":
                return
            if state.get(sid) == "visiting":
                cycle = path[path.index(sid) :] + [sid]
                raise PolmError(
                    f"recipe {self.name!r}: the stages form a cycle: {' -> '.join(cycle)}."
                )
            state[sid] = "visiting"
            for src in self.stages[sid].from_:
                if src in self.stages:
                    visit(src, path + [sid])
            state[sid] = "done"
            order.append(sid)

        for sid in self.stages:
            visit(sid, [])
        return order


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise PolmError(f"no recipe at {path}.")
    return parse_recipe(read_yaml(path), source=path)


def read_yaml(path: Path) -> Any:
    """The YAML document in the file at ``path``; anything unreadable is one PolmError."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise PolmError(
            f"{path} is not UTF-8 text (byte {e.start} is {e.object[e.start : e.start + 1]!r}); "
            "save it as UTF-8."
        ) from None
    return parse_yaml(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """``text`` as YAML (safe_load); a syntax error, a number Python will not read or nesting
    too deep for the parser is one PolmError naming ``where`` and the line, never a traceback."""
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = "; ".join(x for x in (e.problem, e.context) if x) or type(e).__name__
        raise PolmError(f"{where} is not valid YAML: {what}{at}.") from None
    except yaml.YAMLError as e:
        raise PolmError(f"{where} is not valid YAML: {' '.join(str(e).split())}.") from None
    except ValueError:  # an integer with more digits than Python converts (sys.int_info)
        raise PolmError(
            f"{where}: a number has more digits than Python reads "
            f"({sys.get_int_max_str_digits()}); write a smaller one."
        ) from None
    except RecursionError:
        raise PolmError(f"{where} nests lists or mappings too deeply to read.") from None


def parse_recipe(raw: Any, source: Path | None = None) -> Recipe:
    where = f"recipe {str(source) if source else ''}".strip()
    if not isinstance(raw, dict):
        raise PolmError(f"{where}: expected a mapping with name, models and stages.")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise PolmError(format_validation_error(e, Recipe, where)) from None
    recipe._source = source
    check_name("name", recipe.name, where)
    for name in recipe.models:
        check_name("model name", name, where)
    for sid in recipe.stages:
        check_name("stage id", sid, where)
        if sid in RESERVED_STAGE_IDS:
            raise PolmError(
                f"{where}: stage id {sid!r} is reserved (the run directory keeps "
                f"{', '.join(RESERVED_STAGE_IDS)} there); rename the stage."
            )
    for task in recipe.eval:
        get_task(task)
    if recipe.self_refine:
        from polm.refine import CRITICS

        if not set(recipe.eval) & set(CRITICS):
            raise PolmError(
                f"{where}: self_refine needs an eval task with a critic ({', '.join(CRITICS)}); "
                f"eval is {recipe.eval or 'empty'}."
            )
    clash = set(recipe.models) & set(recipe.stages)
    if clash:
        raise PolmError(f"{where}: {sorted(clash)} name both a model and a stage; rename one.")
    names = list(recipe.models) + list(recipe.stages)
    for sid, spec in recipe.stages.items():
        entry = get_stage(spec.uses)
        for src in spec.from_:
            if src not in names:
                hint = difflib.get_close_matches(src, names, n=1)
                raise PolmError(
                    f"stage {sid!r}: 'from' names {short_repr(src)}, which is neither a model nor "
                    "a stage"
                    f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; known: {', '.join(names)}."
                )
        if spec.nproc > 1 and not entry.trains:
            raise PolmError(f"stage {sid!r}: nproc is only for training stages, not {spec.uses}.")
        values = dict(spec.with_)
        if "seed" in settings_class(spec.uses).model_fields and "seed" not in values:
            values["seed"] = recipe.seed
        recipe.settings[sid] = parse_settings(spec.uses, values, where=f"stage {sid!r}")
    for sid, gate in recipe.gates.items():
        where_gate = f"{where}: gates.{sid}"
        if sid not in recipe.stages:
            hint = difflib.get_close_matches(sid, list(recipe.stages), n=1)
            raise PolmError(
                f"{where_gate}: no stage {sid!r} to gate"
                f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; stages: "
                f"{', '.join(recipe.stages) or 'none'}."
            )
        gate.check_values(where_gate)
        unevaluated = sorted(gate.tasks() - set(recipe.eval))
        if unevaluated:
            raise PolmError(
                f"{where_gate}: the gate names task(s) {', '.join(unevaluated)}, which the recipe "
                f"does not evaluate; add them to eval: (now {recipe.eval or 'empty'})."
            )
    for name, pkg in recipe.packages.items():
        check_name("package name", name, where)
        if pkg.from_ not in names:
            raise PolmError(
                f"{where}: package {name!r}: 'from' names {pkg.from_!r}, which is neither a "
                f"model nor a stage; known: {', '.join(names)}."
            )
        from polm.registry import PACKAGERS, packager_options

        if pkg.target not in PACKAGERS:
            raise PolmError(
                f"{where}: package {name!r}: unknown target {pkg.target!r}; known: "
                f"{', '.join(PACKAGERS)}."
            )
        options = packager_options(pkg.target)
        unknown = sorted(set(pkg.with_) - set(options))
        if unknown:
            raise PolmError(
                f"{where}: package {name!r}: unknown option(s) {', '.join(unknown)} for the "
                f"{pkg.target} packager; it takes: {', '.join(options) or 'none'}."
            )
    recipe.order()
    return recipe


def check_models(recipe: Recipe) -> None:
    """Resolve every model the recipe names without loading weights (see
    :func:`polm.importer.check_source`): a missing or unreadable model fails here, before any
    stage runs, naming the model and its source."""
    from polm.importer import check_source

    for name, source in recipe.models.items():
        try:
            check_source(source)
        except PolmError as e:
            raise PolmError(f"model {name!r} ({source}): {e}") from None
