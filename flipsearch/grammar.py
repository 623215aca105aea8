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
        # Components others depend on come first, so conditions are known when they are read.
        deciders = [
            n for n in self.components if any(n in c.when for c in self.components.values())
        ]
        return deciders + [n for n in self.components if n not in deciders]


def load_grammar(path: str | Path | None = None) -> Grammar:
    """Read ``grammar.yaml`` (by default the shipped one); errors name the file."""
    path = Path(path) if path is not None else default_contexts_dir() / "grammar.yaml"
    if path.is_dir():
        path = path / "grammar.yaml"
    if not path.is_file():
        raise FlipsearchError(f"no context grammar at {path}")
    data = read_yaml(path)
    spec = data.get("grammar") if isinstance(data, dict) else None
    if not isinstance(spec, dict) or not isinstance(spec.get("components"), dict):
        raise FlipsearchError(f"{path}: expected 'grammar' with 'components'")
    components: dict[str, Component] = {}
    for name, body in spec["components"].items():
        if name == "__line__":
            continue
        if not isinstance(body, dict) or not isinstance(body.get("options"), dict):
            raise FlipsearchError(f"{path}: component {name!r} needs 'options' (a mapping)")
        options = {str(k): str(v or "") for k, v in body["options"].items() if k != "__line__"}
        if not options:
            raise FlipsearchError(f"{path}: component {name!r} has no options")
        when = {
            str(k): tuple(map(str, v))
            for k, v in (body.get("when") or {}).items()
            if k != "__line__"
        }
        components[str(name)] = Component(str(name), options, when)
    for component in components.values():
        for other, allowed in component.when.items():
            if other not in components or not set(allowed) <= set(components[other].options):
                raise FlipsearchError(
                    f"{path}: component {component.name!r} has a condition on unknown "
                    f"{other!r} options {list(allowed)}"
                )
    order = tuple(spec.get("order") or [n for n in components])
    unknown = [n for n in order if n not in components]
    if unknown:
        raise FlipsearchError(f"{path}: 'order' names unknown components {unknown}")
    placements = tuple(spec.get("placement") or PLACEMENTS)
    if not set(placements) <= set(PLACEMENTS):
        raise FlipsearchError(f"{path}: placements must be among {PLACEMENTS}")
    return Grammar(components, order, placements)
