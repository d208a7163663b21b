"""The package is laid out by the protocol's roles, and the module paths from before the move still import (with a
DeprecationWarning naming the new place)."""
import importlib
import pathlib
import re
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
    assert modules == {"__init__", "_moved", "atomic", "backends", "checks", "keys", "settings", "vit"}


def test_old_module_paths_still_import_with_a_warning():
    # one fresh interpreter (no old name cached from another test); each parent first, quietly, so that the warning
    # caught is the one of the module itself
    code = """
import importlib, warnings
from msd_fast._moved import MOVED
for old in sorted(MOVED):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        importlib.import_module(old.rpartition(".")[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        importlib.import_module(old)
    print(old, "|", "; ".join(str(w.message) for w in caught if w.category is DeprecationWarning))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = dict(line.split(" | ") for line in out.splitlines())
    assert sorted(lines) == sorted(MOVED)
    for old, targets in MOVED.items():
        assert lines[old].startswith(f"{old} moved to {targets[0]}"), (old, lines[old])


def test_library_code_does_not_import_the_command_line():
    # the command line sits on top: the library's settings are declared in msd_fast.settings, not in msd_fast.cli
    importing_cli = re.compile(r"^\s*(from\s+\.+cli\b|from\s+msd_fast\.cli\b|import\s+msd_fast\.cli\b)", re.M)
    offenders = [str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                 if "cli" not in path.relative_to(PACKAGE).parts and importing_cli.search(path.read_text())]
    assert offenders == []


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
