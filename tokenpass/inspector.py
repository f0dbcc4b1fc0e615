"""Build and render ``tokenpass inspect`` reports: what a graph holds and what each pass found and changed.

The default text view answers what a user asks first: which attention sites the graph has, layer by
layer, and what each pass changed in each layer (layers that ended up alike share a row, with a count).
Inputs and outputs with their symbolic shapes (``--io``), the op histogram (``--ops``) and the per-pass
node diff with provenance (``--diff``) are options.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torch import fx

from tokenpass.errors import TokenpassError
from tokenpass.ir.graph import CAPTURED_PROPERTIES, TokenGraph
from tokenpass.ir.onnx_bridge import load_onnx, summarize_onnx
from tokenpass.ir.op_registry import lookup_attention
from tokenpass.ir.requests import PolicySpec
from tokenpass.ir.visualize import layer_structure, to_dot, to_png, to_svg
from tokenpass.models import SMOLLM2, TINY_FAMILIES
from tokenpass.passes import Pass, PassManager
from tokenpass.progress import status
from tokenpass.runtime.onnx_session import MANIFEST, OnnxManifest

MODEL_CHOICES = (SMOLLM2, *TINY_FAMILIES)
PICTURES = ("dot", "svg", "png")


def load_graph(source: str, phase: str, passes: Sequence[Pass] = ()) -> TokenGraph:
    """A ``TokenGraph`` from a model name or a saved exported program (``.pt2``); ``passes`` are checked
    against the model's shape right after the probe, before the export."""
    from tokenpass.api import capture
    from tokenpass.models import load

    if source in MODEL_CHOICES:
        with status(f"loading {source}"):
            model = load(source)
        return capture(model, phases=(phase,), name=source, passes=passes)[phase]
    if is_saved_program(source):
        if not Path(source).is_file():
            raise TokenpassError(f"{source}: no such file")
        with status(f"loading {source}"):
            return TokenGraph.load(source)
    raise TokenpassError(f"unknown model '{source}': give one of {', '.join(MODEL_CHOICES)}, a .pt2 or an .onnx file")


def is_saved_program(source: str) -> bool:
    return Path(source).suffix == ".pt2" or (source not in MODEL_CHOICES and Path(source).is_file())


def check_source(source: str) -> None:
    """Refuse an unknown model name or a missing file before anything is loaded."""
    if Path(source).suffix == ".onnx" or source in MODEL_CHOICES:
        return
    if not is_saved_program(source):
        raise TokenpassError(
            f"unknown model '{source}': give one of {', '.join(MODEL_CHOICES)}, a .pt2 or an .onnx file")


def plan_passes(source: str, passes: Sequence[str], lower: bool = True) -> tuple[list[Pass], PassManager]:
    """The passes ``inspect`` runs, built and order-checked before any work.

    With ``lower`` (the default) a model runs what ``optimize(passes=...)`` runs: the attention
    canonicalised and lowered onto the runtime cache, the listed passes, then the clean-up; a listed pass
    the pipeline already holds is not run twice. Without it, or for a saved program, exactly the list
    runs. No passes listed: the graph as captured.
    """
    from tokenpass.api import CLEAN_UP, LOWER_FIRST, pipeline, user_passes

    requested = user_passes(list(passes))
    if requested and lower and source in MODEL_CHOICES:
        automatic = {*LOWER_FIRST, *CLEAN_UP}
        manager = PassManager(pipeline([p for p in requested if p.name not in automatic], lower=True))
    else:
        manager = PassManager(requested)
    manager.check_order(set(CAPTURED_PROPERTIES))
    return requested, manager


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
        "branches": branches(graph),
        **graph.signature(),
    }


