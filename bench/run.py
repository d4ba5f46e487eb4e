"""``make bench`` (``dev.py bench``) lands here: create ``.venv-bench`` if it is missing, (re)install
into it whenever ``pyproject.toml`` or ``bench/requirements.txt`` changed, then run
``bench/run_all.py`` in it with the same arguments.

The bench-only packages (sagaz, dbos, pyinstrument, psutil) stay out of the shared ``.venv``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-bench"
PY = VENV / "bin" / "python"


STAMP = VENV / ".installed-from"


def wanted() -> str:
    """What the environment is installed from: the project's and the bench's requirements."""
    digest = hashlib.sha256()
    for path in (ROOT / "pyproject.toml", ROOT / "bench" / "requirements.txt"):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    if not PY.exists():
        print("bench: creating .venv-bench (first run takes a few minutes)", file=sys.stderr)
        if subprocess.run([sys.executable, "-m", "venv", str(VENV)]).returncode != 0:  # noqa: S603
            sys.exit("bench: could not create .venv-bench")
    want = wanted()
    if not STAMP.exists() or STAMP.read_text().strip() != want:
        print("bench: installing the bench's packages into .venv-bench", file=sys.stderr)
        cmd = [str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[test]",
               "-r", str(ROOT / "bench" / "requirements.txt")]
        if subprocess.run(cmd, env=env).returncode != 0:  # noqa: S603
            sys.exit(f"bench: {' '.join(cmd)} failed")
        STAMP.write_text(want + "\n")
    script = ROOT / "bench" / "run_all.py"
    os.execv(PY, [str(PY), str(script), *sys.argv[1:]])  # noqa: S606


if __name__ == "__main__":
    main()
