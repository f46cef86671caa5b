"""Each labelled equation of nano_ppo.py against a hand-computed or brute-force value."""

import copy

import pytest
import torch
from helpers import RecordingSGD, ppo_train, random_model, random_samples, response_logprobs

import nano_ppo as P


def ragged_mask(starts, lengths, width):
    """[B, width] response masks, rows laid out prompt, answer, padding: row b is 1 on
    starts[b] .. starts[b]+lengths[b]-1."""
    mask = torch.zeros(len(starts), width)
    for b, (s, n) in enumerate(zip(starts, lengths)):
        mask[b, s : s + n] = 1
    return mask


def random_case(seed=0, rows=6, width=12):
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, 4, (rows,), generator=g).tolist()
    lengths = [int(torch.randint(1, width - s + 1, (1,), generator=g)) for s in starts]
    mask = ragged_mask(starts, lengths, width)
    rewards = torch.randn(rows, width, generator=g)
    values = torch.randn(rows, width, generator=g)
    return rewards, values, mask


# ---- [GAE] / [RETURNS] --------------------------------------------------------------------------
def test_gae_hand_computed():
    # one answer of 3 tokens after a 1-token prompt, then 1 padding position
    # (whose numbers must not matter)
    mask = torch.tensor([[0.0, 1, 1, 1, 0]])
    rewards = torch.tensor([[9.0, 0.0, 0.0, 1.0, 9.0]])
    values = torch.tensor([[9.0, 0.5, 0.6, 0.7, 9.0]])
    adv, ret = P.gae_advantages(rewards, values, mask, gamma=0.9, lam=0.5)
    d2 = 1.0 + 0.9 * 0.0 - 0.7  # V after the last token is 0
    d1 = 0.0 + 0.9 * 0.7 - 0.6
    d0 = 0.0 + 0.9 * 0.6 - 0.5
    a2 = d2
    a1 = d1 + 0.9 * 0.5 * a2
    a0 = d0 + 0.9 * 0.5 * a1
    assert torch.allclose(adv, torch.tensor([[0.0, a0, a1, a2, 0.0]]))
    # [RETURNS] A + V
    assert torch.allclose(ret, torch.tensor([[0.0, a0 + 0.5, a1 + 0.6, a2 + 0.7, 0.0]]))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (0.99, 0.0)])
def test_gae_equals_brute_force_sum_of_discounted_td_errors(seed, gamma, lam):
    rewards, values, mask = random_case(seed)
    adv, ret = P.gae_advantages(rewards, values, mask, gamma, lam)
    for b in range(mask.shape[0]):
        idx = mask[b].nonzero().flatten().tolist()  # this row's answer positions
        v = [values[b, t].item() for t in idx] + [0.0]  # V after the last token is 0
        deltas = [rewards[b, t].item() + gamma * v[k + 1] - v[k] for k, t in enumerate(idx)]
        for k, t in enumerate(idx):  # A_t = sum_l (gamma*lam)^l delta_{t+l}
            expected = sum((gamma * lam) ** lag * deltas[k + lag] for lag in range(len(idx) - k))
            assert adv[b, t].item() == pytest.approx(expected, abs=1e-5)
            assert ret[b, t].item() == pytest.approx(expected + v[k], abs=1e-5)
    off = mask == 0
    assert (adv[off] == 0).all() and (ret[off] == 0).all()


def test_gae_lambda_one_gamma_one_is_reward_to_go_minus_value():
    rewards, values, mask = random_case(7)
    adv, ret = P.gae_advantages(rewards, values, mask, gamma=1.0, lam=1.0)
    r = rewards * mask
    to_go = r.flip(1).cumsum(1).flip(1) * mask  # sum of this and all later rewards of the row
    assert torch.allclose(ret, to_go, atol=1e-5)  # returns = reward-to-go
    assert torch.allclose(adv, (to_go - values) * mask, atol=1e-5)


def test_gae_ignores_padding_and_prompt_values():
    rewards, values, mask = random_case(3)
    noisy_r = torch.where(mask > 0, rewards, torch.randn_like(rewards) * 100)
    noisy_v = torch.where(mask > 0, values, torch.randn_like(values) * 100)
    a, r = P.gae_advantages(rewards, values, mask, 1.0, 0.95)
    b, s = P.gae_advantages(noisy_r, noisy_v, mask, 1.0, 0.95)
    assert torch.allclose(a, b) and torch.allclose(r, s)


