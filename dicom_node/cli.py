"""The ``cxr-node`` command.

Each sub-command lives in the module that does the work; that module provides
``add_arguments(parser)`` and ``run(args, settings) -> int``. Only the chosen
command's module is imported, so ``cxr-node status`` does not pay for torch.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Any

from dicom_node.config import ConfigError, Peer, Settings, load_settings
from dicom_node.errors import NodeError

COMMANDS: dict[str, tuple[str, str]] = {
    "serve": ("dicom_node.service", "receive images by C-STORE, run the model, send results back"),
    "worker": ("dicom_node.service", "run only a worker on the shared queue (scale-out)"),
    "status": ("dicom_node.status", "queue counts, oldest waiting job, recent failures, model in use"),
    "predict": ("inference.predict", "run the model on DICOM/PNG/JPEG files and write a CSV"),
    "train": ("training.train", "train stage 1 (lung segmentation) and/or stage 2 (classifier)"),
    "pretrain": ("training.pretrain", "learn stage 2's starting weights from unlabelled images"),
    "evaluate": ("training.evaluate", "evaluate a model bundle and write a report folder"),
    "retrain": ("training.retrain", "fine-tune on locally labelled studies; promote only if not worse"),
    "models": ("training.registry", "list, promote and roll back model versions"),
}

# Commands that share the node options (the CLI contract: keep these stable).
NODE_COMMANDS = {"serve", "worker", "status", "retrain", "models"}
# Commands that read the node's data (``train --data node``) and so take only where to find it.
NODE_DATA_COMMANDS = {"train"}
SERVICE_COMMANDS = {"serve", "worker"}

log = logging.getLogger(__name__)


def add_node_data_arguments(p: argparse.ArgumentParser) -> None:
    """Where the node's data is: its configuration file, data folder and database."""
    p.add_argument("--config", metavar="FILE", help="TOML configuration file")
    p.add_argument("--data-dir", metavar="DIR", help="storage.data_dir")
    p.add_argument("--db-url", metavar="URL", help="database.url (SQLAlchemy URL)")


def add_node_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by the node's commands; each overrides one settings key."""
    add_node_data_arguments(p)
    p.add_argument("--ae-title", metavar="T", help="listener.ae_title")
    p.add_argument("--port", type=int, metavar="N", help="listener.port")
    p.add_argument("--model", metavar="DIR", help="model.path (model bundle directory)")
    p.add_argument("--destination", action="append", metavar="AET@HOST:PORT",
                   help="export.destinations (repeatable)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="model.device")
    p.add_argument("--admin-port", type=int, metavar="N",
                   help="admin.port for serve, admin.worker_port for worker (0 = off)")


def overrides_from_args(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Command-line flags as settings overrides (highest priority)."""
    table = {
        "ae_title": ("listener", "ae_title"),
        "port": ("listener", "port"),
        "data_dir": ("storage", "data_dir"),
        "db_url": ("database", "url"),
        "model": ("model", "path"),
        "device": ("model", "device"),
        "admin_port": ("admin", "port"),
    }
    out: dict[str, dict[str, Any]] = {}
    for attr, (section, key) in table.items():
        value = getattr(args, attr, None)
        if value is not None:
            out.setdefault(section, {})[key] = value
    if getattr(args, "command", None) == "worker" and "admin" in out and "port" in out["admin"]:
        out["admin"]["worker_port"] = out["admin"].pop("port")
    if getattr(args, "destination", None):
        out.setdefault("export", {})["destinations"] = [str(Peer.parse(d)) for d in args.destination]
    return out


def configure_logging(settings: Settings) -> None:
    from dicom_node.logs import setup_logging

    setup_logging(settings.logging.level, settings.logging.format)


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cxr-node",
        description="Chest X-ray AI DICOM node. Research use only; not for diagnostic use.")
    from dicom_node import __version__

    parser.add_argument("--version", action="version", version=f"cxr-node {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name != command:
            continue
        if name in NODE_COMMANDS:
            add_node_arguments(p)
        elif name in NODE_DATA_COMMANDS:
            add_node_data_arguments(p)
        module = importlib.import_module(module_name)
        adder = getattr(module, f"add_{name}_arguments", None) or getattr(module, "add_arguments", None)
        if adder is not None:
            adder(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    if command not in COMMANDS:
        command = None
    parser = build_parser(command)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        settings = load_settings(getattr(args, "config", None), overrides_from_args(args))
    except ConfigError as exc:
        print(f"cxr-node: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings)
    module = importlib.import_module(COMMANDS[args.command][0])
    runner = getattr(module, f"run_{args.command}", None) or module.run
    if args.command in SERVICE_COMMANDS:  # a service that stops shows why in full, in its log
        return int(runner(args, settings) or 0)
    try:
        return int(runner(args, settings) or 0)
    except (OSError, ValueError, NodeError) as exc:
        # what the user gave cannot be used (a path, a CSV, a bundle, a value): say so in one line; the
        # traceback is logged at DEBUG level (logging.level = "DEBUG" shows it)
        log.debug("cxr-node %s failed", args.command, exc_info=True)
        print(f"cxr-node {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        # SQLAlchemy is imported here, not at the top, so that a command that never opens the database does
        # not pay for it; when one of its errors was raised it is loaded already
        from sqlalchemy.exc import SQLAlchemyError

        if not isinstance(exc, SQLAlchemyError):
            raise
        # the database is down, unreachable or refuses the credentials
        from dicom_node.db import safe_url

        log.debug("cxr-node %s failed", args.command, exc_info=True)
        print(f"cxr-node {args.command}: database {safe_url(settings.db_url)} unavailable: "
              f"{type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
