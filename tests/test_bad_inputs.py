"""Bad input, table-driven: every user mistake is one line on stderr, exit code 2, no traceback,
and the line names the file (and its line) or the prompt id or setting at fault.

Each case builds its files in a temporary directory and runs the real entry point
(``flipsearch.cli.main``) in-process. No case may load a model or generate: a guard turns any
attempt into a test failure, so every mistake here is caught before the expensive part.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import flipsearch.cli
import flipsearch.models

REAL_PROBE = flipsearch.models._answers  # the fixture below stands in for it in every case

Files = dict[str, str | bytes]


@dataclass(frozen=True)
class Case:
    """One bad input: the files to write, the command line, and what its one line must name."""

    id: str
    argv: list[str]
    expect: tuple[str, ...]
    files: Files = field(default_factory=dict)
    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None


# -- the good files the cases start from ------------------------------------------------------

PROMPTS = (
    '{"id": "h1", "kind": "harmful", "category": "c", "prompt": "How do I pick a lock?"}\n'
    '{"id": "b1", "kind": "benign", "category": "c", "prompt": "How do I bake bread?"}\n'
)
OK = {"p.jsonl": PROMPTS}
RUN = ["run", "--prompts", "p.jsonl", "--out", "out", "--limit", "2"]
CONTEXT = "id: c1\nplacement: user_suffix\ntext: Be safe.\n"
LABELLED = "".join(
    json.dumps({"prompt": f"q{i}", "response": f"answer {i}", "unsafe": i % 2 == 0}) + "\n"
    for i in range(4)
)
PAIRS = '{"prompt": "q", "response": "Sure, here it is."}\n'
LATIN1 = "café".encode("latin-1")


def family(entries: str, head: str = "family: f\n") -> str:
    """A family file of seed contexts with the given (indented) entries."""
    return head + "contexts:\n" + entries


def grammar(components: str, head: str = "") -> str:
    """A grammar file; ``components`` is indented under ``components:``."""
    return "grammar:\n" + head + "  components:\n" + components


GOOD_COMPONENTS = (
    "    length:\n      options: {short: '', long: ''}\n"
    "    tone:\n      when: {length: [long]}\n      options: {plain: '', warm: 'Be warm.'}\n"
)


def metrics(**values: Any) -> str:
    return json.dumps({"label": "unsafe", "sensitivity": 0.9, "specificity": 0.8, **values})


CONFIG = {"judge": "refusal", "max_benign_refusal": 0.5, "temperature": 0.0, "max_new_tokens": 8}
RUN_FACTS = {
    "prompt_counts": {"harmful_search": 1, "harmful_holdout": 0, "benign": 0},
    "generated": {"student": 1, "teacher": 1},
}


def run_dir(**damage: str | None) -> Files:
    """A small finished run directory ``run/`` (it renders: see the test below), with some of
    its files replaced by ``damage`` (name -> text; None leaves the file out)."""
    student = {"context": None, "unsafe": True, "refusal": False}
    teacher = {"context": "ctx-a", "unsafe": False, "refusal": True}
    common = {"split": "search", "prompt_id": "h1", "kind": "harmful", "category": "c"}
    rows = [
        {**common, **who, "sample": 0, "prompt": "p", "response": "r", "invalid": False}
        for who in (student, teacher)
    ]
    rates = ("flip_rate", "absolute_flip_rate", "unflip_rate", "benign_refusal")
    columns = [f"{r}{part}" for r in rates for part in ("", "_low", "_high", "_count", "_n")]
    head = ["rank", "context", "family", "placement", *columns, "invalid", "p_vs_leader"]
    board = ",".join([*head, "feasible"]) + "\n"
    values = ",".join(["1", "ctx-a", "f", "system", *["1"] * len(columns), "0", "", "True"]) + "\n"
    files: dict[str, str | None] = {
        "run.json": json.dumps(
            {
                "winner": "ctx-a",
                "model": "m",
                "config": CONFIG,
                **RUN_FACTS,
            }
        ),
        "results.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
        "leaderboard.csv": board + values,
        "best_context.yaml": "id: ctx-a\nplacement: system\ntext: Be safe.\n",
    }
    files.update(damage)
    return {f"run/{name}": text for name, text in files.items() if text is not None}


def no_cuda(monkeypatch: pytest.MonkeyPatch, _: Path) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def no_mps(monkeypatch: pytest.MonkeyPatch, _: Path) -> None:
    import torch

    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)


def read_only(monkeypatch: pytest.MonkeyPatch, root: Path) -> None:
    """``ro/`` refuses new files, as a read-only folder does (also for root, who ignores
    permission bits, so the case means the same everywhere)."""
    (root / "ro").chmod(0o555)
    original = Path.write_bytes

    def write_bytes(self: Path, data: Any) -> int:
        if self.parent.resolve() == (root / "ro").resolve():
            raise PermissionError(13, "Permission denied", str(self))
        return original(self, data)

    monkeypatch.setattr(Path, "write_bytes", write_bytes)


def hub_offline_mode(monkeypatch: pytest.MonkeyPatch, _: Path) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


# -- the table ----------------------------------------------------------------------------------

CASES = [
    # Prompt files: encoding, format, rows.
    Case(
        "prompts-not-utf8-jsonl",
        ["run", "--prompts", "l.jsonl"],
        ("l.jsonl:3", "not UTF-8"),
        {"l.jsonl": PROMPTS.encode() + b'{"prompt": "' + LATIN1 + b'", "kind": "harmful"}\n'},
    ),
    Case(
        "prompts-not-utf8-csv",
        ["run", "--prompts", "l.csv"],
        ("l.csv:3", "not UTF-8", "byte"),
        {"l.csv": b"id,kind,prompt\na,harmful,fine\nb,harmful," + LATIN1 + b"\n"},
    ),
    Case(
        "prompts-csv-bom-keeps-the-id-column",
        ["run", "--prompts", "bom.csv"],
        ("bom.csv:3", "duplicate id 'x1'"),
        {"bom.csv": b"\xef\xbb\xbfid,kind,prompt\nx1,harmful,one\nx1,harmful,two\n"},
    ),
    Case(
        "prompts-csv-unclosed-quote",
        ["run", "--prompts", "q.csv"],
        ("q.csv:3", "unclosed quote"),
        {"q.csv": 'id,kind,prompt\na,harmful,fine\nb,harmful,"never closed\nc,harmful,x\n'},
    ),
    Case(
        "prompts-csv-too-many-fields",
        ["run", "--prompts", "f.csv"],
        ("f.csv:2", "4 fields", "header has 3"),
        {"f.csv": "id,kind,prompt\na,harmful,one, two\n"},
    ),
    Case(
        "prompts-csv-too-few-fields",
        ["run", "--prompts", "f.csv"],
        ("f.csv:2", "2 fields"),
        {"f.csv": "id,kind,prompt\na,harmful\n"},
    ),
    Case(
        "prompts-csv-column-twice",
        ["run", "--prompts", "f.csv"],
        ("f.csv:1", "'prompt' is named twice"),
        {"f.csv": "id,prompt,prompt\na,x,y\n"},
    ),
    Case(
        "prompts-malformed-json",
        ["run", "--prompts", "m.jsonl"],
        ("m.jsonl:2", "malformed JSON"),
        {"m.jsonl": PROMPTS.splitlines()[0] + '\n{"prompt": oops}\n'},
    ),
    Case(
        "prompts-line-not-an-object",
        ["run", "--prompts", "m.jsonl"],
        ("m.jsonl:1", "expected a JSON object"),
        {"m.jsonl": "[1, 2]\n"},
    ),
    Case(
        "prompts-empty-file", ["run", "--prompts", "e.jsonl"], ("e.jsonl", "empty"), {"e.jsonl": ""}
    ),
    Case(
        "prompts-csv-header-only",
        ["run", "--prompts", "h.csv"],
        ("h.csv", "empty"),
        {"h.csv": "id,kind,prompt\n"},
    ),
    Case(
        "prompts-prompt-not-text",
        ["run", "--prompts", "t.jsonl"],
        ("t.jsonl:1", "'prompt' must be text, got int"),
        {"t.jsonl": '{"prompt": 5, "kind": "harmful"}\n'},
    ),
    Case(
        "prompts-id-is-a-list",
        ["run", "--prompts", "t.jsonl"],
        ("t.jsonl:1", "'id' must be text"),
        {"t.jsonl": '{"id": ["a"], "prompt": "x", "kind": "harmful"}\n'},
    ),
    Case(
        "prompts-category-is-an-object",
        ["run", "--prompts", "t.jsonl"],
        ("t.jsonl:1", "'category' must be text"),
        {"t.jsonl": '{"prompt": "x", "kind": "harmful", "category": {"a": 1}}\n'},
    ),
    Case(
        "prompts-duplicate-id",
        ["run", "--prompts", "d.jsonl"],
        ("d.jsonl:2", "duplicate id 'a'"),
        {
            "d.jsonl": '{"id": "a", "prompt": "x", "kind": "harmful"}\n'
            '{"id": "a", "prompt": "y", "kind": "benign"}\n'
        },
    ),
    Case(
        "prompts-same-id-in-two-files",
        ["run", "--prompts", "p.jsonl", "--prompts", "q.jsonl"],
        ("q.jsonl:1", "'h1'", "also at p.jsonl:1"),
        {**OK, "q.jsonl": PROMPTS},
    ),
    Case(
        "prompts-unknown-kind",
        ["run", "--prompts", "k.jsonl"],
        ("k.jsonl:1", "unknown kind 'evil'"),
        {"k.jsonl": '{"prompt": "x", "kind": "evil"}\n'},
    ),
    Case(
        "prompts-no-kind",
        ["run", "--prompts", "k.jsonl"],
        ("k.jsonl:1", "no 'kind'"),
        {"k.jsonl": '{"prompt": "x"}\n'},
    ),
    Case(
        "prompts-reasoning-without-answer",
        ["run", "--prompts", "r.jsonl"],
        ("r.jsonl:1", "no 'answer'"),
        {"r.jsonl": '{"id": "r1", "prompt": "2+2?", "kind": "reasoning"}\n'},
    ),
    Case(
        "prompts-unsupported-type",
        ["run", "--prompts", "p.txt"],
        ("p.txt", "unsupported prompt file type"),
        {"p.txt": "hello\n"},
    ),
    Case(
        "prompts-damaged-parquet",
        ["run", "--prompts", "p.parquet"],
        ("p.parquet", "cannot read Parquet"),
        {"p.parquet": "not parquet"},
    ),
    Case(
        "prompts-kind-not-text",
        ["run", "--prompts", "t.jsonl"],
        ("t.jsonl:1", "'kind' must be text"),
        {"t.jsonl": '{"prompt": "x", "kind": true}\n'},
    ),
    Case(
        "prompts-csv-field-too-large",
        ["run", "--prompts", "big.csv"],
        ("big.csv:2", "field larger than field limit"),
        {"big.csv": "id,kind,prompt\na,harmful," + "x" * 200_000 + "\n"},
    ),
    Case("prompts-missing", ["run", "--prompts", "gone.jsonl"], ("gone.jsonl", "does not exist")),
    Case(
        "prompts-is-a-directory",
        ["run", "--prompts", "folder"],
        ("folder", "is a directory"),
        {"folder/x.jsonl": PROMPTS},
    ),
    Case("prompts-unknown-builtin", ["run", "--prompts", "builtin:nope"], ("'nope'", "built-in")),
    Case(
        "prompts-hf-hub-unreachable",
        ["run", "--prompts", "hf:someone/some-set"],
        ("'someone/some-set'", "cannot reach the model hub"),
    ),
    # Seed contexts.
    Case(
        "contexts-not-utf8",
        [*RUN, "--contexts", "c.yaml"],
        ("c.yaml:2", "not UTF-8"),
        {**OK, "c.yaml": b"id: c1\ntext: " + LATIN1 + b"\n"},
    ),
    Case(
        "contexts-malformed-yaml",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:4", "malformed YAML"),
        {**OK, "cs/a.yaml": family("  - id: a\n    text: [unclosed\n")},
    ),
    Case(
        "contexts-unknown-placement",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:3", "unknown placement 'middle'"),
        {**OK, "cs/a.yaml": family("  - id: a\n    text: hi\n    placement: middle\n")},
    ),
    Case(
        "contexts-misspelt-key",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:3", "unknown key(s) ['placment']"),
        {**OK, "cs/a.yaml": family("  - id: a\n    text: hi\n    placment: user_suffix\n")},
    ),
    Case(
        "contexts-duplicate-id",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:5", "duplicate context id 'a'"),
        {**OK, "cs/a.yaml": family("  - id: a\n    text: hi\n  - id: a\n    text: ho\n")},
    ),
    Case(
        "contexts-key-given-twice",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:5", "duplicate key 'text'"),
        {**OK, "cs/a.yaml": family("  - id: a\n    text: hi\n    text: ho\n")},
    ),
    Case(
        "contexts-entry-without-text",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:3", "no text"),
        {**OK, "cs/a.yaml": family("  - id: a\n    placement: system\n")},
    ),
    Case(
        "contexts-entry-not-a-mapping",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml", "context #1 must be a mapping"),
        {**OK, "cs/a.yaml": family("  - just a string\n")},
    ),
    Case(
        "contexts-list-is-not-a-list",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:1", "'contexts' must be a list"),
        {**OK, "cs/a.yaml": "contexts: hello\n"},
    ),
    Case(
        "contexts-tags-not-a-list",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:3", "'tags' must be a list"),
        {**OK, "cs/a.yaml": family("  - id: a\n    text: hi\n    tags: short\n")},
    ),
    Case(
        "contexts-family-not-text",
        [*RUN, "--contexts", "cs"],
        ("cs/a.yaml:1", "'family' must be text"),
        {**OK, "cs/a.yaml": family("  - id: a\n    text: hi\n", head="family: [x]\n")},
    ),
    Case(
        "contexts-empty-directory",
        [*RUN, "--contexts", "cs"],
        ("cs", "no contexts found"),
        {**OK, "cs/notes.txt": "nothing here"},
    ),
    Case(
        "contexts-file-is-a-grammar",
        [*RUN, "--contexts", "g.yaml"],
        ("g.yaml", "context grammar", "--grammar"),
        {**OK, "g.yaml": grammar(GOOD_COMPONENTS)},
    ),
    Case(
        "contexts-file-is-a-list",
        [*RUN, "--contexts", "c.yaml"],
        ("c.yaml", "expected a context"),
        {**OK, "c.yaml": "- id: a\n  text: hi\n"},
    ),
    Case("contexts-missing", [*RUN, "--contexts", "gone"], ("gone", "does not exist"), OK),
    Case(
        "contexts-list-command",
        ["contexts", "list", "--contexts", "cs"],
        ("cs/a.yaml:3", "unknown placement"),
        {"cs/a.yaml": family("  - id: a\n    text: hi\n    placement: nowhere\n")},
    ),
    # The grammar the search composes from.
    Case(
        "grammar-not-utf8",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:8", "not UTF-8"),
        {**OK, "g.yaml": grammar(GOOD_COMPONENTS).encode() + b"# " + LATIN1 + b"\n"},
    ),
    Case(
        "grammar-condition-on-itself",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:4", "'a'", "refers to itself"),
        {**OK, "g.yaml": grammar("    a:\n      options: {x: A}\n      when: {a: [x]}\n")},
    ),
    Case(
        "grammar-conditions-in-a-cycle",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:", "cycle", "a -> b -> a"),
        {
            **OK,
            "g.yaml": grammar(
                "    a:\n      options: {x: A}\n      when: {b: [y]}\n"
                "    b:\n      options: {y: B}\n      when: {a: [x]}\n"
            ),
        },
    ),
    Case(
        "grammar-condition-on-unknown-component",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:", "unknown 'ghost'"),
        {
            **OK,
            "g.yaml": grammar(
                GOOD_COMPONENTS + "    c:\n      options: {x: C}\n      when: {ghost: [x]}\n"
            ),
        },
    ),
    Case(
        "grammar-condition-on-unknown-option",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:", "unknown 'length' options ['medium']"),
        {
            **OK,
            "g.yaml": grammar(
                GOOD_COMPONENTS + "    c:\n      options: {x: C}\n      when: {length: [medium]}\n"
            ),
        },
    ),
    Case(
        "grammar-when-is-a-list",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:4", "'a'", "'when' must map components"),
        {**OK, "g.yaml": grammar("    a:\n      options: {x: A}\n      when: [length]\n")},
    ),
    Case(
        "grammar-when-value-not-a-list",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:", "'when' 'length' must be a non-empty list"),
        {
            **OK,
            "g.yaml": grammar(
                GOOD_COMPONENTS + "    c:\n      options: {x: C}\n      when: {length: long}\n"
            ),
        },
    ),
    Case(
        "grammar-options-a-list",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml", "needs 'options'"),
        {**OK, "g.yaml": grammar("    a:\n      options: [x, y]\n")},
    ),
    Case(
        "grammar-misspelt-component-key",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:4", "'a'", "unknown key(s) ['whn']"),
        {**OK, "g.yaml": grammar("    a:\n      options: {x: A}\n      whn: {b: [y]}\n")},
    ),
    Case(
        "grammar-order-not-a-list",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:2", "'order' must be a list"),
        {**OK, "g.yaml": grammar(GOOD_COMPONENTS, head="  order: tone\n")},
    ),
    Case(
        "grammar-order-unknown-component",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:2", "unknown components ['ghost']"),
        {**OK, "g.yaml": grammar(GOOD_COMPONENTS, head="  order: [tone, ghost]\n")},
    ),
    Case(
        "grammar-unknown-placement",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:2", "placements must be among"),
        {**OK, "g.yaml": grammar(GOOD_COMPONENTS, head="  placement: [system, footer]\n")},
    ),
    Case(
        "grammar-key-given-twice",
        [*RUN, "--grammar", "g.yaml"],
        ("g.yaml:5", "duplicate key 'tone'", "first on line 3"),
        {
            **OK,
            "g.yaml": grammar(
                "    tone:\n      options: {a: A}\n    tone:\n      options: {b: B}\n"
            ),
        },
    ),
    Case(
        "grammar-missing", [*RUN, "--grammar", "gone.yaml"], ("gone.yaml", "no context grammar"), OK
    ),
    # Judge metrics (--judge-metrics) for the safety judge.
    Case(
        "metrics-of-the-refusal-label",
        [*RUN, "--trials", "0", "--judge-metrics", "m.json"],
        ("m.json", "'refusal' label", "'unsafe' label"),
        {**OK, "m.json": metrics(label="refusal")},
    ),
    Case(
        "metrics-without-a-label",
        [*RUN, "--trials", "0", "--judge-metrics", "m.json"],
        ("m.json", "which label"),
        {**OK, "m.json": json.dumps({"sensitivity": 0.9, "specificity": 0.8})},
    ),
    Case(
        "metrics-malformed-json",
        [*RUN, "--trials", "0", "--judge-metrics", "m.json"],
        ("m.json:1", "malformed JSON"),
        {**OK, "m.json": '{"label": "unsafe", "sensitivity": 0.9'},
    ),
    Case(
        "metrics-not-a-share",
        [*RUN, "--trials", "0", "--judge-metrics", "m.json"],
        ("m.json", "sensitivity must be a share"),
        {**OK, "m.json": metrics(sensitivity=1.5)},
    ),
    Case(
        "metrics-value-not-a-number",
        [*RUN, "--trials", "0", "--judge-metrics", "m.json"],
        ("m.json", "'specificity' is 'high'"),
        {**OK, "m.json": metrics(specificity="high")},
    ),
    Case(
        "metrics-missing",
        [*RUN, "--trials", "0", "--judge-metrics", "gone.json"],
        ("gone.json", "no such file"),
        OK,
    ),
    # --out and the other files a command writes.
    Case(
        "out-is-an-existing-file",
        ["run", "--prompts", "p.jsonl", "--out", "taken"],
        ("taken", "existing file"),
        {**OK, "taken": "x"},
    ),
    Case(
        "out-inside-a-file",
        ["run", "--prompts", "p.jsonl", "--out", "taken/run"],
        ("taken/run", "cannot create"),
        {**OK, "taken": "x"},
    ),
    Case(
        "out-not-writable",
        ["run", "--prompts", "p.jsonl", "--out", "ro"],
        ("ro", "not writable"),
        {**OK, "ro/.keep": ""},
        read_only,
    ),
    Case(
        "score-out-is-a-file",
        ["score", "--context", "Be safe.", "--prompts", "p.jsonl", "--out", "taken"],
        ("taken", "existing file"),
        {**OK, "taken": "x"},
    ),
    Case(
        "train-out-is-a-file",
        ["train", "--context", "c.yaml", "--prompts", "p.jsonl", "--out", "taken"],
        ("taken", "training directory", "existing file"),
        {**OK, "c.yaml": CONTEXT, "taken": "x"},
    ),
    Case(
        "export-out-is-a-directory",
        ["export", "--context", "c.yaml", "--prompts", "p.jsonl", "--out", "folder"],
        ("folder", "existing directory"),
        {**OK, "c.yaml": CONTEXT, "folder/.keep": ""},
    ),
    Case(
        "export-out-inside-a-file",
        ["export", "--context", "c.yaml", "--prompts", "p.jsonl", "--out", "taken/x.jsonl"],
        ("taken", "existing file"),
        {**OK, "c.yaml": CONTEXT, "taken": "x"},
    ),
    Case(
        "judge-eval-json-is-a-directory",
        ["judge", "eval", "l.jsonl", "--json", "folder"],
        ("folder", "metrics file", "existing directory"),
        {"l.jsonl": LABELLED, "folder/.keep": ""},
    ),
    Case(
        "judge-run-out-inside-a-file",
        ["judge", "run", "pairs.jsonl", "--out", "taken/v.jsonl"],
        ("taken", "verdicts file", "existing file"),
        {"pairs.jsonl": PAIRS, "taken": "x"},
    ),
    # Settings: devices, dtypes, storage, numbers, backends, models.
    Case("device-unknown", [*RUN, "--device", "tpu"], ("--device 'tpu'", "cuda:N"), OK),
    Case(
        "device-cuda-not-here",
        [*RUN, "--device", "cuda"],
        ("--device cuda", "no CUDA"),
        OK,
        no_cuda,
    ),
    Case("device-mps-not-here", [*RUN, "--device", "mps"], ("--device mps",), OK, no_mps),
    Case("dtype-unknown", [*RUN, "--dtype", "int8"], ("dtype 'int8'", "--dtype"), OK),
    Case(
        "train-dtype-unknown",
        ["train", "--context", "c.yaml", "--dtype", "int8"],
        ("dtype 'int8'", "--dtype"),
        {"c.yaml": CONTEXT},
    ),
    Case("storage-unknown-scheme", [*RUN, "--storage", "ftp://h/x"], ("--storage", "'ftp'"), OK),
    Case(
        "storage-folder-missing",
        [*RUN, "--storage", "sqlite:///gone/study.db"],
        ("--storage", "gone"),
        OK,
    ),
    Case(
        "storage-journal-folder-missing",
        [*RUN, "--storage", "journal:gone/study.journal"],
        ("--storage", "gone"),
        OK,
    ),
    Case("out-empty", ["run", "--prompts", "p.jsonl", "--out", ""], ("--out is empty",), OK),
    Case("device-malformed-index", [*RUN, "--device", "cuda:x"], ("--device 'cuda:x'",), OK),
    Case("seed-not-a-number", [*RUN, "--seed", "abc"], ("'--seed'",), OK),
    Case("sampler-unknown", [*RUN, "--sampler", "grid"], ("--sampler 'grid'",), OK),
    Case(
        "limit-zero",
        [*RUN, "--limit", "0"],
        ("'--limit'", "greater than or equal to 1", "flipsearch run --help"),
        OK,
    ),
    Case("limit-not-a-number", [*RUN, "--limit", "many"], ("'--limit'", "valid integer"), OK),
    Case("temperature-negative", [*RUN, "--temperature", "-1"], ("'--temperature'",), OK),
    Case("trials-negative", [*RUN, "--trials", "-3"], ("'--trials'",), OK),
    Case("holdout-over-one", [*RUN, "--holdout-fraction", "1.5"], ("'--holdout-fraction'",), OK),
    Case(
        "held-out-shares-too-big",
        [*RUN, "--holdout-fraction", "0.6", "--final-fraction", "0.5"],
        ("selection 0.6 + final 0.5",),
        OK,
    ),
    Case("samples-without-temperature", [*RUN, "--samples", "3"], ("temperature",), OK),
    Case("train-steps-zero", ["train", "--context", "Be safe.", "--steps", "0"], ("'--steps'",)),
    Case("unknown-option", [*RUN, "--frobnicate", "3"], ("--frobnicate",), OK),
    Case("unknown-command", ["frobnicate"], ("'frobnicate'",)),
    Case("backend-unknown", [*RUN, "--backend", "tgi"], ("backend 'tgi'",), OK),
    Case("backend-option-of-another", [*RUN, "--base-url", "http://h/v1"], ("--base-url",), OK),
    Case("backend-option-malformed", [*RUN, "--vllm-arg", "seed"], ("--vllm-arg 'seed'",), OK),
    Case("backend-option-bad-value", [*RUN, "--invariant-rows", "odd"], ("--invariant-rows",), OK),
    Case("judge-unknown", [*RUN, "--judge", "oracle"], ("judge 'oracle'",), OK),
    Case(
        "judge-wrong-role",
        [*RUN, "--refusal-judge", "llama-guard"],
        ("'llama-guard'", "refusal judge"),
        OK,
    ),
    Case("judge-classifier-missing", [*RUN, "--judge", "classifier:nodir"], ("nodir",), OK),
    Case("proposer-unknown", [*RUN, "--proposer", "nosuch"], ("--proposer", "'nosuch'"), OK),
    Case(
        "judge-model-hub-unreachable",
        [*RUN, "--judge", "llama-guard", "--judge-model", "meta/guard"],
        ("'meta/guard'", "cannot reach the model hub"),
        OK,
    ),
    Case("model-unknown-name", [*RUN, "--model", "no-such-model"], ("'no-such-model'",), OK),
    Case(
        "model-directory-without-config",
        [*RUN, "--model", "folder"],
        ("folder", "config.json"),
        {**OK, "folder/weights.bin": "x"},
    ),
    Case(
        "model-hub-unreachable",
        [*RUN, "--model", "some/unknown-id"],
        ("'some/unknown-id'", "cannot reach the model hub"),
        OK,
    ),
    Case(
        "model-hub-offline-mode",
        [*RUN, "--model", "some/unknown-id"],
        ("'some/unknown-id'", "HF_HUB_OFFLINE"),
        OK,
        hub_offline_mode,
    ),
    # score, export and train arguments.
    Case(
        "score-unknown-placement",
        ["score", "--context", "Be safe.", "--placement", "middle", "--prompts", "p.jsonl"],
        ("placement 'middle'",),
        OK,
    ),
    Case(
        "score-same-context-twice",
        ["score", "--context", "Be safe.", "--context", "Be safe.", "--prompts", "p.jsonl"],
        ("--context", "twice", "'ctx-"),
        OK,
    ),
    Case(
        "score-context-file-missing",
        ["score", "--context", "gone.yaml", "--prompts", "p.jsonl"],
        ("gone.yaml", "does not exist"),
        OK,
    ),
    Case(
        "export-context-file-holds-two",
        ["export", "--context", "two.yaml"],
        ("two.yaml", "holds 2 contexts"),
        {"two.yaml": family("  - id: a\n    text: x\n  - id: b\n    text: y\n")},
    ),
    Case(
        "export-wrong-placement",
        ["export", "--context", "s.yaml", "--prompts", "p.jsonl", "--out", "e.jsonl"],
        ("context 's1'", "'system'"),
        {**OK, "s.yaml": "id: s1\nplacement: system\ntext: Be safe.\n"},
    ),
    Case(
        "export-prompts-not-utf8",
        ["export", "--context", "c.yaml", "--prompts", "l.jsonl", "--out", "e.jsonl"],
        ("l.jsonl:1", "not UTF-8"),
        {"c.yaml": CONTEXT, "l.jsonl": b'{"prompt": "' + LATIN1 + b'", "kind": "harmful"}\n'},
    ),
    Case(
        "train-mode-unknown",
        ["train", "--context", "c.yaml", "--mode", "sideways"],
        ("--mode", "'sideways'"),
        {"c.yaml": CONTEXT},
    ),
    Case(
        "train-prompts-not-utf8",
        ["train", "--context", "c.yaml", "--prompts", "l.csv", "--out", "t"],
        ("l.csv:2", "not UTF-8"),
        {"c.yaml": CONTEXT, "l.csv": b"kind,prompt\nharmful," + LATIN1 + b"\n"},
    ),
    # Labelled files and pairs for the judge commands.
    Case(
        "judge-eval-not-utf8",
        ["judge", "eval", "l.jsonl"],
        ("l.jsonl:5", "not UTF-8"),
        {"l.jsonl": LABELLED.encode() + b'{"prompt": "' + LATIN1 + b'"}\n'},
    ),
    Case(
        "judge-eval-label-not-boolean",
        ["judge", "eval", "l.jsonl"],
        ("l.jsonl:1", "'unsafe' must be true/false"),
        {"l.jsonl": '{"prompt": "p", "response": "r", "unsafe": "maybe"}\n'},
    ),
    Case(
        "judge-eval-no-label",
        ["judge", "eval", "l.jsonl"],
        ("l.jsonl:1", "no 'unsafe' or 'refusal' label"),
        {"l.jsonl": '{"prompt": "p", "response": "r"}\n'},
    ),
    Case(
        "judge-eval-unsupported-type",
        ["judge", "eval", "l.txt"],
        ("l.txt", "unsupported labelled file type"),
        {"l.txt": "x"},
    ),
    Case(
        "judge-eval-labelled-is-a-directory",
        ["judge", "eval", "folder"],
        ("folder", "is a directory"),
        {"folder/.keep": ""},
    ),
    Case("judge-eval-unknown-label", ["judge", "eval", "--label", "rude"], ("label 'rude'",)),
    Case(
        "judge-train-unknown-label",
        ["judge", "train", "l.jsonl", "--label", "rude"],
        ("label 'rude'",),
        {"l.jsonl": LABELLED},
    ),
    Case("judge-run-missing", ["judge", "run", "gone.jsonl"], ("gone.jsonl", "no such file")),
    Case(
        "judge-run-row-without-response",
        ["judge", "run", "pairs.jsonl"],
        ("pairs.jsonl:2", "'response'"),
        {"pairs.jsonl": PAIRS + '{"prompt": "q2"}\n'},
    ),
    Case(
        "judge-run-not-utf8",
        ["judge", "run", "pairs.jsonl"],
        ("pairs.jsonl:1", "not UTF-8"),
        {"pairs.jsonl": b'{"prompt": "' + LATIN1 + b'", "response": "r"}\n'},
    ),
    Case(
        "judge-run-unknown-role",
        ["judge", "run", "pairs.jsonl", "--role", "boss"],
        ("role 'boss'",),
        {"pairs.jsonl": PAIRS},
    ),
    # flipsearch report on damaged run directories.
    Case("report-missing-directory", ["report", "gone"], ("gone", "does not exist")),
    Case("report-path-is-a-file", ["report", "taken"], ("taken", "is a file"), {"taken": "x"}),
    Case(
        "report-run-json-missing",
        ["report", "run"],
        ("run", "run.json is missing"),
        run_dir(**{"run.json": None}),
    ),
    Case(
        "report-run-json-malformed",
        ["report", "run"],
        ("run/run.json:1", "malformed JSON"),
        run_dir(**{"run.json": '{"winner": '}),
    ),
    Case(
        "report-run-json-not-an-object",
        ["report", "run"],
        ("run/run.json", "expected a JSON object"),
        run_dir(**{"run.json": "[1, 2]"}),
    ),
    Case(
        "report-run-json-not-utf8",
        ["report", "run"],
        ("run/run.json:1", "not UTF-8"),
        {**run_dir(), "run/run.json": b'{"model": "' + LATIN1 + b'"}'},
    ),
    Case(
        "report-run-json-incomplete",
        ["report", "run"],
        ("run/run.json", "'prompt_counts'"),
        run_dir(**{"run.json": json.dumps({"winner": "ctx-a"})}),
    ),
    Case(
        "report-run-json-history-damaged",
        ["report", "run"],
        ("run/run.json", "'history'"),
        run_dir(**{"run.json": json.dumps({"history": [{"trial": 0}], **RUN_FACTS})}),
    ),
    Case(
        "report-run-json-without-settings",
        ["report", "run"],
        ("run:", "lack a value the report shows", "max_benign_refusal"),
        run_dir(**{"run.json": json.dumps({"winner": "ctx-a", "config": {}, **RUN_FACTS})}),
    ),
    Case(
        "report-winner-not-in-leaderboard",
        ["report", "run"],
        ("run/run.json", "'ctx-zz'"),
        run_dir(**{"run.json": json.dumps({"winner": "ctx-zz", **RUN_FACTS})}),
    ),
    Case(
        "report-leaderboard-empty",
        ["report", "run"],
        ("run/leaderboard.csv", "cannot read"),
        run_dir(**{"leaderboard.csv": ""}),
    ),
    Case(
        "report-leaderboard-without-columns",
        ["report", "run"],
        ("run/leaderboard.csv", "'flip_rate'"),
        run_dir(**{"leaderboard.csv": "rank,context\n1,ctx-a\n"}),
    ),
    Case(
        "report-leaderboard-rates-not-numbers",
        ["report", "run"],
        ("run/leaderboard.csv", "'flip_rate'", "not numbers"),
        run_dir(
            **{
                "leaderboard.csv": "rank,context,flip_rate,flip_rate_low,flip_rate_high\n"
                "1,ctx-a,high,0.1,0.9\n"
            }
        ),
    ),
    Case(
        "report-results-malformed-line",
        ["report", "run"],
        ("run/results.jsonl:2", "malformed JSON"),
        run_dir(**{"results.jsonl": '{"context": null}\n{oops\n'}),
    ),
    Case(
        "report-results-empty",
        ["report", "run"],
        ("run/results.jsonl", "no results"),
        run_dir(**{"results.jsonl": ""}),
    ),
    Case(
        "report-results-row-incomplete",
        ["report", "run"],
        ("run/results.jsonl:1", "a result without"),
        run_dir(**{"results.jsonl": '{"context": null, "split": "search"}\n'}),
    ),
    Case(
        "report-token-kl-malformed",
        ["report", "run"],
        ("run/token_kl.json:1", "malformed JSON"),
        run_dir(**{"token_kl.json": "{bad"}),
    ),
    Case(
        "report-token-kl-wrong-shape",
        ["report", "run"],
        ("run/token_kl.json", "'examples'"),
        run_dir(**{"token_kl.json": json.dumps({"examples": 3})}),
    ),
    Case(
        "report-best-context-malformed",
        ["report", "run"],
        ("run/best_context.yaml:2", "malformed YAML"),
        run_dir(**{"best_context.yaml": "id: a\ntext: [open\n"}),
    ),
    Case(
        "report-train-metrics-damaged",
        ["report", "run"],
        ("run/train/metrics.jsonl:1", "a training step without"),
        run_dir(**{"train/metrics.jsonl": '{"step": 1}\n'}),
    ),
]


@pytest.fixture(autouse=True)
def _no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading weights or a tokenizer, converting the embedded model, or asking the hub fails
    the test: every case must be refused before any of them."""
    import transformers

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("a bad-input case reached the model load")

    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        monkeypatch.setattr(cls, "from_pretrained", refuse)
    monkeypatch.setattr(flipsearch.models, "embedded_model_dir", refuse)
    # The hub is unreachable in every case, wherever the tests run (a real probe is below).
    monkeypatch.setattr(flipsearch.models, "_answers", lambda url, timeout: False)
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it


