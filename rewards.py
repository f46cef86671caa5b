"""rewards.py - the verifiers and tasks shared by nano_grpo.py and nano_ppo.py.

RLVR needs a reward a program can compute [R-BIN]: 1 if the answer is right, else 0. This file
holds those programs (answer extraction, math equivalence, Countdown, code tests in a sandbox,
the R1 format reward, length rewards) and the small table of tasks the trainers can train on.

Everything here is a plain function. Read it top to bottom:
  1. the tiny offline task the shipped model was built for (2-digit addition with a trace),
  2. answer extraction and the verifiers,
  3. the task table: how to load examples, build prompts and score completions.
"""
from __future__ import annotations

import random
import re

# ----------------------------------------------------------------------------------------------
# 1. The tiny offline task: two-digit addition, reasoned column by column.
#
# A completion looks like
#     <think>7+8=15,4+3+1=8</think><answer>85</answer>
# for the question "47+38": first the units column (7+8=15), then the tens column with the carry
# written out (4+3+1=8), then the answer. The shipped tiny model learned this format from a
# "sloppy teacher" that usually writes the carry as 0 (see assets/build_tiny_model.py), so the
# trace it writes is wrong exactly where a carry is needed. RL has a real mistake to fix, and a
# student can read in the trace what got fixed.
# ----------------------------------------------------------------------------------------------
ADDITION_HELD_OUT = 800  # (a, b) pairs that neither the SFT nor RL ever sees


def addition_pairs(split: str) -> list[tuple[int, int]]:
    """All (a, b) with 10 <= a, b <= 99, split once and for all into 'train' and 'test'.

    The split does not depend on any run's seed, so no run can ever train on a test pair.
    >>> len(addition_pairs("test")), len(addition_pairs("train"))
    (800, 7300)
    """
    pairs = [(a, b) for a in range(10, 100) for b in range(10, 100)]
    random.Random(14).shuffle(pairs)  # fixed seed: the split is part of the task's definition
    if split == "test":
        return pairs[:ADDITION_HELD_OUT]
    if split == "train":
        return pairs[ADDITION_HELD_OUT:]
    raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")


def addition_trace(a: int, b: int, carry_written: int | None = None) -> str:
    """The column-by-column solution of a + b in the R1 format.

    `carry_written` is the carry the writer puts into the tens column; None means the right one.
    A wrong carry makes the tens digit (and so the answer) wrong, consistently with the trace.
    >>> addition_trace(47, 38)
    '<think>7+8=15,4+3+1=8</think><answer>85</answer>'
    >>> addition_trace(47, 38, carry_written=0)   # the sloppy teacher's version
    '<think>7+8=15,4+3+0=7</think><answer>75</answer>'
    >>> addition_trace(97, 38)
    '<think>7+8=15,9+3+1=13</think><answer>135</answer>'
    """
    units = a % 10 + b % 10
    carry = units // 10 if carry_written is None else carry_written
    tens = a // 10 + b // 10 + carry
    answer = tens * 10 + units % 10
    return (f"<think>{a % 10}+{b % 10}={units},{a // 10}+{b // 10}+{carry}={tens}</think>"
            f"<answer>{answer}</answer>")


def addition_examples(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """Examples of the tiny task: {'question': '47+38', 'answer': '85', 'a': 47, 'b': 38}.

    `n` examples drawn with `seed` (all of the split, in a fixed order, when n is None).
    >>> addition_examples("test", n=1, seed=0)[0].keys()
    dict_keys(['question', 'answer', 'a', 'b'])
    """
    pairs = addition_pairs(split)
    if n is not None:
        pairs = random.Random(seed).sample(pairs, min(n, len(pairs)))
    return [{"question": f"{a}+{b}", "answer": str(a + b), "a": a, "b": b} for a, b in pairs]
