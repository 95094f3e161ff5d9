"""Packed-row attention: the same outputs and LoRA gradients as sdpa with the block-diagonal mask."""
import copy

import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.data import collate_causal, pack_examples
from lorakit.fast import use_packed_attention
from lorakit.fast.attention import PACKED_ATTENTION, example_spans
from tests.conftest import loss_and_grads, tiny_llama


def test_example_spans_split_at_restarts_and_keep_padding_together():
    assert example_spans(torch.tensor([[0, 1, 2, 0, 1, 0, 0, 0]])) == [[(0, 3), (3, 5), (5, 8)]]
    # a one-token example followed by a new example: both are spans of their own
    assert example_spans(torch.tensor([[0, 0, 1, 2, 0, 0]])) == [[(0, 1), (1, 4), (4, 6)]]
    assert example_spans(torch.tensor([[0, 1, 2, 3], [0, 1, 0, 1]])) == [[(0, 4)], [(0, 2), (2, 4)]]


def _packed_batch():
    g = torch.Generator().manual_seed(3)
    examples = []
    for length in (5, 9, 3, 7, 2, 11, 4):
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    return collate_causal(pack_examples(examples, 16), pad_token_id=0)


def test_packed_attention_gives_the_same_loss_and_lora_gradients():
    model = get_peft_model(tiny_llama(attn_implementation="sdpa"),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    fast = copy.deepcopy(model)
    assert use_packed_attention(fast) and fast.get_base_model().config._attn_implementation == PACKED_ATTENTION
    batch = _packed_batch()
    assert any(len(row) > 1 for row in example_spans(batch["position_ids"]))  # the packed path runs
    ref_loss, ref_grads = loss_and_grads(model, batch)
    loss, grads = loss_and_grads(fast, batch)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_unpacked_batches_and_generation_are_unchanged():
    model = tiny_llama(attn_implementation="sdpa")
    fast = copy.deepcopy(model)
    use_packed_attention(fast)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    with torch.no_grad():
        assert torch.allclose(fast(input_ids=ids, attention_mask=mask).logits,
                              model(input_ids=ids, attention_mask=mask).logits, atol=1e-5)
        prompt = {"input_ids": ids[:1, :5], "attention_mask": mask[:1, :5]}
        assert torch.equal(fast.generate(**prompt, max_new_tokens=4, do_sample=False),
                           model.generate(**prompt, max_new_tokens=4, do_sample=False))


def test_models_without_sdpa_keep_their_attention():
    model = tiny_llama(attn_implementation="eager")
    assert not use_packed_attention(model) and model.config._attn_implementation == "eager"


def test_spans_are_read_once_per_forward(monkeypatch):
    """Every layer gets the same position_ids: the spans (a device read) are computed once, and again when
    the tensor changes."""
    import lorakit.fast.attention as attention

    calls = []
    original = attention.example_spans
    monkeypatch.setattr(attention, "example_spans", lambda p: calls.append(1) or original(p))
    pos = torch.tensor([[0, 1, 2, 0, 1, 0]])
    first = attention._spans_of(pos, 1)
    assert attention._spans_of(pos, 1) == first == [[(0, 3), (3, 5), (5, 6)]] and len(calls) == 1
    assert attention._spans_of(pos, 2) == [[(0, 3), (3, 5), (5, 6)]] * 2 and len(calls) == 2  # another batch
    pos[0, 3] = 3  # changed in place: read again
    assert attention._spans_of(pos, 2) == [[(0, 5), (5, 6)]] * 2 and len(calls) == 3
    assert attention._spans_of(torch.arange(4)[None], 1) is None  # one example per row: plain sdpa


def test_a_batch_without_position_ids_is_not_read_for_packed_examples(monkeypatch):
    import lorakit.fast.attention as attention
    from lorakit.fast import label_only_lm_loss

    model = tiny_llama()
    use_packed_attention(model)
    loss_fn = label_only_lm_loss(model)
    reads = []
    monkeypatch.setattr(attention, "example_spans", lambda p: reads.append(1) or example_spans(p))
    ids = torch.randint(1, 128, (2, 12))
    unpacked = loss_fn(model, {"input_ids": ids, "labels": ids})
    assert reads == []  # transformers' own positions: one example per row, nothing to read off the device
    positions = torch.arange(12).repeat(2, 1)
    given = loss_fn(model, {"input_ids": ids, "labels": ids, "position_ids": positions})
    assert reads == [1] and torch.allclose(unpacked, given)


def test_a_flattened_row_padded_to_a_multiple_trains_as_the_unpadded_one():
    """`lorakit train` on a CPU pads its padding-free row to FLAT_ROW_MULTIPLE tokens (so oneDNN's compiled matmul
    shapes repeat): the padding is its own span, so loss and LoRA gradients are the unpadded row's, and it is not
    counted as input tokens."""
    from lorakit.cli.train_data import FLAT_ROW_MULTIPLE
    from lorakit.train.batching import count_input_tokens

    model = get_peft_model(tiny_llama(attn_implementation="sdpa"),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    assert use_packed_attention(model)
    rows = pack_examples([{"input_ids": list(range(3, 3 + n)), "labels": list(range(3, 3 + n))}
                          for n in (5, 9, 4, 7, 6)], 16)
    plain = collate_causal(rows, pad_token_id=0, flatten=True)
    padded = collate_causal(rows, pad_token_id=0, flatten=True, pad_to_multiple_of=FLAT_ROW_MULTIPLE)
    assert plain["input_ids"].shape == (1, 31) and padded["input_ids"].shape == (1, FLAT_ROW_MULTIPLE)
    assert count_input_tokens(padded) == count_input_tokens(plain) == 31
    loss, grads = loss_and_grads(model, padded)
    ref_loss, ref_grads = loss_and_grads(model, plain)
    assert torch.allclose(loss, ref_loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, ref_grads[name], rtol=1e-4, atol=1e-6), name
