"""make gpu-check: the one-GPU path in a few minutes, for whoever has a GPU (issue 13).

Needs torch and transformers only: no vLLM, no internet (the models are random-init from the
config.json copies in assets/model_configs/). Under 8 minutes on one H100/H200-class GPU:
  a) the tiny model (assets/tiny-addition) trains with --rollout hf --bf16
     --gradient_checkpointing for TINY_STEPS steps: the reward must rise;
  b) one full update of GRPO and of PPO for each GPU preset's model (Qwen2.5-0.5B-Instruct,
     Qwen2.5-3B), at the preset's batch, micro-batch and lengths (synthetic prompt + answer ids,
     every answer at the limit): the measured peak (torch.cuda.max_memory_allocated, reset before
     the update, AdamW's moments already there) next to the memory plan's trainer side (no
     engine: vLLM is absent), seconds per update, tokens per second, TFLOP/s and MFU (the
     log's train_tflops and mfu: preflight.throughput);
  c) fp16 forced on the card (what a T4 or V100 runs: fp32 master weights, fp16 autocast, a
     GradScaler): three updates of GRPO `gpu`, the skipped steps and the loss scale; one update
     begun at a loss scale of 2^100 must be skipped (no weight moves) and halve the scale;
  d) a 16 GB card emulated (torch.cuda.set_per_process_memory_fraction: 14.6 GiB, a T4's), the
     sizes --preset gpu picks for it, fp16: one GRPO and one PPO update, peak vs plan.
Exit status 1 if the reward does not rise, a measured peak exceeds its plan by more than 15%,
an update runs out of memory, or the overflow step is not skipped. On CPU only part (a) runs.
"""

import copy
import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no internet: nothing may be downloaded
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import preflight  # noqa: E402

sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
import memory_check  # noqa: E402  the CPU check's random rollout samples

PEAK_TOLERANCE = 1.15  # a measured peak may exceed the plan by 15% at most
TINY_STEPS = {"cuda": 30, "cpu": 12}  # part (a): the carry is learned within ~20 steps
UPDATES = [("grpo", "gpu"), ("ppo", "gpu"), ("grpo", "gpu-countdown"), ("ppo", "gpu-countdown")]
T4_GIB = 14.56  # what torch reports for a 16 GB T4


def tiny_run(device: str) -> bool:
    """Part (a): nano_grpo on the tiny model, HF rollouts, bf16, gradient checkpointing. True if
    the mean reward of the last 5 steps beats the first 5 steps'."""
    import nano_grpo as G

    flags = (
        "--preset cpu-demo --rollout hf --precision auto --gradient_checkpointing --eval_every 0"
    )
    flags = flags.split() + ["--save_every", "0", "--max_steps", str(TINY_STEPS[device])]
    with tempfile.TemporaryDirectory() as out:
        start = time.time()
        G.main(G.parse_config(flags + ["--output_dir", out]))
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:]
    first, last = (sum(r["reward"] for r in part) / len(part) for part in (rows[:5], rows[-5:]))
    seconds = (time.time() - start) / len(rows)
    print(
        f"(a) tiny model, {len(rows)} steps: reward {first:.2f} -> {last:.2f} "
        f"(first and last 5 steps), {seconds:.2f} s/step"
    )
    return last > first


def synthetic_batch(module, cfg, rows: int, prompt: int, vocab: int) -> dict:
    """make_batch of rows random answers, each max_new_tokens long after a prompt of `prompt`
    tokens (the plan's widest batch), rewards alternating 0/1, with what train_on_batch needs."""
    samples = memory_check.synthetic_samples(rows, prompt, cfg.max_new_tokens, vocab)
    batch = module.make_batch(samples, pad_id=0)
    if hasattr(module, "token_advantages"):
        batch["advantages"] = module.token_advantages(samples, batch["response_mask"], cfg)
    else:
        batch["scores"] = module.answer_scores(samples, cfg)
    return batch


