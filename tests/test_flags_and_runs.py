"""Issue 24: every flag within its range (preflight.RANGES), checked before anything loads; a run
folder holds one run (a second start there is refused, its files untouched); --resume continues
only that run, with its settings; offline, a hub task fails at once."""

import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import types

import pytest
from helpers import ROOT, TINY_MODEL, run_script

import nano_grpo as G
import nano_ppo as P
import preflight
import rewards

SCRIPTS = {"grpo": G, "ppo": P}
needs_tiny = pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")


# ---- every numeric flag has a range, and a value outside it is one line ----------------------
def numeric_fields(module):
    return [f for f in dataclasses.fields(module.Config) if f.type in (int, float)]


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_numeric_field_has_a_range(name):
    """A new int or float field without an entry in preflight.RANGES fails here."""
    missing = [f.name for f in numeric_fields(SCRIPTS[name]) if f.name not in preflight.RANGES]
    assert missing == [], f"add these to preflight.RANGES: {missing}"


def test_the_tables_name_only_fields_that_exist():
    fields = {f.name for m in SCRIPTS.values() for f in dataclasses.fields(m.Config)}
    assert set(preflight.RANGES) <= fields, set(preflight.RANGES) - fields
    assert set(preflight.MAY_CHANGE_ON_RESUME) <= fields, (
        set(preflight.MAY_CHANGE_ON_RESUME) - fields
    )


@pytest.mark.parametrize(
    "spec,inside,outside",
    [
        ("[0, inf)", [0, 0.5, 1e9], [-1e-9, -1]),
        ("(0, inf)", [1e-9, 3], [0, -1]),
        ("[0, 1)", [0, 0.999], [1, -0.1, 1.5]),
        ("(0, 1]", [1, 0.3], [0, 1.5]),
        ("(-inf, 0]", [0, -3], [0.1]),
        ("0 or [3, 12]", [0, 3, 7.5, 12], [1, -1, 2.9, 12.1]),
        ("-1 or [0, inf)", [-1, 0, 5], [-2, -0.5]),
    ],
)
def test_in_range(spec, inside, outside):
    assert all(preflight.in_range(v, spec) for v in inside)
    assert not any(preflight.in_range(v, spec) for v in outside)


def test_range_text():
    assert preflight.range_text("[0, inf)") == ">= 0"
    assert preflight.range_text("(0, inf)") == "> 0"
    assert preflight.range_text("(-inf, 0]") == "<= 0"
    assert preflight.range_text("[0, 1)") == "in [0, 1)"
    assert preflight.range_text("0 or [3, 12]") == "0 or in [3, 12]"


def outside_values(spec: str, kind: type) -> list:
    """Values just outside the spec's parts: below, between and above them (ints for an int)."""
    edges = []
    for part in spec.split(" or "):
        edges += [float(x) for x in part[1:-1].split(",")] if part[0] in "[(" else [float(part)]
    finite = sorted({e for e in edges if math.isfinite(e)})
    step = 1 if kind is int else 1e-3
    candidates = [e + d for e in finite for d in (-step, 0, step)]
    candidates += [(a + b) / 2 for a, b in zip(finite, finite[1:])]
    values = {kind(v) for v in candidates if kind is float or v == int(v)}
    return sorted(v for v in values if not preflight.in_range(v, spec))


CASES = [
    (name, f.name, value)
    for name, module in SCRIPTS.items()
    for f in numeric_fields(module)
    if f.name in preflight.RANGES  # (test_every_numeric_field_has_a_range fails for the others)
    for value in outside_values(preflight.RANGES[f.name][0], f.type)
    + (["nan", "inf", "-inf"] if f.type is float else [])
]


def test_each_field_is_tried_below_and_above_where_it_has_bounds():
    for name, module in SCRIPTS.items():
        for f in numeric_fields(module):
            spec = preflight.RANGES[f.name][0]
            edges = [float(x) for x in re.findall(r"-?inf|-?[\d.]+", spec)]
            low, high = min(edges), max(edges)
            tried = [v for n, k, v in CASES if n == name and k == f.name and not isinstance(v, str)]
            assert not math.isfinite(low) or min(tried) < low, (f.name, tried)
            assert not math.isfinite(high) or max(tried) >= high, (f.name, tried)


