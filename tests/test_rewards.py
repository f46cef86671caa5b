"""rewards.py section 2: answer extraction and the verifiers, on real-world and hostile answers."""

import concurrent.futures
import doctest
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import rewards  # noqa: E402
from rewards import (  # noqa: E402
    addition_reward,
    addition_steps,
    addition_trace,
    arithmetic_steps,
    countdown_reward,
    extract_answer,
    format_reward,
    gsm8k_reward,
    length_rewards,
    math_equal,
    math_reward,
    overlong_penalty,
    parity_completion,
    parity_example,
    parity_reward,
    parity_steps,
    reasoning_mode,
    task_steps,
)

HANG_S = rewards.MATH_WALL_S + 1.0  # no verifier call may take longer, however busy the machine


def within(limit, call):
    """call()'s result, checking that it spent less than `limit` seconds of this thread's CPU time
    and ended within HANG_S of wall-clock time. CPU time, not wall-clock: what a verifier costs
    is the same on a quiet machine and on a loaded one, where any process stalls now and then. A
    verifier stuck in a loop spends CPU time and fails the first bound; one stuck waiting (or a
    helper process that is never killed) fails the second, which math_equal's backstop,
    MATH_WALL_S, keeps far from on any machine. Timed twice at most: a full garbage collection
    of a big process (0.2 s of CPU time once vLLM is imported), or a long stall, can land inside
    any one call; a real hang is slow both times."""
    for _ in range(2):
        cpu, start = time.thread_time(), time.monotonic()
        result = call()
        cpu, wall = time.thread_time() - cpu, time.monotonic() - start
        if cpu < limit and wall < HANG_S:
            return result
    raise AssertionError(
        f"twice over {limit} s of CPU time or {HANG_S} s in all: last time "
        f"{cpu:.2f} s of CPU time, {wall:.2f} s in all"
    )


@pytest.fixture(autouse=True, scope="module")
def warm_math_verify():
    """The process's one-time set-up of math-verify (import, first comparison; ~1 s) happens
    outside any verdict's time limit (rewards._warm_up), so outside these tests' bounds too."""
    rewards._warm_up()


def test_doctests_pass():
    assert doctest.testmod(rewards).failed == 0


