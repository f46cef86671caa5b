"""Seconds per GRPO step, with its breakdown, for --rollout vllm and --rollout hf.

    python benchmarks/bench_step.py [--steps 30] [--trl]

Runs nano_grpo.py's CPU demo configuration in a subprocess per rollout engine and prints, from
its metrics.jsonl: seconds per step (rollout / reward / train / weight sync / the check that the
sync worked), generated tokens per
second in the rollout phase, and the process's peak memory. --trl also times TRL's GRPOTrainer at
matched settings (same model, prompts, G, max new tokens, reward) for comparison, and then one
line per engine of ours, `ours/trl: <engine> R` (the default engine first).

It also prints the padding share of the training passes: the cpu-demo's (measured in the run)
and a GSM8K-like length mix's, `pad_share mix=gsm-like before=X after=Y`, before: the old
micro-batches (sampling order, every one at the batch's full width), after: rows of similar length
grouped, each micro-batch at its own longest row (nano_grpo.micro_batches). The mix is stated, not
measured: --preset gpu's batch of 32 x 8 answers, prompts of 80-250 tokens (uniform), answers
log-normal with a median of 180 tokens (sigma 0.6, GSM8K-style solutions run ~100-300 tokens)
clipped to 50-512 (the preset's limit), micro-batches of 8.
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def run_ours(rollout: str, steps: int, extra: list[str]) -> dict:
    out = tempfile.mkdtemp(prefix=f"bench-{rollout}-")
    cmd = [sys.executable, os.path.join(ROOT, "nano_grpo.py"), "--preset", "cpu-demo"]
    cmd += ["--rollout", rollout, "--max_steps", str(steps), "--eval_every", "0"]
    # the demo's own --eval_size: the sync check's probe is its first ~512 held-out prompt tokens
    # (a smaller eval set gives a smaller probe: the step looked ~0.08 s cheaper than the demo's)
    cmd += ["--save_every", "0", "--output_dir", out, *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"{rollout} run failed:\n{proc.stderr[-2000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rows = rows[3:]  # row 0: eval; 2 warm-up steps

    def mean(k):
        return statistics.mean(r[k] for r in rows)

    parts = {k: mean(f"time_{k}") for k in ("rollout", "reward", "train", "sync", "sync_check")}
    pad = mean("pad_share")
    tokens = statistics.mean(r["response_len"] for r in rows) * 16 * 8
    tok_s = tokens / parts["rollout"]
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return dict(step=sum(parts.values()), **parts, tok_s=tok_s, wall=wall, peak_gb=peak_gb, pad=pad)


def gsm_like_pad_share(seed: int = 0) -> tuple[float, float]:
    """(before, after) padding shares of one --preset gpu batch of the stated GSM8K-like mix."""
    import random

    import torch

    import nano_grpo as G

    rng = random.Random(seed)
    lengths = []
    for _ in range(32):  # questions
        prompt = rng.randint(80, 250)
        lengths += [
            prompt + min(512, max(50, round(rng.lognormvariate(5.19, 0.6)))) for _ in range(8)
        ]
    lengths = torch.tensor(lengths)
    width = int(lengths.max())
    batch = {"attention_mask": (torch.arange(width)[None] < lengths[:, None]).long()}
    before = 1 - lengths.sum().item() / (len(lengths) * width)  # every micro-batch full width
    return before, G.pad_share(batch, G.micro_batches(lengths, 8))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument(
        "--trl", action="store_true", help="also time TRL's GRPOTrainer (benchmarks/bench_trl.py)"
    )
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} {cpu}, {os.cpu_count()} cores; "
        f"cpu-demo preset, 16 prompts x 8 answers, {args.steps} steps (first 2 skipped)"
    )
    results = {}
    for rollout in ("vllm", "hf"):  # peak memory is cumulative over children: vllm first, hf after
        results[rollout] = r = run_ours(rollout, args.steps, [])
        print(
            f"{rollout:5s} {r['step']:.3f} s/step = rollout {r['rollout']:.3f} "
            f"+ reward {r['reward']:.3f} + train {r['train']:.3f} + sync {r['sync']:.3f} "
            f"+ sync check {r['sync_check']:.3f} | {r['tok_s']:.0f} generated tok/s "
            f"| sync {100 * r['sync'] / r['step']:.1f}% of step "
            f"(with its check {100 * (r['sync'] + r['sync_check']) / r['step']:.1f}%) | "
            f"peak RSS {r['peak_gb']:.2f} GB | wall {r['wall']:.0f} s"
        )
    print(f"rollout speed-up vllm/hf: {results['hf']['rollout'] / results['vllm']['rollout']:.1f}x")
    print(f"pad_share mix=cpu-demo after={results['vllm']['pad']:.3f} (measured in the run)")
    before, after = gsm_like_pad_share()
    print(f"pad_share mix=gsm-like before={before:.3f} after={after:.3f}")
    if args.trl:
        cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_trl.py")]
        trl = subprocess.run(cmd + ["--steps", str(args.steps)], capture_output=True, text=True)
        print(trl.stdout.strip() or trl.stderr[-2000:])
        trl_step = float(trl.stdout.split()[1]) if trl.stdout.startswith("trl ") else None
        for rollout in ("vllm", "hf") if trl_step else ():  # the default engine first
            print(f"ours/trl: {rollout} {results[rollout]['step'] / trl_step:.2f}")


if __name__ == "__main__":
    main()
