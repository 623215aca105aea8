"""Shared fixtures: a tiny random Llama chat model with its own tokenizer, built in the test."""

from __future__ import annotations

from pathlib import Path

import pytest

# A ChatML template that, like SmolLM2's, inserts a default system message when none is given.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a tiny test assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tiny_model(
    directory: Path,
    seed: int = 0,
    chat_template: str = CHAT_TEMPLATE,
    extra_tokens: tuple[str, ...] = (),
) -> Path:
    """Train a byte-level BPE tokenizer on the shipped prompts and save a random tiny Llama.

    ``extra_tokens`` become plain added tokens (decoding keeps them, as Qwen3's ``<think>``)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from flipsearch import builtin_prompts

    corpus = [p.text for p in builtin_prompts()] + ["I can't help with that. Sure, here is how."]
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<unk>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<unk>",
        pad_token="<|im_end|>",
        model_max_length=1024,
    )
    tokenizer.add_tokens(list(extra_tokens))
    tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=0.5,  # large random weights: varied, non-empty outputs
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir: Path):
    from flipsearch import load_model

    return load_model(str(tiny_model_dir), device="cpu", dtype="fp32")


@pytest.fixture(autouse=True)
def _isolated_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keep tests away from the user's cache unless a test opts into the real one."""
    import os

    if "FLIPSEARCH_TEST_REAL_CACHE" not in os.environ:
        monkeypatch.setenv("FLIPSEARCH_CACHE", str(tmp_path_factory.getbasetemp() / "fs-cache"))


@pytest.fixture(scope="session")
def postgres_url():
    """A real PostgreSQL server (Debian's postgresql), started for the session on loopback."""
    import glob
    import os
    import pwd
    import shutil
    import socket
    import subprocess
    import tempfile

    binaries = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not binaries:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql)")
    bindir = Path(binaries[-1]).parent
    root = Path(tempfile.mkdtemp(prefix="flipsearch-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    data = root / "db"
    subprocess.run(
        [*prefix, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    options = f"-p {port} -k {root} -c listen_addresses=127.0.0.1"
    subprocess.run(
        [
            *prefix,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-o",
            options,
            "-w",
            "-l",
            str(root / "log"),
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
        )
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of the vLLM environment (`make vllm-env`); CI must have it, a laptop may not."""
    import os
    import subprocess

    root = Path(__file__).resolve().parent.parent
    python = Path(os.environ.get("FLIPSEARCH_VLLM_PYTHON", root / ".venv-vllm" / "bin" / "python"))
    probe = (
        subprocess.run([python, "-c", "import vllm"], capture_output=True, timeout=300)
        if python.exists()
        else None
    )
    if probe is None or probe.returncode != 0:
        message = f"no importable vLLM at {python} (run `make vllm-env`)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def embedded_model_dir() -> Path:
    """The embedded model's safetensors copy (converted from its GGUF on first use)."""
    from flipsearch.models import resolve_model

    return Path(resolve_model("smollm2-135m"))
