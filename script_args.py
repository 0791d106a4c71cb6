"""The Script's arguments, in the order of its UI (the API's ``script_args`` follow it), and the request forms the API
accepts. Pure logic: no webui import, so the rules are unit-tested on their own.
"""
from __future__ import annotations

import dataclasses
from typing import Any

SCRIPT_TITLE = "onediff_diffusion_model"
NO_CACHE = "None"


class ScriptArgsError(ValueError):
    """A script argument of the wrong type; ``index`` and ``name`` say which one."""

    def __init__(self, index: int, name: str, message: str):
        super().__init__(f"script_args[{index}] ({name}) {message}")
        self.index = index
        self.name = name


@dataclasses.dataclass(frozen=True)
class ScriptArgs:
    quantization: bool = False
    compiler_cache: str = NO_CACHE
    saved_cache_name: str = ""
    always_recompile: bool = False

    def as_list(self) -> list:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


FIELDS = dataclasses.fields(ScriptArgs)


def _as_bool(index: int, name: str, value: Any) -> bool:
    if value is None:
        return False
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ScriptArgsError(index, name, f"must be true or false, not {value!r}")


def _as_text(index: int, name: str, value: Any, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip() or default
    raise ScriptArgsError(index, name, f"must be a string, not {value!r}")


def parse_script_args(values: Any) -> ScriptArgs:
    """Accepts the full list, any shorter prefix, and OneDiff's historic forms: ``[True]``, ``[{"0": true}]`` (a dict
    from position to value, alone in the list or as the whole value) and ``[false, null, ""]``."""
    if values is None:
        values = []
    if isinstance(values, list) and len(values) == 1 and isinstance(values[0], dict):
        values = values[0]
    if isinstance(values, dict):
        by_position = {}
        for key, value in values.items():
            if not str(key).isdigit() or int(key) >= len(FIELDS):
                raise ScriptArgsError(0, "script_args", f"has an unknown position {key!r}; positions are 0-{len(FIELDS) - 1}")
            by_position[int(key)] = value
        values = [by_position.get(i) for i in range(len(FIELDS))]
    if not isinstance(values, (list, tuple)):
        raise ScriptArgsError(0, "script_args", f"must be a list, not {values!r}")
    if len(values) > len(FIELDS):
        raise ScriptArgsError(len(FIELDS), "script_args", f"has {len(values)} values; this script takes at most {len(FIELDS)}")
    values = list(values) + [None] * (len(FIELDS) - len(values))
    return ScriptArgs(
        quantization=_as_bool(0, "quantization", values[0]),
        compiler_cache=_as_text(1, "compiler_cache", values[1], NO_CACHE),
        saved_cache_name=_as_text(2, "saved_cache_name", values[2], ""),
        always_recompile=_as_bool(3, "always_recompile", values[3]),
    )


def is_this_script(name: Any) -> bool:
    return isinstance(name, str) and name.strip().lower() == SCRIPT_TITLE


def normalize_request(body: dict) -> dict:
    """Rewrites a txt2img/img2img request body for webui: OneDiff's ``"script"`` field becomes webui's
    ``"script_name"``, and this script's ``script_args`` become the full list. Raises ``ScriptArgsError``."""
    if not isinstance(body, dict):
        return body
    if not body.get("script_name") and is_this_script(body.get("script")):
        body = {**body, "script_name": SCRIPT_TITLE}
    if is_this_script(body.get("script_name")):
        body = {**body, "script_args": parse_script_args(body.get("script_args")).as_list()}
    return body
