"""The science of stegopipe: datasets, backbones, stages and pure math.

Importing a submodule imports only what it needs; ``stages.plugin`` registers every stage with
:mod:`pipeline` (it is the default of ``STEGOPIPE_PLUGINS``).
"""
