"""The serving engine without HTTP: gathered (Punica-style) routing equals per-adapter runs, continuous
batching gives every request the tokens it gets alone (and what transformers' generate gives), seeded
sampling is batch-independent too, and the ragged attention leaves the model usable outside the engine."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.lora.layer import BASE_ADAPTER
from lorakit.serve.engine import Engine, SamplingParams
from tests.conftest import assert_close
from tests.test_data_helpers import tiny_tokenizer


def _model():
    """A tiny Llama with adapters of different ranks and targets, frozen for inference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok),
                                        pad_token_id=0)).eval()
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"],
                                      init_lora_weights=False))
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), tok


def _ids(batch=4, seed=3):
    return torch.randint(1, 300, (batch, 7), generator=torch.Generator().manual_seed(seed))


def test_gathered_rows_equal_single_adapter_runs():
    model, _ = _model()
    x = _ids()
    names = ["a", BASE_ADAPTER, "b", "a"]
    with torch.no_grad():
        mixed = model(input_ids=x, adapter_names=names).logits
        for i, name in enumerate(names):
            if name == BASE_ADAPTER:
                with model.disable_adapter():
                    single = model(input_ids=x[i:i + 1]).logits
            else:
                model.set_adapter(name)
                single = model(input_ids=x[i:i + 1]).logits
            assert_close(mixed[i], single[0])
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    assert "_stacks" in layer.__dict__, "the gathered path was not taken"


def test_gathered_stacks_follow_in_place_changes_and_replaced_adapters():
    model, _ = _model()
    x = _ids(2)
    with torch.no_grad():
        before = model(input_ids=x, adapter_names=["a", "b"]).logits
        layer = model.get_base_model().model.layers[0].self_attn.q_proj
        layer.lora_B["a"].weight.mul_(3.0)  # an in-place edit (e.g. an optimizer step)
        edited = model(input_ids=x, adapter_names=["a", "b"]).logits
        model.set_adapter("a")
        assert_close(edited[0], model(input_ids=x[:1]).logits[0])
        assert (edited[0] - before[0]).abs().max() > 1e-4
        assert torch.equal(edited[1], before[1])  # row b untouched
        model.delete_adapter("a")
        model.add_adapter("a", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], init_lora_weights=False))
        model.set_adapter("a")
        for p in model.parameters():
            p.requires_grad_(False)
        assert_close(model(input_ids=x, adapter_names=["a", "a"]).logits, model(input_ids=x).logits)


PROMPTS = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16, 17], [20, 21], [30, 31, 32, 33, 34], [40], [50, 51, 52]]
ADAPTERS = ["a", "b", BASE_ADAPTER, "a", "b", BASE_ADAPTER, "b"]


def concurrently(engine, params, prompts=PROMPTS, adapters=ADAPTERS):
    """engine.generate of every (prompt, adapter) pair, each from its own thread at once; results in order."""
    results = [None] * len(prompts)

    def run(i):
        results[i] = engine.generate(prompts[i], adapters[i], params)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_continuous_batching_equals_alone_and_transformers_generate():
    model, tok = _model()
    engine = Engine(model, tok, max_batch=5, eos_token_ids=[]).start()
    try:
        params = SamplingParams(max_tokens=10)
        alone = [engine.generate(p, a, params) for p, a in zip(PROMPTS, ADAPTERS)]
        together = concurrently(engine, params)
        assert engine.max_rows_seen >= 3 and together == alone
        assert engine.row_multiple >= 1
        with torch.no_grad():
            for (tokens, finish), prompt, name in zip(alone, PROMPTS, ADAPTERS):
                x = torch.tensor([prompt])
                ref = model.generate(input_ids=x, attention_mask=torch.ones_like(x), adapter_names=[name],
                                     max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=None)
                assert tokens == ref[0, len(prompt):].tolist() and finish == "length"
    finally:
        engine.stop()


