"""Data: prepare text into token shards (prepare.py) and read training sequences from them (loader.py)."""

from gptlab.data.documents import default_corpus_files, iter_documents
from gptlab.data.loader import TokenStream, global_batch_indices, read_manifest, validation_batches
from gptlab.data.prepare import prepare

__all__ = [
    "TokenStream",
    "default_corpus_files",
    "global_batch_indices",
    "iter_documents",
    "prepare",
    "read_manifest",
    "validation_batches",
]
