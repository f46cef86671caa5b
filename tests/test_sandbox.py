"""code_reward's sandbox: right answers score, hostile programs score 0 (or do nothing), in time,
and nothing is left behind: no temporary directory, no process, no file outside the sandbox.

Every hostile program here is bounded (at most 8 processes, 2 GB, 30 s of sleep) so that even a
broken sandbox could not harm the machine running the tests.
"""

import glob
import os
import sys
import tempfile
import time
import uuid

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards  # noqa: E402
from rewards import code_reward  # noqa: E402

TIMEOUT = 2.0  # for programs that must be stopped: every test of it waits this long
# For programs whose score needs them to run to their end: they end by themselves in ~0.1 s of
# CPU time, so a generous wall-clock limit costs nothing, and a busy or slow machine (where the
# sandbox's Python may take seconds to start) cannot turn a right program into a 0.
ENOUGH = 30.0
ROOT = os.geteuid() == 0


def _sandbox_dirs() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "nano_rlvr_sandbox_*")))


def _alive_in_session(sid: int) -> list[int]:
    """Processes (not zombies) in session `sid`: the sandbox child and anything it started."""
    alive = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
                if os.getsid(int(entry)) == sid and state != "Z":
                    alive.append(int(entry))
            except (OSError, IndexError):
                pass  # gone meanwhile
    return alive


@pytest.fixture
def run(monkeypatch):
    """code_reward on a program, checking the time limit and that nothing is left behind."""
    children = []
    real_popen = rewards.subprocess.Popen

    class RecordingPopen(real_popen):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            children.append(self.pid)

    monkeypatch.setattr(rewards.subprocess, "Popen", RecordingPopen)

    def run_program(code: str, tests: list[str], timeout: float = TIMEOUT) -> float:
        before = _sandbox_dirs()
        for attempt in range(2):  # timed twice at most: a loaded 2-core machine can stall a process
            start = time.monotonic()
            completion = f"<think>...</think><answer>\n```python\n{code}\n```\n</answer>"
            score = code_reward(completion, tests, timeout=timeout)
            if time.monotonic() - start < timeout + 1.0:
                break
        else:
            raise AssertionError(f"code_reward took over timeout + 1 s = {timeout + 1} s, twice")
        assert _sandbox_dirs() <= before  # its temporary directory is gone
        for pid in children:
            assert _alive_in_session(pid) == []  # the child and all it started are dead
        return score

    return run_program


# ---- right and partly right programs -------------------------------------------------------------
SIMILAR = "def similar_elements(a, b):\n    return tuple(sorted(set(a) & set(b)))\n"
SIMILAR_TESTS = [
    "assert similar_elements((3, 4, 5, 6), (5, 7, 4, 10)) == (4, 5)",
    "assert similar_elements((1, 2, 3, 4), (5, 4, 3, 7)) == (3, 4)",
    "assert similar_elements((11, 12, 14, 13), (17, 15, 14, 13)) == (13, 14)",
]


def test_right_program_scores_one(run):
    assert run(SIMILAR, SIMILAR_TESTS, timeout=ENOUGH) == 1.0


def test_partly_right_program_scores_the_fraction_passed(run):
    almost = (
        "def similar_elements(a, b):\n"
        "    return tuple(sorted(set(a) & set(b)))[:2] if 3 in a else ()\n"
    )
    assert run(almost, SIMILAR_TESTS, timeout=ENOUGH) == pytest.approx(2 / 3)


def test_program_may_use_the_standard_library_and_its_own_directory(run):
    code = (
        "import math, re, heapq, collections, itertools, functools, bisect\n"
        "def f():\n    open('notes.txt', 'w').write('ok')\n"
        "    return open('notes.txt').read() + str(math.gcd(12, 18))"
        " + str(heapq.nsmallest(1, [3, 1]))\n"
    )
    assert run(code, ["assert f() == 'ok6[1]'"], timeout=ENOUGH) == 1.0


