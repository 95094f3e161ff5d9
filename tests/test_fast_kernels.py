"""The Triton kernels against the plain PyTorch they replace: outputs and gradients within bf16 rounding.

On a machine without a GPU the kernels run on CPU tensors through Triton's interpreter; with one (the
device tool) the same tests run them on CUDA.
"""
import importlib

import pytest
import torch

pytest.importorskip("triton", reason="the kernels are Triton; without it lorakit runs the plain code")

from tests.conftest import loss_and_grads, rel_err, tiny_llama  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODULES = ["rms_norm", "swiglu", "rotary", "cross_entropy", "patch"]
BF16 = 1e-2  # bf16 operands: relative errors land between 1e-3 and 1e-2


@pytest.fixture(scope="module")
def k():
    """The kernel modules (compiled for the GPU, or interpreted on CPU: see conftest)."""
    import lorakit.fast.kernels  # noqa: F401

    return type("Kernels", (), {name: importlib.import_module(f"lorakit.fast.kernels.{name}") for name in MODULES})


def _randn(*shape, dtype=torch.bfloat16, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DEVICE, dtype).requires_grad_(grad)


def _check(kernel_out, ref_out, inputs, tol=BF16):
    """Outputs close to the float64 reference's; gradients (for one random upstream) as well."""
    assert all(torch.isfinite(o).all() for o in kernel_out)
    for o, r in zip(kernel_out, ref_out):
        assert rel_err(o, r) < tol
    ups = [torch.randn(r.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9)) for r in ref_out]
    got = torch.autograd.grad(kernel_out, inputs, [u.to(o.device, o.dtype) for u, o in zip(ups, kernel_out)])
    exact_inputs = [x.detach().double().cpu().requires_grad_() for x in inputs]
    return got, ups, exact_inputs


@pytest.mark.parametrize("shape", [(3, 7, 64), (5, 96)])  # 96: a width that is not a power of two
def test_rms_norm(k, shape):
    x = _randn(*shape)
    w = _randn(shape[-1], seed=1, grad=False)
    y = k.rms_norm.rms_norm(x, w, 1e-6)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    xd = x.detach().double().cpu().requires_grad_()
    ref = k.rms_norm.rms_norm_reference(xd, w.double().cpu(), 1e-6)
    got, ups, _ = _check([y], [ref], [x])
    (exact,) = torch.autograd.grad(ref, xd, ups[0])
    assert rel_err(got[0].cpu(), exact) < BF16
    with pytest.raises(ValueError, match="no weight gradient"):
        k.rms_norm.rms_norm(x, w.detach().requires_grad_(), 1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, (1e-6, 1e-5)), (torch.bfloat16, (1e-2, 2e-2))])
