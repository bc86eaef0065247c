"""What `hf-kd check` reports (:class:`Report`), and whether the Hub can be reached at all (a machine without a
network answers in a fraction of a second instead of retrying for a minute)."""

from __future__ import annotations

import functools
import os
import socket
import threading
import urllib.parse
import urllib.request
from dataclasses import dataclass, field


@dataclass
class Report:
    """Lines to print; ``failed`` makes `hf-kd check` exit 1."""

    lines: list[str] = field(default_factory=list)
    unchecked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # what each FAIL line is about: "vocab", "tokenizers", ...

    @property
    def failed(self) -> bool:
        return bool(self.problems)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def fail(self, line: str) -> None:
        self.lines.append(f"FAIL {line}")
        self.problems.append(line.split(":", 1)[0])

    def verdict(self) -> str:
        """One line, printed last."""
        unchecked = f"; {len(self.unchecked)} thing(s) not checked (listed above)" if self.unchecked else ""
        if self.problems:
            return (
                f"verdict: FAIL: hf-kd train would refuse this recipe ({', '.join(dict.fromkeys(self.problems))})"
                f"{unchecked}"
            )
        return f"verdict: ok, no problem found{unchecked}"


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


def fetch_or_reason(loader, name: str):
    """``(object, None)`` from the local cache first, then the Hub if allowed; ``(None, why)`` if unreachable."""
    try:
        return loader(name, local_files_only=True), None
    except Exception as err:  # noqa: BLE001 - any failure here means "not available locally"
        local_error = err
    if os.path.isdir(os.path.expanduser(name)):
        return None, str(local_error).strip().splitlines()[0]
    no_hub = no_hub_reason()
    if no_hub:
        return None, f"not in the local Hugging Face cache and {no_hub}"
    try:
        return loader(name), None
    except Exception as err:  # noqa: BLE001 - network down, gated repo, typo: say so, do not crash
        return None, str(err).strip().splitlines()[0][:200]