# ---- [SHAPE] -------------------------------------------------------------------------------------
def test_shaping_puts_the_score_on_the_last_real_token():
    mask = ragged_mask([2, 1, 3], [3, 1, 4], width=8)  # ragged answers, padding after each
    logp = torch.full((3, 8), -1.0)
    ref = torch.full((3, 8), -1.5)  # logp - ref = 0.5 everywhere
    ref[0, 3] = -0.2  # logp < ref here: the clamp makes this token's kl 0
    scores = torch.tensor([1.0, -1.0, 0.5])
    rewards, kl = P.shape_rewards(logp, ref, scores, mask, beta=0.1)
    expected_kl = 0.5 * mask
    expected_kl[0, 3] = 0.0
    assert torch.allclose(kl, expected_kl)
    expected = -0.1 * expected_kl
    for b, last in enumerate([4, 1, 6]):  # starts + lengths - 1
        expected[b, last] += scores[b]
    assert torch.allclose(rewards, expected)
    assert (rewards[mask == 0] == 0).all()  # padding gets nothing, not the score
    _, k1 = P.shape_rewards(logp, ref, scores, mask, beta=0.1, estimator="k1")
    assert k1[0, 3].item() == pytest.approx(-0.8)  # k1 keeps the negative value


def test_shaping_last_token_with_pad_equal_to_eos():
    """alpaca_farm finds the last token by counting non-pad ids: with pad id = EOS id that is one
    too early. Our mask comes from lengths, so the score lands on the generated EOS."""
    eos = 1
    samples = [
        dict(prompt_ids=[5, 6], response_ids=[7, 8, eos]),
        dict(prompt_ids=[5, eos, 6], response_ids=[9]),
    ]
    b = P.make_batch(samples, pad_id=eos)
    zeros = torch.zeros_like(b["response_mask"])
    scores = torch.tensor([1.0, 2.0])
    rewards, _ = P.shape_rewards(zeros, zeros, scores, b["response_mask"], beta=0.1)
    # row 0: position 3 predicts the EOS
    assert rewards.tolist() == [[0, 0, 0, 1.0], [0, 0, 2.0, 0]]


# ---- [WHITEN] ------------------------------------------------------------------------------------
def test_whitening_ignores_padding():
    _, x, mask = random_case(4)
    x = x * 3 + 2
    w = P.masked_whiten(x, mask)
    n = mask.sum()
    assert ((w * mask).sum() / n).item() == pytest.approx(0.0, abs=1e-5)  # masked mean 0
    assert (((w * mask) ** 2).sum() / n).item() == pytest.approx(1.0, abs=1e-4)  # masked var 1
    assert (w[mask == 0] == 0).all()
    garbage = torch.where(mask > 0, x, torch.full_like(x, 1e6))
    assert torch.allclose(P.masked_whiten(garbage, mask), w)  # padded values change nothing
    garbage[mask == 0] = float("nan")
    assert torch.allclose(P.masked_whiten(garbage, mask), w)


def test_reward_whitening_keeps_the_mean():
    _, x, mask = random_case(5)
    x = x * 3 + 2
    w = P.masked_whiten(x, mask, shift_mean=False)
    n = mask.sum()
    mean = (x * mask).sum() / n
    assert ((w * mask).sum() / n).item() == pytest.approx(mean.item(), abs=1e-5)
    assert ((((w - mean) * mask) ** 2).sum() / n).item() == pytest.approx(1.0, abs=1e-4)


