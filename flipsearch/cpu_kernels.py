"""Settings that make the training loop cheaper on a CPU (the optimizer state one anywhere),
measured in ``benchmarks/train.py``; none changes what is computed beyond fp32 rounding.

- ``packed_linears``: decoding a few rows at a time multiplies a handful of activations by
  every weight matrix, once per new token. PyTorch's default fp32 kernel re-packs the weight
  on each call and runs it on one thread (the embedded model's output layer, 49152 x 576,
  took 23 ms for 4 rows on the 2-core development machine; oneDNN with the weight packed
  once, 6 ms). The weights change after every optimizer step, so they are packed again for
  each rollout (0.17 s for the embedded model, against seconds saved).
- ``allocate_adam_state``: AdamW makes its two moment buffers (twice the weights) at its first
  step, after the first step's rollouts and activations have been freed, so they land in the
  holes those left and split the heap the later steps' transient tensors reuse. Made before
  the first step, they sit below them (0.07-0.09 GiB less peak on the embedded model).
- ``keep_freed_memory``: glibc hands large blocks (the vocabulary-wide logits of a loss
  chunk) back to the kernel when they are freed, so the next one of the same size is paid
  for again in page faults (a 164 x 49152 product: 35 ms, 7.5 ms once freed blocks are kept).
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_KEPT_BYTES = 1 << 30  # blocks up to 1 GiB come from the heap and return to it


def _can_pack(model: Any) -> bool:
    parameter = next(model.parameters(), None)
    return (
        parameter is not None
        and parameter.device.type == "cpu"
        and parameter.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


@contextmanager
def packed_linears(model: Any, rows: int) -> Iterator[None]:
    """Inside, every ``nn.Linear`` of ``model`` multiplies at most ``4 * rows`` rows with a
    copy of its weight packed for oneDNN (decoding steps); longer inputs (the prompt's
    prefill) take the usual kernel. Without oneDNN, off the CPU or in another dtype, nothing
    changes. The copies are freed on exit, and the weights must not change inside."""
    if not _can_pack(model):
        yield
        return
    patched = []
    try:
        with torch.no_grad():
            for module in model.modules():
                # A module whose forward is already wrapped (accelerate's hooks) keeps it.
                if isinstance(module, torch.nn.Linear) and "forward" not in vars(module):
                    packed = torch.ops.mkldnn._reorder_linear_weight(module.weight, rows)
                    module.forward = _packed_forward(module, packed, 4 * rows)  # type: ignore[method-assign]
                    patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward  # back to the class's forward


def _packed_forward(module: torch.nn.Linear, packed: torch.Tensor, most_rows: int) -> Any:
    def forward(x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 2 and x.dtype == torch.float32 and x.numel() // x.shape[-1] <= most_rows:
            return torch.ops.mkldnn._linear_pointwise(x, packed, module.bias, "none", [], "")
        return F.linear(x, module.weight, module.bias)

    return forward


def allocate_adam_state(optimizer: torch.optim.Optimizer) -> None:
    """Make an Adam/AdamW optimizer's per-parameter state now, as its first ``step`` would:
    a step counter at zero and zeroed moments (``tests/test_cpu_kernels.py`` checks that the
    steps that follow are bit-identical). Parameters that already have state keep it."""
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        return
    for group in optimizer.param_groups:
        on_device = group.get("fused") or group.get("capturable")
        for parameter in group["params"]:
            if optimizer.state[parameter]:
                continue
            state: dict[str, torch.Tensor] = {
                "step": torch.zeros((), dtype=torch.float32, device=parameter.device)
                if on_device
                else torch.tensor(0.0, dtype=_scalar_dtype()),
                "exp_avg": torch.zeros_like(parameter, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(parameter, memory_format=torch.preserve_format),
            }
            if group.get("amsgrad"):
                state["max_exp_avg_sq"] = torch.zeros_like(
                    parameter, memory_format=torch.preserve_format
                )
            optimizer.state[parameter] = state


def _scalar_dtype() -> torch.dtype:
    """The dtype Adam keeps an unfused step counter in (its own rule)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed blocks up to 1 GiB for reuse (True when it agreed). Process-wide,
    and harmless elsewhere: without glibc (macOS, musl) nothing happens."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, _KEPT_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, 4 * _KEPT_BYTES)
    )


def _libc_function(name: str) -> Any:
    """glibc's ``name``, or None where the C library has no such function."""
    library = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(library), name) if library else None
    except (OSError, AttributeError):
        return None
