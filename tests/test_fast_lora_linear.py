"""The fused LoRA linear function: the same outputs and gradients as the plain layer's autograd."""
import pytest
import torch
from torch import nn

from lorakit import LoraConfig, get_peft_model
from lorakit.fast.lora_linear import lora_linear, lora_linear_group, stack_factors
from tests.conftest import loss_and_grads, rel_err, tiny_llama


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
def test_matches_the_equation_and_its_gradients(bias, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    weight, b = torch.randn(9, 12, generator=g, dtype=torch.float64), torch.randn(9, generator=g, dtype=torch.float64)
    a = torch.randn(3, 12, generator=g, dtype=torch.float64, requires_grad=True)
    b_ = torch.randn(9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    bias_ = b if bias else None
    plain = x @ weight.T + (b if bias else 0) + 0.7 * (x @ a.T) @ b_.T
    fused = lora_linear(x, weight, bias_, a, b_, 0.7)
    assert torch.allclose(fused, plain)
    upstream = torch.randn(plain.shape, generator=g, dtype=torch.float64)
    expected = torch.autograd.grad(plain, (x, a, b_), upstream)
    got = torch.autograd.grad(fused, (x, a, b_), upstream)
    for e, r in zip(expected, got):
        assert torch.allclose(e, r)
    assert torch.autograd.gradcheck(lambda x, a, b_: lora_linear(x, weight, bias_, a, b_, 0.7), (x, a, b_))
    # with the branch's own input (dropout(x)): its gradient goes back through it
    keep = (torch.rand(shape, generator=g) > 0.3).double() / 0.7
    plain = x @ weight.T + (b if bias else 0) + 0.7 * ((x * keep) @ a.T) @ b_.T
    fused = lora_linear(x, weight, bias_, a, b_, 0.7, x * keep)
    assert torch.allclose(fused, plain)
    for e, r in zip(torch.autograd.grad(plain, (x, a, b_), upstream), torch.autograd.grad(fused, (x, a, b_), upstream)):
        assert torch.allclose(e, r)


@pytest.mark.parametrize("scalings", [(0.7, 0.7, 0.7), (0.7, 0.5, 2.0)])
@pytest.mark.parametrize("shape", [(7, 12), (2, 5, 12)])
def test_the_group_is_its_lora_linears_and_their_gradients(shape, scalings):
    """q, k and v as one node: other output sizes, ranks, scalings and a bias per member."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64, requires_grad=True)
    outs, ranks = (9, 5, 5), (3, 2, 4)
    weights = [torch.randn(o, 12, generator=g, dtype=torch.float64) for o in outs]
    biases = [None, torch.randn(5, generator=g, dtype=torch.float64), None]
    factors = [(torch.randn(r, 12, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(o, r, generator=g, dtype=torch.float64, requires_grad=True)) for o, r in zip(outs, ranks)]
    leaves = (x, *[t for f in factors for t in f])

    def members(*t):
        return [(w, bias, t[2 * i], t[2 * i + 1], s, None, False, None)
                for i, (w, bias, s) in enumerate(zip(weights, biases, scalings))]

    def plain_outputs():
        return [x @ w.T + (0 if bias is None else bias) + s * (x @ a.T) @ b.T
                for w, bias, s, (a, b) in zip(weights, biases, scalings, factors)]

    group, plain = lora_linear_group(x, members(*leaves[1:])), plain_outputs()
    upstream = [torch.randn(p.shape, generator=g, dtype=torch.float64) for p in plain]
    for got, expected in zip(group, plain):
        assert torch.allclose(got, expected)
    for e, r in zip(torch.autograd.grad(plain, leaves, upstream), torch.autograd.grad(group, leaves, upstream)):
        assert torch.allclose(e, r)
    assert torch.autograd.gradcheck(lambda *t: lora_linear_group(t[0], members(*t[1:])), leaves)
    # outputs the caller leaves unused get no gradient: x's and the used member's are still right
    group, plain = lora_linear_group(x, members(*leaves[1:])), plain_outputs()
    expected = torch.autograd.grad((plain[0] * upstream[0]).sum(), leaves[:3])
    assert all(torch.allclose(e, r) for e, r in zip(expected, torch.autograd.grad((group[0] * upstream[0]).sum(), leaves[:3])))
    # what one node cannot compute: each layer is called by itself then
    args = members(*leaves[1:])
    assert lora_linear_group(x, [args[0], (*args[1][:5], x * 2, False, None)]) is None  # dropout's own input
    assert lora_linear_group(x, [args[0], (*args[1][:6], True, None)]) is None  # an output left unused


def test_the_stacked_factors_are_kept_while_the_same_factors_come_back():
    cache = {}
    a, b = torch.randn(2, 4), torch.randn(3, 4)
    stacked = stack_factors([a, b], cache)
    assert torch.equal(stacked, torch.cat([a, b])) and stack_factors([a, b], cache) is stacked
    assert stack_factors([a, b.clone()], cache) is not stacked  # another factor tensor: stacked again


def _patched_and_plain(targets, dropout=0.0):
    from lorakit.fast import use_fast_kernels

    config = LoraConfig(r=4, lora_dropout=dropout, target_modules=targets, init_lora_weights=False)
    plain_model = get_peft_model(tiny_llama(), config).train()
    model = get_peft_model(tiny_llama(), config).train()
    assert use_fast_kernels(model)  # Llama: switched with or without Triton
    return model, plain_model


@pytest.mark.parametrize("targets, groups, singles", [("all-linear", [3, 2, 3, 2], 4),  # o_proj and down_proj
                                                      (["q_proj", "v_proj", "up_proj"], [2, 2], 2)])  # up_proj
def test_the_patched_model_runs_q_k_v_and_gate_up_as_groups(monkeypatch, targets, groups, singles):
    """Per layer q, k, v as one node and gate, up as another (the LoRA ones among them: with k_proj not
    adapted, q and v); the loss and every LoRA gradient as the plain model's."""
    import lorakit.fast.kernels.patch as patch
    import lorakit.lora.layer as layer

    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model, plain_model = _patched_and_plain(targets)
    plain_loss, plain = loss_and_grads(plain_model, {"input_ids": ids, "labels": ids})
    sizes, single = [], []
    monkeypatch.setattr(patch, "lora_linear_group", lambda x, m, c: sizes.append(len(m)) or lora_linear_group(x, m, c))
    monkeypatch.setattr(layer, "lora_linear", lambda *a: single.append(1) or lora_linear(*a))
    loss, grads = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert sizes == groups
    assert len(single) == singles  # the LoRA layers by themselves, one node each
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, plain[name], rtol=1e-4, atol=1e-6), name
    attention = model.get_base_model().model.layers[0].self_attn
    assert all("_lorakit_made" not in p.__dict__ for p in (attention.q_proj, attention.k_proj, attention.v_proj))


def test_the_layer_uses_it_only_where_it_computes_the_same(monkeypatch):
    import lorakit.lora.layer as layer

    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()
    calls = []
    monkeypatch.setattr(layer, "lora_linear", lambda *a: calls.append(1) or lora_linear(*a))
    fused_loss, fused = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert len(calls) == 14  # 7 projections x 2 layers
    monkeypatch.setattr(layer.LoraLinear, "_fusable_adapter", lambda self, x: None)
    plain_loss, plain = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert torch.allclose(fused_loss, plain_loss, atol=1e-6)
    for name, grad in fused.items():
        assert torch.allclose(grad, plain[name], rtol=1e-4, atol=1e-6), name


def test_dropout_masks_match_the_plain_path(monkeypatch):
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear",
                                                    init_lora_weights=False))
    model.train()
    torch.manual_seed(7)
    fused_loss, fused = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    assert q._fusable_adapter(torch.randn(2, 32)) == "default"
    import lorakit.lora.layer as layer

    monkeypatch.setattr(layer.LoraLinear, "_fusable_adapter", lambda self, x: None)
    torch.manual_seed(7)  # the same dropout masks, drawn in the same order
    plain_loss, plain = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert torch.allclose(fused_loss, plain_loss, atol=1e-6)
    for name, grad in fused.items():
        assert torch.allclose(grad, plain[name], rtol=1e-4, atol=1e-6), name


