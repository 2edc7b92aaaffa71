"""Reaching the Hugging Face Hub: a fast offline probe, and one place that turns huggingface_hub's errors into
one-line user errors (gated, not found, bad revision, offline and not cached, unreachable)."""
from __future__ import annotations

import os
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

from .cli import UserError


def is_hub_id(src: str) -> bool:
    """`org/name`, with no path that exists locally."""
    parts = str(src).split("/")
    return len(parts) == 2 and all(parts) and not str(src).startswith((".", "~")) and not Path(src).exists()


def hub_offline() -> bool:
    """True when the Hub cannot be used: HF_HUB_OFFLINE is set, or its host does not answer within 3 s.

    huggingface_hub retries an unreachable host for ~25 s before failing; probing first fails fast.
    Behind a proxy the probe is skipped and huggingface_hub decides.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return True
    if any(os.environ.get(k) for k in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return False
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=3).close()
        return False
    except OSError:
        return True


@contextmanager
def hub_errors(what: str, hint: str, error: type[UserError] = UserError,
               revision: str | None = None) -> Iterator[None]:
    """Run a huggingface_hub call; its failures become `error` with one line that names `what` and a `hint`.

    The token (an argument or HF_TOKEN) is never part of a message.
    """
    from huggingface_hub import errors as e

    try:
        yield
    except e.GatedRepoError:  # before RepositoryNotFoundError: it is a subclass
        raise error(f"{what} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except e.RepositoryNotFoundError:
        raise error(f"{what}: not found on the Hub (a private or gated repo needs HF_TOKEN); {hint}") from None
    except e.RevisionNotFoundError:
        raise error(f"{what}: revision {revision!r} not found on the Hub") from None
    except (e.LocalEntryNotFoundError, e.OfflineModeIsEnabled):  # before EntryNotFoundError: a subclass
        raise error(f"{what}: the Hub is unreachable and it is not in the local Hugging Face cache; "
                    f"{hint}") from None
    except e.EntryNotFoundError:
        raise error(f"{what}: no such file in the repo; {hint}") from None
    except (e.HfHubHTTPError, OSError) as x:
        raise error(f"{what}: cannot reach the Hub ({type(x).__name__}); {hint}") from None
