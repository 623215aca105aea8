"""Where the shipped data folders are, in a wheel and in a source checkout."""

from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def data_path(folder: str) -> Path:
    """Return a shipped data folder: ``contexts``, ``judges``, ``reports`` or ``data``.

    A wheel carries the top-level folders under ``flipsearch/_data``; an editable install or a
    plain checkout reads them from the repository root, so edits show up without reinstalling.
    """
    if folder == "data":
        return _PACKAGE / "data"
    for candidate in (_PACKAGE / "_data" / folder, _PACKAGE.parent / folder):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"flipsearch data folder {folder!r} is missing from the installation")
