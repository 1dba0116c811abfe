"""What the CLI and the benchmarks share to report a number: the device it came from, a sync, a plain table."""

from __future__ import annotations

import platform
from typing import Sequence

import torch


def device_description(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def synchronize(device: str) -> None:
    """Waits for queued GPU work, so that a host clock reads the work's real end."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns under a title; floats with 3 significant digits, everything else as str()."""
    cells = [list(map(str, header))] + [[f"{c:.3g}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [title, "  ".join(h.ljust(w) for h, w in zip(cells[0], widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells[1:]]
    return "\n".join(lines)
