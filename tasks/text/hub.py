"""Errors of the text data modules, and a fast check that the Hugging Face Hub answers.

Why a check at all: with no network, ``AutoTokenizer.from_pretrained("bert-base-uncased")`` and
``load_dataset("allenai/c4", ...)`` retry with back-off for about 50 s before failing with a
generic message. :func:`require_hub` answers in well under a second (one metadata request with a
short timeout) and raises :class:`HubUnavailableError` with a message that names the local
alternative of the config key that asked for the Hub.
"""

from __future__ import annotations

import os


class DataNotFoundError(FileNotFoundError):
    """A dataset or tokenizer is missing at the configured path; the message says how to get it."""


class HubUnavailableError(DataNotFoundError):
    """The Hugging Face Hub cannot be reached (no network, or offline mode is set)."""


def hub_offline() -> bool:
    """True when the user asked for offline mode (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE`` /
    ``TRANSFORMERS_OFFLINE``), read from the environment at call time."""
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(var, "").strip().upper() in ("1", "ON", "YES", "TRUE"):
            return True
    return False


def require_hub(repo_id: str, repo_type: str, what: str, alternative: str,
                offline: bool | None = None, timeout: float = 10.0) -> None:
    """Raise :class:`HubUnavailableError` unless the Hub answers for ``repo_id``.

    Args:
        repo_id: e.g. ``"bert-base-uncased"`` or ``"allenai/c4"``.
        repo_type: ``"model"`` or ``"dataset"``.
        what: the config key and value that needs the Hub, for the message
            (e.g. ``"data.tokenizer='bert-base-uncased'"``).
        alternative: what to set instead to run without a network.
        offline: force offline (``True``) or online (``False``); ``None`` reads the environment.
        timeout: seconds for the one metadata request.

    An HTTP error status (401, 404, ...) means the Hub *is* reachable: it is not raised here, so
    that the real loader reports it with its own message.
    """
    if offline is None:
        offline = hub_offline()
    if offline:
        raise HubUnavailableError(
            f"{what} needs the Hugging Face Hub, but offline mode is set (HF_HUB_OFFLINE / "
            f"HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE) and it is not in the local cache. "
            f"Without a network: {alternative}")
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    info = huggingface_hub.dataset_info if repo_type == "dataset" else huggingface_hub.model_info
    try:
        info(repo_id, timeout=timeout)
    except HfHubHTTPError:
        return  # reachable; the loader will explain the status itself
    except Exception as e:  # DNS failure, refused connection, timeout, proxy error, ...
        raise HubUnavailableError(
            f"{what} needs the Hugging Face Hub ({repo_type} {repo_id!r}), which cannot be "
            f"reached ({type(e).__name__}: {e}). Without a network: {alternative}") from e
