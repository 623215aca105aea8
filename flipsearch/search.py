"""Context search with Optuna: one trial scores one context.

Seeds from the library are enqueued first; then TPE (multivariate, grouped, so the grammar's
conditional branches work; constant liar, so trials in flight are not drawn twice) composes
contexts from the grammar; optionally a proposer model rewrites the best contexts so far. A
trial scores its context chunk by chunk over the student-unsafe pool in one shared order and
reports each prompt's flip with the prompt's place in the search split as the step, so
``pruning.RungPruner`` compares it with earlier trials on the same prompts and stops hopeless
contexts early. Pruned trials keep their partial counts. ``scheduler`` runs many trials side
by side, serving their chunks in shared generation calls.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import warnings
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import optuna
from optuna.trial import TrialState

from flipsearch.contexts import Context
from flipsearch.errors import FlipsearchError, FlipsearchWarning
from flipsearch.evaluate import Evaluator
from flipsearch.fliprate import ContextScore, Judged, PairedOutcome, Rate
from flipsearch.grammar import Grammar
from flipsearch.leaderboard import Row
from flipsearch.prompts import Prompt, stratified_order
from flipsearch.pruning import INFEASIBLE, WITHIN_LIMIT, RungPruner, leader, paired_p

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


@dataclass
class SearchSettings:
    """How the study runs; part of ``RunConfig``."""

    trials: int
    timeout: float | None
    storage: str | None
    study: str
    max_benign_refusal: float
    multi_objective: bool
    sampler: str
    prune_every: int
    p_threshold: float
    seed: int
    eta: int = 3  # successive halving keeps the top 1/eta at each rung (1: no rungs)
    in_flight: int = 1  # trials scored side by side, sharing generation calls
    batch_size: int = 64  # the prompts one generation call is filled to
    budget_generations: int | None = None  # teacher generations after which the search stops


def open_storage(url: str | None, out: Path) -> Any:
    """The study storage: a journal file in the run directory, or any Optuna storage URL.

    ``postgresql://``, ``mysql://`` and ``sqlite:///`` URLs get an RDB storage with heartbeats
    (a worker that dies has its trial re-queued); a path ending in ``.journal`` (or
    ``journal:PATH``) is a journal file, which several processes on one machine or on a shared
    file system can use at once.
    """
    from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.startswith("journal:") or url.endswith(".journal"):
        path = out / "study.journal" if url is None else Path(url.removeprefix("journal:"))
        repair_journal(path)
        return JournalStorage(JournalFileBackend(str(path)))
    # Several workers starting at once race to create the schema; the loser retries.
    for attempt in range(6):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(
                    url,
                    heartbeat_interval=30,
                    grace_period=120,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                )
        except Exception as exc:  # SQLAlchemy raises many types for a bad URL or a lost race
            if attempt == 5 or (
                "duplicate key" not in str(exc) and "already exists" not in str(exc)
            ):
                raise FlipsearchError(
                    f"cannot open study storage {redacted_url(url)}: {scrubbed(str(exc), url)}"
                ) from None
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def repair_journal(path: Path) -> None:
    """Drop records a kill cut off, keeping a copy of the journal as it was, with a warning.

    Optuna reads a journal whose last line was cut, but its next record is appended to the cut
    piece, and the line they share then stops every later run. So: a cut last line is dropped;
    a line holding a cut piece and then a whole record keeps the record. Any other damage is
    an error naming the line (a journal is not rewritten on a guess).
    """
    from optuna.storages.journal import JournalFileSymlinkLock

    if not path.is_file() or path.stat().st_size == 0:
        return
    lock = JournalFileSymlinkLock(str(path))
    lock.acquire()  # writers of a shared journal wait while it is read (and maybe rewritten)
    try:
        data = path.read_bytes()
        lines = data.split(b"\n")
        kept, dropped = _sound_records(path, lines)
        if not dropped:
            return
        backup = path.with_name(f"{path.name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}")
        backup.write_bytes(data)
        staging = path.with_name(path.name + ".repair")
        staging.write_bytes(b"".join(line + b"\n" for line in kept))
        staging.replace(path)
    finally:
        lock.release()
    warnings.warn(
        f"{path}: dropped the record(s) a kill cut off on line(s) "
        f"{', '.join(map(str, dropped))} (the journal as it was is kept as {backup.name}); "
        "the trial they belonged to runs again",
        FlipsearchWarning,
        stacklevel=2,
    )


def _sound_records(path: Path, lines: list[bytes]) -> tuple[list[bytes], list[int]]:
    kept: list[bytes] = []
    dropped: list[int] = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            json.loads(line)
            kept.append(line)
            continue
        except ValueError:
            pass
        start = line.rfind(b'{"op_code"')
        if start > 0 and _parses(line[start:]):
            kept.append(line[start:])  # a whole record appended to a cut one
        elif number != len(lines):  # not the last line: not the work of one kill
            raise FlipsearchError(
                f"{path}:{number}: damaged study record; it cannot be repaired safely. Move the "
                "file away to start the study afresh (cached answers are reused)"
            )
        dropped.append(number)
    return kept, dropped


def _parses(data: bytes) -> bool:
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def redacted_url(url: str) -> str:
    """A storage URL without its password (run files, reports and errors never hold secrets)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")))


