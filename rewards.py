"""rewards.py - the verifiers and tasks shared by nano_grpo.py and nano_ppo.py.

RLVR needs a reward a program can compute [R-BIN]: 1 if the answer is right, else 0. This file
holds those programs and the small table of tasks the trainers can train on; every one is a plain
function, with examples you can run (python -m doctest rewards.py). Read it top to bottom:
  1. the verifiers: answer extraction, math equivalence, Countdown, code tests, addition, parity,
  2. rewards on an answer's form: R1-Zero's format [R-FORMAT], Kimi k1.5's length [R-LEN],
  3. step verifiers, for process supervision [GRPO-PS],
  4. the offline tasks, generated here: 2-digit addition, parity of a bit string,
  5. the task table: where each task's examples come from, its prompt, task_reward.
Behind one banner at the end, the machinery: the time limits that keep a verifier from hanging,
the code sandbox, and the adapters for TRL and verl.
"""

from __future__ import annotations

import ast
import gc
import json
import logging
import operator
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Callable, NamedTuple

# --------------------------------------------------------------------------------------------------
# 1. Verifiers: the R(z) of [R-BIN], 1 if the answer is right, else 0, one per task.
#
# A verifier runs on every sampled answer of a training run, so it must never raise and never
# hang: one odd completion (a 100 kB expression, 9^{9^{9^9}}, an infinite loop) must cost at
# most about a second and a reward of 0. How that is enforced (time limits, a helper process, a
# sandbox for code) is machinery, at the end of the file.
# --------------------------------------------------------------------------------------------------


MAX_ANSWER_CHARS = 500  # a longer "answer" is wrong: no GSM8K/MATH answer is that long
MATH_TIMEOUT_S = 0.8  # CPU seconds one symbolic comparison may spend (its thread's); more: wrong
MATH_WALL_S = 2.0  # the wall-clock backstop: however busy the machine, wrong after this long


def _last_answer_tag(text: str) -> str | None:
    """The content of the last <answer>...</answer>, or None (rfind: linear on hostile text)."""
    end = text.rfind("</answer>")
    start = text.rfind("<answer>", 0, end) if end >= 0 else -1
    return text[start + len("<answer>") : end].strip() if start >= 0 else None


def _last_boxed(text: str) -> str | None:
    r"""The content of the last complete \boxed{...} (nested braces allowed), or None; one pass.

    >>> _last_boxed(r"\boxed{1} then \boxed{\frac{1}{2}}"), _last_boxed(r"\boxed{2")
    ('\\frac{1}{2}', None)
    """
    # open_boxes: (where its content starts, depth outside it)
    open_boxes, depth, last = [], 0, None
    for m in re.finditer(r"\\boxed\s*\{|[{}]", text):
        if m.group() == "}":
            depth -= 1
            while open_boxes and open_boxes[-1][1] > depth:  # boxes that can never close any more
                open_boxes.pop()
            if open_boxes and open_boxes[-1][1] == depth:
                last = text[open_boxes.pop()[0] : m.start()]
        else:
            if m.group() != "{":
                open_boxes.append((m.end(), depth))
            depth += 1
    return last


def extract_answer(text: str) -> str | None:
    r"""The final answer of a completion: the last <answer>...</answer>, else the last \boxed{...},
    else what follows a GSM8K-style '####'; None if there is none.

    >>> extract_answer("<think>7+8=15,4+3+1=8</think><answer> 85 </answer>")
    '85'
    >>> extract_answer(r"so $x = \boxed{\frac{1}{2}}$.")
    '\\frac{1}{2}'
    >>> extract_answer("48/2 = 24 clips in May.\n#### 72"), extract_answer("I don't know")
    ('72', None)
    """
    if not isinstance(text, str):
        return None
    for found in (_last_answer_tag(text), _last_boxed(text)):
        if found is not None:
            return found.strip()
    if "####" in text:
        return text[text.rfind("####") + 4 :].strip().split("\n")[0].strip() or None
    return None


def _clean(s: str) -> str:
    r"""Drop notation that does not change the value: $ signs, \text{...}, spacing, degree signs."""
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "%").replace("\u2212", "-")
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"\\[,;:! ]|\^\{?\\circ\}?|°", "", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return " ".join(s.split()).rstrip(".")


# A plain number: -12, 1234.50, .5, 3/4, \frac{3}{4}, 50%, maybe followed by a unit word or two.
_NUMBER = re.compile(
    r"(-?)(?:\\frac\{(\d+)\}\{(\d+)\}|(\d+)/(\d+)|(\d+\.?\d*|\.\d+))"  # the sign, the value
    r"\s*(%?)(?:\s*[a-zA-Z]{2,}){0,2}"  # a percent sign, up to two unit words
)


def _as_numbers(s: str) -> set[Fraction] | None:
    """The exact values a plain-number answer can mean (p% means p or p/100), else None."""
    m = _NUMBER.fullmatch(re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s))  # 1,234,567 -> 1234567
    if m is None:
        return None
    sign, num, den, num2, den2, decimal, percent = m.groups()
    value = Fraction(decimal) if decimal else Fraction(int(num or num2), int(den or den2))
    value = -value if sign else value
    return {value, value / 100} if percent else {value}


def _unbox(s: str) -> str:
    r"""'\boxed{x}' -> 'x'; anything else unchanged."""
    return (_last_boxed(s) or s) if s.startswith("\\boxed") else s


def math_equal(pred, gold) -> bool:
    r"""Whether answer `pred` equals the reference `gold` mathematically. Never raises.

    1. Same text once notation is dropped ($, \text{}, spacing) -> equal.
    2. Both plain numbers (1,234.00  -5  3/4  \frac{3}{4}  50%, maybe with a unit word) -> exact
       comparison with Fraction. A percentage may be read either way: for gold 50\%, both 50 and
       0.5 count as right (and 50% matches gold 0.5).
    3. Otherwise Hugging Face math-verify (LaTeX, sqrt, intervals, expressions), at most
       MATH_TIMEOUT_S of CPU time (MATH_WALL_S of wall-clock at the most), in any thread.
    Answers over MAX_ANSWER_CHARS are wrong.

    >>> math_equal("$1,234.00", "1234"), math_equal("0.5", "50\\%")
    (True, True)
    >>> math_equal("1/2", r"\frac{1}{2}")
    True
    >>> math_equal(r"\sqrt{2}", "1.414"), math_equal("[1,2)", "[1,2]"), math_equal("2", "3")
    (False, False, False)
    >>> math_equal(r"\frac{\sqrt{8}}{2}", r"\sqrt{2}")
    True
    """
    try:
        if pred is None or gold is None:
            return False
        pred, gold = str(pred).strip(), str(gold).strip()
        if not pred or len(pred) > MAX_ANSWER_CHARS or len(gold) > MAX_ANSWER_CHARS:
            return False
        pred, gold = _unbox(pred), _unbox(gold)
        if _clean(pred) == _clean(gold):
            return True
        pred_values, gold_values = _as_numbers(_clean(pred)), _as_numbers(_clean(gold))
        if pred_values is not None and gold_values is not None:
            return bool(pred_values & gold_values)
        return _verify_in_time(pred, gold)
    except Exception:
        return False