# ---- extract_answer ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>7+8=15,4+3+1=8</think><answer>85</answer>", "85"),
        ("<answer>1</answer> wait, no: <answer> 2 </answer>", "2"),  # the last answer block
        ("<answer>1</answer> then <answer>2", "1"),  # an unclosed block does not count
        (r"The answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}"),
        # nested braces
        (r"\boxed{1} and finally \boxed{\sqrt{\frac{3}{4}}}", r"\sqrt{\frac{3}{4}}"),
        (r"\boxed {42}", "42"),
        (r"\boxed{7} ... \boxed{unfinished", "7"),
        ("<answer>x</answer> and \\boxed{y}", "x"),  # the answer tag wins over \boxed
        (
            "Natalia sold 48/2 = 24 clips in May.\n"
            "Natalia sold 48+24 = 72 clips altogether.\n#### 72",
            "72",
        ),
        ("#### 1,234\nfollowed by more text", "1,234"),
        ("The answer is 42.", None),
        ("", None),
        ("<answer>", None),
        (None, None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ---- math_equal: equivalences and non-equivalences ----------------------------------------------
# fmt: off
EQUAL = [
    ("1,234", "1234"), ("1234", "1,234"), ("$1,234.00", "1234"), ("\\$1,234", "1234"),
    ("1,234,567", "1234567"), ("5", "$5$"), ("$5", "5"), ("18 dollars", "18"), ("18", "18 dollars"),
    ("5 cm", "5"), ("42.", "42"), ("-3", "-3"), ("\u22123", "-3"), ("-0.5", "-\\frac{1}{2}"),
    ("0.50", "0.5"), (".5", "0.5"), ("50", "50\\%"), ("0.5", "50\\%"), ("50%", "50\\%"),
    ("50\\%", "0.5"), ("0.5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), (r"\frac12", r"\frac{1}{2}"), ("\\boxed{3}", "3"),
    ("30^\\circ", "30"), ("\\text{(C)}", "(C)"), ("\\text{Monday}", "Monday"),
    ("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}"), ("2\\sqrt{2}", "\\sqrt{8}"), ("2^{10}", "1024"),
    ("[1,2)", "[1, 2)"), ("(-\\infty, 3]", "(-\\infty,3]"), ("x^2+2x+1", "(x+1)^2"),
    ("\\pi", "\\pi"), ("3, 5", "5, 3"),
    ("(x+1)^2", "x^2 + 2x + 1"),  # issue 12: False on a busy machine (0.75 s of wall-clock)
]
NOT_EQUAL = [
    ("2", "3"), ("\\sqrt{2}", "1.414"), ("[1,2)", "[1,2]"), ("(1,2)", "[1,2]"),
    ("0.33", "\\frac{1}{3}"), ("1234", "123"), ("-5", "5"), ("5", "50\\%"), ("5x", "5"),
    ("x+1", "x-1"), ("\\frac{1}{2}", "2"), ("", "0"), (None, "1"), ("1", None),
    ("Monday", "Tuesday"), ("3", "\\text{(C)}"),
    ("0.3333333", "\\frac{1}{3}"),  # plain numbers compare exactly
    ("1" * 600, "1" * 600),  # over MAX_ANSWER_CHARS: wrong, however equal
]
# fmt: on


@pytest.mark.parametrize("pred, gold", EQUAL)
def test_math_equal_true(pred, gold):
    assert math_equal(pred, gold) is True


@pytest.mark.parametrize("pred, gold", NOT_EQUAL)
def test_math_equal_false(pred, gold):
    assert math_equal(pred, gold) is False


# ---- gsm8k_reward / math_reward -----------------------------------------------------------------
GSM8K_GOLD = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
)


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("<think>48/2=24; 48+24=72</think><answer>72</answer>", GSM8K_GOLD, 1.0),
        ("<think>...</think><answer>72</answer>", "72", 1.0),
        ("<think>...</think><answer>72 clips</answer>", "72", 1.0),
        ("<think>...</think><answer>$72.00</answer>", "72", 1.0),
        ("<think>...</think><answer>\\$1,234.00</answer>", "#### 1234", 1.0),
        ("<think>...</think><answer>-8</answer>", "#### -8", 1.0),
        ("<think>...</think><answer>\\boxed{72}</answer>", "72", 1.0),
        ("Adding up, \\boxed{72}", "72", 1.0),
        ("so the total is\n#### 72", GSM8K_GOLD, 1.0),
        ("<think>...</think><answer>71</answer>", GSM8K_GOLD, 0.0),
        ("<think>...</think><answer>8</answer>", "#### -8", 0.0),
        ("The answer is 72", GSM8K_GOLD, 0.0),  # no answer tag, box or ####: nothing to grade
        ("", "72", 0.0),
    ],
)
def test_gsm8k_reward(completion, answer, expected):
    assert gsm8k_reward(completion, answer) == expected


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("<think>..</think><answer>\\frac{1}{2}</answer>", "\\frac{1}{2}", 1.0),
        ("<think>..</think><answer>0.5</answer>", "\\frac{1}{2}", 1.0),
        ("<think>..</think><answer>\\boxed{2\\sqrt{2}}</answer>", "\\sqrt{8}", 1.0),
        ("So $\\boxed{\\left[ 1, 2 \\right)}$", "[1,2)", 1.0),
        ("<think>..</think><answer>[1,2]</answer>", "[1,2)", 0.0),
        ("<think>..</think><answer>1.414</answer>", "\\sqrt{2}", 0.0),
        ("<think>..</think><answer>\\text{(B)}</answer>", "\\text{(C)}", 0.0),
    ],
)
def test_math_reward(completion, answer, expected):
    assert math_reward(completion, answer) == expected


# ---- countdown_reward ---------------------------------------------------------------------------
NUMS, TARGET = [44, 19, 35], 98


