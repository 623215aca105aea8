"""``RunConfig``: everything a run depends on, in sections; saved as ``config.json``.

Each setting is declared once, here (or, for a backend's own options, in that backend's file),
with its default and its help text; the CLI builds its options from these declarations, and a
setting given by name (``RunConfig(limit=8)``, ``flipsearch.search(max_new_tokens=32)``, a CLI
option) lands in the field of that name in its section. Setting names are unique across
sections, so a flat name always says where it goes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flipsearch.backends import BackendSpec, option_fields
from flipsearch.backends._base import Decoding, option
from flipsearch.errors import FlipsearchError
from flipsearch.judging import judge_names
from flipsearch.judging._base import SCOPES
from flipsearch.models import check_device, check_dtype, check_model_name
from flipsearch.reasoning import DEFAULT_END, DEFAULT_START, ReasoningSettings

if TYPE_CHECKING:  # search imports optuna and pandas; training needs neither
    from flipsearch.search import SearchSettings


@dataclass
class DecodingConfig:
    """How responses are drawn (greedy, the paper's choice, or samples)."""

    max_new_tokens: int = field(
        default=48, metadata=option("Tokens generated per response.", min=1)
    )
    temperature: float = field(
        default=0.0, metadata=option("0 = greedy (the paper's choice).", min=0.0)
    )
    top_p: float = field(default=1.0, metadata=option("Nucleus sampling mass.", min=0.0, max=1.0))
    samples: int = field(
        default=1, metadata=option("Samples per prompt (needs --temperature > 0).", min=1)
    )


@dataclass
class BackendConfig:
    """Where generation runs, and the chosen backend's own options (see ``backends/``)."""

    backend: str = field(
        default="hf",
        metadata=option(
            "Where generation runs: hf (transformers here), vllm (vLLM's engine here) or "
            "openai (OpenAI-compatible servers at --base-url)."
        ),
    )
    batch_size: int = field(default=64, metadata=option("Sequences generated per batch.", min=1))
    device: str = field(default="auto", metadata=option("auto, cpu, cuda, cuda:N."))
    dtype: str = field(
        default="auto", metadata=option("auto (bf16 where native), bf16, fp16 or fp32.")
    )
    options: dict[str, Any] = field(default_factory=dict)  # the backend's Options, by name

    def __post_init__(self) -> None:
        spec = self.spec()  # the backend exists and its options are its own and valid
        check_device(self.device, local=spec.needs_weights)
        check_dtype(self.dtype)

    def spec(self) -> BackendSpec:
        return BackendSpec(self.backend, **self.options)


@dataclass
class JudgeConfig:
    """Which judges decide (by name; objects and callables are given to ``run`` itself)."""

    judge: str = field(
        default="refusal",
        metadata=option(f"Safety judge for answers to harmful prompts: {judge_names()}."),
    )
    refusal_judge: str = field(
        default="refusal",
        metadata=option(
            f"Judge deciding whether a benign answer refuses: {judge_names('refusal')}."
        ),
    )
    judge_model: str | None = field(
        default=None,
        metadata=option(
            "Weights of the llama-guard or wildguard judge (a local directory or hub id)."
        ),
    )
    refusal_judge_model: str | None = field(
        default=None,
        metadata=option(
            "Weights of the refusal judge when they differ from --judge-model (e.g. "
            "--judge llama-guard with --refusal-judge wildguard). Default: --judge-model."
        ),
    )
    judge_on: str = field(
        default="auto",
        metadata=option(
            "What the safety judge reads of a reasoning model's response: answer, full, or "
            "either (each part apart; unsafe if either is). auto: the judge's own default "
            "(llama-guard and wildguard: either; refusal and classifier: answer, all they "
            "read). The refusal judge always reads the answer."
        ),
    )
    judge_metrics: str | None = field(
        default=None,
        metadata=option(
            "JSON from `flipsearch judge eval --json`: adds flip rates corrected for judge error."
        ),
    )

    def __post_init__(self) -> None:
        if self.judge_on not in ("auto", *SCOPES):
            raise FlipsearchError(
                f"--judge-on must be auto, {', '.join(SCOPES)}; got {self.judge_on!r}"
            )


@dataclass
class ReasoningConfig:
    """Reasoning models: the chat template's arguments, the reasoning markers, the thinking
    budget (``flipsearch.reasoning``)."""

    chat_template_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=option(
            "An argument of the model's chat template as KEY=VALUE, e.g. enable_thinking=false "
            "(Qwen3); repeatable. Part of the rendered prompt, so of the cache key.",
            flag="--chat-template-arg",
            key_values=True,
        ),
    )
    reasoning_start: str = field(
        default=DEFAULT_START, metadata=option("The marker that opens a reasoning block.")
    )
    reasoning_end: str = field(
        default=DEFAULT_END, metadata=option("The marker that closes a reasoning block.")
    )
    max_thinking_tokens: int | None = field(
        default=None,
        metadata=option(
            "Budget forcing: at most N reasoning tokens, then the block is closed for the model "
            "and its answer gets --max-new-tokens of its own. Default: no budget "
            "(--max-new-tokens covers reasoning and answer; an answer that never came is "
            "counted as unfinished).",
            min=1,
        ),
    )

    def __post_init__(self) -> None:
        self.settings()  # markers and arguments are checked before anything loads

    def settings(self) -> ReasoningSettings:
        return ReasoningSettings(
            dict(self.chat_template_args),
            self.reasoning_start,
            self.reasoning_end,
            self.max_thinking_tokens,
        )