def test_merge_routing_and_other_dtypes_take_the_plain_path():
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_dropout=0.1, target_modules=["q_proj"]))
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32)
    model.eval()
    assert q._fusable_adapter(x) == "default"
    assert q._fusable_adapter(x.double()) is None
    model.merge_adapter()
    assert q._fusable_adapter(x) is None
    model.unmerge_adapter()
    with model.disable_adapter():
        assert q._fusable_adapter(x) is None
    assert isinstance(q.base_layer, nn.Linear)


def test_under_autocast_fp32_factors_on_a_bf16_base_take_the_fused_path(monkeypatch):
    """Mixed precision as PEFT runs it (bf16 base, fp32 LoRA factors, bf16 autocast): the fused function
    casts the factors as autocast would; its loss and factor gradients are as close to a float64 run of
    the same weights as the plain path's are."""
    import copy

    import lorakit.lora.layer as layer

    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model = get_peft_model(tiny_llama().to(torch.bfloat16),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.data = p.data.float()
    model.train()
    _, exact = loss_and_grads(copy.deepcopy(model).double(), {"input_ids": ids, "labels": ids})
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(2, 32, dtype=torch.bfloat16)
    assert q._fusable_adapter(x) is None  # fp32 factors, bf16 input, no autocast: the plain path's fp32 branch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert q._fusable_adapter(x) == "default"
        assert q._fusable_adapter(x.float()) is None  # input not in autocast's dtype
        _, fused = loss_and_grads(model, {"input_ids": ids, "labels": ids})
        monkeypatch.setattr(layer.LoraLinear, "_fusable_adapter", lambda self, x: None)
        _, plain = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    fused_err = torch.tensor([rel_err(fused[n].double(), exact[n]) for n in exact])
    plain_err = torch.tensor([rel_err(plain[n].double(), exact[n]) for n in exact])
    assert all(g.dtype == torch.float32 for g in fused.values())
    assert fused_err.max() < 0.1 and fused_err.mean() <= 1.5 * plain_err.mean(), (fused_err, plain_err)


def test_the_kept_factor_casts_follow_every_change_of_the_factors(tmp_path, monkeypatch):
    import lorakit.lora.layer as layer
    from lorakit.lora.files import load_into, read_adapter_tensors

    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)).train()
    q = model.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32)
    assert q.fused_args(x)[-1][0] is q.fused_args(x)[-1][0]  # unchanged factors: made once, then kept

    def fused_equals_plain():
        fused_loss, _ = loss_and_grads(model, batch)
        with monkeypatch.context() as m:
            m.setattr(layer.LoraLinear, "_fusable_adapter", lambda self, x: None)
            plain_loss, _ = loss_and_grads(model, batch)
        return torch.allclose(fused_loss, plain_loss, atol=1e-6)

    assert fused_equals_plain()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    loss_and_grads(model, batch)
    optimizer.step()  # in place through the parameters
    assert fused_equals_plain()
    fused_adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1, fused=True)
    loss_and_grads(model, batch)
    versions = [p._version for p in fused_adamw.param_groups[0]["params"]]
    fused_adamw.step()  # writes the parameters without bumping their versions
    assert versions == [p._version for p in fused_adamw.param_groups[0]["params"]], \
        "fused AdamW now bumps versions: the optimizer-step count in the cache key is no longer needed"
    assert fused_equals_plain()
    model.save_pretrained(tmp_path)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.mul_(0.5)
    assert fused_equals_plain()
    load_into(model.base_model.model, "default", read_adapter_tensors(tmp_path), "none", str(tmp_path))  # same parameters
    assert fused_equals_plain()


