"""Checks for exercises.ipynb. Each check_<name>(fn) returns quietly when fn is right and raises
(AssertionError with a hint, or whatever fn itself raised) when it is not. Every check compares fn
with the scripts' own reference function (nano_grpo, nano_ppo, rewards) or with hand-computed
values.

In the notebook, `report(check_x, x)` runs one check and prints PASSED or NOT YET without stopping
the notebook (`passes(check_x, x)` only returns True or False). tests/test_notebooks.py calls the
checks directly, with the reference solutions (exercise_solutions.py) and with the notebook's
blanks.
"""

import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import nano_grpo  # noqa: E402
import rewards  # noqa: E402


def report(check, fn) -> None:
    """Run check(fn); print PASSED or NOT YET (and why) instead of raising."""
    try:
        check(fn)
    except Exception as e:  # a wrong answer, or the blank's NotImplementedError / NameError
        print(f"NOT YET  {check.__name__}: {type(e).__name__}: {e}")
        return
    print(f"PASSED   {check.__name__}")


def passes(check, fn) -> bool:
    """check(fn) without a word: True if it passes."""
    try:
        check(fn)
    except Exception:
        return False
    return True


def _close(got, want, what, atol=1e-5):
    got, want = (
        torch.as_tensor(got, dtype=torch.float32),
        torch.as_tensor(want, dtype=torch.float32),
    )
    assert got.shape == want.shape, (
        f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
    )
    assert torch.allclose(got, want, atol=atol), (
        f"{what}: got {got.tolist()}, expected {want.tolist()}"
    )


def _groups(seed, n_groups, group_size):
    """Rewards as the trainer sees them (correct + 0.1 * format), some groups all equal."""
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        if g % 3 == 0:
            out += [rng.choice([0.0, 0.1, 1.0, 1.1])] * group_size  # all right or all wrong
        else:
            out += [rng.choice([0.0, 0.1, 1.0, 1.1]) for _ in range(group_size)]
    return torch.tensor(out)


def check_group_advantage(fn):
    """[GRPO-ADV] A_i = (r_i - mean)/(std + 1e-4) per group; an all-equal group gives exactly 0."""
    _close(
        fn(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4),
        [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001],
        "one right answer out of 4 (mean 0.25, std 0.5)",
    )
    for seed, group_size in [(0, 2), (1, 4), (2, 8)]:
        r = _groups(seed, 6, group_size)
        _close(
            fn(r, group_size),
            nano_grpo.group_advantages(r, group_size, "group"),
            f"rewards {r.tolist()} in groups of {group_size}",
        )
    same = torch.full((8,), 1.1)
    assert (fn(same, 8) == 0).all(), (
        f"an all-equal group must give exactly 0, got {fn(same, 8).tolist()}"
    )


def check_kl_estimate(fn):
    """k1 = log(pi/pi_ref); k3 = pi_ref/pi - log(pi_ref/pi) - 1 [KL-K3], from the sampled tokens'
    log-probs."""
    g = torch.Generator().manual_seed(0)
    logp, ref_logp = -torch.rand(4, 7, generator=g) * 3, -torch.rand(4, 7, generator=g) * 3
    _close(fn(logp, ref_logp, "k1"), logp - ref_logp, "k1")
    _close(
        fn(logp, ref_logp, "k3"),
        nano_grpo.k3_kl(logp, ref_logp),
        "k3 (compared with nano_grpo.k3_kl)",
    )
    assert (fn(logp, ref_logp, "k3") >= 0).all(), "k3 must never be negative"
    _close(fn(torch.tensor([-0.5]), torch.tensor([-0.5]), "k3"), [0.0], "k3 when both models agree")
    # both are unbiased: their mean over samples from pi approaches the exact KL(pi || pi_ref)
    p, q = torch.tensor([0.5, 0.3, 0.2]), torch.tensor([0.2, 0.3, 0.5])
    x = torch.multinomial(p, 200_000, replacement=True, generator=g)
    exact = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        est = fn(p.log()[x], q.log()[x], kind).mean()
        assert abs(est - exact) < 0.01, f"{kind}: mean over samples {est:.4f}, exact KL {exact:.4f}"


def _ragged_mask(seed, n, width):
    rng = random.Random(seed)
    mask = torch.zeros(n, width)
    for b in range(n):
        mask[b, rng.randint(0, 3) : rng.randint(4, width)] = 1  # answer tokens, then padding
    return mask


def check_dr_grpo_weights(fn):
    """[DR-GRPO] every answer token weighs 1 / (max_new_tokens * n_answers), whatever the
    answer's length."""
    # answers of 2 and 5 tokens
    mask = torch.tensor([[0, 1, 1, 0, 0, 0], [0, 1, 1, 1, 1, 1]], dtype=torch.float32)
    _close(fn(mask, 8), mask / 16, "two answers (2 and 5 tokens), max_new_tokens 8")
    for seed in range(3):
        mask = _ragged_mask(seed, 6, 12)
        _close(
            fn(mask, 32),
            nano_grpo.loss_weights(mask, "seq-mean-token-sum-norm", 32),
            "compared with nano_grpo.loss_weights(mask, 'seq-mean-token-sum-norm', 32)",
        )


