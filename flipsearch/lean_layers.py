"""Layers of the Llama family (Llama, Qwen2/3, Mistral, SmolLM) that keep fewer activations for
the student's backward pass; the forward passes are the same operations in the same order, so
the outputs are bit-identical.

- The gated MLP ``down(silu(gate x) * up x)``: autograd keeps four intermediate-sized
  tensors per layer (the gate, its SiLU, the up projection and their product); this keeps
  the gate and the up projection and recomputes the rest in the backward pass (elementwise).
- RMSNorm ``w * x / rms(x)``: autograd keeps the input and the normalised copy; this keeps
  the input and one number per row.
- Attention (its projections, rotary embedding and kernel) keeps nothing but its input and
  is recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant): its query,
  key, value and output copies are a third of a layer's activations, its projections a sixth
  of a layer's multiplications.
- The input embedding's gradient touches only the rows of the batch's tokens, but autograd
  builds it as a dense vocabulary x hidden tensor (113 MB on the embedded model) and then adds
  it to the gradient the tied output layer already left. Here it stays sparse and is added in
  place, so the full-size tensor never exists twice (and is never zero-filled); a model whose
  embedding is not tied gets a dense gradient on arrival, as the optimizer expects.

On the embedded model at a batch of 4 x 105 tokens, the memory the student's forward pass holds
for its backward pass falls from 540 MB to 336 MB with the MLP and norm alone
(``benchmarks/train.py`` measures the peak).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

RMS_NORMS = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm")
ATTENTIONS = ("LlamaAttention", "Qwen2Attention", "Qwen3Attention", "MistralAttention")


class GatedMLP(torch.autograd.Function):
    """``F.linear(silu(gate) * up, weight, bias)``, keeping ``gate`` and ``up`` only."""

    @staticmethod
    def forward(ctx: Any, gate: Any, up: Any, weight: Any, bias: Any) -> Any:
        ctx.save_for_backward(gate, up, weight)
        ctx.has_bias = bias is not None
        return F.linear(F.silu(gate) * up, weight, bias)

    @staticmethod
    def backward(ctx: Any, grad_out: Any) -> Any:
        gate, up, weight = ctx.saved_tensors
        sig = torch.sigmoid(gate)
        act = gate * sig  # silu(gate)
        grad_product = grad_out @ weight
        grad_weight = grad_out.reshape(-1, grad_out.shape[-1]).t() @ (act * up).reshape(
            -1, up.shape[-1]
        )
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.has_bias else None
        grad_up = grad_product * act
        grad_gate = grad_product.mul_(up).mul_(sig * (1 + gate * (1 - sig)))  # silu'
        return grad_gate, grad_up, grad_weight, grad_bias


class RMSNorm(torch.autograd.Function):
    """``weight * x * rsqrt(mean(x^2) + eps)``, keeping ``x`` and the row scale."""

    @staticmethod
    def forward(ctx: Any, x: Any, weight: Any, eps: float) -> Any:
        scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, scale)
        return weight * (x * scale)

    @staticmethod
    def backward(ctx: Any, grad_out: Any) -> Any:
        x, weight, scale = ctx.saved_tensors
        normalised = x * scale
        grad_weight = (grad_out * normalised).reshape(-1, x.shape[-1]).sum(0)
        grad_normalised = grad_out * weight
        mean = (grad_normalised * normalised).mean(-1, keepdim=True)
        return scale * (grad_normalised - normalised * mean), grad_weight, None


def _is_gated_mlp(module: Any) -> bool:
    parts = [getattr(module, name, None) for name in ("gate_proj", "up_proj", "down_proj")]
    act = getattr(module, "act_fn", None)
    silu = isinstance(act, torch.nn.SiLU) or type(act).__name__ == "SiLUActivation"
    return all(isinstance(p, torch.nn.Linear) for p in parts) and silu


def _mlp_forward(module: Any) -> Any:
    def forward(x: Any) -> Any:
        gate, up, down = module.gate_proj(x), module.up_proj(x), module.down_proj
        if gate.dtype != down.weight.dtype:  # under autocast: its casts, as usual
            return down(F.silu(gate) * up)
        return GatedMLP.apply(gate, up, down.weight, down.bias)

    return forward


def _recomputed_forward(module: Any) -> Any:
    def forward(*args: Any, **kwargs: Any) -> Any:
        return checkpoint(type(module).forward, module, *args, use_reentrant=False, **kwargs)

    return forward


def _norm_forward(module: Any) -> Any:
    def forward(x: Any) -> Any:
        if x.dtype != module.weight.dtype:
            return type(module).forward(module, x)
        return RMSNorm.apply(x, module.weight, module.variance_epsilon)

    return forward


# The weights that have the hook below, by id (a copied weight is a new tensor without it).
_HOOKED: dict[int, weakref.ref[torch.Tensor]] = {}


def _densify(weight: torch.Tensor) -> None:
    """After each accumulation: a gradient that arrived sparse (no dense one was there to add
    it to) becomes dense, which clipping and the fused optimizer need."""
    if weight.grad is not None and weight.grad.is_sparse:
        weight.grad = weight.grad.to_dense()


def _sparse_embedding(model: Any) -> torch.nn.Embedding | None:
    """The model's input embedding, when its gradient can be taken sparse (not already)."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if not isinstance(embedding, torch.nn.Embedding) or embedding.sparse:
        return None
    if not embedding.weight.requires_grad or embedding.max_norm is not None:
        return None
    weight = embedding.weight
    known = _HOOKED.get(id(weight))
    if known is None or known() is not weight:  # it outlives the context: backward is later
        weight.register_post_accumulate_grad_hook(_densify)
        _HOOKED[id(weight)] = weakref.ref(weight)
    return embedding


@contextmanager
def lean_activations(model: Any) -> Iterator[None]:
    """Inside, the model's gated MLPs, RMSNorms and attention of the known classes use the
    layers above and its input embedding records a sparse gradient; other modules (and modules
    whose forward is already wrapped) are left as they are."""
    patched = []
    embedding = _sparse_embedding(model)
    try:
        if embedding is not None:
            embedding.sparse = True
        for module in model.modules():
            if "forward" in vars(module):
                continue
            if _is_gated_mlp(module):
                module.forward = _mlp_forward(module)
            elif type(module).__name__ in RMS_NORMS and hasattr(module, "variance_epsilon"):
                module.forward = _norm_forward(module)
            elif type(module).__name__ in ATTENTIONS:
                module.forward = _recomputed_forward(module)
            else:
                continue
            patched.append(module)
        yield
    finally:
        if embedding is not None:
            embedding.sparse = False
        for module in patched:
            del module.forward