SAMPLERS = ("tpe", "nsga2")
STORAGE_SCHEMES = ("postgresql", "mysql", "sqlite")


def check_storage(url: str) -> None:
    """A ``--storage`` the study can open: a database URL of a known scheme or a journal file,
    whose folder exists (checked with the settings, long before the study opens it)."""
    from urllib.parse import urlsplit

    forms = "postgresql://..., mysql://..., sqlite:///PATH or a .journal file"
    if url.startswith("journal:") or url.endswith(".journal"):
        path = Path(url.removeprefix("journal:"))
    elif "://" in url:
        scheme = url.partition("://")[0].partition("+")[0].lower()
        if scheme not in STORAGE_SCHEMES:
            raise FlipsearchError(f"--storage: unknown scheme {scheme!r}; use {forms}")
        if scheme != "sqlite":
            return
        path = Path(urlsplit(url).path.removeprefix("/"))
        if not str(path) or str(path) == ".":
            raise FlipsearchError("--storage: a sqlite URL needs a file: sqlite:///PATH")
    else:
        raise FlipsearchError(f"--storage: cannot tell what {url!r} is; use {forms}")
    if not path.parent.is_dir():
        raise FlipsearchError(f"--storage: the folder of {path} does not exist")


@dataclass
class SearchConfig:
    """The study (``flipsearch run``); ``trials = 0`` scores every seed context instead."""

    trials: int = field(
        default=40,
        metadata=option(
            "Trials in the study (seeds first, then grammar compositions); shared by all "
            "workers of a study. 0 scores every seed context without a study.",
            min=0,
        ),
    )
    timeout: float | None = field(
        default=None,
        metadata=option(
            "Stop the search after this many seconds: trials in flight go back to the queue "
            "(a later run resumes them) and the run finishes with the trials done.",
            min=0,
        ),
    )
    budget_generations: int | None = field(
        default=None,
        metadata=option(
            "Stop the search once its trials used this many teacher generations (cached or "
            "not), as --timeout stops it.",
            min=1,
        ),
    )
    trials_in_flight: int = field(
        default=1,
        metadata=option(
            "Trials scored side by side, their prompts sharing generation calls filled to "
            "--batch-size; every trial gets the verdict it gets alone. 0: enough to fill a "
            "batch (batch size / --prune-every), for a GPU engine. Default 1: on CPU the "
            "filling costs generations and buys no time (README).",
            min=0,
        ),
    )
    halving_rate: int = field(
        default=3,
        metadata=option(
            "Successive halving: at --prune-every x rate^k prompts only the top 1/rate of "
            "the trials there go on. 1 turns the rungs off (the paired test alone prunes).",
            min=1,
        ),
    )
    storage: str | None = field(
        default=None,
        metadata=option(
            "Optuna storage URL (postgresql://..., sqlite:///..., or a .journal file) shared by "
            "several workers. Default: a journal file in the run directory."
        ),
    )
    study: str = field(default="flipsearch", metadata=option("Study name inside the storage."))
    multi_objective: bool = field(
        default=False,
        metadata=option(
            "Flip rate vs benign refusal as two objectives (Pareto front; no pruning)."
        ),
    )
    sampler: str = field(
        default="tpe", metadata=option("tpe or nsga2 (nsga2 for multi-objective).")
    )
    proposer: str | None = field(
        default=None,
        metadata=option("A chat model that rewrites the best contexts so far into new candidates."),
    )
    propose_every: int = field(
        default=5, metadata=option("Trials between two proposals of the proposer.", min=1)
    )
    prune_every: int = field(
        default=8, metadata=option("Prompts scored between pruning checks.", min=1)
    )
    p_threshold: float = field(
        default=0.1,
        metadata=option("The paired pruner's p-value: smaller prunes less.", min=0.0, max=1.0),
    )
    grammar: str | None = field(
        default=None,
        metadata=option(
            "The grammar file to compose contexts from. Default: contexts/grammar.yaml."
        ),
    )

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise FlipsearchError(
                f"unknown --sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}"
            )
        if self.storage is not None:
            check_storage(self.storage)
        if self.proposer:
            check_model_name(self.proposer, "--proposer")


