"""Run the chapter's comparisons on the tiny models, several seeds each, and save their metrics.

    python benchmarks/run_studies.py            # every study, seeds 0 1 2 (~95 min on 2 cores)
    python benchmarks/run_studies.py --studies fig14_5_parity --seeds 0 1 2

Two sets of studies. The *_parity ones (issue 15) start from assets/tiny-parity, the R1-Zero
miniature: `--preset cpu-r1-zero` (80 GRPO steps of 16 questions x 16 answers, held-out greedy
accuracy on 400 strings every 10 steps) plus the variant's flags. The others are the first
studies, on the addition models: SHORT (40 steps, eval on 200 every 5) plus the variant's flags.

Each run is `python nano_grpo.py ...` (or nano_ppo.py) in a subprocess; its metrics.jsonl is copied
to benchmarks/results/<study>/<variant>-s<seed>.jsonl, and benchmarks/results/meta.json records
the date, the machine, the load and the exact command of every run. A variant whose command (script,
flags and seed) already ran in this invocation is not run again: that run is reused, and its
meta entry says so ("note"). The thinking-budget studies evaluate the starting model and the run's
last checkpoint under --think_budget N and save <variant>-s<seed>.json. The notebooks (notebooks/
03_chapter_comparisons.ipynb, notebooks/case_studies.ipynb) only plot these files, so they stay
fast enough for the test suite.
"""

import argparse
import contextlib
import fcntl
import hashlib
import io
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
PARITY = ["--preset", "cpu-r1-zero"]  # 80 steps, 16 x 16 answers, lr 2e-4, no KL, eval every 10
STEPS_60 = ["--max_steps", "60"]  # figure 14.5's runs
RFT = ["--adv_estimator", "rft"]  # online RFT: learn from the right answers only
SUM_NORM = ["--loss_agg", "seq-mean-token-sum-norm"]  # Dr. GRPO's constant normaliser
DR_GRPO = ["--scale_rewards", "none", *SUM_NORM]

