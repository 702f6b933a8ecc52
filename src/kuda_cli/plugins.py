"""Plug-in registries: methods, metrics, attacks, data kinds and trackers are each found the same
way.

A plug-in is one module of its package (`unlearn/methods/`, `evaluate/metrics/`,
`evaluate/attacks/`, `data/kinds/`, `trackers/`), found by file name without importing it, or a
module outside kuda named by an entry point of the registry's group (`kuda_cli.methods`,
`kuda_cli.metrics`, `kuda_cli.attacks`, `kuda_cli.data_kinds`, `kuda_cli.trackers`) of any
installed distribution. Importing the module
registers what it defines (a decorator calls `add`); the registry imports a module only when its
plug-in is asked for.
"""

from __future__ import annotations

import importlib
import pkgutil
from importlib import metadata
from pathlib import Path
from typing import Any

from kuda_cli.errors import UserError


class Registry:
    """Name -> plug-in (a class or a spec), for one kind of plug-in."""

    def __init__(self, what: str, package: str, group: str, key: str):
        self.what = what  # "method": how an error names a plug-in
        self.package = package  # the package whose modules are the built-in plug-ins
        self.group = group  # the entry-point group of plug-ins outside kuda
        self.key = key  # the config key that names one ("unlearn.method"), for errors
        self.found: dict[str, Any] = {}

    def modules(self) -> dict[str, str]:
        """Name -> module: the package's modules, then the entry points' (found again on every
        call, so a plug-in installed in a running process is seen)."""
        path = Path(importlib.import_module(self.package).__file__).parent
        found = {m.name: f"{self.package}.{m.name}" for m in pkgutil.iter_modules([str(path)])}
        for entry in metadata.entry_points(group=self.group):
            found.setdefault(entry.name, entry.module)
        return found

    def add(self, name: str, plugin: Any) -> None:
        self.found[name] = plugin

    def register(self, name: str, schema: type | None):
        """A class decorator: the class becomes plug-in `name`, its config following `schema`."""

        def wrap(cls):
            cls.name = name
            cls.schema = schema
            self.add(name, cls)
            return cls

        return wrap

    def known(self, name: str) -> bool:
        """Whether `name` is a plug-in (one already imported is, without looking further)."""
        return name in self.found or name in self.modules()

    def check(self, name: str, hint: str = "") -> None:
        """One line naming the registered plug-ins when `name` is not one of them."""
        modules = self.modules()
        if name not in modules:
            raise UserError(
                f"{self.key}={name} is not a registered {self.what}; choose one of: "
                f"{', '.join(modules)}{hint}"
            )

    def get(self, name: str, hint: str = "") -> Any:
        if name in self.found:  # imported already: no need to look for its module again
            return self.found[name]
        self.check(name, hint)
        module = self.modules()[name]
        importlib.import_module(module)
        if name not in self.found:
            raise UserError(f"module {module} registers no {self.what} {name!r}")
        return self.found[name]

    def all(self) -> dict[str, Any]:
        """Every plug-in, each module imported."""
        return {name: self.get(name) for name in self.modules()}
