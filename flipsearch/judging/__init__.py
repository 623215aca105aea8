"""Judges, by name: the registry and ``get_judge``.

A judge is one module in this package with a ``make(argument, role, **options)`` function, and
one line in ``JUDGES`` below. The module is imported only when its judge is asked for, so a
judge's heavy dependencies (transformers weights, scikit-learn) load only for the runs that
use it. The contract every judge keeps is in ``_base.py``.

A judge is named ``NAME`` or ``NAME:ARGUMENT`` (``classifier:DIR``, ``ensemble:any:A+B``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, cast

from flipsearch.errors import FlipsearchError
from flipsearch.judging._base import ROLES, Judge, JudgeSpec, Verdict, check_role, judge_roles


@dataclass(frozen=True)
class Plugin:
    """Where a judge lives and what is known of it before it loads."""

    module: str
    usage: str  # how a user names it
    roles: tuple[str, ...]  # the roles it can serve (a loaded judge may narrow them)


JUDGES = {
    "refusal": Plugin("flipsearch.judging.refusal", "refusal", ROLES),
    "llama-guard": Plugin("flipsearch.judging.llama_guard", "llama-guard", ("safety",)),
    "classifier": Plugin("flipsearch.judging.classifier", "classifier[:DIR]", ROLES),
    "ensemble": Plugin("flipsearch.judging.ensemble", "ensemble:MODE:A+B", ROLES),
    "wildguard": Plugin("flipsearch.judging.wildguard", "wildguard", ROLES),
}


def judge_names(role: str | None = None) -> str:
    """The names ``--judge`` accepts (for a role), for help texts and errors."""
    return ", ".join(p.usage for p in JUDGES.values() if role is None or role in p.roles)


def get_judge(
    spec: JudgeSpec,
    role: str = "safety",
    judge_model: str | None = None,
    **options: Any,
) -> Judge:
    """Build a judge for a role (``safety`` or ``refusal``) from its name, or pass one through.

    Names: ``refusal``; ``llama-guard`` (needs ``judge_model``; safety role only);
    ``wildguard`` (needs ``judge_model``; both roles, one loaded model shared between them);
    ``classifier`` (trained on the shipped labelled set for the role's label) or
    ``classifier:DIR`` (a directory written by ``flipsearch judge train``);
    ``ensemble:MODE:A+B+...`` with MODE any, all, majority or mean. A judge object (with
    ``judge(pairs)``) passes through unchanged; any other callable ``(prompt, response)``
    becomes a ``FunctionJudge`` for the role.
    """
    check_role(role)
    if not isinstance(spec, str):
        if hasattr(spec, "judge"):
            return cast(Judge, spec)
        if callable(spec):
            from flipsearch.judging.function import FunctionJudge

            return FunctionJudge(spec, role)
        raise FlipsearchError(f"a judge is a name, a Judge or a callable, not {spec!r}")
    name, _, argument = spec.partition(":")
    plugin = JUDGES.get(name)
    if plugin is None:
        raise FlipsearchError(f"unknown judge {spec!r}; available: {judge_names()}")
    _check_serves(spec, role, plugin.roles, why=_ROLE_NOTES.get(name, ""))  # before any loading
    module = importlib.import_module(plugin.module)
    judge: Judge = module.make(
        argument,
        role,
        judge_model=judge_model,
        build=lambda member: get_judge(member, role, judge_model, **options),
        **options,
    )
    _check_serves(spec, role, judge_roles(judge))
    return judge


_ROLE_NOTES = {"llama-guard": "; Llama Guard cannot see over-refusal"}


def _check_serves(spec: str, role: str, roles: tuple[str, ...], why: str = "") -> None:
    if role not in roles:
        raise FlipsearchError(
            f"judge {spec!r} cannot serve as the {role} judge (it can be: {', '.join(roles)}){why}"
        )


__all__ = ["JUDGES", "ROLES", "Judge", "JudgeSpec", "Plugin", "Verdict", "get_judge", "judge_names"]
