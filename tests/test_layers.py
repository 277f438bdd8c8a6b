"""The README's data-flow diagram, checked against the imports: files -> weights -> models -> pipeline
-> images -> CLI / app, one way. What this proves: models never import file-handling or pipeline code,
the engine never imports the front ends or the app, and the app uses the public API only."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mlx_crepulse"


def imports(path: Path) -> set:
    """The mlx_crepulse modules a file imports (relative imports resolved), e.g. {"weights", "models.flux"}."""
    tree = ast.parse(path.read_text())
    here = path.relative_to(PACKAGE).parent.parts if path.is_relative_to(PACKAGE) else ()
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(here[:len(here) - node.level + 1])
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [".".join(base + [a.name]) for a in node.names]
                out.update(n for n in names if n)
            elif node.module and node.module.startswith("mlx_crepulse"):
                out.add(node.module.removeprefix("mlx_crepulse").lstrip(".") or "")
        elif isinstance(node, ast.Import):
            out.update(a.name.removeprefix("mlx_crepulse").lstrip(".") for a in node.names
                       if a.name.startswith("mlx_crepulse"))
    return out


def test_models_are_pure():
    """models/ imports only models/: no weights, files, pipeline or settings."""
    for path in (PACKAGE / "models").glob("*.py"):
        bad = {m for m in imports(path) if not m.startswith("models")}
        assert not bad, (path.name, bad)


def test_engine_never_imports_front_ends():
    """Nothing below the CLI imports it, and nothing in the package imports the app."""
    for path in PACKAGE.rglob("*.py"):
        if path.name.startswith("cli") or path.name == "__main__.py":
            continue
        bad = {m for m in imports(path) if m.startswith("cli")}
        assert not bad, (path.name, bad)
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        app = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) and "desktop" in
               ([a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""])]
        assert not app, path.name


def test_app_uses_the_public_api():
    """desktop/ imports `mlx_crepulse` itself and its metadata (the PNG format) only, and only names
    the package exports."""
    import mlx_crepulse

    for path in (ROOT / "desktop").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mlx_crepulse"):
                assert node.module in ("mlx_crepulse", "mlx_crepulse.metadata"), (path.name, node.module)
                if node.module == "mlx_crepulse":
                    for a in node.names:
                        assert a.name in mlx_crepulse.__all__ or a.name in ("metadata", "hub"), (path.name, a.name)