def check_length_reward(fn):
    """[R-LEN] Kimi k1.5: lambda_i = 0.5 - (len_i - min)/(max - min); right: lambda_i,
    wrong: min(0, lambda_i)."""
    _close(
        fn([10, 20, 30], [True, True, False]),
        [0.5, 0.0, -0.5],
        "lengths 10, 20, 30; right, right, wrong",
    )
    _close(
        fn([10, 20, 30], [False, False, True]),
        [0.0, 0.0, -0.5],
        "lengths 10, 20, 30; wrong, wrong, right",
    )
    _close(fn([7, 7, 7], [True, False, True]), [0.0, 0.0, 0.0], "all lengths equal")
    rng = random.Random(0)
    for _ in range(20):
        lengths = [rng.randint(3, 40) for _ in range(6)]
        correct = [rng.random() < 0.5 for _ in range(6)]
        _close(
            fn(lengths, correct),
            rewards.length_rewards(lengths, correct),
            f"compared with rewards.length_rewards({lengths}, {correct})",
        )


def check_rloo_advantage(fn):
    """RLOO: A_i = r_i - mean of the other G-1 rewards of its group (= G/(G-1) * (r_i - mean))."""
    _close(
        fn(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4),
        [1.0, -1 / 3, -1 / 3, -1 / 3],
        "one right answer out of 4",
    )
    for seed, group_size in [(0, 2), (1, 4), (2, 8)]:
        r = _groups(seed, 6, group_size)
        _close(
            fn(r, group_size),
            nano_grpo.rloo_advantages(r, group_size),
            f"rewards {r.tolist()} in groups of {group_size}",
        )
        centred = r.view(-1, group_size) - r.view(-1, group_size).mean(1, keepdim=True)
        _close(
            fn(r, group_size),
            (group_size / (group_size - 1) * centred).view(-1),
            "G/(G-1) * (r - mean)",
            atol=1e-4,
        )


def check_gae(fn):
    """[GAE] delta_t = r_t + gamma V(s_{t+1}) - V(s_t); A_t = delta_t + gamma lam A_{t+1};
    V after the end is 0."""
    r, v = torch.tensor([0.0, 0.0, 1.0]), torch.zeros(3)
    _close(
        fn(r, v, 1.0, 1.0),
        [1.0, 1.0, 1.0],
        "reward 1 on the last token, V = 0, gamma = lam = 1: the return",
    )
    _close(
        fn(r, v, 0.5, 1.0),
        [0.25, 0.5, 1.0],
        "gamma = 0.5, V = 0: [RETURN] R_t = sum gamma^(k-t) r_k",
    )
    v = torch.tensor([0.5, 0.5, 0.5])
    _close(fn(r, v, 1.0, 0.0), [0.0, 0.0, 0.5], "lam = 0: one-step TD errors delta_t")
    import nano_ppo

    g = torch.Generator().manual_seed(0)
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5), (0.99, 1.0)]:
        r, v = torch.randn(9, generator=g), torch.randn(9, generator=g)
        want, _ = nano_ppo.gae_advantages(r[None], v[None], torch.ones(1, 9), gamma, lam)
        _close(
            fn(r, v, gamma, lam),
            want[0],
            f"compared with nano_ppo.gae_advantages (gamma {gamma}, lam {lam})",
        )


def check_subtraction_reward(fn):
    """[R-BIN] 1.0 iff the last <answer>...</answer> holds exactly a - b (spaces around allowed)."""
    ex = {"question": "85-38", "answer": "47", "a": 85, "b": 38}
    cases = [
        ("<think>15-8=7,7-3=4</think><answer>47</answer>", ex, 1.0),
        ("<answer> 47 </answer>", ex, 1.0),
        ("<think>5-8</think><answer>53</answer>", ex, 0.0),
        ("<answer>123</answer>", ex, 0.0),  # the sum, not the difference
        ("47", ex, 0.0),  # no <answer> tag
        ("<answer>47</answer> no wait <answer>43</answer>", ex, 0.0),  # the LAST answer counts
        ("<answer>forty-seven</answer>", ex, 0.0),
        ("", ex, 0.0),
        ("<answer>-47</answer>", {"question": "38-85", "answer": "-47", "a": 38, "b": 85}, 1.0),
    ]
    for completion, example, want in cases:
        got = fn(completion, example)
        assert got == want, (
            f"{completion!r} for {example['question']}: got {got!r}, expected {want}"
        )
