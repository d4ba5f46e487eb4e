"""What reaches a log: the logging setup of every lakesaga process and of uvicorn.

No secret may be logged. Two libraries would log one by default: uvicorn's access log writes
each request's query string (an API key sent as ``?api_key=``), and httpx logs every request's
full URL at INFO (a consumer URL may carry a capability token in its path or query). The
access log therefore gets the path only, and the HTTP client libraries log warnings only.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

#: Loggers of the HTTP client stack the webhook dispatcher uses; their INFO and DEBUG lines
#: carry request URLs.
HTTP_CLIENT_LOGGERS = ("httpx", "httpcore")
#: What stands for a query string in an access log line.
REDACTED_QUERY = "?[redacted]"


def configure_logging(level: str) -> None:
    """The logging of a lakesaga process (``serve``, ``worker`` and the other commands)."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    quiet_http_clients()


def quiet_http_clients() -> None:
    """Keep httpx/httpcore at WARNING, whatever the root level: their INFO and DEBUG lines
    name the full URL of each webhook delivery."""
    for name in HTTP_CLIENT_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def redact_target(target: str) -> str:
    """A request target as it may be logged: its path, and a mark where a query string was."""
    path, query_mark, _ = target.partition("?")
    return path + REDACTED_QUERY if query_mark else path


class RedactQueryString(logging.Filter):
    """Rewrites uvicorn's access log records, whose arguments are ``(client, method, path with
    query string, HTTP version, status)``, so that no query string is ever formatted."""

    # dictConfig adds a new instance to the logger each time a server is configured (it never
    # removes filters); equal instances make ``Logger.addFilter`` keep only the first.
    def __eq__(self, other: object) -> bool:
        return isinstance(other, RedactQueryString)

    def __hash__(self) -> int:
        return hash(RedactQueryString)

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            record.args = (*args[:2], redact_target(args[2]), *args[3:])
        return True


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging configuration with the access log's query strings redacted: pass it
    as ``log_config`` wherever a uvicorn server runs the app."""
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config.setdefault("filters", {})["redact_query_string"] = {"()": RedactQueryString}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_query_string"]
    return config
