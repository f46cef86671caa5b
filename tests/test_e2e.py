"""End-to-end: a few steps of nano_grpo.py on the shipped tiny model, with HF and vLLM rollouts.
Also the pitfalls that need a real engine (issue 8, items 5-7) and bad-input errors."""

import os
import sys

import pytest
import torch
from helpers import HAS_VLLM, TINY_MODEL, run_script, without_times

import nano_grpo as G

pytestmark = pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")
SHORT = [
    "--max_steps",
    "2",
    "--prompts_per_step",
    "4",
    "--group_size",
    "4",
    "--eval_size",
    "16",
    "--eval_every",
    "2",
    "--save_every",
    "2",
]
has_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")


def run(tmp_path, *flags, name="run"):
    return run_script(G, SHORT + list(flags), tmp_path / name)


def test_hf_rollout_run_end_to_end(tmp_path, capsys):
    out, rows = run(tmp_path, "--rollout", "hf")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: the accuracy before training
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: acc_before=")
    assert os.path.exists(tmp_path / "run" / "curves.png")
    assert open(tmp_path / "run" / "latest").read() == "checkpoint-2"
    assert rows[1]["logprob_gap_max"] < 1e-3  # generate()'s own scores agree with the trainer
    for key in (
        "reward",
        "reward_correct",
        "reward_format",
        "accuracy",
        "kl",
        "entropy",
        "clip_frac",
        "grad_norm",
        "zero_signal",
        "response_len",
        "truncated",
        "time_rollout",
        "eval_acc",
    ):
        assert key in rows[-1], key


@has_vllm
def test_vllm_run_logprobs_agree_and_sync_matches_hf(tmp_path):
    out, rows = run(tmp_path, "--rollout", "vllm")
    # before the first update the sampler's log-probs are the trainer's (fp32): [issue 8.5]
    assert rows[1]["logprob_gap_max"] <= 1e-3
    assert rows[2]["logprob_gap_max"] <= 1e-3  # and after a weight sync too: no stale rollouts
    model, engine, tok = out["model"], out["engine"], out["tokenizer"]
    prompts = [
        tok.encode(G.rewards.build_prompt("addition", ex, tok), add_special_tokens=False)
        for ex in G.rewards.load_task("addition", "test", n=8)
    ]
    model.eval()
    via_vllm = G.generate(engine, prompts, 1, 0.0, 32, G.answer_stop(tok, G.Config()), seed=0)
    via_hf = G.generate_hf(model, prompts, 1, 0.0, 32, G.answer_stop(tok, G.Config()), seed=0)
    assert [s["response_ids"] for s in via_vllm] == [s["response_ids"] for s in via_hf]
    del out, engine


@has_vllm
def test_failed_weight_sync_is_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(
        G, "sync_weights", lambda llm, model: None
    )  # a sync that silently does nothing
    with pytest.raises(SystemExit) as e:
        # 16 x 8 answers, 3 steps: some step has signal (a zero-signal step changes no weight)
        run(
            tmp_path,
            "--rollout",
            "vllm",
            "--max_steps",
            "3",
            "--prompts_per_step",
            "16",
            "--group_size",
            "8",
        )
    msg = str(e.value)
    assert (
        "does not hold the trainer's weights" in msg and "--rollout hf" in msg and "0.32.0" in msg
    )
    assert "\n" not in msg


@pytest.mark.parametrize("rollout", ["hf", pytest.param("vllm", marks=has_vllm)])
def test_same_seed_same_run(tmp_path, rollout):
    _, a = run(tmp_path, "--rollout", rollout, "--seed", "3", name="a")
    _, b = run(tmp_path, "--rollout", rollout, "--seed", "3", name="b")
    assert without_times(a) == without_times(b)
    _, c = run(tmp_path, "--rollout", rollout, "--seed", "4", name="c")
    assert without_times(a) != without_times(c)


