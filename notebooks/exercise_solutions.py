"""Reference solutions to exercises.ipynb: the same function names as the notebook's blanks.

Try the exercises first. Each solution is short, and each is checked against the scripts' own
functions by notebooks/exercise_checks.py (tests/test_notebooks.py runs those checks on it).
"""

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import rewards  # noqa: E402


# Exercise 1 [GRPO-ADV]
def group_advantage(rewards_, group_size):
    """rewards_ [N*G] (the G answers to a question are contiguous) -> advantages [N*G]."""
    r = rewards_.view(-1, group_size)  # [N, G]: one row per question
    mean = r.mean(dim=1, keepdim=True)
    std = r.std(dim=1, keepdim=True)  # Bessel-corrected, as TRL and nano_grpo
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = (r - mean) / (std + 1e-4)  # [GRPO-ADV]
    # nothing to learn from an all-equal group
    adv = torch.where(all_equal, torch.zeros_like(adv), adv)
    return adv.view(-1)


# Exercise 2 [KL-K3]
def kl_estimate(logp, ref_logp, kind):
    """Per-token estimate of KL(pi_theta || pi_ref) from the sampled token's log-probs."""
    log_ratio = ref_logp - logp  # log(pi_ref / pi_theta)
    if kind == "k1":
        return -log_ratio  # log(pi_theta / pi_ref): unbiased, can be negative, high variance
    if kind == "k3":
        return torch.exp(log_ratio) - log_ratio - 1  # [KL-K3] unbiased, >= 0, low variance
    raise ValueError(f"unknown kind {kind!r}")


# Exercise 3 [DR-GRPO]
def dr_grpo_weights(response_mask, max_new_tokens):
    """[B, T] token weights: each answer's token SUM divided by a constant, then the mean over
    answers."""
    n_seq = response_mask.shape[0]
    return response_mask / max_new_tokens / n_seq


# Exercise 4 [R-LEN]
def length_reward(lengths, correct):
    """Kimi k1.5's length reward for one group: lambda_i = 0.5 - (len_i - min) / (max - min);
    a right answer gets lambda_i, a wrong one min(0, lambda_i); all 0 if every length is equal."""
    shortest, longest = min(lengths), max(lengths)
    if shortest == longest:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (n - shortest) / (longest - shortest) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct)]


# Exercise 5 (RLOO)
def rloo_advantage(rewards_, group_size):
    """RLOO: each answer's baseline is the mean reward of the OTHER G-1 answers to its question."""
    r = rewards_.view(-1, group_size)  # [N, G]
    others_mean = (r.sum(dim=1, keepdim=True) - r) / (group_size - 1)
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)
    adv = torch.where(all_equal, torch.zeros_like(r), r - others_mean)
    return adv.view(-1)


# Exercise 6 [GAE]
def gae(rewards_, values, gamma, lam):
    """One answer's per-token rewards r_t and values V(s_t) [T] -> advantages A_t [T]."""
    T = len(rewards_)
    advantages = torch.zeros(T)
    running = 0.0  # A_{t+1}; 0 after the last token
    for t in reversed(range(T)):
        next_value = values[t + 1] if t + 1 < T else 0.0  # V after the last token is 0
        delta = rewards_[t] + gamma * next_value - values[t]  # [GAE] delta_t
        running = delta + gamma * lam * running  # [GAE] A_t = delta_t + gamma * lam * A_{t+1}
        advantages[t] = running
    return advantages


# Exercise 7 [R-BIN]: a verifier for a new task
def subtraction_reward(completion, example):
    """1.0 iff the last <answer>...</answer> of the completion holds exactly a - b, else 0.0."""
    answer = rewards.extract_answer(
        completion
    )  # the text inside the last <answer> tag, stripped; or None
    return 1.0 if answer == str(example["a"] - example["b"]) else 0.0
