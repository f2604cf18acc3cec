"""Modules imported on first use, so that registering plugins (and light CLI commands) imports no heavy
library: ``torch = lazy_module("torch")`` at module level, then ``torch.zeros(...)`` imports torch once.

The proxy is not put into ``sys.modules``; every attribute is read from the module itself, so patching the
module (tests) patches what the proxy returns."""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any


class LazyModule:
    """A stand-in for module ``name`` that imports it when an attribute is first read."""

    def __init__(self, name: str) -> None:
        self.__dict__["_lazy_name"] = name

    def _load(self) -> ModuleType:
        module = importlib.import_module(self.__dict__["_lazy_name"])
        self.__dict__["_lazy_module"] = module
        return module

    def __getattr__(self, attr: str) -> Any:
        module = self.__dict__.get("_lazy_module") or self._load()
        return getattr(module, attr)

    def __repr__(self) -> str:
        return f"<lazy module {self.__dict__['_lazy_name']}>"


def lazy_module(name: str) -> Any:
    """A :class:`LazyModule` for ``name`` (typed ``Any`` so that uses type-check like the module)."""
    return LazyModule(name)
