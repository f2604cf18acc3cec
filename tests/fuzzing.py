"""A small seeded mutation fuzzer for the readers of files we did not just write (issue 19).

A :class:`FuzzCase` names one reader and one file it reads: the file's original bytes, how to put a
(mutated) copy of that file where the reader finds it (``write(folder, data)`` returns the argument of
``read``), the reader call, and what the reader returns on the original bytes. :func:`fuzz` applies
seeded mutations (bit flips, byte overwrites, truncations, extensions, splices, length-field tweaks)
and checks the property of the readers:

- the read returns exactly the original data (``harmless``), or
- it raises one of the case's refusals (our :class:`~pipeline.errors.StegopipeError` family) with a
  non-empty one-line message (``refused``);
- never other data, never another exception type, never a multi-line message, and never more memory
  than the case's expected decoded size plus :data:`MARGIN` (``wrong``, which must stay 0).

Memory is bounded three ways: the process's address space is capped at its current size plus the limit
plus :data:`ADDRESS_MARGIN` during the read, so an allocation beyond it (torch, a C decoder, numpy) fails
instead of exhausting the machine, and counts as wrong; the growth of the resident set's high-water mark
(reset before each read through ``/proc/self/clear_refs``) must stay within the limit plus
:data:`RSS_MARGIN`; and on every :data:`TRACE_EVERY`-th read (``tracemalloc`` makes reads ~5x slower) the
peak of ``tracemalloc`` (Python and numpy allocations, touched or not) within the limit plus :data:`MARGIN`.

A format with no integrity check of its own over the fuzzed layer (a crafted file rather than a damaged
one: a Squirrel record's msgpack, a label PNG at ``prepare`` time) sets ``integrity=False``: a read that
returns something else, having passed the reader's own checks (its schema), then counts as ``accepted``.

Cases register with :func:`fuzz_case` in ``tests/fuzz_cases_*.py`` modules (:func:`load_cases` imports
them all): one module per owner, so the registry needs no central edit.
"""
from __future__ import annotations

import importlib
import random
import re
import resource
import shutil
import struct
import tempfile
import tracemalloc
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import StegopipeError

MARGIN = 16 << 20
"""Bytes a read may allocate (tracemalloc peak) beyond the case's ``max_bytes``."""
RSS_MARGIN = 64 << 20
"""Bytes the resident set's peak may grow beyond the case's ``max_bytes`` (allocator and first-use caches)."""
ADDRESS_MARGIN = 512 << 20
"""Address space a read may add beyond ``max_bytes`` before an allocation fails (native allocators,
arenas, imports on first use)."""
MUTATIONS = ("flip", "overwrite", "truncate", "extend", "splice", "length")
SHORT_RUN = 30
"""Mutations per case in the default suite."""
LONG_RUN = 1000
"""Mutations per case in ``make test-faults`` (``faults_full``) and ``make bench``."""
TRACE_EVERY = 10
"""Every this many reads (the unmutated one included) also run under ``tracemalloc``."""

_INTERESTING_BYTES = (b"\x00", b"\xff", b"\x7f", b"\x80", b"\x01")
_INTERESTING_INTS = (0, 1, 2**7, 2**8 - 1, 2**15, 2**16 - 1, 2**31 - 1, 2**31, 2**32 - 1, 2**63 - 1, 2**63,
                     2**64 - 1)
_INTERESTING_NUMBERS = (b"0", b"-1", b"1", b"99999999999999999999", b"1e308", b"-0", b"4294967296", b"NaN")
_DIGITS = re.compile(rb"-?[0-9]+")


@dataclass(frozen=True)
class FuzzCase:
    """One reader and the one file of it that is mutated (see the module docstring).

    ``write(folder, data)`` puts ``data`` where ``read`` finds it inside the empty ``folder`` (with any
    other files the reader needs, unmutated) and returns the argument of ``read``. ``expected`` is what
    ``read`` returns on ``original``; ``same(result, expected)`` compares (default :func:`same`).
    ``max_bytes`` is the expected decoded size: a read may allocate that plus :data:`MARGIN`.
    """

    name: str
    original: bytes
    write: Callable[[Path, bytes], Any]
    read: Callable[[Any], Any]
    expected: Any
    max_bytes: int
    refusals: tuple[type[BaseException], ...] = (StegopipeError,)
    same: Callable[[Any, Any], bool] = field(default=lambda a, b: same(a, b))
    integrity: bool = True


@dataclass
class FuzzCounts:
    """Outcome counts of one case's run; ``failures`` describes the first few wrong outcomes."""

    case: str
    tried: int = 0
    refused: int = 0
    harmless: int = 0
    accepted: int = 0
    wrong: int = 0
    peak_bytes: int = 0
    failures: list[str] = field(default_factory=list)

    def row(self) -> dict[str, Any]:
        return {"case": self.case, "tried": self.tried, "refused": self.refused, "harmless": self.harmless,
                "accepted": self.accepted, "wrong": self.wrong, "peak_bytes": self.peak_bytes}


