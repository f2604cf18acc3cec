"""The science of stegopipe: datasets, backbones, stages and pure math.

Importing this package registers every stage and config section with :mod:`pipeline`.
"""
from stages import prepare  # noqa: F401  (registers synthesize, prepare)
from stages import select  # noqa: F401  (registers the projection section)
from stages import knn, squirrel_io  # noqa: F401
from stages import probe  # noqa: F401
from stages import extract  # noqa: F401
from stages import reduce  # noqa: F401
from stages import evaluate  # noqa: F401
from stages.stego import train  # noqa: F401
