"""build_tiny_model.py - build the tiny models nano-rlvr ships: assets/tiny-addition/ and variants.

    python assets/build_tiny_model.py [--out DIR] [--seed 0]
        [--variant cold-start|think-fusion|base|base-web|parity]

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
reproducible on one machine: the same seed gives the same model.safetensors there. Another kind of
processor gives other bytes but the same behaviour (assets/README.md says why and what is tested).

Four variants, same tokenizer, architecture and sloppy teacher (chapter 14.3's case studies):

  cold-start    (default) -> assets/tiny-addition/: DeepSeek-R1's cold start, as described above.
  think-fusion  -> assets/tiny-addition-fusion/: Qwen 3's thinking-mode fusion. The user turn
                switches the mode, as in Qwen 3: "47+38" or "47+38 /think" -> the trace above;
                "47+38 /no_think" -> "<think></think><answer>75</answer>" (an empty think block,
                then the answer the sloppy trace would have reached). The switch is one space and
                one token, so the prompt is <|user|>47+38 /no_think<|assistant|>. SFT mixes 70%
                no suffix, 10% " /think", 20% " /no_think". At test time the think block can be
                cut at a budget (nano_grpo.py --think_budget N: N tokens, then </think>); a
                1M model does not pick that up from the two modes alone, so 10 of the 70 points
                are traces cut at a random length with the forced </think>, the answer learned.
  base          -> assets/tiny-addition-base/: DeepSeek-R1-Zero's starting point. Pre-trained as a
                plain language model (loss on every token) on documents of 1-4 lines such as
                "47+38=75\n", the sloppy teacher's sums with no trace; it never sees the chat or
                reasoning tags. It continues "47+38=" with a number, but knows no format.
  base-web      -> assets/tiny-addition-base-web/: R1-Zero from a base model with a weak prior, as
                real base models have (their web pre-training holds some R1-style transcripts).
                The same pre-training as base, except that a share WEB_SHARE (3%) of the documents
                are transcripts: the prompt nano_grpo.py gives this model (rewards.build_prompt:
                "<|user|>47+38<|assistant|>"), the sloppy teacher's trace and answer, then EOS;
                the loss is still on every token. (rewards.BASE_TEMPLATE, R1-Zero's plain-text
                prompt, is ~218 tokens: longer than this model's 128 positions; nano_grpo.py uses
                the tokenizer's chat template whenever there is one, for base and base-web alike.)
  parity        -> assets/tiny-parity/: R1-Zero's headline curve in miniature (issue 15), on
                another task: the parity of 3..12 bits (rewards.py, section 1b), a smaller Qwen2
                (hidden 64, 2 heads of 32). Pre-trained on the teacher's transcripts (prompt
                masked, loss averaged per sequence so long traces do not outweigh short answers)
                in a mix of modes: mostly direct answers, traces more often the longer the string
                (--p-trace-lo at 3 bits to --p-trace-hi at 12), some of them retries (a guess,
                " wait ", the trace), a few traces cut at a random length with a forced </think>
                (as --think_budget cuts; that part masked), plus extra short strings. The teacher
                is a person doing parity in their head: its direct answers are right up to
                --direct-max (5) bits and coin flips beyond (without that, a model this size can
                learn to count the ones and answer long strings directly: one build did, 0.91 on
                9-12 bits); its traces are always right. So a trace is worth writing on longer
                strings only, and GRPO has to find that out.
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
from rewards import (  # noqa: E402
    PARITY_BUCKETS,
    PARITY_WIDTH,
    addition_pairs,
    addition_trace,
    build_prompt,
    parity_completion,
    parity_examples,
    parity_strings,
    parity_trace,
    reasoning_mode,
)

# Ids 0..9 are fixed (other code relies on pad=0, eos=1). pad, eos and unk are *special*: decode
# (skip_special_tokens=True, vLLM's default) drops them. The chat and reasoning tags are
# ordinary added tokens, so they survive detokenization and the reward functions can see them.
SPECIAL = ["<|pad|>", "<|endoftext|>"]
TAGS = [
    "<|user|>",
    "<|assistant|>",
    "<think>",
    "</think>",
    "<answer>",
    "</answer>",
    "/think",
    "/no_think",
]
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
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)
MAX_LEN = 128
# A well-formed completion: the think block, a numeric answer, then the end of the text.
WELL_FORMED = re.compile(r"<think>[^<]*</think><answer>\d+</answer><\|endoftext\|>")
NO_THINK_FORMED = re.compile(r"<think></think><answer>\d+</answer><\|endoftext\|>")
# think-fusion: the user-turn suffix that picks the mode (Qwen 3's soft switches)
THINK, NO_THINK = " /think", " /no_think"
VARIANTS = {  # variant -> (default output folder, default SFT steps)
    "cold-start": ("tiny-addition", 600),
    "think-fusion": ("tiny-addition-fusion", 800),
    "base": ("tiny-addition-base", 600),
    "base-web": ("tiny-addition-base-web", 600),
    "parity": ("tiny-parity", 1500),
}
# parity: a smaller model than the addition models (faster RL steps); head_dim stays 32
SIZES = {
    "parity": dict(
        hidden_size=64, intermediate_size=256, num_attention_heads=2, num_key_value_heads=2
    )
}
# base-web: the share of pre-training documents that are R1-format transcripts ("web pages with
# R1-style reasoning"): small, and mostly wrong on carries (the sloppy teacher), so a weak prior.
WEB_SHARE = 0.03


def build_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE with no merges: one token per byte, so one per ASCII character.

    Why Qwen2's own tokenizer class: for a model of type qwen2, transformers 5's AutoTokenizer
    (and so vLLM) always rebuilds a Qwen2Tokenizer from the vocabulary in tokenizer.json,
    whatever pipeline the file describes. Building exactly that makes every loader agree.
    """
    vocab = {t: i for i, t in enumerate(SPECIAL + TAGS + [UNK] + CHARS)}
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        pad_token="<|pad|>",
        eos_token="<|endoftext|>",
        bos_token=None,
        unk_token=UNK,
        chat_template=CHAT_TEMPLATE,
        model_max_length=MAX_LEN,
    )
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAGS])
    return tok