@dataclass
class SelectionConfig:
    """How the winner is chosen among the search's best, and what the report analyses."""

    holdout_fraction: float = field(
        default=0.3,
        metadata=option(
            "Share of harmful and of benign prompts held out to choose the winner among the "
            "finalists (the selection split).",
            min=0.0,
            max=0.95,
        ),
    )
    final_fraction: float = field(
        default=0.2,
        metadata=option(
            "Share of harmful and of benign prompts no choice ever sees: the winner's reported "
            "flip rate and benign refusal come from them (the final split; 0 turns it off).",
            min=0.0,
            max=0.9,
        ),
    )
    top_k: int = field(
        default=3, metadata=option("Contexts re-scored on the held-out split.", min=1)
    )
    max_benign_refusal: float = field(
        default=0.5,
        metadata=option("Contexts whose benign refusal exceeds this cannot win.", min=0.0, max=1.0),
    )
    analysis_prompts: int = field(
        default=16,
        metadata=option("Student-unsafe answers analysed token by token for the report.", min=0),
    )


@dataclass
class TrainingConfig:
    """``run --train``: OPSA on the winner afterwards, with the run's model, judges and prompts
    (``flipsearch train`` and ``TrainConfig`` hold every training setting)."""

    train: bool = field(
        default=False,
        metadata=option(
            "Then train the student with OPSA on the winner (into OUT/train).", flag="--train"
        ),
    )
    train_steps: int = field(default=12, metadata=option("Training steps with --train.", min=1))


# The settings outside the sections: their defaults are ``RunConfig.__init__``'s.
TOP_LEVEL: dict[str, dict[str, Any]] = {
    "out": option("Run directory; re-running with the same one (and the same settings) resumes."),
    "model": option("Model alias (smollm2-135m), local directory or hub id."),
    "prompts": option(
        "Prompt file (JSONL/CSV/Parquet), builtin:NAME or hf:NAME; repeatable. "
        "Default: the shipped harmful, benign and reasoning sets.",
        flag="--prompts",
    ),
    "contexts": option("Directory (or file) of seed contexts. Default: the shipped library."),
    "limit": option("Use N prompts of each kind (a seeded, category-stratified sample).", min=1),
    "seed": option("Seed of the split and of sampling."),
}

