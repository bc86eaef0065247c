"""Whether the Hugging Face Hub can be asked at all, answered in a fraction of a second: without a network every Hub
request spends minutes in retries before it fails. `hf-kd check` and the loaders of hf_kd ask here first."""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.parse
import urllib.request

from hf_kd.errors import SetupError


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


@functools.cache
def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connection to the Hub (HF_ENDPOINT, through the HTTPS proxy if one is set) within ``timeout`` seconds,
    name lookup included. Without it every Hub request would spend minutes in retries before failing."""
    endpoint = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    target = endpoint
    proxy = urllib.request.getproxies().get(endpoint.scheme)
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname or ""):
        target = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    address = (target.hostname or "", target.port or (443 if target.scheme == "https" else 80))
    done: list[bool] = []

    def connect():
        try:
            socket.create_connection(address, timeout=timeout).close()
            done.append(True)
        except Exception:  # noqa: BLE001 - OSError, or a host name the resolver refuses: no Hub either way
            done.append(False)

    worker = threading.Thread(target=connect, daemon=True)  # a thread: a DNS lookup ignores the socket timeout
    worker.start()
    worker.join(timeout)
    return bool(done and done[0])


def no_hub_reason() -> str | None:
    """Why the Hub cannot be asked (HF_HUB_OFFLINE, or no network), or None."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        host = urllib.parse.urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname
        return f"{host} is unreachable (no network? HF_HUB_OFFLINE=1 skips this 2-second test)"
    return None


def require_fetchable(name: str, field: str) -> None:
    """Raise a :class:`SetupError` naming ``field`` at once when ``name`` is neither a local directory nor in the
    local Hugging Face cache and the Hub cannot be reached (instead of a minute of retries)."""
    if os.path.isdir(os.path.expanduser(name)):
        return
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return  # cached: from_pretrained reads it without the network
    except Exception:  # noqa: BLE001 - not a repo id huggingface_hub accepts: from_pretrained says what is wrong
        return
    reason = no_hub_reason()
    if reason:
        raise SetupError(
            field, f"cannot load {name!r}: not a local directory, not in the local Hugging Face cache, and {reason}"
        )