@pytest.mark.parametrize("name,flag,value", CASES, ids=[f"{n}-{k}={v}" for n, k, v in CASES])
def test_a_value_outside_its_range_is_one_line(tmp_path, capsys, name, flag, value):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].parse_config([f"--{flag}={value}", "--output_dir", str(out)])
    message = str(e.value.code)
    assert message.startswith(f"error: --{flag} ") and "\n" not in message, message
    assert not out.exists()
    assert capsys.readouterr().out == ""  # refused before the preset line, too


@pytest.mark.parametrize("name", SCRIPTS)
def test_every_preset_is_within_the_ranges(name, capsys):
    module = SCRIPTS[name]
    for preset in module.PRESETS:
        module.parse_config(["--preset", preset])


@pytest.mark.parametrize(
    "name,flags,needle",
    [
        ("grpo", ["--eval_size", "801"], "task addition holds 800 held-out questions"),
        ("grpo", ["--task", "parity", "--eval_size", "2000"], "use --eval_size 1000 or fewer"),
        ("grpo", ["--overlong_buffer", "32"], "--max_new_tokens 32"),
        ("ppo", ["--num_mini_batches", "65"], "use --num_mini_batches 64 or fewer"),
        ("ppo", ["--prompts_per_step", "4", "--group_size", "2", "--num_mini_batches", "9"], "8"),
        ("grpo", ["--group_size", "1"], "G >= 2"),
    ],
)
def test_combinations_that_cannot_work_are_one_line(tmp_path, name, flags, needle):
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].parse_config(flags + ["--output_dir", str(tmp_path / "out")])
    assert str(e.value.code).startswith("error: --") and needle in str(e.value.code)
    assert "\n" not in str(e.value.code) and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "script,flags,first",
    [
        (
            "nano_grpo.py",
            "--beta -0.5",
            "error: --beta -0.5: must be >= 0 (0 turns the KL term off)",
        ),
        ("nano_grpo.py", "--epsilon 1.5", "error: --epsilon 1.5: must be in [0, 1)"),
        ("nano_ppo.py", "--ppo_epochs 0", "error: --ppo_epochs 0: must be >= 1"),
        ("nano_ppo.py", "--num_mini_batches 0", "error: --num_mini_batches 0: must be >= 1"),
    ],
)
def test_end_to_end_a_bad_flag_is_one_line_and_exit_1(tmp_path, script, flags, first):
    out = tmp_path / "out"
    cmd = [sys.executable, script, *flags.split(), "--output_dir", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.splitlines() == [proc.stderr.strip()] and proc.stderr.startswith(first)
    assert "Traceback" not in proc.stderr + proc.stdout and not out.exists()


# ---- one run per folder; --resume continues that run only --------------------------------------
TINY_RUN = "--rollout hf --max_steps 2 --save_every 1 --eval_every 0 --eval_size 8"
TINY_RUN += " --prompts_per_step 2 --group_size 2"


def snapshot(folder) -> dict:
    """Every file under folder: path -> bytes."""
    files = {}
    for root, _, names in os.walk(folder):
        for n in names:
            path = os.path.join(root, n)
            files[os.path.relpath(path, folder)] = open(path, "rb").read()
    return files


def refused(module, flags, folder) -> str:
    with pytest.raises(SystemExit) as e:
        run_script(module, flags, folder)
    message = str(e.value.code)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


@needs_tiny
def test_a_second_run_in_a_folder_is_refused_and_the_first_survives(tmp_path):
    run = tmp_path / "run"
    _, rows = run_script(G, TINY_RUN.split(), run)
    assert [r["step"] for r in rows] == [0, 1, 2]
    saved = json.load(open(run / "config.json"))
    assert saved["script"] == "nano_grpo.py" and saved["config"]["preset"] == "cpu-demo"
    assert set(saved["config"]) == {f.name for f in dataclasses.fields(G.Config)}
    assert saved["versions"]["torch"] and "transformers" in saved["versions"]
    before = snapshot(run)
    assert "checkpoint-2/trainer_state.pt" in before and "metrics.jsonl" in before

    # the README's command twice: refused, naming both ways out
    message = refused(G, TINY_RUN.split(), run)
    assert "holds a run already" in message and "--resume" in message and "--output_dir" in message
    assert refused(G, TINY_RUN.split() + ["--max_steps", "5"], run) == message
    # --resume under another preset, another seed, another script: refused, naming the keys
    message = refused(G, TINY_RUN.split() + ["--resume", "--preset", "cpu-r1-zero"], run)
    assert message.startswith("error: --resume: this run was started with other settings: ")
    for key in ("preset: cpu-demo -> cpu-r1-zero", "task: addition -> parity", "model: "):
        assert key in message, message
    assert "seed: 0 -> 7" in refused(G, TINY_RUN.split() + ["--resume", "--seed", "7"], run)
    assert "a run of nano_grpo.py" in refused(P, TINY_RUN.split() + ["--resume"], run)
    assert snapshot(run) == before  # byte for byte


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    message = refused(G, TINY_RUN.split() + ["--resume"], tmp_path / "empty")
    assert "no checkpoint" in message and "drop --resume" in message
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "metrics.jsonl").write_text('{"step": 0}\n')  # died before a checkpoint
    message = refused(P, TINY_RUN.split() + ["--resume"], tmp_path / "cut")
    assert "no checkpoint" in message and "another --output_dir" in message
    assert os.listdir(tmp_path / "cut") == ["metrics.jsonl"]


