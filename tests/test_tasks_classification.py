"""Sequence and token classification: label mapping, sub-word alignment, metrics, and the CLI path."""
import json
from pathlib import Path

import pytest
import torch

from lorakit.cli.main import main
from lorakit.data import read_records
from lorakit.errors import DataError
from lorakit.tasks import recipe_for
from lorakit.tasks.classification import accuracy_f1, label_ids
from lorakit.tasks.tokens import IGNORE, entities, entity_scores, first_subtoken_labels, word_predictions

WORDS = ["good", "bad", "film", "great", "awful", "movie", "plot", "john", "smith", "lives", "in", "paris",
         "works", "at", "acme", "the", "a", "is", "was", "play"]


def bert_tokenizer(folder: Path):
    """A WordPiece tokenizer over WORDS plus a few sub-word pieces (so some words split)."""
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS + ["##s", "##ing", "##ed", "lon", "##don"]
    folder.mkdir(parents=True, exist_ok=True)
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("tiny-bert")
    tok = bert_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     vocab_size=len(tok), max_position_embeddings=64)
    BertModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_label_ids_follow_the_training_label_set(tmp_path):
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join(json.dumps(r) for r in [{"text": "a", "label": "neg"}, {"text": "b", "label": "pos"},
                                                          {"text": "c", "label": "zero"}]))
    dev = tmp_path / "dev.jsonl"  # lacks "neg": read on its own it would number "pos" 0
    dev.write_text("\n".join(json.dumps(r) for r in [{"text": "d", "label": "pos"}, {"text": "e", "label": "zero"}]))
    labels = read_records(train).labels
    assert label_ids(read_records(dev), labels) == [labels.index("pos"), labels.index("zero")]
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"text": "f", "label": "surprise"}))
    with pytest.raises(DataError, match="surprise"):
        label_ids(read_records(other), labels)


