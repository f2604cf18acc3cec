"""Token store: a Zarr v3 group of frozen-backbone tokens, sharded for few files and chunked per sample.

Layout (``N`` samples, token grid ``h×w``, token dim ``D``, label size ``H×W``)::

    tokens[N,h,w,D]       float16  chunk (1,h,w,D), shard (S,h,w,D)   raw + crc32c
    tokens_flip[N,h,w,D]  float16  same (optional: tokens of the horizontally flipped image)
    labels[N,H,W]         int16    chunk (1,H,W),   shard (S,H,W)     blosc lz4 + byte shuffle, crc32c; -1 = ignore
    rgb[N,H,W,3]          uint8    chunk (1,H,W,3), shard (S,H,W,3)   zstd level 1, crc32c (optional)
    ids[N]                string   chunk (S,)                          vlen UTF-8, crc32c

Every chunk of every array ends in a crc32c, and so does every shard index: a flipped bit fails the read
with an :class:`InputError` naming the store, the array and the sample (or shard), never wrong numbers.

One chunk is one sample, so random access (kNN partners, training batches) decodes only the samples it
asks for; one shard file holds ``S`` samples, so a store of 250k samples is a few hundred files per
array. Shard ``k`` covers samples ``[k*S, min((k+1)*S, N))`` in every array (``ids`` included), so shards
are independent write tasks that never touch the same file.

Fast path: for exactly this codec chain on a local directory, shards are read and written directly
(:class:`_ShardFile`): a read is one ``pread``/``preadv`` per run of requested samples at the offsets of the
shard index (cached per shard file, its crc32c checked), a write is one ``writev`` of the whole shard to a
temporary file renamed into place (atomic: a killed write leaves the old file or none). The bytes are
exactly zarr-python's with ``write_empty_chunks=True``: every sample has a stored, checksummed chunk,
an all-zero sample too (zarr's default would store none and read the fill value); zarr-python stays
the reference reader and the fallback for any other codec chain or store (:func:`fast_path_unsupported_reason`).
Reads never return data other than what was written: a missing shard or chunk file, or an empty index entry
(a chunk zarr-python's default skips as equal to the fill value), is an error naming the sample and the file,
never fill values; shard indexes are checked (bounds, overlaps, lengths) and decodes are capped at the
sample's size (:mod:`~stages.store.fastpath`), and metadata claiming absurd sizes is refused at open.

Modules: :mod:`~stages.store.layout` (format, codecs, layout check), :mod:`~stages.store.fastpath` (direct
shard I/O), :mod:`~stages.store.writer` (create, write, the writer cache), :mod:`~stages.store.reader`
(:class:`TokenStore`), :mod:`~stages.store.fallback` (checks before zarr-python reads),
:mod:`~stages.store.artifact` (:class:`TokensArtifact`, :func:`open_tokens`), :mod:`~stages.store.squirrel` (stego-studies' format), :mod:`~stages.store.remote` (stores at s3:// and other
fsspec URLs: export, checked reads, import; imported only for a URL).
"""
from __future__ import annotations

from stages.store.artifact import TOKENS_STORE, TokensArtifact, open_tokens
from stages.store.fastpath import cast_into, fast_path_unsupported_reason
from stages.store.layout import FORMAT_NAME, FORMAT_VERSION, shard_ranges
from stages.store.reader import TokenStore, open_token_store
from stages.store.writer import create_token_store, resize_token_store, write_shard

__all__ = [
    "cast_into",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "TOKENS_STORE",
    "TokenStore",
    "TokensArtifact",
    "create_token_store",
    "fast_path_unsupported_reason",
    "open_token_store",
    "open_tokens",
    "resize_token_store",
    "shard_ranges",
    "write_shard",
]
