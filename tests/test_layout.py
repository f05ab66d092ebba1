"""The code's shape, checked: evaluation and export never import training code, and no production module reads a
test-only environment variable."""
import re
import subprocess
import sys
from pathlib import Path

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
