"""rewards.py sections 3-4: the task table, prompts, task_reward and the TRL / verl adapters.

Hub tasks are loaded from small hand-written files in tests/fixtures/ (the hub datasets' schemas);
the hub itself is replaced by a fake `datasets` module: no test touches the network.
"""

import json
import os
import sys
import types

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
from rewards import (  # noqa: E402
    TASKS,
    TaskError,
    build_prompt,
    compute_score,
    load_task,
    task_reward,
    trl_reward_func,
)

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
HUB_FILES = {
    "gsm8k": "gsm8k.jsonl",
    "math": "math500.jsonl",
    "countdown": "countdown.jsonl",
    "mbpp": "mbpp.json",
}


def fixture(name: str) -> str:
    return os.path.join(FIXTURES, name)


def one_line_task_error(call, *words):
    """Calls `call`, expects a TaskError whose message is one line containing every word."""
    with pytest.raises(TaskError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    for word in words:
        assert word in message, message
    return message


# ---- the table -----------------------------------------------------------------------------------
def test_task_table():
    generated = {"addition", "parity", "countdown-procedural"}
    assert set(TASKS) == generated | {"gsm8k", "math", "countdown", "mbpp"}
    for task in TASKS.values():
        assert callable(task.load) and callable(task.correct) and "{question}" in task.instruction
    assert TASKS["addition"].instruction == TASKS["parity"].instruction == "{question}"
    assert issubclass(TaskError, ValueError)


# ---- loading from local files in the hub schemas -------------------------------------------------
def test_gsm8k_from_file():
    examples = load_task("gsm8k", "train", data_path=fixture("gsm8k.jsonl"))
    assert len(examples) == 6
    assert examples[0]["question"].startswith("Natalia sold clips")
    assert [ex["answer"] for ex in examples] == ["72", "10", "945", "2245", "-8", "624"]
    assert examples[0]["solution"].endswith("#### 72")
    for ex in examples:  # each reference solution, as a completion, is right
        assert TASKS["gsm8k"].correct(ex["solution"], ex) == 1.0


def test_math_from_math500_and_from_math_train_files():
    test = load_task("math", "test", data_path=fixture("math500.jsonl"))
    first = ["\\left( 3, \\frac{\\pi}{2} \\right)", "12", "\\frac{3}{4}"]
    assert [ex["answer"] for ex in test][:3] == first
    # answers from \boxed{}
    train = load_task("math", "train", data_path=fixture("math_train.jsonl"))
    assert [ex["answer"] for ex in train] == ["0", "4", "17", "\\frac{2}{7}", "4"]
    for ex in test + train:
        assert ex["question"] and TASKS["math"].correct(ex["solution"], ex) == 1.0


def test_countdown_from_file_has_a_fixed_held_out_tail():
    train = load_task("countdown", "train", data_path=fixture("countdown.jsonl"))
    test = load_task("countdown", "test", data_path=fixture("countdown.jsonl"))
    assert len(train) == 9 and len(test) == 1  # a tenth of a small file (1000 rows of the real one)
    assert test[0]["numbers"] == [52, 3, 9, 15] and test[0]["target"] == 76
    assert test[0]["answer"] == "76"
    question = train[0]["question"]
    assert train[0] == {"question": question, "answer": "98", "numbers": [44, 19, 35], "target": 98}
    assert "[44, 19, 35]" in train[0]["question"] and "98" in train[0]["question"]
    assert TASKS["countdown"].correct("<answer>44 + 19 + 35</answer>", train[0]) == 1.0


def test_mbpp_from_json_file():
    examples = load_task("mbpp", "test", data_path=fixture("mbpp.json"))
    assert len(examples) == 6 and examples[0]["task_id"] == 2
    assert examples[0]["question"].startswith("Write a function to find the similar elements")
    first_test = "assert similar_elements((3, 4, 5, 6),(5, 7, 4, 10)) == (4, 5)"
    assert first_test in examples[0]["question"]
    # test_setup_code runs before each test
    assert examples[-1]["tests"][0].startswith("import math\n")
    for ex in examples:  # the reference code passes its own tests in the sandbox
        assert TASKS["mbpp"].correct(f"```python\n{ex['answer']}\n```", ex) == 1.0


def test_parquet_file(tmp_path):
    pyarrow = pytest.importorskip("pyarrow")
    parquet = pytest.importorskip("pyarrow.parquet")
    rows = [json.loads(line) for line in open(fixture("countdown.jsonl"))]
    parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "countdown.parquet")
    from_parquet = load_task("countdown", "train", data_path=str(tmp_path / "countdown.parquet"))
    assert from_parquet == load_task("countdown", "train", data_path=fixture("countdown.jsonl"))


