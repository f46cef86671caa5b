"""The notebooks run top to bottom without an error, and every exercise's check passes on the
reference solution (notebooks/exercise_solutions.py) and fails on the notebook's own blank.

Each notebook is executed from an in-memory copy (the committed file, with its outputs, is never
rewritten), in notebooks/ as its working directory, by a kernel that runs THIS interpreter
(sys.executable): the test writes its own kernel spec, so a fresh venv needs no manual
`ipykernel install`. Figures use matplotlib's Agg backend (nothing is rendered into the copy).
A notebook in NOT_RUN is not executed (each says why), only validated, and its commands checked.
"""

import dataclasses
import json
import os
import re
import resource
import shlex
import subprocess
import sys
import time

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NB_DIR = os.path.join(ROOT, "notebooks")
KERNEL = "nano-rlvr-test"
RUN_NOTEBOOKS = [
    "01_policy_gradient_to_grpo.ipynb",
    "02_reading_a_training_run.ipynb",
    "03_chapter_comparisons.ipynb",
    "case_studies.ipynb",
]
NOT_RUN = {  # validated (test_notebook_is_valid), never executed here, each for its reason
    "colab_gpu.ipynb": "it needs an NVIDIA GPU and the network (git clone, pip install vLLM, the "
    "model and GSM8K from the Hub); its commands are checked instead (test_gpu_notebook_*)",
}
GPU_NOTEBOOK = os.path.join(NB_DIR, "colab_gpu.ipynb")
# These two only plot benchmarks/results/ (made by benchmarks/run_studies.py): fast, and they must
# run even where a study has not been run yet (NANO_RLVR_RESULTS points them at another results
# folder).
STUDY_NOTEBOOKS = ["03_chapter_comparisons.ipynb", "case_studies.ipynb"]
# Bounds in CPU time, which a busy machine does not change: plotting takes ~3 s of it here,
# re-running a study would take minutes.
STUDY_NOTEBOOK_MAX_CPU_S = 60
EXERCISES = os.path.join(NB_DIR, "exercises.ipynb")
# Wall-clock, a guard against a hung kernel only (as the tests' own 600 s): the longest cell takes
# ~10 s here, and a 3x slower processor on a busy machine can take ten times that.
CELL_TIMEOUT_S = 600

if NB_DIR not in sys.path:
    sys.path.insert(0, NB_DIR)


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec that starts `sys.executable -m ipykernel_launcher`, found through
    JUPYTER_PATH."""
    jupyter_path = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_path / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "nano-rlvr tests",
                "language": "python",
                "env": {"MPLBACKEND": "Agg", "PYTHONWARNINGS": "ignore::UserWarning:matplotlib"},
            }
        )
    )
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join([str(jupyter_path)] + ([old] if old else []))
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def cpu_seconds():
    """CPU time of this process and of its children that have ended (a notebook's kernel, once
    NotebookClient has shut it down and waited for it)."""
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def execute(nb, kernel_name):
    """Run every cell of nb (in place, in memory); raises CellExecutionError on the first error.
    Returns the wall-clock seconds it took and the CPU seconds (its kernel's and ours)."""
    start, cpu = time.time(), cpu_seconds()
    NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": NB_DIR}},
    ).execute()
    return time.time() - start, cpu_seconds() - cpu


def text_of(cell) -> str:
    """Everything a code cell printed (stdout and text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def read(path):
    return nbformat.read(path, as_version=4)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", RUN_NOTEBOOKS)
def test_notebook_runs(name, kernel_name):
    nb = read(os.path.join(NB_DIR, name))
    seconds, cpu = execute(nb, kernel_name)
    print(f"{name}: {seconds:.1f} s, {cpu:.1f} s of CPU time")
    assert all(out.get("output_type") != "error" for c in nb.cells for out in c.get("outputs", []))
    if name in STUDY_NOTEBOOKS:  # they only read files
        assert 0 < cpu < STUDY_NOTEBOOK_MAX_CPU_S, f"{name} took {cpu:.0f} s of CPU time"


@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", STUDY_NOTEBOOKS)
def test_study_notebook_runs_without_results(name, kernel_name, tmp_path, monkeypatch):
    """Before benchmarks/run_studies.py has run (an empty results folder), each study says so."""
    monkeypatch.setenv("NANO_RLVR_RESULTS", str(tmp_path))  # the kernel inherits this environment
    nb = read(os.path.join(NB_DIR, name))
    seconds, _ = execute(nb, kernel_name)
    print(f"{name} (no results): {seconds:.1f} s")
    printed = "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert str(tmp_path) in printed, "the notebook did not read NANO_RLVR_RESULTS"
    assert "not run yet" in printed
    assert not any(
        "image/png" in out.get("data", {}) for c in nb.cells for out in c.get("outputs", [])
    )


# ------------------------------------------------------------------------------------------------
# exercises.ipynb: cells tagged "exercise" hold one function with a blank; the check cell after
# each calls report(check_<name>, <name>), which prints PASSED or NOT YET.
# ------------------------------------------------------------------------------------------------
def exercise_cells(nb):
    """{function name: cell} for the cells tagged 'exercise'."""
    cells = {}
    for cell in nb.cells:
        if "exercise" in cell.get("metadata", {}).get("tags", []):
            name = re.search(r"^def (\w+)\(", cell.source, re.M).group(1)
            cells[name] = cell
    return cells


EXERCISE_NAMES = list(exercise_cells(read(EXERCISES)))


def test_exercises_are_complete():
    import exercise_checks
    import exercise_solutions

    assert len(EXERCISE_NAMES) >= 6, EXERCISE_NAMES
    nb = read(EXERCISES)
    sources = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for name in EXERCISE_NAMES:
        assert hasattr(exercise_solutions, name), f"exercise_solutions.py has no {name}"
        assert hasattr(exercise_checks, f"check_{name}"), f"exercise_checks.py has no check_{name}"
        assert f"report(check_{name}, {name})" in sources, f"the notebook never checks {name}"


def blank_function(name):
    """The notebook's own, unfilled function: its first code cell, then the exercise cell,
    exec'ed."""
    nb = read(EXERCISES)
    setup = next(c for c in nb.cells if c.cell_type == "code")
    namespace = {}
    cwd = os.getcwd()
    os.chdir(NB_DIR)  # the setup cell finds the repository from the notebook's folder
    try:
        exec(compile(setup.source, "setup-cell", "exec"), namespace)
        exec(compile(exercise_cells(nb)[name].source, f"exercise-{name}", "exec"), namespace)
    finally:
        os.chdir(cwd)
    return namespace[name]


