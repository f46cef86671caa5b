"""End-to-end: a few steps of the R1-Zero miniature (`--preset cpu-r1-zero`: GRPO from
assets/tiny-parity on parity) run, and log how the answers were reached, per difficulty bucket."""

import os

import pytest
from helpers import ROOT, run_script

import nano_grpo as G

PARITY_MODEL = os.path.join(ROOT, "assets", "tiny-parity")
BUCKETS = ("easy", "mid", "hard")


@pytest.mark.skipif(not os.path.isdir(PARITY_MODEL), reason="parity model not built")
def test_r1_zero_preset_runs_and_logs_per_bucket(tmp_path, capsys):
    # the preset, shortened: 3 steps of 8 questions x 8 answers, HF rollouts, 30 held-out strings
    flags = "--preset cpu-r1-zero --max_steps 3 --eval_every 3 --eval_size 30 --rollout hf"
    flags += " --prompts_per_step 8 --group_size 8"
    _, rows = run_script(G, flags.split(), tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: acc_before=")
    assert open(tmp_path / "run" / "latest").read() == "checkpoint-3"  # saved at the end only
    train = rows[1:]
    for key in ("trace_share", "wait_share", "response_len_right", "response_len", "entropy"):
        assert all(key in r for r in train), key
    for b in BUCKETS:  # each bucket is drawn at some step (the questions are random)
        for key in ("response_len", "accuracy", "trace_share", "wait_share"):
            assert any(f"{key}_{b}" in r for r in train), f"{key}_{b}"
    for r in (rows[0], rows[-1]):  # the held-out evaluations, before and after
        assert 0 <= r["eval_trace_share"] <= 1
        for b in BUCKETS:
            for key in ("eval_acc", "eval_trace_share", "eval_response_len", "eval_wait_share"):
                assert f"{key}_{b}" in r, f"{key}_{b}"
    # the base model answers directly under greedy decoding (6 tokens), easy items right; with
    # margins, as its contract (tests/test_tiny_model.py): greedy bits may differ on another CPU
    assert rows[0]["eval_trace_share"] <= 0.1 and rows[0]["eval_acc_easy"] >= 0.9
    assert rows[0]["eval_response_len_hard"] <= 7
