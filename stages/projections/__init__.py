"""Projections: anything that maps tokens ``[N, D]`` to codes ``[N, d]``, one module per kind.

``base`` holds the protocol, the registry and :func:`load_projection`; ``methods`` the method registry
(each kind's name, providing stage, config fields, fit, label and colour, declared in its own module);
``identity``, ``pca``, ``rp``, ``hnne`` and ``stego`` are the kinds (``linear`` holds what PCA and RP
share: standardisation and streaming moments; ``fitdata`` the fit rows a reducer reads); ``select`` is
the ``projection.*`` config section and how a stage finds the artifact that provides a projection.
Importing this package registers the light kinds below; ``stego`` (torch) is declared by the train-head
stage and loaded on demand.
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
from stages.projections import hnne, pca, rp, umap  # noqa: F401,E402  (each registers its method)

__all__ = ["BaseProjection", "IdentityProjection", "Projection", "check_tokens", "load_projection",
           "register_projection", "registered_kinds"]
