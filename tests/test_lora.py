"""LoRA (issue 22), on the tiny model on CPU: the adapter starts as the identity (B = 0), pi_ref is
the same network with its adapters off, only adapters train, the engine gets the merged weights,
a checkpoint holds the adapters alone and resumes, and the merged folder loads in transformers and
vLLM and answers as the trainer does. The memory plan knows LoRA (the issue's dry runs)."""

import os

import pytest
import torch
from helpers import HAS_VLLM, TINY_MODEL, random_samples, run_script

import nano_grpo as G
import nano_ppo as P
import preflight as PF

GIB = 2**30


def lora_model(rank=8, alpha=32.0, seed=0):
    torch.manual_seed(seed)
    model, tok = G.load_model(TINY_MODEL, G.Config())
    return G.add_lora(model, rank, alpha, G.Config().lora_targets).train(), tok


def logprobs(model, batch):
    with torch.no_grad():
        return G.token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0)


def a_batch(tok, cfg):
    samples = random_samples(n_groups=2, group_size=4, vocab=tok.vocab_size - 10, eos_id=1)
    batch = G.make_batch(samples, tok.pad_token_id)
    batch["advantages"] = G.token_advantages(samples, batch["response_mask"], cfg)
    return batch


def train(model, cfg, steps, tok):
    optimizer = G.adamw(model.parameters(), 1e-2, cfg)
    ref = G.WithoutAdapters(model)
    for _ in range(steps):
        G.train_on_batch(model, ref, optimizer, a_batch(tok, cfg), cfg)
    return optimizer


def test_at_step_0_the_adapted_model_is_the_base_model_exactly():
    base, tok = G.load_model(TINY_MODEL, G.Config())
    model, _ = lora_model()
    adapted = [m for m in model.modules() if isinstance(m, G.LoRALinear)]
    assert len(adapted) == 4 * 7  # every attention and MLP linear of the 4 layers
    batch = a_batch(tok, G.Config())
    assert torch.equal(logprobs(model, batch), logprobs(base, batch))


def test_only_the_adapters_train_and_the_reference_stays_the_base_exactly():
    base, tok = G.load_model(TINY_MODEL, G.Config())
    model, _ = lora_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = G.Config(lora_rank=8, beta=0.04, micro_batch_size=4)
    optimizer = train(model, cfg, steps=5, tok=tok)
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved == {k for k in before if ".lora_" in k}  # every adapter moved, nothing else
    assert all(p.requires_grad for group in optimizer.param_groups for p in group["params"])
    batch = a_batch(tok, cfg)
    assert torch.equal(logprobs(G.WithoutAdapters(model), batch), logprobs(base, batch))
    assert not torch.allclose(logprobs(model, batch), logprobs(base, batch))


def test_merged_weights_are_the_adapted_layers():
    model, tok = lora_model()
    train(model, G.Config(lora_rank=8, beta=0.0, micro_batch_size=4), 2, tok)
    merged = dict(G.engine_weights(model))
    assert not any(".lora_" in k or ".base." in k for k in merged)
    plain, _ = G.load_model(TINY_MODEL, G.Config())
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    batch = a_batch(tok, G.Config())
    torch.testing.assert_close(logprobs(plain, batch), logprobs(model, batch), atol=1e-5, rtol=0)


def test_a_lora_run_gets_ten_times_the_learning_rate_unless_given(capsys):
    cfg = G.parse_config(["--lora_rank", "8"])
    assert cfg.learning_rate == 10 * G.Config().learning_rate
    assert "LoRA rank 8: learning rate 0.001 (10x)" in capsys.readouterr().out
    assert G.parse_config(["--lora_rank", "8", "--learning_rate", "3e-4"]).learning_rate == 3e-4


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_the_engine_after_a_sync_gives_the_trainers_logprobs_with_adapters_on():
    model, tok = lora_model()
    cfg = G.Config(lora_rank=8, beta=0.04, micro_batch_size=4)
    train(model, cfg, 2, tok)
    llm = G.start_vllm(G.Config(), TINY_MODEL, seed=0)
    probe = [G.prompt_ids(tok, cfg, ex) for ex in G.rewards.load_task("addition", "test", n=20)]
    with pytest.raises(SystemExit, match="does not hold the trainer's weights"):
        G.check_engine_weights(llm, model, probe, 1e-4, cfg)  # the engine still has the base
    G.sync_weights(llm, model)
    assert G.check_engine_weights(llm, model, probe, 1e-4, cfg) < 1e-4
    del llm


