"""Evaluation science: metrics (confusion, Hungarian matching), the dense CRF, probes and figures."""
