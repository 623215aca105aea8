"""flipsearch: find, measure and train with the privileged safety context for OPSA.

The public API is what this module exports; everything else is private to its module.

    import flipsearch
    result = flipsearch.flip_rate(model="smollm2-135m", contexts=["Refuse harmful requests."])
    print(result.to_pandas())

    found = flipsearch.search(model="smollm2-135m", trials=30, limit=32, out="runs/s")
    trained = flipsearch.train(flipsearch.TrainConfig(context=str(found.out / "best_context.yaml")))
    flipsearch.render_report(found.out)
    checked = flipsearch.validate(found.out, train_seeds=2)  # does the flip rate predict training?

The inspect_ai integration (tasks, a scorer and a model API) is in ``flipsearch.inspect_tasks``.
"""

from flipsearch.backends import BackendSpec, Decoding, Generation, make_backend
from flipsearch.backends.cache import GenerationCache
from flipsearch.backends.hf import HFGenerator
from flipsearch.config import TrainConfig, ValidateConfig
from flipsearch.contexts import PLACEMENTS, Context, load_contexts
from flipsearch.errors import FlipsearchError
from flipsearch.evaluate import Evaluator, FlipRateResult, StudentBaseline
from flipsearch.export import export_trl_sdft
from flipsearch.fliprate import ContextScore, Rate, mcnemar_exact, paired_test, wilson_interval
from flipsearch.judging import Judge, JudgeSpec, Verdict, get_judge
from flipsearch.judging.agreement import LabelledRow, evaluate_judge, load_labelled
from flipsearch.judging.classifier import ClassifierJudge, train_classifier
from flipsearch.judging.function import FunctionJudge
from flipsearch.judging.refusal import RefusalJudge
from flipsearch.models import LoadedModel, load_model
from flipsearch.opsa import TrainResult, train
from flipsearch.prompts import Prompt, builtin_prompts, load_prompts, split_harmful
from flipsearch.reasoning import ReasoningFormat, ReasoningSettings, ReasoningSplit
from flipsearch.report import render_report
from flipsearch.run import RunConfig, RunResult, flip_rate, run, search
from flipsearch.validate import ValidationResult, validate

__all__ = [
    "PLACEMENTS",
    "BackendSpec",
    "ClassifierJudge",
    "Context",
    "ContextScore",
    "Decoding",
    "Evaluator",
    "FlipRateResult",
    "FlipsearchError",
    "FunctionJudge",
    "Generation",
    "GenerationCache",
    "HFGenerator",
    "Judge",
    "JudgeSpec",
    "LabelledRow",
    "LoadedModel",
    "Prompt",
    "Rate",
    "ReasoningFormat",
    "ReasoningSettings",
    "ReasoningSplit",
    "RefusalJudge",
    "RunConfig",
    "RunResult",
    "StudentBaseline",
    "TrainConfig",
    "TrainResult",
    "ValidateConfig",
    "ValidationResult",
    "Verdict",
    "builtin_prompts",
    "evaluate_judge",
    "export_trl_sdft",
    "flip_rate",
    "get_judge",
    "load_contexts",
    "load_labelled",
    "load_model",
    "load_prompts",
    "make_backend",
    "mcnemar_exact",
    "paired_test",
    "render_report",
    "run",
    "search",
    "split_harmful",
    "train",
    "train_classifier",
    "validate",
    "wilson_interval",
]
