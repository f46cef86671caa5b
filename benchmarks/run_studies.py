"""Run the chapter's comparisons on the tiny model, several seeds each, and save their metrics.

    python benchmarks/run_studies.py                      # every study, seeds 0 1 2 (~30 min on 2 cores)
    python benchmarks/run_studies.py --studies fig14_5 --seeds 0 1 2

Each run is `python nano_grpo.py ...` (or nano_ppo.py) in a subprocess; its metrics.jsonl is copied
to benchmarks/results/<study>/<variant>-s<seed>.jsonl, and benchmarks/results/meta.json records
the date, the machine and the exact command of every run. The notebooks (notebooks/
03_chapter_comparisons.ipynb, notebooks/case_studies.ipynb) only plot these files, so they stay
fast enough for the test suite.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

from tqdm import tqdm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
SHORT = ["--max_steps", "40", "--eval_every", "5", "--eval_size", "200", "--save_every", "0"]

# study -> variant -> (script, flags). Every variant of a study shares SHORT and the seed.
STUDIES = {
    # Chapter figure 14.5 (DeepSeekMath): RFT < online RFT < GRPO (outcome) <= GRPO + process supervision.
    "fig14_5": {
        "rft": ("nano_grpo.py", ["--adv_estimator", "rft", "--offline_rollouts"]),
        "online-rft": ("nano_grpo.py", ["--adv_estimator", "rft"]),
        "grpo": ("nano_grpo.py", []),
        "grpo-ps": ("nano_grpo.py", ["--supervision", "process"]),
        "dr-grpo": ("nano_grpo.py", ["--scale_rewards", "none", "--loss_agg", "seq-mean-token-sum-norm"]),
    },
    # Chapter figure 14.3: PPO's total shaped reward, task reward and negative KL reward.
    "fig14_3": {"ppo": ("nano_ppo.py", [])},
    # DeepSeek R1 vs R1-Zero: RL from the cold-start SFT model vs from a base model never shown the format,
    # and from a base model with a weak prior (3% of its pre-training documents are R1-format transcripts).
    "r1_zero": {
        "cold-start": ("nano_grpo.py", []),
        "r1-zero": ("nano_grpo.py", ["--model", "assets/tiny-addition-base"]),
        "r1-zero-web": ("nano_grpo.py", ["--model", "assets/tiny-addition-base-web"]),
    },
    # Qwen 3: one model, two modes; accuracy against the thinking budget, before and after RL.
    "think_budget": {
        "think-only": ("nano_grpo.py", ["--model", "assets/tiny-addition-fusion"]),
        "both-modes": ("nano_grpo.py", ["--model", "assets/tiny-addition-fusion", "--think_mode", "both"]),
    },
    # Kimi k1.5 length reward and DAPO's overlong penalty; Dr. GRPO's length bias of per-answer means.
    "length": {
        "plain": ("nano_grpo.py", []),
        "kimi-length": ("nano_grpo.py", ["--length_reward", "0.5"]),
        "overlong": ("nano_grpo.py", ["--overlong_buffer", "8", "--max_new_tokens", "28"]),
        "seq-mean-token-sum-norm": ("nano_grpo.py", ["--loss_agg", "seq-mean-token-sum-norm"]),
    },
}


BUDGETS = [0, 2, 4, 6, 8, 10, 12, 14, 16, 32]  # thinking tokens allowed (the full trace is ~16)


def think_budget_eval(model_path: str, seed: int) -> dict:
    """Qwen 3's test-time compute control on the fusion model: held-out greedy accuracy in thinking
    mode, in no-think mode (" /no_think"), and with thinking cut after N tokens."""
    sys.path.insert(0, ROOT)
    import nano_grpo as G
    cfg = G.Config(eval_size=200, seed=seed)
    model, tok = G.load_model(model_path, cfg)
    examples = G.rewards.load_task("addition", "test", n=cfg.eval_size, seed=seed)
    prompt = lambda ex, sfx: tok.encode(G.rewards.build_prompt("addition", {**ex, "question": ex["question"] + sfx}, tok),
                                        add_special_tokens=False)
    out = {"think": G.evaluate(model, model, tok, examples, [prompt(e, "") for e in examples], cfg)["eval_acc"],
           "no_think": G.evaluate(model, model, tok, examples, [prompt(e, " /no_think") for e in examples], cfg)["eval_acc"]}
    for budget in BUDGETS:
        cfg.think_budget = budget
        out[f"budget_{budget}"] = G.evaluate(model, model, tok, examples, [prompt(e, "") for e in examples], cfg)["eval_acc_budget"]
    return out


def run(script: str, flags: list[str], seed: int, out_file: str) -> dict:
    if out_file.endswith(".json"):  # think_budget: train, keep the checkpoint, evaluate before and after
        keep = tempfile.mkdtemp(prefix="study-")
        info = run(script, flags, seed, os.path.join(keep, "metrics.jsonl.copy"))
        model = flags[flags.index("--model") + 1]
        os.makedirs(os.path.dirname(out_file), exist_ok=True)
        after = os.path.join(keep, "run", open(os.path.join(keep, "run", "latest")).read().strip())
        json.dump({"before": think_budget_eval(os.path.join(ROOT, model), seed), "after": think_budget_eval(after, seed),
                   "budgets": BUDGETS}, open(out_file, "w"), indent=1)
        shutil.rmtree(keep, ignore_errors=True)
        return info
    out_dir = tempfile.mkdtemp(prefix="study-") if not out_file.endswith(".copy") else os.path.join(os.path.dirname(out_file), "run")
    cmd = [sys.executable, script, *SHORT, *flags, "--seed", str(seed), "--output_dir", out_dir]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    os.makedirs(os.path.dirname(out_file), exist_ok=True)
    shutil.copy(os.path.join(out_dir, "metrics.jsonl"), out_file)
    if not out_file.endswith(".copy"):
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"cmd": " ".join(["python", *cmd[1:-2]]), "seconds": round(time.time() - t0, 1),
            "final": proc.stdout.strip().splitlines()[-1]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--variants", nargs="+", default=None, help="only these variants (default: all)")
    args = ap.parse_args()
    meta_path = os.path.join(RESULTS, "meta.json")
    meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"runs": {}}
    jobs = [(s, v, seed) for s in args.studies for v in STUDIES[s] for seed in args.seeds
            if args.variants is None or v in args.variants]
    for study, variant, seed in tqdm(jobs, desc="studies"):
        script, flags = STUDIES[study][variant]
        if not os.path.exists(os.path.join(ROOT, script)) or any(
                f.startswith("assets/") and not os.path.isdir(os.path.join(ROOT, f)) for f in flags):
            tqdm.write(f"skip {study}/{variant}: {script} or its model is missing")
            continue
        key = f"{study}/{variant}-s{seed}"
        ext = "json" if study == "think_budget" else "jsonl"
        meta["runs"][key] = run(script, flags, seed, os.path.join(RESULTS, study, f"{variant}-s{seed}.{ext}"))
        tqdm.write(f"{key}: {meta['runs'][key]['final']} ({meta['runs'][key]['seconds']} s)")
        meta.update(date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    machine=f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
                    python=platform.python_version(), common_flags=" ".join(SHORT))
        json.dump(meta, open(meta_path, "w"), indent=1)


if __name__ == "__main__":
    main()