def test_resume_continues_exactly(tmp_path):
    flags = ["--rollout", "hf", "--max_steps", "4", "--save_every", "2", "--eval_every", "0"]
    _, whole = run(tmp_path, *flags, name="whole")
    _, first = run(tmp_path, *flags[:-4], "--max_steps", "2", "--eval_every", "0", name="cut")
    os.makedirs(tmp_path / "cut" / "checkpoint-3.tmp")  # a checkpoint that died half-written
    open(tmp_path / "cut" / "checkpoint-3.tmp" / "junk", "w").close()
    _, resumed = run(tmp_path, *flags, "--resume", name="cut")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    # steps 3-4 after the resume are the steps 3-4 of the run that was never interrupted
    for x, y in zip(without_times(resumed)[3:], without_times(whole)[3:]):
        assert x == pytest.approx(y, rel=1e-5)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--model", "./no/such/model"], "does not exist"),
        (["--task", "no-such-task"], "addition"),
        (["--preset", "laptop"], "cpu-demo"),
        (["--loss_agg", "mean"], "token-mean"),
    ],
)
def test_bad_input_is_one_line(tmp_path, flags, needle):
    with pytest.raises(SystemExit) as e:
        G.main(G.parse_config(SHORT + ["--rollout", "hf", "--output_dir", str(tmp_path), *flags]))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_vllm_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(SystemExit, match="--rollout hf"):
        G.main(G.parse_config(SHORT + ["--rollout", "vllm", "--output_dir", str(tmp_path)]))


@pytest.fixture(scope="module")
def tiny():
    model, tok = G.load_model(TINY_MODEL, G.Config())
    prompts = [
        tok.encode(G.rewards.build_prompt("addition", ex, tok), add_special_tokens=False)
        for ex in G.rewards.load_task("addition", "test", n=6)
    ]
    return model.eval(), tok, prompts


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=has_vllm)])
def test_eos_and_truncation(tiny, engine, request):
    model, tok, prompts = tiny
    eng = model if engine == "hf" else request.getfixturevalue("llm")
    eos, stop = tok.eos_token_id, G.answer_stop(tok, G.Config())
    full = G.generate(eng, prompts, 1, 0.0, 32, stop, seed=0)
    assert all(s["response_ids"][-1] == eos and not s["truncated"] for s in full)  # EOS kept
    cut = G.generate(eng, prompts, 1, 0.0, 5, stop, seed=0)  # cut at the length limit
    assert all(len(s["response_ids"]) == 5 and s["truncated"] for s in cut)
    assert [s["response_ids"] for s in cut] == [s["response_ids"][:5] for s in full]
    # an EOS-id token inside the prompt does not end or shorten the answer
    with_eos = G.generate(eng, [[eos] + p for p in prompts], 1, 0.0, 32, stop, seed=0)
    assert all(len(s["response_ids"]) > 5 and s["response_ids"][-1] == eos for s in with_eos)
    # and the trainer's batch keeps the generated EOS in the loss mask
    batch = G.make_batch(with_eos, pad_id=eos)
    assert batch["response_mask"].sum().item() == sum(len(s["response_ids"]) for s in with_eos)


@pytest.fixture(scope="module")
def llm():
    if __import__("importlib").util.find_spec("vllm") is None:
        pytest.skip("vLLM not installed")
    engine = G.start_vllm(G.Config(), TINY_MODEL, seed=0)
    yield engine
    del engine


def test_think_budget_eval(tiny, tmp_path):
    model, tok, prompts = tiny
    examples = G.rewards.load_task("addition", "test", n=6)
    cfg = G.Config(think_budget=0, eval_size=6)
    out = G.evaluate(model, model, tok, examples, prompts, cfg)
    assert 0.0 <= out["eval_acc_budget"] <= 1.0 and "eval_acc" in out


