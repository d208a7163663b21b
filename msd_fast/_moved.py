"""Module paths from before the layout by role (2026-12): ``import msd_fast.pretrain`` and the like keep working,
with a ``DeprecationWarning`` naming the new place. One table, one import hook; nothing else refers to old names."""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

# old module -> the module(s) that now hold its names (the first is where its submodules went)
MOVED = {
    "msd_fast.pretrain": ("msd_fast.server",),
    "msd_fast.downstream": ("msd_fast.evaluation", "msd_fast.client"),
    "msd_fast.downstream.classifier": ("msd_fast.client.classifier",),
    "msd_fast.downstream.training": ("msd_fast.client.finetune",),
    "msd_fast.downstream.cli": ("msd_fast.cli.downstream",),
    "msd_fast.downstream.evaluation": ("msd_fast.evaluation.tasks",),
    "msd_fast.audit": ("msd_fast.evaluation.audit",),
    "msd_fast.demo": ("msd_fast.evaluation.demo",),
    "msd_fast.demo_report": ("msd_fast.evaluation.demo_report",),
    "msd_fast.encryption_demo": ("msd_fast.evaluation.encryption_demo",),
    "msd_fast.image_grid": ("msd_fast.evaluation.image_grid",),
    "msd_fast.encryption": ("msd_fast.protocol.encryption",),
    "msd_fast.shards": ("msd_fast.protocol.shards",),
    "msd_fast.token_embedding": ("msd_fast.protocol.token_embedding",),
    "msd_fast.dino": ("msd_fast.server.dino",),
    "msd_fast.flags": ("msd_fast.cli.flags",),
    "msd_fast.paths": ("msd_fast.cli.paths",),
}


def new_location(old: str) -> tuple[str, ...] | None:
    """The new module(s) of ``old``: an entry of :data:`MOVED`, or a submodule of a moved package."""
    if old in MOVED:
        return MOVED[old]
    parent, _, leaf = old.rpartition(".")
    if parent in MOVED:
        return (MOVED[parent][0] + "." + leaf,)
    return None


class _MovedLoader(importlib.abc.Loader):
    """Makes the old module as a new module object holding the new modules' names (the new modules keep their own
    identity and ``__spec__``)."""

    def __init__(self, targets: tuple[str, ...]):
        self.targets = targets

    def create_module(self, spec):
        modules = [importlib.import_module(name) for name in self.targets]
        warnings.warn(f"{spec.name} moved to {' and '.join(self.targets)}; import it from there",
                      DeprecationWarning, stacklevel=2)
        alias = types.ModuleType(spec.name, modules[0].__doc__)
        for module in reversed(modules):
            alias.__dict__.update({k: v for k, v in vars(module).items() if not k.startswith("__")})
        alias.__path__ = []
        return alias

    def exec_module(self, module):
        pass


class _MovedFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        targets = new_location(fullname)
        if targets is None:
            return None
        return importlib.util.spec_from_loader(fullname, _MovedLoader(targets), is_package=True)


def install() -> None:
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())
