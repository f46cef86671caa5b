"""Where minimal RLVR code usually breaks (issue 8): one test per pitfall, each showing that the
buggy variant fails it. The end-to-end items (vLLM log-probs, weight sync, same seed) live in
test_e2e.py because they need the shipped model."""

import copy
import math

import pytest
import torch
from helpers import RecordingSGD, grpo_train, random_model, random_samples, response_logprobs

import nano_grpo as G


def grads_after(model, samples, advantages, cfg, beta_ref=None):
    """Run train_on_batch with a zero learning rate and return the accumulated gradient."""
    model = copy.deepcopy(model).train()
    opt = RecordingSGD(model.parameters(), lr=0.0)
    grpo_train(G, model, beta_ref, opt, samples, advantages, cfg, pad_id=0)
    return torch.cat([opt.grads[p].flatten() for p in model.parameters()])


def make_cfg(**kw):
    return G.Config(**{"max_grad_norm": 1e9, "num_iterations": 1, "beta": 0.0, **kw})


# ---- 1. micro-batching changes nothing -----------------------------------------------------------
@pytest.mark.parametrize("loss_agg", G.CHOICES["loss_agg"])
@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_gradient_does_not_depend_on_micro_batch_split(loss_agg, beta):
    model = random_model()
    ref = random_model(seed=1) if beta else None
    samples = random_samples(n_groups=3, group_size=4)  # ragged answer lengths 1..9
    adv = G.group_advantages(torch.tensor([s["reward"] for s in samples]), 4)
    kw = dict(loss_agg=loss_agg, beta=beta)
    whole = grads_after(model, samples, adv, make_cfg(**kw, micro_batch_size=12), ref)
    for k in (1, 5):
        split = grads_after(model, samples, adv, make_cfg(**kw, micro_batch_size=k), ref)
        assert torch.allclose(whole, split, atol=1e-6, rtol=1e-4), (loss_agg, k)


def buggy_micro_batch_grads(model, samples, adv, loss_agg, k):
    """The common bug (nanochat, GRPO-Zero before its fix): each micro-batch's loss normalised by
    its own tokens/answers, then divided by the number of accumulation steps."""
    model = copy.deepcopy(model).train()
    chunks = [slice(i, i + k) for i in range(0, len(samples), k)]
    for sl in chunks:
        b = G.make_batch(samples[sl], pad_id=0)
        logp = G.token_logprobs(model, b["input_ids"], b["attention_mask"], 1.0)
        token_adv = adv[sl][:, None] * b["response_mask"]
        loss, _ = G.clipped_policy_loss(logp, logp.detach(), token_adv, 0.2, 0.2)
        w = G.loss_weights(b["response_mask"], loss_agg, 32)  # normalised inside the micro-batch
        ((loss * w).sum() / len(chunks)).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


@pytest.mark.parametrize("loss_agg", G.CHOICES["loss_agg"])
def test_per_micro_batch_normaliser_is_caught(loss_agg):
    model = random_model()
    samples = random_samples(n_groups=3, group_size=4)
    adv = G.group_advantages(torch.tensor([s["reward"] for s in samples]), 4)
    cfg = make_cfg(loss_agg=loss_agg, micro_batch_size=12, max_new_tokens=32)
    good = grads_after(model, samples, adv, cfg)
    one = buggy_micro_batch_grads(model, samples, adv, loss_agg, 12)  # K=1: same
    assert torch.allclose(good, one, atol=1e-6)
    buggy = buggy_micro_batch_grads(model, samples, adv, loss_agg, 5)  # uneven split 5+5+2
    assert not torch.allclose(good, buggy, atol=1e-6, rtol=1e-4)


# ---- 8. degenerate groups ------------------------------------------------------------------------
def test_all_equal_group_contributes_zero_gradient():
    model = random_model()
    samples = random_samples(n_groups=2, group_size=4)
    for s in samples[:4]:
        s["reward"] = 0.3  # group 0: all equal (a float that does not cancel exactly)
    adv = G.group_advantages(torch.tensor([s["reward"] for s in samples]), 4)
    assert torch.equal(adv[:4], torch.zeros(4))
    both = grads_after(model, samples, adv, make_cfg(micro_batch_size=3))
    # the same step with group 0 dropped, rescaled: seq-mean over 8 answers vs over 4
    only = grads_after(model, samples[4:], adv[4:], make_cfg(micro_batch_size=3))
    assert torch.allclose(both * 2, only, atol=1e-6, rtol=1e-4)
    zero = grads_after(model, samples[:4], adv[:4], make_cfg())
    assert torch.equal(zero, torch.zeros_like(zero)) and not torch.isnan(zero).any()


