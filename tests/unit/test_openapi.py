"""The committed openapi.yaml is the app's document, and every operation is documented."""

from __future__ import annotations

import difflib
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.main import create_app
from app.openapi_doc import render_openapi

OPENAPI_YAML = Path(__file__).resolve().parents[2] / "openapi.yaml"
PROBLEM_JSON = "application/problem+json"
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
#: Operations that cannot fail with a problem (liveness answers or the process is down).
NO_PROBLEM_RESPONSES = {("get", "/healthz")}


@pytest.fixture(scope="module")
def rendered() -> str:
    return render_openapi(create_app(run_workers=False))


@pytest.fixture(scope="module")
def spec(rendered: str) -> dict[str, Any]:
    return yaml.safe_load(rendered)


def operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(method, path, op) for path, item in spec["paths"].items()
            for method, op in item.items() if method in HTTP_METHODS]


def test_openapi_yaml__matches_the_app(rendered: str) -> None:
    assert OPENAPI_YAML.exists(), "openapi.yaml is missing: run `make openapi` and commit it"
    committed = OPENAPI_YAML.read_text(encoding="utf-8")
    if committed != rendered:
        diff = "".join(difflib.unified_diff(
            committed.splitlines(keepends=True), rendered.splitlines(keepends=True),
            "openapi.yaml (committed)", "openapi.yaml (generated)", n=2))
        pytest.fail(f"openapi.yaml is out of date: run `make openapi` and commit it\n{diff[:4000]}",
                    pytrace=False)


def test_openapi_yaml__is_valid_yaml_with_paths(spec: dict[str, Any]) -> None:
    assert spec["openapi"].startswith("3.")
    assert spec["info"]["title"] == "lakesaga"
    assert operations(spec)


def test_operations__have_an_operation_id(spec: dict[str, Any]) -> None:
    missing = [f"{m.upper()} {p}" for m, p, op in operations(spec) if not op.get("operationId")]
    assert missing == []


def test_operations__operation_ids_are_unique(spec: dict[str, Any]) -> None:
    counts = Counter(op.get("operationId") for _, _, op in operations(spec))
    assert [op_id for op_id, n in counts.items() if n > 1] == []


def test_operations__have_a_summary_and_description(spec: dict[str, Any]) -> None:
    missing = [f"{m.upper()} {p}" for m, p, op in operations(spec)
               if not (op.get("summary") or "").strip()
               or not (op.get("description") or "").strip()]
    assert missing == [], "add a docstring (description) to these routes"


def test_operations__document_problem_json_errors(spec: dict[str, Any]) -> None:
    # Every operation (but liveness) documents its errors as problem+json; those taking input
    # (path/query/header parameters or a body) document at least one 4xx. GET /readyz takes
    # none, so its documented problem is the 503 "database unavailable".
    missing = []
    for method, path, op in operations(spec):
        if (method, path) in NO_PROBLEM_RESPONSES:
            continue
        problems = {str(code) for code, response in op.get("responses", {}).items()
                    if str(code)[0] in "45" and PROBLEM_JSON in response.get("content", {})}
        takes_input = bool(op.get("parameters") or op.get("requestBody"))
        if not problems or (takes_input and not any(c.startswith("4") for c in problems)):
            missing.append(f"{method.upper()} {path}")
    assert missing == [], f"no (4xx) error response with {PROBLEM_JSON}"


def test_operations__error_responses_are_problems(spec: dict[str, Any]) -> None:
    # Every error, request validation included (app.api.problems), is answered as
    # problem+json with the ProblemDetail schema; FastAPI's HTTPValidationError must not leak.
    wrong = []
    for method, path, op in operations(spec):
        for code, response in op.get("responses", {}).items():
            if str(code)[0] not in "45":
                continue
            schema = response.get("content", {}).get(PROBLEM_JSON, {}).get("schema")
            if schema != {"$ref": "#/components/schemas/ProblemDetail"}:
                wrong.append(f"{method.upper()} {path} {code}")
    assert wrong == []
    assert "ProblemDetail" in spec["components"]["schemas"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
