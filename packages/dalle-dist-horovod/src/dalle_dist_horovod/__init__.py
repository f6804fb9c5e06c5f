"""The ``horovod`` distributed backend for dalle.

Installing the package registers the backend with dalle-core, so that
``horovodrun -np 2 -H localhost:2 --gloo dalle-train dalle ... --distributed-backend horovod``
trains with Horovod. Importing it does not import horovod (`HorovodBackend` does, when it
initializes). Horovod itself is built by ``dalle-build-horovod --install``
(`dalle_dist_horovod.build`).
"""

from dalle_dist_horovod.backend import HorovodBackend

__all__ = ["HorovodBackend"]
__version__ = "0.1.0"
