"""The shapes of the run folder's files as they are read back (`sa2va_tui.runstore`
reads them): run.json and each line of events.jsonl must be of the types their
writers write, or they are refused whole, before any reader trips over a list
where a number belongs.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from typing import Any

from pydantic import TypeAdapter, ValidationError
from typing_extensions import TypedDict  # pydantic reads typing's TypedDict only from Python 3.12

from sa2va_contract.events import Event, event_from_dict
from sa2va_contract.layout import is_plain_name
from sa2va_tui.runstate import ExperimentState


class ShapeError(ValueError):
    """Content of another shape than the one written; `str()` says where and what."""


class RunFile(TypedDict, total=False):
    """The shape of run.json, as `RunStore.write_state` writes it."""

    run_id: str
    created_at: float
    updated_at: float
    supervisor_pid: int | None
    host: str
    active: bool
    finish_time: float | None
    experiments: dict[str, ExperimentState]
    #: The run's mask stage and its counts (`sa2va_tui.runstore.MASK_COUNT_KEYS`).
    mask_stage: ExperimentState | None
    model_calls: int | None
    distinct_pairs: int | None
    cache_hits: int | None


@cache
def _run_file_shape() -> TypeAdapter:
    return TypeAdapter(RunFile)


def checked_run_file(raw: Any) -> RunFile:
    """run.json's parsed content, checked against its shape (its states built); a
    ShapeError naming the first key that is wrong."""
    if not isinstance(raw, dict):
        raise ShapeError(f"a JSON object expected, found {_json_kind(raw)}")
    try:
        data: RunFile = _run_file_shape().validate_python(raw)
    except ValidationError as err:
        error = err.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        raise ShapeError(f"{where}: {error['msg'].lower()}, found {_json_kind(error.get('input'))}") from None
    for name in data.get("experiments", {}):
        if not is_plain_name(name):
            raise ShapeError(f"experiments: {name!r} is not a plain experiment name")
    return data


def _json_kind(value: Any) -> str:
    """How a JSON value reads in an error: `null`, `a list`, `"abc"`, `12`."""
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return "a list" if isinstance(value, list) else "an object"
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@cache
def _event_shape(cls: type[Event]) -> TypeAdapter:
    return TypeAdapter(cls)


def checked_event(data: Any) -> Event:
    """An event from its JSON form, its fields of the types its class declares; a
    ValueError (pydantic's), KeyError, TypeError or AttributeError otherwise."""
    event = event_from_dict(data)
    return _event_shape(type(event)).validate_python(dataclasses.asdict(event))
