"""``make bench`` (``dev.py bench``) lands here: create ``.venv-bench`` if it is missing, then
run ``bench/run_all.py`` in it with the same arguments.

The bench-only packages (sagaz, dbos, pyinstrument, psutil) stay out of the shared ``.venv``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-bench"
PY = VENV / "bin" / "python"


def main() -> None:
    if not PY.exists():
        print("bench: creating .venv-bench (first run takes a few minutes)", file=sys.stderr)
        env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        for cmd in ([sys.executable, "-m", "venv", str(VENV)],
                    [str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]",
                     "-r", str(ROOT / "bench" / "requirements.txt")]):
            if subprocess.run(cmd, env=env).returncode != 0:  # noqa: S603
                sys.exit(f"bench: {' '.join(cmd)} failed")
    script = ROOT / "bench" / "run_all.py"
    os.execv(PY, [str(PY), str(script), *sys.argv[1:]])  # noqa: S606


if __name__ == "__main__":
    main()
