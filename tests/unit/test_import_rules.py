"""The import rules of docs/architecture.md ("Import rules"), checked on every module's source.

Imports are read with `ast`, anywhere in a module (imports deferred into functions count: a deferred
import is still a dependency, it only hides a cycle until run time). Only imports under
`if TYPE_CHECKING:` are left out: they never run. A failure names the offending file, line and import.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {"service": "dicom_fusion.service", "inference": "dicom_fusion.inference", "fhir": "dicom_fusion.fhir"}

# service/: the area of a module (its first folder, or its file name for the top-level modules) → the
# areas of service/ it may import, plus the libraries ("fhir", "inference"). An area may always import
# itself. "*" = anything (entry points and the demo wire everything together).
SERVICE_RULES: dict[str, set[str]] = {
    "errors": set(),
    "config": {"errors"},
    "telemetry": {"config", "errors"},
    "peers": {"config", "errors", "fhir"},
    "storage": {"config", "errors"},
    "ingest": {"config", "errors", "telemetry", "storage"},
    "outputs": {"config", "errors"},
    "routing": {"config", "errors", "storage", "outputs", "inference.card"},
    "jobs": {"config", "errors", "telemetry", "peers", "storage", "outputs", "fhir", "inference"},
    # ops/api's STOW-RS route hands request bodies to ingest/stow.py (and nothing else of ingest/); ops/drift.py
    # reads the cards' drift references and computes PSI with inference/card (torch-free, like routing)
    "ops": {"config", "errors", "cliopts", "telemetry", "peers", "storage", "outputs", "routing", "jobs.queues",
            "ingest.stow", "inference.card"},
    "demo": {"*"},
    "cli": {"*"},
    "server": {"*"},
    "segcli": {"*"},
    "dbcli": {"*"},
    "routescli": {"*"},
    "reviewcli": {"*"},
    "userscli": {"*"},
    "cliopts": {"config", "errors"},
}

# inference/: a layer imports only the layers before it (and itself); synth/ only the cards.
INFERENCE_ORDER = ["errors", "card", "data", "nets", "serve", "train", "report"]
INFERENCE_EXTRA: dict[str, set[str]] = {"synth": {"errors", "card"}}


def _modules() -> Iterator[tuple[str, Path]]:
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            yield folder, path


class _Imports(ast.NodeVisitor):
    """Absolute dotted names imported by one module, with line numbers, TYPE_CHECKING blocks skipped."""

    def __init__(self, module: str, is_package: bool) -> None:
        self.module, self.is_package = module, is_package
        self.found: list[tuple[int, str]] = []

    def visit_If(self, node: ast.If) -> None:
        test = node.test
        if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
                isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"):
            for child in node.orelse:
                self.visit(child)
            return
        self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.extend((node.lineno, alias.name) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.module.split(".") if self.is_package else self.module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        # `from pkg import module` imports the module: record pkg.name for each name.
        self.found.extend((node.lineno, f"{name}.{alias.name}") for alias in node.names)


def _imports(folder: str, path: Path) -> list[tuple[int, str]]:
    rel = path.relative_to(ROOT / folder).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    visitor = _Imports(".".join([PACKAGES[folder], *parts]), path.name == "__init__.py")
    visitor.visit(ast.parse(path.read_text(), str(path)))
    return visitor.found


def _area(rel_parts: tuple[str, ...]) -> str:
    return rel_parts[0].removesuffix(".py")


def _service_target(name: str) -> str | None:
    """The area of service/ (or library) that an imported dotted name belongs to; None = not ours."""
    parts = name.split(".")
    if parts[:2] == ["dicom_fusion", "fhir"]:
        return "fhir"
    if parts[:2] == ["dicom_fusion", "inference"]:
        return "inference"
    if parts[:2] != ["dicom_fusion", "service"] or len(parts) < 3:
        return None
    if parts[2] == "jobs" and len(parts) > 3 and parts[3] == "queues":
        return "jobs.queues"
    if parts[2] == "ingest" and len(parts) > 3 and parts[3] == "stow":
        return "ingest.stow"
    return parts[2]


def _allowed(dst: str, name: str, allowed: set[str]) -> bool:
    """`inference.card` in a rule admits only the model cards of the inference package (torch-free)."""
    if dst == "inference" and "inference.card" in allowed:
        return name.split(".")[2:3] == ["card"] or name.split(".")[2:3] == ["errors"]
    return dst in allowed


def _violations() -> list[str]:
    bad: list[str] = []
    for folder, path in _modules():
        rel = path.relative_to(ROOT / folder).parts
        where = path.relative_to(ROOT)
        for line, name in _imports(folder, path):
            parts = name.split(".")
            if parts[0] != "dicom_fusion":
                continue
            target_pkg = parts[1] if len(parts) > 1 else ""
            if folder == "fhir" and target_pkg in ("service", "inference"):
                bad.append(f"{where}:{line}: imports {name} (fhir/ never imports service/ or inference/)")
            if folder == "inference":
                if target_pkg in ("service", "fhir"):
                    bad.append(f"{where}:{line}: imports {name} (inference/ never imports service/ or fhir/)")
                    continue
                if target_pkg != "inference" or len(parts) < 3:
                    continue
                src, dst = _area(rel), parts[2]
                if src == dst or src == "__init__":
                    continue
                allowed = INFERENCE_EXTRA.get(src) or (
                    set(INFERENCE_ORDER[:INFERENCE_ORDER.index(src)]) if src in INFERENCE_ORDER else set())
                if dst not in allowed and dst in {*INFERENCE_ORDER, *INFERENCE_EXTRA}:
                    bad.append(f"{where}:{line}: imports {name} (inference/{src} may import only "
                               f"{', '.join(sorted(allowed)) or 'nothing of inference/'})")
            if folder == "service":
                src = _area(rel)
                if src == "__init__":
                    continue
                if src not in SERVICE_RULES:
                    bad.append(f"{where}: area {src!r} has no import rule; add it to SERVICE_RULES and "
                               "docs/architecture.md")
                    continue
                dst = _service_target(name)
                allowed = SERVICE_RULES[src]
                if dst is None or dst == src or (dst, src) in {("jobs.queues", "jobs"), ("ingest.stow", "ingest")} \
                        or "*" in allowed:
                    continue
                if not _allowed(dst, name, allowed):
                    bad.append(f"{where}:{line}: imports {name} (service/{src} may import only "
                               f"{', '.join(sorted(allowed)) or 'nothing of the service'})")
    return bad


def test_every_module_follows_the_import_rules() -> None:
    bad = _violations()
    assert not bad, "import rules broken (docs/architecture.md, 'Import rules'):\n" + "\n".join(bad)


def test_the_checker_catches_a_forbidden_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The rules test must be able to fail: a storage module importing jobs, a deferred one included."""
    fake = tmp_path / "root"
    for folder in PACKAGES:
        (fake / folder).mkdir(parents=True)
    (fake / "service" / "storage").mkdir()
    (fake / "service" / "storage" / "bad.py").write_text(
        "def later():\n    from dicom_fusion.service.jobs import stages\n")
    (fake / "inference" / "card").mkdir()
    (fake / "inference" / "card" / "bad.py").write_text("from dicom_fusion.inference.serve.predict import X\n")
    (fake / "fhir" / "bad.py").write_text("import dicom_fusion.service.config\n")
    (fake / "service" / "ops").mkdir()  # ops may import ingest/stow.py only, not the rest of ingest/
    (fake / "service" / "ops" / "bad.py").write_text("from dicom_fusion.service.ingest.committer import GroupCommitter\n"
                                                     "from dicom_fusion.service.ingest.stow import StowIngest\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake)
    bad = _violations()
    assert any("service/storage/bad.py:2: imports dicom_fusion.service.jobs.stages" in b for b in bad), bad
    assert any("inference/card/bad.py:1" in b for b in bad), bad
    assert any("fhir/bad.py:1" in b for b in bad), bad
    assert any("service/ops/bad.py:1: imports dicom_fusion.service.ingest.committer" in b for b in bad), bad
    assert not any("service/ops/bad.py:2" in b for b in bad), bad


def test_no_import_cycle_even_through_deferred_imports() -> None:
    """Module-level graph of every import (deferred ones included); any strongly connected component of
    more than one module is a cycle."""
    mods: dict[str, Path] = {}
    folders: dict[str, str] = {}
    for folder, path in _modules():
        rel = path.relative_to(ROOT / folder).with_suffix("")
        name = ".".join([PACKAGES[folder], *[p for p in rel.parts if p != "__init__"]])
        mods[name], folders[name] = path, folder

    def resolve(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        targets = {resolve(n) for _, n in _imports(folders[name], path)}
        graph[name] = {t for t in targets if t and t != name and not name.startswith(t + ".")}

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def strongconnect(v: str) -> None:  # Tarjan
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in graph:
        if v not in index:
            strongconnect(v)
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_listener_stays_torch_free() -> None:
    """The ingest hot path (listener, committer, ledger, spool), routing and the `serve` process start without
    torch, MONAI or highdicom: the model loads in the worker, never where instances are acknowledged."""
    code = ("import sys; import dicom_fusion.service.ingest.listener, dicom_fusion.service.ingest.committer; "
            "import dicom_fusion.service.ingest.stow; "
            "import dicom_fusion.service.server, dicom_fusion.service.cli, dicom_fusion.service.routing.router; "
            "print(sorted(m for m in ('torch', 'monai', 'highdicom') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