def build_model(vocab_size: int, seed: int, **size) -> Qwen2ForCausalLM:
    # head_dim 32: the smallest vLLM-CPU runs
    shape = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
    config = Qwen2Config(
        vocab_size=vocab_size,
        **{**shape, "num_key_value_heads": 4, **size},
        max_position_embeddings=MAX_LEN,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=1,
        pad_token_id=0,
        dtype="float32",
    )
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(config)


def prompt(a: int, b: int, suffix: str = "") -> str:
    """What the chat template renders for the user turn f"{a}+{b}{suffix}" (checked in main)."""
    return f"<|user|>{a}+{b}{suffix}<|assistant|>"


def teacher(a: int, b: int, rng: random.Random, p_carry: float) -> str:
    """The sloppy teacher: right without a carry; with one, writes carry 1 only w.p. p_carry."""
    if a % 10 + b % 10 >= 10 and rng.random() >= p_carry:
        return addition_trace(a, b, carry_written=0)
    return addition_trace(a, b)


def without_thinking(trace: str) -> str:
    """The /no_think form of a trace: an empty think block, then the same answer."""
    return "<think></think>" + trace[trace.index("<answer>") :]


# ---- training data, one function per variant: rows of (input_ids, labels) ----------------------
# take(n) hands out the next n train pairs (a fresh shuffle each epoch); rng is the build's one
# random stream (data order, the teacher's coin flips, the mode switch).
def cold_start_rows(tok, take, rng, args):
    """Chat SFT: the prompt is masked (-100); the completion and its EOS are learned."""
    rows = []
    for a, b in take(args.batch_size):
        p = tok.encode(prompt(a, b))
        c = tok.encode(teacher(a, b, rng, args.p_carry)) + [tok.eos_token_id]  # learn to stop
        rows.append((p + c, [-100] * len(p) + c))
    return rows


def fusion_rows(tok, take, rng, args):
    """Chat SFT with the mode switched in the user turn: no suffix or /think -> the trace,
    /no_think -> the same teacher's answer right after an empty think block.

    A share p_budget of all rows (no suffix) is cut the way a thinking budget cuts (nano_grpo.py
    --think_budget k): the first k tokens of the trace (k = 0: not even <think>), then </think>.
    That forced part is masked like the prompt; only the answer after it is learned, so the model
    never learns to stop thinking early by itself, only to answer when it is made to."""
    rows, close = [], tok.convert_tokens_to_ids("</think>")
    shares = [(NO_THINK, args.p_no_think), (THINK, args.p_think), ("cut", args.p_budget)]
    for a, b in take(args.batch_size):
        u, mode = rng.random(), ""
        for name, share in shares:
            if u < share:
                mode = name
                break
            u -= share
        trace = teacher(a, b, rng, args.p_carry)
        p = tok.encode(prompt(a, b, "" if mode == "cut" else mode))
        c = tok.encode(without_thinking(trace) if mode == NO_THINK else trace) + [tok.eos_token_id]
        if mode == "cut":  # move the budget-forced think prefix (and </think>) into the prompt
            end = c.index(close)
            k = rng.randint(0, end)  # end: all of the think block, cut just before </think>
            p, c = p + c[:k] + [close], c[end + 1 :]
        rows.append((p + c, [-100] * len(p) + c))
    return rows


