"""torchrun on CPU with gloo: a 2-rank run, exact equivalence with one process, group integrity."""

import copy
import gc
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import (
    HAS_VLLM,
    ROOT,
    TINY_MODEL,
    grpo_train,
    ppo_train,
    random_model,
    random_samples,
)

import nano_grpo as G

HAS_PPO = os.path.exists(os.path.join(ROOT, "nano_ppo.py"))
SCRIPTS = ["nano_grpo.py"] + (["nano_ppo.py"] if HAS_PPO else [])


def end_group():
    """Destroy the gloo group and free it now: left to interpreter exit, its threads can abort."""
    dist.destroy_process_group()
    gc.collect()


def rank_groups(rank, n_groups=5, world=2):
    return list(range(n_groups))[rank::world]  # 5 groups over 2 ranks: 3 and 2 (uneven)


def one_step(samples, adv, cfg):
    """One SGD(lr=1) step from the same random model: the update IS minus the gradient."""
    model = random_model()
    model.train()
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    grpo_train(G, model, None, sgd, samples, adv, cfg, pad_id=0)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def grpo_cfg(loss_agg):
    """Plain steps (no KL term, no gradient clipping) in micro-batches of 3."""
    return G.Config(loss_agg=loss_agg, beta=0.0, max_grad_norm=1e9, micro_batch_size=3)


def full_batch(group_size=4, n_groups=5):
    samples = random_samples(n_groups=n_groups, group_size=group_size, seed=7)
    return samples, G.group_advantages(torch.tensor([s["reward"] for s in samples]), group_size)


def worker(rank, world, init_file, out_dir):
    """Each rank: its share of the groups, one step per loss aggregation, with and without the
    gradient all-reduce (the buggy variant: each rank steps on its own gradient)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    samples, adv = full_batch()
    mine = [i for g in rank_groups(rank) for i in range(g * 4, g * 4 + 4)]
    real = G.all_reduce_gradients
    for loss_agg in G.CHOICES["loss_agg"]:
        for drop in (False, True):
            G.all_reduce_gradients = (lambda model: None) if drop else real
            params = one_step([samples[i] for i in mine], adv[mine], grpo_cfg(loss_agg))
            torch.save(params, os.path.join(out_dir, f"{loss_agg}-{drop}-rank{rank}.pt"))
    end_group()


def test_two_ranks_update_equals_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    start = torch.cat([p.detach().flatten() for p in random_model().parameters()])
    for loss_agg in G.CHOICES["loss_agg"]:
        single = one_step(*full_batch(), grpo_cfg(loss_agg))
        r0, r1 = (torch.load(tmp_path / f"{loss_agg}-False-rank{r}.pt") for r in (0, 1))
        assert torch.allclose(r0, single, atol=1e-6), loss_agg
        assert torch.allclose(r1, single, atol=1e-6), loss_agg
        b0, b1 = (torch.load(tmp_path / f"{loss_agg}-True-rank{r}.pt") for r in (0, 1))
        # without the all-reduce the ranks drift apart and neither takes the true step
        assert not torch.allclose(b0, b1, atol=1e-6)
        assert not torch.allclose(b0 - start, single - start, atol=1e-6)


def fsdp_worker(rank, world, init_file, out_dir):
    """--fsdp: 4 groups, 2 per rank (FSDP needs the same number of passes on every rank)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    samples, adv = full_batch(n_groups=4)
    mine = [i for g in range(4)[rank::world] for i in range(g * 4, g * 4 + 4)]
    for loss_agg in G.CHOICES["loss_agg"]:
        model = random_model()
        G.shard(model, None)
        model.train()
        cfg, sgd = grpo_cfg(loss_agg), torch.optim.SGD(model.parameters(), lr=1.0)
        grpo_train(G, model, None, sgd, [samples[i] for i in mine], adv[mine], cfg, 0)
        params = torch.cat([G.full_tensor(p).flatten() for p in model.parameters()])
        torch.save(params, os.path.join(out_dir, f"fsdp-{loss_agg}-rank{rank}.pt"))
    end_group()