def test_last_python_block_is_used():
    first = (
        "```python\ndef f():\n    return 1\n```\nno wait:\n```python\ndef f():\n    return 2\n```"
    )
    assert code_reward(first, ["assert f() == 2"]) == 1.0
    assert code_reward("```py\ndef f():\n    return 2\n```", ["assert f() == 2"]) == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "def f():\n    return 2",  # no code block
        "```python\ndef f(:\n```",  # syntax error
        "```python\nraise ValueError('at import')\ndef f():\n    return 2\n```",
        "```python\nimport sys\nsys.exit(0)\n```",
        "```python\nimport os\nos._exit(0)\n```",
        "```javascript\nfunction f() { return 2 }\n```",
    ],
)
def test_broken_programs_score_zero(completion):
    assert code_reward(completion, ["assert f() == 2"]) == 0.0
    # no tests: nothing passed
    assert code_reward("```python\ndef f():\n    return 2\n```", []) == 0.0


def test_printing_cannot_fake_a_pass(run):
    code = "import sys\nprint('1\\n' * 10)\nsys.stderr.write('1\\n' * 10)\ndef f():\n    return 0\n"
    assert run(code, ["assert f() == 1"] * 3) == 0.0


def test_patching_builtins_cannot_skip_the_tests(run):
    code = (
        "import builtins\nbuiltins.exec = lambda *a, **k: None\n"
        "builtins.compile = lambda *a, **k: None\n"
    )
    assert run(code, ["assert False"]) == 0.0


# ---- hostile programs ----------------------------------------------------------------------------
def test_infinite_loop(run):
    assert run("while True:\n    pass\n", ["assert True"]) == 0.0


def test_sleeping_forever(run):
    assert run("import time\ntime.sleep(30)\n", ["assert True"]) == 0.0


def test_timeout_keeps_the_tests_that_passed_before_it(run):
    # the first two pass ~0.1 s of CPU time after the start: within TIMEOUT unless the machine
    # is some 20 times oversubscribed (the third runs until the time limit, as it must)
    code = "def f(x):\n    while x == 3:\n        pass\n    return x\n"
    tests = ["assert f(1) == 1", "assert f(2) == 2", "assert f(3) == 3"]
    assert run(code, tests) == pytest.approx(2 / 3)


# Each program's f() returns True only if it managed to start another process (or thread).
SPAWNERS = {
    "os.fork": (
        "import os, time\ndef f():\n    for _ in range(3):\n        if os.fork() == 0:\n"
        "            time.sleep(30)\n            os._exit(0)\n    return True\n"
    ),
    "fork bomb": (  # 8 at most
        "import os\ndef f():\n    for _ in range(3):\n        os.fork()\n    return True\n"
    ),
    "posix.fork re-imported": (
        "import sys, time\ndef f():\n    del sys.modules['posix']\n    import posix\n"
        "    if posix.fork() == 0:\n        time.sleep(30)\n        posix._exit(0)\n"
        "    return True\n"
    ),
    "os.system": "import os\ndef f():\n    return os.system('sleep 30 &') == 0\n",
    "os.popen": "import os\ndef f():\n    return os.popen('echo hi').read() == 'hi\\n'\n",
    "subprocess": (
        "import subprocess\ndef f():\n    subprocess.Popen(['sleep', '30'])\n    return True\n"
    ),
    "subprocess re-imported": (
        "import sys\ndef f():\n    sys.modules.pop('subprocess', None)\n"
        "    sys.modules.pop('_posixsubprocess', None)\n    import subprocess\n"
        "    subprocess.Popen(['sleep', '30'])\n    return True\n"
    ),
    "multiprocessing": (
        "import multiprocessing, time\ndef f():\n"
        "    multiprocessing.Process(target=time.sleep, args=(30,)).start()\n    return True\n"
    ),
    "posix_spawn": (
        "import os\ndef f():\n    os.posix_spawn('/bin/sleep', ['sleep', '30'], {})\n"
        "    return True\n"
    ),
    "execv": "import os\ndef f():\n    os.execv('/bin/true', ['true'])\n",
    "ctypes fork": (
        "import sys\ndef f():\n    sys.modules.pop('ctypes', None)\n    import ctypes\n"
        "    return ctypes.CDLL(None).fork() >= 0\n"
    ),
    "thread": (
        "import threading, time\ndef f():\n"
        "    threading.Thread(target=time.sleep, args=(30,)).start()\n    return True\n"
    ),
}