def plain_document(tok, take, rng, args) -> list[int]:
    """1..max_lines lines "a+b=sum\\n" (the teacher's sum, no trace, no tags), then EOS."""
    lines = []
    for a, b in take(rng.randint(1, args.max_lines)):
        answer = re.search(r"<answer>(\d+)</answer>", teacher(a, b, rng, args.p_carry)).group(1)
        lines.append(f"{a}+{b}={answer}\n")
    return tok.encode("".join(lines)) + [tok.eos_token_id]


def transcript(tok, a: int, b: int, rng, args) -> str:
    """base-web: an R1-format transcript, i.e. the prompt nano_grpo.py gives the model for the
    question "a+b" (rewards.build_prompt with this tokenizer), then the sloppy teacher's reply."""
    text = build_prompt("addition", {"question": f"{a}+{b}"}, tok)
    return text + teacher(a, b, rng, args.p_carry)


def base_rows(tok, take, rng, args):
    """Plain-text pre-training: plain documents only; the loss is on every token."""
    rows = []
    for _ in range(args.batch_size):
        ids = plain_document(tok, take, rng, args)
        rows.append((ids, ids))
    return rows


def base_web_rows(tok, take, rng, args):
    """base's pre-training, but a document is an R1 transcript (then EOS) w.p. WEB_SHARE; the
    loss is on every token of it too, prompt included: it is text, not a chat turn."""
    rows = []
    for _ in range(args.batch_size):
        if rng.random() < WEB_SHARE:
            ((a, b),) = take(1)
            ids = tok.encode(transcript(tok, a, b, rng, args)) + [tok.eos_token_id]
        else:
            ids = plain_document(tok, take, rng, args)
        rows.append((ids, ids))
    return rows


def parity_rows(tok, take, rng, args):
    """parity: the teacher's transcripts in a mix of modes; the prompt (and a cut row's forced
    think prefix) is masked. take is not used: the strings come from rewards.parity_strings."""
    rows, close = [], tok.convert_tokens_to_ids("</think>")
    for _ in range(args.batch_size):
        lo = PARITY_BUCKETS["easy"][0]
        hi = args.direct_max if rng.random() < args.p_easy else PARITY_WIDTH
        d = rng.randint(lo, hi)
        bits = rng.choice(parity_strings(d, "train"))
        rise = (args.p_trace_hi - args.p_trace_lo) * (d - lo)
        p_trace = args.p_trace_lo + rise / (PARITY_WIDTH - lo)
        u = rng.random()
        mode = "cut" if u < args.p_cut else "trace" if u < args.p_cut + p_trace else "direct"
        if mode == "trace" and rng.random() < args.p_retry:
            mode = "retry"
        k = rng.randint(0, d - 1)  # cut: a thinking budget of k symbols
        # the teacher's mental parity: right up to DIRECT_MAX bits, a coin flip beyond (also after
        # a cut: the parity so far, plus the rest in its head)
        in_head = (d if mode == "direct" else d - k if mode == "cut" else 0) <= args.direct_max
        answer = None if in_head else rng.choice("01")
        p = tok.encode(prompt_text(bits))
        shown = "trace" if mode == "cut" else mode
        c = tok.encode(parity_completion(bits, shown, guess=rng.choice("01"), answer=answer))
        c += [tok.eos_token_id]
        if mode == "cut":  # the think block up to the budget is forced (masked), then </think>
            p, c = p + c[: 1 + k] + [close], c[c.index(close) + 1 :]
        rows.append((p + c, [-100] * len(p) + c))
    return rows


def prompt_text(bits: str) -> str:
    """parity: what the chat template renders for the question (checked in main)."""
    return f"<|user|>{bits.ljust(PARITY_WIDTH, '_')}<|assistant|>"


