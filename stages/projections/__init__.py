"""Projections: anything that maps tokens ``[N, D]`` to codes ``[N, d]``, one module per kind.

``base`` holds the protocol, the registry and :func:`load_projection`; ``identity``, ``pca``, ``rp``,
``hnne`` and ``stego`` are the kinds (``linear`` holds what PCA and RP share: standardisation and
streaming moments); ``select`` is the ``projection.*`` config section and how a stage finds the artifact
that provides a projection.
"""
from stages.projections.base import (
    BaseProjection,
    Projection,
    check_tokens,
    load_projection,
    register_projection,
    registered_kinds,
)
from stages.projections.identity import IdentityProjection

__all__ = ["BaseProjection", "IdentityProjection", "Projection", "check_tokens", "load_projection",
           "register_projection", "registered_kinds"]
