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


# A ChatML template whose generation prompt opens a reasoning block (the Qwen3 and newer
# R1-Distill style), with Qwen3's switch: enable_thinking=false renders an empty, closed block.
REASONING_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% if enable_thinking is defined and enable_thinking is false %}"
    "{{ '<think>\n\n</think>\n\n' }}{% else %}{{ '<think>\n' }}{% endif %}{% endif %}"
)


def reasoning_copy(source, target, template=REASONING_TEMPLATE):
    """``source``'s weights (linked, not copied) with ``template`` as its chat template: a
    real model that is handed a reasoning block to write in (it never closes one itself, so
    a thinking budget is always forced)."""
    from pathlib import Path

    from transformers import AutoTokenizer

    source, target = Path(source), Path(target)
    target.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.suffix in (".safetensors", ".bin") or item.name in (
            "config.json",
            "generation_config.json",
        ):
            link = target / item.name
            if not link.exists():
                link.symlink_to(item.resolve())
    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.chat_template = template
    tokenizer.save_pretrained(target)
    return target