def test_accuracy_and_f1_against_hand_computed_cases():
    # binary: F1 of class 1. gold 1,1,0,0 pred 1,0,1,0 -> tp 1, fp 1, fn 1 -> F1 0.5; accuracy 0.5
    assert accuracy_f1([1, 1, 0, 0], [1, 0, 1, 0], 2) == {"accuracy": 0.5, "f1": 0.5}
    # three classes, macro F1: class 0 tp1 fn1 -> 2/3; class 1 tp1 fp1 -> 2/3; class 2 tp1 -> 1
    scores = accuracy_f1([0, 0, 1, 2], [0, 1, 1, 2], 3)
    assert scores["accuracy"] == 0.75 and scores["f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)


def test_entities_follow_conlleval_rules():
    assert entities(["B-PER", "I-PER", "O", "B-LOC"]) == {("PER", 0, 1), ("LOC", 3, 3)}
    assert entities(["I-PER", "I-PER"]) == {("PER", 0, 1)}  # I- after O starts an entity
    assert entities(["B-PER", "B-PER"]) == {("PER", 0, 0), ("PER", 1, 1)}
    assert entities(["B-PER", "I-LOC"]) == {("PER", 0, 0), ("LOC", 1, 1)}  # a type change splits
    assert entities(["S-ORG", "B-PER", "E-PER"]) == {("ORG", 0, 0), ("PER", 1, 2)}  # IOBES


def test_entity_scores_hand_computed():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    pred = [["B-PER", "I-PER", "O", "O"], ["B-ORG", "B-MISC"]]
    # gold entities 3, predicted 3 (PER, ORG, MISC), right 2 -> P = R = F1 = 2/3; words right 4 of 6
    scores = entity_scores(gold, pred)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(4 / 6)
    # a partial span is no match
    assert entity_scores([["B-PER", "I-PER"]], [["B-PER", "O"]])["f1"] == 0.0


def test_subword_alignment_labels_first_piece_only(tmp_path):
    tok = bert_tokenizer(tmp_path / "tok")
    enc = tok([["john", "playing", "london"]], is_split_into_words=True)
    word_ids = enc.word_ids(0)  # [CLS] john play ##ing lon ##don [SEP]
    assert word_ids == [None, 0, 1, 1, 2, 2, None]
    assert first_subtoken_labels(word_ids, [1, 0, 2]) == [IGNORE, 1, 0, IGNORE, 2, IGNORE, IGNORE]
    # predictions are read back per word from the first piece; a truncated word becomes "O" (id 0)
    example = {"labels": [IGNORE, 1, 0, IGNORE], "word_ids": [-1, 0, 1, 1], "num_words": 3}
    logits = torch.tensor([[9., 0, 0], [0, 9., 0], [0, 0, 9.], [9., 0, 0]])
    assert word_predictions(logits, example) == [1, 2, 0]


def test_token_recipe_encodes_conll_with_aligned_labels(tmp_path):
    tok = bert_tokenizer(tmp_path / "tok")
    path = tmp_path / "ner.txt"
    path.write_text("-DOCSTART- -X- -X- O\n\njohn NNP B-NP B-PER\nplaying VBG I-VP O\nlondon NNP B-NP B-LOC\n\n")
    records = read_records(path)
    recipe = recipe_for("token-cls")
    labels = recipe.label_names(records)
    [example] = recipe.encode(records, tok, 32, labels)
    assert [labels[t] if t != IGNORE else None for t in example["labels"]] == \
        [None, "B-PER", "O", None, "B-LOC", None, None]
    batch = recipe.collate([example, example], tok)
    assert batch["labels"].shape == batch["input_ids"].shape


def _write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_cli_trains_seq_cls_and_reports_metrics_before_and_after(bert_dir, tmp_path):
    rows = [{"text": f"the {w} film", "label": int(w in ("good", "great"))} for w in ("good", "bad", "great", "awful")]
    data = _write_rows(tmp_path / "train.jsonl", rows * 8)
    out = tmp_path / "run"
    main(["train", "--task", "seq-cls", "--model", str(bert_dir), "--data", str(data), "--eval-data", str(data),
          "--max-steps", "30", "--batch-size", "8", "--lr", "2e-2", "--r", "4", "--alpha", "8", "--seq-len", "16",
          "--out", str(out), "--device", "cpu", "--save-every", "0", "--eval-every", "0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_accuracy_after"] == 1.0 and summary["eval_f1_after"] == 1.0
    assert "eval_accuracy_before" in summary and summary["eval_loss_after"] < summary["eval_loss_before"]
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS"
    from safetensors.torch import load_file
    keys = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("classifier" in k for k in keys), "the new head is saved with the adapter"


def test_cli_trains_token_cls(bert_dir, tmp_path):
    conll = "\n\n".join(["john NNP B-NP B-PER\nsmith NNP I-NP I-PER\nworks VBZ B-VP O\nin IN B-PP O\n"
                         "paris NNP B-NP B-LOC", "acme NNP B-NP B-ORG\nis VBZ B-VP O\ngreat JJ B-ADJP O"] * 8)
    data = tmp_path / "ner.txt"
    data.write_text(conll + "\n")
    out = tmp_path / "run"
    main(["train", "--task", "token-cls", "--model", str(bert_dir), "--data", str(data), "--eval-data", str(data),
          "--max-steps", "40", "--batch-size", "8", "--lr", "2e-2", "--r", "4", "--alpha", "8", "--seq-len", "16",
          "--out", str(out), "--device", "cpu", "--save-every", "0", "--eval-every", "0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_f1_after"] == 1.0 and summary["eval_f1_after"] > summary["eval_f1_before"]
    assert {"eval_precision_after", "eval_recall_after", "eval_accuracy_after"} <= set(summary)


def test_eval_scores_a_seq_cls_adapter_with_its_labels(bert_dir, tmp_path, capsys):
    from lorakit.cli.evaluate import EvalOptions, run_eval

    rows = [{"text": f"a {w} movie", "label": "pos" if w in ("good", "great") else "neg"}
            for w in ("good", "bad", "great", "awful")]
    data = _write_rows(tmp_path / "train.jsonl", rows * 8)
    out = tmp_path / "run"
    main(["train", "--task", "seq-cls", "--model", str(bert_dir), "--data", str(data), "--eval-data", str(data),
          "--max-steps", "30", "--batch-size", "8", "--lr", "2e-2", "--r", "4", "--seq-len", "16",
          "--out", str(out), "--device", "cpu", "--save-every", "0", "--eval-every", "0"])
    results = run_eval(EvalOptions(model=str(bert_dir), adapter=[str(out / "adapter")], device="cpu"))
    summary = json.loads((out / "summary.json").read_text())
    assert results["base + adapter"]["accuracy"] == summary["eval_accuracy_after"] == 1.0
    assert "seq-cls" in capsys.readouterr().out


def test_cli_trains_extractive_qa(bert_dir, tmp_path):
    context = "john smith lives in paris . acme is great"
    squad = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "1", "question": "who lives in paris", "is_impossible": False,
         "answers": [{"text": "john smith", "answer_start": 0}]},
        {"id": "2", "question": "where is acme", "is_impossible": True, "answers": []}]}]}]}
    data = tmp_path / "squad.json"
    data.write_text(json.dumps(squad))
    out = tmp_path / "run"
    main(["train", "--task", "qa", "--model", str(bert_dir), "--data", str(data), "--eval-data", str(data),
          "--max-steps", "3", "--batch-size", "2", "--r", "4", "--seq-len", "32",
          "--out", str(out), "--device", "cpu", "--save-every", "0", "--eval-every", "0"])
    summary = json.loads((out / "summary.json").read_text())
    assert {"eval_exact_match_before", "eval_exact_match_after", "eval_f1_after", "eval_loss_after"} <= set(summary)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["task_type"] == "QUESTION_ANS"