def branches(graph: TokenGraph) -> list[dict]:
    """Run-time control flow in the graph: each call that picks one of several subgraphs (a layer behind a
    gate), with the pass that made it, the layer, each branch's size and attention ops, and the gate."""
    modules = dict(graph.program.graph_module.named_children())
    out = []
    for node in graph.graph.nodes:
        subgraphs = [a.target for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"
                     and isinstance(modules.get(a.target), fx.GraphModule)]
        if node.op != "call_function" or not subgraphs:
            continue
        gate = node.args[0] if isinstance(node.args[0], fx.Node) else None
        made = node.meta.get("tokenpass") or {}
        out.append({
            "node": node.name, "made_by": made.get("pass"), "layer": made.get("layer"),
            "branches": {name: _branch_summary(modules[name]) for name in subgraphs},
            "gate": None if gate is None else _call_text(gate),
        })
    return out


def _call_text(node: fx.Node) -> str:
    """``op(name=value, ...)`` for a node's non-tensor arguments, named from the op's schema when it has one."""
    schema = getattr(node.target, "_schema", None)
    names = [a.name for a in schema.arguments] if schema is not None else [f"arg{i}" for i in range(len(node.args))]
    values = {**dict(zip(names, node.args)), **node.kwargs}
    shown = ", ".join(f"{k}={v}" for k, v in values.items() if not isinstance(v, fx.Node))
    return f"{getattr(node.target, '__name__', node.target)}({shown})"


def _branch_summary(module: fx.GraphModule) -> dict:
    nodes = [n for n in module.graph.nodes if n.op == "call_function"]
    attention = [str(n.target) for n in nodes if lookup_attention(n) is not None]
    return {"nodes": len(nodes), "attention": attention}


def inspect_source(
    source: str, passes: Sequence[str] = (), phase: str = "decode", lower: bool = True
) -> tuple[dict, TokenGraph | None]:
    """The report for ``source`` after running ``passes`` (see ``plan_passes``; ONNX files are described,
    not rewritten). Pass names, options and order are checked before the model is loaded."""
    if Path(source).suffix == ".onnx":
        if passes:
            raise TokenpassError("--passes applies to torch.export graphs, not to .onnx files")
        return with_export_manifest(summarize_onnx(load_onnx(source)), Path(source)), None
    check_source(source)
    requested, manager = plan_passes(source, passes, lower)
    graph = load_graph(source, phase, requested)
    results = manager.run(graph)
    report = graph_report(graph)
    report["pipeline"] = [p.name for p in manager.passes]
    report["passes"] = [r.to_dict() for r in results]
    report["runtime_requests"] = runtime_requests(graph)
    return report, graph


def runtime_requests(graph: TokenGraph) -> list[str]:
    """What the graph asks of the runtime, one line each: per-slot cache states and run-time policies."""
    states = [f"slot state {s.name} ({s.dtype or 'cache dtype'}, {s.layout}, layers {_span(s.layers)})"
              for s in graph.slot_states]
    groups = [f"output group {g} (one per layer, for the policies)" for g in graph.step_outputs]
    return states + groups + [policy_line(p) for p in graph.policies]


def policy_line(policy: PolicySpec) -> str:
    return f"policy {policy.name}(" + ", ".join(f"{k}={v}" for k, v in policy.options) + ")"


def _span(layers: Sequence[int]) -> str:
    """``0-29`` for a contiguous run of layers, else the list."""
    layers = sorted(layers)
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ", ".join(map(str, layers))


def picture(graph: TokenGraph, fmt: str) -> str | bytes:
    """The layer picture as DOT or SVG text, or PNG bytes."""
    structure = layer_structure(graph.graph, graph.sites())
    if fmt == "dot":
        return to_dot(structure, graph.label)
    return to_png(structure, graph.label) if fmt == "png" else to_svg(structure, graph.label)


