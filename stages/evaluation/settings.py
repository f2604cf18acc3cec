"""The probes' settings, importable without torch (the probe stage's config declaration reads them)."""
from __future__ import annotations

PROBE_LR = 5e-3
"""Adam learning rate of both probes (method.md §5, §9.1)."""
