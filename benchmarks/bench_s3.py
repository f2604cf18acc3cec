"""Token store reads at an s3:// URL (``open_tokens(URL)``) next to the same store on local disk.

The S3-protocol server is moto's, started as a separate process on 127.0.0.1 (loopback only: this
measures our read path, zarr-python and s3fs plus an in-memory server, not a network). The store is
the ViT-S/8@224 shape of ``bench_store`` (28×28×384 fp16, 0.6 MB a sample, shards of 64), uploaded
as it is. Rows (report only, no goal):

- random batch of 32: ``get_tokens`` (float32) at the URL ÷ the local store (median over batches;
  ratio = local time / URL time);
- sequential stream: ``iter_batches(64, fp16)`` at the URL ÷ local (best of 3; ratio = URL / local).

The note of each says how much of the URL time is our object checks (:mod:`stages.store.remote`),
from the same read through zarr-python's plain ``FsspecStore``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.bench_store import BATCH, SHARD, SIZES, _create_store, _data, _median_ms, _write_store
from benchmarks.common import row, script_main, temp_root

LABEL = "ViT-S/8@224"


@contextmanager
def _s3_server() -> Iterator[str]:
    """moto's S3 server in its own process on 127.0.0.1 at a free port; the environment points s3fs at it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = dict(os.environ)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError(f"moto server did not start on 127.0.0.1:{port}") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        os.environ.clear()
        os.environ.update(saved)


def _stream_s(store: Any, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in store.iter_batches(SHARD, tokens_dtype=np.float16):
            pass
        best = min(best, time.perf_counter() - start)
    return best


def run(quick: bool = False) -> list[dict[str, Any]]:
    import fsspec
    import s3fs
    import zarr
    from zarr.storage import FsspecStore

    from stages.store import TokenStore, open_token_store, open_tokens

    grid, dim, res = SIZES[LABEL]
    n = 64 if quick else 256
    d = _data(n, grid, dim, res)
    repeat = 2 if quick else 3
    with temp_root("stegopipe-bench-s3-") as scratch, _s3_server():
        s3fs.S3FileSystem.clear_instance_cache()
        local_path = scratch / "store"
        _create_store(local_path, d)
        _write_store(local_path, d)
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        url = "s3://bench/tokens.zarr"
        fs.put(str(local_path), url, recursive=True)
        local, remote = open_token_store(local_path), open_tokens(url)
        plain = TokenStore(url, group=zarr.open_group(FsspecStore.from_url(url, read_only=True), mode="r"))

        rng = np.random.default_rng(1)
        batches = [rng.choice(n, size=BATCH, replace=False) for _ in range(8 if quick else 20)]
        for store in (local, remote, plain):
            store.get_tokens(batches[0])  # warm: metadata, connections
        remote_ms, local_ms, plain_ms = (_median_ms(s.get_tokens, batches) for s in (remote, local, plain))
        remote_s, local_s, plain_s = (_stream_s(s, repeat) for s in (remote, local, plain))
        s3fs.S3FileSystem.clear_instance_cache()
    tok_mb = d["tokens"].nbytes / 1e6
    where = f"moto server on 127.0.0.1 (own process), {n} samples, {tok_mb:.0f} MB of tokens"
    return [
        row(f"s3 URL {LABEL} random batch of {BATCH}", remote_ms, "ms", baseline=local_ms, higher_is_better=False,
            note=f"open_tokens(s3://...).get_tokens (float32) vs the same store on local disk (pread fast path); "
                 f"{where}; median of {len(batches)}; ratio = local/URL. zarr-python's plain FsspecStore "
                 f"without our object checks: {plain_ms:.0f} ms"),
        row(f"s3 URL {LABEL} sequential stream", tok_mb / remote_s, "MB/s", baseline=tok_mb / local_s,
            note=f"iter_batches({SHARD}, fp16) at the URL vs local disk; {where}; best of {repeat}; ratio = URL/local. "
                 f"Plain FsspecStore without our object checks: {tok_mb / plain_s:.0f} MB/s"),
    ]


if __name__ == "__main__":
    script_main(run)
