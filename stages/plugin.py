"""The stegopipe plugin: importing it registers every stage, config section and extra command.

The default of ``STEGOPIPE_PLUGINS``. Kept apart from ``stages/__init__.py`` so that importing one
light module (e.g. ``stages.crf`` in a CRF worker process) does not import torch, timm and every stage.
"""
from stages import (  # noqa: F401  (each module registers its stage, config section or commands)
    evaluate,
    extract,
    knn,
    predict,
    prepare,
    probe,
    reduce,
    report,
    select,
    squirrel_io,
)
from stages.stego import importer, train  # noqa: F401