def test_fsdp_update_equals_one_process(tmp_path):
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for loss_agg in G.CHOICES["loss_agg"]:
        single = one_step(*full_batch(n_groups=4), grpo_cfg(loss_agg))
        for r in (0, 1):
            params = torch.load(tmp_path / f"fsdp-{loss_agg}-rank{r}.pt")
            assert torch.allclose(params, single, atol=1e-6), loss_agg


def torchrun(port, script, flags, out):
    """torchrun --nproc_per_node 2 --master_port PORT SCRIPT FLAGS --output_dir OUT, as a list."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    args = ["--master_port", port, os.path.join(ROOT, script), *flags.split()]
    return launch + args + ["--output_dir", str(out)]


def test_shares_keep_groups_whole():
    """Each rank takes whole prompts; every prompt lands on exactly one rank, uneven counts too."""
    for n_prompts in (1, 5, 7, 16):
        for world in (2, 3):
            prompts = list(range(n_prompts))
            shares = [prompts[r::world] for r in range(world)]  # as in main()
            assert sorted(p for s in shares for p in s) == prompts
            assert sum(len(range(r, n_prompts, world)) for r in range(world)) == n_prompts


@pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")
@pytest.mark.parametrize("script", SCRIPTS)
def test_torchrun_two_processes_run_and_log_once(tmp_path, script):
    out = tmp_path / "run"
    flags = "--rollout hf --max_steps 2 --prompts_per_step 5 --group_size 4 --eval_size 16"
    cmd = torchrun("29517", script, flags, out)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 alone logs: each step once
    if "answers" in rows[1]:
        assert rows[1]["answers"] == 5 * 4  # both ranks' groups are in the metrics
    assert proc.stdout.count("final: acc_before=") == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")
@pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_fsdp_vllm_run_checkpoint_and_resume(tmp_path, script):
    out = tmp_path / "run"
    flags = "--fsdp --rollout vllm --prompts_per_step 4 --group_size 4 --eval_size 16"
    base = torchrun("29519", script, flags + " --save_every 2", out)
    run = dict(capture_output=True, text=True, timeout=600, cwd=ROOT)
    first = subprocess.run(base + ["--max_steps", "2"], **run)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(base + ["--max_steps", "3", "--resume"], **run)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout
    assert [json.loads(line)["step"] for line in open(out / "metrics.jsonl")] == [0, 1, 2, 3]


def ppo_cfg(ppo_epochs=1):
    """Plain PPO steps: one mini-batch per epoch, no gradient clipping, micro-batches of 3."""
    import nano_ppo as P

    plain = dict(num_mini_batches=1, max_grad_norm=1e9, micro_batch_size=3)
    return P.Config(beta=0.1, ppo_epochs=ppo_epochs, **plain)


def ppo_step(samples, cfg, fsdp=False):
    """One PPO update (1 mini-batch per epoch, SGD lr=1) from the same random policy and critic."""
    import nano_ppo as P

    torch.manual_seed(0)
    model, ref = random_model(), random_model(seed=1)
    critic = P.build_critic(model)
    torch.nn.init.normal_(critic.head.weight, std=0.1)  # values that are not all 0
    if fsdp:
        P.shard(model, ref, critic)
    model.train(), critic.train()
    sgd = [torch.optim.SGD(net.parameters(), lr=1.0) for net in (model, critic)]
    ppo_train(P, model, ref, critic, *sgd, samples, cfg, pad_id=0, beta=cfg.beta)
    return torch.cat([P.full_tensor(p).flatten() for m in (model, critic) for p in m.parameters()])


def ppo_worker(rank, world, init_file, out_dir):
    import nano_ppo as P

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    samples, _ = full_batch()
    # uneven: 12 and 8 answers
    mine = [i for g in rank_groups(rank) for i in range(g * 4, g * 4 + 4)]
    real = P.all_reduce_gradients
    for drop in (False, True):
        P.all_reduce_gradients = (lambda *models: None) if drop else real
        params = ppo_step([samples[i] for i in mine], ppo_cfg())
        torch.save(params, os.path.join(out_dir, f"ppo-{drop}-rank{rank}.pt"))
    end_group()


def test_ppo_two_ranks_update_equals_one_process(tmp_path):
    mp.spawn(ppo_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    single = ppo_step(full_batch()[0], ppo_cfg())
    r0, r1 = (torch.load(tmp_path / f"ppo-False-rank{r}.pt") for r in (0, 1))
    assert torch.allclose(r0, single, atol=1e-5) and torch.allclose(r1, single, atol=1e-5)
    b0, b1 = (torch.load(tmp_path / f"ppo-True-rank{r}.pt") for r in (0, 1))
    assert not torch.allclose(b0, b1, atol=1e-5) and not torch.allclose(b0, single, atol=1e-5)


def ppo_fsdp_cfg():
    return ppo_cfg(ppo_epochs=2)  # the second epoch steps from FSDP-updated weights: ratios != 1


def ppo_fsdp_worker(rank, world, init_file, out_dir):
    """--fsdp: 4 groups, 2 per rank; then the critic's AdamW state through a checkpoint and back."""
    import nano_ppo as P

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    samples, _ = full_batch(n_groups=4)
    mine = [i for g in range(4)[rank::world] for i in range(g * 4, g * 4 + 4)]
    params = ppo_step([samples[i] for i in mine], ppo_fsdp_cfg(), fsdp=True)
    torch.save(params, os.path.join(out_dir, f"ppo-fsdp-rank{rank}.pt"))
    critics = [P.build_critic(random_model(seed=s)) for s in (2, 3)]
    for c in critics:
        torch.nn.init.normal_(c.head.weight, std=0.1)
    P.shard(*critics)
    optimizers = [torch.optim.AdamW(c.parameters(), lr=0.1) for c in critics]
    critics[0](torch.randint(2, 40, (2, 5)), torch.ones(2, 5, dtype=torch.long)).sum().backward()
    optimizers[0].step()
    saved = P.full_state(critics[0], optimizers[0])  # gathered, as for a checkpoint
    # re-sliced, as on resume (it eats its input)
    P.load_full_state(critics[1], optimizers[1], *copy.deepcopy(saved))
    back = P.full_state(critics[1], optimizers[1])
    torch.save((saved, back), os.path.join(out_dir, f"ppo-fsdp-state-rank{rank}.pt"))
    end_group()


