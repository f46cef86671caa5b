"""The GPU memory plan's arithmetic against measured peaks, on CPU, at small scale.

    python benchmarks/memory_check.py            # every case, a table (~4 minutes on 2 cores)
    python benchmarks/memory_check.py --case 0   # one case, as JSON (what the table runs)

Each case builds a random-init Qwen2 (GQA, tied embeddings, like Qwen2.5), a bf16 or fp32
reference model and, for PPO, a critic the way load_models does, and runs the script's own
train_on_batch twice on a batch of two micro-batches of synthetic prompt+answer ids, answers at
the length limit: the first call creates AdamW's moments, the second is measured. The plan's
prediction for that call is its training phase above what stays held (weights, AdamW moments,
reference, a critic's own states): max(gradients + the largest backward moment, the largest
no-grad pass), memory_plan's "update". Most cases use the real 151,936-word vocabulary, where
the logits and LM-head terms dominate, as they do on a GPU; a few use 512 words, where the
layers' terms do. One more runs generate_hf (--rollout hf) against the plan's "HF generate" parts.

Two measures, each case in a fresh process:
  tensors  torch's profiler records every CPU allocation and free during the measured call: the
           peak of the bytes allocated above the start. That is what a GPU's max_memory_allocated
           counts (live tensor bytes, no allocator cache): the number compared with the plan.
  rss      the process's peak resident memory during the call, above its resident memory just
           before (Linux: VmHWM reset through /proc/self/clear_refs), glibc told to map every
           allocation over 128 KiB by itself (MALLOC_MMAP_THRESHOLD_) so freed tensors leave.
           What the allocator and the OS add on top; a cross-check.
The scripts' AdamW is fused on CUDA only; here it is fused too (torch's CPU kernel), as on a GPU.
"""

import argparse
import copy
import ctypes
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import preflight  # noqa: E402

QWEN_VOCAB = 151_936


def case(script, bf16, gc, rows, prompt, answer, hidden, layers, vocab=QWEN_VOCAB, **more):
    """One measured configuration: a script's train_on_batch (more: PPO's shared=..., or
    kind="generate" for generate_hf) on a micro-batch of rows x (prompt + answer) tokens."""
    return dict(
        script=script,
        bf16=bf16,
        gc=gc,
        rows=rows,
        prompt=prompt,
        answer=answer,
        hidden=hidden,
        layers=layers,
        vocab=vocab,
        **more,
    )


CASES = [
    case("grpo", True, True, 4, 64, 64, 64, 2),  # two logits chunks of 2**26 logits
    case("grpo", True, True, 2, 32, 32, 128, 2),  # one chunk: the LM head's terms dominate
    case("grpo", False, True, 4, 64, 64, 64, 2),
    case("grpo", True, False, 2, 64, 64, 128, 2),
    case("ppo", True, True, 4, 64, 64, 64, 2, shared=True),
    case("ppo", True, True, 2, 32, 32, 128, 2, shared=False),
    case("grpo", True, True, 4, 64, 64, 256, 3, vocab=512),
    case("grpo", True, False, 4, 64, 64, 256, 3, vocab=512),
    case("grpo", False, False, 4, 64, 64, 256, 3, vocab=512),
    case("ppo", True, True, 4, 64, 64, 256, 3, vocab=512, shared=True),
    case("ppo", False, False, 4, 64, 64, 256, 3, vocab=512, shared=False),
    case("grpo", False, False, 16, 64, 8, 128, 2, kind="generate"),
]


