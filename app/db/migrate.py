"""Programmatic ``alembic upgrade head``, serialized across processes on PostgreSQL with an
advisory lock so several workers starting at once do not race the migration."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import text

from app.db.session import make_engine, normalize_url

_LOCK_ID = 0x6C616B65  # "lake"


def alembic_config(url: str) -> Config:
    here = Path(__file__).resolve().parents[2]
    for base in (here, Path.cwd()):
        if (base / "alembic.ini").exists() and (base / "migrations").is_dir():
            config = Config(str(base / "alembic.ini"))
            config.set_main_option("script_location", str(base / "migrations"))
            config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
            return config
    raise FileNotFoundError("alembic.ini and migrations/ not found beside the app or in the cwd")


def upgrade(url: str, revision: str = "head") -> None:
    config = alembic_config(url)
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_lock(:id)"), {"id": _LOCK_ID})
                conn.commit()
            try:
                config.attributes["connection"] = conn
                command.upgrade(config, revision)
                conn.commit()
            finally:
                if conn.dialect.name == "postgresql":
                    conn.execute(text("SELECT pg_advisory_unlock(:id)"), {"id": _LOCK_ID})
                    conn.commit()
    finally:
        engine.dispose()