# ---- [V-CLIP] ------------------------------------------------------------------------------------
def test_value_clip_values_and_gradients():
    old = torch.zeros(5)
    vpred = torch.tensor([0.1, 0.5, 0.5, -0.5, -0.5], requires_grad=True)
    returns = torch.tensor([1.0, 1.0, 0.0, -1.0, 0.3])
    loss, clipped = P.clipped_value_loss(vpred, old, returns, cliprange_value=0.2)
    # vpred_clipped = [0.1, 0.2, 0.2, -0.2, -0.2]; loss = 0.5 * max((v - R)^2, (v_clipped - R)^2)
    expected = 0.5 * torch.tensor(
        [max(0.81, 0.81), max(0.25, 0.64), max(0.25, 0.04), max(0.25, 0.64), max(0.64, 0.25)]
    )
    assert torch.allclose(loss, expected)
    loss.sum().backward()
    # the unclipped branch is the max: gradient v - R; the clipped one (v outside the range): 0
    assert torch.allclose(vpred.grad, torch.tensor([0.1 - 1.0, 0.0, 0.5, 0.0, -0.8]))
    assert clipped.tolist() == [0, 1, 0, 1, 0]


# ---- [PG-LOSS] -----------------------------------------------------------------------------------
def test_policy_loss_is_max_of_the_two_pessimistic_terms_with_its_gradient():
    torch.manual_seed(0)
    old = torch.randn(200)
    logp = (old + torch.randn(200) * 0.4).requires_grad_(True)
    adv = torch.randn(200)
    loss, clipped = P.clipped_policy_loss(logp, old, adv, 0.2, 0.2)
    ratio = torch.exp(logp.detach() - old)
    a, b = -adv * ratio, -adv * ratio.clamp(0.8, 1.2)  # [PG-LOSS] max(-A*ratio, -A*clip(ratio))
    assert torch.allclose(loss, torch.max(a, b))
    loss.sum().backward()
    chose_clip = b > a  # the clipped branch is the max: no gradient through it
    assert torch.equal(clipped.bool(), chose_clip)
    assert (logp.grad[chose_clip] == 0).all()
    assert torch.allclose(logp.grad[~chose_clip], (-adv * ratio)[~chose_clip])
    assert chose_clip.any() and (~chose_clip).any()


# ---- adaptive KL controller ----------------------------------------------------------------------
def test_adaptive_controller_moves_beta_toward_the_target():
    up = P.adaptive_kl_beta(0.1, kl=6.6, target=6.0, horizon=10000, n_answers=128)
    down = P.adaptive_kl_beta(0.1, kl=3.0, target=6.0, horizon=10000, n_answers=128)
    assert up > 0.1 > down
    assert up == pytest.approx(0.1 * (1 + (6.6 / 6 - 1) * 128 / 10000))
    assert P.adaptive_kl_beta(0.1, 6.0, 6.0, 10000, 128) == pytest.approx(0.1)
    high = P.adaptive_kl_beta(0.1, 600.0, 6.0, 10000, 128)
    assert high == pytest.approx(0.1 * (1 + 0.2 * 128 / 10000))  # clipped
    low = P.adaptive_kl_beta(0.1, 0.0, 6.0, 10000, 128)
    assert low == pytest.approx(0.1 * (1 - 0.2 * 128 / 10000))


# ---- critic --------------------------------------------------------------------------------------
@pytest.mark.parametrize("left_pad", [0, 3])
def test_critic_values_align_with_log_probs(left_pad):
    model = random_model()
    critic = P.build_critic(model)
    ids, ones = torch.randint(2, 40, (2, 5)), torch.ones(2, 5, dtype=torch.long)
    # zero head: every value starts at 0
    assert torch.equal(P.critic_values(critic, ids, ones), torch.zeros(2, 4))
    torch.nn.init.normal_(critic.head.weight)
    torch.manual_seed(1)
    seq = torch.randint(2, 40, (1, 9))
    pad = torch.zeros(1, left_pad, dtype=torch.long)
    ids = torch.cat([pad, seq], 1)
    mask = torch.cat([pad, torch.ones(1, 9, dtype=torch.long)], 1)
    with torch.no_grad():
        values = P.critic_values(critic, ids, mask)[0, left_pad:]  # [8]
        # values[t-1] = V(state that has read tokens 0..t-1) = the one that emits token t
        for t in range(1, 9):
            hidden = critic.backbone(input_ids=seq[:, :t]).last_hidden_state[0, -1]
            assert values[t - 1].item() == pytest.approx(critic.head(hidden).item(), abs=1e-5)


