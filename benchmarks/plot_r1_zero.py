"""The README's R1-Zero figure, from the saved runs of benchmarks/run_studies.py (r1_zero_parity):
held-out accuracy, answer length and the share of answers that think, per difficulty, over GRPO's
steps from assets/tiny-parity (mean of the seeds, min..max shaded).

    python benchmarks/plot_r1_zero.py            # -> assets/r1_zero_parity.png
"""

import argparse
import glob
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = os.path.join(ROOT, "benchmarks", "results", "r1_zero_parity", "grpo-s*.jsonl")
OUT = os.path.join(ROOT, "assets", "r1_zero_parity.png")
BUCKETS = {
    "easy": ("3-4 bits", "tab:green"),
    "mid": ("5-8 bits", "tab:orange"),
    "hard": ("9-12 bits", "tab:red"),
}
PANELS = [  # (metric, trailing mean over k steps, title)
    ("eval_acc_{}", 1, "held-out greedy accuracy"),
    ("response_len_{}", 5, "answer length (tokens, sampled, 5-step mean)"),
    ("trace_share_{}", 5, "share of answers that think (sampled)"),
]


def series(runs: list[list[dict]], key: str, k: int):
    """Steps where every run logged `key`, and the runs' values there (trailing mean of k)."""
    steps = sorted(set.intersection(*({r["step"] for r in rows if key in r} for rows in runs)))
    ys = np.array([[next(r[key] for r in rows if r["step"] == s) for s in steps] for rows in runs])
    if k > 1:
        ys = np.array([[y[max(0, i - k + 1) : i + 1].mean() for i in range(len(y))] for y in ys])
    return np.array(steps), ys


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    files = sorted(glob.glob(RUNS))
    if not files:
        raise SystemExit(
            f"no runs in {RUNS}: run `python benchmarks/run_studies.py "
            "--studies r1_zero_parity` first"
        )
    runs = [[json.loads(line) for line in open(f) if line.strip()] for f in files]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2), dpi=80)
    for ax, (key, k, title) in zip(axes, PANELS):
        for bucket, (bits, color) in BUCKETS.items():
            steps, ys = series(runs, key.format(bucket), k)
            style = dict(marker="o", ms=3) if k == 1 else {}
            ax.plot(steps, ys.mean(0), color=color, label=f"{bucket} ({bits})", **style)
            ax.fill_between(steps, ys.min(0), ys.max(0), color=color, alpha=0.15, lw=0)
        ax.set(title=title, xlabel="GRPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(
        f"R1-Zero in miniature: python nano_grpo.py --preset cpu-r1-zero ({len(runs)} seeds)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out} from {len(runs)} runs")


if __name__ == "__main__":
    main()