def test_cli_trains_seq2seq(tmp_path):
    from transformers import T5Config, T5ForConditionalGeneration

    from tests.test_data_helpers import tiny_tokenizer

    folder = tmp_path / "t5"
    tok = tiny_tokenizer(chat_template=False)
    torch.manual_seed(0)
    T5ForConditionalGeneration(T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                        decoder_start_token_id=tok.pad_token_id)).save_pretrained(folder)
    tok.save_pretrained(folder)
    data = _write_rows(tmp_path / "pairs.jsonl", [{"prompt": "the code", "completion": "is blue"},
                                                   {"prompt": "the key", "completion": "is under the mat"}] * 8)
    out = tmp_path / "run"
    main(["train", "--task", "seq2seq", "--model", str(folder), "--data", str(data), "--eval-data", str(data),
          "--max-steps", "20", "--batch-size", "4", "--lr", "1e-2", "--r", "4", "--seq-len", "16",
          "--out", str(out), "--device", "cpu", "--save-every", "0", "--eval-every", "0"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_after"] < summary["eval_loss_before"]
    assert "eval_rouge_l_after" in summary


def test_group_by_length_keeps_every_example_and_groups_similar_lengths():
    from lorakit.train.batching import epoch_order, group_by_length

    lengths = [(i * 37) % 50 + 1 for i in range(400)]
    order = epoch_order(400, seed=1, epoch=0)
    grouped = group_by_length(order, lengths, batch_size=4, mega_batches=10)
    assert sorted(grouped) == list(range(400))  # the same examples, once each
    padded = lambda o: sum(max(lengths[i] for i in o[k:k + 4]) * 4 for k in range(0, 400, 4))  # noqa: E731
    assert padded(grouped) < 0.75 * padded(order)
    assert grouped == group_by_length(order, lengths, batch_size=4, mega_batches=10)  # deterministic


class _ConstantClassifier(torch.nn.Module):
    """Logits that favour `favoured` for every example (a collapsed classifier), or the class of the first token
    when `favoured` is None."""

    def __init__(self, favoured, num_labels: int = 2):
        super().__init__()
        self.favoured, self.num_labels = favoured, num_labels
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None, labels=None, token_type_ids=None):
        from types import SimpleNamespace

        picked = torch.full((len(input_ids),), self.favoured) if self.favoured is not None else \
            input_ids[:, 1] % self.num_labels
        logits = torch.nn.functional.one_hot(picked, self.num_labels).float() * 3 + self.anchor  # (batch, labels)
        return SimpleNamespace(logits=logits, loss=torch.nn.functional.cross_entropy(logits, labels))


def test_a_classifier_predicting_one_class_everywhere_is_warned_about(tmp_path):
    tok = bert_tokenizer(tmp_path)
    records = [{"text": text, "label": label} for text, label in
               [("good film", 1), ("bad film", 0), ("great movie", 1), ("awful plot", 0), ("good plot", 1)]]
    evaluate = recipe_for("seq-cls").evaluate
    with pytest.warns(UserWarning, match=r"predicts 'pos' for all 5 examples, so accuracy 0\.600"):
        scores = evaluate(_ConstantClassifier(1), tok, records, 16, 2, ["neg", "pos"])
    assert scores["accuracy"] == pytest.approx(0.6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that predicts both classes gets no warning
        evaluate(_ConstantClassifier(None), tok, records, 16, 2, ["neg", "pos"])
