"""The stegopipe plugin: importing it registers every stage, config section and extra command.

The default of ``STEGOPIPE_PLUGINS``. Kept apart from ``stages/__init__.py`` so that importing one
light module (e.g. ``stages.evaluation.crf`` in a CRF worker process) does not import torch, timm and every stage.
"""
from importlib.resources import files
from pathlib import Path

from pipeline.config import register_preset_dir
from pipeline.specs import register_spec_dir
# each module registers its stage and config sections; in pipeline order, the order `stegopipe stages` lists
from stages import synthesize, prepare, extract, knn, reduce, train_head, probe, evaluate, report  # noqa: F401,I001
from pipeline.cli import register_lazy_commands
from pipeline.environment import register_packages

register_packages("stegopipe", "safetensors", "squirrel-core",
                  numerics=("torch", "numpy", "zarr", "timm", "scikit-learn", "scipy", "hnne", "umap-learn", "pydensecrf2"))

# extra CLI commands: each module is imported only when one of its commands runs (light --help, completion)
register_lazy_commands("stages.commands.predict", {"predict": "Segment images with a STEGO head (label PNGs, overlays)."})
register_lazy_commands("stages.commands.import_stego",
                       {"import-stego": "Import a released STEGO .ckpt as a train-head artifact."})
register_lazy_commands("stages.commands.export_nns",
                       {"export-nns": "Copy a knn artifact's neighbours into STEGO's nns file layout."})
register_lazy_commands("stages.commands.squirrel", {
    "export-squirrel": "Write a tokens artifact as a stego-studies Squirrel store.",
    "import-squirrel": "Turn a Squirrel store into a tokens artifact."})
register_lazy_commands("stages.commands.methods", {"methods": "List the projection methods (built in and plugins')."})
register_lazy_commands("stages.commands.calibrate",
                       {"calibrate": "Measure stage throughputs on synthetic data, for plan's time estimates."})
register_lazy_commands("stages.commands.tokens", {
    "export-tokens": "Write a tokens artifact to object storage (s3://, any fsspec URL).",
    "import-tokens": "Copy a tokens artifact exported at a URL into the artifact root (same id)."})
from stages.projections import select  # noqa: F401  (the projection.* config section)
from stages import labels  # noqa: F401,E402  (label fields of every stage, result names)
from stages import costs  # noqa: F401,E402  (how each stage's cost scales, for plan's time estimates)

# presets, experiments and storage specs: package data of ``stages`` (links to the top-level folders)
register_preset_dir(Path(str(files("stages") / "configs")))
register_spec_dir(Path(str(files("stages") / "storage_specs")))
