"""What a regular install ships: every package, every runtime dependency, every file a wheel is built from.

These read the checkout (setup.py, pyproject.toml, MANIFEST.in and the imports of the source files); the build
itself (sdist -> wheel -> fresh virtual environment -> ``msd-fast``) is ``.ci/package_check.sh``.
"""
import ast
import fnmatch
import os
import pathlib
import re
import runpy
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# A distribution whose import name is not its (normalised) project name.
IMPORT_NAMES = {"pillow": "PIL", "scikit_learn": "sklearn"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _import_names(requirements: list) -> set:
    names = set()
    for requirement in requirements:
        project = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0).lower().replace("-", "_")
        names.add(IMPORT_NAMES.get(project, project))
    return names


def _imported_modules(folder: pathlib.Path) -> dict:
    """``{top-level module: first file importing it}`` over every absolute import in ``folder``'s .py files,
    including imports inside functions (a lazy import still runs)."""
    found = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module]
            else:
                continue
            for module in modules:
                found.setdefault(module.split(".")[0], str(path.relative_to(ROOT)))
    return found


def _third_party(imports: dict) -> dict:
    return {name: path for name, path in imports.items()
            if name not in sys.stdlib_module_names and name not in ("msd_fast", "__future__")}


def test_every_runtime_import_is_a_declared_dependency_and_every_dependency_is_imported():
    project = _pyproject()["project"]
    declared = _import_names(project["dependencies"])
    package = _third_party(_imported_modules(ROOT / "msd_fast"))
    undeclared = {name: path for name, path in package.items() if name not in declared}
    assert not undeclared, f"imported at run time but not in [project] dependencies: {undeclared}"
    assert not declared - set(package), f"declared but never imported: {declared - set(package)}"
    # The Triton kernels (msd_fast.kernels) may use the optional [triton] extra, nothing else.
    kernels = _third_party(_imported_modules(ROOT / "kernels"))
    optional = _import_names(project["optional-dependencies"]["triton"])
    assert set(kernels) <= declared | optional, set(kernels) - declared - optional
    assert {"test", "triton"} <= set(project["optional-dependencies"])
    assert "requires-python" in project


def test_the_console_script_names_a_function_of_the_package():
    module, _, function = _pyproject()["project"]["scripts"]["msd-fast"].partition(":")
    path = ROOT.joinpath(*module.split(".")).with_suffix(".py")
    assert function in {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def test_setup_ships_every_package_and_kernels_as_msd_fast_kernels(monkeypatch, capsys):
    import setuptools

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.setenv("MSD_FAST_BUILD_CUDA", "0")
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    capsys.readouterr()
    source_packages = {".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "msd_fast").rglob("*.py")
                       if "__pycache__" not in path.parts}
    assert source_packages <= set(captured["packages"]), source_packages - set(captured["packages"])
    assert {"msd_fast.evaluation.audit", "msd_fast.data", "msd_fast.evaluation", "msd_fast.server",
            "msd_fast.ops"} <= source_packages
    assert "msd_fast.kernels" in captured["packages"] and "kernels" not in captured["packages"]
    assert captured["package_dir"]["msd_fast.kernels"] == "kernels"
    for extension in captured["ext_modules"]:
        assert extension.sources and all((ROOT / source).is_file() for source in extension.sources)


def _manifest_rules() -> list:
    rules = []
    for line in (ROOT / "MANIFEST.in").read_text().splitlines():
        words = line.split("#")[0].split()
        if words:
            rules.append((words[0], words[1:]))
    return rules


def _in_sdist(relative: str, rules: list) -> bool:
    """Whether MANIFEST.in's include / recursive-include / global-exclude lines put ``relative`` into the sdist."""
    name, included = os.path.basename(relative), False
    for command, args in rules:
        if command == "include":
            included |= any(fnmatch.fnmatch(relative, pattern) for pattern in args)
        elif command == "recursive-include":
            folder, patterns = args[0], args[1:]
            included |= (relative.startswith(folder.rstrip("/") + "/")
                         and any(fnmatch.fnmatch(name, pattern) for pattern in patterns))
        elif command == "global-exclude" and any(fnmatch.fnmatch(name, pattern) for pattern in args):
            included = False
        elif command not in ("include", "recursive-include", "global-exclude"):
            raise AssertionError(f"MANIFEST.in: this test does not know {command!r}; teach it")
    return included


def test_manifest_puts_every_native_source_header_and_kernel_into_the_sdist():
    rules = _manifest_rules()
    needed = [p for p in (ROOT / "csrc").rglob("*") if p.is_file()] + list((ROOT / "kernels").glob("*.py"))
    needed += [ROOT / name for name in ("README.md", "setup.py", "pyproject.toml")]
    needed += list((ROOT / "tests").glob("*.py"))
    assert any(p.suffix == ".h" for p in needed), "no header found: the test reads the wrong folder"
    missing = [str(p.relative_to(ROOT)) for p in needed if not _in_sdist(str(p.relative_to(ROOT)), rules)]
    assert not missing, f"MANIFEST.in leaves these out of the sdist: {missing}"
    assert not _in_sdist("msd_fast/_C.cpython-311-x86_64-linux-gnu.so", rules)
    assert not _in_sdist("kernels/__pycache__/dino_loss.cpython-311.pyc", rules)


def test_every_csrc_include_is_a_file_of_the_checkout():
    """A quoted ``#include`` names a file under csrc/ (so the MANIFEST check above covers what the compiler reads)."""
    for source in (ROOT / "csrc").rglob("*"):
        if source.suffix not in (".h", ".cuh", ".cpp", ".cu"):
            continue
        for header in re.findall(r'^\s*#\s*include\s+"([^"]+)"', source.read_text(), flags=re.M):
            assert (source.parent / header).is_file(), f"{source.relative_to(ROOT)} includes missing {header}"
