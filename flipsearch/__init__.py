"""flipsearch: find, measure and train with the privileged safety context for OPSA.

The public API is what this module exports; everything else is private to its module.

    import flipsearch
    result = flipsearch.flip_rate(model="smollm2-135m", contexts=["Refuse harmful requests."])
    print(result.to_pandas())
"""

from flipsearch.backends import Decoding, Generation, HFGenerator
from flipsearch.cache import GenerationCache
from flipsearch.contexts import PLACEMENTS, Context, load_contexts
from flipsearch.errors import FlipsearchError
from flipsearch.evaluate import Evaluator, FlipRateResult, StudentBaseline, flip_rate
from flipsearch.fliprate import ContextScore, Rate, mcnemar_exact, paired_test, wilson_interval
from flipsearch.judging import Judge, RefusalJudge, Verdict, get_judge
from flipsearch.models import LoadedModel, load_model
from flipsearch.opsa import TrainConfig, train
from flipsearch.prompts import Prompt, builtin_prompts, load_prompts, split_harmful
from flipsearch.report import render_report
from flipsearch.run import RunConfig, RunResult, run

__all__ = [
    "PLACEMENTS",
    "Context",
    "ContextScore",
    "Decoding",
    "Evaluator",
    "FlipRateResult",
    "FlipsearchError",
    "Generation",
    "GenerationCache",
    "HFGenerator",
    "Judge",
    "LoadedModel",
    "Prompt",
    "Rate",
    "RefusalJudge",
    "RunConfig",
    "RunResult",
    "StudentBaseline",
    "TrainConfig",
    "Verdict",
    "builtin_prompts",
    "flip_rate",
    "get_judge",
    "load_contexts",
    "load_model",
    "load_prompts",
    "mcnemar_exact",
    "paired_test",
    "render_report",
    "run",
    "split_harmful",
    "train",
    "wilson_interval",
]
