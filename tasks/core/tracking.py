"""Experiment tracking: W&B online when it can be, offline (with a one-line notice) when not.

- No API key (``WANDB_API_KEY`` or a ``~/.netrc`` entry for api.wandb.ai) -> offline.
- A key but no route to the W&B server (checked with a 3-second TCP connect) -> offline, so a
  run on a cluster node without internet never hangs at start-up.
- ``WANDB_MODE`` set by the user always wins.
- The run id is kept in the run directory (``wandb_id.txt``), so a resumed or re-queued run
  continues the same W&B run (``resume="allow"``).
"""

from __future__ import annotations

import netrc
import os
import secrets
import socket
import string
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

WANDB_ID_FILE = "wandb_id.txt"


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or ""
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def _reachable(timeout: float = 3.0) -> bool:
    url = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "api.wandb.ai", port), timeout=timeout):
            return True
    except OSError:
        return False


def wandb_mode() -> tuple[str, str | None]:
    """``(mode, notice)``: the W&B mode to use and, when it falls back to offline, why."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"], None
    if not _has_api_key():
        return "offline", ("W&B: no API key (WANDB_API_KEY or `wandb login`), logging offline; "
                           "upload later with `wandb sync <run dir>/wandb/offline-run-*`")
    if not _reachable():
        return "offline", ("W&B: the server is not reachable from this machine, logging "
                           "offline; upload later with `wandb sync <run dir>/wandb/offline-run-*`")
    return "online", None


def wandb_run_id(output_dir: str | os.PathLike) -> str:
    """The W&B run id of this run directory (created once, then reused on every resume)."""
    path = Path(output_dir) / WANDB_ID_FILE
    if path.is_file():
        return path.read_text().strip()
    alphabet = string.ascii_lowercase + string.digits  # W&B's own id alphabet
    run_id = "".join(secrets.choice(alphabet) for _ in range(8))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n")
    return run_id


def prepare_wandb_kwargs(node: dict[str, Any], output_dir: str | os.PathLike) -> dict[str, Any]:
    """Fill in ``id``/``resume``/``offline`` of a ``WandbLogger`` config node."""
    mode, notice = wandb_mode()
    if notice:
        print(notice, flush=True)
    node = dict(node)
    node["offline"] = mode == "offline"
    if mode == "disabled":
        os.environ["WANDB_MODE"] = "disabled"
    node.setdefault("id", None)
    if node["id"] is None:
        node["id"] = wandb_run_id(output_dir)
    node.setdefault("resume", "allow")
    return node


def finish_wandb() -> None:
    """Close the W&B run, whatever happened to the training run."""
    import sys

    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish(exit_code=1 if sys.exc_info()[0] is not None else 0)
        except Exception as e:  # closing must never mask the run's own error
            print(f"W&B: finishing the run failed ({type(e).__name__}: {e})", flush=True)