def qwen2(hidden: int, layers: int, vocab: int = QWEN_VOCAB, seed: int = 0):
    """A random-init Qwen2: head_dim 32, 2 KV heads (GQA, as Qwen2.5), MLP 11/4 x hidden."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 32,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).float()


def synthetic_samples(n: int, prompt: int, answer: int, vocab: int) -> list[dict]:
    """n rollout samples of random ids, every answer at the length limit (the widest batch)."""
    import torch

    g = torch.Generator().manual_seed(1)
    out = []
    for i in range(n):
        ids = torch.randint(10, vocab, (prompt + answer,), generator=g).tolist()
        out.append(
            dict(
                prompt_ids=ids[:prompt],
                response_ids=ids[prompt:],
                truncated=True,
                reward=float(i % 2),
                components={"correct": 0.0},
                rollout_logprobs=None,
            )
        )
    return out


def setup(c: dict):
    """The script's module and Config, the policy, and the call to measure (built as load_models
    and main build them, with fused AdamW as on CUDA)."""
    import torch

    module = __import__(f"nano_{c['script']}")
    cfg = module.Config(
        precision="bf16" if c["bf16"] else "fp32",
        gradient_checkpointing=c["gc"],
        micro_batch_size=c["rows"],
        max_new_tokens=c["answer"],
        beta=0.04,
    )
    model = qwen2(c["hidden"], c["layers"], c["vocab"]).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    samples = synthetic_samples(2 * c["rows"], c["prompt"], c["answer"], c["vocab"])
    if c.get("kind") == "generate":
        cfg.rollout, cfg.prompts_per_step, cfg.group_size, cfg.eval_size = "hf", c["rows"], 1, 0
        prompts, stop = (
            [s["prompt_ids"] for s in samples[: c["rows"]]],
            dict(ids=[3], texts=[], tokenizer=None),
        )
        return (
            module,
            cfg,
            model,
            lambda: module.generate_hf(model, prompts, 1, 1.0, c["answer"], stop, 0),
        )
    ref = copy.deepcopy(model).to(torch.bfloat16 if cfg.precision == "bf16" else torch.float32)
    ref.eval().requires_grad_(False)
    batch = module.make_batch(samples, pad_id=0)

    def adamw(params):
        return torch.optim.AdamW(params, 1e-5, fused=True)

    if c["script"] == "grpo":
        cfg.group_size = c["rows"]
        batch["advantages"] = module.token_advantages(samples, batch["response_mask"], cfg)
        optimizer = adamw(model.parameters())
        return module, cfg, model, lambda: module.train_on_batch(model, ref, optimizer, batch, cfg)
    cfg.ppo_epochs, cfg.num_mini_batches, cfg.critic_share_backbone = 1, 1, c["shared"]
    batch["scores"] = module.answer_scores(samples, cfg)
    critic = module.build_critic(model, cfg.critic_share_backbone).train()
    critic_params = critic.head.parameters() if cfg.critic_share_backbone else critic.parameters()
    optimizers = (adamw(model.parameters()), adamw(critic_params))
    return (
        module,
        cfg,
        model,
        lambda: module.train_on_batch(model, ref, critic, optimizers, batch, cfg, cfg.beta),
    )


def tensor_peak(fn) -> int:
    """Peak bytes allocated above the start while fn runs, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    now = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        now += e.nbytes()
        peak = max(peak, now)
    return peak


def status_kib(field: str) -> int:
    """A line of /proc/self/status (VmRSS, VmHWM), KiB."""
    line = next(x for x in open("/proc/self/status") if x.startswith(field + ":"))
    return int(line.split()[1])


def rss_peak(fn) -> int:
    """Peak resident bytes while fn runs, above the resident bytes just before (Linux)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    before = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - before) * 1024


def planned(module, cfg, model, c: dict) -> dict:
    """The plan's prediction for the measured call, and the parts it comes from."""
    plan = preflight.memory_plan(cfg, model.config.to_dict(), 0.0, prompt_tokens=c["prompt"])
    if c.get("kind") == "generate":
        parts = [p for p in plan["parts"] if p[0].startswith("HF generate")]
        return dict(plan=sum(b for _, b, _ in parts), parts=parts)
    parts = [p for p in plan["parts"] if p[2] in ("step", "moment", "pass")]
    return dict(plan=plan["update"], parts=parts)


def measure(c: dict) -> dict:
    """One case in this process: a warm-up call, then the measured ones."""
    import torch

    torch.set_num_threads(2)
    module, cfg, model, call = setup(c)
    call()  # AdamW's moments are created here, held from now on as on a GPU
    start = time.time()
    tensors = tensor_peak(call)
    seconds = time.time() - start
    return dict(
        case=c,
        tensors=tensors,
        rss=rss_peak(call),
        seconds=seconds,
        **planned(module, cfg, model, c),
    )


def describe(c: dict) -> str:
    """A case in a few words."""
    what = "generate_hf" if c.get("kind") == "generate" else c["script"]
    critic = {True: " shared", False: " own critic"}.get(c.get("shared"), "")
    return (
        f"{what} {'bf16' if c['bf16'] else 'fp32'} {'gc' if c['gc'] else 'no-gc'} "
        f"{c['rows']}x{c['prompt'] + c['answer']} h{c['hidden']} L{c['layers']} "
        f"V{c['vocab']}{critic}"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--case", type=int, help="measure this case in this process, print JSON")
    args = parser.parse_args()
    if args.case is not None:
        print(json.dumps(measure(CASES[args.case])))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024), "HF_HUB_OFFLINE": "1"}
    mib, ratios = 2**20, []
    print(f"{'case':<46} {'plan':>6} {'tensors':>8} {'/plan':>6} {'rss':>6} {'/plan':>6}  (MiB)")
    for i in range(len(CASES)):
        out = subprocess.run(
            [sys.executable, __file__, "--case", str(i)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ratios.append(r["tensors"] / r["plan"])
        print(
            f"{describe(r['case']):<46} {r['plan'] / mib:6.0f} {r['tensors'] / mib:8.0f} "
            f"{ratios[-1]:6.2f} {r['rss'] / mib:6.0f} {r['rss'] / r['plan']:6.2f}",
            flush=True,
        )
    print(f"measured / plan: {min(ratios):.2f} to {max(ratios):.2f}")


if __name__ == "__main__":
    main()
