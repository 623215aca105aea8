"""One run directory, one set of settings: a re-run with others stops instead of mixing.

A run directory keeps the study (its trials were measured under the run's settings) beside the
files written from it. Re-running with another response length, model, prompt set or judge used
to go on quietly: the old trials stayed, new ones were measured another way, and one
leaderboard held both. So the first run records what determines its numbers in
``settings.json``, and every later run compares before anything is generated (and, once the
model is loaded, compares the generator's fingerprint too). Settings that only change speed or
length of the search (``--trials``, ``--timeout``, ``--batch-size``, the backend's servers) may
change; the generation cache, keyed by everything that shapes an answer, may be shared freely.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flipsearch.config import RunConfig
from flipsearch.contexts import Context
from flipsearch.errors import FlipsearchError
from flipsearch.grammar import Grammar
from flipsearch.io import write_atomic
from flipsearch.prompts import Prompt

SETTINGS_FILE = "settings.json"
# Backend options that change where or how fast answers come, never what they are.
SPEED_ONLY = {"base_url", "api_key_env", "max_in_flight", "request_timeout", "request_retries"}


def digest(items: Any) -> str:
    """A short content hash of JSON-able ``items`` (prompt sets, context libraries)."""
    text = json.dumps(items, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_settings(
    config: RunConfig,
    prompts: Sequence[Prompt],
    contexts: Sequence[Context],
    grammar: Grammar | None,
    searched: bool,
) -> dict[str, Any]:
    """What determines a run's numbers, flat, with content hashes for the data it reads."""
    from flipsearch.search import redacted_url

    backend = config.backend
    resolved = backend.spec().to_dict()  # with the backend's defaults filled in
    options = {k: v for k, v in sorted(resolved.items()) if k not in SPEED_ONLY | {"name"}}
    settings: dict[str, Any] = {
        "model": config.model,
        "backend": backend.backend,
        "device": backend.device,
        "dtype": backend.dtype,
        "backend options": options,
        **{f"decoding {k}": v for k, v in vars(config.decoding).items()},
        "seed": config.seed,
        "prompt sources": list(config.prompts) or ["shipped sets"],
        "limit": config.limit,
        "prompt set content": digest([p.to_dict() for p in prompts]),
        **{k.replace("_", " "): v for k, v in vars(config.judges).items()},
        **{k.replace("_", " "): v for k, v in vars(config.reasoning).items()},
        **{k.replace("_", " "): v for k, v in vars(config.selection).items()},
    }
    if searched:  # a score of given contexts keeps nothing from an earlier one
        search = config.search
        settings.update(
            {
                "context library": config.contexts or "shipped library",
                "context library content": digest([c.to_dict() for c in contexts]),
                "grammar content": digest(repr(grammar)) if grammar is not None else None,
                "study": search.study,
                "storage": redacted_url(search.storage) if search.storage else None,
                "sampler": search.sampler,
                "multi objective": search.multi_objective,
                "prune every": search.prune_every,
                "p threshold": search.p_threshold,
                "halving rate": search.halving_rate,
                "proposer": search.proposer,
                "propose every": search.propose_every,
            }
        )
    return settings


def bind(out: Path, settings: dict[str, Any], *, generator: str | None = None) -> None:
    """Record ``settings`` in a new run directory; in one that has them, refuse others.

    ``generator`` is the backend's fingerprint (model weights, dtype, batching mode), known
    once the model is loaded; it is recorded and compared the same way.
    """
    path = out / SETTINGS_FILE
    recorded = _read(path)
    if recorded is None:
        write_atomic(path, json.dumps({"settings": settings, "generator": generator}, indent=2))
        return
    before = recorded.get("settings", {})
    differences = [
        f"{key}: {_shown(before.get(key))} then, {_shown(value)} now"
        for key, value in settings.items()
        if key in before and _comparable(before[key]) != _comparable(value)
    ]
    known = recorded.get("generator")
    if generator is not None and known is not None and known != generator:
        differences.append(f"model fingerprint: {known} then, {generator} now")
    if differences:
        raise FlipsearchError(
            f"{out} holds a run made with other settings ({'; '.join(differences)}). Re-run "
            "with the settings it was made with to resume it, or give another --out to start a "
            "new run (copy generations.sqlite there to reuse the cached answers)"
        )
    if generator is not None and known is None:
        write_atomic(path, json.dumps({"settings": before, "generator": generator}, indent=2))


def _read(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FlipsearchError(
            f"{path}: damaged ({exc}); it records which settings made this run directory. "
            "Give another --out to start a new run"
        ) from exc
    if not isinstance(data, dict) or not isinstance(data.get("settings"), dict):
        raise FlipsearchError(f"{path}: not a flipsearch settings file")
    return data


def _comparable(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _shown(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
