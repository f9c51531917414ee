"""nemojax.data: grain input pipelines, tokenizers, corpora, packing and synthetic tasks.

Example::

  cfg = DataConfig(kind="stdlib")  # or "text" / "jsonl" with paths=..., or "mqar"
  it = make_dataset(cfg, "train", seq_len=512, batch_size=32, seed=0)
  batch = next(it)  # tokens/targets/segment_ids/positions int32, loss_mask float32: [32 // processes, 512]
  state = it.get_state()  # JSON-serialisable; it.set_state(state) resumes exactly
"""

from nemojax.data.config import KINDS, DataConfig
from nemojax.data.datasets import build_dataset, make_dataset, mqar_spec, resolve_process, vocab_size
from nemojax.data.mqar import MQARSpec, masked_accuracy, mqar_answer_mask, mqar_example
from nemojax.data.packing import ROW_KEYS, RoundRobinIterDataset, document_example, pack_documents
from nemojax.data.sources import (
    SPLITS,
    FileDocuments,
    JsonlDocuments,
    documents,
    is_validation,
    stdlib_files,
    stdlib_root,
)
from nemojax.data.stats import corpus_unigram_entropy, token_counts, unigram_entropy
from nemojax.data.tokenizers import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    load_tokenizer,
    train_bpe,
    train_bpe_cli,
)

__all__ = [
    "KINDS",
    "ROW_KEYS",
    "SPLITS",
    "ByteTokenizer",
    "DataConfig",
    "FileDocuments",
    "HFTokenizer",
    "JsonlDocuments",
    "MQARSpec",
    "RoundRobinIterDataset",
    "Tokenizer",
    "build_dataset",
    "corpus_unigram_entropy",
    "document_example",
    "documents",
    "is_validation",
    "load_tokenizer",
    "make_dataset",
    "masked_accuracy",
    "mqar_answer_mask",
    "mqar_example",
    "mqar_spec",
    "pack_documents",
    "resolve_process",
    "stdlib_files",
    "stdlib_root",
    "token_counts",
    "train_bpe",
    "train_bpe_cli",
    "unigram_entropy",
    "vocab_size",
]
