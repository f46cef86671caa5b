"""What several test files share: a random tiny Qwen2, hand-made rollout samples, script runs."""

import importlib.util
import json
import os
import random
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TINY_MODEL = os.path.join(ROOT, "assets", "tiny-addition")
HAS_VLLM = importlib.util.find_spec("vllm") is not None


def run_script(module, args, out_dir):
    """module.main() on these flags (as the command line gives them); (its result, metrics rows)."""
    out = module.main(module.parse_config(args + ["--output_dir", str(out_dir)]))
    return out, [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


# Rates per wall-clock second: they change with machine load as the time_ keys do.
RATE_KEYS = {"train_tflops", "decode_tok_s", "mfu", "decode_ratio"}


def without_times(rows):
    """Metrics rows without wall-clock timings and rates (the only keys two identical runs may
    differ in)."""
    return [
        {k: v for k, v in r.items() if not k.startswith("time_") and k not in RATE_KEYS}
        for r in rows
    ]


def random_model(vocab=40, seed=0):
    """A 2-layer Qwen2 with random weights (head_dim 32), fp32, on CPU."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    return Qwen2ForCausalLM(config).float().eval()


def random_samples(n_groups=3, group_size=4, vocab=40, seed=0, eos_id=1):
    """Ragged prompt/answer token lists, groups contiguous, with rewards in {0, 1}."""
    rng = random.Random(seed)
    samples = []
    for g in range(n_groups):
        prompt = [rng.randrange(2, vocab) for _ in range(rng.randint(3, 6))]
        for _ in range(group_size):
            length = rng.randint(1, 9)
            response = [rng.randrange(2, vocab) for _ in range(length)]
            truncated = rng.random() < 0.3
            if not truncated:
                response[-1] = eos_id
            samples.append(
                dict(
                    prompt_ids=list(prompt),
                    response_ids=response,
                    truncated=truncated,
                    reward=float(rng.random() < 0.5),
                    components={"correct": 0.0},
                )
            )
    return samples


def grpo_train(G, model, ref_model, optimizer, samples, advantages, cfg, pad_id=0):
    """G.train_on_batch on rollout samples with one advantage per answer ([B] tensor)."""
    batch = G.make_batch(samples, pad_id)
    batch["advantages"] = advantages[:, None] * batch["response_mask"]  # [B, T]
    return G.train_on_batch(model, ref_model, optimizer, batch, cfg)


def ppo_train(
    P, model, ref_model, critic, optimizer, critic_optimizer, samples, cfg, pad_id=0, beta=None
):
    """P.train_on_batch on rollout samples (scored by P.answer_scores)."""
    batch = P.make_batch(samples, pad_id)
    batch["scores"] = P.answer_scores(samples, cfg)
    beta = cfg.beta if beta is None else beta
    optimizers = (optimizer, critic_optimizer)
    return P.train_on_batch(model, ref_model, critic, optimizers, batch, cfg, beta)


@torch.no_grad()
def response_logprobs(module, model, samples, temperature):
    """Per-token log-probs of each sample's answer under `model`, as lists (to compare with the
    sampler's), computed by the script's own make_batch and token_logprobs."""
    batch = module.make_batch(samples, pad_id=0)
    device = next(model.parameters()).device
    ids, attention = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    logp = module.token_logprobs(model, ids, attention, temperature).cpu()
    return [logp[b][batch["response_mask"][b] > 0].tolist() for b in range(len(samples))]


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of each parameter's gradient as its last step() saw it (the scripts
    free the gradients once an update is done)."""

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"]]
        self.grads = {p: p.grad.detach().clone() for p in params if p.grad is not None}
        return super().step(closure)
