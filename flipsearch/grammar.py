"""The context grammar: components with options and conditional branches, composed by Optuna.

A composed context is reproducible from its parameters (the chosen option of each component
and the placement) and has a stable id, a hash of its placement and text.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flipsearch.contexts import PLACEMENTS, Context, default_contexts_dir
from flipsearch.errors import FlipsearchError
from flipsearch.io import read_yaml


@dataclass(frozen=True)
class Component:
    name: str
    options: dict[str, str]  # option name -> text ("" for none)
    when: dict[str, tuple[str, ...]]  # component -> options under which this one is chosen


@dataclass(frozen=True)
class Grammar:
    components: dict[str, Component]
    order: tuple[str, ...]
    placements: tuple[str, ...]

    def active(self, name: str, chosen: dict[str, str]) -> bool:
        """Whether a component is chosen, given the choices made so far (in order)."""
        return all(chosen.get(k) in allowed for k, allowed in self.components[name].when.items())

    def compose(self, params: dict[str, str]) -> Context:
        """The context for a full set of choices (missing inactive ones take their first option)."""
        chosen: dict[str, str] = {}
        for name in self._decision_order():
            component = self.components[name]
            if name in params and self.active(name, chosen):
                option = params[name]
                if option not in component.options:
                    raise FlipsearchError(f"grammar: {name!r} has no option {option!r}")
                chosen[name] = option
            else:
                chosen[name] = next(iter(component.options))
        placement = params.get("placement", self.placements[0])
        if placement not in self.placements:
            raise FlipsearchError(f"grammar: placement {placement!r} is not allowed")
        parts = [self.components[n].options[chosen[n]] for n in self.order if n in chosen]
        text = " ".join(part for part in parts if part)
        tags = [f"{n}={chosen[n]}" for n in self._decision_order()]
        return Context.composed(text, placement, "g", "grammar", tags)

    def suggest(self, trial: Any) -> Context:
        """Let an Optuna trial choose every active component (define-by-run, so branches work)."""
        chosen: dict[str, str] = {}
        for name in self._decision_order():
            if self.active(name, chosen):
                chosen[name] = trial.suggest_categorical(name, list(self.components[name].options))
        chosen["placement"] = trial.suggest_categorical("placement", list(self.placements))
        return self.compose(chosen)

    def size(self) -> int:
        """How many distinct parameter settings the grammar has (conditional ones counted once)."""
        total = len(self.placements)
        for component in self.components.values():
            total *= len(component.options)
        return total

    def _decision_order(self) -> list[str]:
        # Components others depend on come first, each after those it depends on, so every
        # condition is known when it is read (the loader refused cycles).
        deciders = [
            n for n in self.components if any(n in c.when for c in self.components.values())
        ]
        ordered: list[str] = []
        while len(ordered) < len(deciders):
            ready = [
                n
                for n in deciders
                if n not in ordered and all(d in ordered for d in self.components[n].when)
            ]
            if not ready:
                raise FlipsearchError("grammar: its conditions form a cycle")
            ordered.append(ready[0])
        return ordered + [n for n in self.components if n not in deciders]


_GRAMMAR_KEYS = {"components", "order", "placement"}
_COMPONENT_KEYS = {"options", "when", "description"}


def load_grammar(path: str | Path | None = None) -> Grammar:
    """Read ``grammar.yaml`` (by default the shipped one), checking all of it: a grammar that
    loads composes every trial, so its mistakes surface before any model loads."""
    path = Path(path) if path is not None else default_contexts_dir() / "grammar.yaml"
    if path.is_dir():
        path = path / "grammar.yaml"
    if not path.is_file():
        raise FlipsearchError(f"no context grammar at {path}")
    data = read_yaml(path)
    spec = data.get("grammar") if isinstance(data, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("components"), dict):
        raise FlipsearchError(f"{path}: expected 'grammar' with 'components'")
    at = f"{path}:{spec['__line__']}"
    _no_unknown_keys(spec, _GRAMMAR_KEYS, f"{at}: 'grammar'")
    components: dict[str, Component] = {}
    for name, body in spec["components"].items():
        if name != "__line__":
            components[str(name)] = _component(str(name), body, path)
    if not components:
        raise FlipsearchError(f"{at}: the grammar has no components")
    _check_conditions(components, spec["components"], path)
    order = _names(spec, "order", list(components), at)
    unknown = [n for n in order if n not in components]
    if unknown:
        raise FlipsearchError(f"{at}: 'order' names unknown components {unknown}")
    if len(set(order)) != len(order):
        raise FlipsearchError(f"{at}: 'order' names a component twice")
    for name, component in components.items():
        if name not in order and any(component.options.values()):
            raise FlipsearchError(
                f"{at}: component {name!r} has text but is not in 'order' (it would never show)"
            )
    placements = _names(spec, "placement", list(PLACEMENTS), at)
    if not placements or not set(placements) <= set(PLACEMENTS):
        raise FlipsearchError(f"{at}: placements must be among {PLACEMENTS}, got {placements}")
    return Grammar(components, tuple(order), tuple(placements))


def _component(name: str, body: Any, path: Path) -> Component:
    """One component: options (name -> text) and its ``when`` conditions, shapes checked."""
    if not isinstance(body, dict) or not isinstance(body.get("options"), dict):
        raise FlipsearchError(f"{path}: component {name!r} needs 'options' (a mapping)")
    at = f"{path}:{body['__line__']}: component {name!r}"
    _no_unknown_keys(body, _COMPONENT_KEYS, at)
    options: dict[str, str] = {}
    for key, text in body["options"].items():
        if key == "__line__":
            continue
        if text is not None and not isinstance(text, str | int | float):
            raise FlipsearchError(f"{at}: option {key!r} must be text, got {type(text).__name__}")
        options[str(key)] = "" if text is None else str(text)
    if not options:
        raise FlipsearchError(f"{at} has no options")
    raw_when = body.get("when")
    if raw_when is None:
        return Component(name, options, {})
    if not isinstance(raw_when, dict):
        raise FlipsearchError(
            f"{at}: 'when' must map components to lists of their options, like {{length: [long]}}"
        )
    when: dict[str, tuple[str, ...]] = {}
    for other, allowed in raw_when.items():
        if other == "__line__":
            continue
        if not isinstance(allowed, list) or not allowed or isinstance(allowed[0], dict | list):
            raise FlipsearchError(
                f"{at}: 'when' {other!r} must be a non-empty list of its options, like [long]"
            )
        when[str(other)] = tuple(map(str, allowed))
    return Component(name, options, when)


def _check_conditions(components: dict[str, Component], raw: dict[str, Any], path: Path) -> None:
    """Every condition names another component and options it has, and no chain of
    conditions comes back to where it started."""
    for name, component in components.items():
        at = f"{path}:{raw[name]['__line__']}: component {name!r}"
        for other, allowed in component.when.items():
            if other == name:
                raise FlipsearchError(f"{at}: its 'when' refers to itself")
            if other not in components:
                raise FlipsearchError(
                    f"{at} has a condition on unknown {other!r} options {list(allowed)}"
                )
            missing = [a for a in allowed if a not in components[other].options]
            if missing:
                raise FlipsearchError(
                    f"{at} has a condition on unknown {other!r} options {missing} "
                    f"(it has {list(components[other].options)})"
                )
    for name in components:
        _no_cycle(name, components, [], f"{path}:{raw[name]['__line__']}")


def _no_cycle(name: str, components: dict[str, Component], chain: list[str], at: str) -> None:
    if name in chain:
        loop = " -> ".join([*chain[chain.index(name) :], name])
        raise FlipsearchError(f"{at}: the 'when' conditions form a cycle ({loop})")
    for other in components[name].when:
        _no_cycle(other, components, [*chain, name], at)


def _names(spec: dict[str, Any], key: str, default: list[str], at: str) -> list[str]:
    """A list of names (``order``, ``placement``); absent means ``default``."""
    value = spec.get(key)
    if value is None:
        return default
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise FlipsearchError(f"{at}: {key!r} must be a list of names, like [a, b]")
    return list(value)


def _no_unknown_keys(mapping: dict[str, Any], known: set[str], at: str) -> None:
    unknown = sorted(str(k) for k in mapping if k != "__line__" and k not in known)
    if unknown:
        raise FlipsearchError(f"{at}: unknown key(s) {unknown}; expected {sorted(known)}")
