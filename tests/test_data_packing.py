"""Packing and collation: first-fit rows, the block-diagonal mask, and the proof that a packed
row computes exactly what its examples compute alone (tiny random Llama, eager and sdpa)."""

from __future__ import annotations

import pytest
import torch

from lorakit.data import (IGNORE_INDEX, block_causal_mask, build_causal_examples, collate_causal,
                          pack_examples, records_from_dicts)
from tests.test_data_helpers import tiny_tokenizer


def example(length: int, start: int = 10) -> dict:
    ids = list(range(start, start + length))
    return {"input_ids": ids, "labels": [IGNORE_INDEX, IGNORE_INDEX] + ids[2:]}


def test_first_fit_decreasing_order_positions_and_labels():
    rows = pack_examples([example(5, 10), example(7, 20), example(3, 30), example(6, 40)], 10)
    assert [len(r["input_ids"]) for r in rows] == [10, 6, 5]  # 7 + 3, 6, 5: longest placed first
    assert rows[0]["input_ids"] == list(range(20, 27)) + [30, 31, 32]
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2]
    # the first label of every example is ignored: no prediction across the boundary
    assert rows[0]["labels"] == [IGNORE_INDEX, IGNORE_INDEX] + list(range(22, 27)) + [IGNORE_INDEX, IGNORE_INDEX, 32]
    with pytest.raises(ValueError):
        pack_examples([example(11)], 10)


def test_first_fit_on_many_examples_keeps_every_token():
    lengths = [(i * 37) % 61 + 1 for i in range(3000)]
    rows = pack_examples([example(n) for n in lengths], 64)
    assert sum(len(r["input_ids"]) for r in rows) == sum(lengths)
    assert all(len(r["input_ids"]) <= 64 for r in rows)
    assert len(rows) <= sum(lengths) / 64 * 1.02  # first-fit decreasing leaves rows nearly full


def test_block_causal_mask_pattern():
    mask = block_causal_mask(torch.tensor([[0, 1, 2, 0, 1, 0]]))
    assert mask.shape == (1, 1, 6, 6) and mask.dtype == torch.float32
    allowed = (mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [1, 1, 1, 0, 0, 0],
                       [0, 0, 0, 1, 0, 0],
                       [0, 0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]]
    assert block_causal_mask(torch.tensor([[0, 1]]), torch.bfloat16).dtype == torch.bfloat16


