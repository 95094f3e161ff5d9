"""Adapters move between lorakit and the real PEFT library in both directions with the same outputs."""
import pytest
import torch

import lorakit
from tests.conftest import assert_close, tiny_bert, tiny_gpt2, tiny_llama

peft = pytest.importorskip("peft", reason="PEFT is a test dependency (pip install -e .[test])")

CASES = {
    "llama": (lambda: tiny_llama(), dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"],
                                         task_type="CAUSAL_LM")),
    "gpt2": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], task_type="CAUSAL_LM")),
    "bert": (lambda: tiny_bert("seq_cls"), dict(target_modules=["query", "value"], task_type="SEQ_CLS")),
    "llama-seqcls": (lambda: tiny_llama("seq_cls"), dict(target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS")),
}
VARIANTS = {"lora": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}


def _ids():
    return torch.randint(1, 128, (2, 6), generator=torch.Generator().manual_seed(7))


def _randomise(model):
    """Training stand-in: move every trainable tensor (heads included) away from its init."""
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=g).to(p.dtype))


def _logits(model):
    return model(input_ids=_ids()).logits


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_lorakit_adapter_loads_in_peft(case, variant, tmp_path):
    make, kwargs = CASES[case]
    ours = lorakit.get_peft_model(make(), lorakit.LoraConfig(r=4, lora_alpha=8, **kwargs, **VARIANTS[variant]))
    _randomise(ours)
    expected = _logits(ours.eval())
    ours.save_pretrained(tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert_close(_logits(theirs), expected)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_adapter_loads_in_lorakit(case, variant, tmp_path):
    make, kwargs = CASES[case]
    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, **kwargs, **VARIANTS[variant]),
                                 autocast_adapter_dtype=False)
    _randomise(theirs)
    expected = _logits(theirs.eval())
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(make(), tmp_path).eval()
    assert_close(_logits(ours), expected)
    assert_close(_logits(ours.merge_and_unload()), expected)


def test_peft_embedding_adapter_loads_in_lorakit(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    _randomise(theirs)
    expected = _logits(theirs.eval())
    theirs.save_pretrained(tmp_path)  # PEFT also saves the full embedding weight here
    ours = lorakit.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close(_logits(ours), expected)


def test_seeds_workflow_with_only_the_import_changed(tmp_path):
    """The SPEC's PEFT snippet, verbatim but for the import, through to a merged model transformers loads."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, PeftModel, get_peft_model

    config = LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                        lora_dropout=0.05, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(tiny_llama(), config)
    model.print_trainable_parameters()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(input_ids=_ids(), labels=_ids()).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    expected = _logits(model)
    model.save_pretrained(tmp_path / "adapter")
    model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    merged = model.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(_logits(plain), expected)


@pytest.mark.parametrize("direction", ["lorakit->peft", "peft->lorakit"])
def test_dora_on_convolutions_moves_both_ways_with_peft_keys_and_shapes(direction, tmp_path, toy_inputs):
    """Files, and whole-model state dicts, match PEFT's key for key and shape for shape (a conv's magnitude
    is (1, out, 1, ...))."""
    import copy

    from tests.conftest import ToyNet

    base = ToyNet()
    config = dict(r=2, target_modules=["conv", "conv1d", "fc1"], use_dora=True)
    ours = lorakit.get_peft_model(copy.deepcopy(base), lorakit.LoraConfig(**config))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    source, target_lib = (ours, peft) if direction == "lorakit->peft" else (theirs, lorakit)
    _randomise(source)
    expected = source.eval()(*toy_inputs)
    source.save_pretrained(tmp_path)
    assert_close(target_lib.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()(*toy_inputs), expected)
    other = ours if source is theirs else theirs
    other.load_state_dict(source.state_dict())
    assert_close(other.eval()(*toy_inputs), expected)


@pytest.mark.parametrize("saver", ["lorakit", "peft"])
def test_an_embedding_adapter_over_a_resized_vocabulary_brings_its_new_rows(saver, tmp_path):
    """Added tokens: resize, LoRA on embed_tokens, save; the file carries the embedding (PEFT's 'auto'), so a
    base resized again (new rows drawn afresh) gives the trained model's outputs in both libraries."""
    def resized(seed):
        model = tiny_llama(tie_word_embeddings=True)
        torch.manual_seed(seed)
        model.resize_token_embeddings(160, mean_resizing=False)
        return model

    lib = lorakit if saver == "lorakit" else peft
    model = lib.get_peft_model(resized(1), lib.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    _randomise(model)
    x = torch.tensor([[1, 2, 150, 151, 5]])  # new token ids
    expected = model.eval()(input_ids=x).logits
    model.save_pretrained(tmp_path)
    for loader in (lorakit, peft):
        assert_close(loader.PeftModel.from_pretrained(resized(2), tmp_path).eval()(input_ids=x).logits, expected)
    small = tmp_path / "small"
    if saver == "lorakit":
        model.save_pretrained(small, save_embedding_layers=False)
        assert (small / "adapter_model.safetensors").stat().st_size < (tmp_path / "adapter_model.safetensors").stat().st_size
        with pytest.raises(lorakit.AdapterError, match="weights of model.embed_tokens differ"):
            lorakit.PeftModel.from_pretrained(resized(2), small)
