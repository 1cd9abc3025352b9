"""data_prep: tokenize SlimPajama / StarCoder into memory-mappable token shards.

Reading (what pretraining needs) imports only NumPy: `list_shards`, `read_shard`,
`read_header`, `iter_documents`. The writers (pipeline, readers, tokenizer) are imported
by the CLI scripts in this folder; see docs/data_format.md for the on-disk format.
"""
from data_prep.reader import iter_documents
from data_prep.shards import (HEADER_SIZE, MAGIC, SHARD_SUFFIX, VERSION, ShardFormatError, ShardHeader,
                              dtype_for_vocab, list_shards, read_header, read_shard, write_shard)

__all__ = ["iter_documents", "list_shards", "read_shard", "read_header", "write_shard", "dtype_for_vocab",
           "ShardHeader", "ShardFormatError", "MAGIC", "VERSION", "HEADER_SIZE", "SHARD_SUFFIX"]