def gsm8k_reward(completion: str, answer: str) -> float:
    """[R-BIN] for GSM8K. `answer` is the dataset's whole solution ('... #### 72') or just '72'.

    >>> solution = "48/2 = 24\\n#### 72"
    >>> gsm8k_reward("<think>48/2=24, 48+24=72</think><answer>72 clips</answer>", solution)
    1.0
    """
    return 1.0 if math_equal(extract_answer(completion), str(answer).split("####")[-1]) else 0.0


def math_reward(completion: str, answer: str) -> float:
    r"""[R-BIN] for MATH: the extracted answer against a LaTeX reference answer.

    >>> math_reward(r"<think>...</think><answer>\dfrac{1}{2}</answer>", r"\frac12")
    1.0
    """
    return 1.0 if math_equal(extract_answer(completion), answer) else 0.0


_COUNTDOWN_OPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
}


def _evaluate(node: ast.expr) -> Fraction:
    """The exact value of a checked expression tree (only int constants and + - * /)."""
    if isinstance(node, ast.Constant):
        return Fraction(node.value)
    return _COUNTDOWN_OPS[type(node.op)](_evaluate(node.left), _evaluate(node.right))


def countdown_reward(completion: str, numbers: list[int], target: int) -> float:
    """[R-BIN] for Countdown: 1.0 iff the <answer> is an arithmetic expression that uses every given
    number exactly once, only + - * / and parentheses (no unary minus), and equals `target`
    exactly (Fraction arithmetic, so 6 / 4 * 2 = 3 counts). 'expr = target' is accepted too.
    The text is parsed with `ast` and checked against a whitelist of nodes, never eval'ed.

    >>> countdown_reward("<answer>(44 - 19) * 4</answer>", [19, 44, 4], 100)
    1.0
    >>> countdown_reward("<answer>44 - 19 + 4 = 29</answer>", [44, 19, 4], 29)
    1.0
    >>> countdown_reward("<answer>44 * 2</answer>", [44, 2, 1], 88)  # 1 is not used
    0.0
    """
    try:
        equation = _last_answer_tag(completion) if isinstance(completion, str) else None
        # ASCII digits, operators, brackets and blanks only; short (4 numbers need ~20 characters)
        chars = r"[0-9+\-*/() \t\n=]+"
        if equation is None or len(equation) > 200 or not re.fullmatch(chars, equation):
            return 0.0
        expression, _, claimed = equation.partition("=")
        if claimed and int(claimed) != int(target):
            return 0.0
        tree = ast.parse(expression.strip(), mode="eval").body
        allowed = (ast.BinOp, ast.Constant, *_COUNTDOWN_OPS)
        if not all(isinstance(node, allowed) for node in ast.walk(tree)):
            return 0.0  # e.g. ** (ast.Pow), // , unary minus
        used = [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)]
        if any(type(x) is not int for x in used) or sorted(used) != sorted(int(x) for x in numbers):
            return 0.0
        return 1.0 if _evaluate(tree) == int(target) else 0.0
    except (SyntaxError, ValueError, TypeError, ZeroDivisionError, RecursionError, MemoryError):
        return 0.0


def _last_python_block(text: str) -> str | None:
    """The code of the last ```python (or ```py) block, or None."""
    fence = r"```(?:python|py)[ \t]*\n(.*?)```"
    blocks = re.findall(fence, text, re.DOTALL) if isinstance(text, str) else []
    return blocks[-1] if blocks else None


def code_reward(
    completion: str, tests: list[str], timeout: float = 5.0, memory_mb: int = 512
) -> float:
    """The fraction of `tests` (assert statements, e.g. MBPP's test_list) that pass when run after
    the last ```python block of the completion. A fraction, not all-or-nothing, so a partly right
    program still gets a signal; `code_reward(...) == 1.0` is MBPP's usual pass/fail.

    The program runs in a fresh `python -I` process (_sandbox_child) in its own session, in a new
    temporary directory, with an empty environment, for at most `timeout` wall-clock seconds.
    Guaranteed: the call returns within about timeout + 1 s; then the whole process group is killed
    (SIGKILL) and the directory removed. Limits: CPU int(timeout) + 1 s, address space memory_mb,
    files 16 MiB, no core dumps, and RLIMIT_NPROC = 1: no new process or thread at all. NPROC does
    not bind for root, so a child started as root first becomes uid/gid 65534 ('nobody'); then it
    can write only to world-writable places (/tmp, /dev/shm), cannot read other processes'
    /proc/*/environ, and may be unable to import modules beyond _SANDBOX_MODULES and those already
    loaded (when the interpreter's files are unreadable for 'nobody', e.g. under /root).
    Best effort, in Python: open(), os.open() and FileIO only inside the directory; fork, exec*,
    spawn*, system, kill, setsid, remove, chmod, ... set to None; subprocess, multiprocessing and
    ctypes refuse to import; the tests run with the harness's own exec and compile.
    Not guaranteed: a deliberately hostile program can undo that guard (e.g. via
    object.__subclasses__()) and is then held only by the limits above (as an ordinary user it may
    read and write whatever that user may, the trainer's /proc/<pid>/environ included). Network
    access is not blocked. A program can fake passing tests (an object whose __eq__ always says
    True). Root without CAP_SETUID stays root: then only the guard and the group kill hold. This is
    a reward function, not a security boundary: for untrusted code at scale use a container or a VM.

    >>> code_reward("```python\\ndef add(a, b):\\n    return a + b\\n```",
    ...             ["assert add(1, 2) == 3", "assert add(2, 2) == 5"])
    0.5
    """
    code = _last_python_block(completion)
    if code is None or not tests:
        return 0.0
    limits = {"cpu_s": int(timeout) + 1, "memory": memory_mb << 20}
    job = json.dumps({"code": code, "tests": list(tests), **limits})
    scratch = tempfile.TemporaryDirectory(prefix="nano_rlvr_sandbox_", ignore_cleanup_errors=True)
    with scratch as workdir, tempfile.TemporaryFile() as results:
        command = _python_running("_sandbox_child", "-I")
        streams = dict(stdin=subprocess.PIPE, stdout=results, stderr=subprocess.DEVNULL)
        # start_new_session: its own session and process group
        child = subprocess.Popen(command, cwd=workdir, env={}, start_new_session=True, **streams)
        try:
            child.communicate(job.encode(), timeout=timeout)
        except (subprocess.TimeoutExpired, OSError):
            pass
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)  # the child and anything it started
            except (ProcessLookupError, PermissionError):
                pass
            child.wait()
        results.seek(0)
        marks = results.read(1 << 16).split()[: len(tests)]
    return sum(mark == b"1" for mark in marks) / len(tests)


# ALGO LOGIC, notebooks/exercises.ipynb exercise 7 (a new verifier, modelled on this one)
def addition_reward(completion: str, example: dict) -> float:
    """[R-BIN] for the tiny task: the answer must be exactly the sum, written as an integer.

    >>> ex = {"question": "47+38", "answer": "85"}
    >>> addition_reward(addition_trace(47, 38), ex), addition_reward(addition_trace(47, 38, 0), ex)
    (1.0, 0.0)
    """
    return 1.0 if extract_answer(completion) == str(example["answer"]) else 0.0