# study -> variant -> (script, flags). Every variant of a study shares the study's common flags
# (COMMON, else SHORT) and the seed.
# fmt: off
STUDIES = {
    # Chapter figure 14.5 (DeepSeekMath): RFT < online RFT < GRPO (outcome) <= GRPO + process
    # supervision.
    "fig14_5": {
        "rft": ("nano_grpo.py", ["--adv_estimator", "rft", "--offline_rollouts"]),
        "online-rft": ("nano_grpo.py", ["--adv_estimator", "rft"]),
        "grpo": ("nano_grpo.py", []),
        "grpo-ps": ("nano_grpo.py", ["--supervision", "process"]),
        "dr-grpo": ("nano_grpo.py", DR_GRPO),
    },
    # Chapter figure 14.3: PPO's total shaped reward, task reward and negative KL reward.
    "fig14_3": {"ppo": ("nano_ppo.py", [])},
    # DeepSeek R1 vs R1-Zero: RL from the cold-start SFT model vs from a base model never shown
    # the format, and from a base model with a weak prior (3% of its pre-training documents are
    # R1-format transcripts).
    "r1_zero": {
        "cold-start": ("nano_grpo.py", []),
        "r1-zero": ("nano_grpo.py", ["--model", "assets/tiny-addition-base"]),
        "r1-zero-web": ("nano_grpo.py", ["--model", "assets/tiny-addition-base-web"]),
    },
    # Qwen 3: one model, two modes; accuracy against the thinking budget, before and after RL.
    "think_budget": {
        "think-only": ("nano_grpo.py", ["--model", "assets/tiny-addition-fusion"]),
        "both-modes": ("nano_grpo.py", ["--model", "assets/tiny-addition-fusion",
                                        "--think_mode", "both"]),
    },
    # Kimi k1.5 length reward and DAPO's overlong penalty; Dr. GRPO's length bias of per-answer
    # means.
    "length": {
        "plain": ("nano_grpo.py", []),
        "kimi-length": ("nano_grpo.py", ["--length_reward", "0.5"]),
        "overlong": ("nano_grpo.py", ["--overlong_buffer", "8", "--max_new_tokens", "28"]),
        "seq-mean-token-sum-norm": ("nano_grpo.py", ["--loss_agg", "seq-mean-token-sum-norm"]),
    },
    # ---- the parity model (issue 15): the chapter's phenomena where answers can grow ----------
    # R1-Zero in miniature: GRPO from a base model that rarely thinks; per difficulty, held-out
    # accuracy and answer length over training, the shares of traces and of "wait" retries.
    "r1_zero_parity": {"grpo": ("nano_grpo.py", [])},
    # Qwen 3's thinking budget: held-out accuracy per difficulty against --think_budget, for the
    # base model and for the R1-Zero run's last checkpoint (r1_zero_parity's run, reused).
    "think_budget_parity": {"grpo": ("nano_grpo.py", [])},
    # Dr. GRPO's length bias [DR-GRPO]: per-answer token means vs Dr. GRPO; the same normalisers
    # in online RFT (fig14_5_parity's runs, reused), and near the length limit (16 new tokens:
    # a 12-bit trace no longer fits).
    "dr_grpo_parity": {
        "grpo": ("nano_grpo.py", []),
        "dr-grpo": ("nano_grpo.py", DR_GRPO),
        "online-rft": ("nano_grpo.py", [*RFT, *STEPS_60]),
        "online-rft-sum-norm": ("nano_grpo.py", [*RFT, *SUM_NORM, *STEPS_60]),
        "grpo-16": ("nano_grpo.py", ["--max_new_tokens", "16"]),
        "dr-grpo-16": ("nano_grpo.py", [*DR_GRPO, "--max_new_tokens", "16"]),
    },
    # Kimi k1.5's length reward [R-LEN]: shorter answers at equal accuracy?
    "kimi_parity": {
        "plain": ("nano_grpo.py", []),
        "kimi-length": ("nano_grpo.py", ["--length_reward", "0.2"]),
    },
    # Figure 14.5 on the hard bucket, 60 steps: offline RFT, online RFT (with per-answer means and
    # with the constant normaliser), GRPO (outcome), GRPO + process supervision (a step verifier).
    "fig14_5_parity": {
        "rft": ("nano_grpo.py", [*RFT, "--offline_rollouts", *STEPS_60]),
        "online-rft": ("nano_grpo.py", [*RFT, *STEPS_60]),
        "online-rft-sum-norm": ("nano_grpo.py", [*RFT, *SUM_NORM, *STEPS_60]),
        "grpo": ("nano_grpo.py", STEPS_60),
        "grpo-ps": ("nano_grpo.py", ["--supervision", "process", *STEPS_60]),
    },
}
# fmt: on
COMMON = {s: PARITY for s in STUDIES if s.endswith("_parity")}


BUDGETS = [0, 2, 4, 6, 8, 10, 12, 14, 16, 32]  # thinking tokens allowed (the full trace is ~16)


def think_budget_eval(model_path: str, seed: int, cfg=None) -> dict:
    """Qwen 3's test-time compute control on the fusion model: held-out greedy accuracy in thinking
    mode, in no-think mode (" /no_think"), and with thinking cut after N tokens."""
    sys.path.insert(0, ROOT)
    import nano_grpo as G

    cfg = G.Config(eval_size=200, seed=seed)
    model, tok = G.load_model(model_path, cfg)
    examples = G.rewards.load_task("addition", "test", n=cfg.eval_size, seed=seed)

    def prompts(suffix):
        return [
            tok.encode(
                G.rewards.build_prompt(
                    "addition", {**ex, "question": ex["question"] + suffix}, tok
                ),
                add_special_tokens=False,
            )
            for ex in examples
        ]

    def acc(suffix, key="eval_acc"):
        return G.evaluate(model, model, tok, examples, prompts(suffix), cfg)[key]

    out = {"think": acc(""), "no_think": acc(" /no_think")}
    for budget in BUDGETS:
        cfg.think_budget = budget
        out[f"budget_{budget}"] = acc("", "eval_acc_budget")
    return out