@pytest.mark.parametrize(
    "answer, numbers, target, expected",
    [
        ("44 + 19 + 35", NUMS, TARGET, 1.0),
        ("(44 + 19) + 35", NUMS, TARGET, 1.0),
        ("35 + 44 + 19 = 98", NUMS, TARGET, 1.0),  # 'expr = target' is accepted
        ("35 + 44 + 19 = 97", NUMS, TARGET, 0.0),  # ... but the claim must be the target
        ("35 + 44 + 19 = 98 = 98", NUMS, TARGET, 0.0),
        ("44 + 44 + 10", [44, 10, 3], 98, 0.0),  # 44 used twice
        ("44 + 19", NUMS, 63, 0.0),  # 35 not used
        ("44 + 19 + 35 + 1", NUMS, 99, 0.0),  # a number that was not given
        ("6 / 4 * 2", [6, 4, 2], 3, 1.0),  # non-integer intermediate, exact via Fraction
        ("1 / 3 * 3", [1, 3, 3], 1, 1.0),  # a float would give 0.9999999999999999 or 1.0 by luck
        ("(4 - 4) / 5 + 7", [4, 4, 5, 7], 7, 1.0),
        ("7 / (4 - 4) + 5", [4, 4, 5, 7], 7, 0.0),  # division by zero
        ("-44 + 19 + 35", NUMS, 10, 0.0),  # unary minus is not an allowed operation
        ("2 ** 3", [2, 3], 8, 0.0),
        ("9**9**9**9", [9, 9, 9, 9], 9, 0.0),
        ("7 // 2", [7, 2], 3, 0.0),
        ("44.0 + 19 + 35", NUMS, TARGET, 0.0),
        ("\uff14\uff14 + 19 + 35", NUMS, TARGET, 0.0),  # fullwidth digits
        ("\u0664\u0664 + 19 + 35", NUMS, TARGET, 0.0),  # Arabic-Indic digits
        ("__import__('os').system('true')", NUMS, TARGET, 0.0),
        ("(lambda: 98)()", NUMS, TARGET, 0.0),
        ("x + 19 + 35", NUMS, TARGET, 0.0),
        ("abs(44) + 19 + 35", NUMS, TARGET, 0.0),
        ("(44).real + 19 + 35", NUMS, TARGET, 0.0),
        ("044 + 19 + 35", NUMS, TARGET, 0.0),
        ("", NUMS, TARGET, 0.0),
    ],
)
def test_countdown_reward(answer, numbers, target, expected):
    completion = f"<think>...</think><answer>{answer}</answer>"
    assert countdown_reward(completion, numbers, target) == expected


def test_countdown_needs_the_answer_tag_and_the_last_one():
    assert countdown_reward("44 + 19 + 35", NUMS, TARGET) == 0.0
    two = "<answer>44 + 19</answer><answer>44 + 19 + 35</answer>"
    assert countdown_reward(two, NUMS, TARGET) == 1.0


@pytest.mark.parametrize(
    "answer",
    [
        "1+" * 50_000 + "1",  # 100 kB
        "(" * 100_000,
        "(" * 99 + "1" + ")" * 99,
        "9" * 100_000,
        "1/(1-1)" * 1000,
    ],
)
def test_countdown_hostile_answers_are_fast_zeros(answer):
    assert within(0.5, lambda: countdown_reward(f"<answer>{answer}</answer>", [1, 1, 1], 3)) == 0.0


