"""On-policy self-distillation with a privileged safety context (OPSA), in one file.

Per step: sample a batch of prompts (harmful ones get the safety context, benign ones a benign
context or none); the student samples responses to the *plain* prompts with its current
weights; the student's and the frozen teacher's next-token distributions are computed on those
same response tokens, the teacher seeing the prompt rendered with its context exactly as the
search scored it; the loss is a per-token divergence over the vocabulary, masked to response
tokens, averaged per token. AdamW, warm-up + cosine decay, gradient clipping and accumulation.
Checkpoints hold weights, optimizer, scheduler, RNG states and step; ``resume`` continues a
killed run exactly. ``mode="offpolicy"`` is the baseline: fine-tune on the teacher's own
responses (generated with the context, trained without it) through the same loop.

Reasoning models: with ``--max-thinking-tokens`` the rollouts go through budget forcing (the
reasoning is closed for the model after N tokens, then it answers), and the loss covers the
whole trajectory: reasoning, forced close and answer. Each step's metrics split the per-token
signal at the reasoning boundary (``kl_reasoning_per_token``, ``kl_answer_per_token``,
``kl_by_answer_position``), so a change in the answer is not drowned by a long trace.

Divergences: ``reverse`` KL(student || teacher) is mode-seeking, ``forward`` KL(teacher ||
student) mode-covering; ``mixed`` is the generalised Jensen-Shannon divergence (TRL's GKD),
both KLs taken to the *mixture* m = alpha t + (1 - alpha) s, bounded and vanishing at its ends
(the limits are the KLs: alpha -> 0 forward, alpha -> 1 reverse). ``forward-reverse`` is the
loss NeMo-RL's distillation uses (and the OPSA paper's code): a weighted *sum* of the two KLs
themselves, alpha KL(t || s) + (1 - alpha) KL(s || t), so alpha = 1 is forward and alpha = 0
reverse (NeMo-RL's ``mixed_kl_weight`` is the forward weight too: the opposite end from
``mixed``). With ``--support topk`` it follows NeMo-RL: both distributions are renormalised
over the teacher's top-k tokens (no tail bucket, unlike the other divergences' topk); the paper
used k = 64 (``--support topk --top-k 64``); ``--support full`` is its k = vocabulary limit.
"""

from __future__ import annotations

import copy
import json
import math
import random
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from flipsearch.backends._base import Decoding, Generation
from flipsearch.backends.hf import HFGenerator
from flipsearch.config import TrainConfig
from flipsearch.contexts import Context, Renderer, context_from_arg
from flipsearch.cpu_kernels import allocate_adam_state, keep_freed_memory, packed_linears
from flipsearch.errors import FlipsearchError
from flipsearch.io import prepare_out_dir, write_atomic
from flipsearch.lean_layers import lean_activations
from flipsearch.models import LoadedModel
from flipsearch.progress import make_progress, status
from flipsearch.prompts import Prompt, stratified_subset
from flipsearch.reasoning import BudgetForcedGenerator, detect_format, reasoning_window
from flipsearch.scoring import reasoning_token_count, reverse_kl
from flipsearch.session import Session

KL_POSITIONS = 64
FORWARD_REVERSE = "forward-reverse"  # NeMo-RL's weighted sum of the two KLs (see the doc)