def test_seeded_sampling_is_batch_independent_and_eos_stops():
    model, tok = _model()
    engine = Engine(model, tok, max_batch=8, eos_token_ids=[]).start()
    try:
        params = SamplingParams(max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
        alone = [engine.generate(p, a, params) for p, a in zip(PROMPTS, ADAPTERS)]
        assert concurrently(engine, params) == alone
        first, _ = engine.generate(PROMPTS[0], "a", SamplingParams(max_tokens=8))
        engine.eos_token_ids = {first[2]}
        stopped, finish = engine.generate(PROMPTS[0], "a", SamplingParams(max_tokens=8))
        assert stopped == first[:first.index(first[2])] and finish == "stop"
    finally:
        engine.stop()


def test_decode_logits_are_bitwise_identical_alone_and_in_any_batch():
    """The property behind exact greedy serving: a row's logits do not change by a single bit with the
    batch around it (its position, its neighbours' adapters, the padding to the invariant row multiple)."""
    import copy

    from lorakit.serve.engine import Sequence

    model, tok = _model()
    engine = Engine(model, tok, max_batch=8, eos_token_ids=[])
    seqs = [Sequence(i, PROMPTS[i], ADAPTERS[i], SamplingParams(max_tokens=4), lambda *_: None) for i in range(6)]
    with torch.no_grad():
        for seq in seqs:
            engine._prefill([seq])

        def logits_of(rows):
            rows = [copy.copy(s) if s else None for s in rows]
            for s in rows:
                if s:
                    s.kv = copy.deepcopy(s.kv)  # each trial appends to its own copy of the caches
            padded = rows + [None] * (-len(rows) % engine.row_multiple)
            ids = torch.tensor([[s.generated[-1] if s else 0] for s in padded])
            pos = torch.tensor([[s.kv.length if s else 0] for s in padded])
            return engine._forward(ids, pos, padded)

        alone = logits_of([seqs[0]])[0]
        assert torch.equal(logits_of([seqs[1], seqs[0], seqs[2]])[1], alone)
        assert torch.equal(logits_of(seqs[1:5] + [seqs[0]])[4], alone)
        assert torch.equal(logits_of(list(reversed(seqs)))[5], alone)


def test_a_failing_step_fails_only_its_requests_and_cancel_frees_the_slot():
    model, tok = _model()
    engine = Engine(model, tok, max_batch=4, eos_token_ids=[]).start()
    try:
        try:
            engine.generate(PROMPTS[0], "no-such-adapter", SamplingParams(max_tokens=3))
            raise AssertionError("an unknown adapter must fail the request")
        except RuntimeError as e:
            assert "no-such-adapter" in str(e)
        handle = engine.submit(PROMPTS[1], "a", SamplingParams(max_tokens=500), lambda *_: None)
        handle.cancel()
        tokens, finish = engine.generate(PROMPTS[2], "b", SamplingParams(max_tokens=3))
        assert len(tokens) == 3 and finish == "length"
        for _ in range(500):  # the engine thread drops finished and cancelled requests after its step
            if engine.load() == 0:
                break
            time.sleep(0.01)
        assert engine.load() == 0
    finally:
        engine.stop()


def test_a_request_in_prefill_counts_as_in_flight_and_keeps_its_adapter():
    """A DELETE of its adapter must wait for it, and --max-concurrent must count it (both missed it before)."""
    model, tok = _model()
    engine = Engine(model, tok, max_batch=4, eos_token_ids=[])
    in_prefill, release = threading.Event(), threading.Event()
    prefill = engine._prefill

    def slow_prefill(seqs):
        in_prefill.set()
        release.wait(timeout=30)
        prefill(seqs)

    engine._prefill = slow_prefill
    engine.start()
    try:
        engine.submit(PROMPTS[0], "b", SamplingParams(max_tokens=2), lambda *_: None)
        assert in_prefill.wait(timeout=30)
        assert engine.load() == 1 and engine.adapters_in_use() == {"b"}
        release.set()
        for _ in range(500):
            if engine.load() == 0:
                break
            time.sleep(0.01)
        assert engine.load() == 0 and engine.adapters_in_use() == set()
    finally:
        release.set()
        engine.stop()


@pytest.mark.parametrize("arch,extra", [
    ("mistral", dict(sliding_window=4)),
    ("gemma2", dict(head_dim=8, sliding_window=4, attn_logit_softcapping=5.0)),
    ("gemma3_text", dict(head_dim=8, sliding_window=4)),
    ("gpt_oss", dict(head_dim=8, sliding_window=4, num_local_experts=4, num_experts_per_tok=2,
                     intermediate_size=32)),
])
def test_engine_equals_generate_with_sliding_windows_soft_caps_and_sinks(arch, extra):
    """Prompts and answers longer than the window: the ragged attention masks, caps and sinks as the model's own."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(arch, **{**dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                  num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                                  max_position_embeddings=64, pad_token_id=0), **extra})
    model = AutoModelForCausalLM.from_config(config).eval()
    if arch == "gpt_oss":
        for layer in model.model.layers:  # the sinks start at zero: make them matter
            torch.nn.init.normal_(layer.self_attn.sinks, std=1.0)
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20], [30, 31]]
    with torch.no_grad():
        expected = []
        for prompt in prompts:
            x = torch.tensor([prompt])
            out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=8,
                                 do_sample=False, pad_token_id=0, eos_token_id=None)
            expected.append(out[0, len(prompt):].tolist())
    for p in model.parameters():
        p.requires_grad_(False)
    engine = Engine(model, tiny_tokenizer(), max_batch=3, eos_token_ids=[]).start()
    try:
        params = SamplingParams(max_tokens=8)
        alone = [engine.generate(prompt, BASE_ADAPTER, params)[0] for prompt in prompts]
    finally:
        engine.stop()
    assert alone == expected
