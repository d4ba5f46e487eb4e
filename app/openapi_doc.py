"""openapi.yaml is generated from the app; a test fails when the committed file differs."""

from __future__ import annotations

import yaml
from fastapi import FastAPI


def render_openapi(app: FastAPI) -> str:
    return yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True, width=100)