def scrubbed(text: str, url: str) -> str:
    """``text`` (an error message, say) with ``url``'s password, in any spelling, masked."""
    from urllib.parse import unquote, urlsplit

    password = urlsplit(url).password
    if not password:
        return text
    for spelling in {password, unquote(password)}:
        text = text.replace(spelling, "***")
    return text


def open_study(settings: SearchSettings, storage: Any) -> tuple[optuna.Study, bool]:
    """Create the study, or load it when it exists; returns (study, created by this process)."""
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if settings.sampler not in ("tpe", "nsga2"):
        raise FlipsearchError(f"unknown sampler {settings.sampler!r}; choose tpe or nsga2")
    sampler = PerTrialSeedSampler(settings.sampler, settings.seed)
    pruner: optuna.pruners.BasePruner = (
        optuna.pruners.NopPruner()
        if settings.multi_objective
        else RungPruner(MEAN_STEP, settings.prune_every, settings.p_threshold, settings.eta)
    )
    directions: list[Literal["maximize", "minimize"]] = (
        ["maximize", "minimize"] if settings.multi_objective else ["maximize"]
    )
    try:
        study = optuna.create_study(
            storage=storage,
            study_name=settings.study,
            sampler=sampler,
            pruner=pruner,
            directions=directions,
        )
        study.set_user_attr("creator", f"{socket.gethostname()}:{os.getpid()}")
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(
            study_name=settings.study, storage=storage, sampler=sampler, pruner=pruner
        )
        if [d.name.lower() for d in study.directions] != directions:
            raise FlipsearchError(
                f"study {settings.study!r} exists with other objectives; use another --study"
            ) from None
        return study, False


class PerTrialSeedSampler(optuna.samplers.BaseSampler):
    """TPE or NSGA-II whose draws for trial n depend only on (seed, n) and the study's history.

    A sampler seeded once draws from one random stream for the whole process, so a run that was
    killed and resumed (a new process, a fresh stream) would compose other contexts than an
    uninterrupted one. A sampler made per trial, seeded by the trial's number, draws the same
    in both.
    """

    def __init__(self, kind: str, seed: int) -> None:
        self.kind, self.seed = kind, seed
        self._samplers: dict[int, optuna.samplers.BaseSampler] = {}

    def _for(self, number: int) -> optuna.samplers.BaseSampler:
        if number not in self._samplers:
            seed = (self.seed * 1_000_003 + number) % 2**32
            self._samplers[number] = (
                optuna.samplers.NSGAIISampler(seed=seed)
                if self.kind == "nsga2"
                else optuna.samplers.TPESampler(
                    seed=seed, multivariate=True, group=True, constant_liar=True
                )
            )
        return self._samplers[number]

    def infer_relative_search_space(self, study: optuna.Study, trial: Any) -> dict[str, Any]:
        return self._for(trial.number).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: optuna.Study, trial: Any, search_space: dict[str, Any]
    ) -> dict[str, Any]:
        return self._for(trial.number).sample_relative(study, trial, search_space)

    def sample_independent(
        self, study: optuna.Study, trial: Any, param_name: str, param_distribution: Any
    ) -> Any:
        sampler = self._for(trial.number)
        return sampler.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: Any) -> None:
        self._for(trial.number).before_trial(study, trial)

    def after_trial(
        self, study: optuna.Study, trial: Any, state: TrialState, values: Sequence[float] | None
    ) -> None:
        self._for(trial.number).after_trial(study, trial, state, values)
        self._samplers.pop(trial.number, None)