def test_collate_plain_batch_pads_right():
    batch = collate_causal([example(3), example(5)], pad_token_id=0, pad_to_multiple_of=4)
    assert set(batch) == {"input_ids", "labels", "attention_mask"}
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"][0, 3:].eq(0).all()
    assert batch["attention_mask"].tolist()[0] == [1, 1, 1, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [IGNORE_INDEX, IGNORE_INDEX, 12] + [IGNORE_INDEX] * 5
    with pytest.raises(ValueError):
        collate_causal([example(3)], pad_token_id=None)


def test_collate_packed_batch():
    rows = pack_examples([example(4), example(3), example(6)], 8)
    batch = collate_causal(rows, pad_token_id=0)
    assert set(batch) == {"input_ids", "labels", "attention_mask", "position_ids"}
    assert batch["attention_mask"].shape == (2, 1, 7, 7)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0], [0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"][0, 6].item() == IGNORE_INDEX
    with pytest.raises(ValueError, match="mix"):
        collate_causal([rows[0], example(3)], pad_token_id=0)


def test_build_causal_examples_with_packing():
    tok = tiny_tokenizer()
    rows = [{"prompt": f"question {i}", "completion": "answer " * (i % 5 + 1)} for i in range(40)]
    plain = build_causal_examples(records_from_dicts(rows), tok, seq_len=128)
    packed = build_causal_examples(records_from_dicts(rows), tok, seq_len=128, packing=True)
    assert packed.packed and packed.stats.rows == len(packed) < len(plain) == packed.stats.kept
    assert sum(len(r["input_ids"]) for r in packed) == sum(len(e["input_ids"]) for e in plain)
    assert "packed into" in packed.stats.summary()


def tiny_llama(attn_implementation: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=64, vocab_size=128,
                         attn_implementation=attn_implementation)
    model = LlamaForCausalLM(config).eval()
    assert model.config._attn_implementation == attn_implementation
    return model


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_packed_logits_equal_each_example_alone(attn_implementation):
    model = tiny_llama(attn_implementation)
    generator = torch.Generator().manual_seed(1)
    examples = []
    for length in (5, 9, 3, 7, 2):
        ids = torch.randint(3, 128, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    rows = pack_examples(examples, 16)
    assert len(rows) == 2 and len(rows[0]["input_ids"]) != len(rows[1]["input_ids"])  # padding
    batch = collate_causal(rows, pad_token_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits        # (rows, seq, vocab)
        assert torch.isfinite(packed).all()
        starts = (batch["position_ids"] == 0).nonzero().tolist()
        found = 0
        for row, start in starts:
            for ex in examples:
                n = len(ex["input_ids"])
                if batch["input_ids"][row, start:start + n].tolist() != ex["input_ids"]:
                    continue
                alone = model(input_ids=torch.tensor([ex["input_ids"]])).logits[0]  # (n, vocab)
                torch.testing.assert_close(packed[row, start:start + n], alone, atol=1e-5, rtol=0)
                found += 1
                break
        assert found == len(examples)


def test_packed_loss_equals_the_sum_of_separate_losses():
    model = tiny_llama("sdpa")
    generator = torch.Generator().manual_seed(2)
    examples = []
    for length in (6, 4, 5):
        ids = torch.randint(3, 128, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] + ids[1:]})

    def summed_loss(batch):
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        return torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX, reduction="sum")

    with torch.no_grad():
        packed = summed_loss(collate_causal(pack_examples(examples, 16), pad_token_id=0))
        separate = sum(summed_loss(collate_causal([e], pad_token_id=0)) for e in examples)
    torch.testing.assert_close(packed, separate, atol=1e-4, rtol=1e-5)


def test_pack_examples_carries_other_per_token_keys_with_zero_at_each_start():
    from lorakit.data import pack_examples

    a = {"input_ids": [1, 2, 3], "labels": [-100, 2, 3], "distill_mask": [0, 0, 0]}
    b = {"input_ids": [4, 5], "labels": [-100, -100], "distill_mask": [1, 1]}
    c = {"input_ids": [6, 7], "labels": [6, 7]}  # no distill_mask: zeros in its place
    [row] = pack_examples([a, b, c], seq_len=8)
    assert row["input_ids"] == [1, 2, 3, 4, 5, 6, 7]
    assert row["distill_mask"] == [0, 0, 0, 0, 1, 0, 0]
    assert row["labels"] == [-100, 2, 3, -100, -100, -100, 7]
    assert row["position_ids"] == [0, 1, 2, 0, 1, 0, 1]


def test_flattened_packed_batch_has_no_padding_and_the_same_tokens(monkeypatch):
    rows = pack_examples([example(4), example(3), example(6)], 8)
    flat = collate_causal(rows, pad_token_id=0, flatten=True)
    assert flat["input_ids"].shape == (1, 13) and flat["attention_mask"].shape == (1, 1, 13, 13)
    assert flat["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2]]
    padded = collate_causal(rows, pad_token_id=0)
    real = padded["labels"] != IGNORE_INDEX
    assert flat["labels"][flat["labels"] != IGNORE_INDEX].tolist() == padded["labels"][real].tolist()
    monkeypatch.setattr("lorakit.data.collate.FLATTEN_MAX_TOKENS", 12)  # too long to join: padded rows
    assert collate_causal(rows, pad_token_id=0, flatten=True)["input_ids"].shape == padded["input_ids"].shape
    plain = [example(3)]
    assert collate_causal(plain, pad_token_id=0, flatten=True).keys() == collate_causal(plain, pad_token_id=0).keys()