# ---- format_reward [R-FORMAT] -------------------------------------------------------------------
@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>7+8=15</think><answer>15</answer>", 1.0),
        ("<think>\nlong\nreasoning\n</think>\n<answer>\n15\n</answer>\n\n", 1.0),
        ("7+8=15</think><answer>15</answer>", 1.0),  # the opening <think> was in the prompt
        ("<think></think><answer></answer>", 1.0),
        ("  <think>a</think> <answer>b</answer>", 1.0),
        ("<answer>15</answer>", 0.0),  # no think block
        ("<think>7+8=15</think>", 0.0),  # no answer block
        ("<answer>15</answer><think>7+8=15</think>", 0.0),  # answer before think
        ("<think>a</think><answer>1</answer><answer>2</answer>", 0.0),  # two answer blocks
        ("<think>a</think><answer>1</answer> I hope this helps!", 0.0),  # text after the answer
        ("<think>a</think>So:<answer>1</answer>", 0.0),  # text between the blocks
        ("Hello <think>a</think><answer>1</answer>", 0.0),  # text before <think>
        ("<think>a<think>b</think><answer>1</answer>", 0.0),  # nested think
        ("<think>a</think><think>b</think><answer>1</answer>", 0.0),
        ("<think>a</think><answer>1<answer>2</answer>", 0.0),
        ("<think>a</answer><answer>1</answer>", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert format_reward(completion) == expected


def test_format_reward_is_fast_on_long_and_hostile_text():
    for text in (
        "<think>" + "a" * 100_000 + "</think><answer>1</answer>",
        "<think>" * 20_000,
        "</think><answer>" * 10_000,
        "<think>a</think><answer>" + "<" * 100_000,
    ):
        assert within(0.5, lambda: format_reward(text)) in (0.0, 1.0)


# ---- length_rewards [R-LEN] / overlong_penalty / addition_reward ---------------------------------
def test_length_rewards_hand_computed():
    # lengths 100..300: lambda = 0.5 - (len - 100) / 200 = [0.5, 0.25, -0.25, -0.5]
    lengths, correct = [100, 150, 250, 300], [True, False, True, False]
    assert length_rewards(lengths, correct) == [0.5, 0.0, -0.25, -0.5]
    assert length_rewards(lengths, [True] * 4) == [0.5, 0.25, -0.25, -0.5]
    assert length_rewards(lengths, [False] * 4) == [0.0, 0.0, -0.25, -0.5]  # wrong: never a bonus
    assert length_rewards([7, 7, 7], [True, False, True]) == [0.0, 0.0, 0.0]
    assert length_rewards([5], [True]) == [0.0]


def test_overlong_penalty():
    penalties = [overlong_penalty(n, 1000, 200) for n in (0, 800, 850, 900, 1000, 1001, 5000)]
    assert penalties == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]
    assert overlong_penalty(100, 100, 0) == 0.0 and overlong_penalty(101, 100, 0) == -1.0


def test_addition_reward():
    example = {"question": "47+38", "answer": "85"}
    assert addition_reward(addition_trace(47, 38), example) == 1.0
    assert addition_reward(addition_trace(47, 38, carry_written=0), example) == 0.0
    assert addition_reward("<answer>085</answer>", example) == 0.0  # exactly the integer string
    assert addition_reward("<answer>85.0</answer>", example) == 0.0
    assert addition_reward("85", example) == 0.0


# ---- never raise, never hang: main thread, other threads, hostile input --------------------------
# fmt: off
HOSTILE = [
    "(" * 10_000, "(" * 5000 + "1" + ")" * 5000, "\\frac{" * 2000, "\\frac{" * 80,
    "{" * 10_000 + "}" * 10_000, "9^{9^{9^{9}}}", "10^{10^{10}}", "2^{2^{40}}", "100000000!",
    "\\sqrt{2}^{10^{9}}", "9**9**9**9", "1" * 4400, "1e99999999", "\\boxed{" * 5000,
    "<answer>" * 10_000, "\\begin{pmatrix}" * 60, "$" * 10_000, "\x00\udcff\u202e", "\\" * 10_000,
    "#### " * 10_000,
]
# fmt: on


