"""``Session``: the one place a run's parts are built and wired together.

A session holds the settings of a run, or objects the caller already has (a loaded model, a
judge callable, prompts), and builds each part the first time it is asked for: prompt sets,
judges, the model, the backend's generator and scorer, the generation cache and the
``Evaluator`` that scores contexts with all of them. ``run``, ``score``, ``flip_rate``,
``train``, ``export`` and the inspect integration all open one, so a setting means the same
thing on every path, and nothing is loaded that a path does not use (``export`` never loads
weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

from flipsearch.backends import BackendSpec, Generator, Scorer, make_backend
from flipsearch.backends._base import Decoding
from flipsearch.backends.cache import GenerationCache
from flipsearch.config import RunConfig
from flipsearch.errors import FlipsearchError
from flipsearch.evaluate import Evaluator
from flipsearch.judging import Judge, JudgeSpec, get_judge
from flipsearch.models import LoadedModel, check_model, load_model
from flipsearch.prompts import KINDS, Prompt, builtin_prompts, load_prompts, stratified_subset
from flipsearch.reasoning import ReasoningFormat, ReasoningSettings, detect_format, with_budget

PromptSource = Sequence[str | Path] | Sequence[Prompt] | str | Path | None


class Session:
    """One run's model, backend, judges, prompt sets and cache, built when first used."""

    def __init__(
        self,
        *,
        model: str | LoadedModel = "smollm2-135m",
        prompts: PromptSource = None,
        limit: int | None = None,
        seed: int = 0,
        decoding: Decoding | None = None,
        backend: BackendSpec | str = "hf",
        batch_size: int = 64,
        device: str = "auto",
        dtype: str = "auto",
        judge: JudgeSpec = "refusal",
        refusal_judge: JudgeSpec = "refusal",
        judge_model: str | None = None,
        refusal_judge_model: str | None = None,
        judge_on: str = "auto",
        reasoning: ReasoningSettings | None = None,
        cache: str | Path | GenerationCache | None = None,
        console: Any = None,
    ) -> None:
        self.model_spec = model
        self.prompt_source = prompts
        self.limit, self.seed = limit, seed
        self.decoding = decoding or Decoding()
        self.backend = BackendSpec(backend) if isinstance(backend, str) else backend
        self.batch_size, self.device, self.dtype = batch_size, device, dtype
        self.judge_specs = {"safety": judge, "refusal": refusal_judge}
        self.judge_model = judge_model
        # Each role's judge weights (the refusal judge's default to the safety judge's).
        self.judge_models = {"safety": judge_model, "refusal": refusal_judge_model or judge_model}
        self.judge_on = judge_on
        self.reasoning_settings = reasoning or ReasoningSettings()
        self._judges: dict[str, Judge] = {}
        self.cache_spec = cache
        self.console = console
        if limit is not None and limit < 1:
            raise FlipsearchError("--limit must be at least 1")

    @classmethod
    def from_config(
        cls,
        config: RunConfig,
        *,
        model: LoadedModel | None = None,
        judge: JudgeSpec | None = None,
        refusal_judge: JudgeSpec | None = None,
        console: Any = None,
    ) -> Session:
        """The session of a run directory: its settings, its cache, and any objects given."""
        return cls(
            model=model if model is not None else config.model,
            prompts=config.prompts,
            limit=config.limit,
            seed=config.seed,
            decoding=config.decoding_with_seed,
            backend=config.backend.spec(),
            batch_size=config.backend.batch_size,
            device=config.backend.device,
            dtype=config.backend.dtype,
            judge=judge if judge is not None else config.judges.judge,
            refusal_judge=refusal_judge
            if refusal_judge is not None
            else config.judges.refusal_judge,
            judge_model=config.judges.judge_model,
            refusal_judge_model=config.judges.refusal_judge_model,
            judge_on=config.judges.judge_on,
            reasoning=config.reasoning.settings(),
            cache=Path(config.out) / "generations.sqlite",
            console=console,
        )

    # -- prompts -------------------------------------------------------------------------------
    @cached_property
    def prompts(self) -> list[Prompt]:
        """Every prompt of the run: the sources (default: the shipped sets), ids unique across
        files, and with ``limit`` a seeded, category-stratified N of each kind."""
        prompts = _load(self.prompt_source)
        seen: dict[str, Prompt] = {}
        for prompt in prompts:
            if prompt.id in seen:
                first = seen[prompt.id].source or "another prompt file"
                raise FlipsearchError(
                    f"{prompt.source or 'a prompt file'}: prompt id {prompt.id!r} is also at "
                    f"{first} (ids must be unique across prompt files)"
                )
            seen[prompt.id] = prompt
        if self.limit is not None:
            limit, seed = self.limit, self.seed
            kept = {
                p.id
                for k in KINDS
                for p in stratified_subset(self.of_kind(k, prompts), limit, seed)
            }
            prompts = [p for p in prompts if p.id in kept]
        return prompts

    @staticmethod
    def of_kind(kind: str, prompts: Sequence[Prompt]) -> list[Prompt]:
        return [p for p in prompts if p.kind == kind]

    @property
    def harmful(self) -> list[Prompt]:
        return self.of_kind("harmful", self.prompts)

    @property
    def benign(self) -> list[Prompt]:
        return self.of_kind("benign", self.prompts)

    @property
    def reasoning(self) -> list[Prompt]:
        return self.of_kind("reasoning", self.prompts)

    # -- judges --------------------------------------------------------------------------------
    def judge(self, role: str) -> Judge:
        """The judge of a role (``safety`` or ``refusal``), built once."""
        if role not in self._judges:
            self._judges[role] = get_judge(self.judge_specs[role], role, self.judge_models[role])
        return self._judges[role]

    # -- model, backend, cache -----------------------------------------------------------------
    @cached_property
    def loaded(self) -> LoadedModel:
        if isinstance(self.model_spec, LoadedModel):
            return self.model_spec
        check_model(self.model_spec)  # a wrong name is one line, not a load that fails
        with self._status(f"loading model {self.model_spec}"):
            return load_model(
                self.model_spec, self.device, self.dtype, weights=self.backend.needs_weights
            )

    @cached_property
    def _backend(self) -> tuple[Generator, Scorer]:
        loaded = self.loaded
        with self._status(f"starting the {self.backend.name} backend"):
            generator, scorer = make_backend(self.backend, loaded, self.batch_size)
        return with_budget(
            generator, loaded.tokenizer, self.reasoning_settings, self.batch_size
        ), scorer

    @cached_property
    def reasoning_format(self) -> ReasoningFormat:
        """The markers, and whether this model's chat template opens the reasoning block."""
        return detect_format(self.loaded.tokenizer, self.reasoning_settings)

    @property
    def generator(self) -> Generator:
        return self._backend[0]

    @property
    def scorer(self) -> Scorer:
        return self._backend[1]

    @cached_property
    def cache(self) -> GenerationCache | None:
        if self.cache_spec is None or isinstance(self.cache_spec, GenerationCache):
            return self.cache_spec
        return GenerationCache(self.cache_spec)

    def evaluator(self, progress: Any = None) -> Evaluator:
        """An ``Evaluator`` on the session's model, backend, judges, decoding and cache."""
        return Evaluator(
            self.loaded,
            self.judge("safety"),
            self.judge("refusal"),
            self.decoding,
            self.cache,
            self.batch_size,
            generator=self.generator,
            progress=progress,
            reasoning=self.reasoning_settings,
            judge_on=self.judge_on,
        )

    def close(self) -> None:
        """Close the cache if this session opened it (a cache passed in stays open)."""
        opened_here = not isinstance(self.cache_spec, GenerationCache)
        if opened_here and self.__dict__.get("cache") is not None:
            self.__dict__["cache"].close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _status(self, message: str) -> Any:
        from contextlib import nullcontext

        from flipsearch.progress import status

        return status(self.console, message) if self.console is not None else nullcontext()


def _load(source: PromptSource) -> list[Prompt]:
    if source is None:
        return builtin_prompts()
    if isinstance(source, str | Path):
        return load_prompts(source)
    items = list(source)
    if not items:
        return builtin_prompts()
    if all(isinstance(item, Prompt) for item in items):
        return [item for item in items if isinstance(item, Prompt)]
    if any(isinstance(item, Prompt) for item in items):
        raise FlipsearchError("give prompts as Prompt objects or as sources, not a mix")
    return [p for item in items for p in load_prompts(str(item))]