def test_groups_stay_contiguous():
    """Group g's rows are g*G .. g*G+G-1 from generate() through the advantage."""
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 0])
    a = G.group_advantages(r, 4)
    assert a[:4].argmax() == 0 and a[4:].argmin() == 3
    order = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    shuffled = G.group_advantages(r[order], 4)
    assert not torch.allclose(shuffled, a[order])  # shuffling breaks it


def test_group_size_one_is_refused():
    with pytest.raises(SystemExit, match="G >= 2"):
        G.parse_config(["--group_size", "1"])


# ---- 4. every logged metric computed once, right ------------------------------------------------
def test_logged_metrics_recomputed_independently():
    model, ref = random_model(), random_model(seed=3)
    samples = random_samples(n_groups=2, group_size=4)
    for s in samples:
        s["components"] = {"correct": s["reward"], "format": 1.0}
        s["rollout_logprobs"] = None
    cfg = make_cfg(beta=0.1, micro_batch_size=3, temperature=0.9)
    for s, lp in zip(samples, response_logprobs(G, model, samples, cfg.temperature)):
        s["rollout_logprobs"] = [x + 0.01 for x in lp]  # a known sampler/trainer gap of 0.01
    adv = G.group_advantages(torch.tensor([s["reward"] for s in samples]), 4)
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    m = grpo_train(G, copy.deepcopy(model).train(), ref, sgd, samples, adv, cfg, pad_id=0)
    # independent recomputation, token by token, with plain python loops
    kl, ent, n = 0.0, 0.0, 0
    with torch.no_grad():
        for s in samples:
            ids = torch.tensor([s["prompt_ids"] + s["response_ids"]])
            lp = (model(ids).logits[0, :-1] / cfg.temperature).log_softmax(-1)
            lr = (ref(ids).logits[0, :-1] / cfg.temperature).log_softmax(-1)
            for t in range(len(s["prompt_ids"]) - 1, ids.shape[1] - 1):
                tok = ids[0, t + 1]
                x = (lr[t, tok] - lp[t, tok]).item()
                kl += torch.exp(torch.tensor(x)).item() - x - 1
                ent += -(lp[t].exp() * lp[t]).sum().item()
                n += 1
    assert m["kl"] == pytest.approx(kl / n, rel=1e-4)
    assert m["entropy"] == pytest.approx(ent / n, rel=1e-4)
    assert m["clip_frac"] == 0.0  # ratio 1 at the first iteration: nothing is clipped
    assert m["logprob_gap"] == pytest.approx(0.01, abs=1e-5)
    r = G.rollout_metrics(samples, 4)
    lens = [len(s["response_ids"]) for s in samples]
    assert r["response_len"] == pytest.approx(sum(lens) / 8) and r["response_len_max"] == max(lens)
    assert r["accuracy"] == pytest.approx(sum(s["reward"] > 0 for s in samples) / 8)
    assert r["truncated"] == pytest.approx(sum(s["truncated"] for s in samples) / 8)
    groups = [samples[:4], samples[4:]]
    assert r["zero_signal"] == sum(len({s["reward"] for s in g}) == 1 for g in groups) / 2


# ---- 3. the loss reads ~0 while the gradient does not --------------------------------------------
def test_loss_near_zero_but_gradient_not():
    model = random_model()
    samples = random_samples(n_groups=4, group_size=4)
    adv = G.group_advantages(torch.tensor([s["reward"] for s in samples]), 4)
    cfg, sgd = make_cfg(loss_agg="token-mean"), torch.optim.SGD(model.parameters(), lr=0.0)
    m = grpo_train(G, copy.deepcopy(model).train(), None, sgd, samples, adv, cfg, pad_id=0)
    # |loss| = |mean(-A)| is small; the gradient is not
    assert abs(m["loss"]) < 0.5 * m["grad_norm"]
    assert m["grad_norm"] > 1e-3


# ---- 5. truncated importance sampling on a synthetic sampler/trainer gap -------------------------
@pytest.mark.parametrize(
    "gap,cap,scale", [(1.0, 2.0, 2.0), (0.5, 2.0, math.exp(0.5)), (-0.5, 2.0, math.exp(-0.5))]
)
def test_tis_weights_tokens_by_capped_ratio(gap, cap, scale):
    """The sampler gave each token log-prob (trainer's - gap): weight = min(exp(gap), cap)."""
    model = random_model()
    samples = random_samples(n_groups=2, group_size=4)
    for s, lp in zip(samples, response_logprobs(G, model, samples, 1.0)):
        s["rollout_logprobs"] = [x - gap for x in lp]
    adv = G.group_advantages(torch.tensor([s["reward"] for s in samples]), 4)
    plain = grads_after(model, samples, adv, make_cfg())
    tis = grads_after(model, samples, adv, make_cfg(tis=cap))
    assert torch.allclose(tis, plain * scale, atol=1e-6, rtol=1e-4)