def parity_reward(completion: str, example: dict) -> float:
    """[R-BIN] 1.0 iff the answer is the parity, however it was reached.

    >>> ex = parity_example("0110")
    >>> [parity_reward(parity_completion("0110", m), ex) for m in ("direct", "trace", "retry")]
    [1.0, 1.0, 1.0]
    >>> parity_reward("<think>eOEo</think><answer>1</answer>", ex)
    0.0
    >>> parity_reward("<think>eOEe</think>", ex)
    0.0
    """
    return 1.0 if extract_answer(completion) == example["answer"] else 0.0


# --------------------------------------------------------------------------------------------------
# 2. Rewards on the form of an answer: [R-FORMAT] R1-Zero's tags, [R-LEN] Kimi k1.5's length.
# --------------------------------------------------------------------------------------------------


# [R-FORMAT] R1-Zero's format: reasoning in <think>...</think>, then the answer in
# <answer>...</answer>, then nothing. The opening <think> may sit at the end of the prompt. Inside a
# block no tag may appear.
_NO_TAG = r"(?:(?!</?think>|</?answer>).)*"
_FORMAT = re.compile(
    rf"\s*(?:<think>)?{_NO_TAG}</think>\s*<answer>{_NO_TAG}</answer>\s*", re.DOTALL
)


def format_reward(completion: str) -> float:
    """[R-FORMAT] 1.0 iff the completion is '<think>...</think><answer>...</answer>', nothing more.

    >>> format_reward("<think>7+8=15</think>\\n<answer>15</answer>\\n")
    1.0
    >>> format_reward("7+8=15</think><answer>15</answer>")
    1.0
    >>> format_reward("<answer>15</answer><think>...</think>")
    0.0
    >>> format_reward("<think>..</think><answer>15</answer> ok?")
    0.0
    """
    return 1.0 if isinstance(completion, str) and _FORMAT.fullmatch(completion) else 0.0


# ALGO LOGIC, notebooks/exercises.ipynb exercise 4 (Kimi's length reward)
def length_rewards(lengths: list[int], correct: list[bool]) -> list[float]:
    """[R-LEN] Kimi k1.5's length reward for one group of answers to the same question:
    lambda_i = 0.5 - (len_i - min_len) / (max_len - min_len). A correct answer gets lambda_i
    (shorter is better); a wrong one gets min(0, lambda_i) (no bonus for being short and wrong).
    All 0 if every length is the same.

    >>> length_rewards([10, 20, 30], [True, True, False])
    [0.5, 0.0, -0.5]
    >>> length_rewards([10, 20, 30], [False, False, True])
    [0.0, 0.0, -0.5]
    """
    shortest, longest = min(lengths), max(lengths)
    if shortest == longest:
        return [0.0] * len(lengths)
    lambdas = [0.5 - (n - shortest) / (longest - shortest) for n in lengths]
    return [lam if ok else min(0.0, lam) for lam, ok in zip(lambdas, correct)]


def overlong_penalty(length: int, max_length: int, buffer: int) -> float:
    """DAPO's soft overlong punishment: 0 up to max_length - buffer, then falling linearly to -1 at
    max_length, -1 beyond it.

    >>> [overlong_penalty(n, max_length=100, buffer=20) for n in (80, 90, 100, 120)]
    [0.0, -0.5, -1.0, -1.0]
    """
    if length <= max_length - buffer:
        return 0.0
    if length >= max_length:
        return -1.0
    return (max_length - buffer - length) / buffer


def reasoning_mode(completion: str) -> str:
    """How an R1-format answer was reached: 'direct' (an empty think block), 'retry' (the think
    block says 'wait'), 'trace' (any other think block), 'other' (no closed think block).

    >>> [reasoning_mode(parity_completion("0110", m)) for m in ("direct", "trace", "retry")]
    ['direct', 'trace', 'retry']
    >>> reasoning_mode("<answer>0</answer>")
    'other'
    >>> reasoning_mode("<think>7+8=15,4+3+1=8</think><answer>85</answer>")
    'trace'
    """
    head = completion[:2000]
    end = head.find("</think>")
    if end < 0:
        return "other"
    start = head.rfind("<think>", 0, end)
    think = head[start + len("<think>") if start >= 0 else 0 : end]
    if not think.strip():
        return "direct"
    return "retry" if "wait" in think.lower() else "trace"


# --------------------------------------------------------------------------------------------------
# 3. Step verifiers, for process supervision [GRPO-PS]: one reward per reasoning step.
#
# Instead of one reward per answer, one per step. Each returns [(end, score), ...]: `end` is the
# character index just past the step in the completion, `score` is 1.0 (right) or 0.0 (wrong).
# nano_grpo.py --supervision process turns the ends into token positions.
# --------------------------------------------------------------------------------------------------


_COLUMN_STEP = re.compile(r"(\d{1,3})\+(\d{1,3})(?:\+(\d{1,3}))?=(\d{1,4})")


def addition_steps(completion: str, example: dict) -> list[tuple[int, float]]:
    """The tiny task's trace step by step: the units column, the tens column (carry included),
    then the final answer as the last step (scored like addition_reward).

    >>> ex = {"question": "47+38", "answer": "85", "a": 47, "b": 38}
    >>> addition_steps(addition_trace(47, 38), ex)
    [(13, 1.0), (21, 1.0), (48, 1.0)]
    >>> addition_steps(addition_trace(47, 38, carry_written=0), ex)   # units right, carry dropped
    [(13, 1.0), (21, 0.0), (48, 0.0)]
    """
    a, b = int(example["a"]), int(example["b"])
    units = a % 10 + b % 10
    tens = a // 10 + b // 10 + units // 10
    expected = [f"{a % 10}+{b % 10}={units}", f"{a // 10}+{b // 10}+{units // 10}={tens}"]
    head = completion[:500]  # the trace is short; bounds the work on hostile text
    think_end = head.find("</think>")
    trace = head[:think_end] if think_end >= 0 else head
    written = _COLUMN_STEP.finditer(trace)
    steps = [(m.end(), float(m.group(0) == want)) for m, want in zip(written, expected)]
    tag = completion.rfind("</answer>")
    answer_end = tag + len("</answer>") if tag >= 0 else len(completion)
    steps.append((answer_end, addition_reward(completion, example)))
    return steps


# bounded: linear time on digit floods
_NUM = r"(?<![\d.,])-?\d{1,12}(?:,\d{3}){0,4}(?:\.\d{1,8})?(?![\d])"
_ARITH_STEP = re.compile(rf"({_NUM})\s*([-+*/x×÷])\s*({_NUM})\s*=\s*\$?\s*({_NUM})")


