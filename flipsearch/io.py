"""Reading and writing the project's files: every error names the file and line.

JSONL, CSV and Parquet come back as ``(line number, row)`` pairs so the caller can say where a
bad value is; YAML mappings carry their line as ``__line__``. Writes are atomic (a staging file
moved into place), so a kill never leaves a half-written file behind.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import yaml

from flipsearch.errors import FlipsearchError

Rows = list[tuple[int, dict[str, Any]]]


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of each mapping, for error messages."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping  # type: ignore[return-value]


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely; mappings carry ``__line__``; errors name the file and line."""
    try:
        with path.open(encoding="utf-8") as handle:
            return yaml.load(handle, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise FlipsearchError(f"{where}: malformed YAML ({problem})") from exc
    except UnicodeDecodeError as exc:
        raise FlipsearchError(f"{path}: not UTF-8 text") from exc


def read_jsonl(path: Path) -> Rows:
    """One JSON object per line (blank lines skipped), with its line number."""
    rows = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise FlipsearchError(f"{path}:{number}: malformed JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise FlipsearchError(f"{path}:{number}: expected a JSON object per line")
            rows.append((number, row))
    return rows


def read_csv(path: Path) -> Rows:
    """CSV rows as dicts; line numbers count the header as line 1, as an editor would."""
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            return [(reader.line_num, dict(row)) for row in reader]
    except (csv.Error, UnicodeDecodeError) as exc:
        raise FlipsearchError(f"{path}: malformed CSV ({exc})") from exc


def read_parquet(path: Path) -> Rows:
    import pandas as pd

    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise FlipsearchError(f"{path}: cannot read Parquet ({exc})") from exc
    return [
        (i + 1, {str(k): v for k, v in row.items()})
        for i, row in enumerate(frame.to_dict(orient="records"))
    ]


def read_table(path: Path, what: str = "file") -> Rows:
    """A JSONL, CSV or Parquet file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path)
    if suffix == ".csv":
        return read_csv(path)
    if suffix == ".parquet":
        return read_parquet(path)
    raise FlipsearchError(f"{path}: unsupported {what} type {suffix!r} (jsonl, csv, parquet)")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a staging file beside ``path``, then move it into place."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))
