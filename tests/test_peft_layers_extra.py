"""PEFT's other layer types and options, with PEFT's semantics and files (issue 23): grouped convolutions,
nn.MultiheadAttention, DoRA on nn.Embedding, lora_bias, init_lora_weights="orthogonal", an Embedding LoRA under
FSDP(use_orig_params=True), and PEFT's errors and warnings where code matches on them."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, PeftModel, get_peft_model
from lorakit.errors import ConfigError

from .conftest import assert_close


@pytest.fixture(scope="module")
def peft():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import peft
    return peft


class Net(nn.Module):
    """Embedding -> Linear -> MultiheadAttention -> grouped Conv2d -> Linear (seq-first attention)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.lin0 = nn.Linear(16, 16)
        self.mha = nn.MultiheadAttention(16, 2)
        self.conv = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.lin1 = nn.Linear(16, 2)

    def forward(self, ids):
        h = self.lin0(self.emb(ids)).transpose(0, 1)  # (seq, batch, 16)
        h, _ = self.mha(h, h, h)
        c = self.conv(h.permute(1, 2, 0).unsqueeze(-1).expand(-1, -1, -1, 3))  # (batch, 16, seq, 3)
        return self.lin1(c.mean((2, 3)))


IDS = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))


def net() -> Net:
    torch.manual_seed(0)
    return Net().eval()


