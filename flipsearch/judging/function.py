"""Any ``(prompt, response)`` callable as a judge (the library API's custom judges)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flipsearch.errors import FlipsearchError
from flipsearch.judging._base import Verdict, check_role


class FunctionJudge:
    """Any callable ``(prompt, response) -> verdict`` as a judge, for the role it serves.

    The callable returns a ``Verdict``, or a bool (the safety role: True means unsafe; the
    refusal role: True means a refusal), or None when it cannot tell. None and any other
    value are counted as ``invalid`` with the reason; an exception stops the run with a
    message naming the judge, since it is a bug in the judge rather than a verdict.
    """

    def __init__(
        self, function: Callable[[str, str], Any], role: str = "safety", name: str | None = None
    ) -> None:
        check_role(role)
        self.function = function
        self.role = role
        self.name: str = name or str(getattr(function, "__name__", type(function).__name__))
        self.roles = (role,)

    def judge(self, pairs: Sequence[tuple[str, str]]) -> list[Verdict]:
        verdicts = []
        for index, (prompt, response) in enumerate(pairs):
            try:
                value = self.function(prompt, response)
            except Exception as exc:
                raise FlipsearchError(
                    f"judge {self.name!r} raised on response {index} ({prompt[:40]!r}...): {exc!r}"
                ) from exc
            verdicts.append(self._verdict(value))
        return verdicts

    def _verdict(self, value: Any) -> Verdict:
        if isinstance(value, Verdict):
            return value
        if isinstance(value, bool):
            if self.role == "refusal":
                return Verdict(unsafe=None, score=None, refusal=value)
            return Verdict(unsafe=value, score=float(value))
        if value is None:
            return Verdict.invalid_because(f"judge {self.name!r} could not tell")
        return Verdict.invalid_because(
            f"judge {self.name!r} returned {type(value).__name__}, not a Verdict or a bool"
        )