def test_separate_critic_is_a_copy_shared_one_is_not():
    model = random_model()
    separate, shared = P.build_critic(model), P.build_critic(model, share_backbone=True)
    w = model.base_model.embed_tokens.weight
    copied = separate.backbone.embed_tokens.weight
    assert copied is not w and torch.equal(copied, w)
    assert shared.backbone.embed_tokens.weight is w


# ---- [PPO-TOTAL]: the gradient does not depend on the micro-batch split --------------------------
def ppo_grads(model, critic, ref, samples, cfg, share):
    model, critic = copy.deepcopy(model).train(), copy.deepcopy(critic).train()
    if share:  # the deep copies must share one trunk again
        critic.backbone = model.base_model
    opt = RecordingSGD(model.parameters(), lr=0.0)
    copt = RecordingSGD(critic.head.parameters() if share else critic.parameters(), lr=0.0)
    torch.manual_seed(0)
    m = ppo_train(P, model, ref, critic, opt, copt, samples, cfg, pad_id=0, beta=cfg.beta)
    grads = [opt.grads[p] for p in model.parameters()]
    grads += [copt.grads[p] for p in (critic.head.parameters() if share else critic.parameters())]
    return torch.cat([g.flatten() for g in grads]), m


@pytest.mark.parametrize(
    "loss_agg,share", [(agg, False) for agg in P.CHOICES["loss_agg"]] + [("token-mean", True)]
)
def test_ppo_gradient_does_not_depend_on_micro_batch_split(loss_agg, share):
    model, ref = random_model(), random_model(seed=1)
    critic = P.build_critic(model, share_backbone=share)
    # non-zero values, so the value loss has a trunk gradient
    torch.nn.init.normal_(critic.head.weight, std=0.1)
    samples = random_samples(n_groups=6, group_size=2)  # 12 answers, ragged lengths 1..9
    for s in samples:
        s["rollout_logprobs"] = None

    def make(k):
        one_step = dict(num_mini_batches=1, ppo_epochs=1, max_grad_norm=1e9)
        shaping = dict(beta=0.1, whiten_rewards=True, truncation_penalty=-1.0)
        return P.Config(loss_agg=loss_agg, micro_batch_size=k, **one_step, **shaping)

    whole, m = ppo_grads(model, critic, ref, samples, make(12), share)
    assert m["ppo_steps"] == 1 and whole.abs().sum() > 0
    for k in (1, 5):  # 12 single rows; 5 + 5 + 2
        split, _ = ppo_grads(model, critic, ref, samples, make(k), share)
        assert torch.allclose(whole, split, atol=1e-6, rtol=1e-4), k


def test_first_step_metrics_by_hand():
    """Zero-head critic: V = 0, so returns = reward-to-go (gamma = lam = 1) and explained
    variance 0; the shaped reward of an answer is its score minus beta times its summed clamped
    KL."""
    model, ref = random_model(), random_model(seed=2)
    critic = P.build_critic(model)
    samples = random_samples(n_groups=4, group_size=2)
    for s in samples:
        s["rollout_logprobs"] = None
    cfg = P.Config(
        beta=0.05, gamma=1.0, lam=1.0, ppo_epochs=1, num_mini_batches=1, micro_batch_size=3
    )
    policy = copy.deepcopy(model).train()
    sgd = [torch.optim.SGD(net.parameters(), lr=0.0) for net in (model, critic)]
    m = ppo_train(P, policy, ref, critic, *sgd, samples, cfg, pad_id=0, beta=cfg.beta)
    lp = response_logprobs(P, model, samples, 1.0)
    lr = response_logprobs(P, ref, samples, 1.0)
    kl = [sum(max(a - b, 0.0) for a, b in zip(x, y)) for x, y in zip(lp, lr)]
    assert m["reward_kl"] == pytest.approx(-0.05 * sum(kl) / 8, rel=1e-4)
    mean_reward = sum(s["reward"] for s in samples) / 8
    assert m["reward_total"] == pytest.approx(mean_reward + m["reward_kl"], rel=1e-4)
    assert m["kl_seq"] == pytest.approx(sum(kl) / 8, rel=1e-4)
    assert m["explained_var"] == pytest.approx(0.0, abs=1e-6) and m["value"] == 0.0
    assert m["clip_frac"] == 0.0 and m["approx_kl"] == 0.0  # one epoch, one mini-batch: ratio 1


