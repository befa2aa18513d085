"""Secure aggregation (SecAgg+): the primitives (:mod:`.primitives`) and what both sides
agree on about the messages (:mod:`.protocol`). The coordinator's side of a round lives in
:mod:`fedtune.server.secure`, a site's in :mod:`fedtune.client.secure`."""

from .primitives import *  # noqa: F401,F403
from .primitives import __all__  # noqa: F401
