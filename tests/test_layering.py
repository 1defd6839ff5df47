"""The layering of lsp holds: no module imports a layer above its own (docs/architecture.md, "Layers").

    names, kinds, engines, hybrid_config,
    run_config  <-  ops  <-  parallel  <-  models  <-  train | plan  <-  cli, export

Every module under lsp/ is parsed (ast, nothing imported), every `import lsp...` / `from lsp... import` /
relative import in it, lazy ones inside functions included, is resolved to its target module and the target's layer
must be at or below the importer's; train and plan sit side by side and neither imports the other.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

import lsp

ROOT = Path(lsp.__file__).parent
# module prefix -> layer; the longest matching prefix decides
LAYERS = {"lsp": 0, "lsp.names": 0, "lsp.kinds": 0, "lsp.engines": 0, "lsp.hybrid_config": 0, "lsp.run_config": 0,
          "lsp.ops": 1, "lsp.parallel": 2, "lsp.models": 3, "lsp.train": 4, "lsp.plan": 4, "lsp.cli": 5,
          "lsp.export": 5}
SIDE_BY_SIDE = {("lsp.train", "lsp.plan"), ("lsp.plan", "lsp.train")}


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(path: Path, root: Path) -> str:
    name = module_name(path, root)
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imported_modules(path: Path, root: Path = ROOT):
    """(line, target module) of every lsp import in the file, relative imports resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "lsp")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package_of(path, root).split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] == "lsp":   # `from lsp import cli` imports the module lsp.cli
                yield from ((node.lineno, f"{target}.{a.name}") for a in node.names)


def owner(module: str) -> str:
    """The LAYERS prefix a module belongs to (longest match)."""
    matches = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    return max(matches, key=len)


def upward_imports(root: Path = ROOT):
    bad = []
    for path in sorted(root.rglob("*.py")):
        src = owner(module_name(path, root))
        for line, target in imported_modules(path, root):
            dst = owner(target)
            if LAYERS[dst] > LAYERS[src] or (src, dst) in SIDE_BY_SIDE:
                bad.append(f"{path.relative_to(root.parent)}:{line} ({src}) imports {target} ({dst})")
    return bad


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_every_module_has_a_layer():
    # a new top-level module must be placed in LAYERS; otherwise it would count as layer 0 ("lsp") silently
    top = {module_name(p).split(".")[1] for p in ROOT.rglob("*.py") if module_name(p) != "lsp"}
    assert {f"lsp.{t}" for t in top} <= set(LAYERS)


def test_the_walk_catches_an_upward_import(tmp_path):
    # negative control: a copy of lsp/models with one lazy import of lsp.train, and plan importing train
    fake = tmp_path / "lsp"
    (fake / "models").mkdir(parents=True)
    (fake / "plan").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "models" / "__init__.py").write_text("def f():\n    from lsp.train.load import load_run\n")
    (fake / "plan" / "planner.py").write_text("from ..train import config\n")
    (fake / "names.py").write_text("from . import cli\n")   # a submodule named in the import list
    bad = upward_imports(fake)
    assert len(bad) == 3, bad
    assert any("models/__init__.py:2" in b and "lsp.train.load" in b for b in bad)
    assert any("plan/planner.py:1" in b and "lsp.train" in b for b in bad)
    assert any("names.py:1" in b and "lsp.cli" in b for b in bad)


@pytest.mark.parametrize("accelerate_env", [False, True])
def test_a_run_config_is_validated_once_per_process(tmp_path, monkeypatch, accelerate_env):
    """`lsp train` validates its config once (load_config), then checks only the world size (init_mesh); before
    the schema moved it validated 2 times per rank, 3 under `accelerate launch`."""
    import lsp.run_config as rc
    from lsp.cli import main
    calls = []
    real = rc.validate
    monkeypatch.setattr(rc, "validate", lambda *a, **k: calls.append(1) or real(*a, **k))
    if accelerate_env:
        monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    cfg = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny-cpu.yaml")
    assert main(["train", cfg, "train.steps=1", "parallel.sp=1", f"out_dir={tmp_path}", "logging.wandb=false",
                 "logging.tqdm=false", "logging.plot=false", "train.micro_batch=2"]) == 0
    assert len(calls) == 1