def arithmetic_steps(text: str) -> list[tuple[int, float]]:
    """Every `a op b = c` written in free text (GSM8K-style, `<<48/2=24>>` annotations too), each
    scored exactly with fractions; a result rounded to the digits it shows counts as right.

    >>> arithmetic_steps("She sold 48/2 = <<48/2=24>>24 clips, then 48+24 = 72 and 3*5=16.")
    [(25, 1.0), (52, 1.0), (63, 0.0)]
    >>> arithmetic_steps("10/3 = 3.33 each")
    [(11, 1.0)]
    """
    mul, div = operator.mul, lambda x, y: x / y if y else None
    ops = {"+": operator.add, "-": operator.sub, "*": mul, "x": mul, "×": mul, "/": div, "÷": div}
    steps = []
    for m in _ARITH_STEP.finditer(text[:20_000]):
        try:
            x, y, c = (Fraction(g.replace(",", "")) for g in (m.group(1), m.group(3), m.group(4)))
        except (ValueError, ZeroDivisionError):
            continue
        value = ops[m.group(2)](x, y)
        decimals = len(m.group(4).split(".")[1]) if "." in m.group(4) else 0
        right = value is not None and (value == c or (decimals > 0 and round(value, decimals) == c))
        steps.append((m.end(), float(right)))
    return steps


def parity_steps(completion: str, example: dict) -> list[tuple[int, float]]:
    """[GRPO-PS] step verifier: each trace symbol (after the last 'wait', if any) is a step, right
    iff it is the k-th symbol of the true trace; the final answer is the last step. A direct
    answer has one step, its answer.

    >>> ex = parity_example("0110")
    >>> parity_steps(parity_completion("0110"), ex)
    [(8, 1.0), (9, 1.0), (10, 1.0), (11, 1.0), (37, 1.0)]
    >>> parity_steps("<think>eOoo</think><answer>1</answer>", ex)   # the third bit copied wrong
    [(8, 1.0), (9, 1.0), (10, 0.0), (11, 0.0), (37, 0.0)]
    >>> parity_steps(parity_completion("0110", "direct"), ex)
    [(33, 1.0)]
    """
    head = completion[:300]  # a trace is short; bounds the work on hostile text
    start = head.find("<think>")
    start = 0 if start < 0 else start + len("<think>")
    end = head.find("</think>", start)
    end = len(head) if end < 0 else end
    retry = head.rfind(WAIT.strip(), start, end)
    start = start if retry < 0 else retry + len(WAIT.strip())
    want, steps = parity_trace(example["bits"]), []
    for i in range(start, end):
        if head[i] in "eoEO":
            k = len(steps)
            steps.append((i + 1, float(k < len(want) and head[i] == want[k])))
    tag = completion.rfind("</answer>")
    answer_end = tag + len("</answer>") if tag >= 0 else len(completion)
    steps.append((answer_end, parity_reward(completion, example)))
    return steps


def task_steps(name: str, completion: str, example: dict) -> list[tuple[int, float]]:
    """The steps of any task: the tiny task's own trace, else the arithmetic in the text; the
    final answer (the task's correctness) is always the last step."""
    if name == "addition":
        return addition_steps(completion, example)
    if name == "parity":
        return parity_steps(completion, example)
    steps = arithmetic_steps(completion)
    return steps + [(len(completion), TASKS[name].correct(completion, example))]


# --------------------------------------------------------------------------------------------------
# 4. The offline tasks, generated here: no download, the same examples on every machine.
# --------------------------------------------------------------------------------------------------


# The shipped tiny model's task: two-digit addition, reasoned column by column, e.g.
#     <think>7+8=15,4+3+1=8</think><answer>85</answer>
# for the question "47+38": first the units column (7+8=15), then the tens column with the carry
# written out (4+3+1=8), then the answer. The shipped tiny model learned this format from a
# "sloppy teacher" that usually writes the carry as 0 (see assets/build_tiny_model.py), so the
# trace it writes is wrong exactly where a carry is needed. RL has a real mistake to fix, and a
# student can read in the trace what got fixed.
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
    think = f"{a % 10}+{b % 10}={units},{a // 10}+{b // 10}+{carry}={tens}"
    return f"<think>{think}</think><answer>{answer}</answer>"


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


# The R1-Zero miniature: the parity of a bit string, answered directly or worked out bit by bit.
#
# The question is d = 3..12 bits, right-padded with "_" to PARITY_WIDTH characters (so every
# prompt has the same length): "0110________". The answer is 1 if the string holds an odd number
# of ones, else 0. A tiny transformer cannot do the parity of many bits "in its head" (a direct
# answer to a long string is a coin flip), but each step of the running parity is easy. The trace
# writes one symbol per bit, the pair (the bit, the parity so far): e / o for a 0 bit after which
# the count of ones is even / odd, E / O for a 1 bit. So a trace is as long as the string:
#     <think>eOEe</think><answer>0</answer>          worked out: 0 (even) 1 (odd) 1 (even) 0 (even)
#     <think></think><answer>0</answer>              answered directly
#     <think>1 wait eOEe</think><answer>0</answer>   a retry: a quick guess, "wait", then the trace
# (One symbol per step matters: a plain 0/1 running-parity trace does not train at this size,
# because its next symbol is independent of the input bit alone; the pair makes the bit visible.)


PARITY_WIDTH = 12
PARITY_BUCKETS = {"easy": (3, 4), "mid": (5, 8), "hard": (9, 12)}  # bucket -> (min d, max d)
PARITY_HELD_OUT = 0.25  # of the strings of each length d (at least one), never trained on
# (the bit, the parity after it) -> its symbol in a trace
PARITY_SYMBOLS = {("0", 0): "e", ("0", 1): "o", ("1", 0): "E", ("1", 1): "O"}
WAIT = " wait "  # the retry marker, after a guess and before the trace


def parity_bucket(d: int) -> str:
    """'easy' (3-4 bits), 'mid' (5-8) or 'hard' (9-12)."""
    return next(name for name, (lo, hi) in PARITY_BUCKETS.items() if lo <= d <= hi)


def parity_strings(d: int, split: str) -> list[str]:
    """The bit strings of length d in a split. A fixed quarter of each length (ranked by a hash, so
    independent of any seed) is 'test'; the rest is 'train'. The all-zero string stays in 'train':
    the one string with no 1 to count is a corner case that a held-out copy cannot teach (held out,
    the model answered '000' and '0000' wrong and every other short string right).

    >>> parity_strings(2, "test"), len(parity_strings(12, "test")), len(parity_strings(12, "train"))
    (['10'], 1024, 3072)
    """
    if split not in ("train", "test"):
        raise ValueError(f"unknown split {split!r}: use 'train' or 'test'")
    return list(_parity_split(d)[split == "test"])