class RoundedEngine:
    """A 16-bit engine as the sync check sees it: it was sent the merged weights and holds them
    rounded to bf16 (autocast rounds every other matmul weight the same way); it runs the
    trainer's own bf16 autocast forward on the same padded batch, so the only difference left is
    how the adapted layers' weights were rounded."""

    def __init__(self, model):
        self.model, _ = G.load_model(TINY_MODEL, G.Config())
        adapted = {n + ".weight" for n, m in model.named_modules() if isinstance(m, G.LoRALinear)}
        sent = dict(G.engine_weights(model))
        for name in adapted:
            sent[name] = sent[name].to(torch.bfloat16).float()
        self.model.load_state_dict(sent)

    def logprobs(self, prompts):
        batch = G.make_batch([dict(prompt_ids=p[:1], response_ids=p[1:]) for p in prompts], 0)
        with torch.no_grad(), G.autocast(G.Config(precision="bf16"), torch.device("cpu")):
            logp = G.token_logprobs(self.model, batch["input_ids"], batch["attention_mask"], 1.0)
        return logp.float(), batch

    def generate(self, requests, params, use_tqdm=False):
        from types import SimpleNamespace

        prompts = [r["prompt_token_ids"] for r in requests]
        logp, batch = self.logprobs(prompts)
        outs = []
        for row, p in enumerate(prompts):
            lps = logp[row][batch["response_mask"][row] > 0].tolist()
            per_token = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(p[1:], lps)]
            outs.append(SimpleNamespace(prompt_logprobs=[None] + per_token))
        return outs


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (SamplingParams)")
def test_the_bf16_sync_check_compares_with_the_merged_weights_the_engine_holds():
    """B = 0 at start, so the start gap cannot show the rounding of W + (alpha/R) B A to 16 bits;
    the check's forward uses the merged weights (LoRALinear.merged), so that rounding is not
    taken for a stale engine. The adapter path (W x + B A x, each rounded on its own) differs."""
    model, tok = lora_model()
    cfg = G.Config(lora_rank=8, beta=0.0, micro_batch_size=4, precision="bf16")
    train(model, cfg, 3, tok)
    engine = RoundedEngine(model)
    probe = [G.prompt_ids(tok, cfg, ex) for ex in G.rewards.load_task("addition", "test", n=8)]
    assert G.probe_gaps(engine, model, probe, cfg).max().item() == 0.0
    assert not any(m.merged for m in model.modules() if isinstance(m, G.LoRALinear))
    engine_path, batch = engine.logprobs(probe)
    with torch.no_grad(), G.autocast(cfg, torch.device("cpu")):  # the adapter path instead
        adapter_path = G.token_logprobs(model, batch["input_ids"], batch["attention_mask"], 1.0)
    assert (adapter_path - engine_path)[batch["response_mask"] > 0].abs().mean() > 1e-3


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_checkpoint_holds_adapters_resume_continues_and_merged_answers_as_the_trainer(tmp_path):
    from transformers import AutoModelForCausalLM

    flags = ["--lora_rank", "8", "--max_steps", "2", "--save_every", "1", "--eval_every", "0"]
    flags += ["--eval_size", "40", "--prompts_per_step", "8"]
    out, rows = run_script(G, flags, tmp_path)
    checkpoint = tmp_path / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".pt", ".safetensors")) == [
        "adapters.pt",
        "trainer_state.pt",
    ]
    adapters = torch.load(checkpoint / "adapters.pt")
    assert adapters and all(".lora_" in k for k in adapters)
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=False)
    n_adapter = sum(t.numel() for t in adapters.values())
    moments = [t for s in state["optimizer"]["state"].values() for t in s.values() if t.dim()]
    assert sum(t.numel() for t in moments) == 2 * n_adapter  # AdamW's moments: adapters only
    # the merged folder: a plain model that transformers and vLLM load, greedy as the trainer
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    tok, cfg = out["tokenizer"], G.Config()
    prompts = [G.prompt_ids(tok, cfg, ex) for ex in G.rewards.load_task("addition", "test", n=8)]
    stop = G.answer_stop(tok, cfg)
    trainer = [s["response_ids"] for s in G.generate(out["model"], prompts, 1, 0.0, 32, stop, 0)]
    hf = [s["response_ids"] for s in G.generate(merged, prompts, 1, 0.0, 32, stop, 0)]
    vllm = [s["response_ids"] for s in G.generate(out["engine"], prompts, 1, 0.0, 32, stop, 0)]
    assert hf == trainer == vllm
    del out
    engine = G.start_vllm(G.Config(), str(tmp_path / "merged"), seed=0)
    assert [s["response_ids"] for s in G.generate(engine, prompts, 1, 0.0, 32, stop, 0)] == hf
    del engine
    # --resume from checkpoint 2 to step 3: the adapters come back, the steps continue
    _, rows = run_script(G, flags[:2] + ["--max_steps", "3", "--resume"] + flags[4:], tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]


