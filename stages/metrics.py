"""Public path ``stages.metrics`` kept for notebooks and outside checkers: it is :mod:`stages.evaluation.metrics`
(the same module object, so patching either name patches both)."""
import sys

from stages.evaluation import metrics as _module

sys.modules[__name__] = _module
