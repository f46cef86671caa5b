"""Throughput (issue 23): micro-batches of rows of similar length, each cut to its own longest row,
give the same loss and gradient as the old sequential full-width micro-batches; pad_share says
how much padding a pass processes; the FLOP count of an update, by hand for the tiny model; the
benchmark's engines take turns step by step."""

import os
import random
import sys

import pytest
import torch
from helpers import RATE_KEYS, random_model, random_samples

import nano_grpo as G
import nano_ppo as P
import preflight as PF


class Recording(torch.optim.SGD):
    """An optimizer that keeps the gradients it was asked to step with (and steps with lr 0)."""

    def step(self, closure=None):
        self.grads = [p.grad.clone() for group in self.param_groups for p in group["params"]]


def ragged_samples(n=24, seed=0):
    """Answers of very different lengths, as on GSM8K: most short, a few long."""
    rng, samples = random.Random(seed), random_samples(n_groups=n // 4, group_size=4, seed=seed)
    for s in samples:
        s["response_ids"] = [rng.randrange(2, 40) for _ in range(rng.choice([2, 3, 5, 40, 60]))]
        s["rollout_logprobs"] = None
    return samples


def old_micro_batches(lengths, size):
    """Today's code before issue 23: rows in sampling order, every micro-batch at the batch's
    full width."""
    return list(torch.arange(len(lengths)).split(size))


def full_width(batch, rows):
    return batch["input_ids"][rows], batch["attention_mask"][rows]


def update(cfg, samples, monkeypatch, old=False, cut=None):
    """One GRPO update of the same random model on the same batch: (its metrics, gradients)."""
    if old:
        monkeypatch.setattr(G, "micro_batches", old_micro_batches)
        monkeypatch.setattr(G, "cut_to_rows", full_width)
    if cut:
        monkeypatch.setattr(G, "cut_to_rows", cut)
    model = random_model().train()
    batch = G.make_batch(samples, pad_id=0)
    batch["advantages"] = G.token_advantages(samples, batch["response_mask"], cfg)
    ref = random_model(seed=1).requires_grad_(False)
    optimizer = Recording(model.parameters(), lr=0.0)
    metrics = G.train_on_batch(model, ref, optimizer, batch, cfg)
    monkeypatch.undo()
    return metrics, optimizer.grads


@pytest.mark.parametrize("loss_agg", ["seq-mean-token-mean", "token-mean"])
def test_length_grouped_micro_batches_give_the_same_loss_and_gradient(loss_agg, monkeypatch):
    cfg = G.Config(micro_batch_size=4, beta=0.04, max_grad_norm=1e9, loss_agg=loss_agg)
    samples = ragged_samples()
    before, old_grads = update(cfg, samples, monkeypatch, old=True)
    after, new_grads = update(cfg, samples, monkeypatch)
    assert after["loss"] == pytest.approx(before["loss"], rel=1e-5, abs=1e-7)
    assert after["kl"] == pytest.approx(before["kl"], rel=1e-4, abs=1e-9)
    for old, new in zip(old_grads, new_grads):
        torch.testing.assert_close(new, old, rtol=1e-4, atol=1e-6)
    assert after["pad_share"] < before["pad_share"] / 2  # measured here: 0.22 vs 0.48

    # a cut that drops real tokens (to the SHORTEST row) is caught: the gradient moves
    def too_short(batch, rows):
        width = int(batch["attention_mask"][rows].sum(1).min())
        return batch["input_ids"][rows, :width], batch["attention_mask"][rows, :width]

    _, wrong = update(cfg, samples, monkeypatch, cut=too_short)
    assert any(not torch.allclose(w, o, rtol=1e-4, atol=1e-6) for w, o in zip(wrong, old_grads))


def test_ppo_length_grouping_changes_no_value(monkeypatch):
    """PPO's fixed pass (pi_old, V_old, pi_ref) grouped and cut equals the full-width pass."""
    model = random_model().train()
    critic = P.build_critic(model, share_backbone=True)
    samples = ragged_samples()
    batch = P.make_batch(samples, pad_id=0)
    batch["scores"] = torch.tensor([s["reward"] for s in samples], dtype=torch.float32)
    cfg = P.Config(micro_batch_size=4, ppo_epochs=1, max_grad_norm=1e9)
    optimizers = (Recording(model.parameters(), lr=0.0), Recording(critic.head.parameters(), 0.0))
    ref = random_model(seed=1).requires_grad_(False)
    new = P.train_on_batch(model, ref, critic, optimizers, batch, cfg, 0.04)
    monkeypatch.setattr(P, "micro_batches", old_micro_batches)
    monkeypatch.setattr(P, "cut_to_rows", full_width)
    old = P.train_on_batch(model, ref, critic, optimizers, batch, cfg, 0.04)
    for key in ("kl", "value", "returns", "explained_var", "pg_loss", "value_loss"):
        assert new[key] == pytest.approx(old[key], rel=1e-4, abs=1e-6), key
    assert new["pad_share"] < old["pad_share"]


def test_pad_share_by_hand():
    lengths = [10, 9, 2, 1]  # prompt + answer tokens per row
    batch = {"attention_mask": torch.tensor([[1] * n + [0] * (10 - n) for n in lengths])}
    grouped = G.micro_batches(batch["attention_mask"].sum(1), 2)  # rows {0, 1}, {2, 3}
    assert [sorted(r.tolist()) for r in grouped] == [[0, 1], [2, 3]]
    assert G.pad_share(batch, grouped) == pytest.approx(1 - 22 / (2 * 10 + 2 * 2))
    sequential = [torch.tensor([0, 2]), torch.tensor([1, 3])]  # mixed lengths: 10 and 9 wide
    assert G.pad_share(batch, sequential) == pytest.approx(1 - 22 / (2 * 10 + 2 * 9))


def test_the_flop_count_of_the_tiny_model_by_hand():
    """Tiny model: hidden 128, MLP 512, 4 heads x 32, 4 layers, V 100 (config.json). A layer's
    matmuls: q, k, v, o 4 x 128 x 128 + MLP 3 x 128 x 512 = 262,144 weights (+ biases and norms,
    which the FLOP count takes with them: 262,144 + 384 + 256); the LM head 100 x 128."""
    s = PF.model_sizes(PF.model_config(G.TINY_MODEL))
    assert s["layer"] == 4 * 128 * 128 + 3 * 128 * 512 + 3 * 128 + 2 * 128
    assert (s["n"], s["q"], s["v"], s["h"]) == (4, 128, s["v"], 128)
    n = 4 * s["layer"] + s["v"] * 128
    lengths = torch.tensor([30.0, 20.0])
    counts = G.pass_tokens(lengths, passes=3)  # one forward and backward
    metrics = {**counts, "time_train": 2.0}
    out = PF.throughput(s, metrics, None, "fp32")
    by_hand = 6 * n * 50 + 6 * 4 * 128 * (30**2 + 20**2)  # 6 N T + 6 L q sum(s^2)
    assert out["train_tflops"] == pytest.approx(by_hand / 2.0 / 1e12)
    assert "mfu" not in out and "flop_tokens" not in metrics  # a CPU: no peak to compare with


def test_mfu_and_the_decode_bound_on_a_known_card():
    s = PF.model_sizes(PF.model_config("Qwen/Qwen2.5-0.5B-Instruct"))
    card = dict(name="NVIDIA H100 80GB HBM3", gib=80, capability=9.0, simulated=False)
    metrics = dict(flop_tokens=3 * 1e5, flop_tokens_sq=0, seq_len=500, time_train=1.0)
    metrics.update(answers=256, response_len=200, time_rollout=10.0)
    out = PF.throughput(s, metrics, card, "bf16")
    assert out["mfu"] == pytest.approx(out["train_tflops"] / 989)
    # bound: 256 rows per step, each step reading 2 B x 494M weights + the KV cache of 256 rows x
    # 400 tokens x 24 layers x 2 x 128 x 2 B, at 3.35 TB/s
    step_bytes = 2 * 494_032_768 + 256 * 400 * 24 * 2 * 128 * 2
    assert out["decode_ratio"] == pytest.approx(256 * 200 / 10.0 / (256 * 3.35e12 / step_bytes))
    # the e2e tests compare runs without these (they change with machine load): all of them
    assert set(out) == RATE_KEYS
    pcie = dict(card, name="NVIDIA H100 PCIe")
    assert PF.card_limits(pcie) == (756e12, 2000e9)


# ---- make bench: the engines take turns, step by step -------------------------------------------
def test_the_benchmark_runs_its_engines_in_lockstep(tmp_path):
    """bench_step.take_turns: one worker's step at a time (none overlaps another), every worker's
    steps all run, who goes first rotates, and a worker that dies is named and ends the others."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    import bench_step as B

    def worker(name, steps, fail_at=None):
        log = tmp_path / f"{name}.log"
        code = (
            f"import sys, time; sys.path.insert(0, {os.path.dirname(B.__file__)!r})\n"
            "from bench_step import wait_for_turn\n"
            f"for k in range({steps}):\n"
            "    wait_for_turn()\n"
            f"    if k == {fail_at}: sys.exit(3)\n"
            "    t = time.monotonic(); time.sleep(0.02)\n"  # one clock for all processes
            f"    open({str(log)!r}, 'a').write(f'{{k}} {{t}} {{time.monotonic()}}\\n')\n"
        )
        return B.start(name, [sys.executable, "-c", code]), log

    steps = 4
    started = [worker(n, steps) for n in ("a", "b", "c")]
    B.take_turns([w for w, _ in started], steps)
    spans = sorted(
        (float(t0), float(t1), name)
        for (w, log), name in zip(started, "abc")
        for _, t0, t1 in (line.split() for line in log.read_text().splitlines())
    )
    assert len(spans) == 3 * steps
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))  # never two at once
    firsts = [name for _, _, name in spans[::3]]
    assert firsts == ["a", "b", "c", "a"]  # step k starts with worker k mod 3
    broken = [worker("x", steps, fail_at=1)[0], worker("y", steps)[0]]
    with pytest.raises(SystemExit, match="x failed at step 1"):
        B.take_turns(broken, steps)
    assert broken[1]["proc"].wait(timeout=10) != 0  # the others are stopped, not left running
