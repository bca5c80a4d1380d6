"""The benchmark report: a header that says where and how the figures were taken, markdown
sections, and PNG plots (matplotlib, Agg backend, so no display is needed)."""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import shlex
import sys

import torch

ISA_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "neon",
             "asimd", "sve")


def cpu_info() -> dict:
    """CPU model, the ISA flags that matter to the kernels, and the core count (/proc/cpuinfo,
    falling back to :mod:`platform` where it is missing)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                key = key.strip()
                if key in ("model name", "Model") and model in ("", platform.machine(),
                                                                platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags],
            "cores": os.cpu_count() or 1, "threads": torch.get_num_threads()}


def gpu_info() -> str:
    if torch.cuda.is_available():
        return ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
    return "none"


def versions() -> dict:
    import fastarch

    out = {"python": platform.python_version(), "torch": torch.__version__,
           "fastarch": getattr(fastarch, "__version__", "?")}
    try:
        import triton

        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = "not installed"
    return out


def load_average() -> tuple[float, float, float] | None:
    try:
        return os.getloadavg()
    except OSError:
        return None


def header(command: str, title: str = "fastarch benchmark report",
           load_start: tuple[float, float, float] | None = None) -> list[str]:
    """Markdown header lines: machine, versions, date, load (at ``load_start`` and now) and the
    exact command."""
    cpu, ver = cpu_info(), versions()
    isa = ", ".join(cpu["isa"]) or "none of " + "/".join(ISA_FLAGS[:2])
    if "avx512f" not in cpu["isa"] and platform.machine() in ("x86_64", "AMD64"):
        isa += " (no AVX-512)"
    end = load_average()
    loads = [x for x in (load_start, end) if x is not None]
    fmt = lambda la: "unknown" if la is None else "/".join(f"{x:.2f}" for x in la)  # noqa: E731
    if not loads:
        load = "load unknown"
    else:
        busy = max(x[0] for x in loads) > cpu["cores"]
        load = (f"load average (1/5/15 min) at start {fmt(load_start)}, at end {fmt(end)}: "
                + ("**the machine was shared** (load above its core count): absolute times are "
                   "inflated and can swing, ratios are same-run" if busy else
                   "the machine was not overloaded"))
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"# {title}", "",
        f"- Machine: {cpu['model']}, {cpu['cores']} cores ({cpu['threads']} torch threads); "
        f"ISA: {isa}; GPU: {gpu_info()}",
        f"- Versions: torch {ver['torch']}, triton {ver['triton']}, fastarch {ver['fastarch']}, "
        f"Python {ver['python']}",
        f"- Date: {now}; {load}",
        f"- Command: `{command}`",
        "",
        "Every ratio compares candidates measured in the same process, in interleaved rounds "
        "(each candidate called in turn, median per candidate), so that a change of load hits "
        "all alike.", "",
    ]


def command_line(argv: list[str] | None) -> str:
    args = sys.argv[1:] if argv is None else argv
    return " ".join(["fastarch", *map(shlex.quote, args)])


def table(head: list[str], rows: list[list]) -> list[str]:
    """A markdown table."""
    def row(cells):
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return [row(head), row(["---"] * len(head))] + [row(r) for r in rows]


@dataclasses.dataclass
class Section:
    """One part of the report: markdown lines and the PNG files it refers to."""

    name: str
    lines: list[str]
    plots: list[str] = dataclasses.field(default_factory=list)


def line_plot(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
              title: str, logx: bool = False, logy: bool = False,
              hline: float | None = None, marker_only: bool = False, logx_base: int = 2) -> str:
    """Write a PNG with one line (or marker set) per series ``{label: (xs, ys)}``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    for label, (xs, ys) in series.items():
        style = "k--" if label.startswith("limit") else ("o" if marker_only else "o-")
        ax.plot(xs, ys, style, label=label, markersize=4)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log", base=logx_base)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if series:
        ax.legend(fontsize=7)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write(out_dir: str, command: str, sections: list[Section],
          filename: str = "REPORT.md", load_start=None) -> str:
    """Write the header and every section to ``out_dir/filename``; returns its path."""
    os.makedirs(out_dir, exist_ok=True)
    lines = header(command, load_start=load_start)
    for s in sections:
        lines += s.lines + ([""] if s.plots else [])
        lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({os.path.basename(p)})"
                  for p in s.plots]
        lines.append("")
    path = os.path.join(out_dir, filename)
    with open(path, "w") as f:
        f.write("\n".join(lines).rstrip() + "\n")
    return path


def bar_plot(path: str, groups: list[str], bars: dict[str, list[float | None]], ylabel: str,
             title: str, hline: float | None = None) -> str:
    """Write a PNG of grouped bars: one group per entry of ``groups``, one bar per series."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    width = 0.8 / max(1, len(bars))
    for j, (label, values) in enumerate(bars.items()):
        xs = [i + j * width for i, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], width, label=label)
    ax.set_xticks([i + width * (len(bars) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle="--", linewidth=1)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    if bars:
        ax.legend(fontsize=7)
    return _save(fig, path)
