"""The one entry point: `make_dataset(cfg, split, ...)` -> a checkpointable iterator of batches.

Text corpora ("stdlib", "text", "jsonl"), per split:

  train:       documents -> shuffle(seed), reshuffled every epoch -> repeat forever -> this process's share
               `[process_index::process_count]` -> `pack_streams` streams `[j::pack_streams]`, each tokenized
               lazily (grain map, `read_threads` threads ahead) and packed -> rows taken from the streams in turn
               -> batches of `batch_size // process_count` rows.
  validation:  documents in corpus order -> this process's share -> one stream, tokenized and packed -> batches;
               finite, one pass, the last batch filled up with padding rows (loss_mask 0) so shapes never change.

"mqar": examples generated from `(seed, index)` (train: endless; validation: `mqar_num_val_examples`, the same
for every seed), sharded by process the same way.

Every batch is `{tokens, targets, segment_ids, positions: int32, loss_mask: float32}`, each
`[batch_size // process_count, seq_len]` (see `nemojax.data.packing`). The iterator is a
`grain.DatasetIterator`: `get_state()` / `set_state(state)` resume exactly (the state is JSON), and
`grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` put it in an Orbax checkpoint.

Multi-host note: validation shards documents, so processes may see different numbers of validation batches;
a multi-host evaluation loop should run a fixed number of batches (e.g. `itertools.islice`), not until exhaustion.
"""

from __future__ import annotations

import grain

from nemojax.data.config import DataConfig
from nemojax.data.mqar import MQARExamples, MQARSpec
from nemojax.data.packing import RoundRobinIterDataset, TokenizeDocument, batch_rows, pack_documents
from nemojax.data.sources import check_split, documents
from nemojax.data.tokenizers import load_tokenizer

_ENDLESS = 2**62  # "forever" for index-generated training examples


def resolve_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """`(process_index, process_count)`: as given, or JAX's when both are None."""
    if process_index is None and process_count is None:
        import jax

        return jax.process_index(), jax.process_count()
    if process_index is None or process_count is None:
        raise ValueError(f"process_index={process_index} and process_count={process_count}: give both or neither")
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} must be in [0, process_count={process_count})")
    return process_index, process_count


def mqar_spec(cfg: DataConfig, seq_len: int) -> MQARSpec:
    """The MQAR task that `cfg` (kind "mqar") describes at this sequence length."""
    return MQARSpec(
        vocab_size=cfg.mqar_vocab_size,
        num_kv_pairs=cfg.mqar_num_kv_pairs,
        num_queries=cfg.mqar_num_kv_pairs if cfg.mqar_num_queries is None else cfg.mqar_num_queries,
        seq_len=seq_len,
        power_a=cfg.mqar_power_a,
    )


def vocab_size(cfg: DataConfig) -> int:
    """Size of the token space the batches use (the tokenizer's, or `mqar_vocab_size`)."""
    if cfg.kind == "mqar":
        return cfg.mqar_vocab_size
    return load_tokenizer(cfg.tokenizer).vocab_size


def build_dataset(
    cfg: DataConfig,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """The grain pipeline behind `make_dataset` (same arguments), for callers that want to compose further."""
    check_split(split)
    if not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} must be a positive integer")
    pi, pc = resolve_process(process_index, process_count)
    if not isinstance(batch_size, int) or batch_size < 1 or batch_size % pc:
        raise ValueError(f"batch_size={batch_size!r} (global) must be a positive multiple of process_count={pc}")
    local_batch = batch_size // pc
    train = split == "train"
    threads = cfg.read_threads
    read = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)

    if cfg.kind == "mqar":
        spec = mqar_spec(cfg, seq_len)
        length = _ENDLESS if train else cfg.mqar_num_val_examples
        examples = grain.MapDataset.source(MQARExamples(spec, seed=seed, split=split, length=length))
        rows = examples[pi::pc].to_iter_dataset(read)
        return batch_rows(rows, local_batch, 0, drop_remainder=train)

    tokenizer = load_tokenizer(cfg.tokenizer)
    docs = grain.MapDataset.source(documents(cfg, split))
    if train:
        docs = docs.shuffle(seed=seed).repeat(None)
    docs = docs[pi::pc]
    k = cfg.pack_streams if train else 1
    tokenize = TokenizeDocument(tokenizer)
    packed = [
        pack_documents(docs[j::k].map(tokenize).to_iter_dataset(read), seq_len, tokenizer.pad_id) for j in range(k)
    ]
    rows = packed[0] if k == 1 else RoundRobinIterDataset(packed)
    return batch_rows(rows, local_batch, tokenizer.pad_id, drop_remainder=train)


def make_dataset(
    cfg: DataConfig,
    split: str,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.DatasetIterator:
    """A checkpointable iterator of batches for one split (see the module docstring for the pipeline).

    Args:
      cfg: what to read (`DataConfig`).
      split: "train" (endless, shuffled by `seed`) or "validation" (finite, in order, `seed` unused).
      seq_len: length of every row.
      batch_size: the global batch; this process gets `batch_size // process_count` rows per batch.
      seed: shuffling seed (text corpora) or example seed (MQAR training).
      process_index, process_count: this process's place among the readers; both None means JAX's
        (`jax.process_index()`, `jax.process_count()`).

    Returns:
      An iterator of `{tokens, targets, segment_ids, positions, loss_mask}`, each `[batch_size // process_count,
      seq_len]`, with `get_state()` / `set_state()`.

    Raises:
      ValueError: naming the argument or `DataConfig` field, for an unknown split, a missing path, an empty
        corpus or split (no documents, or only empty ones), a batch that does not divide among processes, or an
        impossible MQAR shape.
    """
    ds = build_dataset(
        cfg,
        split,
        seq_len=seq_len,
        batch_size=batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
    )
    return iter(ds)
