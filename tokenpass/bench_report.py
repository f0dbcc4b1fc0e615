"""Render a ``tokenpass bench`` report as one table."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

_MIB = 1024 * 1024


def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / _MIB:.1f}"


def render_bench(report: dict, console: Console) -> None:
    table = Table(
        title=f"{report['model']}: context {report['context']}, continuation {report['continuation']} "
        f"(teacher-forced), {report['device']} x{report['torch_threads']} threads"
        + (", compiled steps" if report.get("compiled") else "")
    )
    columns = ("config", "ppl", "ppl ratio", "top-1", "KL", "prefill tok/s", "decode tok/s", "speed-up",
               "ms/token", "KV MiB", "KV read MiB/step", "peak MiB", "greedy prefix")
    compiled = report.get("compiled", False)
    columns += ("compile s",) if compiled else ()
    for col in columns:
        table.add_column(col, justify="left" if col == "config" else "right")
    for c in report["configs"]:
        prefix = "-" if c["greedy_common_prefix"] is None else f"{c['greedy_common_prefix']}/{report['greedy_tokens']}"
        table.add_row(
            c["name"] + (f" ({','.join(c['passes'])})" if c["passes"] and c["name"] != ",".join(c["passes"]) else ""),
            f"{c['ppl']:.3f}", f"{c['ppl_ratio']:.3f}", f"{c['top1_agreement']:.3f}", f"{c['kl']:.4f}",
            f"{c['prefill_tokens_per_s']:.0f}", f"{c['decode_tokens_per_s']:.1f}", f"{c['decode_speedup']:.2f}x",
            f"{c['decode_latency_ms']:.1f}", f"{c['kv_bytes'] / _MIB:.1f}", _mib(c.get("kv_read_bytes_per_step")),
            f"{c['peak_memory_bytes'] / _MIB:.0f}",
            prefix,
            *([f"{c['compile_s']:.1f}"] if compiled else []),
        )
    console.print(table)
