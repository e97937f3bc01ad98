"""``import bitnet`` stays light: every public name loads its module on first use.

Each check runs in a fresh interpreter, since this process has long since imported
everything. How long the import takes is measured by benchmarks/bench_import.py, not here.
"""

import ast
import configparser
import fnmatch
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

import bitnet as bn

# Optional dependencies (and numba itself, with its compiler) that a bare ``import bitnet``
# must not load. The GPU, torch and file-format ones must stay unloaded even after every
# public name is resolved: they load only when that backend or format is used.
HEAVY = ["numba", "llvmlite"]
OPTIONAL = ["numba_cuda", "numba.cuda", "torch", "transformers", "safetensors", "gguf", "tokenizers",
            "metalcompute", "sentencepiece", "ml_dtypes"]

LAZY_PACKAGES = ["bitnet", "bitnet.cuda", "bitnet.models", "bitnet.nn", "bitnet.serve", "bitnet.torch"]


def loaded_after(code: str) -> list[str]:
    """The modules a fresh interpreter holds after running ``code``."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def among(modules: list[str], names: list[str]) -> list[str]:
    return [m for m in modules if any(m == n or m.startswith(n + ".") for n in names)]


def test_import_loads_no_numba_and_no_optional_dependency():
    assert among(loaded_after("import bitnet"), HEAVY + OPTIONAL) == []


def test_public_names_load_no_optional_dependency():
    assert among(loaded_after("import bitnet as bn\nfor name in bn.__all__: getattr(bn, name)"), OPTIONAL) == []


def test_serving_and_batch_generation_are_attributes_that_load_no_web_stack_or_ray():
    code = "import bitnet as bn\nbn.serve.Engine, bn.serve.Scheduler, bn.distributed.generate_dataset"
    assert among(loaded_after(code), ["starlette", "uvicorn", "fastapi", "jinja2", "ray"]) == []


def test_the_command_line_s_help_needs_no_kernels():
    """``python -m bitnet --help`` (the parser of every command) answers without numba: 0.78 -> 0.16 s."""
    assert among(loaded_after("import bitnet.cli\nbitnet.cli.build_parser()"), HEAVY + OPTIONAL) == []


def test_config_and_bundled_path_need_no_kernels():
    code = "import bitnet as bn\nbn.BitNetConfig, bn.models.bundled_path, bn.cuda.StepGraph"
    assert among(loaded_after(code), HEAVY + OPTIONAL) == []


# The first name resolved decides the import order, so each distinct module is touched first
# once, with every bitnet module unloaded before (numba stays: it is loaded either way): an
# import cycle between lazily loaded modules fails here. bitnet.torch's names load torch, so
# only the other packages' names are resolved.
FIRST_TOUCH = sorted({bn._HOMES[name] for name in bn.__all__ if name in bn._HOMES} | set(bn._SUBMODULES))


def test_every_public_name_resolves_whichever_comes_first():
    code = f"""
import importlib, sys
for first in {FIRST_TOUCH!r}:
    for loaded in [m for m in sys.modules if m == "bitnet" or m.startswith("bitnet.")]:
        del sys.modules[loaded]
    bn = importlib.import_module("bitnet")
    getattr(bn, first)
    for package in {LAZY_PACKAGES!r}:
        module = importlib.import_module(package)
        assert set(module.__all__) <= set(dir(module)), package
        if package != "bitnet.torch":
            for name in module.__all__:
                getattr(module, name)
"""
    loaded_after(code)


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_no_lazy_name_is_shadowed_by_a_submodule(package):
    """Importing a submodule binds its name on the package, replacing a lazy export of that name."""
    module = importlib.import_module(package)
    homes = module._HOMES
    shadowed = [name for name in homes if importlib.util.find_spec(f"{package}.{name}") is not None]
    assert shadowed == []
    for name, home in homes.items():
        assert getattr(module, name) is getattr(importlib.import_module(f"{package}.{home}"), name)


def type_checking_imports(module) -> dict[str, str]:
    """``{name: submodule}`` of the ``from .x import name`` lines under ``if TYPE_CHECKING:``."""
    tree = ast.parse(Path(module.__file__).read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    return {alias.name: node.module or alias.name for node in block.body for alias in node.names}


@pytest.mark.parametrize("package", [p for p in LAZY_PACKAGES if p != "bitnet.torch"])
def test_type_checking_imports_name_the_lazy_homes(package):
    """Type checkers and the API docs (griffe) read the TYPE_CHECKING imports; the package loads from _HOMES."""
    module = importlib.import_module(package)
    expected = dict(module._HOMES)
    if package == "bitnet":
        expected.update({name: name for name in module._SUBMODULES if name in module.__all__})
    assert type_checking_imports(module) == expected


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_unknown_attribute_is_an_attribute_error(package):
    module = importlib.import_module(package)
    assert not hasattr(module, "no_such_name")
    with pytest.raises(AttributeError, match="no_such_name"):
        _ = module.no_such_name


def test_from_import_of_a_lazy_name():
    from bitnet import load_pretrained, matmul
    from bitnet.io import load_pretrained as io_load_pretrained
    from bitnet.ops import matmul as ops_matmul

    assert matmul is ops_matmul and load_pretrained is io_load_pretrained


def test_every_data_file_of_the_package_is_declared_package_data():
    """A wheel carries only the non-Python files setup.cfg lists (the bundled model, the Metal sources)."""
    root = Path(bn.__file__).parent
    config = configparser.ConfigParser()
    config.read(root.parent / "setup.cfg")
    patterns = {package: value.replace(",", " ").split() for package, value in config["options.package_data"].items()}
    undeclared = []
    for path in root.rglob("*"):
        if path.is_dir() or path.suffix in (".py", ".pyc", ".nbi", ".nbc") or "__pycache__" in path.parts:
            continue
        relative = path.relative_to(root.parent)
        declared = any(fnmatch.fnmatch(str(relative.relative_to(folder)), pattern)
                       for package, folder in ((p, Path(*p.split("."))) for p in patterns)
                       if relative.is_relative_to(folder) for pattern in patterns[package])
        if not declared:
            undeclared.append(str(relative))
    assert undeclared == []
    assert config["options"].get("include_package_data") == "False"  # package_data alone decides
