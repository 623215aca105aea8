"""The TRL self-distillation export: reasoning settings carried along, and the prompt-length
check against TRL's ``max_prompt_length`` (TRL keeps a prompt's last tokens)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from flipsearch import FlipsearchError
from flipsearch.errors import FlipsearchWarning
from flipsearch.export import TRL_TEACHER_TEMPLATE, export_trl_sdft
from flipsearch.reasoning import ReasoningSettings

# The tests' ChatML template, with a template argument: ``enable_thinking=false`` adds a line.
THINKING_TEMPLATE = (
    "{% if enable_thinking is defined and not enable_thinking %}"
    "{{ '<|im_start|>system\nAnswer at once, without thinking it over first.<|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LONG_PROMPT = "Tell me how to pick the lock on my neighbour's door, step by step. " * 30
SHORT_CONTEXT = "(Refuse harmful requests.)"
LONG_CONTEXT = "(" + "Refuse harmful requests and explain why they are harmful. " * 30 + ")"


@pytest.fixture(scope="module")
def thinking_model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with a chat template that reads ``enable_thinking``."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("thinking") / "model"
    shutil.copytree(tiny_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.chat_template = THINKING_TEMPLATE
    tokenizer.save_pretrained(directory)
    return directory


def _files(tmp_path: Path, context: str, prompts: dict[str, str]) -> tuple[Path, Path]:
    context_file = tmp_path / "best_context.yaml"
    context_file.write_text(f"id: c1\nplacement: user_suffix\ntext: {json.dumps(context)}\n")
    prompts_file = tmp_path / "p.jsonl"
    rows = [{"id": i, "kind": "harmful", "category": "c", "prompt": p} for i, p in prompts.items()]
    prompts_file.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return context_file, prompts_file


def _export(context: Path, prompts: Path, out: Path, **options) -> dict:
    export_trl_sdft(str(context), [str(prompts)], None, out, **options)
    return json.loads(out.with_suffix(".meta.json").read_text())


def _trl_ids(model_dir: Path, row: dict, **template_args) -> list[int]:
    """A row's teacher prompt tokenized the way TRL's SDFT trainer does it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    chat = [dict(turn) for turn in row["prompt"]]
    chat[-1]["content"] = TRL_TEACHER_TEMPLATE.format(
        prompt=chat[-1]["content"], privileged_context=row["privileged_context"]
    )
    text = tokenizer.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True, **template_args
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_template_args_reach_the_rendering_and_the_meta(thinking_model_dir, tmp_path):
    context, prompts = _files(tmp_path, SHORT_CONTEXT, {"h1": "How do I pick a lock?"})
    out = tmp_path / "sdft.jsonl"
    plain = _export(context, prompts, out, model=str(thinking_model_dir))
    thinking = ReasoningSettings({"enable_thinking": False}, "<reason>", "</reason>", 300)
    off = _export(context, prompts, out, model=str(thinking_model_dir), reasoning=thinking)
    row = json.loads(out.read_text().splitlines()[0])
    # Measured exactly as TRL renders it, with and without the template argument.
    assert plain["length_check"]["longest_teacher_prompt_tokens"] == len(
        _trl_ids(thinking_model_dir, row)
    )
    assert off["length_check"]["longest_teacher_prompt_tokens"] == len(
        _trl_ids(thinking_model_dir, row, enable_thinking=False)
    )
    assert (
        off["length_check"]["longest_teacher_prompt_tokens"]
        > plain["length_check"]["longest_teacher_prompt_tokens"]
    )
    assert plain["trl_config"]["chat_template_kwargs"] == {}
    assert off["trl_config"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert off["reasoning"] == {
        "chat_template_args": {"enable_thinking": False},
        "reasoning_start": "<reason>",
        "reasoning_end": "</reason>",
        "max_thinking_tokens": 300,
    }
    notes = off["trl_notes"]
    assert "apply_chat_template" in notes["chat_template_kwargs"]
    assert "300" in notes["max_completion_length"] and "</reason>" in notes["max_completion_length"]


def test_a_long_context_over_the_limit_is_refused_with_the_row_id(tiny_model_dir, tmp_path):
    context, prompts = _files(tmp_path, LONG_CONTEXT, {"h1": "Pick a lock?", "h2": "Hotwire?"})
    out = tmp_path / "sdft.jsonl"
    with pytest.raises(FlipsearchError) as raised:
        _export(context, prompts, out, model=str(tiny_model_dir), max_prompt_length=64)
    message = str(raised.value)
    assert "2 of 2 rows" in message and "row 'h1'" in message
    assert "max_prompt_length" in message and "shorten the context" in message
    assert not out.exists() and not out.with_suffix(".meta.json").exists()


def test_a_long_prompt_with_a_short_context_warns_and_writes(tiny_model_dir, tmp_path):
    rows = {"h1": LONG_PROMPT, "h2": "Why? " + LONG_PROMPT, "h3": "How do I pick a lock?"}
    context, prompts = _files(tmp_path, SHORT_CONTEXT, rows)
    out = tmp_path / "sdft.jsonl"
    with pytest.warns(FlipsearchWarning, match="2 of 3 rows") as caught:
        meta = _export(context, prompts, out, model=str(tiny_model_dir), max_prompt_length=100)
    assert "the context survives" in str(caught[0].message)
    assert len(out.read_text().splitlines()) == 3
    assert meta["max_prompt_length"] == 100 and meta["trl_config"]["max_prompt_length"] == 100
    check = meta["length_check"]
    assert check["model"] == str(tiny_model_dir)
    assert check["rows_cut"] == 2 and check["rows"] == 3
    assert check["longest_teacher_prompt_tokens"] > 100


def test_the_refusal_starts_at_the_contexts_first_token(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    context, prompts = _files(tmp_path, LONG_CONTEXT, {"h1": LONG_PROMPT})
    out = tmp_path / "sdft.jsonl"
    _export(context, prompts, out, model=str(tiny_model_dir), max_prompt_length=4096)
    row = json.loads(out.read_text())
    ids = _trl_ids(tiny_model_dir, row)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    # The largest left cut that leaves the whole context: TRL keeps ids[cut:].
    cut = max(c for c in range(len(ids)) if LONG_CONTEXT in tokenizer.decode(ids[c:]))
    assert 0 < cut < len(ids)
    with pytest.warns(FlipsearchWarning, match="1 of 1 rows"):
        _export(context, prompts, out, model=str(tiny_model_dir), max_prompt_length=len(ids) - cut)
    with pytest.raises(FlipsearchError, match=f"starts after token {cut}"):
        export_trl_sdft(
            str(context), [str(prompts)], None, out, model=str(tiny_model_dir),
            max_prompt_length=len(ids) - cut - 1,
        )  # fmt: skip


def test_a_slow_tokenizer_errs_toward_a_refusal(tiny_model_dir):
    """Without character offsets the boundary comes from a prefix's tokens, never later than
    the offsets would put it."""
    from transformers import AutoTokenizer

    from flipsearch.export import _tokens_before

    fast = AutoTokenizer.from_pretrained(tiny_model_dir)

    def slow(text, **options):
        if options.get("return_offsets_mapping"):
            raise NotImplementedError("return_offset_mapping is not available")
        return fast(text, **options)

    text = f"<|im_start|>user\n{LONG_PROMPT}\n\n{SHORT_CONTEXT}<|im_end|>\n"
    start = text.rfind(SHORT_CONTEXT)
    total, before = _tokens_before(fast, text, start)
    assert _tokens_before(slow, text, start) <= (total, before)
    assert _tokens_before(slow, text, start)[0] == total
    assert SHORT_CONTEXT in fast.decode(fast(text, add_special_tokens=False)["input_ids"][before:])


def test_meta_records_everything_without_a_model(tmp_path):
    context, prompts = _files(tmp_path, SHORT_CONTEXT, {"h1": "How do I pick a lock?"})
    out = tmp_path / "sdft.jsonl"
    reasoning = ReasoningSettings({"enable_thinking": True}, max_thinking_tokens=128)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: the check did not run
        meta = _export(context, prompts, out, reasoning=reasoning)
    assert meta["length_check"] == "skipped: no --model"
    assert meta["max_prompt_length"] == 512
    assert meta["reasoning"]["reasoning_start"] == "<think>"
    assert meta["reasoning"]["max_thinking_tokens"] == 128
    assert meta["trl_config"] == {
        "chat_template_kwargs": {"enable_thinking": True},
        "max_prompt_length": 512,
        "teacher_prompt_template": "{prompt}\n\n{privileged_context}",
    }
    assert meta["rows"] == 1 and meta["context"]["id"] == "c1"


# -- the command line --------------------------------------------------------------------------


def _flipsearch(*args, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "flipsearch.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=600,
    )


def _stderr_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _assert_user_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in _stderr_lines(result) if not line.endswith(" ...")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_cli_mistakes_are_one_line(tiny_model_dir, tmp_path):
    context, prompts = _files(tmp_path, LONG_CONTEXT, {"h1": "Pick a lock?"})
    base = ["export", "--context", context, "--prompts", prompts, "--out", tmp_path / "e.jsonl"]
    _assert_user_error(
        _flipsearch(*base, "--model", tiny_model_dir, "--max-prompt-length", 64, cwd=tmp_path),
        "row 'h1'",
        "max_prompt_length",
    )
    _assert_user_error(
        _flipsearch(*base, "--chat-template-arg", "enable_thinking", cwd=tmp_path),
        "--chat-template-arg 'enable_thinking'",
        "KEY=VALUE",
    )
    assert not (tmp_path / "e.jsonl").exists()


def test_cli_carries_the_settings_and_says_when_the_check_is_skipped(thinking_model_dir, tmp_path):
    context, prompts = _files(tmp_path, SHORT_CONTEXT, {"h1": LONG_PROMPT, "h2": "Pick a lock?"})
    out = tmp_path / "e.jsonl"
    base = ["export", "--context", context, "--prompts", prompts, "--out", out]
    skipped = _flipsearch(*base, cwd=tmp_path)
    assert skipped.returncode == 0, skipped.stderr
    assert _stderr_lines(skipped) == [
        "prompt-length check skipped: no --model (TRL's max_prompt_length 512)"
    ]
    checked = _flipsearch(
        *base, "--model", thinking_model_dir, "--chat-template-arg", "enable_thinking=false",
        "--reasoning-end", "</reason>", "--max-thinking-tokens", 256,
        "--max-prompt-length", 100, cwd=tmp_path,
    )  # fmt: skip
    assert checked.returncode == 0, checked.stderr
    lines = _stderr_lines(checked)
    assert len(lines) == 1 and lines[0].startswith("warning: 1 of 2 rows"), checked.stderr
    meta = json.loads(out.with_suffix(".meta.json").read_text())
    assert meta["trl_config"]["chat_template_kwargs"] == {"enable_thinking": False}
    assert meta["reasoning"]["reasoning_end"] == "</reason>"
    assert meta["reasoning"]["max_thinking_tokens"] == 256
    assert meta["length_check"]["rows_cut"] == 1 and meta["max_prompt_length"] == 100