def test_with_dropout_the_patched_model_draws_each_mask_once_as_the_plain_path_does():
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    model, plain_model = _patched_and_plain("all-linear", dropout=0.3)
    torch.manual_seed(7)
    loss, grads = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    torch.manual_seed(7)
    plain_loss, plain = loss_and_grads(plain_model, {"input_ids": ids, "labels": ids})
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, plain[name], rtol=1e-4, atol=1e-6), name


def test_a_bias_that_trains_gets_its_gradient_on_the_fused_path(monkeypatch):
    """bias="all" on a model with biased q/k/v (Qwen2): the fused single and grouped paths give each bias
    the plain path's gradient (the group hands biased members that train to the single function)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import lorakit.lora.layer as layer
    from lorakit.fast import use_fast_kernels

    def model():
        torch.manual_seed(0)
        base = Qwen2ForCausalLM(Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
        return get_peft_model(base, LoraConfig(r=4, target_modules="all-linear", bias="all",
                                               init_lora_weights=False)).train()

    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids}
    fused, grouped = model(), model()
    use_fast_kernels(grouped)
    fused_loss, fused_grads = loss_and_grads(fused, batch)
    grouped_loss, grouped_grads = loss_and_grads(grouped, batch)
    monkeypatch.setattr(layer.LoraLinear, "_fusable_adapter", lambda self, x: None)
    plain_loss, plain = loss_and_grads(fused, batch)
    assert any(name.endswith("q_proj.base_layer.bias") for name in plain)
    for loss, grads in ((fused_loss, fused_grads), (grouped_loss, grouped_grads)):
        assert torch.allclose(loss, plain_loss, atol=1e-6)
        assert grads.keys() == plain.keys()
        for name, grad in grads.items():
            assert torch.allclose(grad, plain[name], rtol=1e-4, atol=1e-6), name


def test_generation_with_the_patched_attention_matches_the_plain_model():
    """Greedy decoding with a key/value cache (one new token per attention call) through the q/k/v group
    gives the plain model's tokens."""
    model, plain_model = _patched_and_plain("all-linear")
    model.eval(), plain_model.eval()
    ids = torch.randint(3, 128, (2, 6), generator=torch.Generator().manual_seed(2))
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(model.generate(input_ids=ids, **settings), plain_model.generate(input_ids=ids, **settings))


