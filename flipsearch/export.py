"""Hand-off to a distributed trainer: TRL's self-distillation (SDFT) dataset format.

TRL's trainer builds its teacher prompt by rewriting the last user turn as
``"{prompt}\\n\\n{privileged_context}"``, which is flipsearch's ``user_suffix`` placement
(``contexts.build_messages``). A context the search measured at another placement would be
conditioned differently there, so exporting one is refused unless forced.
"""

from __future__ import annotations

import json
from pathlib import Path

from flipsearch.contexts import context_from_arg
from flipsearch.errors import FlipsearchError
from flipsearch.io import prepare_out_file
from flipsearch.session import Session

TRL_PLACEMENT = "user_suffix"


def export_trl_sdft(
    context_arg: str,
    prompt_sources: list[str],
    limit: int | None,
    out: str | Path,
    force: bool = False,
) -> int:
    """Write ``prompt`` (a chat) + ``privileged_context`` rows; returns how many."""
    out = prepare_out_file(Path(out), "dataset file")  # before any prompt is read
    context = context_from_arg(context_arg, TRL_PLACEMENT)
    if context.placement != TRL_PLACEMENT and not force:
        raise FlipsearchError(
            f"context {context.id!r} was measured at placement {context.placement!r}, but TRL's "
            f"self-distillation teacher uses {TRL_PLACEMENT!r}; search with that placement, or "
            "pass --force to export anyway"
        )
    harmful = Session(prompts=prompt_sources, limit=limit).harmful  # no model is loaded
    if not harmful:
        raise FlipsearchError("nothing to export: the prompt sets have no harmful prompts")
    lines = [
        json.dumps(
            {
                "prompt": [{"role": "user", "content": p.text}],
                "privileged_context": context.text,
                "id": p.id,
            },
            ensure_ascii=False,
        )
        for p in harmful
    ]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    meta = {
        "context": context.to_dict(),
        "teacher_placement": TRL_PLACEMENT,
        "teacher_template": "last user turn = '{prompt}\\n\\n{privileged_context}'",
        "rows": len(lines),
    }
    out.with_suffix(".meta.json").write_text(json.dumps(meta, indent=2))
    return len(lines)