@has_vllm
def test_sync_check_catches_a_stale_engine(tiny, llm):
    """The check alone: the trainer takes one real step, the engine is not told."""
    model, tok, prompts = tiny
    model = __import__("copy").deepcopy(model)
    assert (
        G.check_engine_weights(llm, model, prompts, 1e-4, G.Config()) < 1e-4
    )  # same weights: passes
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    samples = G.generate(model, prompts[:2], 2, 1.0, 32, G.answer_stop(tok, G.Config()), seed=0)
    b = G.make_batch(samples, tok.pad_token_id)
    (
        -(
            G.token_logprobs(model, b["input_ids"], b["attention_mask"], 1.0) * b["response_mask"]
        ).sum()
    ).backward()
    opt.step()
    with pytest.raises(SystemExit, match="does not hold the trainer's weights"):
        G.check_engine_weights(llm, model, prompts, 1e-4, G.Config())
    G.sync_weights(llm, model)  # the real sync fixes it
    assert G.check_engine_weights(llm, model, prompts, 1e-4, G.Config()) < 1e-4


@has_vllm
def test_the_probe_is_whole_prompts_end_to_end_in_rows_the_model_can_read(tiny, llm):
    """start_sync_check's probe: whole held-out prompts in order, PROBE_TOKENS in all, packed end
    to end into rows no longer than the model's context (vLLM's cost is per request: a row per
    prompt made the check ~1.6x slower); a stale engine still stops the run on that probe."""
    model, tok, _ = tiny
    model = __import__("copy").deepcopy(model)
    prompts = [G.prompt_ids(tok, G.Config(), ex) for ex in G.rewards.load_task("addition", "test")]
    run = __import__("argparse").Namespace(
        cfg=G.Config(), engine=llm, engine_follows_policy=True, eval_prompts=prompts
    )
    G.sync_weights(llm, model)  # the engine is shared: an earlier test may have changed it
    G.start_sync_check(run, model)
    flat = [t for row in run.probe for t in row]
    n = next(k for k in range(len(prompts) + 1) if sum(map(len, prompts[:k])) == len(flat))
    assert flat == [t for p in prompts[:n] for t in p]  # whole prompts, in their order
    assert len(flat) <= G.PROBE_TOKENS < len(flat) + len(prompts[n])  # as many as fit
    context = model.config.max_position_embeddings  # the tiny model's: 128
    assert all(len(row) <= context for row in run.probe) and len(run.probe) <= 5  # not 73
    assert run.sync_tolerance == G.SYNC_FLOOR  # fp32: the start gap is rounding, ~1e-6
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    b = G.make_batch([dict(prompt_ids=row[:1], response_ids=row[1:]) for row in run.probe], 0)
    logp = G.token_logprobs(model, b["input_ids"], b["attention_mask"], 1.0)
    (-(logp * b["response_mask"]).sum()).backward()
    opt.step()  # one step the engine is not told about
    with pytest.raises(SystemExit, match="does not hold the trainer's weights"):
        G.check_engine_weights(llm, model, run.probe, run.sync_tolerance, G.Config())


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=has_vllm)])
def test_a_steps_answers_can_be_drawn_again_from_its_seed(tiny, engine, request):
    """generate seeds its call: the same seed gives the same answers whatever was drawn in
    between, another seed others (vLLM: one stream for the call, no seed per request)."""
    model, tok, prompts = tiny
    eng = model if engine == "hf" else request.getfixturevalue("llm")
    stop = G.answer_stop(tok, G.Config())

    def draw(seed):
        return [s["response_ids"] for s in G.generate(eng, prompts[:4], 8, 1.0, 32, stop, seed)]

    first = draw(11)
    torch.rand(100)  # anything drawn in between
    assert draw(12) != first and draw(11) == first


@pytest.mark.parametrize("engine", ["hf", pytest.param("vllm", marks=has_vllm)])
def test_questions_are_sampled_independently(tiny, engine, request):
    """The same question asked 24 times in one batch must not get one shared random stream (a
    single vLLM seed for the whole batch did that: every copy got the same answer)."""
    model, tok, prompts = tiny
    eng = model if engine == "hf" else request.getfixturevalue("llm")
    carry = next(
        p
        for p, ex in zip(prompts, G.rewards.load_task("addition", "test", n=6))
        if ex["a"] % 10 + ex["b"] % 10 >= 10
    )  # a carry question: the model hesitates
    answers = G.generate(eng, [carry] * 24, 1, 1.0, 32, G.answer_stop(tok, G.Config()), seed=0)
    assert len({tuple(s["response_ids"]) for s in answers}) > 1
