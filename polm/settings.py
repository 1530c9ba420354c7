"""Strict settings for stages: unknown or mistyped fields fail before any work starts, with a
message that names the stage, the field and what was expected."""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from polm.errors import PolmError
from polm.registry import settings_class


class StageSettings(BaseModel):
    """Base for every stage's settings: ``extra="forbid"``, validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def check_choice(what: str, value: str, choices) -> str:
    """``value`` if it is one of ``choices``; else a ValueError with the nearest one named."""
    if value not in choices:
        hint = difflib.get_close_matches(value, choices, n=1)
        raise ValueError(
            f"unknown {what} {value!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
            f"choose one of {', '.join(choices)}"
        )
    return value


def parse_settings(stage: str, values: dict[str, Any], where: str | None = None) -> StageSettings:
    """Validate ``values`` against ``stage``'s settings; raise one clear PolmError otherwise."""
    cls = settings_class(stage)
    try:
        return cls.model_validate(values)
    except ValidationError as e:
        raise PolmError(format_validation_error(e, cls, f"{where or 'stage'} ({stage})")) from None


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters: an error message quotes what it refuses,
    and a 5,000-digit number or a long list must not bury the message."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 5]}...{text[-2:]}"


def format_validation_error(e: ValidationError, cls: type[BaseModel], where: str) -> str:
    problems = []
    for err in e.errors():
        field = ".".join(str(x) for x in err["loc"]) or "(settings)"
        if err["type"] == "extra_forbidden":
            hint = difflib.get_close_matches(str(err["loc"][0]), cls.model_fields, n=1)
            problems.append(
                f"unknown field {field!r}{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                f"known fields: {', '.join(cls.model_fields)}"
            )
        else:
            problems.append(f"field {field!r}: {err['msg']} (got {short_repr(err.get('input'))})")
    return f"{where}: " + "; ".join(problems) + "."