def _verifier_calls(text):
    """Every verifier with `text` as the completion or as the reference answer."""
    return [
        lambda: extract_answer(text),
        lambda: math_equal(text, "3"),
        lambda: math_equal("3", text),
        lambda: math_equal(text[:400], "2") if len(text) > 400 else None,
        lambda: gsm8k_reward(text, "72"),
        lambda: gsm8k_reward("<answer>3</answer>", text),
        lambda: math_reward(f"<answer>{text}</answer>", "1/2"),
        lambda: countdown_reward(f"<answer>{text}</answer>", [1, 2, 3], 6),
        lambda: format_reward(text),
        lambda: addition_reward(text, {"answer": "85"}),
        # step verifiers (process supervision): the same guarantees
        lambda: addition_steps(text, {"a": 47, "b": 38, "answer": "85"}),
        lambda: arithmetic_steps(text),
        lambda: task_steps("gsm8k", text, {"answer": "72"}),
        lambda: parity_reward(text, parity_example("0110")),
        lambda: reasoning_mode(text),
        lambda: parity_steps(text, parity_example("0110")),
    ]


# A time-limit alarm that strikes inside a finalizer is printed as "Exception ignored" and struck
# again 50 ms later (see test_time_limit_holds_when_the_first_alarm_is_swallowed): expected noise.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("text", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_input_never_raises_and_returns_within_a_second(text):
    for call in _verifier_calls(text):
        result = within(1.0, call)
        assert result is None or isinstance(result, (bool, float, str, list))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_random_text_never_raises_and_is_fast(text):
    for call in _verifier_calls(text):
        within(1.0, call)


LATEX_PIECES = list("0123456789+-*/^()[]{},.=x ") + ["\\frac{", "\\sqrt{", "^{", "\\pi", "!"]
LATEXISH = st.lists(st.sampled_from(LATEX_PIECES), max_size=30).map("".join)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(LATEXISH, LATEXISH)
def test_random_latex_never_raises_and_is_fast(pred, gold):
    assert within(1.0, lambda: math_equal(pred, gold)) in (True, False)


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(1, 99), min_size=3, max_size=4),
    st.integers(-10, 200),
    st.text(alphabet=list("0123456789+-*/() =.%^&|~<>!xe_j\uff11"), max_size=40),
)
def test_random_countdown_answers(numbers, target, answer):
    completion = f"<answer>{answer}</answer>"
    assert within(0.5, lambda: countdown_reward(completion, numbers, target)) in (0.0, 1.0)


def test_math_equal_in_worker_threads():
    """Signals only work in the main thread: other threads use a helper process, which applies the
    same time limits in its own main thread and answers 0 by itself when time is up."""
    cases = [
        ("0.5", "\\frac{1}{2}", True),
        ("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}", True),
        ("\\sqrt{2}", "1.414", False),
        ("[1,2)", "[1,2]", False),
        ("x^2+2x+1", "(x+1)^2", True),
    ]
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        # the helper's first start (importing sympy) is not timed
        pool.submit(math_equal, "x", "x+0").result()
        for pred, gold, expected in cases:
            verdict = within(1.0, lambda: pool.submit(math_equal, pred, gold).result())
            assert verdict is expected, (pred, gold)
        helper = rewards._judges[os.getpid()]
        assert within(1.0, lambda: pool.submit(math_equal, "9^{9^{9^{9}}}", "3").result()) is False
        assert rewards._judges[os.getpid()] is helper and helper.poll() is None  # it said 0 itself
        again = within(1.0, lambda: pool.submit(math_equal, "2\\sqrt{2}", "\\sqrt{8}").result())
        assert again is True
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as many:  # several threads at once
        verdicts = list(many.map(lambda c: math_equal(c[0], c[1]), cases * 2))
        assert verdicts == [c[2] for c in cases] * 2


def test_a_helper_that_does_not_answer_is_killed_and_replaced(monkeypatch):
    """The parent's own backstop: no answer MATH_WALL_S + 0.5 s after the question (here 0.5 s, the
    helper still busy within its own limits), and the helper is killed; the next call starts one."""
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        pool.submit(math_equal, "x", "x+0").result()  # a helper is running
        helper = rewards._judges[os.getpid()]
        monkeypatch.setattr(rewards, "MATH_WALL_S", 0.0)  # in this process only, not in the helper
        start = time.monotonic()
        assert pool.submit(math_equal, "\\sqrt{2}^{10^{9}}", "3").result() is False
        assert time.monotonic() - start < HANG_S and helper.poll() is not None  # killed
        monkeypatch.undo()
        assert pool.submit(math_equal, "2\\sqrt{2}", "\\sqrt{8}").result() is True  # a new helper
        assert rewards._judges[os.getpid()] is not helper


