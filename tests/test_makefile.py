"""The Makefile refuses a Python outside 3.11-3.14 (vLLM 0.33's range) before it makes the venv,
in one line that names the python it found and the fix (issue 21).

Every run is `make` in a temporary copy of the Makefile (and the requirements files it depends
on), with a fake Python 3.10: a bash script that answers the check's `-c` (and `--version`) with
3.10.12 and logs any other call, so nothing real is ever installed.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="needs GNU make")

FAKE_PYTHON_310 = """#!/usr/bin/env bash
# A Python 3.10.12, as far as the Makefile's check can tell; anything else it is asked is logged.
case "$1" in
  --version) echo "Python 3.10.12" ;;
  -c) echo "3.10.12" ;;
  *) echo "$*" >> "$(dirname "$0")/calls.log"; exit 1 ;;
esac
"""


@pytest.fixture
def repo(tmp_path):
    """A folder with the Makefile and the files its targets depend on."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    for name in ("Makefile", "requirements.txt", os.path.join("tests", "requirements.txt")):
        shutil.copy(os.path.join(ROOT, name), repo / name)
    return repo


@pytest.fixture
def python310(tmp_path):
    path = tmp_path / "bin" / "python3.10"
    path.parent.mkdir()
    path.write_text(FAKE_PYTHON_310)
    path.chmod(0o755)
    return path


def python311():
    """A real Python 3.11-3.14: python3.11 on PATH, else this interpreter (the venv's)."""
    found = shutil.which("python3.11")
    if found and subprocess.run([found, "-c", ""], capture_output=True).returncode == 0:
        return found  # (a pyenv shim of a version not selected fails to run)
    if (3, 11) <= sys.version_info[:2] <= (3, 14):
        return sys.executable
    pytest.skip("no Python 3.11-3.14 here")


def make(repo, *args):
    """`make -C repo ARGS` with none of an outer make's flags (`make test` runs this suite)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(
        ["make", "--no-print-directory", "-C", str(repo), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def lines(result):
    return (result.stdout + result.stderr).splitlines()


@pytest.mark.parametrize("dry_run", [False, True], ids=["make", "make -n"])
@pytest.mark.parametrize("goal", ["demo", "test"])
def test_python_310_is_refused_before_the_venv(repo, python310, goal, dry_run):
    result = make(repo, *(["-n"] if dry_run else []), goal, f"PYTHON={python310}")
    assert result.returncode != 0
    assert len(lines(result)) == 1, lines(result)  # the one line, nothing before or after it
    assert (
        f"{python310} is Python 3.10.12; vLLM 0.33 needs 3.11-3.14: make {goal} "
        "PYTHON=python3.12 (or install one: apt-get install python3.11 python3.11-venv)"
    ) in lines(result)[0]
    assert not (repo / ".venv").exists()
    assert not (python310.parent / "calls.log").exists(), "it was asked to make a venv"


def test_a_venv_made_by_python_310_is_refused(repo, python310):
    """An old .venv (made by another Python) is checked, not PYTHON: the fix removes it first."""
    (repo / ".venv" / "bin").mkdir(parents=True)
    (repo / ".venv" / "bin" / "python").symlink_to(python310)
    result = make(repo, "-n", "test", f"PYTHON={python311()}")
    assert result.returncode != 0
    assert len(lines(result)) == 1, lines(result)
    assert (
        ".venv/bin/python is Python 3.10.12; vLLM 0.33 needs 3.11-3.14: "
        "make clean-venv && make test PYTHON=python3.12"
    ) in lines(result)[0]


def test_a_missing_python_is_refused(repo):
    result = make(repo, "-n", "demo", "PYTHON=python3-not-here")
    assert result.returncode != 0
    assert len(lines(result)) == 1, lines(result)
    assert "python3-not-here is not a Python that runs; vLLM 0.33 needs 3.11-3.14" in result.stderr


def test_python_311_goes_on_to_make_the_venv(repo):
    """A dry run: the check passes and make would go on to make the venv and install the stack."""
    python = python311()
    result = make(repo, "-n", "test", f"PYTHON={python}")
    assert result.returncode == 0, result.stderr
    printed = result.stdout
    assert f"{python} -m venv .venv" in printed
    assert ".venv/bin/pip install" in printed and "-r tests/requirements.txt" in printed
    assert "pytest tests" in printed
    assert "vLLM 0.33 needs" not in printed + result.stderr
    assert not (repo / ".venv").exists()


def test_gpu_check_does_not_need_the_check(repo, python310):
    """gpu-check runs with no venv (torch + transformers of the host's python): not refused."""
    result = make(repo, "-n", "gpu-check", f"PYTHON={python310}")
    assert result.returncode == 0, result.stderr
    assert f"{python310} benchmarks/gpu_check.py" in result.stdout
