"""Each labelled equation of nano_grpo.py against a hand-computed or brute-force value."""

import math

import pytest
import torch
from helpers import random_model, random_samples, response_logprobs

import nano_grpo as G


# ---- [GRPO-ADV] / [DR-GRPO] / RLOO --------------------------------------------------------------
def test_group_advantage_hand_computed():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    a = G.group_advantages(r, 4)
    std = math.sqrt((4 * 0.25) / 3)  # Bessel-corrected std of [1, 0, 0, 1]
    assert torch.allclose(a[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    std2 = math.sqrt((0.75**2 + 3 * 0.25**2) / 3)  # group [1, 0, 0, 0]: mean 0.25
    assert torch.allclose(a[4:], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std2 + 1e-4))


def test_all_equal_group_gives_exact_zeros_not_nan():
    for value in (0.0, 1.0, 0.3):
        a = G.group_advantages(torch.full((8,), value), 8)
        assert torch.equal(a, torch.zeros(8))
    a = G.group_advantages(torch.full((8,), 1.0), 8, scale="none")
    assert torch.equal(a, torch.zeros(8))


def test_dr_grpo_advantage_is_centred_reward_without_std():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    want = torch.tensor([0.75, -0.25, -0.25, -0.25])
    assert torch.allclose(G.group_advantages(r, 4, scale="none"), want)


def test_rloo_baseline_excludes_self():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # baseline of answer 0 = mean(0, 0, 1) = 1/3 -> A = 2/3;
    # of answer 1 = mean(1, 0, 1) = 2/3 -> A = -2/3
    assert torch.allclose(G.rloo_advantages(r, 4), torch.tensor([2, -2, -2, 2]) / 3)


# ---- [RATIO] / [PPO-CLIP] ----------------------------------------------------------------------
@pytest.mark.parametrize("eps_low,eps_high", [(0.2, 0.2), (0.2, 0.28)])
def test_clipped_loss_values_and_gradients(eps_low, eps_high):
    old = torch.zeros(6)
    ratios = torch.tensor([0.5, 1.0, 1.5, 0.5, 1.0, 1.5])
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0])
    logp = ratios.log().clone().requires_grad_(True)
    loss, clipped = G.clipped_policy_loss(logp, old, adv, eps_low, eps_high)
    expected = torch.tensor([-0.5, -1.0, -(1 + eps_high), 1 - eps_low, 1.0, 1.5])
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    # d(-rho*A)/dlogp = -rho*A where the unclipped term is the min; 0 past the clip on its side
    expected_grad = torch.tensor([-0.5, -1.0, 0.0, 0.0, 1.0, 1.5])
    assert torch.allclose(logp.grad, expected_grad)
    assert clipped.tolist() == [0, 0, 1, 1, 0, 0]


def test_ratio_is_one_and_gradient_is_reinforce_with_baseline():
    """With one iteration old = logp.detach(): ratio 1 exactly, gradient = -A * grad logp."""
    logp = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    adv = torch.tensor([0.7, -1.3, 0.2])
    loss, _ = G.clipped_policy_loss(logp, logp.detach(), adv, 0.2, 0.2)
    assert torch.equal(torch.exp(logp - logp.detach()), torch.ones(3))
    loss.sum().backward()
    assert torch.allclose(logp.grad, -adv)


# ---- [KL-K3] -----------------------------------------------------------------------------------
def test_k3_non_negative_and_unbiased_for_exact_kl():
    torch.manual_seed(0)
    p = torch.softmax(torch.randn(6), 0)  # pi_theta
    q = torch.softmax(torch.randn(6), 0)  # pi_ref
    exact = (p * (p / q).log()).sum()
    k3 = G.k3_kl(p.log(), q.log())  # per outcome
    assert (k3 >= 0).all()
    assert torch.allclose((p * k3).sum(), exact, atol=1e-6)  # E_{x~p}[k3] = KL(p || q) exactly
    draws = torch.multinomial(p, 200_000, replacement=True)  # and by Monte Carlo
    assert abs(G.k3_kl(p.log()[draws], q.log()[draws]).mean() - exact) < 0.01
    assert torch.equal(G.k3_kl(p.log(), p.log()), torch.zeros(6))


# ---- loss aggregation ---------------------------------------------------------------------------
def test_loss_weights_by_hand():
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.float)
    tok = torch.tensor([[1.0, 3.0, 9.0, 9.0], [2.0, 2.0, 2.0, 6.0]])

    def agg(name):
        return (G.loss_weights(mask, name, max_new_tokens=8) * tok).sum().item()

    # 2.5
    assert agg("seq-mean-token-mean") == pytest.approx(((1 + 3) / 2 + (2 + 2 + 2 + 6) / 4) / 2)
    assert agg("token-mean") == pytest.approx((1 + 3 + 2 + 2 + 2 + 6) / 6)
    assert agg("seq-mean-token-sum-norm") == pytest.approx(((1 + 3) / 8 + 12 / 8) / 2)