# The verdicts of a busy machine: math_equal in a fresh Python that shares one core with two busy
# processes (it gets about a third of it). The helper process starts before the load (its start
# is not timed anyway): what is measured is the comparisons.
UNDER_LOAD = """if True:
    import json, os, subprocess, sys, threading, time
    root, cases, hostile = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
    sys.path.insert(0, root)
    import rewards
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # inherited by every child below
    rewards.math_equal("x", "x+0")  # sets up math-verify in this process
    thread = threading.Thread(target=rewards.math_equal, args=("x", "x+0"))  # starts the helper
    thread.start(), thread.join()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        cpu, start = time.thread_time(), time.monotonic()
        main = [rewards.math_equal(p, g) for p, g in cases]
        slowdown = (time.monotonic() - start) / (time.thread_time() - cpu)
        worker = []
        thread = threading.Thread(target=lambda: worker.extend(rewards.math_equal(*c)
                                                               for c in cases))
        thread.start(), thread.join()
        hostile_s = []
        for _ in range(2):  # twice: a stall can hit any moment; a late backstop is late both times
            start = time.monotonic()
            rewards.math_equal(*hostile)
            hostile_s.append(time.monotonic() - start)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    print(json.dumps(dict(main=main, worker=worker, slowdown=slowdown, hostile_s=min(hostile_s))))
"""


def verdicts_under_load(root, cases, hostile):
    """Run UNDER_LOAD with the rewards.py in folder `root`: its verdicts in the main thread and in a
    worker thread, how much slower than its CPU time the main thread ran, and the wall-clock
    seconds math_equal took on the `hostile` pair."""
    args = [sys.executable, "-c", UNDER_LOAD, root, json.dumps(cases), json.dumps(hostile)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs Linux's CPU affinity")
def test_verdicts_are_the_same_when_the_cores_are_busy():
    """The verdicts a quiet machine gives (test_math_equal_true/false) in both the main thread and a
    worker thread, with the verifier's core shared by two busy processes; and a hostile input still
    ends at the wall-clock backstop. (The 0.7 s wall-clock limit of before issue 12 failed this in
    3 runs of 3: x^2+2x+1 = (x+1)^2, both ways round, was False in both threads.)"""
    cases, expected = EQUAL + NOT_EQUAL, [True] * len(EQUAL) + [False] * len(NOT_EQUAL)
    got = verdicts_under_load(ROOT, cases, ["\\sqrt{2}^{10^{9}}", "3"])
    assert got["slowdown"] > 1.5, got  # the load was real: the comparisons got a fraction of a core
    wrong = [c for c, a, b in zip(cases, got["main"], expected) if a != b]
    assert not wrong, wrong
    wrong = [c for c, a, b in zip(cases, got["worker"], expected) if a != b]
    assert not wrong, wrong
    assert got["hostile_s"] < rewards.MATH_WALL_S + 0.5, got


def test_the_time_limit_counts_cpu_time_not_waiting(monkeypatch):
    """A comparison that gets no CPU for a while (a busy machine: here it sleeps) keeps its verdict;
    one that spends its CPU budget is stopped at MATH_TIMEOUT_S of CPU time."""
    monkeypatch.setattr(rewards, "MATH_TIMEOUT_S", 0.2)  # quicker to test; the rule is the same
    monkeypatch.setattr(rewards, "MATH_WALL_S", 60.0)  # the CPU rule alone, even on a busy machine

    def slow_but_cheap(pred, gold):
        time.sleep(3 * rewards.MATH_TIMEOUT_S)  # over the budget in wall-clock time only
        return True

    def endless(pred, gold):
        while True:
            pass

    monkeypatch.setattr(rewards, "_verify_latex", slow_but_cheap)
    assert math_equal("x+1", "1+x+0") is True
    monkeypatch.setattr(rewards, "_verify_latex", endless)
    cpu = time.thread_time()
    assert math_equal("x+1", "y") is False
    assert rewards.MATH_TIMEOUT_S <= time.thread_time() - cpu < rewards.MATH_TIMEOUT_S + 0.2


def test_the_wall_clock_backstop_ends_a_comparison_that_gets_no_cpu(monkeypatch):
    """However little CPU a comparison gets (here none: it waits), it ends after MATH_WALL_S."""
    monkeypatch.setattr(rewards, "MATH_WALL_S", 0.3)  # quicker to test; the rule is the same
    monkeypatch.setattr(rewards, "_verify_latex", lambda pred, gold: time.sleep(30) or True)
    start = time.monotonic()
    assert math_equal("x+1", "1+x+0") is False
    assert 0.3 <= time.monotonic() - start < HANG_S


def test_main_thread_timer_restores_the_callers_alarm():
    """A caller's SIGALRM handler and pending timer (e.g. pytest-timeout's) survive math_equal."""
    fired = []

    def handler(*_):
        fired.append(1)

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 10.0)  # longer than two backstops: it cannot fire
        start = time.monotonic()
        assert math_equal("9^{9^{9^{9}}}", "3") is False  # our own timer fires inside
        assert math_equal("\\frac{\\sqrt{8}}{2}", "\\sqrt{2}") is True
        remaining, _ = signal.getitimer(signal.ITIMER_REAL)
        # it ran on meanwhile, as if math_equal had not touched it
        assert abs(remaining - (10.0 - (time.monotonic() - start))) < 0.1, remaining
        assert signal.getsignal(signal.SIGALRM) is handler and not fired
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_no_alarm_left_behind():
    handler, (delay, _) = signal.getsignal(signal.SIGALRM), signal.getitimer(signal.ITIMER_REAL)
    assert math_equal("10^{10^{10}}", "1") is False
    after, _ = signal.getitimer(signal.ITIMER_REAL)
    # none, or the caller's own (pytest-timeout's)
    assert (after == 0.0) if delay == 0.0 else (0.0 < after < delay)
    assert signal.getsignal(signal.SIGALRM) is handler


