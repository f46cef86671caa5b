"""End-to-end: a few steps of nano_ppo.py on the shipped tiny model, with HF and vLLM rollouts,
a resume, and bad-input errors."""

import os
import sys

import pytest
from helpers import HAS_VLLM, TINY_MODEL, run_script, without_times

import nano_ppo as P

pytestmark = pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")
SHORT = ["--max_steps", "2", "--prompts_per_step", "8", "--num_mini_batches", "2"]
SHORT += ["--eval_size", "16", "--eval_every", "2", "--save_every", "2"]
has_vllm = pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed")
# total shaped reward, task reward, negative KL reward
FIGURE_14_3 = ("reward_total", "reward", "reward_kl")


def run(tmp_path, *flags, name="run"):
    return run_script(P, SHORT + list(flags), tmp_path / name)


def test_hf_rollout_run_end_to_end(tmp_path, capsys):
    out, rows = run(tmp_path, "--rollout", "hf", "--kl_ctl", "adaptive", "--target_kl", "1")
    assert [r["step"] for r in rows] == [0, 1, 2]  # step 0: accuracy before training
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: acc_before=")
    assert os.path.exists(tmp_path / "run" / "curves.png")
    assert open(tmp_path / "run" / "latest").read() == "checkpoint-2"
    assert rows[1]["logprob_gap_max"] < 1e-3  # generate()'s own scores agree with the trainer
    keys = ("value_loss", "explained_var", "approx_kl", "clip_frac", "vf_clip_frac", "entropy")
    keys += ("kl", "beta", "grad_norm", "critic_grad_norm", "response_len", "time_rollout")
    for key in FIGURE_14_3 + keys + ("time_train", "eval_acc"):
        assert key in rows[-1], key
    # the first rollout comes from the reference
    assert rows[1]["reward_kl"] == 0.0 and rows[1]["kl"] == 0.0
    assert rows[2]["beta"] < rows[1]["beta"] == 0.04  # KL 0 < target: the controller lowers beta
    assert rows[1]["ppo_steps"] == 4  # 2 epochs x 2 mini-batches of 4


@has_vllm
def test_vllm_run_logprobs_agree(tmp_path, capsys):
    out, rows = run(tmp_path, "--rollout", "vllm")
    # before the first update the sampler's log-probs are the trainer's (fp32)
    assert rows[1]["logprob_gap_max"] <= 1e-3
    assert rows[2]["logprob_gap_max"] <= 1e-3  # and after a weight sync too: no stale rollouts
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("final: acc_before=")
    for key in FIGURE_14_3:
        assert key in rows[-1], key
    del out


def test_resume_continues_exactly(tmp_path):
    """The critic, both optimizers and the adaptive beta come back from the checkpoint."""
    flags = "--rollout hf --kl_ctl adaptive --max_steps 4 --save_every 2 --eval_every 0".split()
    _, whole = run(tmp_path, *flags, name="whole")
    cut = flags[:-6] + "--max_steps 2 --save_every 2 --eval_every 0".split()
    _, first = run(tmp_path, *cut, name="cut")
    _, resumed = run(tmp_path, *flags, "--resume", name="cut")
    assert [r["step"] for r in resumed] == [0, 1, 2, 3, 4]
    for x, y in zip(without_times(resumed)[3:], without_times(whole)[3:]):
        assert x == pytest.approx(y, rel=1e-5)


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--model", "./no/such/model"], "does not exist"),
        (["--task", "no-such-task"], "addition"),
        (["--preset", "laptop"], "cpu-demo"),
        (["--loss_agg", "mean"], "token-mean"),
        (["--kl_ctl", "pid"], "adaptive"),
        (["--kl_estimator", "k3"], "clamp"),
        (["--group_size", "0"], "at least 1"),
    ],
)
def test_bad_input_is_one_line(tmp_path, flags, needle):
    with pytest.raises(SystemExit) as e:
        P.main(P.parse_config(SHORT + ["--rollout", "hf", "--output_dir", str(tmp_path), *flags]))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_vllm_missing_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(SystemExit, match="--rollout hf"):
        P.main(P.parse_config(SHORT + ["--rollout", "vllm", "--output_dir", str(tmp_path)]))
