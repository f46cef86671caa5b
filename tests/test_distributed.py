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

from helpers import ROOT, TINY_MODEL, random_model, random_samples, grpo_train, ppo_train
import nano_grpo as G

SCRIPTS = ["nano_grpo.py"] + (["nano_ppo.py"] if os.path.exists(os.path.join(ROOT, "nano_ppo.py")) else [])


def end_group():
    """Destroy the gloo group and free it at once: left to interpreter exit, its threads can abort."""
    dist.destroy_process_group()
    gc.collect()


def rank_groups(rank, n_groups=5, world=2):
    return list(range(n_groups))[rank::world]  # 5 groups over 2 ranks: 3 and 2 (uneven)


def one_step(samples, adv, cfg):
    """One SGD(lr=1) step from the same random model: the update IS minus the gradient."""
    model = random_model()
    model.train()
    grpo_train(G, model, None, torch.optim.SGD(model.parameters(), lr=1.0), samples, adv, cfg, pad_id=0)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


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
            cfg = G.Config(loss_agg=loss_agg, beta=0.0, max_grad_norm=1e9, micro_batch_size=3)
            params = one_step([samples[i] for i in mine], adv[mine], cfg)
            torch.save(params, os.path.join(out_dir, f"{loss_agg}-{drop}-rank{rank}.pt"))
    end_group()