@lru_cache(maxsize=None)
def _parity_split(d: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(train, test) strings of length d, each in counting order."""
    strings = [format(i, f"0{d}b") for i in range(2**d)]
    ranked = sorted(strings[1:], key=lambda s: zlib.crc32(s.encode()))  # strings[0]: all zeros
    test = set(ranked[: max(1, round(PARITY_HELD_OUT * len(strings)))])
    return tuple(s for s in strings if s not in test), tuple(s for s in strings if s in test)


def parity_trace(bits: str) -> str:
    """One symbol per bit: the bit (lower case 0, upper case 1) and the parity after it (e/o).

    >>> parity_trace("0110"), parity_trace("111")
    ('eOEe', 'OEO')
    """
    out, parity = [], 0
    for b in bits:
        parity ^= b == "1"
        out.append(PARITY_SYMBOLS[(b, parity)])
    return "".join(out)


def parity_completion(
    bits: str, mode: str = "trace", guess: str = "1", answer: str | None = None
) -> str:
    """A transcript: 'direct', 'trace', or 'retry' (a guess, WAIT, then the trace); the answer is
    the parity unless given.

    >>> parity_completion("0110", "direct"), parity_completion("0110", "retry", guess="1")
    ('<think></think><answer>0</answer>', '<think>1 wait eOEe</think><answer>0</answer>')
    """
    answer = str(bits.count("1") % 2) if answer is None else answer
    trace = parity_trace(bits)
    think = {"direct": "", "trace": trace, "retry": guess + WAIT + trace}[mode]
    return f"<think>{think}</think><answer>{answer}</answer>"


def parity_example(bits: str) -> dict:
    """{'question': '0110________', 'answer': '0', 'bits': '0110', 'd': 4, 'bucket': 'easy'}"""
    question, answer, d = bits.ljust(PARITY_WIDTH, "_"), str(bits.count("1") % 2), len(bits)
    bucket = parity_bucket(d)
    return {"question": question, "answer": answer, "bits": bits, "d": d, "bucket": bucket}


def parity_examples(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """n examples (1000 if None) of a split, the length d cycling through 3..12 (so every length is
    equally common), each string drawn with `seed` from that length's strings of the split.

    >>> [ex["question"] for ex in parity_examples("test", n=3, seed=0)]
    ['110_________', '0011________', '10101_______']
    """
    rng = random.Random(f"parity/{split}/{seed}")
    lengths = range(PARITY_BUCKETS["easy"][0], PARITY_WIDTH + 1)
    ds = [lengths[i % len(lengths)] for i in range(1000 if n is None else n)]
    return [parity_example(rng.choice(parity_strings(d, split))) for d in ds]


def countdown_problem(rng: random.Random) -> dict:
    """A random Countdown problem with a known solution: 3 or 4 numbers from 1 to 99 are combined
    pairwise with random operations; kept if the result is a whole number from 1 to 100.

    >>> p = countdown_problem(random.Random(1))
    >>> countdown_reward(f"<answer>{p['solution']}</answer>", p["numbers"], p["target"])
    1.0
    """
    ops = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}
    while True:
        numbers = [rng.randint(1, 99) for _ in range(rng.choice((3, 4)))]
        parts = [(Fraction(x), str(x)) for x in numbers]  # (value, expression)
        while len(parts) > 1:
            a, x = parts.pop(rng.randrange(len(parts)))
            b, y = parts.pop(rng.randrange(len(parts)))
            op = rng.choice("+-*/" if b else "+-*")
            parts.append((ops[op](a, b), f"({x} {op} {y})"))
        value, expression = parts[0]
        if value.denominator == 1 and 1 <= value <= 100:
            return {"numbers": numbers, "target": int(value), "solution": expression[1:-1]}


# --------------------------------------------------------------------------------------------------
# 5. The task table: each task's examples (offline or from the hub), its prompt, its verifier.
#
# Examples are plain dicts with at least 'question' and 'answer'.
# --------------------------------------------------------------------------------------------------


class TaskError(ValueError):
    """A bad task name, split or data file; the message is one line that names the fix."""


class Task(NamedTuple):
    load: Callable[[str, int | None, int, str | None], list[dict]]  # (split, n, seed, data_path)
    instruction: str  # the user turn; {question} is replaced by the example's question
    correct: Callable[[str, dict], float]  # (completion, example) -> [R-BIN] score in [0, 1]


_THINK = "Think step by step inside <think> </think> tags, then "
MATH_INSTRUCTION = (
    "{question}\n" + _THINK + "give only the final answer inside <answer> </answer> tags."
)
COUNTDOWN_INSTRUCTION = (
    "{question}\n" + _THINK + "write only the equation inside <answer> </answer> tags,"
    " for example <answer>(1 + 2) / 3</answer>."
)
CODE_INSTRUCTION = (
    "{question}\n" + _THINK + "give the complete Python code inside <answer> </answer> tags,"
    " as one ```python code block."
)


# For a base model without a chat template: R1-Zero's plain-text prompt, ending in the think block.
BASE_TEMPLATE = (
    "A conversation between User and Assistant. The User asks a question and the Assistant "
    "solves it: it first thinks about the reasoning process, then gives the answer, as "
    "<think> reasoning </think> <answer> answer </answer>.\nUser: {content}\nAssistant: <think>"
)


COUNTDOWN_TEST_ROWS = 1000  # held out from the end of Countdown-Tasks-3to4 (a train split only)


def _sample(indices: range, n: int | None, seed: int) -> list[int]:
    """All indices in order (n None), or n of them drawn with `seed`."""
    return list(indices) if n is None else random.Random(seed).sample(indices, min(n, len(indices)))


def _offline(data_path: str | None) -> None:
    if data_path:
        raise TaskError("this task is generated offline and reads no file: drop --data_path")


def _read_rows(path: str) -> list[dict]:
    """Rows of a local .jsonl/.json (a list of rows)/.parquet file in the hub dataset's schema."""
    file = Path(path)
    if not file.is_file() or file.suffix not in (".jsonl", ".json", ".parquet"):
        raise TaskError(
            f"--data_path {path}: pass an existing .jsonl, .json (a list of rows) or .parquet file"
        )
    if file.suffix == ".parquet":
        import pyarrow.parquet  # installed with `datasets`

        return pyarrow.parquet.read_table(file).to_pylist()
    try:
        text = file.read_text()
        if file.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}): fix the file") from e
    if not isinstance(rows, list):
        raise TaskError(f"{path} holds no list of rows: use .jsonl, or a .json list of rows")
    return rows


def _rows(repo: str, config: str | None, split: str, data_path: str | None) -> list[dict]:
    """The rows of a hub dataset split, or of the local file that replaces it. Offline (one quick
    try at the hub fails) only the local cache is read: without it, the hub's client would retry
    for ~25 s before the same error."""
    if data_path:
        return _read_rows(data_path)
    offline = not _hub_reachable()
    try:
        import datasets  # imported only when a hub task is loaded

        if offline:
            _hub_offline()
        return datasets.load_dataset(repo, config, split=split).to_list()
    except Exception as e:
        why = "the hub is unreachable, and it is not in the cache" if offline else type(e).__name__
        raise TaskError(
            f"could not load {repo} from the Hugging Face hub ({why}): run online, "
            "or pass --data_path with a local .jsonl/.json/.parquet copy"
        ) from e


HUB_TRY_SECONDS = 3.0  # the one try at the hub before a download


def _hub_reachable() -> bool:
    """One TCP connection to the hub (HF_ENDPOINT's host), HUB_TRY_SECONDS at most. True without
    trying under HF_HUB_OFFLINE=1 (nothing will be asked) or behind a proxy (only it can tell)."""
    from urllib.parse import urlsplit

    proxies = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on") or any(
        os.environ.get(v) for v in proxies
    ):
        return True
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=HUB_TRY_SECONDS).close()
        return True
    except OSError:
        return False


