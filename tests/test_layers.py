"""The layers of ARCHITECTURE.md, read from the source with `ast` (imports inside functions included):

- the library (`mimkit/`) imports no application (`mimkit.tokenizers`, `.pretrain`, `.finetune`, `.demo`);
- a stage imports no other application (stages meet through exports on disk); the demo may import stages;
- `mimkit/models/` (networks) never imports `mimkit.checkpoint` (files on disk).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ROOT / "mimkit"
# folder -> the package it installs as (pyproject's package-dir)
STAGES = {"tokenizers": "mimkit.tokenizers", "pretrain": "mimkit.pretrain", "finetune": "mimkit.finetune"}
DEMO = {"demo": "mimkit.demo"}
APPLICATIONS = {**STAGES, **DEMO}


def absolute_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every absolute import in the file. `from a.b import c` gives both `a.b` and
    `a.b.c`: c may be a module (`from mimkit import demo`)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
            found += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names if alias.name != "*"]
    return found


def is_within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def violations(folder: Path, forbidden: list[str]) -> list[str]:
    """'file:line imports module' for every import of `folder`'s .py files inside a forbidden package."""
    out = {}
    for path in sorted(folder.rglob("*.py")):
        for line, module in absolute_imports(path):
            if any(is_within(module, package) for package in forbidden):
                out.setdefault((str(path.relative_to(ROOT)), line), module)  # one entry per import statement
    return [f"{file}:{line} imports {module}" for (file, line), module in sorted(out.items())]


def test_the_folders_exist():  # a renamed folder would make the checks below pass vacuously
    for folder in [LIBRARY, LIBRARY / "models", *(ROOT / name for name in APPLICATIONS)]:
        assert folder.is_dir() and any(folder.rglob("*.py")), folder


def test_library_imports_no_application():
    found = violations(LIBRARY, list(APPLICATIONS.values()))
    assert not found, "the library must not import an application:\n" + "\n".join(found)


def test_stages_import_no_other_application():
    found = []
    for folder, package in STAGES.items():
        found += violations(ROOT / folder, [other for other in APPLICATIONS.values() if other != package])
    assert not found, "a stage must not import another stage or the demo (they meet through exports):\n" \
        + "\n".join(found)


def test_imports_inside_functions_and_of_submodules_are_seen(tmp_path):
    source = tmp_path / "m.py"
    source.write_text("import os\nfrom . import sibling\n\ndef late():\n    from mimkit import demo\n"
                      "    import mimkit.pretrain.trainer as t\n")
    assert absolute_imports(source) == [(1, "os"), (5, "mimkit"), (5, "mimkit.demo"), (6, "mimkit.pretrain.trainer")]


def test_models_never_import_checkpoint():
    found = violations(LIBRARY / "models", ["mimkit.checkpoint"])
    assert not found, "mimkit/models/ (networks) must not import mimkit.checkpoint (files on disk):\n" \
        + "\n".join(found)
