"""The code's shape, checked: evaluation and export never import training code, and no production module reads a
test-only environment variable."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_eval_and_export_import_nothing_from_train():
    code = ("import sys, mlcd.eval.evaluate, mlcd.models.backbones, mlcd.export_hf, mlcd.models.loading; "
            "print(sorted(m for m in sys.modules if m.startswith('mlcd.train')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_no_test_environment_variables_under_mlcd():
    reads = re.compile(r"(?:environ(?:\.get)?\s*[\[(]|getenv\()\s*['\"]([A-Z0-9_]+)['\"]")
    found = {(p.relative_to(ROOT).as_posix(), name) for p in (ROOT / "mlcd").rglob("*.py")
             for name in reads.findall(p.read_text()) if "TEST" in name}
    assert not found, found


def test_each_entry_script_offers_only_its_own_config_groups():
    """`python train.py --help` once listed cluster.py's groups, and `eval_linear_probe.py model=vit_b16` was accepted
    and silently ignored: each script's hydra tree must hold only the groups it reads."""
    import ast
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    want = {"train.py": {"data", "experiment", "loss", "model", "optim"}, "cluster.py": {"experiment"},
            "eval_linear_probe.py": set()}
    for script, groups in want.items():
        tree = ast.parse((ROOT / script).read_text())
        main = next(d for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) for d in n.decorator_list
                    if isinstance(d, ast.Call) and getattr(d.func, "attr", "") == "main")
        config_path = next(k.value.value for k in main.keywords if k.arg == "config_path")
        with initialize_config_dir(str(ROOT / config_path), version_base=None):
            loader = GlobalHydra.instance().config_loader()
            got = {g for g in loader.list_groups("") if g != "hydra"}
        assert got == groups, (script, got)


def test_readme_is_short_and_every_doc_link_resolves():
    """The README starts short (what, two commands, results, layout) and points into docs/; no link dangles."""
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) <= 250
    for page in [readme, *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.relative_to(ROOT)} links to missing {target}"


def test_the_package_imports_no_runner_and_defines_each_shared_name_once():
    """mlcd/ is the library: it never imports the runners (runners/, run from a checkout), and the names the
    stages share are defined in one module each."""
    import ast

    defined = {}
    for path in sorted((ROOT / "mlcd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                assert not any(n == "runners" or n.startswith("runners.") for n in names), path
        for node in tree.body:  # module-level definitions
            targets = ([t.id for t in node.targets if isinstance(t, ast.Name)] if isinstance(node, ast.Assign) else
                       [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else [])
            for name in targets:
                defined.setdefault(name, []).append(path.relative_to(ROOT).as_posix())
    for name in ("PRECISIONS", "ROPE_THETA", "resolve_num_classes", "MANIFEST", "BACKBONE", "check_label_files", "check_labels",
                 "resolve_precision", "Checkpointer", "MetricsLog", "ShardBatches", "refuse_other_settings", "EvalTransform",
                 "resize_center_crop", "encoder_config", "build_backbone", "expand_urls", "iter_samples", "MAY_DIFFER"):
        assert len(defined.get(name, [])) == 1, (name, defined.get(name))
    for name in ("PRECISIONS", "STAGES"):  # the entry scripts take them from mlcd.validate
        assert f"\n{name} = " not in (ROOT / "cluster.py").read_text(), name


def test_the_package_reads_no_repo_files():
    """`pip install .` ships mlcd/ alone: code under it must not name the repo's configs/ or bench/results/ as a path
    (the entry scripts at the root read them and pass what they found). Docstrings and comments may mention them."""
    import ast
    path_like = re.compile(r"^(configs|bench)$|(^|/)configs/|bench/results")
    found = []
    for path in sorted((ROOT / "mlcd").rglob("*.py")):
        tree = ast.parse(path.read_text())
        docs = {id(n.body[0].value) for n in ast.walk(tree)
                if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
                and n.body and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
        found += [f"{path.relative_to(ROOT).as_posix()}:{n.lineno}: {n.value!r}" for n in ast.walk(tree)
                  if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs
                  and path_like.search(n.value)]
    assert not found, found


@pytest.mark.slow
def test_the_installed_package_imports_every_module(tmp_path):
    """`pip install .` packages mlcd alone (pyproject: mlcd*): every module must import from there, outside the
    checkout (no runners, no configs/, no repo files). The dependencies are this venv's."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(ROOT / "mlcd", src / "mlcd", ignore=shutil.ignore_patterns("__pycache__"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(site), str(src)], check=True, capture_output=True, text=True)
    modules = sorted(".".join(p.relative_to(site).with_suffix("").parts).removesuffix(".__init__")
                     for p in (site / "mlcd").rglob("*.py"))
    code = ("import importlib, sys, mlcd; assert mlcd.__file__.startswith(sys.argv[1]), mlcd.__file__\n"
            "for m in sys.argv[2:]: importlib.import_module(m)\nprint(len(sys.argv) - 2)")
    run = tmp_path / "elsewhere"
    run.mkdir()
    out = subprocess.run([sys.executable, "-c", code, str(site), *modules], cwd=run, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(site)})
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout.split()[-1]) == len(modules) > 40