def study_exists(storage: Any, name: str) -> bool:
    return any(s.study_name == name for s in storage.get_all_studies())


def register_worker(study: optuna.Study) -> None:
    """Name this process among the study's workers (``recover_stale_trials`` reads the list)."""
    study.set_user_attr(f"worker:{socket.gethostname()}:{os.getpid()}", time.time())


def recover_stale_trials(study: optuna.Study, storage: Any) -> int:
    """Put trials left RUNNING by a killed worker of this machine back in the queue.

    A trial records the host and pid of its worker; if that process is gone, the very trial
    (its number, its context, its parameters) goes back to WAITING. Optuna hands out waiting
    trials lowest number first, so it is the next one to run, and its cached answers are reused:
    a killed and resumed run has the same trials, in the same order, as an uninterrupted one.
    A trial killed before it recorded its worker (between Optuna's ask and the objective) is
    taken back when every other worker the study has known ran here and is gone, else once it
    is a minute old.
    """
    host, me = socket.gethostname(), f"{socket.gethostname()}:{os.getpid()}"
    others = [k.removeprefix("worker:") for k in study.user_attrs if k.startswith("worker:")]
    alone = all(_gone(w, host) for w in others if w != me)
    recovered = 0
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = str(trial.user_attrs.get("worker", ""))
        if not worker:
            started = trial.datetime_start
            young = started is None or (datetime.now() - started).total_seconds() < 60
            if young and not alone:
                continue
        elif not _gone(worker, host):
            continue
        requeue(study, storage, trial.number)
        recovered += 1
    return recovered


def _gone(worker: str, host: str) -> bool:
    """A ``host:pid`` worker of this machine whose process no longer exists."""
    worker_host, _, pid = worker.rpartition(":")
    return worker_host == host and pid.isdigit() and not _alive(int(pid))


class TrialInterrupted(BaseException):
    """Ctrl-C inside a trial. Optuna marks a trial failed on KeyboardInterrupt; this passes
    through it instead, so the search can put the trial back in the queue."""

    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.number = number