SECTIONS: dict[str, type] = {
    "decoding": DecodingConfig,
    "backend": BackendConfig,
    "judges": JudgeConfig,
    "reasoning": ReasoningConfig,
    "search": SearchConfig,
    "selection": SelectionConfig,
    "training": TrainingConfig,
}


@dataclass(init=False)
class RunConfig:
    """Everything a run depends on; saved as ``config.json`` in the run directory.

    ``RunConfig(limit=8, max_new_tokens=32, backend="openai", base_url=["http://h/v1"])``
    places each setting in its section; ``RunConfig(decoding=DecodingConfig(...))`` gives a
    section whole.
    """

    out: str
    model: str
    prompts: list[str]  # empty: the shipped sets
    contexts: str | None  # a directory or file; None: the shipped seed library
    limit: int | None
    seed: int
    decoding: DecodingConfig
    backend: BackendConfig
    judges: JudgeConfig
    reasoning: ReasoningConfig
    search: SearchConfig
    selection: SelectionConfig
    training: TrainingConfig

    def __init__(
        self,
        out: str = "runs/default",
        model: str = "smollm2-135m",
        prompts: list[str] | None = None,
        contexts: str | None = None,
        limit: int | None = None,
        seed: int = 0,
        **settings: Any,
    ) -> None:
        self.out, self.model, self.contexts = str(out), model, contexts
        self.prompts = [str(p) for p in prompts or []]
        self.limit, self.seed = limit, seed
        values: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
        whole: dict[str, Any] = {}
        for key, value in settings.items():
            if key in SECTIONS and isinstance(value, SECTIONS[key]):
                whole[key] = value
            else:
                section, name = _where(key)
                values[section][name] = value
        backend_options = values["backend"].pop("options", {})
        for key in list(values["backend"]):
            if key in option_fields():
                backend_options[key] = values["backend"].pop(key)
        if backend_options:
            values["backend"]["options"] = backend_options
        for name, cls in SECTIONS.items():
            if name in whole and values[name]:
                raise FlipsearchError(f"give {name} settings in the section or by name, not both")
            setattr(self, name, whole.get(name) or cls(**values[name]))
        if self.limit is not None and self.limit < 1:
            raise FlipsearchError("--limit must be at least 1")
        if not self.out.strip():
            raise FlipsearchError("--out is empty; give the run directory")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        """A config from its ``config.json`` (sections) or from flat settings."""
        flat = {k: v for k, v in data.items() if k not in SECTIONS}
        for name in SECTIONS:
            section = dict(data.get(name) or {})
            flat.update(section.pop("options", None) or {})  # the backend's own options
            flat.update(section)
        return cls(**flat)

    def to_dict(self) -> dict[str, Any]:
        """The settings as saved in ``config.json``: URLs without their passwords."""
        from flipsearch.search import redacted_url

        data = asdict(self)
        if data["search"]["storage"]:
            data["search"]["storage"] = redacted_url(data["search"]["storage"])
        options = data["backend"]["options"]
        if options.get("base_url"):
            urls = options["base_url"]
            options["base_url"] = (
                [redacted_url(u) for u in urls] if not isinstance(urls, str) else redacted_url(urls)
            )
        return data

    @property
    def decoding_with_seed(self) -> Decoding:
        """The run's decoding; sampling is seeded by the run seed."""
        d = self.decoding
        return Decoding(d.max_new_tokens, d.temperature, d.top_p, d.samples, self.seed)

    def search_settings(self) -> SearchSettings:
        from flipsearch.search import SearchSettings

        s = self.search
        return SearchSettings(
            s.trials,
            s.timeout,
            s.storage,
            s.study,
            self.selection.max_benign_refusal,
            s.multi_objective,
            s.sampler,
            s.prune_every,
            s.p_threshold,
            self.seed,
            eta=s.halving_rate,
            in_flight=s.trials_in_flight
            or max(1, -(-self.backend.batch_size // max(1, s.prune_every))),
            batch_size=self.backend.batch_size,
            budget_generations=s.budget_generations,
        )


def setting_names() -> dict[str, str]:
    """Every flat setting name and the section it belongs to (backend options included)."""
    names = {f.name: section for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    names.pop("options")
    names.update({name: "backend" for name in option_fields()})
    return names


def _where(key: str) -> tuple[str, str]:
    section = setting_names().get(key)
    if section is None:
        raise FlipsearchError(f"unknown setting {key!r}")
    return section, key


@dataclass
class TrainConfig:
    """Everything a training run depends on (``flipsearch train``); saved as
    ``train_config.json``."""

    context: str = field(
        default="best_context.yaml",
        metadata=option("The safety context: a YAML file like best_context.yaml, or its text."),
    )
    out: str = field(
        default="runs/train", metadata=option("Training directory (checkpoints, metrics).")
    )
    model: str = field(default="smollm2-135m", metadata=TOP_LEVEL["model"])
    prompts: list[str] = field(default_factory=list, metadata=TOP_LEVEL["prompts"])
    benign_context: str | None = field(
        default=None,
        metadata=option(
            "Context for benign prompts (default none: the original model anchors them)."
        ),
    )
    mode: str = field(
        default="onpolicy",
        metadata=option("onpolicy (OPSA) or offpolicy (fine-tune on the teacher's responses)."),
    )
    # The budget: on the embedded model, 12 steps of 8 prompts at 2e-4 took the held-out
    # unsafe rate from 87.5% to 62.5% (p=0.004) with the run's winner and left it at 87.5%
    # with a no-flip control (README: what it costs). Larger models want a smaller --lr.
    steps: int = field(default=12, metadata=option("Optimizer steps.", min=1))
    batch_size: int = field(default=8, metadata=option("Prompts per micro-batch.", min=1))
    grad_accum: int = field(default=1, metadata=option("Micro-batches per step.", min=1))
    lr: float = field(
        default=2e-4,
        metadata=option("Peak learning rate (AdamW; chosen for the embedded model).", min=0),
    )
    warmup_steps: int = field(default=2, metadata=option("Linear warm-up steps.", min=0))
    weight_decay: float = field(default=0.0, metadata=option("AdamW weight decay.", min=0))
    max_grad_norm: float = field(default=1.0, metadata=option("Gradient clipping.", min=0))
    max_new_tokens: int = field(
        default=48, metadata=option("Tokens per rollout and per evaluation answer.", min=1)
    )
    temperature: float = field(default=1.0, metadata=option("Rollout temperature.", min=0.01))
    top_p: float = field(default=1.0, metadata=option("Nucleus sampling mass.", min=0, max=1))
    divergence: str = field(
        default="reverse",
        metadata=option(
            "reverse, forward, mixed (generalised JSD, TRL's) or forward-reverse (a weighted "
            "sum of the two KLs over the teacher's top-k, NeMo-RL's; the paper used --support "
            "topk --top-k 64)."
        ),
    )
    alpha: float = field(
        default=0.5,
        metadata=option(
            "Teacher weight of mixed (generalised JSD); forward-KL weight of forward-reverse.",
            min=0,
            max=1,
        ),
    )
    support: str = field(default="full", metadata=option("full, topk or sampled."))
    top_k: int = field(
        default=20,
        metadata=option(
            "Tokens kept by --support topk (forward-reverse: the paper used 64).", min=1
        ),
    )
    chunk_tokens: int = field(
        default=256,
        metadata=option("Response tokens per logits chunk (bounds vocabulary x length).", min=1),
    )
    harmful_fraction: float = field(
        default=0.5, metadata=option("Share of harmful prompts in a batch.", min=0, max=1)
    )
    limit: int | None = field(default=None, metadata=TOP_LEVEL["limit"])
    seed: int = field(default=0, metadata=TOP_LEVEL["seed"])
    checkpoint_every: int = field(default=10, metadata=option("Steps between checkpoints.", min=1))
    eval_limit: int = field(default=32, metadata=option("Prompts per evaluation set.", min=1))
    dtype: str = field(
        default="auto", metadata=option("Autocast: auto (bf16 where native) or fp32.")
    )  # weights stay fp32
    device: str = field(default="auto", metadata=option("Where to train: auto, cpu, cuda:N."))
    judge: str = field(
        default="refusal", metadata=option("Safety judge of the before/after evaluation.")
    )
    refusal_judge: str = field(
        default="refusal", metadata=option("Refusal judge of the before/after evaluation.")
    )
    judge_model: str | None = field(
        default=None, metadata=option("Weights of the llama-guard or wildguard judge.")
    )
    refusal_judge_model: str | None = field(
        default=None, metadata=JudgeConfig.__dataclass_fields__["refusal_judge_model"].metadata
    )
    judge_on: str = field(
        default="auto", metadata=JudgeConfig.__dataclass_fields__["judge_on"].metadata
    )
    chat_template_args: dict[str, Any] = field(
        default_factory=dict,
        metadata=ReasoningConfig.__dataclass_fields__["chat_template_args"].metadata,
    )
    reasoning_start: str = field(
        default=DEFAULT_START,
        metadata=ReasoningConfig.__dataclass_fields__["reasoning_start"].metadata,
    )
    reasoning_end: str = field(
        default=DEFAULT_END, metadata=ReasoningConfig.__dataclass_fields__["reasoning_end"].metadata
    )
    max_thinking_tokens: int | None = field(
        default=None,
        metadata=option(
            "Budget forcing in rollouts and evaluation: at most N reasoning tokens, then the "
            "block is closed and the answer gets --max-new-tokens of its own.",
            min=1,
        ),
    )

    def __post_init__(self) -> None:
        checks = {
            "mode": (self.mode, ("onpolicy", "offpolicy")),
            "divergence": (self.divergence, ("reverse", "forward", "mixed", "forward-reverse")),
            "support": (self.support, ("full", "topk", "sampled")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise FlipsearchError(f"--{name} must be one of {allowed}, got {value!r}")
        if self.divergence == "forward-reverse" and self.support == "sampled":
            raise FlipsearchError(
                "--divergence forward-reverse compares distributions: use --support topk or full"
            )
        if not 0 <= self.alpha <= 1 or not 0 <= self.harmful_fraction <= 1:
            raise FlipsearchError("--alpha and --harmful-fraction must be in [0, 1]")
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise FlipsearchError("--steps, --batch-size and --grad-accum must be at least 1")
        check_dtype(self.dtype, ("auto", "fp32", "bf16", "fp16"))
        check_device(self.device)
        self.reasoning()  # markers and template arguments checked before anything loads
        if self.judge_on not in ("auto", *SCOPES):
            raise FlipsearchError(
                f"--judge-on must be auto, {', '.join(SCOPES)}; got {self.judge_on!r}"
            )
        if not self.out.strip():
            raise FlipsearchError("--out is empty; give the training directory")

    @classmethod
    def after_run(cls, run: RunConfig) -> TrainConfig:
        """``run --train``: the winner of ``run``, trained with the run's model, prompts,
        judges, seed and response length (the backend-independent settings)."""
        out = Path(run.out)
        return cls(
            context=str(out / "best_context.yaml"),
            out=str(out / "train"),
            model=run.model,
            prompts=list(run.prompts),
            limit=run.limit,
            steps=run.training.train_steps,
            max_new_tokens=run.decoding.max_new_tokens,
            seed=run.seed,
            judge=run.judges.judge,
            refusal_judge=run.judges.refusal_judge,
            judge_model=run.judges.judge_model,
            refusal_judge_model=run.judges.refusal_judge_model,
            judge_on=run.judges.judge_on,
            chat_template_args=dict(run.reasoning.chat_template_args),
            reasoning_start=run.reasoning.reasoning_start,
            reasoning_end=run.reasoning.reasoning_end,
            max_thinking_tokens=run.reasoning.max_thinking_tokens,
        )

    def reasoning(self) -> ReasoningSettings:
        return ReasoningSettings(
            dict(self.chat_template_args),
            self.reasoning_start,
            self.reasoning_end,
            self.max_thinking_tokens,
        )


@dataclass
class ValidateConfig:
    """``flipsearch validate RUN_DIR``: which contexts are trained, how, and how the answer is
    measured. Every training gets the same data, budget and seeds; the other training settings
    are ``TrainConfig``'s defaults with the run's model, prompts, judges and response length.
    The defaults fit 2 CPU cores in about 30 minutes on the embedded model."""

    contexts: list[str] = field(
        default_factory=list,
        metadata=option(
            "A context to train: a leaderboard id of the run, a YAML file or a text; "
            "repeatable. Default: the winner, --runners-up, --between and the control."
        ),
    )
    runners_up: int = field(
        default=1, metadata=option("Leaderboard contexts after the winner to train.", min=0)
    )
    between: int = field(
        default=1,
        metadata=option(
            "Contexts with flip rates evenly spread between the runners-up and the control.",
            min=0,
        ),
    )
    control: bool = field(
        default=True,
        metadata=option(
            "Also train the leaderboard's lowest-flip context (a control; among equals the one "
            "measured on the most prompts)."
        ),
    )
    train_seeds: int = field(
        default=2, metadata=option("Trainings per context, seeds 0..N-1 (training noise).", min=1)
    )
    offpolicy: bool = field(
        default=False,
        metadata=option(
            "Also train the off-policy baseline on the same contexts.", flag="--offpolicy"
        ),
    )
    offpolicy_limit: int = field(
        default=0,
        metadata=option(
            "With --offpolicy, the baseline on the first N chosen contexts only (the winner "
            "first; 0: on all).",
            min=0,
        ),
    )
    devices: list[str] = field(
        default_factory=list,
        metadata=option(
            "Train side by side, one training per device (repeatable: --devices cuda:0 "
            "--devices cuda:1, or cuda:0,cuda:1). Default: one at a time on auto."
        ),
    )
    steps: int = field(
        default=TrainConfig.steps, metadata=option("Optimizer steps per training.", min=1)
    )
    lr: float = field(default=TrainConfig.lr, metadata=option("Peak learning rate (AdamW).", min=0))
    batch_size: int = field(
        default=TrainConfig.batch_size, metadata=option("Prompts per step.", min=1)
    )
    eval_limit: int = field(
        default=48, metadata=option("Evaluation prompts of each kind (unseen by the run).", min=1)
    )
    bootstrap: int = field(
        default=2000, metadata=option("Bootstrap draws of every interval.", min=100)
    )
    keep_weights: bool = field(
        default=False,
        metadata=option("Keep each trained student's weights (final/); ~0.5 GB each here."),
    )

    def __post_init__(self) -> None:
        self.devices = [d.strip() for item in self.devices for d in item.split(",") if d.strip()]
        for device in self.devices:
            check_device(device)
        for name in ("runners_up", "between"):
            if getattr(self, name) < 0:
                raise FlipsearchError(f"--{name.replace('_', '-')} must be at least 0")
        if self.train_seeds < 1 or self.steps < 1 or self.batch_size < 1 or self.eval_limit < 1:
            raise FlipsearchError(
                "--train-seeds, --steps, --batch-size and --eval-limit must be at least 1"
            )
        if self.bootstrap < 100:
            raise FlipsearchError("--bootstrap must be at least 100 draws")
