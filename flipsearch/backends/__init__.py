"""Backends, by name: the registry, ``BackendSpec`` and ``make_backend``.

A backend is one module in this package with a ``create(loaded, options, batch_size)``
function and an ``Options`` dataclass of its own settings (or ``Options = None``), plus one
line in ``BACKENDS`` below. The module is imported only when it is needed, so vLLM and httpx
load only for the runs that use them. The contract every backend keeps is in ``_base.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from flipsearch.backends._base import Decoding, Generation, Generator, Scorer
from flipsearch.errors import FlipsearchError


@dataclass(frozen=True)
class Plugin:
    """Where a backend lives and what is known of it before it loads."""

    module: str
    needs_weights: bool  # runs the model in this process (else: only its tokenizer is loaded)


BACKENDS = {
    "hf": Plugin("flipsearch.backends.hf", needs_weights=True),
    "vllm": Plugin("flipsearch.backends.vllm", needs_weights=False),
    "openai": Plugin("flipsearch.backends.openai", needs_weights=False),
}


def backend_module(name: str) -> ModuleType:
    if name not in BACKENDS:
        raise FlipsearchError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return importlib.import_module(BACKENDS[name].module)


def option_fields() -> dict[str, tuple[str, dataclasses.Field[Any]]]:
    """Every backend option by name: (the backend it belongs to, its dataclass field)."""
    found: dict[str, tuple[str, dataclasses.Field[Any]]] = {}
    for name in BACKENDS:
        options = backend_module(name).Options
        for f in dataclasses.fields(options) if options is not None else ():
            found[f.name] = (name, f)
    return found


def flag(name: str, f: dataclasses.Field[Any]) -> str:
    return f.metadata.get("flag") or "--" + name.replace("_", "-")


class BackendSpec:
    """Which backend generates, with that backend's own options.

    ``BackendSpec("openai", base_url=("http://host:8000/v1",), served_model="m")``; each
    option is checked by its backend's ``Options`` (an option of another backend is an error
    that names the backend it is for).
    """

    def __init__(self, name: str = "hf", **options: Any) -> None:
        module = backend_module(name)
        known = option_fields()
        for key in options:
            owner = known.get(key)
            if owner is None:
                raise FlipsearchError(f"unknown backend option {key!r}")
            if owner[0] != name:
                raise FlipsearchError(f"{flag(key, owner[1])} is for --backend {owner[0]}")
        self.name = name
        self.options: Any = module.Options(**options) if module.Options is not None else None

    @property
    def needs_weights(self) -> bool:
        """Only ``hf`` runs the model in this process; the others need just its tokenizer."""
        return BACKENDS[self.name].needs_weights

    def to_dict(self) -> dict[str, Any]:
        options = dataclasses.asdict(self.options) if self.options is not None else {}
        return {"name": self.name, **options}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BackendSpec) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(repr(self))

    def __repr__(self) -> str:
        return f"BackendSpec({self.name!r}, {self.options!r})"


def make_backend(
    spec: BackendSpec | str, loaded: Any, batch_size: int = 64, **options: Any
) -> tuple[Generator, Scorer]:
    """The generator and scorer of a backend for ``loaded`` (weights, or only its tokenizer)."""
    if isinstance(spec, str):
        spec = BackendSpec(spec, **options)
    elif options:
        raise FlipsearchError("give backend options in the BackendSpec or by name, not both")
    created: tuple[Generator, Scorer] = backend_module(spec.name).create(
        loaded, spec.options, batch_size
    )
    return created


__all__ = [
    "BACKENDS",
    "BackendSpec",
    "Decoding",
    "Generation",
    "Generator",
    "Plugin",
    "Scorer",
    "make_backend",
]
