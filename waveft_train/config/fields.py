"""The building blocks of the config schema: `Section` (strict: unknown keys, true/false for numbers and inf/nan are
refused), `doc()` (a field with its documentation) and the shared field types. Torch-free."""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from waveft_train.config.errors import describe

Resolution = Annotated[int, Field(gt=0, multiple_of=8)]  # the SDXL VAE downsamples by 8
UnitInterval = Annotated[float, Field(ge=0.0, lt=1.0)]


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty or only whitespace; write the prompt, e.g. \"a photo of sks dog\"")
    return value


Prompt = Annotated[str, AfterValidator(_not_blank)]


def doc(default: Any = ..., text: str = "", *, example: Any = None, **constraints: Any) -> Any:
    """A field with its documentation; `example` is what the starter config shows instead of the default."""
    extra = {"example": example} if example is not None else None
    if callable(default):
        return Field(default_factory=default, description=text, json_schema_extra=extra, **constraints)
    return Field(default, description=text, json_schema_extra=extra, **constraints)


def _bool_for_number(value: Any, annotation: Any) -> bool:
    """True when a YAML true/false stands where `annotation` wants a number (pydantic would read true as 1),
    also inside lists and mapping values."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _bool_for_number(value, args[0])
    if origin in (Union, types.UnionType):
        return bool not in args and any(_bool_for_number(value, arg) for arg in args)
    if isinstance(value, bool):
        return annotation in (int, float)
    if origin is list and isinstance(value, list):
        return any(_bool_for_number(item, args[0]) for item in value)
    if origin is dict and isinstance(value, Mapping):
        return any(_bool_for_number(item, args[1]) for item in value.values())
    return False


class Section(BaseModel):
    """A config section: unknown keys, true/false for numbers, and inf/nan are all refused."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if _bool_for_number(value, annotation):
            expected = {int: "a valid integer", float: "a valid number"}.get(annotation) or describe(annotation)
            raise PydanticCustomError("bool_for_number", "Input should be {expected}", {"expected": expected})
        return value
