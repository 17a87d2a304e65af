"""Standard modules the keeper loads only when something uses them.

``dataclasses`` imports ``inspect`` (and with it ``ast``, ``dis``, ``tokenize``,
``linecache``...: about a megabyte of the keeper's memory) only to write the docstring
of a class that has none (up to Python 3.11; 3.12 reads every dataclass's annotations
with it), and no class of the keeper's lacks one. Imported first by the keeper's entry
module (:mod:`agent.keeper.keeper`), this puts a stand-in for ``inspect`` in
``sys.modules``: the first use of any of its names imports the real module (which
takes the stand-in's place there) and hands the name on, so what uses it works as
before; until then it costs nothing. A process that has imported it already is left
as it is.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any

DEFERRED = ("inspect",)


class _Deferred(types.ModuleType):
    """A module not loaded yet: loaded at the first use of a name it does not have."""

    def __getattr__(self, name: str) -> Any:
        if sys.modules.get(self.__name__) is self:
            del sys.modules[self.__name__]
        real = importlib.import_module(self.__name__)
        self.__dict__.update(vars(real))  # those holding the stand-in find it all now
        return getattr(real, name)


def defer(name: str) -> None:
    """Put a stand-in for the standard module ``name`` in ``sys.modules`` (unless it is
    there already). Its ``__spec__`` is None until it is loaded: an ``import`` of it
    finds it there and does not load it."""
    if name not in sys.modules:
        sys.modules[name] = _Deferred(name)


for _name in DEFERRED:
    defer(_name)
