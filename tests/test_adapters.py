"""The adapters of rewards.py (section 4) against the real consumers: TRL's GRPOTrainer runs a few
steps on the tiny model with `trl_reward_func`, and `compute_score` is called the way verl's reward
managers call a custom reward function (keyword arguments, verl's data_source strings, ground truths
as verl's preprocessing scripts store them, from a worker thread)."""

import os

# Before torch is first imported (helpers imports it; this file is collected first): without it,
# spinning OpenMP threads made TRL's steps ~5x slower on our loaded 2-core machine. nano_grpo.py
# sets the same on import.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import concurrent.futures
import json
import math

import pytest
from helpers import TINY_MODEL

import rewards

R1 = "<think>{}</think><answer>{}</answer>"  # a well-formatted completion: correct + 0.1 format


# ------------------------------------------------------------------------------------------------
# TRL: GRPOTrainer(reward_funcs=trl_reward_func(...)) trains on CPU, offline
# ------------------------------------------------------------------------------------------------
@pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")
# TRL knows vLLM <= 0.31; unused here
@pytest.mark.filterwarnings("ignore:TRL currently supports vLLM")
def test_trl_grpo_trainer_runs_with_our_reward(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype="float32")
    examples = rewards.load_task("addition", "train", n=32)
    # 'prompt': the text TRL tokenizes; the other columns (question, answer, a, b) reach the reward
    dataset = Dataset.from_list(
        [{"prompt": rewards.build_prompt("addition", ex, tokenizer), **ex} for ex in examples]
    )
    steps = 2
    args = trl.GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        seed=0,
        bf16=False,
        gradient_checkpointing=False,  # TRL's defaults are True for both; fp32 on CPU
        max_steps=steps,
        logging_steps=1,
        disable_tqdm=True,
        per_device_train_batch_size=8,
        num_generations=4,  # 2 prompts x 4 answers per step
        max_completion_length=32,
        temperature=1.0,
        top_k=0,
        top_p=1.0,  # the full softmax
        learning_rate=1e-4,
        beta=0.04,
        loss_type="grpo",
        use_vllm=False,
    )
    reward = rewards.trl_reward_func("addition")
    trainer = trl.GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    trainer.train()

    logs = [row for row in trainer.state.log_history if "reward" in row]
    assert trainer.state.global_step == steps and len(logs) == steps
    # TRL logs each reward function under its __name__; our parts come through log_metric
    keys = ("reward", "rewards/addition_reward/mean", "addition/correct", "addition/format")
    for row in logs:
        for key in keys:
            assert key in row and math.isfinite(row[key]), (key, row)
        assert 0.0 <= row["reward"] <= 1.1 + 1e-6
        assert 0.0 <= row["addition/correct"] <= 1.0 and 0.0 <= row["addition/format"] <= 1.0
        assert abs(row["reward"] - (row["addition/correct"] + 0.1 * row["addition/format"])) < 1e-5
        assert 0 < row["completions/mean_length"] <= 32
    # a real update, with the KL term
    assert math.isfinite(logs[-1]["grad_norm"]) and "kl" in logs[-1]


def test_trl_reward_func_takes_what_trl_passes():
    """The exact keyword set GRPOTrainer._calculate_rewards passes (trl 1.16): prompts,
    completions, completion_ids, every dataset column but 'prompt' as a list, trainer_state,
    log_extra, log_metric."""
    logged = {}
    reward = rewards.trl_reward_func("addition")
    out = reward(
        prompts=["<|user|>47+38<|assistant|>"] * 3,
        completions=[R1.format("7+8=15,4+3+1=8", 85), R1.format("7+8=15,4+3+0=7", 75), "85"],
        completion_ids=[[5, 6], [5, 7], [8]],
        question=["47+38"] * 3,
        answer=["85"] * 3,
        a=[47] * 3,
        b=[38] * 3,
        trainer_state=object(),
        log_extra=lambda column, values: None,
        log_metric=lambda name, value: logged.__setitem__(name, value),
    )
    assert out == pytest.approx([1.1, 0.1, 0.0])
    assert logged == pytest.approx({"addition/correct": 1 / 3, "addition/format": 2 / 3})
    # conversational datasets: completions are lists of messages
    chat = reward(
        prompts=[[{"role": "user", "content": "47+38"}]],
        completions=[[{"role": "assistant", "content": R1.format("", 85)}]],
        answer=["85"],
    )
    assert chat == pytest.approx([1.1])