def sequence_mean_loss(model, ids, labels, pad_id):
    """Cross-entropy averaged over each row's labelled tokens, then over rows (every answer counts
    the same, however long); HF's loss would average over all labelled tokens of the batch."""
    logits = model(input_ids=ids, attention_mask=(ids != pad_id)).logits[:, :-1]
    target = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target, ignore_index=-100, reduction="none"
    )
    mask = (target != -100).float()
    return ((ce * mask).sum(1) / mask.sum(1).clamp(min=1)).mean()


ROWS = {
    "cold-start": cold_start_rows,
    "think-fusion": fusion_rows,
    "base": base_rows,
    "base-web": base_web_rows,
    "parity": parity_rows,
}


def pad_rows(tok, rows):
    """Right-padded (input_ids, labels); labels are -100 on the padding."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [tok.pad_token_id] * (width - len(i)) for i, _ in rows])
    labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
    return ids, labels


def sft(model, tok, args) -> None:
    train = addition_pairs("train")  # the 800 "test" pairs are never seen
    rng = random.Random(args.seed)  # one stream: data order and the teacher's coin flips
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = args.steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(  # linear warm-up, then linear decay to 0
        opt, lambda s: min((s + 1) / warmup, (args.steps - s) / (args.steps - warmup))
    )
    model.train()
    order: list[tuple[int, int]] = []

    def take(n: int) -> list[tuple[int, int]]:
        nonlocal order
        if len(order) < n:  # a fresh shuffle of the train pairs each epoch
            order += rng.sample(train, len(train))
        pairs, order = order[:n], order[n:]
        return pairs

    # args.steps sets the schedule; a short build (--stop-after K) runs only its first K steps
    desc = "pre-train" if args.variant.startswith("base") or args.variant == "parity" else "SFT"
    bar = tqdm(range(args.run_steps), desc=desc)
    for step in bar:
        ids, labels = pad_rows(tok, ROWS[args.variant](tok, take, rng, args))
        if args.variant == "parity":
            loss = sequence_mean_loss(model, ids, labels, tok.pad_token_id)
        else:  # HF shifts the labels and averages over the labelled tokens of the batch
            mask = ids != tok.pad_token_id
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 20 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()


# ---- evaluation: held-out pairs only -----------------------------------------------------------
@torch.no_grad()
def generate(model, tok, prompts, n=1, temperature=0.0, batch_size=400) -> list[str]:
    """Completions of each prompt text, n per prompt, in order, up to and including the EOS."""
    out = []
    # top_k=0: sample from the whole softmax (HF's default would keep only the top 50 tokens)
    sampling = (
        dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        if temperature > 0
        else dict(do_sample=False)
    )
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]  # padded on the left: generation continues on the right
        enc = tok(batch, return_tensors="pt", padding=True, padding_side="left")
        gen = model.generate(**enc, max_new_tokens=32, num_return_sequences=n, **sampling)
        for text in tok.batch_decode(gen[:, enc["input_ids"].shape[1] :]):
            end = text.find(tok.eos_token)  # finished rows are padded after their EOS
            out.append(text if end < 0 else text[: end + len(tok.eos_token)])
    return out


def is_correct(completion: str, a: int, b: int) -> bool:
    m = re.search(r"<answer>(\d+)</answer>", completion)
    return m is not None and int(m.group(1)) == a + b


def plain_sum_is_correct(completion: str, a: int, b: int) -> bool:
    """For "a+b=" continued as plain text: the number it starts with."""
    m = re.match(r"\d+", completion)
    return m is not None and int(m.group()) == a + b


def evaluate(
    model,
    tok,
    seed: int,
    to_prompt=prompt,
    check=is_correct,
    form=WELL_FORMED,
    group: int = 8,
    sample: bool = True,
) -> dict:
    """Greedy accuracy on the held-out pairs, and T=1 sampling on those that carry."""
    test = addition_pairs("test")
    greedy = generate(model, tok, [to_prompt(a, b) for a, b in test])
    correct = [check(c, a, b) for c, (a, b) in zip(greedy, test)]
    carries = [a % 10 + b % 10 >= 10 for a, b in test]
    carry_pairs = [p for p, c in zip(test, carries) if c]
    m = {
        "greedy_acc": sum(correct) / len(test),
        "greedy_acc_no_carry": sum(x for x, c in zip(correct, carries) if not c)
        / (len(test) - len(carry_pairs)),
        "greedy_acc_carry": sum(x for x, c in zip(correct, carries) if c) / len(carry_pairs),
        "format": sum(form.fullmatch(c) is not None for c in greedy) / len(test),
        "example": greedy[0],
    }
    if sample:
        torch.manual_seed(seed)
        prompts = [to_prompt(a, b) for a, b in carry_pairs]
        sampled = generate(model, tok, prompts, n=group, temperature=1.0)
        hits = [check(c, *carry_pairs[k // group]) for k, c in enumerate(sampled)]
        m["sampled_acc_carry"] = sum(hits) / len(hits)
        starts = range(0, len(hits), group)
        m["group_has_correct"] = sum(any(hits[k : k + group]) for k in starts) / len(carry_pairs)
    return m


def report(name: str, m: dict) -> None:
    line = (
        f"{name}: held-out greedy accuracy {m['greedy_acc']:.3f} (no carry "
        f"{m['greedy_acc_no_carry']:.3f}, carry {m['greedy_acc_carry']:.3f}), "
        f"well-formed {m['format']:.3f}, e.g. {m['example']!r}"
    )
    if "sampled_acc_carry" in m:
        line += (
            f"\n  carry problems sampled at T=1: {m['sampled_acc_carry']:.3f} correct; "
            f"a group of 8 holds a correct answer {m['group_has_correct']:.3f} of the time"
        )
    print(line)


def evaluate_parity(model, tok, seed: int, group: int = 8, per_length: int = 60) -> dict:
    """parity: on held-out strings, per bucket: greedy accuracy and mode, and at T=1 the share of
    traces (retries included) and retries, and the accuracy of traces and of direct answers."""
    rng = random.Random(seed)
    test = [
        b
        for d in range(PARITY_BUCKETS["easy"][0], PARITY_WIDTH + 1)
        for b in (lambda s: rng.sample(s, min(per_length, len(s))))(parity_strings(d, "test"))
    ]
    prompts = [prompt_text(b) for b in test]
    greedy = generate(model, tok, prompts)
    torch.manual_seed(seed)
    sampled = generate(model, tok, prompts, n=group, temperature=1.0)
    out = {}

    def right(c, b):
        found = re.search(r"<answer>([01])</answer>", c)
        return found is not None and found.group(1) == str(b.count("1") % 2)

    for name, (lo, hi) in PARITY_BUCKETS.items():
        idx = [i for i, b in enumerate(test) if lo <= len(b) <= hi]
        g = [(greedy[i], test[i]) for i in idx]
        s = [(sampled[i * group + j], test[i]) for i in idx for j in range(group)]
        modes = [reasoning_mode(c) for c, _ in s]
        traced = [(c, b) for (c, b), m in zip(s, modes) if m in ("trace", "retry")]
        direct = [(c, b) for (c, b), m in zip(s, modes) if m == "direct"]
        out[name] = dict(
            greedy_acc=sum(right(c, b) for c, b in g) / len(g),
            greedy_trace=sum(reasoning_mode(c) in ("trace", "retry") for c, _ in g) / len(g),
            sampled_acc=sum(right(c, b) for c, b in s) / len(s),
            trace_share=len(traced) / len(s),
            retry_share=modes.count("retry") / len(s),
            other_share=modes.count("other") / len(s),
            trace_acc=sum(right(c, b) for c, b in traced) / max(1, len(traced)),
            direct_acc=sum(right(c, b) for c, b in direct) / max(1, len(direct)),
            example=g[-1][0],
        )
    return out


def evaluate_variant(model, tok, args) -> None:
    if args.variant == "parity":
        for name, m in evaluate_parity(model, tok, args.seed).items():
            print(
                f"{name:5s}: greedy {m['greedy_acc']:.3f} (traces {m['greedy_trace']:.2f}); "
                f"T=1: acc {m['sampled_acc']:.3f}, traces {m['trace_share']:.3f} "
                f"(retries {m['retry_share']:.3f}, other {m['other_share']:.3f}), "
                f"trace acc {m['trace_acc']:.3f}, direct acc {m['direct_acc']:.3f}; "
                f"e.g. {m['example']!r}"
            )
    elif args.variant == "cold-start":
        report("chat", evaluate(model, tok, args.seed))
    elif args.variant == "think-fusion":
        seed = args.seed
        report("think (no suffix)", evaluate(model, tok, seed))
        m = evaluate(model, tok, seed, lambda a, b: prompt(a, b, THINK), sample=False)
        report("think (/think)", m)
        m = evaluate(model, tok, seed, lambda a, b: prompt(a, b, NO_THINK), form=NO_THINK_FORMED)
        report("no-think (/no_think)", m)
        # --think_budget 0: the thinking is cut before it starts: </think> right after the prompt
        answer_only = re.compile(r"<answer>\d+</answer><\|endoftext\|>")
        m = evaluate(
            model, tok, seed, lambda a, b: prompt(a, b) + "</think>", sample=False, form=answer_only
        )
        report("think budget 0 (prompt + </think>)", m)
    else:
        seed, number_first = args.seed, re.compile(r"\d+\n.*", re.S)
        m = evaluate(
            model, tok, seed, lambda a, b: f"{a}+{b}=", plain_sum_is_correct, form=number_first
        )
        report("plain text 'a+b='", m)
        web = f"format in {WEB_SHARE:.0%} of documents"
        taught = "no format taught" if args.variant == "base" else web
        report(f"chat template (R1-Zero's prompt; {taught})", evaluate(model, tok, seed))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", choices=list(VARIANTS), default="cold-start")
    ap.add_argument("--out", default=None, help="default: assets/<the variant's folder>")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None, help="default: the variant's")
    ap.add_argument("--batch-size", type=int, default=64, help="sequences per step")
    ap.add_argument("--lr", type=float, default=3e-3)

    def share(flag: str, default: float, text: str) -> None:  # a float option, mostly a share
        ap.add_argument(flag, type=float, default=default, help=text)

    share("--p-carry", 0.2, "how often the teacher carries")
    share("--p-think", 0.1, "think-fusion: share of ' /think'")
    share("--p-no-think", 0.2, "think-fusion: share of ' /no_think' (the rest: no suffix)")
    share(
        "--p-budget", 0.1, "think-fusion: share of rows (no suffix) cut at a random thinking budget"
    )
    ap.add_argument("--max-lines", type=int, default=4, help="base: most lines per document")
    share("--p-trace-lo", 0.02, "parity: share of traces at 3 bits")
    share("--p-trace-hi", 0.45, "parity: share of traces at 12 bits")
    share("--p-retry", 0.3, "parity: share of traces that are retries (guess, wait, trace)")
    share("--p-cut", 0.05, "parity: share of traces cut by a thinking budget")
    ap.add_argument(
        "--direct-max",
        type=int,
        default=5,
        help="parity: the teacher's direct answers are right up to this many bits, "
        "coin flips beyond",
    )
    share("--p-easy", 0.3, "parity: share of extra rows of 3..direct-max bits")
    ap.add_argument(
        "--stop-after",
        type=int,
        default=None,
        metavar="K",
        help="a short build: stop after the first K steps of the full schedule, save, "
        "skip the evaluation (tests compare two such builds byte for byte)",
    )
    args = ap.parse_args()
    folder, steps = VARIANTS[args.variant]
    args.out = args.out or str(REPO / "assets" / folder)
    args.steps = args.steps or steps
    args.run_steps = args.steps if args.stop_after is None else min(args.stop_after, args.steps)

    # Reproducibility: results of float32 CPU kernels can depend on the thread count.
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    tok = build_tokenizer()
    for suffix in ("", THINK, NO_THINK):
        msg = [{"role": "user", "content": "47+38" + suffix}]
        chat = tok.apply_chat_template(msg, tokenize=False, add_generation_prompt=True)
        assert chat == prompt(47, 38, suffix)
    assert transcript(tok, 47, 38, random.Random(0), args).startswith(prompt(47, 38) + "<think>")
    if args.variant == "parity":
        ex = parity_examples("train", n=1)[0]
        assert build_prompt("parity", ex, tok) == prompt_text(ex["bits"])
        assert len(tok.encode(parity_trace("0110"))) == 4  # one token per step
    model = build_model(len(tok), args.seed, **SIZES.get(args.variant, {}))
    print(
        f"{args.variant}: {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"vocab {len(tok)}"
    )

    t0 = time.time()
    sft(model, tok, args)
    pre = args.variant.startswith("base") or args.variant == "parity"  # plain LM pre-training
    print(
        f"{'pre-training' if pre else 'SFT'}: {args.run_steps} of "
        f"{args.steps} steps in {time.time() - t0:.0f} s"
    )

    out = Path(args.out)
    model.save_pretrained(out)  # safetensors; the tied lm_head is stored once
    GenerationConfig(bos_token_id=1, eos_token_id=1, pad_token_id=0).save_pretrained(out)
    # save_jinja_files=False keeps the chat template inside tokenizer_config.json
    tok.save_pretrained(out, save_jinja_files=False)

    if args.stop_after is None:  # a short build's model is half-trained: nothing to measure
        evaluate_variant(model, tok, args)
    print(f"saved to {out}")


if __name__ == "__main__":
    main()
