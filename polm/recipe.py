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
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from polm.errors import PolmError
from polm.registry import get_stage, settings_class
from polm.settings import StageSettings, format_validation_error, parse_settings
from polm.tasks import get_task

# The recipe name, model names and stage ids become directories (runs/<name>/<stage id>/,
# runs/<name>/models/<model>/), so each must be one plain path component: no separators, not
# "." or "..", no leading dot (the runner's own temporary and lock files start with one).
PLAIN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*")
# what the runner itself writes beside the stage directories
RESERVED_STAGE_IDS = ("models", "logs", "report.json")


def check_name(kind: str, name: str, where: str) -> None:
    """Refuse a ``name`` that is not one plain path component (letters, digits, ``_ . -``)."""
    if not PLAIN_NAME.fullmatch(name):
        raise PolmError(
            f"{where}: {kind} {name!r} is not a plain name: use letters, digits, '_', '.' and "
            "'-' only, not starting with '.' (it names a directory under the run's workdir)."
        )


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    uses: str = Field(description="The registered stage, e.g. align.sft.")
    from_: list[str] = Field(alias="from", description="Model names or earlier stage ids.")
    with_: dict[str, Any] = Field(
        default_factory=dict, alias="with", description="The stage's settings."
    )
    nproc: int = Field(default=1, ge=1, description="Processes for training stages (DDP).")

    @field_validator("from_", mode="before")
    @classmethod
    def _listify(cls, v):
        return [v] if isinstance(v, str) else v


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
        gt=0,
        description="Test examples per task in that evaluation (default: the whole split); "
        "`polm run --eval-n` overrides it.",
    )
    stages: dict[str, StageSpec] = Field(default_factory=dict)

    # filled by load_recipe
    settings: dict[str, StageSettings] = Field(default_factory=dict, exclude=True)
    source: Path | None = Field(default=None, exclude=True)

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
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise PolmError(f"{path} is not valid YAML: {e}") from None
    return parse_recipe(raw, source=path)


def parse_recipe(raw: Any, source: Path | None = None) -> Recipe:
    where = f"recipe {str(source) if source else ''}".strip()
    if not isinstance(raw, dict):
        raise PolmError(f"{where}: expected a mapping with name, models and stages.")
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise PolmError(format_validation_error(e, Recipe, where)) from None
    recipe.source = source
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
                    f"stage {sid!r}: 'from' names {src!r}, which is neither a model nor a stage"
                    f"{f' (did you mean {hint[0]!r}?)' if hint else ''}; known: {', '.join(names)}."
                )
        if spec.nproc > 1 and not entry.trains:
            raise PolmError(f"stage {sid!r}: nproc is only for training stages, not {spec.uses}.")
        values = dict(spec.with_)
        if "seed" in settings_class(spec.uses).model_fields and "seed" not in values:
            values["seed"] = recipe.seed
        recipe.settings[sid] = parse_settings(spec.uses, values, where=f"stage {sid!r}")
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
