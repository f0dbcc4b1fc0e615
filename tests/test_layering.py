"""The plug-in boundary holds: import-linter's layer contracts, and core files that name no method."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# The files the boundary promises never to name a method in: a method plugs in through the op
# registry, declared slot states and policies, so these stay the same when a method is added.
CORE = ["tokenpass/runtime/generate.py", "tokenpass/runtime/model.py", "tokenpass/runtime/executor.py",
        "tokenpass/runtime/session.py", "tokenpass/runtime/kv_cache.py", "tokenpass/runtime/ops.py",
        "tokenpass/bench.py", "tokenpass/ir/sites.py", "tokenpass/ir/graph.py", "tokenpass/api.py",
        "tokenpass/ir/onnx_slots.py", "tokenpass/ir/onnx_translations.py", "tokenpass/passes/explicit_cache.py",
        "tokenpass/runtime/genai_config.py", "tokenpass/runtime/onnx_session.py", "tokenpass/onnx_export.py",
        "tokenpass/onnx_optimize.py", "tokenpass/passes/onnx_rewrites.py", "tokenpass/runtime/onnx_check.py",
        "tokenpass/ir/onnx_outline.py",
        *(f"tokenpass/ir/foreign/{name}.py" for name in ("sites", "canonicalize", "interface", "load", "trace"))]
METHOD_WORDS = re.compile(r"tidal|\bselection_attention\b|\bsparse_attention\b|keyformer|tokenselect|h2o|streamingllm|"
                          r"skipdecode|correction", re.IGNORECASE)


def test_import_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if exe is None:
        pytest.fail("lint-imports is not installed: pip install -e '.[test]'")
    run = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert "0 broken" in run.stdout


@pytest.mark.parametrize("path", CORE)
def test_core_file_names_no_method(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate((ROOT / path).read_text().splitlines(), 1)
            if METHOD_WORDS.search(line)]
    assert not hits, f"{path} names a method:\n" + "\n".join(hits)
