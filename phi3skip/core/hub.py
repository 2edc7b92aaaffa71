"""Reaching the Hugging Face Hub: a fast offline probe, a time limit on every request, and one place that turns
huggingface_hub's errors into one-line user errors (gated, not found, bad revision, offline and not cached,
unreachable, not answering)."""
from __future__ import annotations

import logging
import os
import socket
import warnings
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


# Seconds any Hub request may wait to connect, or between bytes; huggingface_hub leaves some calls unbounded,
# so an endpoint that accepts the connection and never answers would hang a command.
HUB_TIMEOUT_S = float(os.environ.get("PHI3SKIP_HUB_TIMEOUT", "15"))
_bounded = False


def _time_limit(request) -> None:
    """httpx request hook: every phase of the request gets a finite timeout (an explicit finite one is kept)."""
    given = request.extensions.get("timeout") or {}
    request.extensions["timeout"] = {k: given.get(k) if given.get(k) is not None else HUB_TIMEOUT_S
                                     for k in ("connect", "read", "write", "pool")}


def bound_hub_requests() -> None:
    """Make huggingface_hub's HTTP client (also each one it re-creates) put a time limit on every request."""
    global _bounded
    if _bounded:
        return
    from huggingface_hub import set_client_factory
    from huggingface_hub.utils import _http  # its default client: offline mode and request ids live in its hooks

    default = _http.default_client_factory

    def factory():
        client = default()
        hooks = client.event_hooks
        client.event_hooks = {**hooks, "request": [*hooks.get("request", []), _time_limit]}
        return client

    set_client_factory(factory)
    _bounded = True


@contextmanager
def _quiet() -> Iterator[None]:
    """huggingface_hub's retry warnings off: a failure is reported once, as one line."""
    hf_log = logging.getLogger("huggingface_hub")
    level = hf_log.level
    hf_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_log.setLevel(level)


@contextmanager
def hub_errors(what: str, hint: str, error: type[UserError] = UserError,
               revision: str | None = None) -> Iterator[None]:
    """Run a huggingface_hub call; its failures become `error` with one line that names `what` and a `hint`.

    The token (an argument or HF_TOKEN) is never part of a message.
    """
    from huggingface_hub import errors as e

    bound_hub_requests()
    try:
        with _quiet():
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
        raise error(f"{what}: cannot reach the Hub ({_reason(x)}); {hint}") from None
    except Exception as x:  # httpx's timeouts and protocol errors are not OSErrors
        if type(x).__module__.split(".")[0] not in ("httpx", "httpx2", "httpcore"):
            raise
        raise error(f"{what}: the Hub did not answer ({_reason(x)}); {hint}") from None


def _reason(x: Exception) -> str:
    status = getattr(getattr(x, "response", None), "status_code", None)
    if status is not None:
        return f"HTTP {status}"
    if "Timeout" in type(x).__name__:
        return f"no answer within {HUB_TIMEOUT_S:g} s"
    return type(x).__name__
