"""The paper's two claims, as flipsearch measures them on the embedded model.

    python benchmarks/validate.py [--run runs/default] [--steps 16] [--train-seeds 2]

1. Does the teacher flip rate predict training? Spearman's rho between the flip rate and the
   drop in unsafe rate after OPSA, over four contexts from the winner down to a low-flip
   control (the winner, a runner-up, one between, the control), two training seeds each, with
   its bootstrap interval over prompts and seeds.
2. OPSA vs off-policy self-distillation on the winner, under the same data, budget and seeds:
   safety gain, benign refusal and capability changes, each with its interval.

The run is made first when ``--run`` does not hold one (the README's ``make run`` settings).
Everything is measured in this process, on unseen prompts (the run's final split and what its
--limit left out); the figures are printed, never asserted. A re-run resumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

RUN_ARGS = ["--limit", "32", "--max-new-tokens", "32", "--trials", "30"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--steps", type=int, default=None, help="default: validate's")
    parser.add_argument("--lr", type=float, default=None, help="default: validate's")
    parser.add_argument("--train-seeds", type=int, default=2)
    parser.add_argument("--eval-limit", type=int, default=None, help="default: validate's")
    args = parser.parse_args()
    run = Path(args.run)
    if not (run / "run.json").is_file():
        print(f"making the run {run} (flipsearch run {' '.join(RUN_ARGS)})", flush=True)
        command = [sys.executable, "-m", "flipsearch.cli", "run", *RUN_ARGS, "--out", str(run)]
        subprocess.run(command, check=True)

    from flipsearch.config import ValidateConfig
    from flipsearch.validate import validate

    given = {"steps": args.steps, "lr": args.lr, "eval_limit": args.eval_limit}
    config = ValidateConfig(
        runners_up=1,
        between=1,
        train_seeds=args.train_seeds,
        offpolicy=True,
        offpolicy_limit=1,  # the baseline on the winner only
        **{k: v for k, v in given.items() if v is not None},
    )
    started = time.time()
    result = validate(run, config)
    seconds = time.time() - started
    report(result.summary, seconds, config)


def report(summary: dict, seconds: float, config: object) -> None:
    from flipsearch.report_validation import change_text

    training = summary["training"]
    untrained = summary["untrained"]
    counts = training["prompt_counts"]
    print(
        f"\n{training['steps']} steps x {training['batch_size']} prompts, lr {training['lr']}, "
        f"{summary['contexts'][0]['seeds']} seeds; trained on {counts['harmful']} harmful and "
        f"{counts['benign']} benign prompts of {training['split']}; evaluated on "
        f"{summary['evaluation_split']}; "
        f"wall time {seconds / 60:.1f} min (resumed parts not re-timed)"
    )
    unsafe = untrained["unsafe_rate"]
    print(
        f"untrained: unsafe {unsafe['value']:.1%} ({unsafe['successes']:.0f}/{unsafe['n']:.0f}), "
        f"benign refusal {untrained['benign_refusal']['value']:.1%}, reasoning accuracy "
        f"{untrained['reasoning_accuracy']['value']:.1%}"
    )
    print("\nper context (means over seeds; 95% bootstrap intervals over prompts and seeds)")
    header = f"{'context':34} {'role':10} {'mode':9} {'flip rate':>9}  {'unsafe drop':26}"
    print(header + f" {'benign refusal':26} {'reasoning acc.':26} ref. log-lik.")
    for row in summary["contexts"]:
        print(
            f"{row['context'][:34]:34} {row['role']:10} {row['mode']:9} {row['flip_rate']:9.1%}  "
            f"{change_text(row, 'unsafe_drop'):26} {change_text(row, 'benign_refusal_change'):26} "
            f"{change_text(row, 'reasoning_accuracy_change'):26} "
            f"{change_text(row, 'reference_loglik_change')}"
        )
    print("\nper training (unsafe rate after, exact McNemar p vs the untrained student)")
    for row in summary["trainings"]:
        print(
            f"  {row['context'][:34]:34} {row['mode']:9} seed {row['seed']}: unsafe "
            f"{row['unsafe_rate']:.1%} (p {row['unsafe_rate_p_vs_untrained']:.3g}), benign "
            f"refusal {row['benign_refusal']:.1%}, {row['seconds']:.0f} s"
        )
    print("\nclaim 1: Spearman rho between flip rate and OPSA's change")
    for name, part in summary["rho"].items():
        rho = "undefined" if part["rho"] is None else f"{part['rho']:+.2f}"
        interval = "n/a" if part["low"] is None else f"[{part['low']:+.2f}, {part['high']:+.2f}]"
        print(
            f"  {name:28} rho {rho} {interval} ({part['contexts']} contexts, "
            f"{part['draws']} draws, {part['undefined']} undefined)"
        )
    print("\nclaim 2: OPSA vs off-policy on the winner (same data, budget, seeds)")
    for row in summary["offpolicy"]:
        opsa, baseline, gap = (
            change_text(row, k, row["measure"]) for k in ("onpolicy", "offpolicy", "difference")
        )
        print(f"  {row['measure']:28} OPSA {opsa:26} off-policy {baseline:26} difference {gap}")


if __name__ == "__main__":
    main()
