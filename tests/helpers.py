"""Helpers shared by test modules."""

from __future__ import annotations


def tiny_cli_args(model_dir, out, limit=4):
    """The CLI options of a quick run on the tiny test model: few prompts, short answers."""
    return [
        "--model",
        model_dir,
        "--limit",
        str(limit),
        "--max-new-tokens",
        "4",
        "--dtype",
        "fp32",
        "--out",
        out,
    ]
