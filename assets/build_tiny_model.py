"""build_tiny_model.py - build the tiny model nano-rlvr ships at assets/tiny-addition/.

    python assets/build_tiny_model.py [--out DIR] [--seed 0] [--steps N]

RL from verifiable rewards improves a policy that already *sometimes* gets the answer right:
GRPO learns only from groups whose rewards differ. DeepSeek-R1 therefore starts with a small
"cold-start" SFT that teaches the format before RL. This script does the same, offline and in a
couple of minutes on a laptop CPU, for the tiny task in rewards.py (two-digit addition written
column by column: "47+38" -> <think>7+8=15,4+3+1=8</think><answer>85</answer>):

1. a byte-level tokenizer with no merges (one token per character of the task, one per tag
   such as <think>),
2. a randomly initialised ~1M-parameter Qwen2 (head_dim 32, float32: what vLLM's CPU backend runs),
3. SFT on the "train" pairs, written by a *sloppy teacher*: whenever the units column carries,
   the teacher writes the carry into the tens column as 1 only 20% of the time and as 0
   otherwise (a wrong, but self-consistent trace).

The result writes the format perfectly and does the column arithmetic, gets the ~55% of problems
without a carry right, and usually forgets the carry on the others - but it *samples* the right
carry often enough (T=1) that a GRPO group of 8 usually holds a correct answer. That is the
mistake RL has to fix, and the trace shows whether it did. The build is byte-for-byte
reproducible: the same seed gives the same model.safetensors.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is built locally, never downloaded

import torch
from tokenizers import AddedToken, pre_tokenizers
from tqdm import tqdm
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM
from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from rewards import addition_pairs, addition_trace  # noqa: E402

# Ids 0..9 are fixed (other code relies on pad=0, eos=1). pad, eos and unk are *special*: decode
# (skip_special_tokens=True, vLLM's default) drops them. The chat and reasoning tags are
# ordinary added tokens, so they survive detokenization and the reward functions can see them.
SPECIAL = ["<|pad|>", "<|endoftext|>"]
TAGS = ["<|user|>", "<|assistant|>", "<think>", "</think>", "<answer>", "</answer>",
        "/think", "/no_think"]
UNK = "<|unk|>"  # reserved: a byte-level tokenizer has no unknown characters
# The task's characters come first (ids 11..29; "Ġ" is how byte-level BPE writes a space), then
# the rest of the 256 bytes, so that any text at all encodes and decodes exactly.
CHARS = list("0123456789+-*/=,()") + ["Ġ"]
CHARS += sorted(set(pre_tokenizers.ByteLevel.alphabet()) - set(CHARS))
CHAT_TEMPLATE = (
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'user' -%}<|user|>{{ m['content'] }}"
    "{%- elif m['role'] == 'assistant' -%}<|assistant|>{{ m['content'] }}<|endoftext|>"
    "{%- else -%}{{ raise_exception('tiny-addition knows only user and assistant turns') }}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}")
MAX_LEN = 128
# A well-formed completion: the think block, a numeric answer, then the end of the text.
WELL_FORMED = re.compile(r"<think>[^<]*</think><answer>\d+</answer><\|endoftext\|>")


def build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE with no merges: one token per byte, so one per ASCII character.

    Why Qwen2's own tokenizer class: for a model of type qwen2, transformers 5's AutoTokenizer
    (and so vLLM) always rebuilds a Qwen2Tokenizer from the vocabulary in tokenizer.json,
    whatever pipeline the file describes. Building exactly that makes every loader agree.
    """
    vocab = {t: i for i, t in enumerate(SPECIAL + TAGS + [UNK] + CHARS)}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], pad_token="<|pad|>", eos_token="<|endoftext|>",
                         bos_token=None, unk_token=UNK, chat_template=CHAT_TEMPLATE,
                         model_max_length=MAX_LEN)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


def build_model(vocab_size: int, seed: int) -> Qwen2ForCausalLM:
    config = Qwen2Config(
        vocab_size=vocab_size, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4,  # head_dim 32: the smallest vLLM-CPU runs
        max_position_embeddings=MAX_LEN, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=1, pad_token_id=0, dtype="float32")
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def prompt(a: int, b: int) -> str:
    return f"<|user|>{a}+{b}<|assistant|>"  # what the chat template renders (checked in main)


def teacher(a: int, b: int, rng: random.Random, p_carry: float) -> str:
    """The sloppy teacher: right without a carry; with one, writes carry 1 only w.p. p_carry."""
    if a % 10 + b % 10 >= 10 and rng.random() >= p_carry:
        return addition_trace(a, b, carry_written=0)
    return addition_trace(a, b)


def sft_batch(tok, pairs, rng, p_carry):
    """Right-padded (input_ids, labels); labels are -100 on the prompt and the padding."""
    rows = []
    for a, b in pairs:
        p = tok.encode(prompt(a, b))
        c = tok.encode(teacher(a, b, rng, p_carry)) + [tok.eos_token_id]  # learn to stop
        rows.append((p + c, [-100] * len(p) + c))
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([l + [-100] * (width - len(l)) for _, l in rows])
    return ids, labels