def test_checkpoint_rotation_touches_only_checkpoints():
    assert preflight.is_checkpoint("checkpoint-12") and preflight.is_checkpoint("checkpoint-3.tmp")
    for name in ("checkpoint-best", "checkpoints", "notes-checkpoint-1", "config.json"):
        assert not preflight.is_checkpoint(name), name


@needs_tiny
def test_a_kill_then_resume_logs_every_step_once(tmp_path, capsys):
    """SIGKILL at a random moment after the first checkpoint, a log row cut short by it, then
    --resume: metrics.jsonl holds every step exactly once, in order."""
    run, steps = tmp_path / "run", 20
    flags = TINY_RUN.replace("--max_steps 2", f"--max_steps {steps}").split()
    cmd = [sys.executable, "nano_grpo.py", *flags, "--save_every", "2", "--output_dir", str(run)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 120
    while not (run / "latest").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(random.uniform(0, 1))
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]  # killed mid-run
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 99, "rew')  # a row the kill cut in half
    _, rows = run_script(G, flags + ["--save_every", "2", "--resume"], run)
    resumed = re.search(r"resumed from .* at step (\d+)", capsys.readouterr().out)
    assert 2 <= int(resumed.group(1)) < steps
    assert [r["step"] for r in rows] == list(range(steps + 1))


# ---- offline: one quick try at the hub, then the line -------------------------------------------
def test_an_unreachable_hub_is_said_at_once(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    tries = []

    def no_network(address, timeout):
        tries.append((address, timeout))
        raise OSError("Name or service not known")

    def load_dataset(repo, config=None, split=None):
        assert os.environ["HF_HUB_OFFLINE"] == "1"  # the cache only: no retry loop
        raise ConnectionError("offline and not cached")

    monkeypatch.setattr(rewards.socket, "create_connection", no_network)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    start = time.time()
    with pytest.raises(rewards.TaskError) as e:
        rewards.load_task("gsm8k", "train")
    assert time.time() - start < 5 and len(tries) == 1
    assert tries[0] == (("huggingface.co", 443), rewards.HUB_TRY_SECONDS)
    assert "unreachable" in str(e.value) and "--data_path" in str(e.value)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy:3128")  # behind a proxy: no direct try
    assert rewards._hub_reachable() and len(tries) == 1


def test_make_demo_starts_a_new_run_folder_each_time():
    """`make demo` twice: each run gets its own folder (a second start in one would be refused)."""
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    demo = makefile.split("\ndemo:")[1].split("\n\n")[0]
    assert "nano_grpo.py --output_dir runs/demo-$$(date +%Y%m%d-%H%M%S)" in demo