# ---- step verifiers (process supervision) --------------------------------------------------------
def test_addition_steps_score_each_column():
    ex = {"question": "47+38", "answer": "85", "a": 47, "b": 38}
    right, sloppy = addition_trace(47, 38), addition_trace(47, 38, carry_written=0)
    assert [r for _, r in addition_steps(right, ex)] == [1.0, 1.0, 1.0]
    assert [r for _, r in addition_steps(sloppy, ex)] == [1.0, 0.0, 0.0]
    ends = [e for e, _ in addition_steps(right, ex)]
    assert right[: ends[0]].endswith("7+8=15") and right[: ends[1]].endswith("4+3+1=8")
    assert ends[2] == len(right)
    # a lucky answer, a wrong first step
    wrong_units = "<think>7+8=14,4+3+1=8</think><answer>85</answer>"
    assert [r for _, r in addition_steps(wrong_units, ex)] == [0.0, 1.0, 1.0]
    # no trace: one step
    assert addition_steps("<answer>85</answer>", ex) == [(len("<answer>85</answer>"), 1.0)]


def test_arithmetic_steps_free_text():
    text = (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May. Altogether 48+24 = <<48+24=72>>72. "
        "So 2 x 3 = 7."
    )
    assert [r for _, r in arithmetic_steps(text)] == [1.0, 1.0, 0.0]
    mixed = arithmetic_steps("1,200 - 200 = 1,000 and 7 ÷ 2 = 3.5 and 5/0 = 1")
    assert [r for _, r in mixed] == [1.0, 1.0, 0.0]
    assert arithmetic_steps("no arithmetic here") == []
    steps = task_steps("gsm8k", "3*4=12 <answer>12</answer>", {"answer": "12"})
    assert [r for _, r in steps] == [1.0, 1.0]  # the final answer is the last step


