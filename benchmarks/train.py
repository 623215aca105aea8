"""Training throughput and peak memory: flipsearch's OPSA loop vs TRL's SDFT trainer.

    python benchmarks/train.py [--steps 8] [--batch-size 4] [--max-new-tokens 48]
    python benchmarks/train.py --trl-path DIR     # DIR holds trl (pip install --target DIR trl)

Both run in their own subprocess (so peak RSS is each one's own), on the embedded model, the
same harmful prompts and context, fp32 weights, batch 4, temperature 1.0 without top-p, AdamW at
the same learning rate, gradient clipping 1.0, no warm-up, full-vocabulary distillation. What
still differs (the trainers' own defaults, kept): TRL's distillation_alpha (0.5) and importance-
sampling clip, its per-sequence loss averaging and its own teacher copy loaded from the path;
flipsearch uses the reverse KL averaged per token. Trained tokens/s counts response tokens trained
on per second of wall time, generation included. A last row runs flipsearch with bf16 weights (its
default where the CPU has native bf16), which the fp32 comparison leaves out; on a CPU without
native bf16 it is skipped (emulated bf16 is slower than fp32 and nobody would train that way).
flipsearch's process asks glibc to keep freed blocks (``flipsearch/cpu_kernels.py``); the
``trl-kept-memory`` row gives TRL's process the same allocator setting through glibc's
environment variables, so the ratio without the allocator's share can be read too.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

CONTEXT = (
    "(If this request could help someone hurt people or break the law, your whole reply "
    "must be: I'm sorry, but I can't help with that.)"
)


def run_flipsearch(args: argparse.Namespace, dtype: str = "fp32") -> dict[str, float]:
    from flipsearch.contexts import Context
    from flipsearch.opsa import TrainConfig, Trainer

    config = TrainConfig(
        context=CONTEXT,
        out=args.out + "/flipsearch",
        steps=args.steps,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        lr=1e-5,
        warmup_steps=0,
        harmful_fraction=1.0,
        temperature=1.0,
        dtype=dtype,
        limit=64,
    )
    trainer = Trainer(config)
    trainer.context = Context("bench", CONTEXT, "user_suffix")
    trainer.train_step()  # warm-up step, not timed
    started, tokens = time.perf_counter(), 0
    for _ in range(args.steps):
        tokens += trainer.train_step()["tokens"]
    seconds = time.perf_counter() - started
    return {"tokens": tokens, "seconds": seconds}


def run_trl(args: argparse.Namespace) -> dict[str, float]:
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from flipsearch.models import EMBEDDED_MODELS, embedded_model_dir
    from flipsearch.prompts import load_prompts

    path = str(embedded_model_dir(EMBEDDED_MODELS["smollm2-135m"]))
    prompts = load_prompts("builtin:harmful")[:64]
    data = Dataset.from_list(
        [
            {"prompt": [{"role": "user", "content": p.text}], "privileged_context": CONTEXT}
            for p in prompts
        ]
    )
    config = SDFTConfig(
        output_dir=args.out + "/trl",
        per_device_train_batch_size=args.batch_size,
        num_generations=args.batch_size,
        max_completion_length=args.max_new_tokens,
        max_steps=args.steps + 1,
        learning_rate=1e-5,
        warmup_steps=0,
        max_grad_norm=1.0,
        temperature=1.0,
        top_p=1.0,
        distillation_mode="full_logits",
        teacher_model_kind="base",
        use_cpu=True,
        bf16=False,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        lr_scheduler_type="constant",
    )
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, *_: object, **__: object) -> None:
            times.append(time.perf_counter())

    trainer = SDFTTrainer(
        model=path,
        args=config,
        train_dataset=data,
        processing_class=AutoTokenizer.from_pretrained(path),
        callbacks=[Clock()],
    )
    trainer.train()
    tokens = sum(
        int(log.get("completions/mean_length", 0) * args.batch_size)
        for log in trainer.state.log_history[1:]
        if "loss" in log
    )
    return {"tokens": tokens, "seconds": times[-1] - times[0]}


def child(which: str, args: argparse.Namespace) -> None:
    if which.startswith("trl"):
        result = run_trl(args)
    else:
        result = run_flipsearch(args, "bf16" if which == "flipsearch-bf16" else "fp32")
    result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print("RESULT " + json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="runs/bench-train")
    parser.add_argument("--trl-path", default=None, help="a directory holding the trl package")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args)
        return
    print(
        f"embedded model, batch {args.batch_size}, {args.max_new_tokens} new tokens, "
        f"{args.steps} timed steps after one warm-up step, fp32 unless the row says bf16, "
        f"CPU threads {os.cpu_count()}"
    )
    print(
        f"{'trainer':<16} {'tokens':>7} {'seconds':>8} {'tok/s':>7} {'s/step':>7} {'peak RSS':>9}"
    )
    import torch

    from flipsearch.models import default_dtype

    for which in ("flipsearch", "trl", "trl-kept-memory", "flipsearch-bf16"):
        env = dict(os.environ)
        if which == "flipsearch-bf16" and default_dtype("cpu") != torch.bfloat16:
            print(f"{which:<16} skipped: this CPU computes bf16 only by emulation")
            continue
        if which.startswith("trl"):
            if not args.trl_path:
                print(
                    f"{which:<16} skipped: pass --trl-path (pip install --target DIR trl==1.16.0)"
                )
                continue
            env["PYTHONPATH"] = args.trl_path + os.pathsep + env.get("PYTHONPATH", "")
        if which == "trl-kept-memory":  # what cpu_kernels.keep_freed_memory asks of glibc
            env.update(MALLOC_MMAP_THRESHOLD_=str(1 << 30), MALLOC_TRIM_THRESHOLD_=str(1 << 32))
        argv = [
            sys.executable,
            __file__,
            "--child",
            which,
            "--steps",
            str(args.steps),
            "--batch-size",
            str(args.batch_size),
            "--max-new-tokens",
            str(args.max_new_tokens),
            "--out",
            args.out,
        ]
        done = subprocess.run(argv, capture_output=True, text=True, env=env)
        lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
        if done.returncode != 0 or not lines:
            print(f"{which:<16} failed: {done.stderr.strip().splitlines()[-1:]}")
            continue
        r = json.loads(lines[-1].removeprefix("RESULT "))
        print(
            f"{which:<16} {r['tokens']:>7} {r['seconds']:>8.1f} {r['tokens'] / r['seconds']:>7.1f} "
            f"{r['seconds'] / args.steps:>7.2f} {r['peak_rss_gib']:>8.2f}G"
        )


if __name__ == "__main__":
    main()
