"""The package is laid out by the protocol's roles, and the module paths from before the move still import (with a
DeprecationWarning naming the new place)."""
import importlib
import pathlib
import subprocess
import sys

import pytest

import msd_fast
from msd_fast._moved import MOVED

PACKAGE = pathlib.Path(msd_fast.__file__).parent


def test_top_level_is_the_roles_and_a_few_shared_modules():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert folders == {"cli", "client", "data", "evaluation", "ops", "protocol", "server"}
    assert modules == {"__init__", "_moved", "atomic", "backends", "checks", "keys", "vit"}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_still_import_with_a_warning(old):
    # a fresh interpreter: the old name must not be cached from another test
    parent = old.rpartition(".")[0]
    code = (f"import warnings, importlib\nwith warnings.catch_warnings():\n    warnings.simplefilter('ignore')\n"
            f"    importlib.import_module({parent!r})\n"
            f"warnings.simplefilter('error', DeprecationWarning)\n"
            f"try:\n    import {old}\nexcept DeprecationWarning as w:\n    print(w)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith(f"{old} moved to {MOVED[old][0]}"), out


def test_old_names_are_the_new_objects():
    with pytest.warns(DeprecationWarning):
        old_config = importlib.import_module("msd_fast.pretrain.config")
    with pytest.warns(DeprecationWarning):
        old_downstream = importlib.import_module("msd_fast.downstream")
    from msd_fast.client import Recipe
    from msd_fast.evaluation import fedavg
    from msd_fast.server.config import PretrainConfig
    assert old_config.PretrainConfig is PretrainConfig
    assert old_downstream.Recipe is Recipe and old_downstream.fedavg is fedavg
    # the new modules keep their own identity
    assert msd_fast.server.config.__spec__.name == "msd_fast.server.config"


def test_an_unknown_old_name_is_still_an_import_error():
    with pytest.raises(ImportError):
        importlib.import_module("msd_fast.pretrain.no_such_module")