def test_n_and_seed_sample_deterministically():
    path = fixture("gsm8k.jsonl")
    a = load_task("gsm8k", n=3, seed=1, data_path=path)
    b = load_task("gsm8k", n=3, seed=1, data_path=path)
    assert a == b and len(a) == 3
    shuffled = [ex["answer"] for ex in load_task("gsm8k", n=6, seed=2, data_path=path)]
    # a shuffle, not the file order
    assert shuffled != [ex["answer"] for ex in load_task("gsm8k", data_path=path)]
    assert len(load_task("gsm8k", n=100, data_path=path)) == 6


# ---- the hub: the right dataset ids, and a one-line error when it cannot be reached --------------
class FakeDataset:
    def __init__(self, rows):
        self.rows = rows

    def to_list(self):
        return list(self.rows)


def fake_datasets(monkeypatch, calls, fail=False):
    def load_dataset(repo, config=None, split=None):
        calls.append((repo, config, split))
        if fail:
            raise ConnectionError("Couldn't reach 'https://huggingface.co'\n(offline)")
        name = {
            "openai/gsm8k": "gsm8k.jsonl",
            "HuggingFaceH4/MATH-500": "math500.jsonl",
            "DigitalLearningGmbH/MATH-lighteval": "math_train.jsonl",
            "Jiayi-Pan/Countdown-Tasks-3to4": "countdown.jsonl",
            "google-research-datasets/mbpp": "mbpp.json",
        }[repo]
        return FakeDataset(rewards._read_rows(fixture(name)))

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))


def test_hub_dataset_ids(monkeypatch):
    calls = []
    fake_datasets(monkeypatch, calls)
    for name in ("gsm8k", "math", "countdown", "mbpp"):
        for split in ("train", "test"):
            assert load_task(name, split, n=2)
    assert calls == [
        ("openai/gsm8k", "main", "train"),
        ("openai/gsm8k", "main", "test"),
        ("DigitalLearningGmbH/MATH-lighteval", None, "train"),
        ("HuggingFaceH4/MATH-500", None, "test"),
        ("Jiayi-Pan/Countdown-Tasks-3to4", None, "train"),
        ("Jiayi-Pan/Countdown-Tasks-3to4", None, "train"),
        ("google-research-datasets/mbpp", "full", "train"),
        ("google-research-datasets/mbpp", "full", "test"),
    ]


@pytest.mark.parametrize("name", ["gsm8k", "math", "countdown", "mbpp"])
def test_unreachable_hub_says_to_pass_data_path(monkeypatch, name):
    fake_datasets(monkeypatch, [], fail=True)
    one_line_task_error(lambda: load_task(name, "train"), name, "--data_path", "ConnectionError")


# ---- errors: one line, naming the fix ------------------------------------------------------------
def test_unknown_task_lists_the_known_ones():
    one_line_task_error(
        lambda: load_task("gsm9k"), "gsm9k", "addition", "countdown-procedural", "mbpp"
    )
    one_line_task_error(lambda: build_prompt("nope", {"question": "q"}, None), "nope", "gsm8k")
    one_line_task_error(lambda: task_reward("nope", "", {}), "nope")


@pytest.mark.parametrize("name", list(TASKS))
def test_bad_split(name):
    one_line_task_error(lambda: load_task(name, "validation"), "validation", "'train' or 'test'")


