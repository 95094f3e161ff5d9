"""trainable_token_indices: only the chosen embedding rows train and are saved, in PEFT's format and with its
semantics (a tied output head follows the input embedding); merge, unmerge, disable, several adapters."""
import pytest
import torch
from safetensors.torch import load_file

import lorakit
from tests.conftest import assert_close, tiny_llama

peft = pytest.importorskip("peft", reason="PEFT is a test dependency (pip install -e .[test])")

ROWS = [3, 5]
IDS = torch.tensor([[1, 3, 5, 7, 3, 9], [5, 2, 3, 4, 11, 5]])


def tiny_gemma3(**_):
    from transformers import Gemma3TextConfig, Gemma3ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, vocab_size=128, pad_token_id=0)
    return Gemma3ForCausalLM(cfg).eval()


MODELS = {  # Gemma 3 ties its head and scales its embeddings inside the embedding layer
    "llama-tied": lambda: tiny_llama(tie_word_embeddings=True),
    "llama-untied": lambda: tiny_llama(tie_word_embeddings=False),
    "gemma3": tiny_gemma3,
}
SPECS = {"list": ROWS, "dict": {"embed_tokens": ROWS, "lm_head": [4, 6]}}


def _config(lib, spec, **kw):
    return lib.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                          trainable_token_indices=spec, **kw)


