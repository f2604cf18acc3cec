"""The stegopipe plugin: importing it registers every stage, config section and extra command.

The default of ``STEGOPIPE_PLUGINS``. Kept apart from ``stages/__init__.py`` so that importing one
light module (e.g. ``stages.evaluation.crf`` in a CRF worker process) does not import torch, timm and every stage.
"""
from stages import (  # noqa: F401  (each module registers its stage and config sections)
    evaluate,
    extract,
    knn,
    prepare,
    probe,
    reduce,
    report,
    synthesize,
    train_head,
)
from stages.commands import export_nns, import_stego, predict, squirrel  # noqa: F401  (extra CLI commands)
from stages.projections import select  # noqa: F401  (the projection.* config section)
