"""Looking classes up in the integrations' tables by their MRO, so that subclasses count as their base.

The diffusers integrations keep tables keyed by diffusers class names (pipelines, transformers, attention
processors, pipelines refused on purpose); names, not classes, so that nothing imports diffusers (or a diffusers
version that lacks one of them) to build them. A user's subclass (``class MyKontext(FluxKontextPipeline)``, a
community pipeline, a transformer with an extra method) is looked up as the nearest class of its MRO whose name the
table knows: it gets its base's adapter, captures, refusals and merging code path. Messages still name the user's
class (``type(obj).__name__``).
"""

from __future__ import annotations

import re
from collections.abc import Container

__all__ = ["known_name"]


def known_name(cls: type, names: Container[str] | re.Pattern[str]) -> str | None:
    """The name of the nearest class in ``cls.__mro__`` (``cls`` first, then its bases in resolution order) that
    ``names`` knows, or ``None``.

    ``names``: a table of class names (a dict's keys, a tuple, a set), or a regular expression a known name
    matches (``search``). Look an object up as ``known_name(type(obj), TABLE)``; a side table keyed by the same
    names (e.g. the capture arguments of :data:`.diffusers_models.PIPELINES`' pipelines) is then read with the
    name this returns for the main table, so one base decides everything about a subclass.
    """
    if not isinstance(cls, type):
        raise TypeError(f"known_name takes a class (type(obj)), got {type(cls).__name__}")
    for base in cls.__mro__:
        name = base.__name__
        if (names.search(name) is not None) if isinstance(names, re.Pattern) else name in names:
            return name
    return None
