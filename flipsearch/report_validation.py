"""The report's validation section (``flipsearch validate``): the per-context table, rho with
its interval, OPSA vs off-policy, and two plots, from ``validate/validation.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from flipsearch.errors import FlipsearchError
from flipsearch.fliprate import Rate
from flipsearch.io import read_json
from flipsearch.plots import data_uri, pyplot

KEYS = ("untrained", "trainings", "contexts", "rho", "offpolicy", "evaluation_split")
LOGLIK = "reference_loglik_change"


def read_validation(run_dir: Path) -> dict[str, Any] | None:
    """``validation.json`` when the run was validated, checked for what the report reads."""
    path = run_dir / "validate" / "validation.json"
    if not path.is_file():
        return None
    data = read_json(path)
    missing = [k for k in KEYS if not isinstance(data, dict) or k not in data]
    if missing:
        raise FlipsearchError(f"{path}: lacks {', '.join(missing)}; re-run flipsearch validate")
    return dict(data)


def change_text(row: dict[str, Any], key: str, measure: str | None = None) -> str:
    """``row[key]`` with its interval (``key_low``, ``key_high``): nats per token for the
    log-likelihood change (``measure``, default ``key``), percentage points otherwise."""
    fmt = "{:+.3f}" if (measure or key) == LOGLIK else "{:+.1%}"
    value, low, high = row[key], row[f"{key}_low"], row[f"{key}_high"]
    if value is None:
        return "n/a"
    if low is None:
        return fmt.format(value)
    return f"{fmt.format(value)} [{fmt.format(low)}, {fmt.format(high)}]"


def validation_view(data: dict[str, Any]) -> dict[str, Any]:
    """What the template shows: formatted rows, rho lines and the two plots."""
    names = ("unsafe_drop", "benign_refusal_change", "reasoning_accuracy_change", LOGLIK)
    contexts = [
        {
            "context": row["context"],
            "role": row["role"],
            "mode": row["mode"],
            "seeds": row["seeds"],
            "flip_rate": str(Rate.of(row["flip_rate_count"], row["flip_rate_n"])),
            "cells": [change_text(row, n) for n in names],
        }
        for row in data["contexts"]
    ]
    versus = [
        {
            "context": row["context"],
            "measure": row["measure"].replace("_", " "),
            "cells": [
                change_text(row, k, row["measure"]) for k in ("onpolicy", "offpolicy", "difference")
            ],
        }
        for row in data["offpolicy"]
    ]
    rho = [
        {
            "measure": name.replace("_", " "),
            "rho": "undefined" if part["rho"] is None else f"{part['rho']:+.2f}",
            "interval": "n/a"
            if part["low"] is None
            else f"[{part['low']:+.2f}, {part['high']:+.2f}]",
            "contexts": part["contexts"],
            "draws": part["draws"],
            "undefined": part["undefined"],
        }
        for name, part in data["rho"].items()
    ]
    untrained = data["untrained"]["unsafe_rate"]
    return {
        "contexts": contexts,
        "versus": versus,
        "rho": rho,
        "split": data["evaluation_split"],
        "untrained_unsafe": str(Rate.of(untrained["successes"], untrained["n"])),
        "training": data.get("training", {}),
        "flip_plot": _flip_vs_unsafe(data),
        "tradeoff_plot": _tradeoff(data) if data["offpolicy"] else None,
    }


def _errors(rows: list[dict[str, Any]], key: str) -> list[list[float]]:
    """matplotlib's asymmetric error bars from ``key_low``/``key_high`` (none where unknown)."""
    lower = [r[key] - r[f"{key}_low"] if r[f"{key}_low"] is not None else 0.0 for r in rows]
    upper = [r[f"{key}_high"] - r[key] if r[f"{key}_high"] is not None else 0.0 for r in rows]
    return [lower, upper]


def _flip_vs_unsafe(data: dict[str, Any]) -> str:
    """One point per context and seed: flip rate (x) vs post-training unsafe rate (y), both
    with 95% Wilson intervals; the untrained student's unsafe rate as a band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    base = data["untrained"]["unsafe_rate"]
    ax.axhspan(base["low"], base["high"], color="#d0d0d0", alpha=0.5, label="untrained (95% CI)")
    ax.axhline(base["value"], color="#777", lw=1)
    styles = {"onpolicy": ("#2f6f4f", "o", "OPSA"), "offpolicy": ("#c0392b", "s", "off-policy")}
    for mode, (colour, marker, name) in styles.items():
        rows = [r for r in data["trainings"] if r["mode"] == mode]
        if not rows:
            continue
        # Seeds side by side, a little apart, so points of one context do not hide each other.
        x = [r["flip_rate"] + 0.006 * (r["seed"] - 0.5) for r in rows]
        y = [r["unsafe_rate"] for r in rows]
        ax.errorbar(
            x,
            y,
            xerr=_errors(rows, "flip_rate"),
            yerr=_errors(rows, "unsafe_rate"),
            fmt=marker,
            color=colour,
            alpha=0.8,
            capsize=2,
            label=f"{name}, one point per seed",
        )
    ax.set_xlabel("teacher flip rate on the run's search split")
    ax.set_ylabel("unsafe rate after training (unseen prompts)")
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    return data_uri(fig)


def _tradeoff(data: dict[str, Any]) -> str:
    """Safety gain (unsafe drop) vs capability change (reference log-likelihood), OPSA and
    off-policy per context, with bootstrap intervals: the paper's trade-off."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    styles = {"onpolicy": ("#2f6f4f", "o", "OPSA"), "offpolicy": ("#c0392b", "s", "off-policy")}
    for mode, (colour, marker, name) in styles.items():
        rows = [r for r in data["contexts"] if r["mode"] == mode]
        rows = [r for r in rows if r[LOGLIK] is not None and r["unsafe_drop"] is not None]
        if not rows:
            continue
        x = [r[LOGLIK] for r in rows]
        y = [r["unsafe_drop"] for r in rows]
        ax.errorbar(
            x,
            y,
            xerr=_errors(rows, LOGLIK),
            yerr=_errors(rows, "unsafe_drop"),
            fmt=marker,
            color=colour,
            capsize=2,
            label=name,
        )
        for r, xi, yi in zip(rows, x, y, strict=True):
            ax.annotate(
                r["context"], (xi, yi), fontsize=6, xytext=(3, 3), textcoords="offset points"
            )
    ax.axhline(0, color="#999", lw=0.8)
    ax.axvline(0, color="#999", lw=0.8)
    ax.set_xlabel("change in reference log-likelihood (nats/token; capability)")
    ax.set_ylabel("drop in unsafe rate (safety gain)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return data_uri(fig)