# ---------------------------------------------------------------------------------------------
# The loss: per-token divergence between two next-token distributions


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    tokens: torch.Tensor,
    divergence: str = "reverse",
    support: str = "full",
    alpha: float = 0.5,
    top_k: int = 20,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (loss, kl) for logits of shape (N, V) and the sampled tokens (N,).

    ``loss`` is what is differentiated; ``kl`` is the reported reverse KL(student || teacher)
    estimate (detached). ``full`` uses the whole vocabulary; ``topk`` the teacher's top-k tokens
    plus one bucket for the rest of the mass; ``sampled`` the student's sampled token only, with
    the score-function gradient of the reverse KL (per-token advantage log p_t - log p_s).

    ``mixed`` (generalised JSD) compares each distribution with their mixture, so it stays
    bounded and interpolates between covering (alpha -> 0) and seeking (alpha -> 1) modes;
    ``forward-reverse`` (NeMo-RL's distillation loss) adds the two KLs themselves, alpha on the
    mode-covering forward KL(teacher || student) and 1 - alpha on the mode-seeking reverse one,
    and under ``topk`` renormalises both over the teacher's top-k tokens instead of keeping a
    tail bucket (the paper's k = 64: ``--support topk --top-k 64``).
    """
    if divergence == "reverse" and support == "full":  # the default: one fused pass
        loss = FusedReverseKL.apply(student_logits.float(), teacher_logits.float())
        return loss, loss.detach()
    log_s = F.log_softmax(student_logits.float(), dim=-1)
    log_t = F.log_softmax(teacher_logits.float(), dim=-1)
    with torch.no_grad():
        kl = reverse_kl(log_s, log_t)
    if divergence == FORWARD_REVERSE:
        loss = _forward_reverse(
            student_logits.float(), teacher_logits.float(), support, alpha, top_k
        )
        return loss, kl
    if support == "sampled":
        if divergence != "reverse":
            raise FlipsearchError("the sampled-token estimator is for the reverse KL only")
        picked_s = log_s.gather(-1, tokens[:, None]).squeeze(-1)
        picked_t = log_t.gather(-1, tokens[:, None]).squeeze(-1)
        advantage = (picked_s - picked_t).detach()
        return advantage * picked_s, advantage
    if support == "topk":
        index = log_t.topk(min(top_k, log_t.shape[-1]), dim=-1).indices
        log_s, log_t = _with_tail(log_s.gather(-1, index)), _with_tail(log_t.gather(-1, index))
    if divergence == "mixed" and alpha in (0.0, 1.0):
        # The generalised JSD vanishes at its ends; its limits (TRL's convention) are the KLs.
        divergence = "forward" if alpha == 0.0 else "reverse"
    if divergence == "reverse":
        loss = reverse_kl(log_s, log_t)
    elif divergence == "forward":
        loss = reverse_kl(log_t, log_s)  # KL(teacher || student)
    else:  # generalised Jensen-Shannon: alpha KL(t || m) + (1 - alpha) KL(s || m)
        log_m = torch.logsumexp(
            torch.stack([log_t + math.log(alpha + 1e-12), log_s + math.log(1 - alpha + 1e-12)]),
            dim=0,
        )
        loss = alpha * reverse_kl(log_t, log_m) + (1 - alpha) * reverse_kl(log_s, log_m)
    return loss, kl


class FusedReverseKL(torch.autograd.Function):
    """Per-token KL(softmax(s) || softmax(t)) over the whole vocabulary, with its gradient in
    closed form: d KL / d s = p_s (log p_s - log p_t - KL). Autograd would keep four
    (tokens x vocabulary) tensors and walk back through log-softmax, exp and the product; this
    keeps the one gradient, computed in place during the forward pass, and the backward pass
    only scales it. The teacher's logits get no gradient."""

    @staticmethod
    def forward(ctx: Any, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> Any:
        with torch.no_grad():
            log_s = F.log_softmax(student_logits, dim=-1)
            p_s = log_s.exp()
            gap = log_s.sub_(F.log_softmax(teacher_logits, dim=-1))  # log p_s - log p_t
            kl = torch.linalg.vecdot(p_s, gap)
            ctx.save_for_backward(gap.sub_(kl[:, None]).mul_(p_s))
        return kl

    @staticmethod
    def backward(ctx: Any, grad_kl: torch.Tensor) -> Any:
        (gradient,) = ctx.saved_tensors
        return gradient * grad_kl[:, None], None


def _with_tail(log_top: torch.Tensor) -> torch.Tensor:
    """Top-k log-probabilities plus a last bucket holding the remaining mass."""
    tail = torch.log1p(-log_top.exp().sum(-1).clamp(max=1 - 1e-6))
    return torch.cat([log_top, tail[:, None]], dim=-1)


def check_divergence(divergence: str, support: str) -> None:
    """Refuse what ``forward-reverse`` cannot be estimated from (before anything loads)."""
    if divergence == FORWARD_REVERSE and support == "sampled":
        raise FlipsearchError(
            "--divergence forward-reverse needs the teacher's distribution over its top-k "
            "tokens, and --support sampled sees only the sampled token: use --support topk "
            "(the paper: --top-k 64) or --support full"
        )


def _forward_reverse(
    student: torch.Tensor, teacher: torch.Tensor, support: str, alpha: float, top_k: int
) -> torch.Tensor:
    """alpha KL(t || s) + (1 - alpha) KL(s || t) from the logits; under ``topk`` over the
    teacher's top-k tokens, both renormalised there (NeMo-RL's ``zero_outside_topk: false``,
    its default). The top-k logits are taken before any softmax over the whole vocabulary, so
    no gradient reaches a token outside them (through a full normaliser it would, by rounding)."""
    check_divergence(FORWARD_REVERSE, support)
    if support == "topk":
        index = teacher.topk(min(top_k, teacher.shape[-1]), dim=-1).indices
        student, teacher = student.gather(-1, index), teacher.gather(-1, index)
    log_s, log_t = F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)
    return alpha * reverse_kl(log_t, log_s) + (1 - alpha) * reverse_kl(log_s, log_t)


# ---------------------------------------------------------------------------------------------
# Batches: student and teacher sequences over the same response tokens


@dataclass
class Example:
    student_prompt: list[int]
    teacher_prompt: list[int]
    response: list[int]  # the trained tokens, EOS included when the response stopped
    reasoning_tokens: int = 0  # the response's leading reasoning tokens, end marker included


def _sequences(examples: Sequence[Example], teacher: bool, pad_id: int) -> tuple[Any, Any]:
    """Right-padded input ids and the (row, position) of each response token's predicting
    logit, in order."""
    prompts = [e.teacher_prompt if teacher else e.student_prompt for e in examples]
    rows = [p + e.response for p, e in zip(prompts, examples, strict=True)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    where_row: list[int] = []
    where_col: list[int] = []
    for i, (row, prompt, example) in enumerate(zip(rows, prompts, examples, strict=True)):
        ids[i, : len(row)] = torch.tensor(row)
        where_row += [i] * len(example.response)
        where_col += range(len(prompt) - 1, len(prompt) - 1 + len(example.response))
    return ids, (torch.tensor(where_row), torch.tensor(where_col))


def _hidden(model: Any, ids: torch.Tensor, autocast: Any) -> torch.Tensor:
    """Final hidden states (B, T, H) of right-padded rows; logits are made from them chunk by
    chunk. No attention mask: under causal attention a real token only sees positions before
    it, and with the padding on the right those are all real, so only the padding's own (unused)
    outputs would change. Without a mask, attention takes the fused causal kernel, which keeps
    one number per query and reads grouped keys and values without copying them per head. With
    gradients, the MLPs, norms, attention and embedding keep less (flipsearch/lean_layers.py)."""
    device_type = "cpu" if ids.device.type == "cpu" else "cuda"
    lean = lean_activations(model) if torch.is_grad_enabled() else nullcontext()
    with lean, torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        return model.model(input_ids=ids, use_cache=False).last_hidden_state


def distillation_loss(
    student: Any,
    teacher: Any,
    examples: Sequence[Example],
    config: TrainConfig,
    pad_id: int,
    autocast: Any = None,
    scale: float = 1.0,
) -> dict[str, Any]:
    """Backpropagate the mean per-token divergence of a micro-batch (times ``scale``).

    Logits are produced and differentiated ``chunk_tokens`` response tokens at a time, so
    memory grows with the chunk, not with vocabulary x response length.
    """
    device = next(student.parameters()).device
    s_ids, s_where = _sequences(examples, teacher=False, pad_id=pad_id)
    t_ids, t_where = _sequences(examples, teacher=True, pad_id=pad_id)
    tokens = torch.tensor([t for e in examples for t in e.response], device=device)
    positions = torch.tensor([i for e in examples for i in range(len(e.response))])
    with torch.no_grad():
        t_hidden = _hidden(teacher, t_ids.to(device), autocast)
        t_states = t_hidden[t_where[0], t_where[1]]
    s_hidden = _hidden(student, s_ids.to(device), autocast)
    s_states = s_hidden[s_where[0], s_where[1]]
    detached = s_states.detach().requires_grad_(True)
    total = len(tokens)
    kl_values = torch.zeros(total)
    loss_sum = 0.0
    for start in range(0, total, config.chunk_tokens):
        part = slice(start, start + config.chunk_tokens)
        # At the rollouts' temperature (as TRL does): the distributions the student sampled
        # from and the teacher's at the same temperature are the ones compared.
        s_logits = student.lm_head(detached[part]).float()
        with torch.no_grad():
            t_logits = teacher.lm_head(t_states[part]).float()
        if config.temperature != 1.0:
            s_logits, t_logits = s_logits / config.temperature, t_logits / config.temperature
        loss, kl = token_divergence(
            s_logits,
            t_logits,
            tokens[part],
            config.divergence,
            config.support,
            config.alpha,
            config.top_k,
        )
        (loss.sum() * scale / total).backward()
        loss_sum += float(loss.detach().sum())
        kl_values[part] = kl.float().cpu()
    s_states.backward(detached.grad)  # through the transformer, once
    return {"loss": loss_sum / total, "kl": kl_values, "positions": positions, "tokens": total}


def sft_loss(
    student: Any, examples: Sequence[Example], pad_id: int, autocast: Any = None, scale: float = 1.0
) -> dict[str, Any]:
    """The off-policy baseline: NLL of the teacher's responses under the plain prompt."""
    device = next(student.parameters()).device
    ids, where = _sequences(examples, teacher=False, pad_id=pad_id)
    tokens = torch.tensor([t for e in examples for t in e.response], device=device)
    hidden = _hidden(student, ids.to(device), autocast)
    logits = student.lm_head(hidden[where[0], where[1]]).float()
    nll = F.cross_entropy(logits, tokens, reduction="none")
    (nll.mean() * scale).backward()
    positions = torch.tensor([i for e in examples for i in range(len(e.response))])
    return {
        "loss": float(nll.detach().mean()),
        "kl": nll.detach().cpu(),
        "positions": positions,
        "tokens": len(tokens),
    }


class _Tally:
    """A step's per-token signal (KL, or NLL off-policy) over its micro-batches: by position
    from the response's first token and from the answer's, and split at the reasoning
    boundary, so a change in the answer shows apart from the trace before it."""

    def __init__(self) -> None:
        self.sums = torch.zeros(2, KL_POSITIONS, dtype=torch.float64)  # from: response, answer
        self.counts = torch.zeros(2, KL_POSITIONS, dtype=torch.float64)
        self.parts = torch.zeros(2, 2, dtype=torch.float64)  # reasoning, answer: (sum, tokens)
        self.examples = 0
        self.reasoning_tokens = 0

    def add(self, values: torch.Tensor, examples: Sequence[Example]) -> None:
        """``values``: one per response token, the examples' tokens in order."""
        values = values.detach().double().cpu()
        thought = torch.tensor([e.reasoning_tokens for e in examples for _ in e.response])
        positions = torch.tensor([i for e in examples for i in range(len(e.response))])
        for row, where in enumerate((positions, positions - thought)):
            kept = (where >= 0) & (where < KL_POSITIONS)
            self.sums[row].index_add_(0, where[kept], values[kept])
            self.counts[row].index_add_(0, where[kept], torch.ones(int(kept.sum())).double())
        answer = positions >= thought
        for row, mask in enumerate((~answer, answer)):
            self.parts[row] += torch.stack([values[mask].sum(), mask.sum().double()])
        self.examples += len(examples)
        self.reasoning_tokens += sum(e.reasoning_tokens for e in examples)

    def metrics(self, signal: str) -> dict[str, Any]:
        """The step record's signal keys (None: the step had no token of that part)."""

        def by_position(row: int) -> list[float]:
            used = int((self.counts[row] > 0).sum())
            return (self.sums[row, :used] / self.counts[row, :used].clamp(min=1)).tolist()

        def per_token(total: torch.Tensor) -> float | None:
            return float(total[0] / total[1]) if total[1] > 0 else None

        return {
            f"{signal}_per_token": per_token(self.parts.sum(0)) or 0.0,
            f"{signal}_by_position": by_position(0),
            f"{signal}_reasoning_per_token": per_token(self.parts[0]),
            f"{signal}_answer_per_token": per_token(self.parts[1]),
            f"{signal}_by_answer_position": by_position(1),
            "reasoning_tokens": self.reasoning_tokens / max(1, self.examples),
        }


# ---------------------------------------------------------------------------------------------
# The loop


def _schedule(optimizer: Any, config: TrainConfig) -> Any:
    """Linear warm-up, then cosine decay (transformers' schedule).

    Its warm-up starts at 0, which would spend the first step at no learning rate; the
    schedule is therefore started one step in (``last_epoch=0``): step ``k`` trains at the
    factor of ``k + 1``, and the horizon is ``steps + 1`` so the last step is not at 0 either.
    The scheduler's state is checkpointed, so a resumed run continues exactly.
    """
    from transformers import get_cosine_schedule_with_warmup

    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    return get_cosine_schedule_with_warmup(
        optimizer, config.warmup_steps, config.steps + 1, last_epoch=0
    )


def _autocast_dtype(loaded: LoadedModel, dtype: str) -> Any:
    from flipsearch.models import default_dtype

    if dtype == "fp32":
        return None
    chosen = (
        default_dtype(str(loaded.model.device))
        if dtype == "auto"
        else {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype)
    )
    return None if chosen in (None, torch.float32) else chosen


class Trainer:
    """Holds the student, the frozen teacher, the optimizer and the data stream."""

    def __init__(
        self,
        config: TrainConfig,
        loaded: LoadedModel | None = None,
        *,
        harmful: Sequence[Prompt] | None = None,
        benign: Sequence[Prompt] | None = None,
    ) -> None:
        """``harmful`` and ``benign`` train on these prompts instead of the prompt sets'
        (``validate`` trains on a run's search and selection splits)."""
        check_divergence(config.divergence, config.support)
        self.config = config
        self.reasoning = config.reasoning()
        self.out = prepare_out_dir(Path(config.out), "training directory")
        self.context = context_from_arg(config.context)
        self.benign_context = (
            context_from_arg(config.benign_context) if config.benign_context else None
        )
        # One session: the run's prompt sets, model and judges (for the evaluation).
        self.session = Session(
            model=loaded if loaded is not None else config.model,
            prompts=config.prompts,
            limit=config.limit,
            seed=config.seed,
            device=config.device,
            dtype="fp32",
            judge=config.judge,
            refusal_judge=config.refusal_judge,
            judge_model=config.judge_model,
            refusal_judge_model=config.refusal_judge_model,
            judge_on=config.judge_on,
            reasoning=self.reasoning,
        )
        self.harmful = list(harmful) if harmful is not None else self.session.harmful
        self.benign = list(benign) if benign is not None else self.session.benign
        if not self.harmful:
            raise FlipsearchError("training needs harmful prompts; the prompt sets have none")
        if config.harmful_fraction < 1 and not self.benign:
            raise FlipsearchError(
                "training with benign prompts needs some (or --harmful-fraction 1)"
            )
        self.session.judge("safety"), self.session.judge("refusal")  # fail before loading
        self.loaded = self.session.loaded
        self.model = self.loaded.model
        self.model.float().train()
        self.tokenizer = self.loaded.tokenizer
        self.pad_id = self.tokenizer.pad_token_id
        self.teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.autocast = _autocast_dtype(self.loaded, config.dtype)
        limit_len = getattr(self.model.config, "max_position_embeddings", None)
        # A prompt leaves room for the answer, and with a budget the reasoning and its close.
        window = reasoning_window(config.max_new_tokens, self.reasoning, self.tokenizer)
        self.renderer = Renderer(
            self.tokenizer, window, limit_len, self.reasoning.chat_template_args
        )
        self.format = detect_format(self.tokenizer, self.reasoning)
        # Fused: one kernel over all parameters (TRL's default through transformers, too).
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(),
            lr=config.lr,
            weight_decay=config.weight_decay,
            fused=self.model.device.type in ("cpu", "cuda"),
        )
        allocate_adam_state(self.optimizer)
        if self.model.device.type == "cpu":
            keep_freed_memory()  # vocabulary-wide logits each chunk (flipsearch/cpu_kernels.py)
        self.scheduler = _schedule(self.optimizer, config)
        self.rng = random.Random(config.seed)
        self.step = 0
        self.eos = self.tokenizer.eos_token_id

    # -- data --------------------------------------------------------------------------------
    def sample_prompts(self) -> list[tuple[Prompt, Context | None]]:
        batch: list[tuple[Prompt, Context | None]] = []
        for _ in range(self.config.batch_size):
            if self.rng.random() < self.config.harmful_fraction or not self.benign:
                batch.append((self.rng.choice(self.harmful), self.context))
            else:
                batch.append((self.rng.choice(self.benign), self.benign_context))
        return batch

    def rollouts(self, batch: list[tuple[Prompt, Context | None]], micro: int) -> list[Example]:
        """Student samples on plain prompts (on-policy) or teacher samples with the context."""
        student_texts = [self.renderer.render(p.text) for p, _ in batch]
        teacher_texts = [self.renderer.render(p.text, c) for p, c in batch]
        offpolicy = self.config.mode == "offpolicy"
        source = LoadedModel(
            self.teacher if offpolicy else self.model, self.tokenizer, self.loaded.name, "train"
        )
        decoding = Decoding(
            self.config.max_new_tokens,
            self.config.temperature,
            self.config.top_p,
            1,
            seed=self.config.seed * 7919 + self.step * 31 + micro,
        )
        self.model.eval()
        generated = self._sample(source, teacher_texts if offpolicy else student_texts, decoding)
        self.model.train()
        encode = lambda text: self.tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        examples = []
        for s_text, t_text, generation in zip(student_texts, teacher_texts, generated, strict=True):
            response = list(generation.token_ids)
            thought = reasoning_token_count(self.tokenizer, response, self.format)
            stop = generation.stop_token if generation.stop_token is not None else self.eos
            if generation.finish_reason == "stop" and stop is not None:
                response.append(stop)  # learning when to stop (with the token it chose) too
            if response:
                examples.append(Example(encode(s_text), encode(t_text), response, thought))
        return examples

    def _sample(
        self, source: LoadedModel, texts: Sequence[str], decoding: Decoding
    ) -> list[Generation]:
        """One rollout per text. Dynamic batching, seeded per batch: a prompt drawn twice into
        one batch gets two different samples (per-prompt seeds would give it the same one
        twice). With a thinking budget the rows are budget-forced, each with its own seed."""
        with packed_linears(source.model, rows=len(texts)):
            return self._generate(
                HFGenerator(source, len(texts), batch_invariant=False), texts, decoding
            )

    def _generate(
        self, rollout: HFGenerator, texts: Sequence[str], decoding: Decoding
    ) -> list[Generation]:
        budget = self.reasoning.max_thinking_tokens
        if budget is not None:
            forced = BudgetForcedGenerator(rollout, self.tokenizer, self.format, budget)
            rows = [
                list(ids)
                for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
            ]
            seeds = [decoding.seed * 1_000_003 + i for i in range(len(rows))]
            return forced.force(rows, decoding, seeds)
        generated: list[Any] = [None] * len(texts)
        for indices, results in rollout.generate_batches(texts, decoding):
            for i, samples in zip(indices, results, strict=True):
                generated[i] = samples[0]
        return generated

    # -- one optimisation step ---------------------------------------------------------------
    def train_step(self) -> dict[str, Any]:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        sums = {"loss": 0.0, "tokens": 0}
        tally = _Tally()
        for micro in range(self.config.grad_accum):
            examples = self.rollouts(self.sample_prompts(), micro)
            if not examples:
                continue
            scale = 1.0 / self.config.grad_accum
            if self.config.mode == "offpolicy":
                result = sft_loss(self.model, examples, self.pad_id, self.autocast, scale)
            else:
                result = distillation_loss(
                    self.model,
                    self.teacher,
                    examples,
                    self.config,
                    self.pad_id,
                    self.autocast,
                    scale,
                )
            sums["loss"] += result["loss"] * scale
            sums["tokens"] += result["tokens"]
            tally.add(result["kl"], examples)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), self.config.max_grad_norm
        )
        self.optimizer.step()
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - started
        # On-policy the per-token signal is the reverse KL to the teacher; off-policy it is
        # the NLL of the teacher's tokens, and is named so.
        signal = "nll" if self.config.mode == "offpolicy" else "kl"
        return {
            "step": self.step,
            "loss": sums["loss"],
            **tally.metrics(signal),
            "grad_norm": float(grad_norm),
            "lr": lr,
            "tokens": sums["tokens"],
            "tokens_per_s": sums["tokens"] / seconds,
            "seconds": seconds,
        }

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write into a staging folder, then swap it in: a kill at any moment leaves one whole
        checkpoint (``checkpoint``, or ``checkpoint.old`` during the swap)."""
        import shutil

        target = self.out / "checkpoint"
        staging = self.out / "checkpoint.tmp"
        previous = self.out / "checkpoint.old"
        if staging.exists():
            shutil.rmtree(staging)
        self.model.save_pretrained(staging)
        self.tokenizer.save_pretrained(staging)
        torch.save(
            {
                "step": self.step,
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "python_rng": [*self.rng.getstate()[1], self.rng.getstate()[0]],
                "torch_rng": torch.get_rng_state(),
                "config": asdict(self.config),
            },
            staging / "trainer_state.pt",
        )
        if previous.exists():
            shutil.rmtree(previous)
        if target.exists():
            target.replace(previous)
        staging.replace(target)
        shutil.rmtree(previous, ignore_errors=True)
        return target

    def load_checkpoint(self) -> bool:
        target = self.out / "checkpoint"
        if not (target / "trainer_state.pt").is_file():
            target = self.out / "checkpoint.old"  # killed mid-swap: the previous one is whole
        if not (target / "trainer_state.pt").is_file():
            return False
        from safetensors.torch import load_file

        weights = load_file(str(target / "model.safetensors"))
        self.model.load_state_dict(weights, strict=False)  # tied weights are stored once
        state = torch.load(target / "trainer_state.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["python_rng"]
        self.rng.setstate((rng[-1], tuple(rng[:-1]), None))
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])
        return True


# ---------------------------------------------------------------------------------------------
# Driver: evaluate, train, checkpoint, evaluate again


@dataclass
class TrainResult:
    """What ``train`` produced: the before/after evaluation and the trained student."""

    out: Path
    summary: dict[str, Any]  # train_summary.json: before, after, steps, mode, context
    student: LoadedModel  # the trained weights, in memory (also saved in out/final)

    def to_dict(self) -> dict[str, Any]:
        return {"out": str(self.out), **self.summary}

    def to_pandas(self) -> Any:
        """One row per metric, before and after, each rate with its count and 95% interval, the
        paired p-value and its test; last the reference solutions' log-likelihood (mean, 95%
        t-interval, n; Wilcoxon signed-rank), when both evaluations measured it."""
        import pandas as pd

        from flipsearch.fliprate import Rate

        rows = []
        for key in ("unsafe_rate", "benign_refusal", "reasoning_accuracy"):
            row: dict[str, Any] = {"metric": key}
            for when in ("before", "after"):
                measured = self.summary[when][key]
                row.update(Rate.of(measured["successes"], measured["n"]).columns(when))
            paired = self.summary.get("paired", {}).get(key, {})
            row["p_value"] = paired.get("p_value")
            # A summary written before tests were named used exact McNemar for every rate.
            row["test"] = paired.get("test", "mcnemar-exact") if paired else None
            rows.append(row)
        rows.append(
            {
                "metric": "benign_kl_from_original",
                "before": self.summary["before"]["benign_kl_from_original"],
                "after": self.summary["after"]["benign_kl_from_original"],
            }
        )
        logliks = [self.summary[when].get("reference_loglik") for when in ("before", "after")]
        if all(isinstance(part, dict) for part in logliks):
            row = {"metric": "reference_loglik"}
            for when, part in zip(("before", "after"), logliks, strict=True):
                row[when] = part["mean"]
                row.update({f"{when}_{k}": part[k] for k in ("low", "high", "n")})
            paired = self.summary.get("paired", {}).get("reference_loglik", {})
            row.update(p_value=paired.get("p_value"), test=paired.get("test"))
            rows.append(row)
        return pd.DataFrame(rows)

    def metrics(self) -> Any:
        """The per-step training metrics (``metrics.jsonl``) as a DataFrame."""
        import pandas as pd

        return pd.read_json(self.out / "metrics.jsonl", lines=True)


def train(
    config: TrainConfig,
    resume: bool = False,
    loaded: LoadedModel | None = None,
    console: Any = None,
) -> TrainResult:
    """Train with OPSA (or the off-policy baseline) and evaluate before and after.

    Writes ``metrics.jsonl`` (one line per step), ``checkpoint/`` (every
    ``checkpoint_every`` steps and at the end), ``final/`` (the trained weights) and
    ``train_summary.json`` (the before/after evaluation). With ``resume``, a killed run
    continues from its last checkpoint and reaches the same weights as an uninterrupted one.
    ``loaded`` trains a model you already hold, in place, instead of loading ``config.model``
    (the frozen teacher is the one copy OPSA needs). Returns a ``TrainResult``: ``.summary``,
    ``.to_pandas()`` (before/after with counts and 95% intervals), ``.metrics()`` (per step)
    and ``.student`` (the trained model, with a fingerprint of its new weights).
    """
    from rich.console import Console

    from flipsearch.train_eval import (
        EVALUATION_SPLIT,
        evaluate_student,
        paired_before_after,
        split_for_training,
    )

    console = console or Console(stderr=True)
    trainer = Trainer(config, loaded)
    out = trainer.out
    bind_training(out / "train_config.json", asdict(config), resume)
    trainer.harmful, holdout = split_for_training(trainer.harmful, config.seed)
    trainer.benign, benign_holdout = split_for_training(trainer.benign, config.seed)
    reasoning = stratified_subset(trainer.session.reasoning, config.eval_limit, config.seed)
    evaluation = {  # seeded, category-stratified parts (not the first rows of a file)
        "harmful": stratified_subset(holdout, config.eval_limit, config.seed),
        "benign": stratified_subset(benign_holdout, config.eval_limit, config.seed),
        "reasoning": reasoning,
    }
    summary_path = out / "train_summary.json"
    summary: dict[str, Any] = (
        json.loads(summary_path.read_text()) if resume and summary_path.is_file() else {}
    )
    if resume and not trainer.load_checkpoint():
        console.print("no checkpoint to resume from; starting from step 0")
    truncate_metrics(out / "metrics.jsonl", trainer.step)
    if "before" not in summary:
        with status(console, "evaluating the student before training"):
            summary["before"] = evaluate_student(
                trainer.loaded, trainer.teacher, evaluation, config.max_new_tokens, trainer.session
            )
        summary_path.write_text(json.dumps(summary, indent=2))
    with make_progress(console) as progress:
        task = progress.add_task(
            f"{config.mode} training", total=config.steps, completed=trainer.step
        )

        def show(record: dict[str, Any]) -> None:
            loss = f"{config.mode} loss {record['loss']:.4f}"
            progress.update(task, completed=trainer.step, description=loss)

        run_steps(trainer, show)
    trainer.model.save_pretrained(out / "final")
    trainer.tokenizer.save_pretrained(out / "final")
    with status(console, "evaluating the student after training"):
        summary["after"] = evaluate_student(
            trainer.loaded, trainer.teacher, evaluation, config.max_new_tokens, trainer.session
        )
    summary.update(
        steps=trainer.step,
        mode=config.mode,
        context=trainer.context.to_dict(),
        paired=paired_before_after(summary["before"], summary["after"]),
        evaluation_split=f"held out from training ({EVALUATION_SPLIT}), seed {config.seed}",
    )
    summary_path.write_text(json.dumps(summary, indent=2))
    trainer.model.eval()
    # A fresh fingerprint: cached generations of the original weights must not be reused.
    student = LoadedModel.from_objects(
        trainer.model, trainer.tokenizer, name=f"{trainer.loaded.name}+{config.mode}"
    )
    return TrainResult(out, summary, student)


def run_steps(trainer: Trainer, on_step: Callable[[dict[str, Any]], None] | None = None) -> None:
    """Step ``trainer`` to ``config.steps``: each step's record appended to ``metrics.jsonl``,
    a checkpoint every ``checkpoint_every`` steps and after the last (``train`` and
    ``validate`` both train through here)."""
    config = trainer.config
    metrics_path = trainer.out / "metrics.jsonl"
    while trainer.step < config.steps:
        record = trainer.train_step()
        with metrics_path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        if on_step is not None:
            on_step(record)
        if trainer.step % config.checkpoint_every == 0 or trainer.step == config.steps:
            trainer.save_checkpoint()


def bind_training(path: Path, settings: dict[str, Any], resume: bool) -> None:
    """A resumed training must continue the one its checkpoint came from: the same settings,
    except ``steps`` (a longer run may continue a shorter one) and ``device`` (a checkpoint
    continues on another GPU)."""
    if resume and path.is_file():
        try:
            before = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FlipsearchError(f"{path}: damaged ({exc}); train into another --out") from exc
        differences = [
            f"{key}: {before.get(key)!r} then, {value!r} now"
            for key, value in settings.items()
            if key not in ("steps", "device") and key in before and before[key] != value
        ]
        if differences:
            raise FlipsearchError(
                f"{path.parent} holds a training with other settings ({'; '.join(differences)}); "
                "resume it with those settings, or give another --out"
            )
    write_atomic(path, json.dumps(settings, indent=2))


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines past the checkpoint a resumed run restarts from."""
    if not path.is_file():
        return
    kept = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in kept))