@pytest.mark.parametrize("name", EXERCISE_NAMES)
def test_check_passes_on_solution(name):
    import exercise_checks
    import exercise_solutions

    getattr(exercise_checks, f"check_{name}")(getattr(exercise_solutions, name))


@pytest.mark.parametrize("name", EXERCISE_NAMES)
def test_check_fails_on_blank(name):
    import exercise_checks

    with pytest.raises(Exception):
        getattr(exercise_checks, f"check_{name}")(blank_function(name))


@pytest.mark.parametrize("name", EXERCISE_NAMES)
def test_check_fails_on_a_plausible_mistake(name):
    """A check must catch a real mistake too, not only a blank: the solution with one thing
    wrong."""
    import exercise_checks
    import exercise_solutions

    right = getattr(exercise_solutions, name)
    mistakes = {
        "group_advantage": lambda r, g: (
            r.view(-1, g).sub(r.view(-1, g).mean(1, keepdim=True)).view(-1)
        ),  # no std
        "kl_estimate": lambda lp, rl, kind: right(
            rl, lp, kind
        ),  # KL(pi_ref || pi): arguments swapped
        "dr_grpo_weights": lambda m, t: (
            m / m.sum(1, keepdim=True).clamp(min=1) / m.shape[0]
        ),  # per-length again
        "length_reward": lambda lengths, correct: right(
            lengths, [True] * len(lengths)
        ),  # bonus for short AND wrong
        "rloo_advantage": lambda r, g: exercise_solutions.group_advantage(
            r, g
        ),  # z-score, not leave-one-out
        "gae": lambda r, v, gamma, lam: right(r, v, gamma, 1.0),  # ignores lambda
        "subtraction_reward": lambda c, ex: (
            1.0 if re.search(rf"<answer>\s*{ex['a'] - ex['b']}\s*</answer>", c) else 0.0
        ),
        # ^ the FIRST matching tag anywhere, not the last answer
    }
    assert name in mistakes, f"add a plausible mistake for {name}"
    with pytest.raises(Exception):
        getattr(exercise_checks, f"check_{name}")(mistakes[name])


def check_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code" and "report(check_" in c.source]


@pytest.mark.timeout(600)
def test_exercises_notebook_runs_with_blanks(kernel_name):
    """As handed out: it runs to the end; every check says NOT YET; the training cell waits."""
    nb = read(EXERCISES)
    seconds, _ = execute(nb, kernel_name)
    print(f"exercises.ipynb (blanks): {seconds:.1f} s")
    for cell in check_cells(nb):
        assert "NOT YET" in text_of(cell) and "PASSED" not in text_of(cell), cell.source


@pytest.mark.timeout(600)
def test_exercises_notebook_runs_with_solutions(kernel_name):
    """With each blank replaced by the reference solution: every check PASSES and the tiny run
    trains."""
    nb = read(EXERCISES)
    for name, cell in exercise_cells(nb).items():
        cell.source = f"from exercise_solutions import {name}"
    seconds, _ = execute(nb, kernel_name)
    print(f"exercises.ipynb (solutions): {seconds:.1f} s")
    for cell in check_cells(nb):
        assert "PASSED" in text_of(cell) and "NOT YET" not in text_of(cell), (
            cell.source,
            text_of(cell),
        )
    printed = "".join(text_of(c) for c in nb.cells if c.cell_type == "code")
    assert "final: acc_before=" in printed, "the training run on the new task did not finish"


@pytest.mark.parametrize("name", RUN_NOTEBOOKS + ["exercises.ipynb"])
def test_committed_notebook_is_executed_and_small(name):
    """Committed with outputs (they read well on GitHub), none an error, every figure small."""
    nb = read(os.path.join(NB_DIR, name))
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), (
        "run the notebook once and commit it with outputs"
    )
    for cell in code:
        for out in cell.get("outputs", []):
            assert out.get("output_type") != "error", cell.source
            png = out.get("data", {}).get("image/png", "")
            assert len(png) < 200_000, f"a figure of {len(png) // 1000} kB (base64): lower its dpi"