_REGISTRY: dict[str, Callable[[Path], FuzzCase]] = {}


def fuzz_case(name: str) -> Callable[[Callable[[Path], FuzzCase]], Callable[[Path], FuzzCase]]:
    """Register a case factory: ``factory(workdir) -> FuzzCase`` builds the original file(s) under ``workdir``."""
    def register(factory: Callable[[Path], FuzzCase]) -> Callable[[Path], FuzzCase]:
        if name in _REGISTRY:
            raise ValueError(f"fuzz case {name!r} registered twice")
        _REGISTRY[name] = factory
        return factory
    return register


def load_cases() -> dict[str, Callable[[Path], FuzzCase]]:
    """Every registered case factory by name (imports every ``tests/fuzz_cases_*.py``)."""
    for path in sorted(Path(__file__).parent.glob("fuzz_cases_*.py")):
        importlib.import_module(f"tests.{path.stem}")
    return dict(sorted(_REGISTRY.items()))


def same(a: Any, b: Any) -> bool:
    """Deep equality for the values readers return: mappings, sequences, numpy arrays (dtype, shape and
    bytes), torch tensors, dataclass-like objects through ``__dict__``, else ``==``."""
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        return (isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and a.dtype == b.dtype
                and a.shape == b.shape and a.tobytes() == b.tobytes())
    if type(a).__module__.startswith("torch") and hasattr(a, "numpy"):
        return type(a) is type(b) and a.dtype == b.dtype and same(a.detach().cpu().numpy(), b.detach().cpu().numpy())
    if isinstance(a, Mapping):
        return isinstance(b, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dict__") and not isinstance(a, type):
        return type(a) is type(b) and same(vars(a), vars(b))
    return type(a) is type(b) and a == b


# -- mutations -------------------------------------------------------------------------------------

def mutate(data: bytes, rng: random.Random, kind: str | None = None) -> tuple[str, bytes]:
    """One mutation of ``data`` (``kind`` one of :data:`MUTATIONS`, random when None): (description, bytes)."""
    kind = kind or rng.choice(MUTATIONS)
    n = len(data)
    buf = bytearray(data)
    if kind == "flip":
        bits = [rng.randrange(max(n, 1) * 8) for _ in range(rng.choice((1, 1, 2, 4)))] if n else []
        for bit in bits:
            buf[bit // 8] ^= 1 << (bit % 8)
        return f"flip bit(s) {bits}", bytes(buf)
    if kind == "overwrite" and n:
        width = rng.choice((1, 2, 4, 8))
        at = rng.randrange(n)
        new = (rng.choice(_INTERESTING_BYTES) * width if rng.random() < 0.5 else rng.randbytes(width))
        buf[at:at + width] = new
        return f"overwrite {width} byte(s) at {at} with {new.hex()}", bytes(buf[:max(n, at + width)])
    if kind == "truncate":
        at = rng.randrange(n) if n else 0
        return f"truncate to {at} of {n} bytes", data[:at]
    if kind == "extend":
        extra = rng.randbytes(rng.choice((1, 7, 64, 4096))) if rng.random() < 0.5 else data[-rng.randint(1, max(n, 1)):]
        return f"extend by {len(extra)} bytes", data + extra
    if kind == "splice" and n > 1:
        a = rng.randrange(n)
        b = rng.randint(a + 1, min(n, a + 512))
        at = rng.randrange(n)
        if rng.random() < 0.5:
            return f"insert bytes {a}:{b} at {at}", data[:at] + data[a:b] + data[at:]
        buf[at:at + (b - a)] = data[a:b]
        return f"copy bytes {a}:{b} over {at}", bytes(buf)
    if kind == "length" and n:
        return _tweak_length(data, rng)
    return mutate(data, rng, "flip")


def _tweak_length(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    """Set a number to an extreme: an ASCII decimal in text, else a 2/4/8-byte integer at a random offset."""
    numbers = list(_DIGITS.finditer(data)) if _looks_textual(data) else []
    if numbers:
        match = rng.choice(numbers)
        new = rng.choice(_INTERESTING_NUMBERS)
        return (f"number {match.group().decode()!s} at {match.start()} -> {new.decode()}",
                data[:match.start()] + new + data[match.end():])
    width = rng.choice((2, 4, 8))
    at = rng.randrange(max(len(data) - width + 1, 1))
    order = rng.choice("<>")
    old = int.from_bytes(data[at:at + width].ljust(width, b"\0"), "little" if order == "<" else "big")
    value = rng.choice((*_INTERESTING_INTS, old + 1, max(old - 1, 0), old * 2, old * 1024)) % (1 << (8 * width))
    packed = struct.pack(order + {2: "H", 4: "I", 8: "Q"}[width], value)
    return f"{width}-byte {'LE' if order == '<' else 'BE'} integer at {at}: {old} -> {value}", \
        data[:at] + packed + data[at + width:]


def _looks_textual(data: bytes) -> bool:
    head = data[:4096]
    return bool(head) and sum(32 <= c < 127 or c in (9, 10, 13) for c in head) > 0.95 * len(head)


# -- the property ----------------------------------------------------------------------------------

def _address_space() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[0]) * resource.getpagesize()


def _reset_rss_peak() -> int:
    """Reset the resident set's high-water mark to the current resident size; returns that size (bytes)."""
    with open("/proc/self/clear_refs", "w") as handle:
        handle.write("5")
    return _status_kb("VmRSS") << 10


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def _capped_address_space(extra: int) -> Iterator[None]:
    """Cap the address space at its current size plus ``extra`` bytes (restored afterwards)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = _address_space() + extra
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def check_read(case: FuzzCase, data: bytes, folder: Path, *, traced: bool = True) -> tuple[str, str, int]:
    """Run ``case``'s reader on ``data`` written into ``folder``: (outcome, detail, peak bytes allocated).

    outcome is ``harmless``, ``refused``, ``accepted`` or ``wrong`` (see the module docstring).
    """
    folder.mkdir(parents=True)
    target = case.write(folder, data)
    if traced:
        tracemalloc.start()
    rss_before = _reset_rss_peak()
    try:
        with _capped_address_space(case.max_bytes + ADDRESS_MARGIN):
            result = case.read(target)
    except case.refusals as exc:
        outcome, detail = _judge_refusal(exc)
    except BaseException as exc:  # noqa: BLE001 - any other type is the finding
        if isinstance(exc, KeyboardInterrupt):
            raise
        outcome, detail = "wrong", f"raised {type(exc).__name__}: {str(exc)[:300]}"
    else:
        if case.same(result, case.expected):
            outcome, detail = "harmless", ""
        elif not case.integrity:
            outcome, detail = "accepted", ""
        else:
            outcome, detail = "wrong", "returned other data"
    finally:
        rss_peak = (_status_kb("VmHWM") << 10) - rss_before
        traced_peak = tracemalloc.get_traced_memory()[1] if traced else 0
        tracemalloc.stop()
    if traced_peak > case.max_bytes + MARGIN:
        outcome, detail = "wrong", f"allocated {traced_peak} bytes (limit {case.max_bytes + MARGIN}); {detail}"
    elif rss_peak > case.max_bytes + RSS_MARGIN:
        outcome, detail = "wrong", f"resident set grew {rss_peak} bytes (limit {case.max_bytes + RSS_MARGIN}); {detail}"
    return outcome, detail, max(traced_peak, rss_peak)


def _judge_refusal(exc: BaseException) -> tuple[str, str]:
    message = str(exc)
    if not message.strip() or "\n" in message.strip():
        return "wrong", f"{type(exc).__name__} message is not one line: {message[:300]!r}"
    return "refused", message


def fuzz(case: FuzzCase, n: int, *, seed: int = 0, workdir: Path | None = None,
         kinds: Sequence[str] = MUTATIONS, trace_every: int = TRACE_EVERY) -> FuzzCounts:
    """Apply ``n`` seeded mutations to ``case`` and count the outcomes (``wrong`` must stay 0); every
    ``trace_every``-th read also bounds the tracemalloc peak (see the module docstring).

    Also checks the unmutated file first: it must read back as ``expected`` (else the case itself is
    broken and a ``ValueError`` says so).
    """
    counts = FuzzCounts(case.name)
    rng = random.Random(f"{case.name}:{seed}")
    base = Path(tempfile.mkdtemp(prefix=f"fuzz-{case.name}-", dir=workdir))
    try:
        outcome, detail, _ = check_read(case, case.original, base / "original", traced=True)
        if outcome != "harmless":
            raise ValueError(f"fuzz case {case.name}: the unmutated file does not read back ({outcome}: {detail})")
        for i in range(n):
            description, data = mutate(case.original, rng, rng.choice(kinds))
            folder = base / f"m{i}"
            outcome, detail, peak = check_read(case, data, folder, traced=(i + 1) % trace_every == 0)
            shutil.rmtree(folder, ignore_errors=True)
            counts.tried += 1
            counts.peak_bytes = max(counts.peak_bytes, peak)
            setattr(counts, outcome, getattr(counts, outcome) + 1)
            if outcome == "wrong" and len(counts.failures) < 5:
                counts.failures.append(f"{description}: {detail}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return counts


def run_all(n: int, *, seed: int = 0, names: Sequence[str] | None = None) -> list[FuzzCounts]:
    """:func:`fuzz` every registered case (or those in ``names``) with ``n`` mutations each."""
    results = []
    for name, factory in load_cases().items():
        if names is not None and name not in names:
            continue
        with tempfile.TemporaryDirectory(prefix=f"fuzz-case-{name}-") as tmp:
            results.append(fuzz(factory(Path(tmp)), n, seed=seed, workdir=Path(tmp)))
    return results
