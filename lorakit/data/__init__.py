"""Data: reading files into normalized records, and turning records into model inputs.

    records = read_records("train.jsonl")               # RecordSet: .format, .records, .sources
    train, val = train_val_split(records, val_fraction=0.1, seed=0)
    data = build_causal_examples(train, tokenizer, seq_len=512, packing=False)
    print(data.stats)                                   # what truncation cut or dropped
    batch = collate_causal(data.examples[:8], pad_token_id=tokenizer.pad_token_id)
"""

from lorakit.data.causal import (
    CAUSAL_FORMATS,
    IGNORE_INDEX,
    CausalExamples,
    TruncationStats,
    build_causal_examples,
    format_prompt,
    render_segments,
    to_messages,
)
from lorakit.data.collate import collate_causal
from lorakit.data.demo import Demo, answer_is_correct, demo_path, load_demo
from lorakit.data.formats import FORMAT_NAMES, FORMATS, detect_format
from lorakit.data.packing import block_causal_mask, pack_examples
from lorakit.data.readers import READERS, read_hub_dataset, read_records, records_from_dicts
from lorakit.data.records import RecordSet, Source
from lorakit.data.split import train_val_split

__all__ = [
    "CAUSAL_FORMATS", "FORMATS", "FORMAT_NAMES", "IGNORE_INDEX", "READERS",
    "CausalExamples", "Demo", "RecordSet", "Source", "TruncationStats",
    "answer_is_correct", "block_causal_mask", "build_causal_examples", "collate_causal",
    "demo_path", "detect_format", "format_prompt", "load_demo", "pack_examples",
    "read_hub_dataset", "read_records", "records_from_dicts", "render_segments",
    "to_messages", "train_val_split",
]
