"""Package-level promises: the engine is independent of BackPACK; re-exports work."""

import subprocess
import sys


def test_engine_does_not_import_backpack():
    code = (
        "import sys, tnbackpack.tn, tnbackpack.tn.functional;"
        "print(any(m == 'backpack' or m.startswith('backpack.') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"


def test_backpack_reexports():
    import backpack as backpack_package

    import tnbackpack

    assert tnbackpack.extend is backpack_package.extend
    assert tnbackpack.backpack is backpack_package.backpack