def test_notebooks_cite_real_labels_and_show_the_theory_ones():
    """Labels in the notebooks' text are the chapter's; the three with no code line of their own
    ([J], [RETURN], [TRPO]: EQUATIONS.md says "the notebooks show them") appear in notebook 01."""
    equations = os.path.join(ROOT, "..", "shared", "chapter14", "EQUATIONS.md")
    if not os.path.exists(equations):
        pytest.skip("../shared/chapter14/EQUATIONS.md not beside the repo")
    chapter = set(re.findall(r"\*\*\[([A-Z0-9-]+)\]\*\*", open(equations).read()))
    for name in RUN_NOTEBOOKS + ["exercises.ipynb"]:
        text = "\n".join(
            c.source for c in read(os.path.join(NB_DIR, name)).cells if c.cell_type == "markdown"
        )
        cited = set(re.findall(r"\[([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*)\]", text))
        assert cited <= chapter, (
            f"{name} cites labels the chapter does not have: {sorted(cited - chapter)}"
        )
        if name == RUN_NOTEBOOKS[0]:
            assert {"J", "RETURN", "TRPO"} <= cited


def test_every_notebook_is_run_or_says_why_not():
    names = {n for n in os.listdir(NB_DIR) if n.endswith(".ipynb")}
    assert names == set(RUN_NOTEBOOKS) | {"exercises.ipynb"} | set(NOT_RUN)


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(NB_DIR) if n.endswith(".ipynb")))
def test_notebook_is_valid(name):
    nbformat.validate(read(os.path.join(NB_DIR, name)))


# ------------------------------------------------------------------------------------------------
# colab_gpu.ipynb (NOT_RUN): committed clean, and its command lines are ones the scripts take.
# ------------------------------------------------------------------------------------------------
def gpu_notebook_commands():
    """The flags of every `!python nano_grpo.py ...` in its code cells (comments included)."""
    code = "\n".join(c.source for c in read(GPU_NOTEBOOK).cells if c.cell_type == "code")
    return [shlex.split(m) for m in re.findall(r"!python nano_grpo\.py([^\n#]*)", code)]


def test_gpu_notebook_is_committed_clean():
    for cell in read(GPU_NOTEBOOK).cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, cell.source


def test_gpu_notebook_uses_only_flags_that_exist():
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import nano_grpo

    fields = {f.name: f.type for f in dataclasses.fields(nano_grpo.Config)}
    commands = gpu_notebook_commands()
    assert len(commands) >= 4, commands  # the dry runs and the run
    for args in commands:
        i = 0
        while i < len(args):
            flag = args[i].removeprefix("--")
            assert args[i].startswith("--") and (flag in fields or flag == "bf16"), (args, args[i])
            value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else None
            kind = fields.get(flag, bool)
            if kind is bool:
                assert value in (None, "true", "false"), (args, flag, value)
            else:
                assert value is not None, f"--{flag} needs a value: {args}"
                kind(value)  # int("1.5") or float("x") raise
            if flag == "preset":
                assert value in nano_grpo.PRESETS, value
            i += 1 if value is None else 2


def test_gpu_notebook_installs_what_the_makefile_does():
    makefile = open(os.path.join(ROOT, "Makefile")).read()
    pin = re.search(r'pip install ("vllm==[\d.]+" -r requirements.txt)', makefile).group(1)
    code = "\n".join(c.source for c in read(GPU_NOTEBOOK).cells if c.cell_type == "code")
    assert f"!pip install {pin}" in code


def test_gpu_notebook_simulated_dry_runs_fit():
    """Its simulated cards (--gpu_capability) need no GPU: each plan fits, as the notebook says."""
    simulated = [a for a in gpu_notebook_commands() if "--gpu_capability" in a]
    assert simulated and all("--dry_run" in a for a in simulated)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for args in simulated:
        cmd = [sys.executable, "nano_grpo.py", *args]
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, (args, out.stdout[-2000:], out.stderr[-2000:])
        assert "memory plan: peak" in out.stdout, (args, out.stdout[-2000:])
        if args[args.index("--gpu_capability") + 1] == "7.5":  # a T4: no bf16
            assert "precision: fp16" in out.stdout, out.stdout[-2000:]