def with_export_manifest(report: dict, path: Path) -> dict:
    """An ONNX file that ``tokenpass.export_onnx`` wrote: its model, step, the passes it went through and
    what each changed in this step (from the export's manifest beside it; a foreign file is described as
    it is)."""
    if not (path.parent / MANIFEST).is_file():
        return report
    manifest = OnnxManifest.read(path.parent)
    groups = [f"output group {g}_<layer> (for the policies)" for g in manifest.outputs.get(path.stem, [])]
    return {**report, "model": f"{manifest.spec['name']}/{path.stem} (tokenpass export)",
            "pipeline": manifest.passes or ["none"], "export_changes": manifest.changes.get(path.stem, {}),
            "runtime_requests": groups + [f"{policy_line(p)}, run by OnnxModel between steps"
                                          for p in manifest.policy_specs()]}


def render_text(report: dict, console: Console, io: bool = False, ops: bool = False, diff: bool = False) -> None:
    """Summary, attention by layer with what each pass changed there, and the passes; ``io``, ``ops`` and
    ``diff`` add the inputs/outputs with shapes, the op histogram and each pass's node diff."""
    console.print(
        f"[bold]{escape(report.get('model', 'onnx model'))}[/bold]  format={report['format']}  "
        f"parameters={report['parameters']:,}  layers={report['num_layers']}", highlight=False
    )
    if report.get("lm_head"):
        head = report["lm_head"]
        console.print(f"LM head: {head['node']} (weight {head['weight']}), final norm: {head['norm_module']} "
                      f"({head['norm_kind']})", highlight=False)
    if report.get("pipeline"):
        console.print(f"passes run: {', '.join(report['pipeline'])}", highlight=False)
    for name, counts in report.get("export_changes", {}).items():
        shown = ", ".join(f"{what} {n}" for what, n in counts.items())
        console.print(f"  {name} changed: {shown or 'nodes'}", highlight=False)
    for line in report.get("runtime_requests", []):
        console.print(f"runtime: {line}", highlight=False)
    sites = report["attention_sites"]
    if sites and "layer" in sites[0]:
        console.print(layers_table(sites, report.get("passes", [])))
    else:
        console.print(f"attention sites: {len(sites)}{_by_op(sites)}", highlight=False)
    for f in report.get("functions", []):
        console.print(f"function {f['function']} (overload {f['overload']}, {f['body_nodes']} nodes): "
                      f"calls {f['calls']}", highlight=False)
    if report.get("branches"):
        console.print(branches_table(report["branches"]))
    if report.get("passes"):
        console.print(passes_table(report["passes"]))
    if diff:
        for table in diff_tables(report.get("passes", [])):
            console.print(table)
    if io:
        console.print(io_table(report))
    if ops:
        console.print(ops_table(report))
    more = [f"{flag} {what}" for flag, what, shown in (
        ("--io", "inputs/outputs with shapes", io), ("--ops", "op histogram", ops),
        ("--diff", "nodes each pass added, removed, replaced", diff or not report.get("passes"))) if not shown]
    if more:
        console.print(f"[dim]more: {'; '.join(more)}[/dim]", highlight=False)


def _by_op(sites: list[dict]) -> str:
    """`` (tokenpass.Attention: layers 0-1; tokenpass.SparseAttention: layer 3)`` for an ONNX file's own calls."""
    layers: dict[str, list[int]] = {}
    for site in sites:
        if "op" in site:
            layers.setdefault(site["op"], []).append(site["onnx_layer"])
    shown = [f"{op}: layer{'s' if len(found) > 1 else ''} {_span(found)}" for op, found in layers.items()]
    return f" ({'; '.join(shown)})" if shown else ""


def branches_table(rows: list[dict]) -> Table:
    """Layers behind run-time gates: what runs when the gate opens, what when it does not, and the gate."""
    table = Table(title=f"gated blocks ({len(rows)})", title_justify="left")
    for column in ("layer", "made by", "branches (nodes, attention)", "gate"):
        table.add_column(column)
    for row in rows:
        shown = "; ".join(f"{name}: {b['nodes']}, {len(b['attention'])}" for name, b in row["branches"].items())
        table.add_row(str(row["layer"]), str(row["made_by"]), shown, escape(str(row["gate"])))
    return table