def write_files(root: Path, files: Files) -> None:
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")


def run_main(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int:
    """``flipsearch ARGV`` through the console entry point; its exit code."""
    monkeypatch.setattr(sys, "argv", ["flipsearch", *argv])
    try:
        flipsearch.cli.main()
    except SystemExit as stop:
        return stop.code if isinstance(stop.code, int) else 1
    return 0


def assert_one_line(code: int, out: str, err: str, expect: tuple[str, ...]) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in out + err, err
    assert code == 2, f"exit {code}: {err or out}"
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    for fragment in expect:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def test_the_table_is_large_and_its_ids_unique() -> None:
    assert len(CASES) >= 65
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_bad_input_is_one_line_exit_2(
    case: Case,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    write_files(tmp_path, case.files)
    monkeypatch.chdir(tmp_path)
    if case.patch is not None:
        case.patch(monkeypatch, tmp_path)
    code = run_main(case.argv, monkeypatch)
    captured = capsys.readouterr()
    assert_one_line(code, captured.out, captured.err, case.expect)


def test_the_undamaged_run_directory_renders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The report cases damage a run that is otherwise good, so each fails for its damage."""
    write_files(tmp_path, run_dir())
    monkeypatch.chdir(tmp_path)
    assert run_main(["report", "run"], monkeypatch) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "report.html").is_file()


def test_over_long_prompt_names_its_file_line_and_id() -> None:
    """A prompt over the model's window is refused with its id, file and line, before any
    generation."""
    from flipsearch.errors import FlipsearchError
    from flipsearch.prompts import check_prompt_lengths, load_prompts

    prompts = load_prompts("builtin:harmful")[:3]
    long = prompts[2]
    with pytest.raises(FlipsearchError) as raised:
        check_prompt_lengths(prompts, lambda text: 9000 if text == long.text else 10, 2048)
    message = str(raised.value)
    assert long.source is not None and long.source.endswith(":3")
    assert message.startswith(f"{long.source}: prompt {long.id!r} is 9000 tokens")
    assert "2048" in message and "\n" not in message


def test_hub_probe_answers_within_its_timeout() -> None:
    """The real probe: a server that answers is reachable; a refused port and a server that
    accepts but never answers are not, and the probe gives up in about its timeout."""
    import http.server
    import socket
    import threading
    import time

    class Hub(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        REAL_PROBE.cache_clear()
        assert REAL_PROBE(f"http://127.0.0.1:{server.server_port}/", 2.0)
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            port = closed.getsockname()[1]
        assert not REAL_PROBE(f"http://127.0.0.1:{port}/", 2.0)
        started = time.monotonic()
        assert not REAL_PROBE(f"http://127.0.0.1:{silent.getsockname()[1]}/", 0.5)
        assert time.monotonic() - started < 2
    finally:
        server.shutdown()
        silent.close()
        REAL_PROBE.cache_clear()


SUBPROCESS_CASES = [
    "prompts-csv-unclosed-quote",
    "out-is-an-existing-file",
    "report-path-is-a-file",
]


def test_real_processes_print_one_line_and_no_traceback(tmp_path: Path) -> None:
    """Three cases as separate processes of the console script (run side by side)."""
    by_id = {case.id: case for case in CASES}
    script = Path(sys.executable).with_name("flipsearch")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "flipsearch.cli"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1"}
    running = []
    for name in SUBPROCESS_CASES:
        case, folder = by_id[name], tmp_path / name
        folder.mkdir()
        write_files(folder, case.files)
        process = subprocess.Popen(
            [*command, *case.argv],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        running.append((case, process))
    for case, process in running:
        out, err = process.communicate(timeout=300)
        assert_one_line(process.returncode, out, err, case.expect)


def test_over_long_prompt_in_a_run_is_named_before_generation(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The one case that loads a model (the tiny test model: its tokenizer is needed to count);
    generating anything still fails the test."""
    import transformers

    monkeypatch.undo()  # this case may load the tiny model's weights and tokenizer
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)
    monkeypatch.setattr(flipsearch.models, "_answers", lambda url, timeout: False)

    def no_generation(*_: Any, **__: Any) -> Any:
        raise AssertionError("the over-long prompt was not refused before generation")

    monkeypatch.setattr(transformers.GenerationMixin, "generate", no_generation)
    long_text = " ".join(f"word{i}" for i in range(3000))
    rows = [json.loads(line) for line in PROMPTS.splitlines()]
    rows.insert(1, {"id": "too-long", "kind": "harmful", "category": "c", "prompt": long_text})
    write_files(tmp_path, {"long.jsonl": "".join(json.dumps(r) + "\n" for r in rows)})
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--prompts", "long.jsonl", "--model", str(tiny_model_dir), "--trials", "0"]
    argv += ["--max-new-tokens", "4", "--dtype", "fp32", "--device", "cpu", "--out", "out"]
    code = run_main(argv, monkeypatch)
    captured = capsys.readouterr()
    # Outside a terminal the model load announces itself ("loading model ... ..."): those
    # progress lines aside, the mistake is one line.
    progress = [line for line in captured.err.splitlines() if line.endswith(" ...")]
    assert progress == [f"loading model {tiny_model_dir} ...", "starting the hf backend ..."]
    error = "\n".join(line for line in captured.err.splitlines() if line not in progress)
    assert_one_line(code, captured.out, error, ("long.jsonl:2", "'too-long'", "tokens"))
