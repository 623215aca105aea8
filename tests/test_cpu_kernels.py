"""The training loop's kernels: packed decoding weights, the allocator, fused KL, lean layers."""

import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F

from flipsearch.cpu_kernels import _can_pack, allocate_adam_state, keep_freed_memory, packed_linears
from flipsearch.lean_layers import GatedMLP, RMSNorm, lean_activations
from flipsearch.opsa import FusedReverseKL
from flipsearch.scoring import reverse_kl


def test_fused_reverse_kl_matches_autograd_and_gradcheck():
    torch.manual_seed(0)
    s = torch.randn(5, 11, dtype=torch.double, requires_grad=True)
    t = torch.randn(5, 11, dtype=torch.double)
    assert torch.autograd.gradcheck(lambda x: FusedReverseKL.apply(x, t), (s,))
    weights = torch.randn(5, dtype=torch.double)
    plain = reverse_kl(F.log_softmax(s, -1), F.log_softmax(t, -1))
    fused = FusedReverseKL.apply(s, t)
    assert torch.allclose(plain, fused, atol=1e-12)
    expected = torch.autograd.grad((plain * weights).sum(), s)[0]
    got = torch.autograd.grad((FusedReverseKL.apply(s, t) * weights).sum(), s)[0]
    assert torch.allclose(expected, got, atol=1e-12)


def _rollout(model, ids, steps=6):
    torch.manual_seed(3)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=steps,
            do_sample=True,
            top_k=None,
            pad_token_id=0,
        )
    return out[:, ids.shape[1] :]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_packed_linears_decode_like_the_plain_model_and_restore_it(tiny_model):
    model = copy.deepcopy(tiny_model.model).eval()
    assert _can_pack(model)
    ids = torch.randint(3, 60, (3, 7))
    with torch.inference_mode():
        plain_logits = model(input_ids=ids[:, :1]).logits
    plain = _rollout(model, ids)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    calls = []
    with packed_linears(model, rows=3):
        assert all("forward" in vars(m) for m in linears)
        with torch.inference_mode():
            packed_logits = model(input_ids=ids[:, :1]).logits  # 3 rows: the packed kernel
        original = torch.ops.mkldnn._linear_pointwise
        torch.ops.mkldnn._linear_pointwise = lambda *a: calls.append(1) or original(*a)
        try:
            packed = _rollout(model, ids)
        finally:
            torch.ops.mkldnn._linear_pointwise = original
    assert calls, "decoding steps did not take the packed kernel"
    assert torch.allclose(plain_logits, packed_logits, atol=1e-4)
    assert torch.equal(plain, packed)
    assert not any("forward" in vars(m) for m in linears)  # the class's forward again


def test_packed_linears_leave_other_dtypes_alone(tiny_model):
    model = copy.deepcopy(tiny_model.model).to(torch.bfloat16)
    with packed_linears(model, rows=2):
        assert not any("forward" in vars(m) for m in model.modules())


def test_keep_freed_memory_is_accepted_by_glibc():
    import platform

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    assert keep_freed_memory()


def test_lean_layers_match_autograd_gradcheck():
    torch.manual_seed(0)
    gate, up = (torch.randn(2, 3, 6, dtype=torch.double, requires_grad=True) for _ in range(2))
    weight = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    bias = torch.randn(4, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(GatedMLP.apply, (gate, up, weight, bias))
    assert torch.autograd.gradcheck(GatedMLP.apply, (gate, up, weight, None))
    x = torch.randn(2, 3, 5, dtype=torch.double, requires_grad=True)
    scale = torch.randn(5, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, w: RMSNorm.apply(a, w, 1e-6), (x, scale))


def test_lean_activations_same_outputs_and_gradients_less_memory(tiny_model):
    model = copy.deepcopy(tiny_model.model).train()
    ids = torch.randint(3, 60, (2, 9))
    # Not hidden.pow(2).sum(): RMSNorm's output has a fixed norm, so that gradient is ~0.
    direction = torch.randn(2, 9, model.config.hidden_size)

    def run(lean):
        model.zero_grad(set_to_none=True)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            if lean:
                with lean_activations(model):
                    hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
            else:
                hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        (hidden * direction).sum().backward()
        # Untied here (the loss does not use the output layer): densified on arrival.
        assert not model.get_input_embeddings().weight.grad.is_sparse
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return hidden.detach(), grads, sum(saved)

    plain, plain_grads, plain_saved = run(False)
    lean, lean_grads, lean_saved = run(True)
    assert torch.equal(plain, lean)  # the same operations in the same order
    assert plain_grads.keys() == lean_grads.keys()
    for name, grad in plain_grads.items():
        # fp32 rounding of a different (analytic) backward, relative to the largest entry
        assert float((grad - lean_grads[name]).abs().max()) <= 1e-5 * float(grad.abs().max())
    # MLP and norms alone keep 84% on this model; attention recomputed too, 52%.
    assert lean_saved < 0.7 * plain_saved
    assert not any("forward" in vars(m) for m in model.modules())


def test_sparse_embedding_gradient_is_added_in_place_and_matches(tiny_model):
    """As in the loss: the tied output layer's gradient first (the logits chunks), then the
    transformer's, whose embedding part arrives sparse and is added to it in place."""
    model = copy.deepcopy(tiny_model.model).train()
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    ids = torch.randint(3, 60, (2, 9))
    direction = torch.randn(2, 9, model.config.vocab_size)

    arrived = []  # the layout of each gradient reaching the embedding weight
    model.get_input_embeddings().weight.register_hook(lambda g: arrived.append(g.is_sparse))

    def run(lean):
        model.zero_grad(set_to_none=True)
        arrived.clear()
        with lean_activations(model) if lean else contextlib.nullcontext():
            hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state
        detached = hidden.detach().requires_grad_(True)
        (model.lm_head(detached) * direction).sum().backward()
        weight = model.get_input_embeddings().weight
        tied_grad = weight.grad
        hidden.backward(detached.grad)
        assert not weight.grad.is_sparse
        assert weight.grad is tied_grad  # added in place, not replaced by a new tensor
        assert arrived == [False, lean]  # the output layer's dense, the embedding's sparse
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, lean = run(False), run(True)
    for name, grad in plain.items():
        assert float((grad - lean[name]).abs().max()) <= 1e-5 * float(grad.abs().max()), name
    assert not model.get_input_embeddings().sparse  # restored on exit


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_state_made_early_gives_the_same_steps(fused, amsgrad):
    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    lazy_params = [torch.nn.Parameter(w.clone()) for w in weights]
    early_params = [torch.nn.Parameter(w.clone()) for w in weights]
    make = lambda ps: torch.optim.AdamW(ps, lr=0.1, fused=fused, amsgrad=amsgrad)  # noqa: E731
    lazy, early = make(lazy_params), make(early_params)
    allocate_adam_state(early)
    assert all(early.state[p] for p in early_params) and not lazy.state
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, optimizer in ((lazy_params, lazy), (early_params, early)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            optimizer.step()
    for a, b in zip(lazy_params, early_params, strict=True):
        assert torch.equal(a, b)
    assert lazy.state_dict()["state"].keys() == early.state_dict()["state"].keys()
    for key, state in lazy.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(value, early.state_dict()["state"][key][name]), name
