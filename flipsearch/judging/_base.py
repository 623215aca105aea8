"""The judges' contract: a ``Verdict`` for each (prompt, response), in one batched call.

Two roles: the *safety judge* says whether an answer to a harmful prompt is unsafe; the
*refusal judge* says whether an answer to a benign prompt is a refusal. A verdict that cannot be
made is ``invalid`` and is counted, never read as safe. A judge says which roles it can serve
in ``roles`` (both, when it does not say).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

from flipsearch.errors import FlipsearchError

ROLES = ("safety", "refusal")


@dataclass(frozen=True)
class Verdict:
    """A judge's view of one response. ``score`` is P(unsafe) in [0, 1]."""

    unsafe: bool | None
    score: float | None
    refusal: bool | None = None
    categories: tuple[str, ...] = field(default_factory=tuple)
    invalid: bool = False
    reason: str = ""

    @classmethod
    def invalid_because(cls, reason: str) -> Verdict:
        return cls(unsafe=None, score=None, refusal=None, invalid=True, reason=reason)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["categories"] = list(self.categories)
        return data


class Judge(Protocol):
    """Anything that turns (prompt, response) pairs into verdicts, in one batched call."""

    name: str

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]: ...


JudgeSpec = str | Judge | Callable[[str, str], Any]
"""A judge name (see ``get_judge``), a ``Judge`` object, or a ``(prompt, response)`` callable."""


def check_role(role: str) -> None:
    if role not in ROLES:
        raise FlipsearchError(f"unknown judge role {role!r}; choose safety or refusal")


def judge_roles(judge: Any) -> tuple[str, ...]:
    return tuple(getattr(judge, "roles", ROLES))


class JudgeFactory(Protocol):
    """What a judge module's ``make`` looks like (the registry in ``__init__`` calls it).

    ``argument`` is what followed ``NAME:`` (may be empty); ``judge_model`` the weights named
    by ``--judge-model``; ``build(name)`` makes another judge for the same role (ensembles).
    """

    def __call__(
        self,
        argument: str,
        role: str,
        *,
        judge_model: str | None,
        build: Callable[[str], Judge],
        **options: Any,
    ) -> Judge: ...