def _hub_offline():
    """HF_HUB_OFFLINE=1 from here on, also for huggingface_hub and datasets already imported
    (they read it once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    for name in ("huggingface_hub.constants", "datasets.config"):
        if hasattr(sys.modules.get(name), "HF_HUB_OFFLINE"):
            sys.modules[name].HF_HUB_OFFLINE = True


def _field(row: dict, name: str, i: int):
    if not isinstance(row, dict) or row.get(name) is None:
        raise TaskError(f"row {i} has no field {name!r}: give every row the hub dataset's fields")
    return row[name]


def _hub_loader(
    sources: dict[str, tuple[str, str | None, str]], convert: Callable[[dict, int], dict]
):
    """A Task.load for a hub dataset; sources: our split -> (repo, config, hub split)."""

    def load(split, n, seed, data_path):
        rows = _rows(*sources[split], data_path)
        return [convert(rows[i], i) for i in _sample(range(len(rows)), n, seed)]

    return load


def _gsm8k_example(row: dict, i: int) -> dict:
    solution, question = _field(row, "answer", i), _field(row, "question", i)
    answer = solution.split("####")[-1].strip()  # "...reasoning...\n#### 72" -> "72"
    return {"question": question, "answer": answer, "solution": solution}


def _math_example(row: dict, i: int) -> dict:
    # MATH-500 rows have an 'answer'; MATH train rows only a 'solution' ending in \boxed{answer}
    answer = row.get("answer") if isinstance(row, dict) else None
    answer = answer or _last_boxed(_field(row, "solution", i))
    if not answer:
        raise TaskError(
            f"row {i} has no field 'answer' and no \\boxed{{...}} in its 'solution': fix the row"
        )
    question = _field(row, "problem", i)
    return {"question": question, "answer": answer, "solution": row.get("solution", "")}


def _countdown_example(numbers, target, **extra) -> dict:
    numbers, target = [int(x) for x in numbers], int(target)
    question = (
        f"Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
        "arithmetic operations (+, -, *, /) and each number can only be used once."
    )
    example = {"question": question, "answer": str(target), "numbers": numbers, "target": target}
    return {**example, **extra}


def _mbpp_example(row: dict, i: int) -> dict:
    tests, setup = list(_field(row, "test_list", i)), row.get("test_setup_code") or ""
    text = _field(row, "text", i)
    question = f"{text}\nYour code should pass tests like this one:\n" + "\n".join(tests[:1])
    code, task_id = _field(row, "code", i), row.get("task_id")
    runnable = [f"{setup}\n{test}" if setup else test for test in tests]
    return {"question": question, "answer": code, "task_id": task_id, "tests": runnable}


def _addition(split: str, n: int | None, seed: int, data_path: str | None) -> list[dict]:
    _offline(data_path)
    return addition_examples(split, n, seed)


def _parity(split: str, n: int | None, seed: int, data_path: str | None) -> list[dict]:
    _offline(data_path)
    return parity_examples(split, n, seed)


def _countdown_procedural(
    split: str, n: int | None, seed: int, data_path: str | None
) -> list[dict]:
    """n problems (1000 if n is None) from a stream seeded by (split, seed). A problem belongs to
    'test' iff a hash of its numbers and target says so (1 in 10): train and test share none."""
    _offline(data_path)
    rng, seen, examples = random.Random(f"countdown/{split}/{seed}"), set(), []
    while len(examples) < (1000 if n is None else n):
        problem = countdown_problem(rng)
        key = repr((sorted(problem["numbers"]), problem["target"]))
        if key not in seen and (zlib.crc32(key.encode()) % 10 == 0) == (split == "test"):
            seen.add(key)
            examples.append(_countdown_example(**problem))
    return examples


def _countdown_hub(split: str, n: int | None, seed: int, data_path: str | None) -> list[dict]:
    """Jiayi-Pan/Countdown-Tasks-3to4 (fields nums, target; a train split only): its last
    COUNTDOWN_TEST_ROWS rows (a tenth of a small local file) are the fixed held-out test split."""
    rows = _rows("Jiayi-Pan/Countdown-Tasks-3to4", None, "train", data_path)
    held_out = max(1, min(COUNTDOWN_TEST_ROWS, len(rows) // 10))
    cut = len(rows) - held_out
    split_rows = range(cut, len(rows)) if split == "test" else range(cut)
    return [
        _countdown_example(_field(rows[i], "nums", i), _field(rows[i], "target", i))
        for i in _sample(split_rows, n, seed)
    ]


def _countdown_correct(completion: str, example: dict) -> float:
    return countdown_reward(completion, example["numbers"], example["target"])


_MBPP = "google-research-datasets/mbpp"


TASKS: dict[str, Task] = {
    # the tiny model's task: the prompt is only the question ("47+38"): its vocabulary is ~30 chars
    "addition": Task(_addition, "{question}", addition_reward),
    # the R1-Zero miniature (assets/tiny-parity): the prompt is the padded bits ("0110________")
    "parity": Task(_parity, "{question}", parity_reward),
    "countdown-procedural": Task(_countdown_procedural, COUNTDOWN_INSTRUCTION, _countdown_correct),
    "gsm8k": Task(
        _hub_loader({s: ("openai/gsm8k", "main", s) for s in ("train", "test")}, _gsm8k_example),
        MATH_INSTRUCTION,
        lambda completion, ex: gsm8k_reward(completion, ex["answer"]),
    ),
    "math": Task(
        _hub_loader(
            {
                # MATH's 7,500 training problems (the mirror of the old lighteval/MATH verl uses)
                "train": ("DigitalLearningGmbH/MATH-lighteval", None, "train"),
                "test": ("HuggingFaceH4/MATH-500", None, "test"),  # from MATH's test set: disjoint
            },
            _math_example,
        ),
        MATH_INSTRUCTION,
        lambda completion, ex: math_reward(completion, ex["answer"]),
    ),
    "countdown": Task(_countdown_hub, COUNTDOWN_INSTRUCTION, _countdown_correct),
    "mbpp": Task(
        _hub_loader({s: (_MBPP, "full", s) for s in ("train", "test")}, _mbpp_example),
        CODE_INSTRUCTION,
        lambda completion, ex: code_reward(completion, ex["tests"]),
    ),
}


def _task(name: str) -> Task:
    if name not in TASKS:
        raise TaskError(f"unknown task {name!r}: use one of {', '.join(TASKS)}")
    return TASKS[name]


def load_task(
    name: str,
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    data_path: str | None = None,
) -> list[dict]:
    """The examples of a task's split: all of them in order (n None; countdown-procedural: 1000),
    or n drawn with `seed`. Hub tasks come from the Hugging Face hub, or from `data_path`, a local
    .jsonl/.json/.parquet file in the hub dataset's schema. Errors are one-line TaskErrors.

    >>> load_task("addition", "test", n=2, seed=0)[0]["question"]
    '35+81'
    >>> len(load_task("countdown-procedural", "test", n=3))
    3
    """
    task = _task(name)
    if split not in ("train", "test"):
        raise TaskError(f"task {name!r} has no split {split!r}: use 'train' or 'test'")
    try:
        return task.load(split, n, seed, data_path)
    except TaskError as e:
        raise TaskError(f"task {name!r}: {e}") from e.__cause__


def build_prompt(name: str, example: dict, tokenizer=None) -> str:
    """The prompt text for one example: the task's user turn through the tokenizer's chat template
    (ending with the opening of the assistant's turn), or BASE_TEMPLATE when there is none.

    >>> build_prompt("gsm8k", {"question": "What is 6 times 7?"}).endswith("Assistant: <think>")
    True
    """
    content = _task(name).instruction.format(question=example["question"])
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": content}]
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return BASE_TEMPLATE.format(content=content)


def task_reward(
    name: str, completion: str, example: dict, format_weight: float = 0.1
) -> tuple[float, dict]:
    """total = correct [R-BIN] + format_weight * format [R-FORMAT], and the parts, for the log.

    >>> completion = "<think>7+8=15,4+3+1=8</think><answer>85</answer>"
    >>> task_reward("addition", completion, {"answer": "85"})
    (1.1, {'correct': 1.0, 'format': 1.0})
    """
    correct, form = _task(name).correct(completion, example), format_reward(completion)
    return correct + format_weight * form, {"correct": correct, "format": form}


# ==================================================================================================
# THE MACHINERY (read when you need it): the time limits that keep a verifier from hanging, the
# helper process that runs a symbolic comparison for another thread, the code sandbox, and the
# adapters for TRL and verl.
# ==================================================================================================


def _verify_latex(pred: str, gold: str) -> bool:
    """Hugging Face math-verify's symbolic comparison, with its own (signal-based) timeouts off."""
    from math_verify import parse, verify  # imported on first use: ~0.3 s

    # silence its "timeout disabled" warnings: we time it
    logging.getLogger("math_verify").setLevel(logging.ERROR)

    def delimited(s: str) -> str:  # math-verify finds LaTeX only between delimiters
        s = s.replace("\\$", "")
        return s if "$" in s or "\\boxed" in s else f"${s}$"

    gold_expr = parse(delimited(gold), parsing_timeout=None)
    pred_expr = parse(delimited(pred), parsing_timeout=None)
    return bool(gold_expr and pred_expr and verify(gold_expr, pred_expr, timeout_seconds=None))


class _TimeUp(BaseException):
    """Raised by our SIGALRM tick when time is up: a BaseException, so math-verify's
    `except Exception` lets it pass."""


_WARM_UP = ("x^2+2x+1", "(x+1)^2")  # needs the parser and sympy's polynomial code
_warmed_up: list[bool] = []  # [True] once this process has compared _WARM_UP


def _warm_up() -> None:
    """Import math-verify and compare _WARM_UP once per process, untimed. The first symbolic
    comparison of a process builds sympy's and the LaTeX parser's machinery: up to 0.4 s more CPU
    than the same comparison later (0.14 s at most for any of the tests' equivalences after this).
    Timing it would make a verdict depend on which answer came first."""
    if not _warmed_up:
        _verify_latex(*_WARM_UP)
        _warmed_up.append(True)


def _verify_in_time(pred: str, gold: str) -> bool:
    """_verify_latex, but False once it has spent MATH_TIMEOUT_S of its thread's CPU time, or
    after MATH_WALL_S of wall-clock time (a backstop for a machine too busy to give it the CPU).

    CPU time, not wall-clock: it is what the comparison costs, the same on a quiet machine and on
    one whose cores other processes keep busy (a wall-clock limit turns right answers into
    reward 0 at random there). Signals can interrupt sympy only in the main thread: there a
    SIGALRM tick checks both clocks, first after MATH_TIMEOUT_S (a thread cannot spend CPU time
    faster than wall-clock time passes), then every 50 ms until the comparison ends (a tick that
    raises inside a finalizer is swallowed, so the next one raises again); the caller's SIGALRM
    handler and pending timer are restored afterwards. Any other thread sends the comparison to a
    helper process, which applies this same rule in its own main thread (_judge_equal).
    """
    if threading.current_thread() is not threading.main_thread():
        return _judge_equal(pred, gold)
    _warm_up()  # before the clocks start: the process's one-time set-up is not this comparison's
    # no garbage collection while timed: a collection of a trainer's whole heap (vLLM, torch)
    # costs up to a second of this thread's CPU and is not this comparison's cost either
    gc_was_on = gc.isenabled()
    gc.disable()
    armed = [True]
    start, cpu_start = time.monotonic(), time.thread_time()

    def on_tick(signum, frame):
        if armed[0] and (
            time.thread_time() - cpu_start > MATH_TIMEOUT_S
            or time.monotonic() - start > MATH_WALL_S
        ):
            raise _TimeUp

    old_handler = signal.signal(signal.SIGALRM, on_tick)
    old_handler = signal.SIG_DFL if old_handler is None else old_handler
    # then every 50 ms: a tick that raises inside a finalizer (gc) is swallowed there
    old_delay, _ = signal.setitimer(signal.ITIMER_REAL, min(MATH_TIMEOUT_S, MATH_WALL_S), 0.05)
    try:
        try:
            return _verify_latex(pred, gold)
        finally:
            armed[0] = False  # from here on a late alarm does nothing
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old_handler)
            if old_delay:
                remaining = old_delay - (time.monotonic() - start)
                signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-3))
    except _TimeUp:
        signal.signal(signal.SIGALRM, old_handler)  # in case the alarm struck inside the clean-up
        return False
    finally:
        if gc_was_on:
            gc.enable()