def test_ppo_fsdp_update_equals_one_process(tmp_path):
    mp.spawn(ppo_fsdp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    single = ppo_step(full_batch(n_groups=4)[0], ppo_fsdp_cfg())  # policy and critic parameters
    for r in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"ppo-fsdp-rank{r}.pt"), single, atol=1e-6)
    states = torch.load(tmp_path / "ppo-fsdp-state-rank0.pt", weights_only=False)
    (weights, adam), (weights_back, adam_back) = states
    assert weights.keys() == weights_back.keys()
    assert all(torch.equal(weights[k], weights_back[k]) for k in weights)
    moments = [(v["exp_avg"], v["exp_avg_sq"]) for v in adam["state"].values()]
    assert len(moments) == len(weights) and any(m.abs().sum() > 0 for pair in moments for m in pair)
    assert all(
        torch.equal(adam["state"][k][n], adam_back["state"][k][n])
        for k in adam["state"]
        for n in ("exp_avg", "exp_avg_sq")
    )


@pytest.mark.parametrize("script", SCRIPTS)
def test_fewer_questions_than_ranks_is_refused(monkeypatch, script):
    """4 ranks, 2 questions a step: two ranks would have nothing to train on. One line, no hang."""
    module = __import__(script[:-3])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as e:
        module.parse_config(["--prompts_per_step", "2"])
    assert "fewer than the 4 ranks" in str(e.value)
    module.parse_config(["--prompts_per_step", "4"])  # one each: fine
