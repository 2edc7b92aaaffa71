"""The package's house: packages by concern, each importing only from those below it, and no import cycle among
modules. Every import counts, late (in-function) ones included, read from the code itself."""
import ast
from collections import defaultdict
from pathlib import Path

import phi3skip

ROOT = Path(phi3skip.__file__).parent
# Bottom to top: a module may import from its own package and from those before it.
LAYERS = ["core", "model", "formats", "data", "train", "serve", "eval", "commands"]


def modules() -> dict[str, Path]:
    out = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The package's modules that `name` imports, anywhere in its code."""
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                parts = parts[: len(parts) - node.level + (1 if is_pkg else 0)]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and t != "phi3skip":
                found.add(t)
    return found


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and parts[1] in LAYERS) else None


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_lives_in_a_layer():
    loose = [m for m in graph() if m != "phi3skip" and layer(m) not in LAYERS]
    assert not loose, f"modules outside the layers {LAYERS}: {loose}"


def test_imports_point_down_only():
    upward = [f"{m} -> {t}" for m, ts in graph().items() for t in ts
              if layer(m) in LAYERS and layer(t) in LAYERS and LAYERS.index(layer(t)) > LAYERS.index(layer(m))]
    assert not upward, "imports that point up a layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycle():
    g = graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for t in sorted(g.get(m, ())):
            if state[t] == 1:
                return path[path.index(t):] + [t]
            if state[t] == 0 and (c := visit(t)):
                return c
        path.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if state[m] == 0 and (cycle := visit(m)):
            raise AssertionError("import cycle: " + " -> ".join(cycle))


def test_the_check_sees_a_cycle(tmp_path, monkeypatch):
    """The checks above read real imports: a late import that points up is found."""
    (tmp_path / "phi3skip" / "core").mkdir(parents=True)
    (tmp_path / "phi3skip" / "__init__.py").write_text("")
    (tmp_path / "phi3skip" / "core" / "__init__.py").write_text("")
    (tmp_path / "phi3skip" / "core" / "a.py").write_text("def f():\n    from ..serve import b\n")
    (tmp_path / "phi3skip" / "serve").mkdir()
    (tmp_path / "phi3skip" / "serve" / "__init__.py").write_text("")
    (tmp_path / "phi3skip" / "serve" / "b.py").write_text("from ..core.a import f\n")
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path / "phi3skip")
    try:
        test_imports_point_down_only()
    except AssertionError as e:
        assert "phi3skip.core.a -> phi3skip.serve.b" in str(e)
    else:
        raise AssertionError("an upward late import went unseen")
    try:
        test_no_import_cycle()
    except AssertionError as e:
        assert "phi3skip.core.a" in str(e) and "phi3skip.serve.b" in str(e)
    else:
        raise AssertionError("a cycle went unseen")


def test_the_public_names_still_import():
    """What users import from the top (phi3skip.__all__) resolves after the move into packages, each to the module
    that defines it, and the top package itself imports no torch until a name is used."""
    import subprocess
    import sys

    for name in phi3skip.__all__:
        obj = getattr(phi3skip, name)
        assert obj is not None and getattr(obj, "__module__", "phi3skip").startswith("phi3skip."), name
    code = "import sys, phi3skip, phi3skip.data.corpus; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
