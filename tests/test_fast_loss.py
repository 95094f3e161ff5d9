"""The label-only LM loss equals transformers' loss, and gives the same LoRA gradients."""
import torch

from lorakit import LoraConfig, get_peft_model
from lorakit.fast import label_only_lm_loss
from tests.conftest import tiny_gpt2, tiny_llama


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (3, 10), generator=g)
    labels = ids.clone()
    labels[:, :6] = -100  # prompt
    labels[2, 8:] = -100  # padding
    mask = torch.ones_like(ids)
    mask[2, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_same_loss_and_gradients_as_transformers():
    for make in (tiny_llama, tiny_gpt2):
        model = get_peft_model(make(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
        loss_fn = label_only_lm_loss(model)
        assert loss_fn is not None
        batch = _batch()
        ref = model(**batch).loss
        ref_grads = _grads(model, ref)
        fast = loss_fn(model, batch)
        assert torch.allclose(fast, ref, rtol=1e-6, atol=1e-6)
        for name, g in _grads(model, fast).items():
            assert torch.allclose(g, ref_grads[name], rtol=1e-4, atol=1e-6), name


def test_soft_capped_heads_keep_the_plain_loss():
    model = tiny_llama()
    model.config.final_logit_softcapping = 30.0
    assert label_only_lm_loss(model) is None


def _kl_by_hand(model, batch: dict, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || adapted) at the masked positions, from full logits with and without the adapter."""
    import torch.nn.functional as F

    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad(), model.disable_adapter():
        base = F.log_softmax(model(**inputs).logits, -1)
    adapted = F.log_softmax(model(**inputs).logits, -1)
    at = mask[:, 1:].bool()
    return (base[:, :-1][at].exp() * (base[:, :-1][at] - adapted[:, :-1][at])).sum(-1).mean()


def test_distillation_term_is_kl_to_the_base_model():
    # a frozen head (the chunked loss with soft targets) and a LoRA-wrapped head (plain logits)
    for targets in ("all-linear", ["q_proj", "v_proj", "down_proj", "lm_head"]):
        model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=targets))  # B = 0: adapted == base
        loss_fn = label_only_lm_loss(model)
        batch = _batch()
        plain = loss_fn(model, batch)
        none_marked = loss_fn(model, {**batch, "distill_mask": torch.zeros_like(batch["input_ids"])})
        assert torch.allclose(plain, none_marked)
        mask = torch.zeros_like(batch["input_ids"])
        mask[:, 3:7] = 1
        assert torch.allclose(loss_fn(model, {**batch, "distill_mask": mask}), plain, atol=1e-6)  # KL = 0 at init
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5)
        total = loss_fn(model, {**batch, "distill_mask": mask})
        grads = _grads(model, total)
        ref = loss_fn(model, batch) + _kl_by_hand(model, batch, mask)
        assert ref - loss_fn(model, batch) > 1e-3 and torch.allclose(total, ref, rtol=1e-5, atol=1e-6), targets
        for name, g in _grads(model, ref).items():  # the same LoRA gradients, and nothing else trained
            assert "lora_" in name and torch.allclose(grads[name], g, rtol=1e-4, atol=1e-6), (targets, name)


def test_base_states_of_a_row_are_computed_once_and_reused():
    import torch.nn.functional as F

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    loss_fn = label_only_lm_loss(model)
    mask = torch.zeros_like(_batch()["input_ids"])
    mask[:, 3:7] = 1
    marked = {**_batch(), "distill_mask": mask}
    forwards = []
    model.get_base_model().model.register_forward_hook(lambda *args: forwards.append(1))
    first = loss_fn(model, marked)
    assert len(forwards) == 2  # adapted + base
    assert torch.equal(loss_fn(model, marked), first) and len(forwards) == 3  # base states reused
    # the same rows right-padded one token longer (another batch's length): still the same rows
    padded = {k: F.pad(v, (0, 1), value=-100 if k == "labels" else 0) for k, v in marked.items()}
    assert torch.allclose(loss_fn(model, padded), first, atol=1e-6) and len(forwards) == 4
    other = {**marked, "input_ids": (marked["input_ids"] + 1) % 128}  # new rows: the base runs again
    loss_fn(model, other)
    assert len(forwards) == 6


def test_packed_examples_reuse_base_states_however_they_are_batched():
    from lorakit.data import collate_causal, pack_examples

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    loss_fn = label_only_lm_loss(model)
    g = torch.Generator().manual_seed(5)
    examples = []
    for n, length in enumerate((6, 9, 4, 7, 5)):
        ids = torch.randint(3, 128, (length,), generator=g).tolist()
        learn = n % 2 == 0  # learned examples have labels; the others are held to the base model
        examples.append({"input_ids": ids, "labels": ids if learn else [-100] * length,
                         "distill_mask": [int(not learn)] * length})
    rows = pack_examples(examples, 16)
    forwards = []
    model.get_base_model().model.register_forward_hook(lambda *args: forwards.append(1))
    by_rows = loss_fn(model, collate_causal(rows, pad_token_id=0))
    assert len(forwards) == 2
    flat = loss_fn(model, collate_causal(rows[::-1], pad_token_id=0, flatten=True))  # other rows, same examples
    assert len(forwards) == 3 and torch.allclose(flat, by_rows, atol=1e-6)


def test_the_base_forward_over_packed_examples_pads_its_row_to_the_multiple():
    """On a CPU (`lorakit train` passes row_multiple) the base model's row of new packed examples is padded to a
    multiple of tokens, so its matmul shapes repeat; the padding changes no loss."""
    from lorakit.data import collate_causal, pack_examples

    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    g = torch.Generator().manual_seed(6)
    examples = [{"input_ids": torch.randint(3, 128, (n,), generator=g).tolist(), "labels": [-100] * n,
                 "distill_mask": [1] * n} for n in (6, 9, 4)]
    batch = collate_causal(pack_examples(examples, 16), pad_token_id=0, flatten=True)
    lengths = []
    model.get_base_model().model.register_forward_hook(lambda m, args, kw, out: lengths.append(kw["input_ids"].shape[1]),
                                                       with_kwargs=True)
    plain = label_only_lm_loss(model)(model, batch)
    padded = label_only_lm_loss(model, row_multiple=16)(model, batch)
    assert lengths == [19, 19, 19, 32]  # adapted, base; adapted, base padded from 19 to 32
    assert torch.allclose(padded, plain, atol=1e-6) and plain > 1e-3


def test_chunked_cross_entropy_equals_the_plain_one_across_chunks_and_dtypes(monkeypatch):
    import torch.nn.functional as F

    from lorakit.fast import cross_entropy
    from tests.conftest import assert_close

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        hidden = torch.randn(37, 16, generator=g).to(dtype).requires_grad_(True)
        weight = (torch.randn(50, 16, generator=g) * 0.5).to(dtype)
        targets = torch.randint(0, 50, (37,), generator=g)
        ref = F.cross_entropy((hidden @ weight.T).float(), targets)
        (ref_grad,) = torch.autograd.grad(ref, hidden)
        for vocab_block in (7, 50, 4096):  # the vocabulary in ragged blocks, exactly one, less than one
            monkeypatch.setattr(cross_entropy, "VOCAB_BLOCK", vocab_block)
            for chunk in (1, 8, 37, 1000):
                loss = cross_entropy.chunked_linear_cross_entropy(hidden, weight, targets, chunk=chunk)
                (grad,) = torch.autograd.grad(loss * 3.0, hidden)  # the upstream gradient is applied
                assert_close(loss, ref, dtype)
                assert_close(grad, 3.0 * ref_grad, dtype)


def test_soft_targets_give_the_kl_to_the_base_distributions(monkeypatch):
    import torch.nn.functional as F

    from lorakit.fast import cross_entropy
    from tests.conftest import assert_close

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        base = torch.randn(29, 16, generator=g).to(dtype)
        hidden = (base.float() + 0.3 * torch.randn(29, 16, generator=g)).to(dtype).requires_grad_(True)
        weight = (torch.randn(50, 16, generator=g) * 0.5).to(dtype)
        p = F.log_softmax(base.float() @ weight.float().T, -1)  # the KL of these (bf16) values, in fp32
        q = F.log_softmax(hidden.float() @ weight.float().T, -1)
        ref = (p.exp() * (p - q)).sum(-1).mean()
        (ref_grad,) = torch.autograd.grad(ref, hidden)
        for vocab_block in (7, 4096):
            monkeypatch.setattr(cross_entropy, "VOCAB_BLOCK", vocab_block)
            for chunk in (5, 1000):
                targets = cross_entropy.soft_targets(base, weight, chunk=chunk)
                assert targets.direction.shape == (29, 16) and targets.offset.shape == (29,)
                assert_close(targets.offset, (p.exp() * p).sum(-1), dtype)  # Σ p log p
                kl = cross_entropy.chunked_linear_cross_entropy(hidden, weight, targets, chunk=chunk)
                (grad,) = torch.autograd.grad(kl * 2.0, hidden)
                assert_close(kl, ref, dtype)
                assert_close(grad, 2.0 * ref_grad, dtype)
        same = cross_entropy.chunked_linear_cross_entropy(base.float(), weight.float(),
                                                          cross_entropy.soft_targets(base.float(), weight.float()))
        assert abs(float(same)) < 1e-6  # KL(p || p) = 0


def test_chunked_cross_entropy_refuses_a_trainable_head():
    import pytest

    from lorakit.fast.cross_entropy import chunked_linear_cross_entropy

    with pytest.raises(ValueError, match="frozen"):
        chunked_linear_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, requires_grad=True), torch.tensor([0, 1]))