def test_rms_norm_torch_is_transformers_norm(k, dtype, tol):
    """The torch-ops path (norms off the GPU) gives transformers' values and input gradients, in fp32 and in bf16
    (the CPU bf16 training path: fp32 arithmetic, rounded where transformers rounds), and refuses what it does not
    compute (a trained weight, a weight of another dtype)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(96, eps=1e-5).to(DEVICE).requires_grad_(False)
    with torch.no_grad():
        norm.weight.copy_(_randn(96, dtype=torch.float32, seed=1, grad=False))
    norm.to(dtype)
    x = (_randn(3, 7, 96, dtype=torch.float32) * 5).to(dtype).detach().requires_grad_()
    up = _randn(3, 7, 96, dtype=torch.float32, seed=2, grad=False).to(dtype)
    got, expected = k.rms_norm.rms_norm_torch(x, norm.weight, 1e-5), norm(x)
    assert got.dtype == expected.dtype == dtype
    torch.testing.assert_close(got, expected, rtol=tol[0], atol=tol[0])
    torch.testing.assert_close(torch.autograd.grad(got, x, up)[0], torch.autograd.grad(expected, x, up)[0],
                               rtol=tol[1], atol=tol[1])
    other = torch.float32 if dtype == torch.bfloat16 else torch.bfloat16
    for bad in (norm.weight.detach().requires_grad_(), norm.weight.to(other)):
        with pytest.raises(ValueError, match="frozen weight of x's"):
            k.rms_norm.rms_norm_torch(x, bad, 1e-5)


def test_silu_mul(k):
    gate, up = _randn(4, 9, 300), _randn(4, 9, 300, seed=1)  # 10,800 elements: a partial last block
    y = k.swiglu.silu_mul(gate * 1, up * 1)  # copies: the backward reuses their memory for the gradients
    gd, ud = (t.detach().double().cpu().requires_grad_() for t in (gate, up))
    ref = k.swiglu.silu_mul_reference(gd, ud)
    got, ups, _ = _check([y], [ref], [gate, up])
    exact = torch.autograd.grad(ref, (gd, ud), ups[0])
    for g_, e in zip(got, exact):
        assert rel_err(g_.cpu(), e) < BF16


@pytest.mark.parametrize("impl", ["rotary", "rotary_torch"])  # the kernel, and its arithmetic in torch ops
@pytest.mark.parametrize("cos_batch", [2, 1])
def test_rotary_on_transposed_views(k, cos_batch, impl):
    batch, seq, q_heads, k_heads, dim = 2, 5, 4, 2, 16
    # as transformers hands them over: (b, s, h, d) projections viewed as (b, h, s, d)
    q = _randn(batch, seq, q_heads, dim).transpose(1, 2)
    kk = _randn(batch, seq, k_heads, dim, seed=1).transpose(1, 2)
    angles = torch.rand(cos_batch, seq, dim, generator=torch.Generator().manual_seed(2)) * 6
    cos, sin = angles.cos().to(DEVICE, torch.bfloat16), angles.sin().to(DEVICE, torch.bfloat16)
    assert k.rotary.rotary_supported(q, kk, cos, sin)
    qo, ko = getattr(k.rotary, impl)(q, kk, cos, sin)
    assert qo.stride() == q.stride() and ko.stride() == kk.stride()
    qd, kd = (t.detach().double().cpu().requires_grad_() for t in (q, kk))
    ref = k.rotary.rotary_reference(qd, kd, cos.double().cpu(), sin.double().cpu())
    got, ups, _ = _check([qo, ko], list(ref), [q, kk])
    exact = torch.autograd.grad(ref, (qd, kd), ups)
    for g_, e in zip(got, exact):
        assert rel_err(g_.cpu(), e) < BF16


@pytest.mark.parametrize("impl", ["rotary", "rotary_torch"])
def test_rotary_backward_takes_gradients_in_any_layout(k, impl):
    """Upstream gradients whose last dimension is not contiguous give the reference's gradients too."""
    q, kk = _randn(1, 3, 2, 8).transpose(1, 2), _randn(1, 3, 1, 8, seed=1).transpose(1, 2)  # (1, h, 3, 8)
    angles = torch.rand(1, 3, 8, generator=torch.Generator().manual_seed(2)) * 6
    cos, sin = angles.cos().to(DEVICE, torch.bfloat16), angles.sin().to(DEVICE, torch.bfloat16)
    ups = [torch.randn(1, h, 8, 3, generator=torch.Generator().manual_seed(h)).transpose(-1, -2) for h in (2, 1)]
    assert all(u.stride(-1) != 1 for u in ups)
    got = torch.autograd.grad(getattr(k.rotary, impl)(q, kk, cos, sin), (q, kk),
                              [u.to(DEVICE, torch.bfloat16) for u in ups])
    qd, kd = (t.detach().double().cpu().requires_grad_() for t in (q, kk))
    ref = k.rotary.rotary_reference(qd, kd, cos.double().cpu(), sin.double().cpu())
    for g_, e in zip(got, torch.autograd.grad(ref, (qd, kd), [u.double() for u in ups])):
        assert rel_err(g_, e) < BF16


