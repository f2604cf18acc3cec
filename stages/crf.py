"""Public path ``stages.crf`` kept for notebooks and outside checkers: it is :mod:`stages.evaluation.crf`
(the same module object, so patching either name patches both)."""
import sys

from stages.evaluation import crf as _module

sys.modules[__name__] = _module