# tokens of the think block allowed, <think> included: a d-bit trace needs d + 1 (hard: 10-13)
PARITY_BUDGETS = [*range(15), 32]


def parity_budget_eval(model_path: str, seed: int, cfg) -> dict:
    """The thinking budget on the parity model: held-out greedy accuracy (per difficulty bucket)
    with the think block cut after N tokens (then `</think>` is forced and the model answers), on
    the run's own held-out strings (cfg: the run's config); "free": no budget, with the shares of
    thinking answers and their lengths per bucket."""
    sys.path.insert(0, ROOT)
    import nano_grpo as G

    model, tok = G.load_model(model_path, cfg)
    examples = G.rewards.load_task(cfg.task, "test", n=cfg.eval_size, seed=seed)
    prompts = [G.prompt_ids(tok, cfg, ex) for ex in examples]
    out = {"free": G.evaluate(model, model, tok, examples, prompts, cfg)}
    for budget in PARITY_BUDGETS:
        cfg.think_budget = budget
        m = G.evaluate(model, model, tok, examples, prompts, cfg)
        out[f"budget_{budget}"] = {k: v for k, v in m.items() if k.startswith("eval_acc_budget")}
    cfg.think_budget = -1
    return out


BUDGET_EVALS = {  # the studies that evaluate under a thinking budget: study -> (eval, budgets)
    "think_budget": (think_budget_eval, BUDGETS),
    "think_budget_parity": (parity_budget_eval, PARITY_BUDGETS),
}


def machine() -> str:
    cpu = platform.processor() or "?"
    if os.path.exists("/proc/cpuinfo"):
        names = [ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if "model name" in ln]
        cpu = names[0] if names else cpu
    return f"{platform.machine()}, {os.cpu_count()} cores ({cpu}), {platform.platform()}"


def load() -> float:
    return round(os.getloadavg()[0], 2)


def code_version() -> str:
    """The commit the runs ran on, and a hash of the uncommitted changes to the training code."""

    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout

    code = ["nano_grpo.py", "nano_ppo.py", "rewards.py", "assets", ":(exclude)*.md"]  # not docs
    diff = git("diff", "HEAD", "--", *code)
    commit = git("rev-parse", "--short", "HEAD").strip() or "?"
    changed = hashlib.sha256(diff.encode()).hexdigest()[:10]
    return commit + (f" + uncommitted changes {changed}" if diff else "")


def train(script: str, flags: list[str], seed: int, out_dir: str) -> dict:
    """One run in a subprocess, into out_dir (kept: its metrics and last checkpoint)."""
    cmd = [sys.executable, script, *flags, "--seed", str(seed), "--output_dir", out_dir]
    t0, load0 = time.time(), load()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return {
        "cmd": " ".join(["python", *cmd[1:-2]]),
        "seconds": round(time.time() - t0, 1),
        "final": proc.stdout.strip().splitlines()[-1],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t0)),
        "load": f"{load0} -> {load()}",  # 1-minute load average at the start and at the end
        "threads": os.environ.get("OMP_NUM_THREADS", "torch's default (one per core)"),
        "code": code_version(),
    }


def budget_study(study: str, flags: list[str], seed: int, run_dir: str, out_file: str) -> float:
    """Before (the starting model) and after (the run's last checkpoint), under each budget."""
    sys.path.insert(0, ROOT)
    import nano_grpo as G

    evaluate, budgets = BUDGET_EVALS[study]
    t0 = time.time()
    with contextlib.redirect_stdout(io.StringIO()):  # parse_config names the preset
        cfg = G.parse_config([*flags, "--seed", str(seed)])
    start = cfg.model if os.path.isabs(cfg.model) else os.path.join(ROOT, cfg.model)
    after = os.path.join(run_dir, open(os.path.join(run_dir, "latest")).read().strip())
    before = evaluate(start, seed, cfg)
    result = {"before": before, "after": evaluate(after, seed, cfg), "budgets": budgets}
    json.dump(result, open(out_file, "w"), indent=1)
    return round(time.time() - t0, 1)