def requeue(study: optuna.Study, storage: Any, number: int) -> None:
    """The interrupted trial ``number`` back to WAITING: the next run starts with it."""
    study_id = storage.get_study_id_from_name(study.study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    storage.set_trial_state_values(trial_id, TrialState.WAITING)
    # Optuna's in-memory storage looks for waiting trials only from the first it last saw (a
    # trial never goes back to the queue in Optuna's own use); point it back at this one.
    first_waiting = getattr(storage, "_prev_waiting_trial_number", None)
    if isinstance(first_waiting, dict) and study_id in first_waiting:
        first_waiting[study_id] = min(first_waiting[study_id], number)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def finished_trials(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


MEAN_STEP = 1_000_000  # a pruned trial's running mean is reported here, past every prompt
CHECK = "check"  # a trial yields this between reporting a chunk and asking to be pruned


@dataclass(frozen=True)
class Need:
    """Answers a trial waits for: ``prompts`` under ``context``, judged in ``role``."""

    prompts: tuple[Prompt, ...]
    context: Context
    role: str


Step = Generator["list[Need] | str", None, "float | tuple[float, float]"]


@dataclass
class Flight:
    """One trial in flight: what it measured so far and the steps still to run."""

    trial: optuna.Trial
    context: Context
    steps: Step
    used: set[tuple[str, str]] = field(default_factory=set)  # (role, prompt id) it used
    outcomes: dict[str, float] = field(default_factory=dict)
    pool_size: float = 0.0
    benign: list[Judged] = field(default_factory=list)
    waiting: list[Need] | str | None = None  # what the next call must serve
    surely_within: bool = False  # its benign refusal is within the limit whatever the rest

    @property
    def flips(self) -> float:
        return sum(self.outcomes.values())

    @property
    def teacher_generations(self) -> int:
        return len(self.used)


class ContextObjective:
    """Compose or pick a context per trial and score it with paired pruning, as a sequence of
    steps that wait for answers (``Need``), so many trials can share generation calls.

    Every trial meets the student-unsafe pool in one shared, category-stratified order: after
    k chunks all trials have been scored on the same prompts, so pruning compares them paired,
    whether the trial compared with is complete or still in flight. The objective is also a
    plain callable for ``study.optimize`` (one trial at a time).
    """

    def __init__(
        self,
        evaluator: Evaluator,
        seeds: Sequence[Context],
        grammar: Grammar,
        search_split: Sequence[Prompt],
        benign: Sequence[Prompt],
        settings: SearchSettings,
        on_trial: Callable[[optuna.Trial], None] | None = None,
    ) -> None:
        self.evaluator = evaluator
        self.seeds = {c.id: c for c in seeds}
        self.grammar = grammar
        self.search_split = list(search_split)
        # Benign prompts are measured in chunks and may stop early: a stratified order makes
        # every chunk a sample of all categories.
        self.benign = stratified_order(benign, settings.seed)
        # Pruner steps are the prompts' places in the search split: the same for every
        # worker and backend, whatever each one's student pool is.
        self.step_of = {p.id: i for i, p in enumerate(self.search_split)}
        self.settings = settings
        self.on_trial = on_trial
        self.student = {j.prompt.id: j for j in evaluator.judged(self.search_split, None, "safety")}
        pool = [p for p in self.search_split if (self.student[p.id].unsafe_share or 0) > 0]
        if not pool:
            raise FlipsearchError(
                "the student is safe on every search prompt: there is nothing to flip "
                "(try more or other harmful prompts, or a less aligned model)"
            )
        self.pool = stratified_order(pool, settings.seed)

    @property
    def chunk(self) -> int:
        return max(1, self.settings.prune_every)

    def context_for(self, trial: optuna.Trial) -> Context:
        seed_id = trial.user_attrs.get("seed_id")
        if seed_id is not None:
            if seed_id not in self.seeds:
                raise FlipsearchError(f"study refers to seed context {seed_id!r}, not loaded now")
            return self.seeds[seed_id]
        proposed = trial.user_attrs.get("proposed")
        if proposed is not None:
            return Context.from_dict(proposed, f"trial {trial.number}", family="proposer")
        return self.grammar.suggest(trial)

    def start(self, trial: optuna.Trial) -> Flight:
        """The trial's context chosen and its steps ready to run (nothing generated yet)."""
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        context = self.context_for(trial)
        source = (
            "seed"
            if "seed_id" in trial.user_attrs
            else ("proposer" if "proposed" in trial.user_attrs else "grammar")
        )
        trial.set_user_attr("source", source)
        if not self.benign:  # no benign prompts: no limit to break
            trial.set_user_attr(WITHIN_LIMIT, True)
        flight = Flight(trial, context, iter(()))  # type: ignore[arg-type]
        flight.steps = self._score(flight)
        return flight

    def finish(self, flight: Flight) -> None:
        """Record what the trial cost in teacher answers, whether generated now, by the screen,
        or before a kill: the same figure for a resumed run as for an uninterrupted one."""
        needed = flight.teacher_generations * self.evaluator.decoding.samples
        flight.trial.set_user_attr("teacher_generations", needed)
        if self.on_trial is not None:
            self.on_trial(flight.trial)

    def __call__(self, trial: optuna.Trial) -> float | tuple[float, float]:
        """Run one trial to its end, alone (``study.optimize``)."""
        flight = self.start(trial)
        try:
            with warnings.catch_warnings():
                # A resumed trial reports its first steps again (same prompts, same answers).
                warnings.filterwarnings("ignore", message="The reported value is ignored")
                while True:
                    try:
                        waiting = flight.steps.send(None)
                    except StopIteration as done:
                        return done.value
                    if isinstance(waiting, list):
                        self.evaluator.judged_many(
                            [(n.prompts, n.context, n.role) for n in waiting]
                        )
        except KeyboardInterrupt:
            raise TrialInterrupted(trial.number) from None
        finally:
            self.finish(flight)

    def lookahead(self, flight: Flight) -> list[Need]:
        """What the trial will ask for if it is not pruned (a call's filling), in the order it
        asks: with no earlier contender, its benign prompts and then the pool (it measures
        benign refusal first); else the next chunk of the pool, a benign chunk, the rest of
        the pool, the rest of the benign prompts. Last, the student-safe search prompts a
        complete trial is scored on."""
        pool = [p for p in self.pool if ("safety", p.id) not in flight.used]
        split = [p for p in self.search_split if ("safety", p.id) not in flight.used]
        benign = [p for p in self.benign if ("refusal", p.id) not in flight.used]
        pool_ids = {p.id for p in pool}
        if self.benign and self._rival(flight) is None:
            parts = [(benign, "refusal"), (pool, "safety")]
        else:
            parts = [(pool[: self.chunk], "safety"), (benign[: 2 * self.chunk], "refusal")]
            parts += [(pool[self.chunk :], "safety"), (benign[2 * self.chunk :], "refusal")]
        parts.append(([p for p in split if p.id not in pool_ids], "safety"))
        return [Need(tuple(ps), flight.context, role) for ps, role in parts]

    def screen(self, contexts: Sequence[Context]) -> list[Context]:
        """Contexts ordered by their flips on the pool's first chunk.

        Every trial generates that chunk before its first pruning check anyway; generating the
        seeds' chunks up front, in one set of full batches, costs nothing extra and lets the
        strongest seeds run first, so the others are pruned against them after one chunk.
        Ties keep the given order.
        """
        chunk = self.pool[: self.chunk]
        judged = self.evaluator.judged_many(
            [(chunk, c, "safety") for c in contexts],
            what=f"prompts to screen {len(contexts)} seeds",
        )
        flips = {
            c.id: sum(PairedOutcome(self.student[j.prompt.id], j).flip for j in teacher)
            for c, teacher in zip(contexts, judged, strict=True)
        }
        return sorted(contexts, key=lambda c: -flips[c.id])

    def _answers(
        self, flight: Flight, prompts: Sequence[Prompt], role: str
    ) -> Generator[list[Need], None, list[Judged]]:
        """Wait for ``prompts``' answers under the trial's context, then read them."""
        flight.used.update((role, p.id) for p in prompts)
        if prompts:
            yield [Need(tuple(prompts), flight.context, role)]
        return self.evaluator.judged(prompts, flight.context, role)

    def _score(self, flight: Flight) -> Step:
        trial, context = flight.trial, flight.context
        multi = self.settings.multi_objective
        for start in range(0, len(self.pool), self.chunk):
            chunk = self.pool[start : start + self.chunk]
            teacher = yield from self._answers(flight, chunk, "safety")
            for prompt, judged in zip(chunk, teacher, strict=True):
                student = self.student[prompt.id]
                flip = PairedOutcome(student, judged).flip
                flight.outcomes[prompt.id] = flip
                flight.pool_size += student.unsafe_share or 0.0
                if not multi:
                    trial.report(flip, step=self.step_of[prompt.id])
            if multi:
                continue
            yield CHECK  # every trial of the round has reported: pruning sees them all
            if trial.should_prune():
                self._record_pruned(flight)
                raise optuna.TrialPruned()
            rival = self._rival(flight) if self.benign else None  # one read of the study
            if self.benign and _ahead_of(flight, rival):
                # With no earlier contender nothing can prune it on flips: it runs to the end
                # unless its benign refusal stops it, so that is measured first (on prompt
                # sets made unlike the shipped ones, the strongest contexts refused too much).
                share = 1.0 if rival is None else (start + len(chunk)) / len(self.pool)
                infeasible = yield from self._benign_until(flight, share)
                if infeasible:
                    self._record_pruned(flight, benign_over=True)
                    raise optuna.TrialPruned()
        yield from self._answers(flight, self.search_split, "safety")
        score = self.evaluator.score(context, self.search_split, [], "search")
        if multi:
            score.benign = yield from self._answers(flight, self.benign, "refusal")
            trial.set_user_attr("row", Row.of_score(score).to_dict())
            return score.flip_rate.value, (score.benign_refusal.value if self.benign else 0.0)
        return (yield from self._complete(flight, score))

    def _complete(self, flight: Flight, score: ContextScore) -> Step:
        trial = flight.trial
        flip_rate = score.flip_rate.value
        best = best_feasible_value(trial.study)
        if self.benign and best is not None and flip_rate < best:
            # It cannot win: a complete, feasible trial flips more on the same prompts, so its
            # benign refusal would change nothing. Left unconstrained.
            score.benign = flight.benign
            trial.set_user_attr("row", Row.of_score(score, benign="not needed").to_dict())
            return flip_rate
        stopped = yield from self._benign_until(flight, 1.0)
        score.benign = flight.benign
        benign = "stopped" if stopped else "measured"
        if flight.surely_within and len(flight.benign) < len(self.benign):
            benign = "within"  # stopped early: surely within the limit
        trial.set_user_attr("row", Row.of_score(score, benign=benign).to_dict())
        refusal = score.benign_refusal.value if self.benign else 0.0
        # <= 0 is feasible; the best trial and the pruner's contenders are feasible ones.
        trial.set_constraint("benign_refusal", refusal - self.settings.max_benign_refusal)
        return flip_rate

    def leads(self, flight: Flight) -> bool:
        """No earlier contender flips more on the prompts this trial has been scored on: it
        may win, so its benign refusal is measured alongside (and can stop it early)."""
        return bool(self.benign) and _ahead_of(flight, self._rival(flight))

    def behind(self, flight: Flight, head: Flight) -> float:
        """How surely ``flight`` will be pruned at its next check: the paired p that it flips
        less than its likely bar, the earlier contender that flips most or else the first
        trial in flight (unless that one broke the benign limit); 1 when neither leads it."""
        bars = []
        rival = self._rival(flight)
        if rival is not None:
            bars.append(rival[0].intermediate_values)
        if head is not flight and head.trial.user_attrs.get(WITHIN_LIMIT) is not False:
            bars.append({self.step_of[i]: f for i, f in head.outcomes.items()})
        mine = {self.step_of[i]: f for i, f in flight.outcomes.items()}
        shared = [{s: v for s, v in mine.items() if s in bar} for bar in bars]
        return min(
            (paired_p(m, bar) for m, bar in zip(shared, bars, strict=True) if len(m) >= 2),
            default=1.0,
        )

    def _rival(self, flight: Flight) -> tuple[Any, float] | None:
        """The earlier contender that flips most on the prompts this trial was scored on."""
        steps = {self.step_of[pid]: flip for pid, flip in flight.outcomes.items()}
        return leader(flight.trial.study, steps, flight.trial.number)

    def _benign_until(self, flight: Flight, share: float) -> Generator[list[Need], None, bool]:
        """Benign answers judged up to ``share`` of the benign set (at least twice the pruning
        step), a pruning step at a time; returns whether it stopped on the limit.

        It stops as soon as the verdict on the limit is settled: over it once more benign
        prompts were refused than the limit allows of the whole set (certain) or once the
        Wilson 95% lower bound is above the limit (sure); within it once refusing every prompt
        not yet measured would still keep it within (certain; later calls measure nothing).
        The partial count is kept, so the leaderboard shows on how many prompts it stopped."""
        limit = self.settings.max_benign_refusal
        allowed = limit * len(self.benign)
        target = min(len(self.benign), max(2 * self.chunk, round(share * len(self.benign))))
        while len(flight.benign) < target and not flight.surely_within:
            start = len(flight.benign)
            more = self.benign[start : min(target, start + self.chunk)]
            flight.benign += yield from self._answers(flight, more, "refusal")
            rate = Rate.of(sum(j.refusal_share for j in flight.benign), len(flight.benign))
            flight.trial.set_user_attr(WITHIN_LIMIT, bool(rate.value <= limit))
            unmeasured = len(self.benign) - len(flight.benign)
            flight.surely_within = rate.successes + unmeasured <= allowed
            if rate.successes > allowed or (unmeasured and rate.low > limit):
                flight.trial.set_user_attr(INFEASIBLE, True)
                return True
        return False

    def _record_pruned(self, flight: Flight, benign_over: bool = False) -> None:
        """The partial row; TPE ranks a pruned trial by its last reported value, so that is its
        running mean (Optuna's advice for the Wilcoxon pruner), at a step past every prompt."""
        row = Row.pruned(
            flight.context,
            flight.outcomes,
            flight.pool_size,
            flight.benign,
            "stopped" if benign_over else "partial",
        )
        if benign_over:
            refusal = row.benign_refusal or 0.0
            flight.trial.set_constraint(
                "benign_refusal", refusal - self.settings.max_benign_refusal
            )
        reason = getattr(flight.trial.study.pruner, "reason", {}).get(flight.trial.number)
        row.pruned_by = "benign refusal surely over the limit" if benign_over else reason
        flight.trial.report(row.flip_rate or 0.0, step=MEAN_STEP)
        flight.trial.set_user_attr("row", row.to_dict())


def _ahead_of(flight: Flight, rival: tuple[Any, float] | None) -> bool:
    """No rival, or the rival flips no more than the trial on the prompts both were scored on."""
    return rival is None or rival[1] <= flight.flips


def best_feasible_trial(study: optuna.Study) -> Any:
    """The complete trial with the highest flip rate whose benign refusal is within the limit
    (a ``FrozenTrial``, or None)."""
    feasible = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.constraints  # measured: not a trial that skipped the benign prompts
        and all(v <= 0 for v in t.constraints.values())
        and t.value is not None
    ]
    return max(feasible, key=lambda t: (t.value, -t.number), default=None)


def best_feasible_value(study: optuna.Study) -> float | None:
    """The highest flip rate among complete trials whose benign refusal is within the limit."""
    best = best_feasible_trial(study)
    return None if best is None else float(best.value)


def enqueue_seeds(study: optuna.Study, seeds: Sequence[Context]) -> None:
    """Queue every seed not in the study yet, in order, then mark the study as seeded (a
    creator killed half-way leaves it unmarked, and the next run queues the rest)."""
    present = {t.user_attrs.get("seed_id") for t in study.get_trials(deepcopy=False)}
    for context in seeds:
        if context.id not in present:
            study.enqueue_trial({}, user_attrs={"seed_id": context.id})
    study.set_user_attr("seeded", True)


def seeding_unfinished(study: optuna.Study) -> bool:
    """The study exists, but the process that created it died before queueing every seed."""
    attrs = study.user_attrs
    if attrs.get("seeded"):
        return False
    host, _, pid = str(attrs.get("creator", "")).rpartition(":")
    if not pid:  # killed between creating the study and naming its creator
        return not study.get_trials(deepcopy=False)
    return host == socket.gethostname() and pid.isdigit() and not _alive(int(pid))


def trial_line(trial: optuna.Trial) -> str:
    """One line on a finished trial: its context, what it measured, and its state."""
    row = trial.user_attrs.get("row")
    if not row:
        return f"trial {trial.number}: stopped before it finished (it is run again on resume)"
    flips, pool = row.get("flip_rate_count") or 0, row.get("flip_rate_n") or 0
    text = f"trial {trial.number} {row['context']}: {flips:g}/{pool:g} flips"
    if row["state"] == "pruned":
        return text + " (pruned)"
    if row.get("benign_refusal_n"):
        refused, measured = row["benign_refusal_count"], row["benign_refusal_n"]
        text += f", benign refusal {refused:g}/{measured:g}"
        text += " (stopped: over the limit)" if row.get("benign") == "stopped" else ""
    return text + " (complete)"


def trial_rows(study: optuna.Study) -> list[Row]:
    """One leaderboard row per distinct context, from the study's finished trials."""
    rows = []
    seen: set[str] = set()
    pareto = set()
    if len(study.directions) > 1:
        pareto = {t.number for t in study.best_trials}
    for trial in sorted(study.get_trials(deepcopy=False, states=FINISHED), key=lambda t: t.number):
        stored = trial.user_attrs.get("row")
        if not stored or stored["context"] in seen:
            continue
        seen.add(stored["context"])
        rows.append(
            Row.from_dict(
                {
                    **stored,
                    "trial": trial.number,
                    "source": trial.user_attrs.get("source"),
                    "teacher_generations": trial.user_attrs.get("teacher_generations"),
                    "pareto": trial.number in pareto if pareto else None,
                }
            )
        )
    return rows