def test_time_limit_holds_when_the_first_alarm_is_swallowed():
    """Pitfall: a signal-based time limit raises in whatever Python code runs when it strikes; in a
    finalizer (__del__, weakref callbacks during gc) the exception is printed and dropped. A
    one-shot timer then never fires again and the comparison runs on forever; ours repeats until
    it lands."""
    code = """if True:
        import sys, time; sys.path.insert(0, '.')
        import rewards
        rewards._warm_up()
        def stuck(pred, gold):
            class Finalizer:
                def __del__(self):  # busy while time runs out (MATH_TIMEOUT_S of CPU time)
                    t = time.thread_time()
                    while time.thread_time() - t < rewards.MATH_TIMEOUT_S + 0.3:
                        pass
            Finalizer()
            while True:  # a comparison that never ends
                pass
        rewards._verify_latex = stuck
        start = time.thread_time()
        print(rewards.math_equal('x+1', 'y'), round(time.thread_time() - start, 2))
    """
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    verdict, cpu_seconds = out.stdout.split()
    assert verdict == "False", out.stdout + out.stderr
    assert float(cpu_seconds) < rewards.MATH_TIMEOUT_S + 0.6, out.stdout + out.stderr


def test_a_garbage_collection_is_not_the_comparisons_cost():
    """Pitfall (a right answer judged wrong in the suite, AVX2 EPYC, 2026-12-07): in a process with
    a big heap (vLLM, torch), an automatic full collection can start inside the timed comparison
    and spend most of its CPU budget. Here a comparison of 0.2 s of CPU meets a collection made
    to cost 0.7 s (a gc callback): with collections left on while timed, the verdict is False."""
    code = """if True:
        import gc, sys, time; sys.path.insert(0, '.')
        import rewards
        rewards._warm_up()
        rewards.MATH_WALL_S = 60.0  # the CPU rule alone, even on a busy machine
        def busy(seconds):
            t = time.thread_time()
            while time.thread_time() - t < seconds:
                pass
        collections = []
        def costly_collection(phase, info):  # the trainer's heap, in a few lines
            if phase == 'start' and not collections:
                collections.append(busy(0.7))
        verify = rewards._verify_latex
        def verify_making_garbage(pred, gold):
            gc.callbacks.append(costly_collection)
            for _ in range(5000):  # cyclic garbage, past gc's threshold (700 allocations)
                cycle = []
                cycle.append(cycle)
            busy(0.2)
            return verify(pred, gold)
        rewards._verify_latex = verify_making_garbage
        print(rewards.math_equal('x^2+2x+1', '(x+1)^2'), gc.isenabled())
    """
    assert 0.2 < rewards.MATH_TIMEOUT_S < 0.2 + 0.7
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=30
    )
    assert out.stdout.split() == ["True", "True"], out.stdout + out.stderr  # gc back on after


def test_parity_step_verifier_blames_the_first_wrong_symbol_and_after():
    ex = parity_example("0110")
    assert [r for _, r in parity_steps(parity_completion("0110"), ex)] == [1.0] * 5
    wrong = parity_steps("<think>eOoo</think><answer>1</answer>", ex)
    assert [r for _, r in wrong] == [1, 1, 0, 0, 0]
    retry = parity_completion("0110", "retry", guess="1")  # the guess before "wait" is no step
    assert [r for _, r in parity_steps(retry, ex)] == [1.0] * 5
    assert parity_steps(parity_completion("0110", "direct"), ex) == [(33, 1.0)]
    ends = [e for e, _ in parity_steps(parity_completion("0110"), ex)]
    assert parity_completion("0110")[: ends[1]] == "<think>eO"  # an end is just past its symbol
    trace = parity_completion("0110")
    assert task_steps("parity", trace, ex) == parity_steps(trace, ex)


def test_reasoning_mode_tells_direct_trace_and_retry_in_any_task():
    modes = [reasoning_mode(parity_completion("0110", m)) for m in ("direct", "trace", "retry")]
    assert modes == ["direct", "trace", "retry"]
    assert reasoning_mode(addition_trace(47, 38)) == "trace"
    assert reasoning_mode("<answer>85</answer>") == "other"
