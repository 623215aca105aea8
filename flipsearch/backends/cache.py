"""The generation cache: nothing (model, rendered prompt, decoding, sample) is generated twice.

SQLite in WAL mode in the run directory, so several processes of one run can read and write it
at once and a killed run keeps every batch it finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import warnings
from collections.abc import Callable, Sequence
from contextlib import closing
from pathlib import Path

from flipsearch.backends._base import Decoding, Generation, Generator
from flipsearch.errors import FlipsearchWarning

_SCHEMA = """
CREATE TABLE IF NOT EXISTS generations (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    prompt TEXT NOT NULL,
    decoding TEXT NOT NULL,
    sample INTEGER NOT NULL,
    text TEXT NOT NULL,
    token_ids TEXT NOT NULL,
    finish_reason TEXT NOT NULL,
    created REAL NOT NULL
)
"""


def cache_key(fingerprint: str, prompt: str, decoding: Decoding, sample: int) -> str:
    payload = json.dumps([fingerprint, prompt, decoding.key(), sample], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


class GenerationCache:
    """A persistent map from generation keys to generations."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = self._open()
        except sqlite3.DatabaseError as exc:
            # Only answers are lost, and they are generated again; the study keeps the results.
            aside = _set_aside(self.path)
            warnings.warn(
                f"{self.path} is damaged ({exc}): moved it to {aside.name} and started an empty "
                "cache (its answers will be generated again)",
                FlipsearchWarning,
                stacklevel=2,
            )
            self._db = self._open()
        self.opened = time.time()
        self._reused: set[str] = set()  # keys found that were stored before this opening

    @property
    def reused(self) -> int:
        """Answers taken from the cache that an earlier run (or process) had stored."""
        return len(self._reused)

    def _open(self) -> sqlite3.Connection:
        if not self.path.exists():
            _create(self.path)
        # Used from one thread at a time, but not always the one that opened it (the inspect
        # model API generates in a worker thread).
        db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            db.commit()
            problem = db.execute("PRAGMA quick_check").fetchone()[0]
            if problem != "ok":
                raise sqlite3.DatabaseError(problem)
            db.execute(
                "SELECT key, text, token_ids, finish_reason, created FROM generations LIMIT 1"
            )
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def get_many(self, keys: Sequence[str]) -> dict[str, Generation]:
        found: dict[str, Generation] = {}
        for start in range(0, len(keys), 500):
            chunk = list(keys[start : start + 500])
            marks = ",".join("?" * len(chunk))
            rows = self._db.execute(
                "SELECT key, text, token_ids, finish_reason, created FROM generations "
                f"WHERE key IN ({marks})",
                chunk,
            )
            for key, text, token_ids, finish, created in rows:
                found[key] = Generation(text, tuple(json.loads(token_ids)), finish)
                if created < self.opened:
                    self._reused.add(key)
        return found

    def put_many(self, rows: Sequence[tuple[str, str, str, Decoding, int, Generation]]) -> None:
        """Store ``(key, model, prompt, decoding, sample, generation)`` rows in one transaction."""
        now = time.time()
        with self._db:
            self._db.executemany(
                "INSERT OR REPLACE INTO generations VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        key,
                        model,
                        prompt,
                        json.dumps(dec.key(), sort_keys=True),
                        sample,
                        gen.text,
                        json.dumps(list(gen.token_ids)),
                        gen.finish_reason,
                        now,
                    )
                    for key, model, prompt, dec, sample, gen in rows
                ],
            )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM generations").fetchone()[0])

    def close(self) -> None:
        self._db.close()


def _set_aside(path: Path) -> Path:
    """Move a damaged database (and its WAL files) to ``NAME.damaged-TIME``, kept for a look."""
    aside = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
    path.replace(aside)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.replace(aside.with_name(aside.name + suffix))
    return aside


def _create(path: Path) -> None:
    """Create the database with its table, then link it into place: another process never
    sees a file without the table, and of two processes creating it at once one wins whole."""
    staging = path.with_name(f".{path.name}.{os.getpid()}.new")
    staging.unlink(missing_ok=True)
    with closing(sqlite3.connect(staging)) as db:
        db.execute(_SCHEMA)
        db.commit()
    try:
        os.link(staging, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: move it, unless someone was first
        if not path.exists():
            staging.replace(path)
    finally:
        staging.unlink(missing_ok=True)


def generate_cached(
    generator: Generator,
    cache: GenerationCache | None,
    prompts: Sequence[str],
    decoding: Decoding,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[list[Generation]], int]:
    """Generate ``decoding.samples`` responses per prompt, reusing every cached one.

    Returns the responses and how many prompts had to be generated. Duplicate prompts are
    generated once.
    """
    results: dict[str, list[Generation]] = {}
    unique = list(dict.fromkeys(prompts))
    keys = {
        p: [cache_key(generator.fingerprint, p, decoding, s) for s in range(decoding.samples)]
        for p in unique
    }
    if cache is not None:
        found = cache.get_many([k for ks in keys.values() for k in ks])
        for prompt, ks in keys.items():
            if all(k in found for k in ks):
                results[prompt] = [found[k] for k in ks]
    missing = [p for p in unique if p not in results]
    if on_progress is not None and len(unique) > len(missing):
        on_progress(len(unique) - len(missing))
    for indices, batch in generator.generate_batches(missing, decoding):
        rows: list[tuple[str, str, str, Decoding, int, Generation]] = []
        for index, samples in zip(indices, batch, strict=True):
            prompt = missing[index]
            results[prompt] = samples
            rows.extend(
                (keys[prompt][s], generator.fingerprint, prompt, decoding, s, gen)
                for s, gen in enumerate(samples)
            )
        if cache is not None:
            cache.put_many(rows)
        if on_progress is not None:
            on_progress(len(indices))
    return [results[p] for p in prompts], len(missing)