def test_rotary_torch_is_transformers_rotary_in_fp32(k):
    """The torch-ops path (what CPU tensors take) gives transformers' values and gradients in fp32, up to
    the order of two roundings."""
    from transformers.models.llama import modeling_llama

    # transformers' own function, also when use_fast_kernels has wrapped the module's name in this process
    apply_rotary_pos_emb = getattr(modeling_llama.apply_rotary_pos_emb, "lorakit_original",
                                   modeling_llama.apply_rotary_pos_emb)
    q = _randn(2, 6, 3, 8, dtype=torch.float32).transpose(1, 2)
    kk = _randn(2, 6, 1, 8, dtype=torch.float32, seed=1).transpose(1, 2)
    angles = torch.rand(1, 6, 4, generator=torch.Generator().manual_seed(2)).repeat(1, 1, 2) * 6  # halves alike
    cos, sin = angles.cos().to(DEVICE), angles.sin().to(DEVICE)
    got, expected = k.rotary.rotary_torch(q, kk, cos, sin), apply_rotary_pos_emb(q, kk, cos, sin)
    ups = [torch.randn(t.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE) for t in expected]
    for a, b in zip(got + torch.autograd.grad(got, (q, kk), ups),
                    expected + torch.autograd.grad(expected, (q, kk), ups)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_cross_entropy_grad(k):
    rows, vocab = 6, 9000  # vocab: three blocks, the last partial
    logits = (_randn(rows, vocab, grad=False) * 4)
    targets = torch.tensor([0, 8999, 4095, 4096, 17, 3], device=DEVICE)
    ref_loss, _ = k.cross_entropy.cross_entropy_grad_reference(logits.double(), targets)
    z = logits.double().requires_grad_()
    exact_grad = torch.autograd.grad(torch.nn.functional.cross_entropy(z, targets, reduction="sum"), z)[0]
    buf = logits.clone()
    loss = k.cross_entropy.cross_entropy_grad_(buf, targets)
    assert loss.dtype == torch.float32
    assert rel_err(loss, ref_loss) < 1e-5  # fp32 arithmetic on the same bf16 logits
    assert rel_err(buf, exact_grad) < BF16  # the block now holds its gradient, rounded to bf16


def test_use_fast_kernels_matches_the_model_and_its_lora_gradients(k, monkeypatch):
    """A tiny Llama with LoRA, kernels switched in (forced onto CPU tensors under the interpreter):
    loss and every LoRA gradient as the unpatched model gives them."""
    from lorakit import LoraConfig, get_peft_model

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    model = get_peft_model(tiny_llama().to(DEVICE, torch.bfloat16),
                           LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()

    batch = {"input_ids": ids, "labels": ids}
    plain_loss, plain = loss_and_grads(model, batch)
    monkeypatch.setattr(k.patch, "triton_runs", lambda t: True)
    switched = k.patch.use_fast_kernels(model)
    assert switched == ["rms_norm x5", "silu_mul x2", "qkv_group x2", "rotary"]  # 2 layers x 2 norms + the final one
    calls = []
    for name in ("rms_norm", "silu_mul", "rotary"):
        original = getattr(k.patch, name)
        monkeypatch.setattr(k.patch, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a))
    fast_loss, fast = loss_and_grads(model, batch)
    assert sorted(set(calls)) == ["rms_norm", "rotary", "silu_mul"] and len(calls) == 5 + 2 + 2
    assert abs(fast_loss.float() - plain_loss.float()) < 2e-2 * plain_loss.float()
    errors = [rel_err(fast[n], plain[n]) for n in plain]
    assert max(errors) < 0.1 and sum(errors) / len(errors) < 3e-2, errors


def test_other_models_are_left_alone_and_without_triton_no_kernel_runs(k, monkeypatch):
    """Other model types are not touched. Without Triton (triton_runs is then always False) a Llama is
    still switched, its loss and LoRA gradients are the plain model's in fp32, and no Triton kernel is called."""
    from lorakit import LoraConfig, get_peft_model
    from tests.conftest import tiny_gpt2

    assert k.patch.use_fast_kernels(tiny_gpt2()) == []
    monkeypatch.setattr(k.patch, "triton_runs", lambda t: False)
    for name in ("rms_norm", "silu_mul", "rotary"):
        monkeypatch.setattr(k.patch, name, lambda *a, _n=name: pytest.fail(f"the Triton {_n} was called"))
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    config = LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    plain_loss, plain = loss_and_grads(get_peft_model(tiny_llama(), config).train(), {"input_ids": ids, "labels": ids})
    model = get_peft_model(tiny_llama(), config).train()
    assert k.patch.use_fast_kernels(model) == ["rms_norm x5", "silu_mul x2", "qkv_group x2", "rotary"]
    loss, grads = loss_and_grads(model, {"input_ids": ids, "labels": ids})
    assert torch.allclose(loss, plain_loss, atol=1e-6)
    for name, grad in grads.items():
        assert torch.allclose(grad, plain[name], rtol=1e-4, atol=1e-6), name


def test_fast_forwards_survive_train_and_eval_of_a_loaded_model(k, tmp_path):
    """transformers kernelizes a model loaded with from_pretrained (when the `kernels` package is installed) and
    again at each train()/eval() that changes the mode, which puts the class's forward back on its RMSNorms: after
    use_fast_kernels, every switched module keeps lorakit's forward through train() and eval()."""
    from transformers import LlamaForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    model = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert k.patch.use_fast_kernels(model)[:2] == ["rms_norm x5", "silu_mul x2"]
    switched = [m for m in model.modules() if "forward" in m.__dict__]
    assert len(switched) == 5 + 2 + 2  # the norms, the MLPs, the attentions
    for mode in (True, False, True):
        model.train(mode)
        assert all("forward" in m.__dict__ for m in switched), f"lost after train({mode})"


def test_nf4_dequantize_gives_torchaos_values(k):
    pytest.importorskip("torchao", reason="QLoRA's NF4 comes from torchao")
    from lorakit.fast.kernels.nf4 import nf4_dequantize
    from lorakit.quant.nf4 import quantize_weight

    w = torch.randn(96, 200, generator=torch.Generator().manual_seed(3)).to(DEVICE)  # 300 blocks, scaler block 150
    q = quantize_weight(w, torch.bfloat16)
    expected, got = q.get_original_weight(), nf4_dequantize(q)
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.bfloat16
    if DEVICE == "cuda":
        assert torch.equal(got, expected)
    else:  # the interpreter rounds fp32 -> bf16 toward zero where CUDA (and torch) round to nearest even
        ulp = expected.float().abs() * 2 ** -7
        assert ((got.float() - expected.float()).abs() <= ulp).all()


def test_qlora_layers_take_the_kernel_path_with_the_same_gradients(k, monkeypatch):
    """A QLoRA tiny Llama: with the NF4 kernel path forced on (interpreted on CPU) the loss and LoRA
    gradients match torchao's path, and nothing but the LoRA factors gets a gradient."""
    pytest.importorskip("torchao", reason="QLoRA's NF4 comes from torchao")
    import lorakit.quant.nf4 as nf4
    from lorakit import LoraConfig, get_peft_model
    from lorakit.quant import quantize_model

    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    model = quantize_model(tiny_llama().to(DEVICE), "nf4")
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    model.train()

    batch = {"input_ids": ids, "labels": ids}
    plain_loss, plain = loss_and_grads(model, batch)
    calls = []
    original = nf4._NF4Linear.apply
    monkeypatch.setattr(nf4, "triton_runs", lambda t: True)
    monkeypatch.setattr(nf4._NF4Linear, "apply", lambda *a: calls.append(1) or original(*a))
    fast_loss, fast = loss_and_grads(model, batch)
    assert len(calls) == 14  # 7 projections x 2 layers
    assert set(fast) == set(plain) and all("lora_" in n for n in fast)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    assert abs(fast_loss - plain_loss) < 1e-2 * plain_loss
    errors = [rel_err(fast[n], plain[n]) for n in plain]
    assert max(errors) < 0.05, errors