@pytest.mark.parametrize("name", list(SPAWNERS))
def test_no_new_process_survives(run, name):
    assert run(SPAWNERS[name], ["assert f()"]) == 0.0


@pytest.mark.skipif(not ROOT, reason="RLIMIT_NPROC binds for ordinary users anyway")
def test_root_child_runs_as_nobody(run):
    """Started as root, the child drops to 'nobody', so RLIMIT_NPROC binds and /proc/*/environ is
    closed."""
    code = "import os\ndef f():\n    return os.getuid()\n"
    assert run(code, ["assert f() == 65534"], timeout=ENOUGH) == 1.0


@pytest.mark.parametrize("size", ["2 * 10**9", "10**11"])
def test_huge_allocation(run, size):
    code = f"def f():\n    block = bytearray({size})\n    return len(block) > 0\n"
    assert run(code, ["assert f()"]) == 0.0


def test_writing_a_huge_file_stops(run):
    code = (
        "def f():\n    with open('big', 'wb') as out:\n        for _ in range(64):\n"
        "            out.write(b'x' * (1 << 20))\n    return True\n"
    )
    assert run(code, ["assert f()"]) == 0.0  # RLIMIT_FSIZE (16 MiB): the write fails


def test_writing_outside_the_sandbox(run, tmp_path):
    markers = [f"{tempfile.gettempdir()}/nano_rlvr_marker_{uuid.uuid4().hex}_{i}" for i in range(5)]
    markers.append(str(tmp_path / "marker"))  # a root-only directory when the tests run as root
    code = f"""import os, pathlib, shutil
MARKERS = {markers!r}
def f():
    open('source.txt', 'w').write('x')  # inside its own directory: allowed
    written = 0
    for path in MARKERS:
        for write in (lambda p: open(p, 'w').write('x'), lambda p: pathlib.Path(p).write_text('x'),
                      lambda p: os.close(os.open(p, os.O_CREAT | os.O_WRONLY)),
                      lambda p: shutil.copy('source.txt', p), lambda p: os.system('touch ' + p)):
            try:
                write(path)
                written += 1
            except Exception:
                pass
    return written
"""
    # it ran, and wrote nothing outside
    assert run(code, ["assert f() > 0", "assert f() == 0"], timeout=ENOUGH) == 0.5
    assert not any(os.path.exists(m) for m in markers)


@pytest.mark.skipif(not ROOT, reason="an ordinary user's child may write where that user may")
def test_a_guard_bypass_still_cannot_write_to_root_owned_places(run, tmp_path):
    """Getting around the Python-level guard (the real FileIO class via __subclasses__) leaves only
    world-writable directories such as /tmp: a root-owned directory stays closed."""
    marker = tmp_path / "marker"
    code = f"""import _io
def f():
    real = [c for c in _io._RawIOBase.__subclasses__() if c.__name__ == 'FileIO'][0]
    real({str(marker)!r}, 'w').write(b'x')
    return True
"""
    assert run(code, ["assert f()"]) == 0.0
    assert not marker.exists()


def test_parent_environment_is_invisible(run, monkeypatch):
    monkeypatch.setenv("NANO_RLVR_SECRET", "hunter2")
    code = """import os, _io
def f():
    return 'NANO_RLVR_SECRET' in os.environ or 'hunter2' in str(os.environ)
def g():
    return len(open(f'/proc/{os.getppid()}/environ', 'rb').read()) > 0
def h():  # around the open() guard, as root: still unreadable for 'nobody'
    real = [c for c in _io._RawIOBase.__subclasses__() if c.__name__ == 'FileIO'][0]
    return len(real(f'/proc/{os.getppid()}/environ').read()) > 0
"""
    assert run(code, ["assert f()", "assert g()"]) == 0.0
    assert run(code, ["assert not f()"], timeout=ENOUGH) == 1.0  # (the program did run)
    if ROOT:
        assert run(code, ["assert h()"]) == 0.0


def test_killing_the_parent_is_refused(run):
    code = (
        "import os, signal\ndef f():\n    os.kill(os.getppid(), signal.SIGTERM)\n    return True\n"
    )
    assert run(code, ["assert f()"]) == 0.0