def _move_rows(model, seed=5):
    """Training stand-in: every trainable tensor away from its start."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))


def _logits(model, ids=IDS, **kw):
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


def _embedding(model):
    return model.get_base_model().get_input_embeddings()


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("spec", SPECS)
def test_lorakit_adapter_loads_in_peft_and_back(arch, spec, tmp_path):
    spec = SPECS[spec]
    if arch != "llama-untied" and isinstance(spec, dict):
        spec = {"embed_tokens": ROWS, "lm_head": ROWS}  # a tied head takes the input's rows
    ours = lorakit.get_peft_model(MODELS[arch](), _config(lorakit, spec))
    _move_rows(ours)
    expected = _logits(ours)
    assert (expected - _logits(MODELS[arch]())).abs().max() > 1e-2  # the rows matter
    ours.save_pretrained(tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "ours")
    assert_close(_logits(theirs), expected)
    theirs.save_pretrained(tmp_path / "theirs")
    assert set(load_file(tmp_path / "theirs" / "adapter_model.safetensors")) == \
        set(load_file(tmp_path / "ours" / "adapter_model.safetensors"))  # PEFT's keys, key for key
    back = lorakit.PeftModel.from_pretrained(MODELS[arch](), tmp_path / "theirs")
    assert_close(_logits(back), expected)


@pytest.mark.parametrize("arch", MODELS)
def test_peft_adapter_loads_in_lorakit(arch, tmp_path):
    theirs = peft.get_peft_model(MODELS[arch](), _config(peft, ROWS))
    _move_rows(theirs)
    expected = _logits(theirs)
    theirs.save_pretrained(tmp_path)
    ours = lorakit.PeftModel.from_pretrained(MODELS[arch](), tmp_path)
    assert_close(_logits(ours), expected)
    assert_close(_logits(ours.merge_and_unload()), expected)


def test_only_the_chosen_rows_train_and_are_saved(tmp_path):
    model = lorakit.get_peft_model(tiny_llama(tie_word_embeddings=True), _config(lorakit, ROWS))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    assert trainable == ["base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta.default"]
    weight_before = _embedding(model).weight.detach().clone()
    rows_before = model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta["default"].clone()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=IDS, labels=IDS).loss.backward()
    opt.step()
    rows = model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert torch.equal(_embedding(model).weight, weight_before)  # the embedding itself never changes
    assert (rows - rows_before).abs().min() > 0  # both rows moved
    model.merge_adapter()
    changed = (_embedding(model).weight != weight_before).any(dim=1).nonzero().flatten().tolist()
    assert changed == ROWS  # merged: exactly the chosen rows differ
    model.unmerge_adapter()
    assert torch.equal(_embedding(model).weight, weight_before)
    model.save_pretrained(tmp_path)
    saved = {k: v.shape for k, v in load_file(tmp_path / "adapter_model.safetensors").items() if "lora_" not in k}
    assert saved == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (2, 32)}


def test_merge_disable_and_unload_give_the_expected_outputs():
    base = _logits(tiny_llama(tie_word_embeddings=True))
    model = lorakit.get_peft_model(tiny_llama(tie_word_embeddings=True), _config(lorakit, ROWS))
    _move_rows(model)
    adapted = _logits(model)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base)
    model.merge_adapter()
    assert_close(_logits(model), adapted)
    with model.disable_adapter():
        torch.testing.assert_close(_logits(model), base)
    assert_close(_logits(model), adapted)  # merged again on leaving the block
    model.unmerge_adapter()
    assert_close(_logits(model), adapted)
    status = model.get_model_status()  # the token layers (the tied head too) report like LoRA layers
    assert status.requires_grad == {"default": True} and status.merged_adapters == []
    assert {s.name for s in model.get_layer_status()} >= {"model.model.embed_tokens", "model.lm_head"}
    plain = model.merge_and_unload()
    assert type(plain.model.embed_tokens) is torch.nn.Embedding and type(plain.lm_head) is torch.nn.Linear
    assert plain.lm_head.weight is plain.model.embed_tokens.weight  # still tied, rows written into both
    assert_close(_logits(plain), adapted)


def test_several_adapters_switch_route_per_row_and_refuse_overlapping_rows():
    model = lorakit.get_peft_model(tiny_llama(), _config(lorakit, [3]))
    model.add_adapter("other", _config(lorakit, [5, 7]))
    model.add_adapter("clash", _config(lorakit, [3, 9]))
    _move_rows(model)
    for name in ("other", "clash"):
        model.set_requires_grad(name)
    _move_rows(model, seed=6)
    outs = {}
    for name in ("default", "other"):
        model.set_adapter(name)
        outs[name] = _logits(model)
    assert (outs["default"] - outs["other"]).abs().max() > 1e-2
    mixed = _logits(model, adapter_names=["other", "default"])
    assert_close(mixed[0], outs["other"][0])
    assert_close(mixed[1], outs["default"][1])
    with model.disable_adapter():
        base = _logits(model)
    assert_close(_logits(model, adapter_names=["__base__", "__base__"]), base)
    model.set_adapter(["default", "clash"])
    with pytest.raises(lorakit.AdapterError, match="disjoint"):
        _logits(model)
    model.set_adapter("default")
    model.delete_adapter("other")
    assert_close(_logits(model), outs["default"])


def test_bad_indices_and_conflicting_choices_are_refused_with_the_reason():
    with pytest.raises(lorakit.ConfigError, match="non-empty list of token ids"):
        lorakit.LoraConfig(trainable_token_indices=[1, -2])
    with pytest.raises(lorakit.ConfigError, match="modules_to_save"):
        lorakit.LoraConfig(trainable_token_indices={"embed_tokens": [1]}, modules_to_save=["embed_tokens"])
    with pytest.raises(lorakit.ConfigError, match="resize the model's embeddings"):
        lorakit.get_peft_model(tiny_llama(), _config(lorakit, [3, 128]))
    with pytest.raises(lorakit.ConfigError, match="choose one"):
        lorakit.get_peft_model(tiny_llama(), lorakit.LoraConfig(target_modules=["embed_tokens"],
                                                                trainable_token_indices=[3]))
    with pytest.raises(lorakit.TargetError, match="wte"):
        lorakit.get_peft_model(tiny_llama(), _config(lorakit, {"wte": [3]}))


@pytest.mark.parametrize("tied", [False, True])
def test_a_run_that_adds_a_token_trains_only_its_rows_and_loads_in_peft(tied, tmp_path):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.cli.main import main
    from tests.test_train_fixtures import write_tiny_model_dir

    folder = write_tiny_model_dir(tmp_path / "model", tie_word_embeddings=tied)
    rows = [{"messages": [{"role": "user", "content": f"call {i}"}, {"role": "assistant", "content": f"<tool> {i}"}]}
            for i in range(8)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    main(["train", "--model", folder, "--data", str(tmp_path / "d.jsonl"), "--max-steps", "2", "--batch-size", "4",
          "--seq-len", "32", "--lr", "1e-2", "--r", "2", "--out", str(tmp_path / "run"), "--add-tokens", "<tool>",
          "--save-every", "0", "--eval-every", "0", "--device", "cpu"])
    adapter = tmp_path / "run" / "adapter"
    tok = AutoTokenizer.from_pretrained(adapter)  # the tokenizer with the new token is saved beside the adapter
    new_id = tok.convert_tokens_to_ids("<tool>")
    assert new_id == len(tok) - 1 and len(tok("<tool>", add_special_tokens=False)["input_ids"]) == 1
    saved = {k: tuple(v.shape) for k, v in load_file(adapter / "adapter_model.safetensors").items() if "lora_" not in k}
    heads = {} if tied else {"base_model.model.lm_head.token_adapter.trainable_tokens_delta": (1, 32)}
    assert saved == {"base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta": (1, 32), **heads}

    def base():
        model = AutoModelForCausalLM.from_pretrained(folder)
        model.resize_token_embeddings(len(tok))
        return model.eval()

    ids = torch.tensor([[5, new_id, 9, 14, new_id]])
    ours = lorakit.PeftModel.from_pretrained(base(), adapter)
    theirs = peft.PeftModel.from_pretrained(base(), adapter)
    expected = _logits(ours, ids)
    assert_close(_logits(theirs, ids), expected)
    fresh = base()
    before = fresh.get_input_embeddings().weight.detach().clone()
    merged = lorakit.PeftModel.from_pretrained(fresh, adapter).merge_and_unload()
    changed = (merged.get_input_embeddings().weight != before).any(dim=1).nonzero().flatten().tolist()
    assert changed == [new_id]  # of the whole embedding, only the new token's row differs
    assert_close(_logits(merged, ids), expected)
    main(["merge", "--model", folder, "--adapter", str(adapter), "--out", str(tmp_path / "merged"), "--device", "cpu"])
    assert AutoTokenizer.from_pretrained(tmp_path / "merged").convert_tokens_to_ids("<tool>") == new_id
    assert_close(_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval(), ids), expected)


def test_markers_the_chat_template_writes_that_the_tokenizer_lacks_are_added():
    from lorakit.data.new_tokens import tokens_to_add
    from tests.test_data_helpers import tiny_tokenizer

    tok = tiny_tokenizer()  # its ChatML markers are tokens of their own: nothing to add
    assert tokens_to_add(tok, []) == []
    assert tokens_to_add(tok, ["<tool>", "<|im_end|>"]) == ["<tool>"]
    tok.chat_template = "{% for m in messages %}<|turn|>{{ m['content'] }}<|im_end|>{% endfor %}"
    assert tokens_to_add(tok, ["<tool>"]) == ["<tool>", "<|turn|>"]


def test_add_tokens_option_is_split_at_commas_and_an_empty_token_is_refused():
    from lorakit.train.config import TrainConfig

    assert TrainConfig(add_tokens="<a>, <b>").new_tokens() == ["<a>", "<b>"]
    assert TrainConfig(add_tokens=["<a>"]).validate().new_tokens() == ["<a>"]
    with pytest.raises(lorakit.ConfigError, match="add_tokens must name tokens"):
        TrainConfig(add_tokens="<a>,,<b>").validate()


def test_rows_take_the_adapter_dtype_and_a_bf16_model_gives_the_fp32_rows_outputs():
    model = lorakit.get_peft_model(tiny_llama(tie_word_embeddings=True).to(torch.bfloat16), _config(lorakit, ROWS),
                                   adapter_dtype=torch.float32)
    rows = model.get_base_model().model.embed_tokens.token_adapter.trainable_tokens_delta["default"]
    assert rows.dtype == torch.float32 and _embedding(model).weight.dtype == torch.bfloat16
    _move_rows(model)
    adapted = _logits(model)
    model.merge_adapter()  # rows written in the weight's dtype
    assert_close(_logits(model), adapted, torch.bfloat16)
