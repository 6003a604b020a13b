"""The storage layer: safetensors checkpoints read lazily and written in planned shards, output
directories written whole or not at all, and (in :mod:`deltamoe.io.output` and
:mod:`deltamoe.io.provenance`) the one output routine and the ``deltamoe.json`` record that every
weight operation and the training writer share.

The names below are the layer's API; :mod:`~deltamoe.io.format` (file layout and header checks),
:mod:`~deltamoe.io.reader`, :mod:`~deltamoe.io.writer` and :mod:`~deltamoe.io.dirs` hold them.
"""

from deltamoe.io.dirs import atomic_output_dir, atomic_write_text, check_output, copy_aux_files, write_json
from deltamoe.io.format import (
    CONFIG_NAME,
    DEFAULT_SHARD_BYTES,
    DTYPE_NAMES,
    INDEX_NAME,
    SINGLE_NAME,
    TOKENIZER_FILES,
    TensorInfo,
    TensorSpec,
    dtype_code,
    itemsize,
    parse_shard,
    torch_dtype,
)
from deltamoe.io.reader import Checkpoint, model_ref, open_checkpoint, resolve_model
from deltamoe.io.writer import ShardedWriter

__all__ = [
    "CONFIG_NAME",
    "DEFAULT_SHARD_BYTES",
    "DTYPE_NAMES",
    "INDEX_NAME",
    "SINGLE_NAME",
    "TOKENIZER_FILES",
    "Checkpoint",
    "ShardedWriter",
    "TensorInfo",
    "TensorSpec",
    "atomic_output_dir",
    "atomic_write_text",
    "check_output",
    "copy_aux_files",
    "dtype_code",
    "itemsize",
    "model_ref",
    "open_checkpoint",
    "parse_shard",
    "resolve_model",
    "torch_dtype",
    "write_json",
]
