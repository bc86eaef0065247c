"""What a benchmark ran on, for its table header: the GPU's name, or the CPU model (and family) and the CPU count."""

from __future__ import annotations

import os
import platform


def machine(device: str = "cpu") -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            lines = f.read().splitlines()
        model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
        family = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("cpu family")), None)
        model += f" (family {family})" if family else ""
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} CPUs"
