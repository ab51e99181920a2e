"""One check shared by the tests of the kernels' environment settings: a bad value stops the import with an error
that names the variable and the value (read once, when the module is first imported, so each check runs in a fresh
interpreter)."""

import os
import subprocess
import sys


def import_refuses(module: str, variable: str, value: str) -> bool:
    """Whether ``import module`` with ``variable=value`` fails, saying ``variable='value'``."""
    r = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                       env={**os.environ, variable: value}, timeout=120)
    return r.returncode != 0 and f"{variable}={value!r}" in r.stderr