def test_ppo_puts_its_value_head_on_the_adapted_trunk(capsys):
    cfg = P.parse_config(["--lora_rank", "8"])
    assert cfg.critic_share_backbone
    model, _ = lora_model()
    critic = P.build_critic(model, cfg.critic_share_backbone)
    assert critic.backbone is model.base_model
    assert {n for n, p in critic.named_parameters() if p.requires_grad} >= {"head.weight"}


# ---- the memory plan knows LoRA ---------------------------------------------------------------
def plan_line(module, flags, capsys):
    with pytest.raises(SystemExit) as stop:
        module.main(module.parse_config(flags + ["--dry_run"]))
    lines = capsys.readouterr().out.strip().splitlines()
    return stop.value.code, lines


def test_adapter_count_by_hand():
    """Qwen2.5-3B, rank 64, 7 targets: per layer 64 x (q 2048+2048, k 2048+256, v 2048+256,
    o 2048+2048, gate and up 2048+11008 each, down 11008+2048) = 64 x 51,968; 36 layers."""
    s = PF.model_sizes(PF.model_config("Qwen/Qwen2.5-3B"))
    assert PF.lora_parameters(s, G.Config(lora_rank=64)) == 36 * 64 * 51_968


@pytest.mark.parametrize("module", [G, P])
@pytest.mark.parametrize(
    "flags, card",
    [
        (["--preset", "gpu-countdown", "--lora_rank", "64", "--gpu_memory_gib", "24"], 24),
        (["--model", "Qwen/Qwen2.5-7B", "--lora_rank", "64", "--gpu_memory_gib", "80"], 80),
        (["--preset", "gpu", "--gpu_memory_gib", "12", "--gpu_capability", "8.6"], 12),
    ],
    ids=["3B-24GB", "7B-80GB", "0.5B-12GB"],
)
def test_lora_fits_the_cards_with_ten_percent_to_spare(module, flags, card, capsys):
    code, lines = plan_line(module, flags, capsys)
    assert code == 0, code
    assert any(line.startswith("  weights, frozen, bf16") for line in lines)
    assert not any(line.startswith("  reference model") for line in lines)  # pi_ref: adapters off
    peak = float(lines[-1].split()[3])
    assert lines[-1].endswith(f"of {card} GiB") and peak <= 0.9 * card


@pytest.mark.parametrize("module", [G, P])
def test_full_fine_tuning_that_does_not_fit_names_lora_first(module, capsys):
    flags = ["--preset", "gpu-countdown", "--gpu_memory_gib", "24", "--lora_rank", "0"]
    code, _ = plan_line(module, flags, capsys)
    assert code.startswith("error: the plan does not fit 24 GiB; try --lora_rank 64 (peak ")


@pytest.mark.parametrize("module", [G, P])
def test_a_t4_is_refused_the_3b_lora_run_in_one_line(module, capsys):
    flags = ["--preset", "gpu-countdown", "--gpu_memory_gib", "15", "--gpu_capability", "7.5"]
    code, _ = plan_line(module, flags, capsys)
    assert code.startswith("error: --preset gpu-countdown needs a card of at least 20 GiB")
    assert "\n" not in code


def test_the_lora_plan_counts_no_reference_and_a_frozen_base():
    cfg = G.Config(**{**G.PRESETS["gpu-countdown"], "preset": "gpu-countdown", "lora_rank": 64})
    full = G.Config(**{**G.PRESETS["gpu-countdown"], "preset": "gpu-countdown"})
    m = PF.model_config(cfg.model)
    lora, plan = PF.memory_plan(cfg, m, 24), PF.memory_plan(full, m, 80)
    part = {what: b for what, b, _ in lora["parts"]}
    p = 3_085_938_688
    assert part["weights, frozen, auto"] == 2 * p
    assert part["gradients, fp32"] == 4 * PF.lora_parameters(PF.model_sizes(m), cfg)
    assert lora["trainer"]["training"] < plan["trainer"]["training"] / 3
    assert os.path.exists(os.path.join(PF.HERE, "assets", "model_configs", "Qwen", "Qwen2.5-7B"))


def test_torchrun_sums_only_the_adapters_gradients(monkeypatch):
    """Under torchrun (no --fsdp) the frozen base has no gradient: only trainable parameters
    are summed across processes (an unused one as zeros, the same on every process)."""
    model, tok = lora_model()
    reduced = []
    monkeypatch.setattr(G, "is_distributed", lambda: True)
    monkeypatch.setattr(G.dist, "all_reduce", lambda t, *a, **k: reduced.append(t))
    G.all_reduce_gradients(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(reduced) == len(trainable) and all(t.abs().sum() == 0 for t in reduced)


def test_fp16_with_fsdp_is_refused():
    with pytest.raises(SystemExit, match="--fsdp with fp16"):
        G.parse_config(["--fsdp", "--precision", "fp16"])
