"""Build and render ``tokenpass inspect`` reports: what a graph holds and what each pass found and changed."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tokenpass.errors import TokenpassError
from tokenpass.ir.graph import TokenGraph
from tokenpass.ir.onnx_bridge import load_onnx, summarize_onnx
from tokenpass.ir.visualize import layer_structure, to_dot, to_svg
from tokenpass.models import SMOLLM2, TINY_FAMILIES
from tokenpass.passes import PassManager
from tokenpass.progress import status

MODEL_CHOICES = (SMOLLM2, *TINY_FAMILIES)


def load_graph(source: str, phase: str) -> TokenGraph:
    """A ``TokenGraph`` from a model name or a saved exported program (``.pt2``)."""
    from tokenpass.api import capture
    from tokenpass.models import load

    if source in MODEL_CHOICES:
        with status(f"loading {source}"):
            model = load(source)
        return capture(model, phases=(phase,), name=source)[phase]
    if Path(source).suffix == ".pt2" or Path(source).is_file():
        if not Path(source).is_file():
            raise TokenpassError(f"{source}: no such file")
        with status(f"loading {source}"):
            return TokenGraph.load(source)
    raise TokenpassError(f"unknown model '{source}': give one of {', '.join(MODEL_CHOICES)}, a .pt2 or an .onnx file")


def graph_report(graph: TokenGraph) -> dict:
    sites = graph.sites()
    return {
        "format": "torch.export",
        "model": graph.label,
        "phase": graph.phase,
        "parameters": graph.num_parameters(),
        "num_layers": len(sites.layers),
        "layers": [layer.__dict__ for layer in sites.layers],
        "attention_sites": [site.to_dict() for site in sites.attention],
        "lm_head": sites.to_dict()["lm_head"],
        "loss": sites.loss,
        "op_histogram": dict(graph.op_histogram().most_common()),
        **graph.signature(),
    }


def inspect_source(source: str, passes: Sequence[str] = (), phase: str = "decode") -> tuple[dict, TokenGraph | None]:
    """The report for ``source`` after running ``passes`` (ONNX files are described, not rewritten)."""
    if Path(source).suffix == ".onnx":
        if passes:
            raise TokenpassError("--passes applies to torch.export graphs, not to .onnx files")
        return summarize_onnx(load_onnx(source)), None
    manager = PassManager(passes)
    graph = load_graph(source, phase)
    results = manager.run(graph)
    report = graph_report(graph)
    report["passes"] = [r.to_dict() for r in results]
    return report, graph


def picture(graph: TokenGraph, fmt: str) -> str:
    structure = layer_structure(graph.graph, graph.sites())
    return to_dot(structure, graph.label) if fmt == "dot" else to_svg(structure, graph.label)


def render_text(report: dict, console: Console) -> None:
    """Rich tables: summary, attention sites, passes, I/O and the most common ops."""
    console.print(
        f"[bold]{report.get('model', 'onnx model')}[/bold]  format={report['format']}  "
        f"parameters={report['parameters']:,}  layers={report['num_layers']}"
    )
    if report.get("lm_head"):
        head = report["lm_head"]
        console.print(f"LM head: {head['node']} (weight {head['weight']}), final norm: {head['norm_module']} ({head['norm_kind']})")
    sites = report["attention_sites"]
    if sites and "layer" in sites[0]:
        table = Table(title=f"attention sites ({len(sites)})")
        for col in ("layer", "node", "op", "heads q/kv", "head dim", "scale", "mask", "cache read -> update"):
            table.add_column(col)
        for s in sites:
            cache = f"{s['key_cache']['past']} -> {s['key_cache']['present']}" if s["key_cache"]["past"] else "-"
            table.add_row(str(s["layer"]), s["node"], s["op"], f"{s['num_heads']}/{s['num_kv_heads']}",
                          str(s["head_dim"]), f"{s['scale']:.4g}", s["mask"] or "-", cache)
        console.print(table)
    else:
        console.print(f"attention sites: {len(sites)}")
    _render_passes(report.get("passes", []), console)
    io = Table(title="inputs / outputs")
    for col in ("kind", "name", "dtype", "shape"):
        io.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in report[kind]:
            io.add_row(kind[:-1], v["name"], str(v["dtype"]), escape("[" + ", ".join(v["shape"] or []) + "]"))
    console.print(io)
    ops = Table(title="op histogram (top 15)")
    ops.add_column("op")
    ops.add_column("count", justify="right")
    for op, count in list(report["op_histogram"].items())[:15]:
        ops.add_row(op, str(count))
    console.print(ops)


def _render_passes(passes: list[dict], console: Console) -> None:
    if not passes:
        return
    table = Table(title="passes")
    for col in ("pass", "modified", "counts", "added", "removed", "replaced", "misses"):
        table.add_column(col)
    for p in passes:
        counts = ", ".join(f"{k}={v}" for k, v in p["counts"].items()) or (p["skipped"] or "-")
        misses = escape("\n".join(f"{m['site']}: {m['check']}: {m['reason']}" for m in p["misses"])) or "-"
        table.add_row(p["name"], str(p["modified"]), counts, str(len(p["added"])), str(len(p["removed"])),
                      str(len(p["replaced"])), misses)
    console.print(table)
