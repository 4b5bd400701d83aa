"""Static checks of the package: the layer contract, safe loading, no asserts, lint."""

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pyro_vae"

# Layer of each module (see DESIGN.md): a module may import only from strictly lower layers, or from its own
# subpackage. errors and config are the foundation.
LAYERS = {
    # 0: foundations, no pyro_vae imports beyond each other's rows above them
    "errors": 0,
    "config": 0,
    "stats": 0,
    "data": 0,
    "_compat": 0,
    "_memory": 0,
    "progress": 0,
    # 1: the plug-in registries
    "networks": 1,
    "likelihoods": 1,
    "guides": 1,
    "priors": 1,
    "protocol": 1,
    # 2: Pyro programs
    "model": 2,
    "importance": 2,
    "autoguide": 2,
    # 3: inference and files
    "objectives": 3,
    "evaluation": 3,
    "linear_gaussian": 3,
    "schedules": 3,
    "gaps": 3,
    "checkpoint": 3,
    "optim": 3,
    "distributed": 3,
    # 4: the compiled step composes objectives and optim; the models with labels compose model and evaluation
    "compile": 4,
    "labelled": 4,
    # 5: the step and the run directory
    "step": 5,
    "run_dir": 5,
    # 6-7: the loop and what happens around it
    "callbacks": 6,
    "train": 7,
    # 8-9: side-by-side runs and figures
    "compare_report": 8,
    "compare_checks": 8,
    "plotting": 8,
    "compare": 9,
    "cli": 10,
    "__main__": 11,
}


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        top = rel.parts[0].removesuffix(".py")
        yield path, top


def imported_pyro_vae_modules(path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("pyro_vae."):
            yield node.module.split(".")[1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("pyro_vae."):
                    yield alias.name.split(".")[1]


@pytest.mark.parametrize(("path", "top"), list(modules()), ids=lambda v: str(v).split("pyro_vae/")[-1])
def test_imports_point_down(path, top):
    if top == "__init__":
        return
    assert top in LAYERS, f"{top} has no layer; add it to LAYERS and DESIGN.md"
    for target in imported_pyro_vae_modules(path):
        if target == top:
            continue
        both_foundation = LAYERS[top] == 0 and target in ("errors", "config")
        assert LAYERS[target] < LAYERS[top] or both_foundation, f"{top} (layer {LAYERS[top]}) imports {target}"


def test_package_init_does_not_import_plotting_or_cli_or_torch():
    code = (
        "import sys, pyro_vae; "
        "print(sorted(m for m in ('torch', 'pyro_vae.plotting', 'pyro_vae.cli') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_public_api_resolves():
    import pyro_vae

    assert sorted(pyro_vae.__all__) == sorted(pyro_vae._EXPORTS)
    for name in pyro_vae.__all__:
        assert getattr(pyro_vae, name) is not None


def test_every_torch_load_is_weights_only():
    for path, _ in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "load":
                if getattr(node.func.value, "id", None) == "torch":
                    kw = {k.arg: k.value for k in node.keywords}
                    assert "weights_only" in kw and kw["weights_only"].value is True, f"{path}:{node.lineno}"


def test_no_assert_in_product_code():
    for path, _ in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            assert not isinstance(node, ast.Assert), f"assert in {path}:{node.lineno}; raise a named error instead"


def test_ruff_is_clean():
    venv_ruff = Path(sys.executable).with_name("ruff")
    ruff = str(venv_ruff) if venv_ruff.exists() else shutil.which("ruff")
    if ruff is None:
        pytest.fail("ruff is not installed; pip install -e '.[test]'")
    root = PACKAGE.parent
    proc = subprocess.run(
        [ruff, "check", "pyro_vae", "tests", "scripts", "benchmarks"], cwd=root, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    proc = subprocess.run(
        [ruff, "format", "--check", "pyro_vae", "tests", "scripts", "benchmarks"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