def out(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def randomize(model, scale: float = 0.1) -> None:
    """Non-identity adapters: every LoRA tensor (and DoRA magnitude) moved off its init."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(torch.randn_like(p) * scale)


def both_ways(peft, tmp_path, **kwargs) -> None:
    """lorakit's adapter loads in PEFT with the same outputs and keys, and PEFT's loads in lorakit."""
    config = dict(r=4, lora_alpha=8, init_lora_weights=False, **kwargs)
    ours = get_peft_model(net(), LoraConfig(**config))
    randomize(ours)
    assert (out(ours) - out(net())).abs().max() > 1e-3  # the adapter shows
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(net(), tmp_path / "ours")
    ours_keys = {k.replace(".default", "") for k in ours.state_dict() if "lora_" in k}
    assert ours_keys == {k.replace(".default", "") for k in theirs.state_dict() if "lora_" in k}
    assert_close(out(theirs), out(ours))

    theirs = peft.get_peft_model(net(), peft.LoraConfig(**config))
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    assert_close(out(PeftModel.from_pretrained(net(), tmp_path / "theirs")), out(theirs))


# ---------------------------------------------------------------------- grouped convolutions
@pytest.mark.parametrize("dora", [False, True])
def test_grouped_conv_matches_peft_both_ways(peft, tmp_path, dora):
    with pytest.warns(UserWarning, match="groups > 1. Merging is not supported"):
        get_peft_model(net(), LoraConfig(r=4, target_modules=["conv"]))
    both_ways(peft, tmp_path, target_modules=["conv"], use_dora=dora)


def test_grouped_conv_b_is_grouped_and_merge_is_refused():
    model = get_peft_model(net(), LoraConfig(r=8, target_modules=["conv"], init_lora_weights=False))
    layer = model.base_model.model.conv
    assert layer.lora_B["default"].weight.shape == (16, 2, 1, 1)  # (out, r / groups, 1, 1), as PEFT
    before = out(model)
    with pytest.raises(NotImplementedError, match="groups > 1"):
        model.merge_adapter()
    assert torch.equal(out(model), before) and not layer.merged_adapters


def test_grouped_conv_adapters_are_not_combined():
    model = get_peft_model(net(), LoraConfig(r=4, target_modules=["conv"]))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["conv"]))
    with pytest.raises(ValueError, match="grouped convolution"):
        model.add_weighted_adapter(["default", "other"], [0.5, 0.5], "mix", combination_type="cat")


def test_grouped_conv_rank_must_divide_by_groups():
    with pytest.raises(ValueError, match="rank is divisible by groups"):
        get_peft_model(net(), LoraConfig(r=6, target_modules=["conv"]))


# ---------------------------------------------------------------------- nn.MultiheadAttention
def test_mha_is_w_plus_delta_and_merges_exactly():
    model = get_peft_model(net(), LoraConfig(r=4, lora_alpha=8, target_modules=["mha"], init_lora_weights=False))
    randomize(model)
    layer = model.base_model.model.mha
    out_layer = layer.base_layer.out_proj
    reference = net()
    with torch.no_grad():  # a plain MultiheadAttention holding W + scaling * B A, for both projections
        reference.mha.in_proj_weight += layer.delta_weight("default")
        reference.mha.out_proj.weight += out_layer.delta_weight("default")
    assert_close(out(model), out(reference))
    merged = out(model)
    model.merge_adapter()
    assert_close(out(model), merged)
    model.unmerge_adapter()
    assert_close(layer.base_layer.in_proj_weight.detach(), net().mha.in_proj_weight.detach())
    plain = model.merge_and_unload()
    assert type(plain.mha) is nn.MultiheadAttention and type(plain.mha.out_proj) is not type(out_layer)
    assert_close(out(plain), merged)


def test_mha_trains_only_the_factors():
    model = get_peft_model(net(), LoraConfig(r=4, target_modules=["mha"]))
    model.train()
    model(IDS).sum().backward()
    grads = {n for n, p in model.named_parameters() if p.grad is not None}
    assert grads == {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.split(".mha.")[1] for n in grads} == {f"{where}lora_{f}.default.weight" for f in "AB"
                                                    for where in ("", "base_layer.out_proj.")}
    layer = model.base_model.model.mha
    assert layer.lora_B["default"].weight.grad.abs().max() > 0  # B starts at zero: its gradient is not
    assert not layer.base_layer.in_proj_weight.requires_grad


def test_mha_files_are_peft_files(peft, tmp_path):
    """Keys and shapes both ways. With out_proj's factors at zero the outputs match PEFT 0.21 exactly; PEFT 0.21
    adds out_proj's update twice (huggingface/peft#3774), lorakit once, so beyond that they differ on purpose."""
    ours = get_peft_model(net(), LoraConfig(r=4, target_modules=["mha"], init_lora_weights=False))
    randomize(ours)
    with torch.no_grad():
        ours.base_model.model.mha.base_layer.out_proj.lora_B["default"].weight.zero_()
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(net(), tmp_path)
    assert {k for k in theirs.state_dict() if "lora_" in k} == {k for k in ours.state_dict() if "lora_" in k}
    assert_close(out(theirs), out(ours))
    again = PeftModel.from_pretrained(net(), tmp_path)
    assert torch.equal(out(again), out(ours))


def test_mha_refuses_dora_and_mixed_batches():
    with pytest.raises(ValueError, match="does not support DoRA"):
        get_peft_model(net(), LoraConfig(target_modules=["mha"], use_dora=True))
    model = get_peft_model(net(), LoraConfig(target_modules=["mha"]))
    with pytest.raises(TypeError, match="mixed adapter batches"):
        model(IDS, adapter_names=["default"] * 3)


# ---------------------------------------------------------------------- DoRA on nn.Embedding
def test_dora_embedding_matches_peft_both_ways_and_merges(peft, tmp_path):
    both_ways(peft, tmp_path, target_modules=["emb"], use_dora=True)
    model = get_peft_model(net(), LoraConfig(r=4, target_modules=["emb"], use_dora=True, init_lora_weights=False))
    randomize(model)
    unmerged = out(model)
    assert_close(out(model.merge_and_unload()), unmerged)


# ---------------------------------------------------------------------- lora_bias
def test_lora_bias_matches_peft_both_ways(peft, tmp_path):
    both_ways(peft, tmp_path, target_modules=["lin0", "lin1"], lora_bias=True)


def test_lora_bias_is_saved_merged_and_unmerged_exactly(tmp_path):
    model = get_peft_model(net(), LoraConfig(r=4, lora_alpha=8, target_modules=["lin0"], lora_bias=True,
                                             init_lora_weights=False))
    randomize(model)
    layer = model.base_model.model.lin0
    assert layer.lora_B["default"].bias.requires_grad
    fresh = get_peft_model(net(), LoraConfig(target_modules=["lin0"], lora_bias=True))
    assert not fresh.base_model.model.lin0.lora_B["default"].bias.any()  # starts at zero, as PEFT's
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    assert "base_model.model.lin0.lora_B.bias" in load_file(tmp_path / "adapter_model.safetensors")
    bias_before, unmerged = layer.base_layer.bias.clone(), out(model)
    model.merge_adapter()
    expected = bias_before + layer.scaling["default"] * layer.lora_B["default"].bias
    assert_close(layer.base_layer.bias.detach(), expected.detach())
    assert_close(out(model), unmerged)
    model.unmerge_adapter()
    assert_close(layer.base_layer.bias.detach(), bias_before)


def test_lora_bias_without_a_base_bias_warns_and_refuses_to_merge():
    base = net()
    base.lin0 = nn.Linear(16, 16, bias=False)
    with pytest.warns(UserWarning, match="has no bias"):
        model = get_peft_model(base, LoraConfig(target_modules=["lin0"], lora_bias=True))
    with pytest.raises(RuntimeError, match="Impossible to merge LoRA with `lora_bias=True`"):
        model.merge_adapter()


def test_lora_bias_refusals():
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"], lora_bias=True))
    model.add_adapter("plain", LoraConfig(target_modules=["lin0"]))
    with pytest.raises(ValueError, match="lora_bias cannot be combined"):  # its bias would be dropped silently
        model.add_weighted_adapter(["default", "plain"], [0.5, 0.5], "mix", combination_type="linear")
    with pytest.raises(ConfigError, match="not supported for DoRA"):
        LoraConfig(lora_bias=True, use_dora=True)
    with pytest.raises(ConfigError, match="only supported with init_lora_weights=True or False"):
        LoraConfig(lora_bias=True, init_lora_weights="pissa")
    with pytest.raises(ValueError, match="not supported for Embedding"):
        get_peft_model(net(), LoraConfig(target_modules=["emb"], lora_bias=True))


# ---------------------------------------------------------------------- init_lora_weights="orthogonal"
def test_orthogonal_init_starts_at_zero_with_both_factors_nonzero(peft, tmp_path):
    model = get_peft_model(net(), LoraConfig(r=4, target_modules=["lin0", "lin1"], init_lora_weights="orthogonal"))
    for name in ("lin0", "lin1"):
        layer = model.base_model.model.get_submodule(name)
        A, B = layer.factor_matrices("default")
        assert A.abs().max() > 1e-3 and B.abs().max() > 1e-3
        assert (B @ A).abs().max() < 1e-6
    assert_close(out(model), out(net()))
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == "orthogonal"
    peft.PeftModel.from_pretrained(net(), tmp_path)  # PEFT reads the config


def test_orthogonal_init_needs_an_even_rank_and_a_linear_layer():
    with pytest.raises(ValueError, match="requires the LoRA rank to be even, got 3 instead"):
        get_peft_model(net(), LoraConfig(r=3, target_modules=["lin0"], init_lora_weights="orthogonal"))
    with pytest.raises(ValueError, match="'orthogonal' is supported for linear layers only"):
        get_peft_model(nn.Sequential(nn.Conv1d(4, 4, 3)), LoraConfig(r=4, target_modules=["0"],
                                                                    init_lora_weights="orthogonal"))


# ---------------------------------------------------------------------- FSDP(use_orig_params=True)
@pytest.mark.parametrize("target, dora", [("emb", False), ("emb", True), ("mha", False)])
def test_lora_under_fsdp_orig_params(target, dora):
    """FSDP(use_orig_params=True) holds an embedding's factors as plain tensors, and MultiheadAttention's weights
    as plain-tensor views in the module's instance dict: both forwards must still see the adapter."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    from lorakit import get_peft_model_state_dict, set_peft_model_state_dict

    if dist.is_initialized():
        pytest.skip("a process group exists already")
    dist.init_process_group(backend="gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        config = dict(target_modules=[target], use_dora=dora)
        model = get_peft_model(net(), LoraConfig(init_lora_weights=False, **config)).eval()
        randomize(model)
        expected = out(model)
        wrapped = FSDP(model, use_orig_params=True, device_id=torch.device("cpu"))
        assert_close(out(wrapped), expected)
        state = get_peft_model_state_dict(wrapped)
    finally:
        dist.destroy_process_group()
    fresh = get_peft_model(net(), LoraConfig(**config)).eval()
    set_peft_model_state_dict(fresh, state)
    assert_close(out(fresh), expected)


# ---------------------------------------------------------------------- PEFT's errors and warnings
def test_peft_messages_for_delete_and_merge():
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    with pytest.raises(ValueError, match="Adapter unknown-adapter does not exist"):
        model.delete_adapter("unknown-adapter")
    model.merge_adapter()
    with pytest.warns(UserWarning, match="All adapters are already merged, nothing to do"):
        model.merge_adapter()
    with pytest.raises(ValueError, match=r"Cannot delete adapter\(s\) \['default'\] while they are merged"):
        model.delete_adapter("default")
    assert "default" in model.peft_config and model.base_model.model.lin0.merged_adapters == ["default"]
    model.add_adapter("other", LoraConfig(target_modules=["lin0"], init_lora_weights=False))
    with pytest.warns(UserWarning, match="Already following adapters were merged default. You are now "
                                         "additionally merging other."):
        model.merge_adapter(["other"])
    assert model.base_model.model.lin0.merged_adapters == ["default", "other"]


def test_only_one_adapter_may_train_biases():
    model = get_peft_model(net(), LoraConfig(target_modules=["lin0"], bias="all"))
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("second", LoraConfig(target_modules=["lin0"], bias="lora_only"))
    assert "second" not in model.peft_config
    model.add_adapter("third", LoraConfig(target_modules=["lin0"]))  # bias="none" is fine


# ---------------------------------------------------------------------- ensure_weight_tying
class TiedLM(nn.Module):
    """A causal LM whose output head is its input embedding (PEFT's test model, small)."""

    _tied_weights_keys = ["lm_head.weight"]

    class Config:
        def __init__(self, tie: bool):
            self.tie_word_embeddings = tie

        def to_dict(self):
            return {"tie_word_embeddings": self.tie_word_embeddings}

    def __init__(self, tie: bool = True, config_tie: bool = True):
        super().__init__()
        torch.manual_seed(5)
        self.model = nn.ModuleDict({"embed_tokens": nn.Embedding(30, 30), "linear": nn.Linear(30, 30)})
        self.lm_head = nn.Linear(30, 30, bias=False)
        self.config = self.Config(config_tie)
        if tie:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def get_output_embeddings(self):
        return self.lm_head

    def prepare_inputs_for_generation(self):
        return

    def forward(self, ids):
        return self.lm_head(self.model.linear(self.model.embed_tokens(ids)))


TOKENS = torch.randint(0, 30, (2, 4), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("spec", [dict(target_modules=["linear", "lm_head"]),
                                  dict(target_modules=".*(linear|lm_head)$"),
                                  dict(target_modules=["linear"], modules_to_save=["lm_head"])])
def test_ensure_weight_tying_keeps_head_and_embedding_tied_and_matches_peft(peft, tmp_path, spec):
    model = get_peft_model(TiedLM(), LoraConfig(ensure_weight_tying=True, **spec))
    inner = model.base_model.model
    emb, head = inner.model.embed_tokens, inner.lm_head
    if "modules_to_save" in spec:
        assert head.modules_to_save["default"].weight is emb.modules_to_save["default"].weight
        assert model.peft_config["default"].modules_to_save == ["model.embed_tokens"]  # resolved, as PEFT
    else:
        assert head.lora_A["default"].weight.data_ptr() == emb.lora_embedding_B["default"].data_ptr()
        assert head.lora_B["default"].weight.data_ptr() == emb.lora_embedding_A["default"].data_ptr()
        assert torch.equal(head.lora_A["default"].weight, emb.lora_embedding_B["default"].T)
    randomize(model)
    with torch.no_grad():
        ours = model(TOKENS)
    model.save_pretrained(tmp_path / "ours")
    with torch.no_grad():
        assert_close(peft.PeftModel.from_pretrained(TiedLM(), tmp_path / "ours")(TOKENS), ours)
        assert_close(PeftModel.from_pretrained(TiedLM(), tmp_path / "ours")(TOKENS), ours)

    theirs = peft.get_peft_model(TiedLM(), peft.LoraConfig(ensure_weight_tying=True, **spec))
    randomize(theirs)
    theirs.save_pretrained(tmp_path / "theirs")
    with torch.no_grad():
        assert_close(PeftModel.from_pretrained(TiedLM(), tmp_path / "theirs")(TOKENS), theirs(TOKENS))


def test_ensure_weight_tying_warnings_are_peft_s():
    with pytest.warns(UserWarning, match="no tied modules were found in the model"):
        get_peft_model(TiedLM(tie=False), LoraConfig(target_modules=["lm_head"], ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="no tied modules were found in the model"):  # config says untied
        get_peft_model(TiedLM(config_tie=False), LoraConfig(target_modules=["lm_head"], ensure_weight_tying=True))
    with pytest.warns(UserWarning, match="no tied modules are added"):
        model = get_peft_model(TiedLM(), LoraConfig(target_modules=["linear"], ensure_weight_tying=True))
    assert type(model.base_model.model.lm_head) is nn.Linear
    with pytest.warns(UserWarning, match="`ensure_weight_tying` is not set to True"):
        model = get_peft_model(TiedLM(), LoraConfig(target_modules=["lm_head"]))
    assert not hasattr(model.base_model.model.model.embed_tokens, "lora_embedding_A")  # untied: the head alone


# ---------------------------------------------------------------------- the PEFT-suite count (tools/)
def test_peft_suite_count_reads_run_sh_results(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("peft_suite_count",
                                                  Path(__file__).parents[1] / "tools" / "peft_suite_count.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    def report(run, test, outcome, **extra):
        return json.dumps({"nodeid": f"suite_{run}/tests/t.py::{test}", "when": "call", "outcome": outcome, **extra})

    (tmp_path / "results_peft.jsonl").write_text("\n".join(report("peft", t, "passed") for t in "abcd"))
    (tmp_path / "results_lorakit.jsonl").write_text("\n".join([
        report("lorakit", "a", "passed"), report("lorakit", "b", "passed"),
        report("lorakit", "c", "failed", exc_type="lorakit.errors.ConfigError",
               msg="uses PEFT features lorakit does not compute: use_bdlora=True"),
        report("lorakit", "d", "failed", exc_type="builtins.AttributeError", msg="no attribute 'x'")]))
    assert tool.main(["--no-run", "--work", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| lorakit | 4 | 2 | 2 | 0 | 0 | 0 |" in printed and "| real peft (control) | 4 | 4 |" in printed
    assert "2 of the 4 tests real peft passes (50.0%)" in printed
    assert "outside the 1 that test refused research variants: 2 of 3 (66.7%)" in printed
    assert "AttributeError/TypeError crashes among them: 1." in printed