def layer_changes(passes: list[dict]) -> dict[str, dict[int | None, str]]:
    """Per pass that changed nodes, per decoder layer (None: outside any layer), what it did there as
    ``~replaced +added -removed`` counts (zeros left out)."""
    out: dict[str, dict[int | None, str]] = {}
    for p in passes:
        counts: dict[int | None, Counter] = {}
        for kind, name in _changes(p):
            counts.setdefault(p["nodes"].get(name, {}).get("layer"), Counter())[kind] += 1
        if counts:
            key = p["name"] if p["name"] not in out else f"{p['name']} ({len(out)})"
            out[key] = {layer: " ".join(f"{kind}{c[kind]}" for kind in "~+-" if c[kind]) for layer, c in counts.items()}
    return out


def _changes(p: dict) -> list[tuple[str, str]]:
    """``(kind, node)``: ``~`` for a replaced node (named by the old node), ``+`` added, ``-`` removed."""
    new = set(p["replaced"].values())
    return ([("~", old) for old in p["replaced"]] + [("+", n) for n in p["added"] if n not in new]
            + [("-", n) for n in p["removed"] if n not in p["replaced"]])


def layers_table(sites: list[dict], passes: list[dict]) -> Table:
    """Attention sites by layer, with a column per pass whose changes differ from layer to layer (what
    it ~replaced +added -removed among the layer's nodes); a pass that did the same in every layer is
    named once below the table. Layers alike in all of it (consecutive or not) share a row, with a count."""
    changes = layer_changes(passes)
    layers = [s["layer"] for s in sites]
    uniform = {name: by_layer[layers[0]] for name, by_layer in changes.items()
               if layers and by_layer.get(layers[0]) and len({by_layer.get(i, "") for i in layers}) == 1}
    varying = {name: by_layer for name, by_layer in changes.items()
               if name not in uniform and any(by_layer.get(i) for i in layers)}
    windows = any(s.get("window") for s in sites)
    rows: dict[tuple, list[int]] = {}
    for s in sites:
        cache = "runtime" if s["key_cache"]["past"] == "<runtime cache>" else "in/out" if s["key_cache"]["past"] else "-"
        key = (s["op"], f"{s['num_heads']}/{s['num_kv_heads']} x {s['head_dim']}", f"{s['scale']:.4g}", cache,
               *([str(s.get("window") or "-")] if windows else []),
               *(by_layer.get(s["layer"], "") for by_layer in varying.values()))
        rows.setdefault(key, []).append(s["layer"])
    caption = f"in every layer: {', '.join(f'{name} {marks}' for name, marks in uniform.items())}" if uniform else None
    title = f"attention by layer ({len(sites)} sites)"
    if varying:
        title += f"; {', '.join(varying)}: nodes of the layer it ~replaced +added -removed"
    table = Table(title=title, title_justify="left", caption=caption, caption_justify="left")
    columns = ["layers", "#", "op", "heads q/kv x dim", "scale", "cache"] + (["window"] if windows else [])
    for col in columns:
        table.add_column(col, justify="right" if col == "#" else "left", no_wrap=col in ("op", "layers"))
    for name in varying:
        table.add_column(name, min_width=len(name))
    for key, group in rows.items():
        op, heads, scale, cache, *rest = key
        table.add_row(layer_ranges(group), str(len(group)), op, heads, scale, cache, *rest)
    return table


def layer_ranges(layers: list[int]) -> str:
    """``[0, 1, 2]`` -> ``0-2``, ``[2, 4, 6, 8]`` -> ``2-8 step 2``, else a comma list."""
    if len(layers) == 1:
        return str(layers[0])
    steps = {b - a for a, b in zip(layers, layers[1:])}
    if len(steps) == 1:
        (step,) = steps
        if step == 1:
            return f"{layers[0]}-{layers[-1]}"
        if len(layers) >= 3:
            return f"{layers[0]}-{layers[-1]} step {step}"
    return ", ".join(map(str, layers))


