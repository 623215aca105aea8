"""CLI options built from the settings' own declarations (dataclass fields and their metadata).

A command declares which settings it takes (``takes(...)``); each becomes a typer option
named after its field, with the field's default and help text, so an option is written once
and reaches the setting of the same name. See ``backends._base.option`` for the metadata.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, TypeVar

import typer

from flipsearch.errors import FlipsearchError

F = TypeVar("F", bound=Callable[..., Any])
BACKEND_OPTIONS = "Backend options"  # the help panel of every backend's own options


@dataclasses.dataclass(frozen=True)
class Setting:
    """One CLI option: the setting's name, type, default and declaration."""

    name: str
    annotation: Any
    default: Any
    metadata: dict[str, Any]
    panel: str | None = None


def fields_of(cls: type, panel: str | None = None, skip: Iterable[str] = ()) -> list[Setting]:
    """The declared settings of a dataclass (fields with ``option`` metadata)."""
    hints = typing.get_type_hints(cls)
    settings = []
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata or f.name in skip:
            continue
        default = f.default
        if default is dataclasses.MISSING:
            default = f.default_factory()  # type: ignore[operator]
        settings.append(Setting(f.name, hints[f.name], default, dict(f.metadata), panel))
    return settings


def parameters_of(
    function: Callable[..., Any], declared: dict[str, dict[str, Any]], panel: str | None = None
) -> list[Setting]:
    """Settings that are a function's keyword parameters (their defaults are the function's)."""
    hints = typing.get_type_hints(function)
    signature = inspect.signature(function)
    return [
        Setting(name, hints[name], signature.parameters[name].default, meta, panel)
        for name, meta in declared.items()
    ]


def takes(*groups: Iterable[Setting], defaults: dict[str, Any] | None = None) -> Callable[[F], F]:
    """Give a ``def command(**options)`` (plus any explicit parameters) these options."""

    def decorate(function: F) -> F:
        own = [
            p
            for p in inspect.signature(function, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        generated = [
            _parameter(s, (defaults or {}).get(s.name, s.default)) for g in groups for s in g
        ]
        function.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
        function.__annotations__ = {p.name: p.annotation for p in [*own, *generated]}
        return function

    return decorate


def _parameter(setting: Setting, default: Any) -> inspect.Parameter:
    meta = setting.metadata
    names = [meta["flag"]] if meta.get("flag") else []
    option = typer.Option(
        *names, help=meta["help"], rich_help_panel=setting.panel, **meta.get("typer", {})
    )
    annotation, default = _cli_type(setting.annotation, default, meta.get("key_values", False))
    return inspect.Parameter(
        setting.name,
        inspect.Parameter.KEYWORD_ONLY,
        default=default,
        annotation=Annotated[annotation, option],
    )


def _cli_type(annotation: Any, default: Any, key_values: bool) -> tuple[Any, Any]:
    """How typer reads a setting: collections become repeatable options (default None)."""
    if key_values or typing.get_origin(annotation) in (dict, list, tuple):
        return list[str] | None, None
    return annotation, default


def key_values(items: list[str], option: str) -> dict[str, Any]:
    """KEY=VALUE pairs; values are read as YAML scalars (2 -> int, 0.8 -> float, true -> bool)."""
    import yaml

    parsed: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise FlipsearchError(f"{option} {item!r}: expected KEY=VALUE")
        try:
            parsed[key.strip()] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise FlipsearchError(f"{option} {item!r}: cannot read the value ({exc})") from exc
    return parsed


def collected(options: dict[str, Any], *groups: Iterable[Setting]) -> dict[str, Any]:
    """The settings as given on the command line, each by its name, ready for a config.

    Repeatable options come back as lists (None when not given) and ``KEY=VALUE`` options as
    dicts. Backend options left at their default are dropped, so only the chosen backend's
    options need to be valid for it.
    """
    by_name = {s.name: s for group in groups for s in group}
    values: dict[str, Any] = {}
    for name, value in options.items():
        setting = by_name.get(name)
        if setting is None:
            values[name] = value
            continue
        meta, default = setting.metadata, setting.default
        if meta.get("key_values") or typing.get_origin(setting.annotation) is dict:
            value = key_values(value or [], meta.get("flag") or "--" + name.replace("_", "-"))
        elif typing.get_origin(setting.annotation) in (list, tuple):
            value, default = list(value or []), list(default)
        if setting.panel == BACKEND_OPTIONS and value == default:
            continue
        values[name] = value
    return values