def build_update(script: str, preset: str, flags=()):
    """A random-init model from the preset's shipped config.json, on the GPU, set up as
    load_models and main do (reference in 16 bits, PPO's critic, fused AdamW with its moments
    already made); returns (module, cfg, the update to run, tokens in its batch, the policy's
    optimizer, the model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    module = __import__(f"nano_{script}")
    cfg = module.parse_config(["--preset", preset, "--rollout", "vllm", *flags])
    config = AutoConfig.from_pretrained(os.path.join(ROOT, "assets", "model_configs", cfg.model))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).train()
    model.gradient_checkpointing_enable()
    ref = copy.deepcopy(model).to(module.HALF.get(cfg.precision, torch.float32))
    ref.eval().requires_grad_(False)
    rows = cfg.prompts_per_step * cfg.group_size
    batch = synthetic_batch(module, cfg, rows, preflight.PLAN_PROMPT_TOKENS, config.vocab_size)
    optimizer = module.adamw(model.parameters(), cfg.learning_rate, cfg)
    if script == "grpo":
        optimizers = [optimizer]

        def update():
            return module.train_on_batch(model, ref, optimizer, batch, cfg)
    else:
        critic = module.build_critic(model, cfg.critic_share_backbone).train()
        own = critic.head.parameters() if cfg.critic_share_backbone else critic.parameters()
        optimizers = [optimizer, module.adamw(own, cfg.critic_learning_rate, cfg, optimizer.scaler)]

        def update():
            return module.train_on_batch(model, ref, critic, optimizers, batch, cfg, cfg.beta)

    for opt in optimizers:  # AdamW's moments, as after the first update (zero steps: no change)
        params = [p for group in opt.param_groups for p in group["params"]]
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return module, cfg, config.to_dict(), update, batch["input_ids"].numel(), optimizer, model


def measure_update(script: str, preset: str, flags=(), card_gib=None) -> dict:
    """Parts (b), (d) for one (script, preset): the plan's trainer-side training phase, the
    measured peak, the time of one update."""
    module, cfg, config, update, tokens, _, _ = build_update(script, preset, flags)
    plan = preflight.memory_plan(cfg, config, card_gib or preflight.PRESET_CARD_GIB[preset])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.time()
    metrics = update()
    torch.cuda.synchronize()
    seconds = time.time() - start
    peak = torch.cuda.max_memory_allocated()
    card = preflight.find_card(cfg)
    speed = preflight.throughput(
        preflight.model_sizes(config), {**metrics, "time_train": seconds}, card, cfg.precision
    )
    return dict(
        tflops=speed["train_tflops"],
        mfu=speed.get("mfu"),
        name=f"{script} {preset} ({cfg.model}, {cfg.precision}, micro {cfg.micro_batch_size})",
        plan=plan["trainer"]["training"],
        measured=peak,
        seconds=seconds,
        tokens=tokens,
    )


def within_plan(measured: float, plan: float) -> bool:
    """The check of part (b): a measured peak at most PEAK_TOLERANCE x its plan."""
    return measured <= PEAK_TOLERANCE * plan


def report_line(r: dict) -> str:
    """One row of part (b)'s table: GiB, ratio, verdict, speed."""
    gib, ratio = 2**30, r["measured"] / r["plan"]
    verdict = "ok" if within_plan(r["measured"], r["plan"]) else "OVER THE PLAN"
    return (
        f"  {r['name']:<44} plan {r['plan'] / gib:6.2f}  measured {r['measured'] / gib:6.2f} "
        f"GiB ({ratio:.2f}, {verdict})  {r['seconds']:6.1f} s/update  "
        f"{r['tokens'] / r['seconds']:8.0f} tokens/s  {r['tflops']:6.1f} TFLOP/s"
        + (f" (mfu {r['mfu']:.1%})" if r.get("mfu") else "")
    )


def fp16_updates() -> bool:
    """Part (c): GRPO `gpu` forced to fp16 on this card: three updates (skipped steps, the loss
    scale), then one begun at a scale of 2^100, which must overflow, be skipped and halve it."""
    module, cfg, config, update, tokens, optimizer, model = build_update(
        "grpo", "gpu", ["--precision", "fp16"]
    )
    lines = []
    for i in range(3):
        m = update()
        lines.append(f"skipped {m['skipped_steps']}, scale {m['loss_scale']:.0f}")
    print(f"(c) fp16 on {torch.cuda.get_device_name(0)}, 3 updates: " + "; ".join(lines))
    optimizer.scaler = torch.amp.GradScaler("cuda", init_scale=2.0**100)
    before = [p.detach().clone() for p in list(model.parameters())[:4]]
    m = update()
    still = all(torch.equal(b, p) for b, p in zip(before, list(model.parameters())[:4]))
    ok = m["skipped_steps"] == 1 and m["loss_scale"] == 2.0**99 and still
    print(
        f"    begun at 2^100: skipped {m['skipped_steps']}, scale 2^99: {ok}, weights kept: {still}"
    )
    del module, update, optimizer, model
    gc.collect()
    torch.cuda.empty_cache()
    return ok


def emulated_t4() -> bool:
    """Part (d): a 16 GB card emulated on this one; the sizes --preset gpu picks for it, fp16."""
    total = torch.cuda.get_device_properties(0).total_memory / 2**30
    torch.cuda.set_per_process_memory_fraction(T4_GIB / total)
    flags = ["--gpu_memory_gib", str(T4_GIB), "--precision", "fp16"]
    ok = True
    print(f"(d) a {T4_GIB} GiB card emulated (memory fraction {T4_GIB / total:.3f}):")
    for script in ("grpo", "ppo"):
        try:
            r = measure_update(script, "gpu", flags, card_gib=T4_GIB)
            ok &= within_plan(r["measured"], r["plan"])
            print(report_line(r), flush=True)
        except torch.cuda.OutOfMemoryError as e:
            ok = False
            print(f"  {script} gpu: out of memory ({str(e).splitlines()[0]})")
        gc.collect()
        torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    return ok


def main() -> int:
    start, device = time.time(), "cuda" if torch.cuda.is_available() else "cpu"
    ok = tiny_run(device)
    if device == "cuda":
        print(
            f"(b) one update per preset model on {torch.cuda.get_device_name(0)}; the plan's "
            "trainer side (vLLM absent), torch.cuda.max_memory_allocated:"
        )
        for script, preset in UPDATES:
            try:
                r = measure_update(script, preset)
                ok &= within_plan(r["measured"], r["plan"])
                print(report_line(r), flush=True)
            except torch.cuda.OutOfMemoryError as e:
                ok = False
                print(f"  {script} {preset}: out of memory ({str(e).splitlines()[0]})")
            gc.collect()  # this update's models, before the next one's
            torch.cuda.empty_cache()
        ok &= fp16_updates()
        ok &= emulated_t4()
    else:
        print("(b) skipped: no CUDA GPU")
    print(f"gpu check: {'passed' if ok else 'FAILED'} in {time.time() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