@pytest.mark.parametrize(
    "name, rows, field, index",
    [
        ("gsm8k", [{"question": "q", "answer": "#### 1"}, {"question": "q"}], "'answer'", "row 1"),
        ("gsm8k", [{"answer": "#### 1"}], "'question'", "row 0"),
        (
            "math",
            [{"problem": "p", "answer": "1"}, {"problem": "p", "answer": "2"}, {"problem": "p"}],
            "'solution'",
            "row 2",
        ),
        ("math", [{"problem": "p", "solution": "no box here"}], "boxed", "row 0"),
        ("countdown", [{"target": 1, "nums": [1, 2]}] * 3 + [{"target": 5}], "'nums'", "row 3"),
        ("mbpp", [{"text": "t", "code": "c"}], "'test_list'", "row 0"),
    ],
)
def test_missing_field_names_row_and_field(tmp_path, name, rows, field, index):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    split = "test" if name == "countdown" else "train"
    one_line_task_error(lambda: load_task(name, split, data_path=str(path)), name, field, index)


def test_bad_data_files(tmp_path):
    def gsm8k_from(name):
        return load_task("gsm8k", data_path=str(tmp_path / name))

    one_line_task_error(lambda: gsm8k_from("missing.jsonl"), "missing.jsonl")
    (tmp_path / "rows.csv").write_text("question,answer\n")
    one_line_task_error(lambda: gsm8k_from("rows.csv"), ".jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{"question": \n')
    one_line_task_error(lambda: gsm8k_from("bad.jsonl"), "bad.jsonl", "JSON")
    (tmp_path / "dict.json").write_text('{"question": ["q"]}')
    one_line_task_error(lambda: gsm8k_from("dict.json"), "list of rows")
    gsm8k_file = fixture("gsm8k.jsonl")
    one_line_task_error(lambda: load_task("addition", data_path=gsm8k_file), "drop --data_path")


# ---- procedural tasks ----------------------------------------------------------------------------
def problem_key(ex):
    return tuple(sorted(ex["numbers"])), ex["target"]


def test_countdown_procedural_is_seeded_disjoint_and_solvable():
    train = load_task("countdown-procedural", "train", n=300, seed=0)
    assert train == load_task("countdown-procedural", "train", n=300, seed=0)  # deterministic
    assert train != load_task("countdown-procedural", "train", n=300, seed=1)
    # a stream: a prefix
    assert load_task("countdown-procedural", "train", n=50, seed=0) == train[:50]
    test = load_task("countdown-procedural", "test", n=200, seed=0)
    other_seed_train = load_task("countdown-procedural", "train", n=300, seed=7)
    test_keys = {problem_key(ex) for ex in test}
    assert len(test_keys) == 200  # no repeats
    train_keys = {problem_key(ex) for ex in train + other_seed_train}
    assert not test_keys & train_keys  # train/test disjoint
    for ex in train[:100] + test[:100]:
        assert 3 <= len(ex["numbers"]) <= 4 and all(1 <= x <= 99 for x in ex["numbers"])
        assert 1 <= ex["target"] <= 100
        assert ex["answer"] == str(ex["target"]) and str(ex["numbers"]) in ex["question"]
        solution = f"<answer>{ex['solution']}</answer>"
        assert TASKS["countdown-procedural"].correct(solution, ex) == 1.0
    assert len(load_task("countdown-procedural", "test")) == 1000  # n=None: 1000 problems


def test_addition_task():
    test = load_task("addition", "test")
    assert len(test) == 800 and test == load_task("addition", "test")
    train_pairs = {(ex["a"], ex["b"]) for ex in load_task("addition", "train")}
    assert not train_pairs & {(ex["a"], ex["b"]) for ex in test}
    five = load_task("addition", "train", n=5, seed=3)
    assert five == load_task("addition", "train", n=5, seed=3)
    ex = test[0]
    assert ex["question"] == f"{ex['a']}+{ex['b']}" and ex["answer"] == str(ex["a"] + ex["b"])


# ---- prompts -------------------------------------------------------------------------------------
def make_tokenizer(chat_template=None):
    """A tiny tokenizer built offline (character WordLevel), with or without a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    symbols = ["[UNK]", "[PAD]", *"0123456789+=<>/,abcdefghijklmnopqrstuvwxyz "]
    vocab = {token: i for i, token in enumerate(symbols)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]"
    )
    tokenizer.chat_template = chat_template
    return tokenizer


CHAT = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_build_prompt_with_a_chat_template():
    tokenizer = make_tokenizer(CHAT)
    chat = build_prompt("addition", {"question": "47+38"}, tokenizer)
    assert chat == "<|user|>47+38<|end|><|assistant|>"
    ex = load_task("gsm8k", data_path=fixture("gsm8k.jsonl"))[0]
    prompt = build_prompt("gsm8k", ex, tokenizer)
    assert prompt.startswith("<|user|>" + ex["question"])
    assert prompt.endswith("<|end|><|assistant|>")
    assert "<think>" in prompt and "<answer>" in prompt
    problem = load_task("countdown-procedural", n=1)[0]
    countdown = build_prompt("countdown-procedural", problem, tokenizer)
    assert "equation" in countdown and "each number can only be used once" in countdown
    mbpp = load_task("mbpp", data_path=fixture("mbpp.json"))[0]
    assert "```python" in build_prompt("mbpp", mbpp, tokenizer)
    # braces kept
    latex = build_prompt("math", {"question": "Simplify $\\frac{6}{8}$ {x}."}, tokenizer)
    assert "$\\frac{6}{8}$ {x}." in latex


def test_build_prompt_without_a_chat_template():
    for tokenizer in (make_tokenizer(None), None):
        prompt = build_prompt("gsm8k", {"question": "What is 6 times 7?"}, tokenizer)
        assert "User: What is 6 times 7?" in prompt and prompt.endswith("Assistant: <think>")
    plain = build_prompt("addition", {"question": "47+38"}, None)
    assert plain.endswith("User: 47+38\nAssistant: <think>")


# ---- task_reward ---------------------------------------------------------------------------------
# fmt: off
@pytest.mark.parametrize("name, example, right, wrong", [
    ("addition", {"question": "47+38", "answer": "85"},
     "<think>7+8=15,4+3+1=8</think><answer>85</answer>", "<answer>75</answer>"),
    ("gsm8k", {"answer": "72"},
     "<think>48/2=24</think><answer>72</answer>", "<answer>71</answer>"),
    ("math", {"answer": "\\frac{3}{4}"},
     "<think>6/8</think>\n<answer>0.75</answer>", "<answer>\\frac{4}{3}</answer> done"),
    ("countdown", {"numbers": [44, 19, 35], "target": 98},
     "<think>..</think><answer>44+19+35</answer>", "<answer>44+19</answer>"),
    ("countdown-procedural", {"numbers": [6, 4, 2], "target": 3},
     "<think>..</think><answer>6/4*2</answer>", "<answer>6-4+2</answer>"),
    ("mbpp", {"tests": ["assert f(2) == 4", "assert f(3) == 9"]},
     "<think>square</think><answer>\n```python\ndef f(x):\n    return x * x\n```\n</answer>",
     "```python\ndef f(x):\n    return 4\n```"),
])
# fmt: on
def test_task_reward_components(name, example, right, wrong):
    total, parts = task_reward(name, right, example)
    assert total == pytest.approx(1.1) and parts == {"correct": 1.0, "format": 1.0}
    total, parts = task_reward(name, right, example, format_weight=0.5)
    assert total == pytest.approx(1.5) and parts == {"correct": 1.0, "format": 1.0}
    total, parts = task_reward(name, wrong, example)
    assert parts["correct"] < 1.0 and parts["format"] == 0.0
    assert total == pytest.approx(parts["correct"])


def test_mbpp_partial_credit():
    code = "```python\ndef f(x):\n    return 4\n```"
    total, parts = task_reward("mbpp", code, {"tests": ["assert f(2) == 4", "assert f(3) == 9"]})
    assert parts == {"correct": 0.5, "format": 0.0} and total == 0.5


# ---- adapters ------------------------------------------------------------------------------------
def test_trl_reward_func_with_trl_shaped_arguments():
    """TRL calls reward_func(prompts=..., completions=..., completion_ids=..., **dataset columns,
    trainer_state=..., log_extra=..., log_metric=...)."""
    logged = {}
    reward = trl_reward_func("gsm8k")
    assert reward.__name__ == "gsm8k_reward"
    prompts = ["q1", "q1", "q2"]
    plain = [
        "<think>..</think><answer>72</answer>",
        "<answer>71</answer>",
        "<think>..</think><answer>10</answer>",
    ]
    scores = reward(
        prompts=prompts,
        completions=plain,
        completion_ids=[[1, 2], [3], [4]],
        answer=["72", "72", "#### 10"],
        question=["q1", "q1", "q2"],
        trainer_state=object(),
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: logged.update({name: value}),
    )
    assert scores == pytest.approx([1.1, 0.0, 1.1])
    assert logged == pytest.approx({"gsm8k/correct": 2 / 3, "gsm8k/format": 2 / 3})
    conversational = [[{"role": "assistant", "content": text}] for text in plain]
    chats = [[{"role": "user", "content": p}] for p in prompts]
    scores = reward(prompts=chats, completions=conversational, answer=["72", "72", "10"])
    assert scores == pytest.approx([1.1, 0.0, 1.1])
    countdown = trl_reward_func("countdown", format_weight=0.0)
    assert countdown.__name__ == "countdown_reward"
    score = countdown(["p"], ["<answer>44+19+35</answer>"], numbers=[[44, 19, 35]], target=[98])
    assert score == [1.0]
    one_line_task_error(lambda: trl_reward_func("nope"), "nope")


def test_verl_compute_score():
    right = "<think>..</think><answer>72</answer>"
    assert compute_score("openai/gsm8k", right, "72") == pytest.approx(1.1)
    wrong = compute_score(
        data_source="openai/gsm8k",
        solution_str="<answer>71</answer>",
        ground_truth="72",
        extra_info={"split": "test", "index": 0},
    )
    assert wrong == 0.0
    math = "<think>.</think><answer>0.75</answer>"
    assert compute_score("HuggingFaceH4/MATH-500", math, "\\frac{3}{4}") == pytest.approx(1.1)
    boxed = compute_score("DigitalLearningGmbH/MATH-lighteval", "\\boxed{4}", "4")
    assert boxed == pytest.approx(1.0)
    # verl reads ground truth from parquet: numpy arrays and ints
    numpy = pytest.importorskip("numpy")
    truth = {"target": numpy.int64(98), "numbers": numpy.array([44, 19, 35])}
    countdown = "<think>.</think><answer>(44 + 19) + 35</answer>"
    assert compute_score("countdown", countdown, truth) == pytest.approx(1.1)
    assert compute_score("Jiayi-Pan/Countdown-Tasks-3to4", "<answer>44 + 19</answer>", truth) == 0.0
    trace = "<think>7+8=15,4+3+1=8</think><answer>85</answer>"
    assert compute_score("addition", trace, 85) == pytest.approx(1.1)
    tests = ["assert f(2) == 4"]
    code = "<think>.</think><answer>```python\ndef f(x):\n    return x * x\n```</answer>"
    assert compute_score("google-research-datasets/mbpp", code, tests) == pytest.approx(1.1)
    assert compute_score("mbpp", code, json.dumps(tests)) == pytest.approx(1.1)
    one_line_task_error(
        lambda: compute_score("lighteval/aime", "x", "1"), "lighteval/aime", "gsm8k"
    )


def test_parity_split_is_fixed_disjoint_and_a_quarter_of_each_length():
    from rewards import PARITY_BUCKETS, parity_examples, parity_strings

    for d in range(3, 13):
        train, test = set(parity_strings(d, "train")), set(parity_strings(d, "test"))
        assert not train & test and len(train | test) == 2**d
        assert len(test) == max(1, round(0.25 * 2**d)) and "0" * d in train
    for seed in (0, 1):  # the examples move with the seed; the split does not
        held_out = parity_examples("test", n=200, seed=seed)
        assert all(ex["bits"] in parity_strings(ex["d"], "test") for ex in held_out)
        assert {ex["d"] for ex in held_out} == set(range(3, 13))  # every length, equally often
        for ex in held_out:  # each in its bucket
            lo, hi = PARITY_BUCKETS[ex["bucket"]]
            assert lo <= ex["d"] <= hi
    assert parity_examples("test", n=5, seed=3) == parity_examples("test", n=5, seed=3)
    assert parity_examples("test", n=5, seed=3) != parity_examples("test", n=5, seed=4)