def test_two_ranks_update_equals_one_process(tmp_path):
    mp.spawn(worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    start = torch.cat([p.detach().flatten() for p in random_model().parameters()])
    for loss_agg in G.CHOICES["loss_agg"]:
        single = one_step(*full_batch(), G.Config(loss_agg=loss_agg, beta=0.0, max_grad_norm=1e9, micro_batch_size=3))
        r0, r1 = (torch.load(tmp_path / f"{loss_agg}-False-rank{r}.pt") for r in (0, 1))
        assert torch.allclose(r0, single, atol=1e-6) and torch.allclose(r1, single, atol=1e-6), loss_agg
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
        cfg = G.Config(loss_agg=loss_agg, beta=0.0, max_grad_norm=1e9, micro_batch_size=3)
        grpo_train(G, model, None, torch.optim.SGD(model.parameters(), lr=1.0), [samples[i] for i in mine], adv[mine], cfg, 0)
        params = torch.cat([G.full_tensor(p).flatten() for p in model.parameters()])
        torch.save(params, os.path.join(out_dir, f"fsdp-{loss_agg}-rank{rank}.pt"))
    end_group()


def test_fsdp_update_equals_one_process(tmp_path):
    mp.spawn(fsdp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    for loss_agg in G.CHOICES["loss_agg"]:
        single = one_step(*full_batch(n_groups=4), G.Config(loss_agg=loss_agg, beta=0.0, max_grad_norm=1e9, micro_batch_size=3))
        for r in (0, 1):
            assert torch.allclose(torch.load(tmp_path / f"fsdp-{loss_agg}-rank{r}.pt"), single, atol=1e-6), loss_agg


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
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
           os.path.join(ROOT, script), "--rollout", "hf", "--max_steps", "2", "--prompts_per_step", "5",
           "--group_size", "4", "--eval_size", "16", "--output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [0, 1, 2]  # rank 0 alone logs: each step once
    if "answers" in rows[1]:
        assert rows[1]["answers"] == 5 * 4  # both ranks' groups are in the metrics
    assert proc.stdout.count("final: acc_before=") == 1


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")
@pytest.mark.skipif(__import__("importlib").util.find_spec("vllm") is None, reason="vLLM not installed")
@pytest.mark.parametrize("script", SCRIPTS)
def test_fsdp_vllm_run_checkpoint_and_resume(tmp_path, script):
    out = tmp_path / "run"
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519",
            os.path.join(ROOT, script), "--fsdp", "--rollout", "vllm", "--prompts_per_step", "4",
            "--group_size", "4", "--eval_size", "16", "--save_every", "2", "--output_dir", str(out)]
    first = subprocess.run(base + ["--max_steps", "2"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert first.returncode == 0, first.stderr[-3000:]
    again = subprocess.run(base + ["--max_steps", "3", "--resume"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stdout and [json.loads(l)["step"] for l in open(out / "metrics.jsonl")] == [0, 1, 2, 3]


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
    ppo_train(P, model, ref, critic, torch.optim.SGD(model.parameters(), lr=1.0),
                     torch.optim.SGD(critic.parameters(), lr=1.0), samples, cfg, pad_id=0, beta=cfg.beta)
    return torch.cat([P.full_tensor(p).flatten() for m in (model, critic) for p in m.parameters()])


def ppo_worker(rank, world, init_file, out_dir):
    import nano_ppo as P
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    samples, _ = full_batch()
    mine = [i for g in rank_groups(rank) for i in range(g * 4, g * 4 + 4)]  # uneven: 12 and 8 answers
    real = P.all_reduce_gradients
    for drop in (False, True):
        P.all_reduce_gradients = (lambda *models: None) if drop else real
        cfg = P.Config(beta=0.1, ppo_epochs=1, num_mini_batches=1, max_grad_norm=1e9, micro_batch_size=3)
        torch.save(ppo_step([samples[i] for i in mine], cfg), os.path.join(out_dir, f"ppo-{drop}-rank{rank}.pt"))
    end_group()


def test_ppo_two_ranks_update_equals_one_process(tmp_path):
    import nano_ppo as P
    mp.spawn(ppo_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    single = ppo_step(full_batch()[0], P.Config(beta=0.1, ppo_epochs=1, num_mini_batches=1, max_grad_norm=1e9,
                                                micro_batch_size=3))
    r0, r1 = (torch.load(tmp_path / f"ppo-False-rank{r}.pt") for r in (0, 1))
    assert torch.allclose(r0, single, atol=1e-5) and torch.allclose(r1, single, atol=1e-5)
    b0, b1 = (torch.load(tmp_path / f"ppo-True-rank{r}.pt") for r in (0, 1))
    assert not torch.allclose(b0, b1, atol=1e-5) and not torch.allclose(b0, single, atol=1e-5)


def ppo_fsdp_cfg():
    import nano_ppo as P  # 2 epochs: the second steps from FSDP-updated weights, with ratios != 1
    return P.Config(beta=0.1, ppo_epochs=2, num_mini_batches=1, max_grad_norm=1e9, micro_batch_size=3)


def ppo_fsdp_worker(rank, world, init_file, out_dir):
    """--fsdp: 4 groups, 2 per rank; then the critic's AdamW state through a checkpoint and back."""
    import nano_ppo as P
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    samples, _ = full_batch(n_groups=4)
    mine = [i for g in range(4)[rank::world] for i in range(g * 4, g * 4 + 4)]
    torch.save(ppo_step([samples[i] for i in mine], ppo_fsdp_cfg(), fsdp=True), os.path.join(out_dir, f"ppo-fsdp-rank{rank}.pt"))
    critics = [P.build_critic(random_model(seed=s)) for s in (2, 3)]
    for c in critics:
        torch.nn.init.normal_(c.head.weight, std=0.1)
    P.shard(*critics)
    optimizers = [torch.optim.AdamW(c.parameters(), lr=0.1) for c in critics]
    critics[0](torch.randint(2, 40, (2, 5)), torch.ones(2, 5, dtype=torch.long)).sum().backward()
    optimizers[0].step()
    saved = P.full_state(critics[0], optimizers[0])  # gathered, as for a checkpoint
    P.load_full_state(critics[1], optimizers[1], *copy.deepcopy(saved))  # re-sliced, as on resume (it eats its input)
    torch.save((saved, P.full_state(critics[1], optimizers[1])), os.path.join(out_dir, f"ppo-fsdp-state-rank{rank}.pt"))
    end_group()


def test_ppo_fsdp_update_equals_one_process(tmp_path):
    mp.spawn(ppo_fsdp_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    single = ppo_step(full_batch(n_groups=4)[0], ppo_fsdp_cfg())  # policy and critic parameters
    for r in (0, 1):
        assert torch.allclose(torch.load(tmp_path / f"ppo-fsdp-rank{r}.pt"), single, atol=1e-6)
    (weights, adam), (weights_back, adam_back) = torch.load(tmp_path / "ppo-fsdp-state-rank0.pt", weights_only=False)
    assert weights.keys() == weights_back.keys() and all(torch.equal(weights[k], weights_back[k]) for k in weights)
    moments = [(v["exp_avg"], v["exp_avg_sq"]) for v in adam["state"].values()]
    assert len(moments) == len(weights) and any(m.abs().sum() > 0 for pair in moments for m in pair)
    assert all(torch.equal(adam["state"][k][n], adam_back["state"][k][n]) for k in adam["state"] for n in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_fewer_questions_than_ranks_is_refused(monkeypatch, script):
    """4 ranks and 2 questions per step: two ranks would have nothing to train on. One line, not a hang."""
    module = __import__(script[:-3])
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(SystemExit) as e:
        module.parse_config(["--prompts_per_step", "2"])
    assert "fewer than the 4 ranks" in str(e.value)
    module.parse_config(["--prompts_per_step", "4"])  # one each: fine
