"""Seconds per GRPO step, with its breakdown, for --rollout vllm and --rollout hf, in lockstep.

    python benchmarks/bench_step.py [--steps 30] [--trl]

Runs nano_grpo.py's CPU demo configuration with each rollout engine (and with --trl, TRL's
GRPOTrainer at matched settings: same model, prompts, G, max new tokens, reward; see
bench_trl.py), each in its own process, **taking turns step by step**: one process runs a step
while the others wait (blocked on a pipe, using no CPU). This machine's speed drifts by ~15% over
a minute (2-core VMs: the same run took 0.52 and 0.70 s a step minutes apart), so runs made one
after the other compare the drift as much as the code; in lockstep every engine's step k runs
within a few seconds of the others'. Each process times its own steps (ours: the laps of
metrics.jsonl, rollout / reward / train / weight sync / the check that the sync worked; TRL:
from a step's start to its end), the first 2 steps are warm-up. Then one line per engine of
ours, `ours/trl: <engine> R` (the default engine first), with R the ratio of mean step times.
Also: generated tokens per second in the rollout phase, and the largest peak memory of the runs.

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
SKIP = 2  # warm-up steps left out


def wait_for_turn():
    """In a worker (BENCH_TURNS="go_fd,idle_fd"): say "idle", then wait until told to go."""
    go, idle = map(int, os.environ["BENCH_TURNS"].split(","))
    os.write(idle, b"i")
    if not os.read(go, 1):  # the benchmark itself is gone: stop, rather than run on unpaced
        sys.exit(1)


def start(name: str, cmd: list[str]) -> dict:
    """A worker process that takes turns: its pipes, and what it prints."""
    go_r, go_w = os.pipe()
    idle_r, idle_w = os.pipe()
    env = {**os.environ, "BENCH_TURNS": f"{go_r},{idle_w}"}
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        cmd, env=env, pass_fds=(go_r, idle_w), stdout=log, stderr=subprocess.STDOUT, text=True
    )
    os.close(go_r), os.close(idle_w)
    return dict(name=name, proc=proc, go=go_w, idle=idle_r, log=log)


def output_of(w: dict) -> str:
    w["log"].seek(0)
    return w["log"].read()


def take_turns(workers: list[dict], steps: int):
    """Step k of each worker in turn (who goes first rotates); a worker's last step runs on to its
    exit, in its turn."""

    def failed(w, when):
        for other in workers:
            other["proc"].kill()
        sys.exit(f"{w['name']} failed {when}:\n{output_of(w)[-2000:]}")

    for w in workers:  # everyone loaded and waiting at its first step
        if not os.read(w["idle"], 1):
            failed(w, "before its first step")
    for step in range(steps):
        for w in workers[step % len(workers) :] + workers[: step % len(workers)]:
            os.write(w["go"], b"g")
            last = step == steps - 1
            if (w["proc"].wait() != 0) if last else not os.read(w["idle"], 1):
                failed(w, f"at step {step}")


def ours_cmd(rollout: str, steps: int, out: str) -> list[str]:
    flags = ["--preset", "cpu-demo", "--rollout", rollout, "--max_steps", str(steps)]
    # the demo's own --eval_size: the sync check's probe is its first ~512 held-out prompt tokens
    # (a smaller eval set gives a smaller probe: the step looked ~0.08 s cheaper than the demo's)
    flags += ["--eval_every", "0", "--save_every", "0", "--output_dir", out]
    return [sys.executable, os.path.abspath(__file__), "--worker", *flags]


def ours_result(out: str) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    rows = rows[1 + SKIP :]  # row 0: eval

    def mean(k):
        return statistics.mean(r[k] for r in rows)

    parts = {k: mean(f"time_{k}") for k in ("rollout", "reward", "train", "sync", "sync_check")}
    tok_s = mean("response_len") * 16 * 8 / parts["rollout"]
    return dict(step=sum(parts.values()), **parts, tok_s=tok_s, pad=mean("pad_share"))


def worker(flags: list[str]):
    """nano_grpo.main on these flags, each step started by wait_for_turn (before its stopwatch)."""
    import nano_grpo as G

    class TurnLaps(G.Laps):
        def __init__(self, *names):
            wait_for_turn()
            super().__init__(*names)

    G.Laps = TurnLaps
    G.main(G.parse_config(flags))


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
    if sys.argv[1:2] == ["--worker"]:
        return worker(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=30, help=f"steps (the first {SKIP} not timed)")
    ap.add_argument(
        "--trl", action="store_true", help="also time TRL's GRPOTrainer (benchmarks/bench_trl.py)"
    )
    args = ap.parse_args()
    cpu = platform.processor() or platform.machine()
    print(
        f"# {time.strftime('%Y-%m-%d')} {platform.node()} {cpu}, {os.cpu_count()} cores; "
        f"cpu-demo preset, 16 prompts x 8 answers, {args.steps} steps in lockstep "
        f"(first {SKIP} skipped)"
    )
    outs = {r: tempfile.mkdtemp(prefix=f"bench-{r}-") for r in ("vllm", "hf")}
    workers = [start(r, ours_cmd(r, args.steps, outs[r])) for r in ("vllm", "hf")]
    if args.trl:
        trl_cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "bench_trl.py")]
        workers.append(start("trl", trl_cmd + ["--steps", str(args.steps)]))
    t0 = time.time()
    take_turns(workers, args.steps)
    wall = time.time() - t0
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    results = {r: ours_result(outs[r]) for r in ("vllm", "hf")}
    for rollout, r in results.items():
        print(
            f"{rollout:5s} {r['step']:.3f} s/step = rollout {r['rollout']:.3f} "
            f"+ reward {r['reward']:.3f} + train {r['train']:.3f} + sync {r['sync']:.3f} "
            f"+ sync check {r['sync_check']:.3f} | {r['tok_s']:.0f} generated tok/s "
            f"| sync {100 * r['sync'] / r['step']:.1f}% of step "
            f"(with its check {100 * (r['sync'] + r['sync_check']) / r['step']:.1f}%)"
        )
    print(f"peak RSS {peak_gb:.2f} GB (the largest process) | wall {wall:.0f} s for all steps")
    print(f"rollout speed-up vllm/hf: {results['hf']['rollout'] / results['vllm']['rollout']:.1f}x")
    print(f"pad_share mix=cpu-demo after={results['vllm']['pad']:.3f} (measured in the run)")
    before, after = gsm_like_pad_share()
    print(f"pad_share mix=gsm-like before={before:.3f} after={after:.3f}")
    if args.trl:
        trl_out = output_of(workers[-1])
        line = next((x for x in trl_out.splitlines() if x.startswith("trl ")), None)
        if line is None:
            sys.exit(f"TRL printed no result:\n{trl_out[-2000:]}")
        print(line)
        trl_step = float(line.split()[1])
        for rollout in ("vllm", "hf"):  # the default engine first
            print(f"ours/trl: {rollout} {results[rollout]['step'] / trl_step:.2f}")


if __name__ == "__main__":
    main()
