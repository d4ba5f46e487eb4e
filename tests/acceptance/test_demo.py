"""``lakesaga demo`` as a user runs it: a real subprocess on the full 145,231-record dataset."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from lakesaga_procs import clean_env, lakesaga_bin

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def _run_demo(tmp_path: Path, name: str, *extra: str) -> tuple[int, str]:
    result = subprocess.run(
        [lakesaga_bin(), "demo", "--workdir", str(tmp_path / name), *extra],
        env=clean_env(COLUMNS="200"), cwd=tmp_path, capture_output=True, text=True,
        encoding="utf-8", timeout=150,
    )
    output = result.stdout + result.stderr
    (tmp_path / f"{name}.log").write_text(output)
    return result.returncode, output


def _lake_check(output: str) -> dict[str, int]:
    match = re.search(r"Lake check \(count\(\*\) of partition 2026-01-06\): "
                      r"bronze ([\d,]+), silver ([\d,]+), gold ([\d,]+)", output)
    assert match, f"no Lake check line in:\n{output}"
    return {layer: int(match.group(i + 1).replace(",", ""))
            for i, layer in enumerate(("bronze", "silver", "gold"))}


def test_demo__full_run_prints_the_seed_report(tmp_path: Path) -> None:
    returncode, output = _run_demo(tmp_path, "demo")
    assert returncode == 0, output
    for expected in (
        "145,231 records from 25 files",
        "Duplicates removed: 5,234",
        "Nulls filled: 2,145",
        "Invalid records removed: 876",
        "139,121 records (95.8% retained)",
        "1,234 aggregated records",
        "Notified 3 downstream consumers",
    ):
        assert expected in output, f"missing {expected!r} in:\n{output}"
    registered = [line for line in output.splitlines() if "Registered:" in line]
    assert len(registered) == 3, output
    for table in ("bronze.raw_clickstream", "silver.cleaned_clickstream"):
        assert any(f"{table}/partition_date=2026-01-06" in line for line in registered), registered
    assert "(3 webhooks delivered)" in output, output
    assert _lake_check(output) == {"bronze": 145_231, "silver": 139_121, "gold": 1_234}
    assert "Saga succeeded" in output, output


def test_demo__fail_at_gold_compensates_every_layer(tmp_path: Path) -> None:
    returncode, output = _run_demo(tmp_path, "demo2", "--fail-at", "aggregate_to_gold")
    assert returncode == 0, output
    for expected in (
        "aggregate_to_gold FAILS",
        "139,121 records removed",
        "145,231 records removed",
        "saga compensated",
        "Notifications sent: 0",
    ):
        assert expected in output, f"missing {expected!r} in:\n{output}"
    # Silver is rolled back before bronze (reverse order of the forward steps).
    assert output.index("139,121 records removed") < output.index("145,231 records removed")
    assert _lake_check(output) == {"bronze": 0, "silver": 0, "gold": 0}