def passes_table(passes: list[dict]) -> Table:
    """Each pass: whether it changed the graph, its own counts, its node changes, and why it missed."""
    notes = {id(p): _why_not(p) for p in passes}
    table = Table(title="passes", title_justify="left")
    for col in ("pass", "result", "counts", "nodes ~ + -") + (("misses / why not",) if any(notes.values()) else ()):
        table.add_column(col)
    for p in passes:
        kinds = Counter(kind for kind, _ in _changes(p))
        result = ("changed" if p["modified"] else "no change") if p["applicable"] and not p["skipped"] else (
            "skipped" if p["skipped"] else "not applicable")
        counts = ", ".join(f"{k}={v}" for k, v in p["counts"].items()) or "-"
        marks = " ".join(f"{kind}{kinds[kind]}" for kind in "~+-" if kinds[kind]) or "-"
        table.add_row(p["name"], result, counts, marks, *([escape(notes[id(p)]) or "-"] if any(notes.values()) else []))
    return table


def _why_not(p: dict) -> str:
    why = [p["skipped"]] if p["skipped"] else [f"{m['site']}: {m['check']}: {m['reason']}" for m in p["misses"]]
    return "\n".join(why[:3] + ([f"... and {len(why) - 3} more"] if len(why) > 3 else []))


def diff_tables(passes: list[dict]) -> list[Table]:
    """One table per pass that changed nodes: each replaced, added and removed node with its op, layer,
    module and provenance, in layer order."""
    tables = []
    for p in passes:
        changes = _changes(p)
        if not changes:
            continue
        kinds = Counter(kind for kind, _ in changes)
        table = Table(title=f"{p['name']} on {p['graph']}: ~{kinds['~']} replaced, +{kinds['+']} added, "
                            f"-{kinds['-']} removed", title_justify="left")
        for col in ("", "layer", "node", "op", "module / provenance"):
            table.add_column(col)
        rows = []
        for kind, name in changes:
            info = p["nodes"].get(name, {})
            node, op, origin = name, info.get("op", "?"), info.get("module") or "-"
            if kind == "~":  # the new node carries its provenance: which pass made it from which node
                new = p["replaced"][name]
                node, op = f"{name}\n-> {new}", f"{op}\n-> {p['nodes'].get(new, {}).get('op', '?')}"
            elif kind == "+" and (info.get("made_by") or {}).get("replaces"):
                origin = f"{origin}; from {info['made_by']['replaces']}"
            layer = info.get("layer")
            rows.append((layer if layer is not None else 1 << 30, "~+-".index(kind), _natural(name), kind,
                         "-" if layer is None else str(layer), node, op, origin))
        for *_, kind, layer, node, op, origin in sorted(rows, key=lambda r: r[:3]):
            table.add_row(kind, layer, escape(node), escape(op), escape(origin))
        tables.append(table)
    return tables


def _natural(name: str) -> tuple:
    """Sort key putting ``slice_8`` before ``slice_10``."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def io_table(report: dict) -> Table:
    table = Table(title="inputs / outputs", title_justify="left")
    for col in ("kind", "name", "dtype", "shape"):
        table.add_column(col)
    for kind in ("inputs", "outputs"):
        for v in report[kind]:
            table.add_row(kind[:-1], v["name"], str(v["dtype"]), escape("[" + ", ".join(v["shape"] or []) + "]"))
    return table


def ops_table(report: dict) -> Table:
    table = Table(title="op histogram (top 15)", title_justify="left")
    table.add_column("op")
    table.add_column("count", justify="right")
    for op, count in list(report["op_histogram"].items())[:15]:
        table.add_row(op, str(count))
    return table
