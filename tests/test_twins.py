"""nano_grpo.py and nano_ppo.py are twins, kept in step the way CleanRL keeps its variants: every
definition the two share is identical in source and in the same order, except the few where GRPO
and PPO differ by design (listed below with the reason). So `diff nano_grpo.py nano_ppo.py` shows
what PPO adds and GRPO removes, and nothing else; edit a shared definition in both files."""

import ast
import os
import re

import pytest
from helpers import ROOT

# name -> why the two scripts' versions differ
DIFFER_BY_DESIGN = {
    "Config": "each algorithm's knobs",
    "PRESETS": "each algorithm's runs",
    "rollout": "GRPO's dynamic sampling (DAPO) and process supervision",
    "train_on_batch": "the update itself: GRPO's group advantages vs PPO's critic, GAE and epochs",
    "main": "PPO's critic and adaptive KL controller",
    "load_models": "PPO's critic",
    "start_engine": "GRPO's offline RFT (rollouts from the frozen starting model)",
    "check_config": "each algorithm's invalid combinations",
    "PRESET_ABOUT": "each algorithm's presets",
    "CHOICES": "each algorithm's flags",
    "CURVES": "each algorithm's health curves",
}


def definitions(source: str) -> dict[str, str]:
    """Top-level functions, classes and assignments of a module: name -> exact source text."""
    tree = ast.parse(source)
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        decorators = getattr(node, "decorator_list", None)
        first = decorators[0].lineno if decorators else node.lineno
        lines = source.splitlines()[first - 1 : node.end_lineno]
        out[name] = "\n".join(lines)
    return out


def twin_differences(grpo_source: str, ppo_source: str) -> list[str]:
    """What breaks the twin rule, one line each (empty: the twins are in step)."""
    grpo, ppo = definitions(grpo_source), definitions(ppo_source)
    shared = [n for n in grpo if n in ppo]
    differ = [n for n in shared if n not in DIFFER_BY_DESIGN and grpo[n] != ppo[n]]
    problems = [f"{n} differs between the two scripts" for n in differ]
    same = [n for n in DIFFER_BY_DESIGN if grpo.get(n, 1) == ppo.get(n, 1)]
    problems += [f"{n} is listed as differing but is identical (or missing)" for n in same]
    if shared != [n for n in ppo if n in grpo]:
        problems.append("the shared definitions are in another order in the two scripts")
    return problems


def read(name):
    return open(os.path.join(ROOT, name)).read()


def test_shared_definitions_are_identical_and_in_the_same_order():
    assert twin_differences(read("nano_grpo.py"), read("nano_ppo.py")) == []


def test_the_check_catches_one_copy_edited_alone():
    grpo, ppo = read("nano_grpo.py"), read("nano_ppo.py")
    edited = ppo.replace("1 - epsilon, 1 + epsilon_high", "1 - epsilon, 1 + epsilon")  # PPO only
    assert edited != ppo
    assert twin_differences(grpo, edited) == ["clipped_policy_loss differs between the two scripts"]


@pytest.mark.parametrize("script", ["nano_grpo.py", "nano_ppo.py"])
def test_the_algorithm_comes_first(script):
    """Part 1 (the algorithm) before Part 2 (the machinery): the first labelled equation within
    the first 200 lines, the training loop before the halfway line, and no process plumbing in
    Part 1 but the whole-batch normaliser ([PG-TOKEN-LOSS]) that correctness needs."""
    text = read(script)
    lines = text.splitlines()
    doc_end = text[: text.index('"""', 3)].count("\n") + 1
    label = re.compile(r"\[[A-Z][A-Z0-9-]+\]")  # e.g. [GRPO-ADV], as EQUATIONS.md labels them
    first_label = next(i for i, line in enumerate(lines) if i > doc_end and label.search(line))
    assert first_label < 200, first_label
    loop = next(i for i, line in enumerate(lines) if line.startswith("    for step in "))
    assert loop < len(lines) / 2, (loop, len(lines))
    part2 = next(i for i, line in enumerate(lines) if "PART 2: THE MACHINERY" in line)
    part1 = "\n".join(lines[:part2])
    tokens = (
        "dist.",
        "get_rank",
        "RANK",
        "world_size",
        "reshard",
        "is_main_process",
    )  # not lora_rank
    plumbing = [line for line in part1.splitlines() if any(tok in line for tok in tokens)]
    assert plumbing == [], plumbing
