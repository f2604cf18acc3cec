"""Token store I/O against raw numpy files holding the same bytes, side by side in one run.

For two token sizes, ViT-S/8 at 224 (28×28×384 fp16, 0.6 MB a sample) and ViT-B/8 at 320 (40×40×768 fp16,
2.5 MB a sample): tokens (Gaussian with per-channel scales, which hardly compress, like real tokens) plus
blocky int16 label maps and ids, in shards of 64 samples. The baseline writes the same shards as
``.npy`` files (``numpy.save``, tokens and labels) and reads them memory-mapped (opened once, page cache).

- write: ``write_shard`` per shard ÷ ``numpy.save`` per shard (MB/s of tokens + labels; best of 3, interleaved);
- random 1-sample read and random batch of 32: ``TokenStore.get_tokens`` (float32, what the consumers get)
  ÷ a gather from the memory maps cast to float32 (median; each ratio = baseline time / ours);
- sequential stream (warm, page cache): ``TokenStore.iter_batches`` (fp16) over a store of 32 ViT-S/8 or 16
  ViT-B/8 shards (1.2 and 2.5 GB; 8 quick), long enough for the stream's steady state, ÷ ``numpy.load`` of
  the same shards' ``.npy`` files (best of 5, interleaved).

From disk (a ViT-S/8 store of 512 samples, 0.3 GB, quick; 2,048, 1.2 GB, full): every file of the store is
evicted from the page cache (``sync``, then ``posix_fadvise(DONTNEED)`` per file; the note reports how
much stayed resident, by ``mincore``) before each timed pass, so no process needs root and the other users
of the machine keep their cache:

- cold stream: ``iter_batches`` (fp16 and float32) ÷ ``cat`` of the same tokens shard files, in order;
- kNN descriptor read: the kNN stage's read phase (``descriptors_from_store``, several reads in flight) ÷
  two parallel ``cat`` streams of the shard files (alternate files each);
- random single-sample read: ``get`` of one sample (fp16, and float32 cast into a reused buffer with
  ``out=``; the store's shard indexes already read, as in any loop after its first batch) ÷ a raw ``open`` +
  ``pread`` + ``close`` of that sample's chunk at an offset known beforehand, and the float32 floor (that raw
  read plus the crc32c and one cast, inline); the readers take turns read by read, each on distinct samples,
  so the disk's drift (±20 % over a minute here) falls on all alike.

Every read of ours checks the crc32c of every chunk; the baseline checks nothing. The machine is shared:
ratios are measured side by side, but single numbers move by ±20 % between runs.

Full runs add the scale case: a store of 3,400 ViT-S/8 samples (2.05 GB of tokens) and one of half that,
each written, streamed and randomly read by a fresh process that reports its peak RSS (flat in N: the
store never has to fit in memory).
"""
from __future__ import annotations

import ctypes
import mmap
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import cat_files, peak_rss_mb, row, run_python_child, script_main, temp_root

SHARD = 64
BATCH = 32
SIZES = {"ViT-S/8@224": ((28, 28), 384, 224), "ViT-B/8@320": ((40, 40), 768, 320)}
SCALE_N = 3400  # ViT-S/8 tokens: 3400 × 602,112 B = 2.05 GB


def _load() -> str:
    """The machine's load averages (1, 5, 15 min) for a row's note: the machine is shared."""
    return "load avg " + "/".join(f"{x:.1f}" for x in os.getloadavg())