def saved_run(meta: dict, script: str, flags: list[str], seed: int):
    """The key of an earlier invocation's run of this very command on this very code (its metrics
    file still saved), or None."""
    cmd, code = " ".join(["python", script, *flags, "--seed", str(seed)]), code_version()
    for key, info in meta["runs"].items():
        path = os.path.join(RESULTS, f"{key}.jsonl")
        if info["cmd"] == cmd and info.get("code") == code and "note" not in info:
            if os.path.exists(path):
                return key
    return None


def save_meta(meta_path: str, study: str, key: str, info: dict):
    """Add one run to meta.json, re-read under a lock: two runners may share it (two at a time)."""
    with open(os.path.join(tempfile.gettempdir(), "nano-rlvr-studies.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"runs": {}}
        meta["runs"][key] = info
        now = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        about = dict(date=now, machine=machine(), python=platform.python_version())
        meta.update(about)  # the last run's
        common = " ".join(COMMON.get(study, SHORT))
        meta.setdefault("studies", {})[study] = {**about, "common_flags": common}
        if study not in COMMON:
            meta["common_flags"] = " ".join(SHORT)  # the addition studies' (notebook 03)
        json.dump(meta, open(meta_path + ".tmp", "w"), indent=1)
        os.replace(meta_path + ".tmp", meta_path)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", nargs="+", default=list(STUDIES), choices=list(STUDIES))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument(
        "--variants", nargs="+", default=None, help="only these variants (default: all)"
    )
    args = ap.parse_args()
    meta_path = os.path.join(RESULTS, "meta.json")
    jobs = [
        (s, v, seed)
        for s in args.studies
        for v in STUDIES[s]
        for seed in args.seeds
        if args.variants is None or v in args.variants
    ]
    done = {}  # (script, flags, seed) -> (run folder, its first key, its meta entry)
    with tempfile.TemporaryDirectory(prefix="studies-") as tmp:
        for study, variant, seed in tqdm(jobs, desc="studies"):
            script, flags = STUDIES[study][variant]
            if not os.path.exists(os.path.join(ROOT, script)) or any(
                f.startswith("assets/") and not os.path.isdir(os.path.join(ROOT, f)) for f in flags
            ):
                tqdm.write(f"skip {study}/{variant}: {script} or its model is missing")
                continue
            key, flags = f"{study}/{variant}-s{seed}", [*COMMON.get(study, SHORT), *flags]
            meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {"runs": {}}
            earlier = None if study in BUDGET_EVALS else saved_run(meta, script, flags, seed)
            os.makedirs(os.path.join(RESULTS, study), exist_ok=True)
            if earlier == key:  # this very run is saved already (an interrupted invocation's)
                tqdm.write(f"{key}: saved already, on this code")
                continue
            if (script, tuple(flags), seed) in done:
                run_dir, first, info = done[script, tuple(flags), seed]
                info = {**info, "note": f"same command as {first}: that run, reused"}
                source = os.path.join(run_dir, "metrics.jsonl")
            elif earlier:  # run by an earlier invocation on the same code: its file
                run_dir, info = None, {**meta["runs"][earlier]}
                info["note"] = f"same command as {earlier}: that run, reused"
                source = os.path.join(RESULTS, f"{earlier}.jsonl")
            else:
                run_dir = os.path.join(tmp, f"run-{len(done)}")
                info = train(script, flags, seed, run_dir)
                done[script, tuple(flags), seed] = (run_dir, key, info)
                source = os.path.join(run_dir, "metrics.jsonl")
            if study in BUDGET_EVALS:
                out_file = os.path.join(RESULTS, study, f"{variant}-s{seed}.json")
                info = {**info, "eval_seconds": budget_study(study, flags, seed, run_dir, out_file)}
            else:
                shutil.copy(source, os.path.join(RESULTS, study, f"{variant}-s{seed}.jsonl"))
            save_meta(meta_path, study, key, info)
            tqdm.write(f"{key}: {info['final']} ({info['seconds']} s, load {info['load']})")


if __name__ == "__main__":
    main()
