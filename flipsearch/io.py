"""Reading and writing the project's files: every error names the file and line.

JSONL, CSV and Parquet come back as ``(line number, row)`` pairs so the caller can say where a
bad value is; YAML mappings carry their line as ``__line__``. Text must be UTF-8 (a leading
byte-order mark is dropped). Writes are atomic (a staging file moved into place), so a kill
never leaves a half-written file behind.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import yaml

from flipsearch.errors import FlipsearchError

Rows = list[tuple[int, dict[str, Any]]]


class _LineLoader(yaml.SafeLoader):
    """A safe loader that remembers the line of each mapping, for error messages."""


def _mapping_with_line(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    """A mapping plus its ``__line__``; a key given twice is an error (YAML keeps the last)."""
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
            continue  # complex keys and merge keys (<<) are YAML's own business
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None,
                None,
                f"duplicate key {key!r} (first on line {seen[key]})",
                key_node.start_mark,
            )
        seen[key] = key_node.start_mark.line + 1
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping  # type: ignore[return-value]


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping_with_line)


def read_text(path: Path) -> str:
    """A file's text, strictly UTF-8, so a wrong encoding is named (file, line, byte) instead
    of turning into a traceback or into garbled prompts."""
    try:
        data = path.read_bytes()
    except IsADirectoryError as exc:
        raise FlipsearchError(f"{path}: is a directory, not a file") from exc
    except FileNotFoundError as exc:
        raise FlipsearchError(f"{path}: no such file") from exc
    except OSError as exc:
        raise FlipsearchError(f"{path}: cannot read ({exc.strerror or exc})") from exc
    skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[skip:].decode("utf-8")
    except UnicodeDecodeError as exc:
        byte = skip + exc.start
        line = data.count(b"\n", 0, byte) + 1
        raise FlipsearchError(
            f"{path}:{line}: not UTF-8 text (byte {byte}); save the file as UTF-8"
        ) from exc


def read_yaml(path: Path) -> Any:
    """Parse a YAML file safely; mappings carry ``__line__``; errors name the file and line."""
    text = read_text(path)
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise FlipsearchError(f"{yaml_where(exc, path)}: malformed YAML ({problem})") from exc


def yaml_where(exc: yaml.YAMLError, path: Path) -> str:
    """``FILE:LINE`` of a YAML error: where the unfinished construct opened when the parser
    only noticed at the end of the file (an unclosed bracket or quote), else where it failed."""
    problem_mark = getattr(exc, "problem_mark", None)
    context_mark = getattr(exc, "context_mark", None)
    problem = str(getattr(exc, "problem", ""))
    at_end = "<stream end>" in problem or "end of stream" in problem
    mark = context_mark if at_end and context_mark is not None else problem_mark
    return f"{path}:{mark.line + 1}" if mark is not None else str(path)


def read_json(path: Path) -> Any:
    """One JSON document; a syntax error names the file and line."""
    text = read_text(path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise FlipsearchError(f"{path}:{exc.lineno}: malformed JSON ({exc.msg})") from exc


def read_jsonl(path: Path) -> Rows:
    """One JSON object per line (blank lines skipped), with its line number."""
    rows = []
    # Split on newlines only: JSON text may hold other line separators (U+2028) unescaped.
    for number, line in enumerate(read_text(path).split("\n"), start=1):
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
    """CSV rows as dicts, each with the line it starts on (the header is line 1).

    Strict: an unclosed quote, a row with more or fewer fields than the header, or a column
    named twice is an error, not a silently merged or shifted row.
    """
    reader = csv.reader(io.StringIO(read_text(path), newline=""), strict=True)
    header: list[str] | None = None
    rows: Rows = []
    while True:
        start = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return rows
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                raise FlipsearchError(
                    f"{path}:{start}: unclosed quote (the field opened here runs to the end "
                    "of the file)"
                ) from exc
            raise FlipsearchError(f"{path}:{start}: malformed CSV ({exc})") from exc
        if not fields:
            continue  # a blank line
        if header is None:
            header = _csv_header(fields, path, start)
            continue
        if len(fields) != len(header):
            raise FlipsearchError(
                f"{path}:{start}: {len(fields)} fields, but the header has {len(header)} "
                "(an unquoted comma, or a missing one?)"
            )
        rows.append((start, dict(zip(header, fields, strict=True))))


def _csv_header(fields: list[str], path: Path, line: int) -> list[str]:
    names = [name.strip() for name in fields]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise FlipsearchError(f"{path}:{line}: column {name!r} is named twice in the header")
    return names


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


def prepare_out_dir(path: Path, what: str = "run directory") -> Path:
    """Create an output directory, or say in one line why it cannot be one: checked before
    anything is loaded, so a bad ``--out`` never costs a model load or a generation."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FlipsearchError(f"{path}: the {what} is an existing file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FlipsearchError(f"{path}: cannot create the {what} ({exc.strerror or exc})") from exc
    probe = path / f".flipsearch-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or exc
        raise FlipsearchError(f"{path}: the {what} is not writable ({reason})") from exc
    return path


def prepare_out_file(path: Path, what: str = "output file") -> Path:
    """Check that a file can be written at ``path`` (its folder is created), before the work
    that produces it: a directory there, or a folder that cannot be made, is one line."""
    path = Path(path)
    if path.is_dir():
        raise FlipsearchError(f"{path}: the {what} is an existing directory, not a file")
    prepare_out_dir(path.parent, f"folder of the {what}")
    return path


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a staging file beside ``path``, then move it into place."""
    staging = path.with_name(path.name + ".tmp")
    staging.write_text(text, encoding="utf-8")
    staging.replace(path)


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, default=str))