# ---- log-prob alignment -------------------------------------------------------------------------
@pytest.mark.parametrize("left_pad", [0, 3])
def test_token_logprobs_match_brute_force(left_pad):
    model = random_model()
    torch.manual_seed(1)
    seq = torch.randint(2, 40, (1, 9))
    T = 0.7
    pad = torch.zeros(1, left_pad, dtype=torch.long)
    ids = torch.cat([pad, seq], 1)
    mask = torch.cat([pad, torch.ones(1, 9, dtype=torch.long)], 1)
    logp = G.token_logprobs(model, ids, mask, T)[0, left_pad:]  # [8]
    with torch.no_grad():
        for t in range(1, 9):  # brute force: run the unpadded prefix, read the next token
            logits = model(input_ids=seq[:, :t]).logits[0, -1] / T
            want = logits.log_softmax(-1)[seq[0, t]].item()
            assert logp[t - 1].item() == pytest.approx(want, abs=1e-5)


def test_make_batch_masks_come_from_lengths():
    eos = 1
    samples = [
        dict(prompt_ids=[5, eos, 6], response_ids=[7, 8, eos]),  # EOS id inside the prompt
        dict(prompt_ids=[5, 6], response_ids=[9]),  # truncated, no EOS
    ]
    b = G.make_batch(samples, pad_id=eos)  # pad id = EOS id: the classic trap
    assert b["input_ids"].tolist() == [[5, eos, 6, 7, 8, eos], [5, 6, 9, eos, eos, eos]]
    assert b["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    # response_mask[t] = 1 iff input_ids[t+1] is an answer token: the EOS of row 0 is one of them
    assert b["response_mask"].tolist() == [[0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]


def test_response_logprobs_equal_masked_token_logprobs():
    model = random_model()
    samples = random_samples()
    lists = response_logprobs(G, model, samples, temperature=1.0)
    assert [len(x) for x in lists] == [len(s["response_ids"]) for s in samples]
    one = response_logprobs(G, model, samples[:1], 1.0)[0]  # no padding at all
    assert one == pytest.approx(lists[0], abs=1e-5)


# ---- [GRPO-PS] process supervision ---------------------------------------------------------------
def test_process_advantage_hand_computed():
    # group of 2 answers, 4 tokens each; answer 0: steps end at tokens 1 (right) and 3 (right);
    # answer 1: steps end at tokens 1 (right) and 3 (wrong). R = [1, 1, 1, 0]: mean .75, std .5
    steps = [[(1, 1.0), (3, 1.0)], [(1, 1.0), (3, 0.0)]]
    adv = G.process_advantages(steps, [4, 4], group_size=2)
    good, bad = 0.25 / (0.5 + 1e-4), -0.75 / (0.5 + 1e-4)
    assert torch.allclose(adv[0], torch.tensor([2 * good, 2 * good, good, good]))
    assert torch.allclose(adv[1], torch.tensor([good + bad, good + bad, bad, bad]))


def test_process_advantage_single_step_is_grpo_advantage():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    lengths = [3, 5, 2, 4, 1, 6, 3, 2]
    # the answer is the only step, at the end
    steps = [[(n - 1, float(x))] for n, x in zip(lengths, r)]
    adv = G.process_advantages(steps, lengths, group_size=4)
    expected = G.group_advantages(r, 4)
    for a, e, n in zip(adv, expected, lengths):
        assert torch.allclose(a, torch.full((n,), e.item()))


def test_tokens_after_a_wrong_step_get_no_blame_from_it():
    steps = [[(1, 0.0), (4, 1.0)], [(1, 1.0), (4, 1.0)]]  # answer 0: first step wrong, then right
    adv = G.process_advantages(steps, [6, 6], group_size=2)
    assert adv[0][:2].max() < adv[0][2:5].min()  # tokens up to the wrong step carry its blame
    # later tokens: only later steps / none
    assert (adv[0][2:5] > 0).all() and (adv[0][5:] == 0).all()


def test_process_advantage_all_equal_group_gives_zeros():
    adv = G.process_advantages([[(1, 1.0), (3, 1.0)], [(2, 1.0)]], [4, 4], group_size=2)
    assert all(torch.equal(a, torch.zeros(4)) for a in adv)


def test_step_ends_become_token_positions_with_multi_character_tokens():
    import os

    from helpers import TINY_MODEL

    if not os.path.isdir(TINY_MODEL):
        pytest.skip("tiny model not built")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(TINY_MODEL)
    # '<think>' and '</answer>' are single multi-char tokens
    text = G.rewards.addition_trace(47, 38)
    ids = tok.encode(text, add_special_tokens=False) + [tok.eos_token_id]
    ends = G.token_char_ends(tok, ids)
    assert ends[0] == len("<think>") and ends[1] == len("<think>7")
    rendered = tok.decode(ids, skip_special_tokens=False)
    assert ends == [
        len(tok.decode(ids[: k + 1], skip_special_tokens=False)) for k in range(len(ids))
    ]
    assert ends[-1] == len(rendered)
