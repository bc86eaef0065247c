"""What `hf-kd check` reports (:class:`Report`), and whether the Hub can be reached at all (a machine without a
network answers in a fraction of a second instead of retrying for a minute)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from hf_kd.models.hub import hub_offline, hub_reachable, no_hub_reason  # noqa: F401 (hub_reachable: tests)


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
