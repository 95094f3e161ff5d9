"""transformers' Trainer with lorakit models: AdapterTrainer's checkpoints are the adapters, and a run
resumed from one ends where the uninterrupted run does."""
import pytest
import torch

import lorakit
from lorakit.errors import AdapterError
from tests.conftest import tiny_llama

transformers = pytest.importorskip("transformers")
from lorakit.train.hf_trainer import AdapterTrainer, load_adapters  # noqa: E402


def _model():
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="gaussian")
    return lorakit.get_peft_model(tiny_llama(tie_word_embeddings=True), config)


def _data():
    g = torch.Generator().manual_seed(0)
    rows = [torch.randint(1, 128, (16,), generator=g).tolist() for _ in range(16)]
    return [{"input_ids": r, "labels": r} for r in rows]


def _args(out, **kw):
    return transformers.TrainingArguments(output_dir=str(out), per_device_train_batch_size=4, max_steps=4,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_steps=2,
                                          save_only_model=False, seed=0, data_seed=0, **kw)


def _lora(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_plain_trainer_cannot_checkpoint_a_tied_lorakit_model_so_adapter_trainer_exists(tmp_path):
    """The reason for the class: transformers saves non-PEFT models as a full state dict, which fails on
    tied embeddings. If this starts passing, transformers learned to save lorakit models and the class can go."""
    with pytest.raises(RuntimeError, match="share memory|shared"):
        transformers.Trainer(model=_model(), args=_args(tmp_path), train_dataset=_data()).train()


def test_checkpoints_hold_only_the_adapter_and_resume_ends_where_the_uninterrupted_run_does(tmp_path):
    whole = _model()
    AdapterTrainer(model=whole, args=_args(tmp_path / "whole"), train_dataset=_data()).train()
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    files = {p.name for p in checkpoint.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "optimizer.pt", "trainer_state.json"} <= files
    assert not files & {"model.safetensors", "pytorch_model.bin"}
    loaded = lorakit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), tmp_path / "whole" / "checkpoint-4")
    assert all(torch.equal(a, b) for a, b in zip(_lora(loaded).values(), _lora(whole).values()))

    resumed = _model()
    assert any(not torch.equal(a, b) for a, b in zip(_lora(resumed).values(), _lora(whole).values()))
    AdapterTrainer(model=resumed, args=_args(tmp_path / "resumed"), train_dataset=_data()).train(
        resume_from_checkpoint=str(checkpoint))
    for (name, a), b in zip(_lora(resumed).items(), _lora(whole).values()):
        torch.testing.assert_close(a, b, msg=name)


def test_load_best_model_at_end_puts_the_best_checkpoint_s_adapter_back(tmp_path):
    model = _model()
    args = _args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                 metric_for_best_model="loss", greater_is_better=True)  # "best" = the higher loss: step 2's
    trainer = AdapterTrainer(model=model, args=args, train_dataset=_data(), eval_dataset=_data()[:4])
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith("checkpoint-2")
    expected = _lora(lorakit.PeftModel.from_pretrained(tiny_llama(tie_word_embeddings=True), best))
    assert all(torch.equal(a, b) for a, b in zip(_lora(model).values(), expected.values()))


def test_a_checkpoint_without_one_of_the_model_s_adapters_is_refused_by_name(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path)
    model.add_adapter("legal", lorakit.LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(AdapterError, match="legal"):
        load_adapters(model, tmp_path)
