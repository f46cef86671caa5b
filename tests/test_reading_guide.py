"""The reading guide stays true: every equation label of the chapter is in the code, each script
lists its labels in chapter order (its chapter map) and cites each one where it is implemented,
and every function the README's guide names exists."""

import importlib
import os
import re

import pytest
from helpers import ROOT

EQUATIONS = os.path.join(ROOT, "..", "shared", "chapter14", "EQUATIONS.md")
THEORY_ONLY = {"J", "RETURN", "TRPO"}  # background with no line of code of their own
SCRIPTS = ["nano_grpo.py", "nano_ppo.py", "rewards.py"]


def chapter_labels():
    if not os.path.exists(EQUATIONS):
        pytest.skip("../shared/chapter14/EQUATIONS.md not beside the repo")
    seen = []
    for label in re.findall(r"\*\*\[([A-Z0-9-]+)\]\*\*", open(EQUATIONS).read()):
        if label not in seen:
            seen.append(label)
    return seen


def source(name):
    path = os.path.join(ROOT, name)
    return open(path).read() if os.path.exists(path) else ""


def test_every_label_is_in_the_code():
    code = "".join(source(n) for n in SCRIPTS)
    labels = [label for label in chapter_labels() if label not in THEORY_ONLY]
    missing = [label for label in labels if f"[{label}]" not in code]
    assert not missing, f"labels not cited in any script: {missing}"


@pytest.mark.parametrize("script", ["nano_grpo.py", "nano_ppo.py"])
def test_chapter_map_in_order_and_each_label_cited_where_implemented(script):
    text = source(script)
    if not text:
        pytest.skip(f"{script} not written yet")
    order = chapter_labels()
    doc_end = text.index('"""', 3)
    # the docstring's chapter map
    mapped = re.findall(r"^  \[([A-Z0-9-]+)\]", text[:doc_end], flags=re.M)
    assert mapped, "the docstring has no chapter map"
    assert mapped == sorted(mapped, key=order.index), f"chapter map out of chapter order: {mapped}"
    body = text[doc_end:]
    uncited = [label for label in mapped if f"[{label}]" not in body]
    assert not uncited, f"in the map but not cited at the code that implements them: {uncited}"
    for label in re.findall(r"\[([A-Z][A-Z0-9]*(?:-[A-Z0-9]+)*)\]", body):
        if label in order and label not in THEORY_ONLY:
            assert label in mapped, (
                f"[{label}] is cited in {script} but missing from its chapter map"
            )


def test_readme_guide_names_real_functions():
    readme = source("README.md")
    guide = readme[readme.index("## Reading guide") :]
    guide = guide[: guide.index("\n## ", 5)]
    checked = 0
    for row in guide.splitlines():
        cells = row.split("|")
        if len(cells) < 4 or "`" not in cells[-2]:
            continue
        where = cells[-2]
        for module_name, names in re.findall(r"`(\w+)\.py[^`]*`:?\s*([^|]*?)(?=`\w+\.py|$)", where):
            exists = os.path.exists(os.path.join(ROOT, module_name + ".py"))
            module = importlib.import_module(module_name) if exists else None
            for name in re.findall(r"`(\w+)`", names):
                if module is not None and not name.startswith("-"):
                    assert hasattr(module, name), (
                        f"README guide names {module_name}.{name}, which does not exist"
                    )
                    checked += 1
    assert checked >= 8
