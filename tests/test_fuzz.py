"""The readers of files we did not just write, fuzzed (:mod:`tests.fuzzing`): a short seeded run of every
registered case here, a long one in ``make test-faults``; ``wrong`` must be 0."""
from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.errors import InputError
from tests.fuzzing import LONG_RUN, SHORT_RUN, FuzzCase, fuzz, load_cases, mutate

CASES = load_cases()


def _checked_case(verify: bool) -> FuzzCase:
    """A toy reader of ``<sha256 hex>\\n<payload>`` files that checks the hash (or not)."""
    payload = b"0123456789" * 20
    original = hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload

    def write(folder: Path, data: bytes) -> Path:
        (folder / "f").write_bytes(data)
        return folder / "f"

    def read(path: Path) -> bytes:
        digest, _, body = path.read_bytes().partition(b"\n")
        if verify and hashlib.sha256(body).hexdigest().encode() != digest:
            raise InputError(f"{path}: sha256 differs")
        return body

    return FuzzCase("toy", original, write, read, expected=payload, max_bytes=4096)


def test_harness_tells_a_checked_reader_from_a_naive_one(tmp_path: Path) -> None:
    checked = fuzz(_checked_case(True), 200, workdir=tmp_path)
    naive = fuzz(_checked_case(False), 200, workdir=tmp_path)
    assert checked.wrong == 0 and checked.refused > 150 and checked.tried == 200
    assert naive.wrong > 50 and "returned other data" in naive.failures[0]


def test_harness_counts_a_memory_blowup_and_a_foreign_exception_as_wrong(tmp_path: Path) -> None:
    def write(folder: Path, data: bytes) -> bytes:
        return data

    def greedy(data: bytes) -> bytes:
        if data != b"abc":
            return bytes(len(data) * (64 << 20))  # "decodes" to 64 MB per input byte
        return data

    counts = fuzz(FuzzCase("greedy", b"abc", write, greedy, expected=b"abc", max_bytes=16), 30, workdir=tmp_path,
                  kinds=("extend",), trace_every=1)
    assert counts.wrong == 30 and all("allocated" in f or "MemoryError" in f for f in counts.failures)

    def crashes(data: bytes) -> bytes:
        if data != b"abc":
            raise KeyError("x")
        return data

    counts = fuzz(FuzzCase("crash", b"abc", write, crashes, expected=b"abc", max_bytes=16), 5, workdir=tmp_path)
    assert counts.wrong == 5 and "KeyError" in counts.failures[0]


def test_mutations_are_seeded_and_cover_every_kind() -> None:
    import random

    data = bytes(range(256)) * 4
    first = [mutate(data, random.Random(7)) for _ in range(3)]
    assert first == [mutate(data, random.Random(7)) for _ in range(3)]
    rng = random.Random(1)
    for kind in ("flip", "overwrite", "truncate", "extend", "splice", "length"):
        description, mutated = mutate(data, rng, kind)
        assert description and mutated != data or kind == "overwrite"


@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz_short(name: str, tmp_path: Path) -> None:
    counts = fuzz(CASES[name](tmp_path), SHORT_RUN, workdir=tmp_path)
    assert counts.wrong == 0, counts.failures
    assert counts.tried == SHORT_RUN


@pytest.mark.faults_full
@pytest.mark.parametrize("name", sorted(CASES))
def test_fuzz_long(name: str, tmp_path: Path) -> None:
    counts = fuzz(CASES[name](tmp_path), LONG_RUN, seed=1, workdir=tmp_path)
    assert counts.wrong == 0, counts.failures