def sft(model, tok, args) -> None:
    train = addition_pairs("train")  # the 800 "test" pairs are never seen
    rng = random.Random(args.seed)  # one stream: data order and the teacher's coin flips
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = args.steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        opt, lambda s: min((s + 1) / warmup, (args.steps - s) / (args.steps - warmup)))
    model.train()
    order: list[tuple[int, int]] = []
    bar = tqdm(range(args.steps), desc="SFT")
    for step in bar:
        if len(order) < args.batch_size:  # a fresh shuffle of the train pairs each epoch
            order += rng.sample(train, len(train))
        pairs, order = order[:args.batch_size], order[args.batch_size:]
        ids, labels = sft_batch(tok, pairs, rng, args.p_carry)
        # HF shifts the labels and averages over the completion tokens of the batch
        loss = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id), labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


@torch.no_grad()
def generate(model, tok, pairs, n=1, temperature=0.0, batch_size=400) -> list[str]:
    """Completions for each pair, n per pair, in order, up to and including the EOS."""
    out = []
    # top_k=0: sample from the whole softmax (HF's default would keep only the top 50 tokens)
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) \
        if temperature > 0 else dict(do_sample=False)
    for i in range(0, len(pairs), batch_size):
        enc = tok([prompt(a, b) for a, b in pairs[i:i + batch_size]], return_tensors="pt",
                  padding=True, padding_side="left")  # generation continues on the right
        gen = model.generate(**enc, max_new_tokens=32, num_return_sequences=n, **sampling)
        for text in tok.batch_decode(gen[:, enc["input_ids"].shape[1]:]):
            end = text.find(tok.eos_token)  # finished rows are padded after their EOS
            out.append(text if end < 0 else text[:end + len(tok.eos_token)])
    return out


def is_correct(completion: str, a: int, b: int) -> bool:
    m = re.search(r"<answer>(\d+)</answer>", completion)
    return m is not None and int(m.group(1)) == a + b


def evaluate(model, tok, seed: int, group: int = 8) -> dict:
    """Greedy accuracy on the held-out pairs, and T=1 sampling on those that carry."""
    test = addition_pairs("test")
    greedy = generate(model, tok, test)
    correct = [is_correct(c, a, b) for c, (a, b) in zip(greedy, test)]
    carries = [a % 10 + b % 10 >= 10 for a, b in test]
    carry_pairs = [p for p, c in zip(test, carries) if c]
    torch.manual_seed(seed)
    sampled = generate(model, tok, carry_pairs, n=group, temperature=1.0)
    hits = [is_correct(c, *carry_pairs[k // group]) for k, c in enumerate(sampled)]
    return {
        "greedy_acc": sum(correct) / len(test),
        "greedy_acc_no_carry": sum(x for x, c in zip(correct, carries) if not c)
        / (len(test) - len(carry_pairs)),
        "greedy_acc_carry": sum(x for x, c in zip(correct, carries) if c) / len(carry_pairs),
        "format": sum(WELL_FORMED.fullmatch(c) is not None for c in greedy) / len(test),
        "sampled_acc_carry": sum(hits) / len(hits),
        "group_has_correct": sum(any(hits[k:k + group]) for k in range(0, len(hits), group))
        / len(carry_pairs),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(REPO / "assets" / "tiny-addition"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--p-carry", type=float, default=0.2, help="how often the teacher carries")
    args = ap.parse_args()

    # Reproducibility: results of float32 CPU kernels can depend on the thread count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tok = build_tokenizer()
    msg = [{"role": "user", "content": "47+38"}]
    chat = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
    assert chat == prompt(47, 38)
    model = build_model(len(tok), args.seed)
    print(f"{sum(p.numel() for p in model.parameters()):,} parameters, vocab {len(tok)}")

    t0 = time.time()
    sft(model, tok, args)
    print(f"SFT: {args.steps} steps in {time.time() - t0:.0f} s")

    out = Path(args.out)
    model.save_pretrained(out)  # safetensors; the tied lm_head is stored once
    GenerationConfig(bos_token_id=1, eos_token_id=1, pad_token_id=0).save_pretrained(out)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json
    tok.save_pretrained(out, save_jinja_files=False)

    metrics = evaluate(model, tok, args.seed)
    print(f"held-out greedy accuracy {metrics['greedy_acc']:.3f} (no carry "
          f"{metrics['greedy_acc_no_carry']:.3f}, carry {metrics['greedy_acc_carry']:.3f}), "
          f"well-formed {metrics['format']:.3f}\n"
          f"carry problems sampled at T=1: {metrics['sampled_acc_carry']:.3f} correct; "
          f"a group of 8 holds a correct answer {metrics['group_has_correct']:.3f} of the time")
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