# ------------------------------------------------------------------------------------------------
# verl: custom_reward_function.path=rewards.py, custom_reward_function.name=compute_score
# ------------------------------------------------------------------------------------------------
# verl's extra_info
EXTRA = {"split": "train", "index": 0, "num_turns": 2, "rollout_reward_scores": {}}
COUNTDOWN_TRUTH = {"target": 100, "numbers": [19, 44, 4]}
MBPP_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
MBPP_RIGHT = R1.format("", "```python\ndef add(a, b):\n    return a + b\n```")
MBPP_WRONG = R1.format("", "```python\ndef add(a, b):\n    return a - b\n```")
ROOT_2 = R1.format("", r"\frac{\sqrt{8}}{2}")  # a right answer when the truth is \sqrt{2}
VERL_CASES = [  # (data_source, ground_truth, right completion, wrong completion)
    ("openai/gsm8k", "72", R1.format("48/2=24, 48+24=72", 72), R1.format("48+2=50", 50)),
    ("openai/gsm8k", "1234", R1.format("", "1,234"), R1.format("", "1,243")),
    # verl's own MATH data sources, and its DAPO one
    ("lighteval/MATH", r"\frac{1}{2}", R1.format("", r"\dfrac12"), R1.format("", r"\frac{1}{3}")),
    ("DigitalLearningGmbH/MATH-lighteval", r"\sqrt{2}", ROOT_2, R1.format("", "1.414")),
    ("HuggingFaceH4/MATH-500", "(3, 4)", R1.format("", "(3,4)"), R1.format("", "(4, 3)")),
    ("math_dapo", "34", R1.format("", "34"), R1.format("", "43")),
    # Countdown as TinyZero (verl-based) stores it: ground_truth {'target', 'numbers'}
    ("countdown", COUNTDOWN_TRUTH, R1.format("", "(44 - 19) * 4"), R1.format("", "44 + 19 + 4")),
    (
        "Jiayi-Pan/Countdown-Tasks-3to4",
        COUNTDOWN_TRUTH,
        R1.format("", "4 * (44 - 19)"),
        R1.format("", "44 * 19 * 4"),
    ),
    ("addition", "85", R1.format("7+8=15,4+3+1=8", 85), R1.format("7+8=15,4+3+0=7", 75)),
    ("mbpp", json.dumps(MBPP_TESTS), MBPP_RIGHT, MBPP_WRONG),
]


@pytest.mark.parametrize("source, truth, right, wrong", VERL_CASES, ids=[c[0] for c in VERL_CASES])
def test_compute_score_as_verl_calls_it(source, truth, right, wrong):
    def call(text):
        return rewards.compute_score(
            data_source=source, solution_str=text, ground_truth=truth, extra_info=dict(EXTRA)
        )

    assert call(right) == pytest.approx(1.1)  # correct (1) + 0.1 * format (1)
    assert call(wrong) == pytest.approx(0.1)  # well formatted, wrong
    assert call("no answer at all") == 0.0
    assert isinstance(call(right), float)


def test_compute_score_with_verl_data_types_and_in_a_worker_thread():
    """Parquet round trips hand verl numpy arrays/integers, and verl's reward loop calls the
    function through run_in_executor (a worker thread, where math-verify's signal timeouts
    cannot work)."""
    np = pytest.importorskip("numpy")
    truth = {"target": np.int64(100), "numbers": np.array([19, 44, 4])}
    countdown = R1.format("", "(44 - 19) * 4")
    assert rewards.compute_score("countdown", countdown, truth) == pytest.approx(1.1)
    tests = np.array(MBPP_TESTS, dtype=object)
    assert rewards.compute_score("mbpp", MBPP_RIGHT, tests) == pytest.approx(1.1)
    jobs = [
        ("DigitalLearningGmbH/MATH-lighteval", ROOT_2, r"\sqrt{2}", 1.1),
        ("DigitalLearningGmbH/MATH-lighteval", R1.format("", r"\sqrt{3}"), r"\sqrt{2}", 0.1),
        ("openai/gsm8k", R1.format("", "72"), "72", 1.1),
    ]
    calls = [dict(data_source=s, solution_str=t, ground_truth=g) for s, t, g, _ in jobs]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        scores = list(pool.map(lambda kw: rewards.compute_score(**kw, extra_info=None), calls))
    assert scores == pytest.approx([j[3] for j in jobs])


def test_compute_score_unknown_source_names_the_fix():
    with pytest.raises(rewards.TaskError, match="data_source"):
        rewards.compute_score("hiyouga/geometry3k", "<answer>1</answer>", "1")