def _python_running(function: str, *flags: str) -> list[str]:
    """The command line of a fresh Python that imports this file and calls `function()`."""
    here, module = os.path.dirname(os.path.abspath(__file__)), Path(__file__).stem
    code = f"import sys; sys.path.insert(0, {here!r}); import {module}; {module}.{function}()"
    return [sys.executable, *flags, "-c", code]


_judges: dict[int, subprocess.Popen] = {}  # a helper per process id (a forked child needs its own)
_judge_lock = threading.Lock()


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """The next line `proc` prints within `timeout` seconds of wall-clock time, or None."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    return proc.stdout.readline().strip() if ready else None


def _judge_equal(pred: str, gold: str) -> bool:
    """_verify_in_time in a long-lived helper process (in its main thread: the same CPU budget and
    backstop), which answers 0 by itself when time is up. Killed (and later replaced) only if it
    has not answered 0.5 s past its own backstop: stuck where no signal gets in (a long C call)."""
    with _judge_lock:  # one comparison at a time through the helper
        judge = _judges.get(os.getpid())
        if judge is None or judge.poll() is not None:
            pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
            judge = subprocess.Popen(_python_running("_judge_loop"), text=True, bufsize=1, **pipes)
            _judges[os.getpid()] = judge
            _read_line(judge, 60)  # "ready": its start (import, warm-up: ~1.5 s) is not timed
        try:
            judge.stdin.write(json.dumps([pred, gold]) + "\n")
            judge.stdin.flush()
            answer = _read_line(judge, MATH_WALL_S + 0.5)
        except (OSError, ValueError):
            answer = None
        if answer is None:  # late or dead: kill it; the next call starts a fresh one
            judge.kill()
            judge.wait()
            del _judges[os.getpid()]
        return answer == "1"


def _judge_loop() -> None:
    """The helper process behind _judge_equal: reads [pred, gold] lines, answers 1 or 0, each
    comparison timed by _verify_in_time (this is the helper's main thread, where signals work)."""
    _warm_up()  # before saying ready: the helper's start is not timed
    print("ready", flush=True)
    for line in sys.stdin:
        try:
            ok = _verify_in_time(*json.loads(line))
        except Exception:
            ok = False
        print(1 if ok else 0, flush=True)


# Code: run the program and its tests in a separate, limited Python process.


# importable even after the drop to 'nobody'
_SANDBOX_MODULES = tuple(
    """math cmath re string collections itertools functools heapq bisect operator copy
    array fractions decimal statistics random datetime _strptime typing dataclasses json""".split()
)


# set to None in os / posix / _posixsubprocess before the program runs
_SANDBOX_BLOCKED_CALLS = tuple(
    """fork forkpty system popen fork_exec posix_spawn posix_spawnp execv execve execl execle execlp
    execlpe execvp execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe kill
    killpg setsid setpgid setpgrp setuid setreuid setresuid putenv unsetenv remove unlink rmdir
    removedirs rename renames replace chmod chown lchown link symlink truncate chdir fchdir chroot
    mkfifo mknod""".split()
)


# `import` fails
_SANDBOX_BLOCKED_MODULES = ("subprocess", "multiprocessing", "ctypes", "_ctypes", "pty")


def _sandbox_child() -> None:
    """Runs inside the sandbox process of code_reward: limits first, then the program, then the
    tests one by one, writing 1 (passed) or 0 per test to the results file as it goes."""
    import _io
    import _posixsubprocess
    import builtins
    import io
    import posix
    import resource

    job = json.loads(sys.stdin.read())
    limits = {"CPU": job["cpu_s"], "AS": job["memory"], "FSIZE": 16 << 20, "CORE": 0}
    for kind, value in limits.items():  # CPU seconds, address space, file size, core dumps
        resource.setrlimit(getattr(resource, f"RLIMIT_{kind}"), (value, value))
    results = os.fdopen(os.dup(1), "w", buffering=1)  # our line back to the parent
    quiet = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(quiet, fd)  # the program's input() and print() go nowhere
    for name in _SANDBOX_MODULES:
        __import__(name)
    sys.dont_write_bytecode = True
    if os.geteuid() == 0:  # root ignores RLIMIT_NPROC and may read every process's environment
        try:  # become uid/gid 65534 ('nobody'), keeping this directory writable
            os.chown(".", 65534, 65534)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
        except OSError:  # no CAP_SETUID (some containers): stay root, with the guard below only
            pass
    resource.setrlimit(resource.RLIMIT_NPROC, (1, 1))  # no new process or thread, unless root
    workdir = os.path.realpath(os.getcwd())
    real_open, real_os_open, real_file_io = builtins.open, os.open, _io.FileIO

    def check(path) -> None:  # only paths inside the working directory (no file descriptors either)
        if not (
            isinstance(path, (str, bytes, os.PathLike))
            and os.path.realpath(os.fsdecode(path)).startswith(workdir + os.sep)
        ):
            raise PermissionError(f"sandbox: {path!r} is outside {workdir}")

    def guarded_open(file, *args, **kwargs):
        check(file)
        return real_open(file, *args, **kwargs)

    def guarded_os_open(path, *args, **kwargs):
        check(path)
        return real_os_open(path, *args, **kwargs)

    class GuardedFileIO(real_file_io):
        def __init__(self, file, *args, **kwargs):
            check(file)
            super().__init__(file, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open = posix.open = guarded_os_open
    for module in (os, posix, _posixsubprocess):
        for name in _SANDBOX_BLOCKED_CALLS:
            if hasattr(module, name):
                setattr(module, name, None)
    for name in _SANDBOX_BLOCKED_MODULES:
        sys.modules[name] = None
    # our own references: the program may patch builtins
    run, compile_, failure = exec, compile, BaseException
    namespace = {"__name__": "solution"}
    try:
        run(compile_(job["code"], "solution.py", "exec"), namespace)
        loaded = True
    except failure:
        loaded = False
    for test in job["tests"]:
        passed = False
        if loaded:
            try:
                run(compile_(test, "test.py", "exec"), namespace)
                passed = True
            except failure:
                pass
        results.write("1\n" if passed else "0\n")


# Adapters: the same rewards in the forms that TRL and verl expect.


def trl_reward_func(task_name: str, format_weight: float = 0.1) -> Callable[..., list[float]]:
    """A reward function for TRL's GRPOTrainer(reward_funcs=...). TRL calls it with the prompts, the
    completions (strings, or lists of {'role', 'content'} messages) and every other dataset column
    as a keyword list (e.g. answer=[...], numbers=[...]), plus trainer_state, log_metric, ....
    The dataset needs the columns of load_task's examples; the parts are logged via log_metric.

    >>> reward = trl_reward_func("gsm8k")
    >>> message = {"role": "assistant", "content": "<answer>72</answer>"}
    >>> reward(prompts=["q"], completions=[[message]], answer=["72"])
    [1.0]
    """
    _task(task_name)

    def reward(prompts, completions, **columns) -> list[float]:
        texts = [
            c if isinstance(c, str) else "".join(str(m.get("content") or "") for m in c)
            for c in completions
        ]
        totals, parts = [], {"correct": [], "format": []}
        lists = {k: v for k, v in columns.items() if isinstance(v, list) and len(v) == len(texts)}
        for i, text in enumerate(texts):
            example = {k: v[i] for k, v in lists.items()}
            total, components = task_reward(task_name, text, example, format_weight)
            totals.append(total)
            for k, v in components.items():
                parts[k].append(v)
        if callable(columns.get("log_metric")) and texts:
            for k, values in parts.items():
                columns["log_metric"](f"{task_name}/{k}", sum(values) / len(values))
        return totals

    reward.__name__ = f"{task_name.replace('-', '_')}_reward"  # TRL logs rewards under this name
    return reward


def compute_score(
    data_source: str, solution_str: str, ground_truth, extra_info=None, **kwargs
) -> float:
    """verl's custom reward function (custom_reward_function.path=rewards.py, name=compute_score):
    the same total as task_reward, chosen by data_source: '...gsm8k' and '...MATH...' (ground_truth
    the answer), '...countdown...' (ground_truth {'target', 'numbers'}), '...mbpp...' (ground_truth
    the list of asserts, or its JSON), 'addition' (ground_truth the sum).

    >>> completion = "<think>..</think><answer>(44 - 19) * 4</answer>"
    >>> compute_score("Jiayi-Pan/Countdown-Tasks-3to4", completion,
    ...               {"target": 100, "numbers": [19, 44, 4]})
    1.1
    """
    source = data_source.lower()
    if "gsm8k" in source:
        return task_reward("gsm8k", solution_str, {"answer": str(ground_truth)})[0]
    if "countdown" in source:
        example = {"numbers": list(ground_truth["numbers"]), "target": ground_truth["target"]}
        return task_reward("countdown", solution_str, example)[0]
    if "math" in source:
        return task_reward("math", solution_str, {"answer": str(ground_truth)})[0]
    if "mbpp" in source:
        tests = json.loads(ground_truth) if isinstance(ground_truth, str) else list(ground_truth)
        return task_reward("mbpp", solution_str, {"tests": tests})[0]
    if "addition" in source:
        return task_reward("addition", solution_str, {"answer": str(ground_truth)})[0]
    raise TaskError(
        f"no reward for data_source {data_source!r}: "
        "use one containing gsm8k, math, countdown, mbpp or addition"
    )