def test_other_lora_variants_in_the_patched_model_are_left_to_their_own_layers(monkeypatch):
    """DoRA layers are not what the fused functions compute: no group forms, and the patched model's loss
    and gradients are the plain model's."""
    import lorakit.fast.kernels.patch as patch
    from lorakit.fast import use_fast_kernels

    config = LoraConfig(r=4, target_modules="all-linear", use_dora=True, init_lora_weights=False)
    plain_model, model = get_peft_model(tiny_llama(), config).train(), get_peft_model(tiny_llama(), config).train()
    assert use_fast_kernels(model)
    groups = []
    monkeypatch.setattr(patch, "lora_linear_group", lambda *a: groups.append(1) or lora_linear_group(*a))
    ids = torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(1))
    loss, grads = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    plain_loss, plain = loss_and_grads(plain_model, {"input_ids": ids, "labels": ids})
    assert groups == []
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, plain[name], rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("patched", [False, True])
def test_a_compiled_model_trains_as_the_eager_one_and_compiles_once(patched):
    """Under torch.compile the factor casts are made in the graph (no kept casts, whose pointer and
    version lookups Dynamo cannot trace and would recompile for): the same losses, step after step, as
    the eager model with the same fused optimizer, and no new graphs after the first step; also with
    use_fast_kernels' forwards (the q/k/v and gate/up nodes, the rotary wrapper)."""
    import torch._dynamo

    from lorakit.fast import use_fast_kernels

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(2))
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights="gaussian")
    losses, graphs = {}, []
    torch._dynamo.reset()
    for compiled in (False, True):
        model = get_peft_model(tiny_llama(), config).train()
        if patched:
            assert use_fast_kernels(model)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05, fused=True)
        run = torch.compile(model, backend="aot_eager") if compiled else model
        losses[compiled] = []
        for _ in range(4):
            loss = run(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses[compiled].append(loss.item())
            if compiled:
                graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    torch._dynamo.reset()
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)
    assert losses[False][2] < losses[False][0]  # the steps changed the model
    # (the patched forwards' group cache is empty on the first call and filled after: one more graph)
    assert graphs[1 if patched else 0] == graphs[-1], f"recompiled in steady state: graphs {graphs}"
