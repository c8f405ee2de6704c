"""Logging set-up: plain text or one JSON object per line.

Extras such as ``action`` and ``job_id`` are kept in both formats.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import warnings
from typing import TextIO

import pydicom

_STD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update({k: v for k, v in vars(record).items() if k not in _STD})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = {k: v for k, v in vars(record).items() if k not in _STD}
        if extras:
            line += " " + " ".join(f"{k}={v}" for k, v in extras.items())
        return line


def keep_values_out_of_logs() -> None:
    """pydicom reports an invalid value it reads by logging and warning it verbatim, so a birth date in an
    old format (``1950.03.07``) would reach the log. The node checks the values it uses itself and names
    only the attribute; pydicom's own check is turned off."""
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE


_QUOTED = re.compile(r"(\"[^\"]*\"|'[^']*')")


def redact_quoted(text: str) -> str:
    """``text`` with every quoted string replaced by ``"..."``: libraries quote the values they warn about."""
    return _QUOTED.sub('"..."', text)


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """Python warnings go to the log, in its format, with quoted values removed: highdicom, for one, quotes
    a patient's or physician's name it finds odd ('The string "SMITH JOHN" is unlikely to represent ...'),
    and such a line went to stderr verbatim."""
    logging.getLogger("py.warnings").warning(
        "%s: %s (%s:%s)", category.__name__, redact_quoted(str(message)), filename.rsplit("/", 1)[-1], lineno,
        extra={"action": "library_warning"})


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    keep_values_out_of_logs()
    warnings.showwarning = _log_warning
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("pynetdicom", "apscheduler", "uvicorn.access", "PIL", "alembic", "highdicom", "matplotlib"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
