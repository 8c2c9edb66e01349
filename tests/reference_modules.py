"""Submodules of reference libraries whose package ``__init__`` cannot run here (AutoGPTQ and
AutoAWQ import APIs that transformers 5 no longer has): only the pure-torch modules are loaded."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types


def submodule(package: str, name: str):
    """``package.name`` imported without running the package's ``__init__`` (it needs old transformers)."""
    stub = sys.modules.get(package)
    root = stub.__path__[0] if stub is not None else importlib.util.find_spec(package).submodule_search_locations[0]
    parts = name.split(".")
    for i in range(len(parts)):
        pkg = ".".join([package, *parts[:i]])
        if pkg not in sys.modules:
            stub = types.ModuleType(pkg)
            stub.__path__ = [f"{root}/{'/'.join(parts[:i])}".rstrip("/")]
            sys.modules[pkg] = stub
    return importlib.import_module(f"{package}.{name}")