def test_explained_variance_and_value_metrics_by_hand():
    """explained_var = 1 - Var[returns - V] / Var[returns] over the answer tokens (a critic with
    values)."""
    model, ref = random_model(), random_model(seed=2)
    critic = P.build_critic(model)
    torch.nn.init.normal_(critic.head.weight, std=0.3)
    samples = random_samples(n_groups=4, group_size=2)
    for s in samples:
        s["rollout_logprobs"] = None
    cfg = P.Config(beta=0.05, ppo_epochs=1, num_mini_batches=1, micro_batch_size=3)
    policy, value_model = copy.deepcopy(model).train(), copy.deepcopy(critic)
    sgd = [torch.optim.SGD(net.parameters(), lr=0.0) for net in (model, critic)]
    m = ppo_train(P, policy, ref, value_model, *sgd, samples, cfg, pad_id=0, beta=cfg.beta)
    b = P.make_batch(samples, pad_id=0)
    mask = b["response_mask"]
    with torch.no_grad():
        logp = P.token_logprobs(model, b["input_ids"], b["attention_mask"], 1.0)
        ref_logp = P.token_logprobs(ref, b["input_ids"], b["attention_mask"], 1.0)
        values = P.critic_values(critic, b["input_ids"], b["attention_mask"]) * mask
    scores = torch.tensor([s["reward"] for s in samples])
    rewards, _ = P.shape_rewards(logp, ref_logp, scores, mask, cfg.beta)
    _, returns = P.gae_advantages(rewards, values, mask, cfg.gamma, cfg.lam)
    on = mask > 0
    r, v = returns[on], values[on]
    assert m["value"] == pytest.approx(v.mean().item(), abs=1e-5)
    assert m["returns"] == pytest.approx(r.mean().item(), abs=1e-5)
    expected = 1 - (r - v).var(unbiased=False) / r.var(unbiased=False)
    assert m["explained_var"] == pytest.approx(expected.item(), abs=1e-4)
    assert abs(m["explained_var"]) > 1e-3  # a real check: not the zero-critic case


def test_approx_kl_after_an_update_by_hand():
    """[APPROX-KL] once the policy has moved: epoch 2 sees the weights epoch 1 left, so the logged
    value (a mean over both epochs' tokens, epoch 1's being 0) is half of
    0.5 * mean((logp_1 - logp_0)^2); --approx_kl_stop just below that value drops epoch 2's step."""
    model, ref = random_model(), random_model(seed=2)
    samples = random_samples(n_groups=4, group_size=2)
    for s in samples:
        s["rollout_logprobs"] = None

    def run(epochs, stop=0.0):
        policy, critic = copy.deepcopy(model).train(), P.build_critic(model)
        one_batch = dict(num_mini_batches=1, micro_batch_size=64)
        cfg = P.Config(beta=0.05, ppo_epochs=epochs, **one_batch, approx_kl_stop=stop)
        opt = torch.optim.SGD(policy.parameters(), lr=0.5)
        frozen = torch.optim.SGD(critic.parameters(), lr=0.0)
        m = ppo_train(P, policy, ref, critic, opt, frozen, samples, cfg, pad_id=0, beta=cfg.beta)
        return policy, m

    moved, _ = run(1)
    b = P.make_batch(samples, pad_id=0)
    mask = b["response_mask"]
    with torch.no_grad():
        lp0 = P.token_logprobs(model, b["input_ids"], b["attention_mask"], 1.0)
        lp1 = P.token_logprobs(moved, b["input_ids"], b["attention_mask"], 1.0)
    by_hand = ((0.5 * (lp1 - lp0) ** 2 * mask).sum() / mask.sum()).item()
    assert by_hand > 1e-4  # the policy really moved
    _, m = run(2)
    assert m["ppo_steps"] == 2 and m["approx_kl"] == pytest.approx(by_hand / 2, rel=1e-3)
    _, m = run(2, stop=0.9 * by_hand)
    assert m["ppo_steps"] == 1  # epoch 2 measured by_hand > the limit: its step is dropped