def _data(n: int, grid: tuple[int, int], dim: int, res: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    scales = rng.uniform(0.2, 3.0, size=dim).astype(np.float32)
    tokens = (rng.standard_normal((n, *grid, dim), dtype=np.float32) * scales).astype(np.float16)
    blocks = rng.integers(-1, 27, size=(n, res // 32, res // 32), dtype=np.int16)
    labels = np.repeat(np.repeat(blocks, 32, axis=1), 32, axis=2)
    return {"tokens": tokens, "labels": labels, "ids": [f"s{i:06d}" for i in range(n)], "grid": grid, "dim": dim,
            "res": res}


def _create_store(path: Path, d: dict[str, Any], n: int | None = None) -> None:
    """An empty store for ``n`` samples (default: as many as ``d`` holds) of ``d``'s shapes."""
    from stages.store import create_token_store

    create_token_store(path, n=len(d["tokens"]) if n is None else n, grid=d["grid"], dim=d["dim"], label_hw=(d["res"], d["res"]),
                       shard_size=SHARD, with_rgb=False, with_flip=False, attrs={"bench": True})


def _write_store(path: Path, d: dict[str, Any]) -> None:
    from stages.store import shard_ranges, write_shard

    for k, (a, b) in enumerate(shard_ranges(len(d["tokens"]), SHARD)):
        write_shard(path, k, tokens=d["tokens"][a:b], labels=d["labels"][a:b], ids=d["ids"][a:b])


def _write_npy(path: Path, d: dict[str, Any]) -> None:
    from stages.store import shard_ranges

    for k, (a, b) in enumerate(shard_ranges(len(d["tokens"]), SHARD)):
        np.save(path / f"tokens-{k:05d}.npy", d["tokens"][a:b])
        np.save(path / f"labels-{k:05d}.npy", d["labels"][a:b])


def _timed_write(create: Callable[[Path], None], write: Callable[[Path], None], path: Path) -> float:
    """Seconds of ``write(path)`` after an untimed ``create(path)``; the output is removed afterwards."""
    create(path)
    start = time.perf_counter()
    write(path)
    seconds = time.perf_counter() - start
    shutil.rmtree(path)
    return seconds


def _encode_seconds(path: Path, d: dict[str, Any], repeat: int) -> float:
    """Best seconds to encode (validate, checksum, compress) every shard without writing it."""
    from stages.store import shard_ranges
    from stages.store.writer import _writer

    _create_store(path, d)
    writer = _writer(path)
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for a, b in shard_ranges(len(d["tokens"]), SHARD):
            writer.encode("tokens", d["tokens"][a:b], check_finite=True)
            writer.encode("labels", d["labels"][a:b], check_finite=False)
            writer.encode("ids", np.array(d["ids"][a:b], dtype=object), check_finite=False)
        best = min(best, time.perf_counter() - start)
    shutil.rmtree(path)
    return best


def _median_ms(fn: Callable[[Any], Any], items: Any) -> float:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(time.perf_counter() - start)
    return 1000.0 * statistics.median(times)


def _size_rows(label: str, d: dict[str, Any], scratch: Path, quick: bool) -> list[dict[str, Any]]:
    from stages.store import open_token_store

    n = len(d["tokens"])
    repeat = 2 if quick else 3
    mb = (d["tokens"].nbytes + d["labels"].nbytes) / 1e6
    sample_mb = d["tokens"][0].nbytes / 1e6
    ours_s = base_s = float("inf")
    for i in range(repeat):  # interleaved, so both sides see the same interference
        ours_s = min(ours_s, _timed_write(lambda p: _create_store(p, d), lambda p: _write_store(p, d),
                                          scratch / f"w-ours-{i}"))
        base_s = min(base_s, _timed_write(Path.mkdir, lambda p: _write_npy(p, d), scratch / f"w-npy-{i}"))
    encode_s = _encode_seconds(scratch / "encode", d, repeat)
    rows = [row(f"{label} store write", mb / ours_s, "MB/s", baseline=mb / base_s, goal=">= 0.5",
                note=f"write_shard per shard (raw fp16 + crc32c tokens, lz4 + crc32c labels, ids; shards of {SHARD}) "
                     f"÷ numpy.save of the same shards' tokens and labels; {mb:.0f} MB, {n} samples; the one-off "
                     f"create_token_store (like the baseline's mkdir) untimed; best of {repeat}. Of our "
                     f"{1000 * ours_s:.0f} ms, {1000 * encode_s:.0f} ms encode (NaN/inf check and crc32c of every "
                     f"chunk, lz4 labels), work numpy.save ({1000 * base_s:.0f} ms) does not do; the rest is the "
                     "file writes and Zarr's shard folders; " + _load())]

    _create_store(scratch / "store", d)
    _write_store(scratch / "store", d)
    (scratch / "npy").mkdir()
    _write_npy(scratch / "npy", d)
    store = open_token_store(scratch / "store")
    maps = [np.load(p, mmap_mode="r") for p in sorted((scratch / "npy").glob("tokens-*.npy"))]

    def npy_gather(idx: np.ndarray) -> np.ndarray:
        out = np.empty((len(idx), *d["grid"], d["dim"]), dtype=np.float32)
        for j, i in enumerate(idx):
            out[j] = maps[i // SHARD][i % SHARD]
        return out

    rng = np.random.default_rng(1)
    picks = [np.array([i]) for i in rng.integers(0, n, size=100 if quick else 300)]
    store.get_tokens(picks[0])
    npy_gather(picks[0])
    ours_ms = _median_ms(store.get_tokens, picks)
    base_ms = _median_ms(npy_gather, picks)
    rows.append(row(f"{label} random 1-sample read", ours_ms, "ms", baseline=base_ms, higher_is_better=False,
                    goal=">= 0.5", note=f"get_tokens of one random sample ({sample_mb:.2f} MB fp16 → float32), "
                                        "median; baseline: the memory-mapped .npy; ratio = baseline/ours; " + _load()))
    batches = [rng.choice(n, size=min(BATCH, n), replace=False) for _ in range(10 if quick else 30)]
    ours_b = _median_ms(store.get_tokens, batches)
    base_b = _median_ms(npy_gather, batches)
    rows.append(row(f"{label} random batch of {min(BATCH, n)}", ours_b, "ms", baseline=base_b,
                    higher_is_better=False, goal=">= 0.5",
                    note=f"{min(BATCH, n) * sample_mb:.0f} MB a batch → float32, median; baseline: memory-mapped "
                         ".npy gather; ratio = baseline/ours; " + _load()))

    del store, maps
    shutil.rmtree(scratch / "store")
    shutil.rmtree(scratch / "npy")
    return rows + [_stream_row(label, d, scratch, quick)]


def _stream_row(label: str, d: dict[str, Any], scratch: Path, quick: bool) -> dict[str, Any]:
    """Warm sequential stream of a store of many shards (each ``d``'s first samples, marked apart), so the
    stream runs in its steady state as over a real store, against ``numpy.load`` of the same shards."""
    from stages.store import open_token_store, shard_ranges, write_shard
    from stages.store.fastpath import _crc

    shards = 8 if quick else (32 if d["dim"] == 384 else 16)
    n, repeat = shards * SHARD, 3 if quick else 5
    picks = np.arange(SHARD) % len(d["tokens"])
    tokens, labels = d["tokens"][picks], d["labels"][picks]
    path, npy = scratch / "stream.zarr", scratch / "stream-npy"
    _create_store(path, d, n)
    npy.mkdir()
    for k, (a, b) in enumerate(shard_ranges(n, SHARD)):
        tokens[:, 0, 0, 0] = k  # shards differ
        write_shard(path, k, tokens=tokens, labels=labels, ids=[f"s{i}" for i in range(a, b)])
        np.save(npy / f"tokens-{k:05d}.npy", tokens)
    store = open_token_store(path)
    files = sorted(npy.glob("tokens-*.npy"))

    def stream() -> None:
        for _ in store.iter_batches(SHARD, tokens_dtype=np.float16):
            pass

    def npy_stream() -> None:
        for file in files:
            np.load(file)

    best = {stream: float("inf"), npy_stream: float("inf")}
    for _ in range(repeat):  # interleaved; the shortest of each (interference only adds time)
        for fn in best:
            start = time.perf_counter()
            fn()
            best[fn] = min(best[fn], time.perf_counter() - start)
    load = _load()
    crc_s = float("inf")
    for _ in range(repeat):  # what the stream does that numpy.load does not: a crc32c of every chunk
        start = time.perf_counter()
        for _shard in range(shards):
            for sample in tokens.reshape(SHARD, -1).view(np.uint8):
                _crc(sample)
        crc_s = min(crc_s, time.perf_counter() - start)
    mb = n * tokens[0].nbytes / 1e6
    del store
    shutil.rmtree(path)
    shutil.rmtree(npy)
    return row(f"{label} sequential stream", mb / best[stream], "MB/s", baseline=mb / best[npy_stream], goal=">= 0.9",
               note=f"iter_batches({SHARD}, fp16) over {mb:.0f} MB ({shards} shards) ÷ numpy.load of the same "
                    f"shards' .npy files, both in the page cache; best of {repeat}, interleaved; ratio = ours/"
                    f"baseline; {load}. The stream checks every chunk's crc32c ({crc_s * 1e3:.0f} ms of CPU alone, "
                    "on its two reader threads) and reuses the arrays of batches the loop dropped; numpy.load "
                    "checks nothing and allocates (page faults) every shard")


def _evict(paths: list[Path]) -> None:
    """Drop ``paths`` from the page cache (written back first, so their pages are clean)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _resident_fraction(paths: list[Path]) -> float:
    """Fraction of the pages of ``paths`` in the page cache (``mincore``)."""
    libc = ctypes.CDLL(None, use_errno=True)
    page = mmap.PAGESIZE
    resident = total = 0
    for path in paths:
        size = path.stat().st_size
        if not size:
            continue
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), size, prot=mmap.PROT_READ) as mapped:
            address = np.frombuffer(mapped, dtype=np.uint8).ctypes.data
            pages = -(-size // page)
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) != 0:
                return float("nan")
            resident += sum(v & 1 for v in vec)
            total += pages
    return resident / max(total, 1)


def _disk_rows(scratch: Path, quick: bool) -> list[dict[str, Any]]:
    """Cold stream and random single-sample reads from disk, against ``cat`` and a raw ``pread``."""
    from stages.stego.knn import descriptors_from_store
    from stages.store import open_token_store, shard_ranges, write_shard

    grid, dim, res = SIZES["ViT-S/8@224"]
    n = 512 if quick else 2048
    path = scratch / "disk.zarr"
    base = _data(SHARD, grid, dim, res)
    _create_store(path, base, n)
    for k, (a, b) in enumerate(shard_ranges(n, SHARD)):
        tokens = base["tokens"][: b - a].copy()
        tokens[:, 0, 0, 0] = k  # shards differ
        write_shard(path, k, tokens=tokens, labels=base["labels"][: b - a], ids=[f"s{i}" for i in range(a, b)])
    everything = [p for p in path.rglob("*") if p.is_file()]
    shard_files = sorted((p for p in (path / "tokens" / "c").rglob("*") if p.is_file()), key=lambda p: int(p.parts[-4]))
    tok_mb = sum(p.stat().st_size for p in shard_files) / 1e6
    store = open_token_store(path)
    sample = store.get("tokens", [0])[0].nbytes
    rounds = 2 if quick else 3
    best: dict[str, float] = {}

    def timed(key: str, fn: Callable[[], Any]) -> None:
        _evict(everything)
        start = time.perf_counter()
        fn()
        best[key] = min(best.get(key, float("inf")), time.perf_counter() - start)

    def stream(dtype: Any) -> Callable[[], None]:
        def run() -> None:
            for _ in store.iter_batches(SHARD, tokens_dtype=dtype):
                pass
        return run

    _evict(everything)
    resident = _resident_fraction(everything)
    for _ in range(rounds):  # interleaved; the shortest of each (interference only adds time)
        timed("cat", lambda: subprocess.run(["cat", *map(str, shard_files)], stdout=subprocess.DEVNULL, check=True))
        timed("f16", stream(np.float16))
        timed("f32", stream(np.float32))
        timed("cat2", lambda: cat_files([str(p) for p in shard_files], 2))  # two reads in flight, as kNN keeps
        timed("knn", lambda: descriptors_from_store(store))
    load = _load()
    rows = [row(f"cold stream from disk, {name}", tok_mb / best[key], "MB/s", baseline=tok_mb / best["cat"],
                goal=">= 0.8", note=f"iter_batches({SHARD}, {name}) over {tok_mb:.0f} MB of ViT-S/8 tokens ({n} "
                                    f"samples) evicted from the page cache before each pass ({100 * resident:.1f} % "
                                    f"stayed resident) ÷ cat of the same shard files; best of {rounds}, interleaved; "
                                    f"ratio = ours/cat; {load}")
            for key, name in (("f16", "fp16"), ("f32", "float32"))]
    rows.append(row("kNN descriptor read from disk", tok_mb / best["knn"], "MB/s", baseline=tok_mb / best["cat2"],
                    goal=">= 0.8", note=f"the kNN stage's read phase (descriptors_from_store: 4 reads of 64 samples "
                                        f"in flight, each pooled to a mean) over the same evicted {tok_mb:.0f} MB ÷ two "
                                        f"parallel cats of the shard files (alternate files each); best of "
                                        f"{rounds}, interleaved; "
                                        f"ratio = ours/cat×2; {load}"))

    index = {k: np.frombuffer(p.read_bytes()[-(16 * SHARD + 4):-4], dtype="<u8").reshape(SHARD, 2)
             for k, p in enumerate(shard_files)}
    files = {k: str(p) for k, p in enumerate(shard_files)}

    def raw_pread(i: int) -> bytes:
        offset, length = index[i // SHARD][i % SHARD]
        fd = os.open(files[i // SHARD], os.O_RDONLY)
        try:
            return os.pread(fd, int(length), int(offset))
        finally:
            os.close(fd)

    into = np.empty((1, *grid, dim), dtype=np.float32)  # a consumer's reused buffer
    floor_buf = np.empty(sample + 4, dtype=np.uint8)

    def checked_cast_floor(i: int) -> None:
        """The least any checked float32 read does: the raw read into a reused buffer, its crc32c, one cast."""
        offset, _ = index[i // SHARD][i % SHARD]
        fd = os.open(files[i // SHARD], os.O_RDONLY)
        try:
            os.preadv(fd, [floor_buf], int(offset))
        finally:
            os.close(fd)
        if crc32c.crc32c(floor_buf[:-4]).to_bytes(4, "little") != floor_buf[-4:].tobytes():
            raise RuntimeError("checksum mismatch in the benchmark's own store")
        torch.from_numpy(into.reshape(-1)).copy_(torch.from_numpy(floor_buf[:-4].view(np.float16)))

    readers = {"pread": raw_pread, "fp16": lambda i: store.get("tokens", [i]),
               "float32": lambda i: store.get("tokens", [i], out=into), "floor": checked_cast_floor}
    store.get("tokens", np.arange(0, n, SHARD))  # every shard index read once
    picks = np.random.default_rng(2).permutation(n).tolist()
    per = min(100 if quick else 400, n // len(readers))
    times: dict[str, list[float]] = {key: [] for key in readers}
    _evict(everything)
    for j in range(per):  # interleaved read by read, so the disk's drift falls on every reader alike
        for m, (key, read) in enumerate(readers.items()):
            start = time.perf_counter()
            read(picks[j * len(readers) + m])
            times[key].append(time.perf_counter() - start)
    medians = {key: 1000.0 * statistics.median(values) for key, values in times.items()}
    load = _load()
    common = (f"from evicted files, median of {per} distinct samples each, the readers interleaved read by read; "
              f"baseline: open + pread + close of its chunk; ratio = pread/ours")
    rows += [row(f"random 1-sample read from disk, {name}", medians[name], "ms", baseline=medians["pread"],
                 higher_is_better=False, goal=">= 0.83",
                 note=f"get of one sample ({sample / 1e6:.2f} MB fp16"
                      f"{', cast into a reused float32 buffer (out=)' if name == 'float32' else ''}) {common}, "
                      f"≥ 0.83 is within 1.2× of the raw read; {load}")
             for name in ("fp16", "float32")]
    rows.append(row("random 1-sample read from disk, float32 floor", medians["floor"], "ms", baseline=medians["pread"],
                    higher_is_better=False, goal="report",
                    note=f"the least a checked float32 read does, written inline: open + preadv into a reused buffer "
                         f"+ close, crc32c of the chunk, one torch cast into the float32 buffer; {common}. The "
                         f"float32 row can come no closer to the raw read than this; the pipeline's own random "
                         f"reads (train-head's pairs) ask for float16 and cast on the device"))
    del store
    shutil.rmtree(path)
    return rows


def scale_child(n: int, folder: str) -> dict[str, float]:
    """In a fresh process: write an ``n``-sample ViT-S/8 store shard by shard, stream it, read random
    batches; return throughputs and this process's peak RSS (the store never has to fit in memory)."""
    from stages.store import create_token_store, open_token_store, shard_ranges, write_shard

    grid, dim, res = SIZES["ViT-S/8@224"]
    base = _data(SHARD, grid, dim, res)
    path = Path(folder) / f"scale-{n}.zarr"
    create_token_store(path, n=n, grid=grid, dim=dim, label_hw=(res, res), shard_size=SHARD, with_rgb=False,
                       with_flip=False)
    start = time.perf_counter()
    for k, (a, b) in enumerate(shard_ranges(n, SHARD)):
        tokens = base["tokens"][: b - a]
        tokens[:, 0, 0, 0] = k  # shards differ
        write_shard(path, k, tokens=tokens, labels=base["labels"][: b - a], ids=[f"s{i}" for i in range(a, b)])
    write_s = time.perf_counter() - start
    store = open_token_store(path)
    start = time.perf_counter()
    for _ in store.iter_batches(SHARD, tokens_dtype=np.float16):
        pass
    stream_s = time.perf_counter() - start
    rng = np.random.default_rng(0)
    for _ in range(50):
        store.get_tokens(rng.choice(n, size=BATCH, replace=False))
    token_mb = n * base["tokens"][0].nbytes / 1e6
    shutil.rmtree(path)
    return {"token_mb": token_mb, "write_mb_s": token_mb / write_s, "stream_mb_s": token_mb / stream_s,
            "peak_rss_mb": peak_rss_mb()}


def _scale_rows(scratch: Path) -> list[dict[str, Any]]:
    code = ("import json, sys; from benchmarks.bench_store import scale_child; "
            "print(json.dumps(scale_child(int(sys.argv[1]), sys.argv[2])))")
    half = run_python_child(["-c", code, str(SCALE_N // 2), str(scratch)], timeout_s=1800)
    full = run_python_child(["-c", code, str(SCALE_N), str(scratch)], timeout_s=1800)
    gb = full["token_mb"] / 1000
    return [
        row(f"scale: {gb:.2f} GB store, peak RSS", full["peak_rss_mb"], "MiB", baseline=half["peak_rss_mb"],
            higher_is_better=False, goal=">= 0.8",
            note=f"{SCALE_N} ViT-S/8 samples written shard by shard, streamed, 50 random batches of {BATCH}, in a "
                 f"fresh process; baseline: the same at {SCALE_N // 2} samples; ratio = RSS(N/2)/RSS(N), 1 = flat in N"),
        row(f"scale: {gb:.2f} GB store write", full["write_mb_s"], "MB/s",
            note=f"tokens + labels + ids through write_shard (page cache); at N/2: {half['write_mb_s']:.0f} MB/s"),
        row(f"scale: {gb:.2f} GB store stream", full["stream_mb_s"], "MB/s",
            note=f"iter_batches fp16 over the whole store; at N/2: {half['stream_mb_s']:.0f} MB/s"),
    ]


def run(quick: bool = False) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with temp_root("stegopipe-bench-store-") as scratch:
        for label, (grid, dim, res) in SIZES.items():
            n = (64 if quick else 512) if dim == 384 else (32 if quick else 128)
            rows += _size_rows(label, _data(n, grid, dim, res), scratch, quick)
        rows += _disk_rows(scratch, quick)
        if not quick:
            rows += _scale_rows(scratch)
    return rows


if __name__ == "__main__":
    script_main(run)
