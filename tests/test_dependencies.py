"""Every third-party package that `lsp` imports is declared in pyproject.toml: imported at module level -> a base
dependency; imported inside a function or under `try: ... except ImportError` (used only by one feature) -> a base
dependency or an optional extra. Walks the source with `ast`, so a module that fails to import is still checked."""
import ast
import functools
import importlib.metadata
import pathlib
import re
import sys

import pytest

try:
    import tomllib
except ImportError:   # Python 3.10: the same parser under its PyPI name
    tomllib = pytest.importorskip("tomli")

ROOT = pathlib.Path(__file__).resolve().parents[1]
# modules that only an optional feature loads, with that feature's extra: their imports count as guarded
FEATURE_MODULES = {"lsp/models/hf/modeling_lsp.py": "hf"}   # the exported folder's remote code; transformers loads it


def requirement_names(requirements):
    # "torch>=2.6" / "triton>=3.0; platform_system == 'Linux'" -> "torch", "triton" (PEP 503 normalised)
    return {re.sub(r"[-_.]+", "-", re.match(r"[A-Za-z0-9_.-]+", r).group(0)).lower() for r in requirements}


def declared():
    # -> (base dependencies, {extra: its dependencies})
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {name: requirement_names(reqs) for name, reqs in project["optional-dependencies"].items()}
    return requirement_names(project["dependencies"]), extras


@functools.lru_cache(maxsize=None)
def distribution(module: str) -> str:
    """The distribution that installs a top-level module (`yaml` -> `pyyaml`); a module that is not installed here
    (an optional extra) is taken to share its distribution's name, as deepspeed / datasets / transformers do."""
    names = importlib.metadata.packages_distributions().get(module, [module])
    return re.sub(r"[-_.]+", "-", names[0]).lower()


def _guarded(node, parents) -> bool:
    # inside a function, or in the body of a `try` whose handlers catch ImportError
    for p in parents:
        if isinstance(p, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return True
        if isinstance(p, ast.Try) and any(h.type is None or "ImportError" in ast.unparse(h.type) for h in p.handlers):
            return True
    return False


def third_party_imports(source: str):
    """(top-level module, line, guarded) of every absolute import that is neither the standard library nor lsp."""
    tree = ast.parse(source)
    found = []

    def visit(node, parents):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if node.module and node.level == 0 else [])
            for name in names:
                top = name.split(".")[0]
                if top != "lsp" and top not in sys.stdlib_module_names:
                    found.append((top, node.lineno, _guarded(node, parents)))
        for child in ast.iter_child_nodes(node):
            visit(child, parents + [node])
    visit(tree, [])
    return found


def undeclared(files, root=ROOT):
    base, extras = declared()
    bad = []
    for path in files:
        feature = FEATURE_MODULES.get(path.relative_to(root).as_posix())
        allowed = extras[feature] if feature else set().union(*extras.values())
        for module, line, guarded in third_party_imports(path.read_text()):
            dist = distribution(module)
            if dist not in base and not ((guarded or feature) and dist in allowed):
                where = "an optional extra" if guarded else "a dependency"
                bad.append(f"{path.relative_to(root)}:{line}: {module} ({dist}) is not declared as {where}")
    return bad


def test_every_imported_package_is_declared():
    files = sorted((ROOT / "lsp").rglob("*.py"))
    assert len(files) > 30
    assert undeclared(files) == []


def test_feature_modules_are_not_imported_by_lsp():
    # what makes their imports optional: no lsp module imports them (they are copied or loaded by their feature)
    for path in sorted((ROOT / "lsp").rglob("*.py")):
        for module in FEATURE_MODULES:
            name = pathlib.Path(module).stem
            assert f"import {name}" not in path.read_text() and f".{name} import" not in path.read_text(), path


def test_an_undeclared_import_is_caught(tmp_path):
    # negative controls: a module-level import of an extra, and an import nobody declared, guarded or not
    src = tmp_path / "fake.py"
    src.write_text("import numpy\nimport deepspeed\ndef f():\n    import datasets\n    import nosuchpackage\n")
    assert undeclared([src], root=tmp_path) == ["fake.py:2: deepspeed (deepspeed) is not declared as a dependency",
                   "fake.py:5: nosuchpackage (nosuchpackage) is not declared as an optional extra"]
    # a feature module may import its own extra at module level, not another one's
    feature = tmp_path / "lsp/models/hf/modeling_lsp.py"
    feature.parent.mkdir(parents=True)
    feature.write_text("import transformers\nimport deepspeed\n")
    assert undeclared([feature], root=tmp_path) == [
        "lsp/models/hf/modeling_lsp.py:2: deepspeed (deepspeed) is not declared as a dependency"]


@pytest.mark.parametrize("requirement, name", [("torch>=2.6", "torch"), ("PyYAML>=6", "pyyaml"),
                                               ("triton>=3.0; platform_system == 'Linux'", "triton")])
def test_requirement_names(requirement, name):
    assert requirement_names([requirement]) == {name}
