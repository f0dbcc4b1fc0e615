"""Graph views for analysis and pictures: the fx dataflow as ``networkx`` and the layer structure as DOT/SVG.

The layer picture shows what a reader needs to see of a rewritten decoder: the layer chain, each
layer's attention op and cache, and any data edge a pass added from one layer's attention to another's
(an operand of an attention node produced by a different attention node).
"""

from __future__ import annotations

from html import escape

import networkx as nx
from torch import fx

from tokenpass.ir.sites import GraphSites


def dataflow(graph: fx.Graph) -> nx.DiGraph:
    """Every fx node as a networkx node (with op and target), an edge per use."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for inp in node.all_input_nodes:
            g.add_edge(inp.name, node.name)
    return g


def cross_layer_edges(graph: fx.Graph, sites: GraphSites) -> list[tuple[int, int, str]]:
    """``(from_layer, to_layer, via_node)`` for attention operands produced by another layer's attention."""
    layer_of = {s.node: s.layer for s in sites.attention}
    nodes = {n.name: n for n in graph.nodes}
    edges = []
    for site in sites.attention:
        for operand in nodes[site.node].all_input_nodes:
            source = operand
            while source.name not in layer_of and source.op == "call_function" and len(source.all_input_nodes) == 1:
                source = source.all_input_nodes[0]  # through getitem / views
            if source.name in layer_of and layer_of[source.name] != site.layer:
                edges.append((layer_of[source.name], site.layer, operand.name))
    return edges


def layer_structure(graph: fx.Graph, sites: GraphSites) -> nx.DiGraph:
    """Nodes: inputs, each decoder layer, final norm, LM head; edges: the chain plus cross-layer edges."""
    g = nx.DiGraph()
    g.add_node("inputs", label="input_ids / attention_mask / past KV", kind="io")
    prev = "inputs"
    by_layer = sites.attention_by_layer()
    for layer in sites.layers:
        site = by_layer.get(layer.index)
        detail = ""
        if site is not None:
            cache = "cache in/out" if site.key_cache.past else "no cache"
            detail = f"{site.op} {site.num_heads}q/{site.num_kv_heads}kv x {site.head_dim}, {cache}"
        name = f"layer{layer.index}"
        g.add_node(name, label=f"{layer.module} ({layer.module_type})", detail=detail, kind="layer")
        g.add_edge(prev, name, kind="chain")
        prev = name
    if sites.lm_head is not None:
        if sites.lm_head.norm_module:
            g.add_node("norm", label=f"{sites.lm_head.norm_module} ({sites.lm_head.norm_kind})", kind="norm")
            g.add_edge(prev, "norm", kind="chain")
            prev = "norm"
        g.add_node("lm_head", label=f"LM head ({sites.lm_head.node})", kind="head")
        g.add_edge(prev, "lm_head", kind="chain")
    for src, dst, via in cross_layer_edges(graph, sites):
        g.add_edge(f"layer{src}", f"layer{dst}", kind="cross_layer", label=via)
    return g


def to_dot(g: nx.DiGraph, title: str) -> str:
    lines = [f'digraph "{title}" {{', "  rankdir=TB; node [shape=box, fontname=Helvetica, fontsize=10];"]
    for name, data in g.nodes(data=True):
        label = data.get("label", name) + (f"\\n{data['detail']}" if data.get("detail") else "")
        lines.append(f'  "{name}" [label="{label}"];')
    for src, dst, data in g.edges(data=True):
        style = ' [style=dashed, color=blue, label="%s", constraint=false]' % data.get("label", "")
        lines.append(f'  "{src}" -> "{dst}"' + (style if data.get("kind") == "cross_layer" else "") + ";")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_svg(g: nx.DiGraph, title: str) -> str:
    """A self-contained SVG: the chain top to bottom, cross-layer edges as arcs on the right."""
    chain = [n for n in nx.topological_sort(nx.DiGraph((u, v) for u, v, d in g.edges(data=True) if d["kind"] == "chain"))]
    chain += [n for n in g.nodes if n not in chain]
    box_w, box_h, gap, left, top = 460, 34, 14, 20, 40
    y = {name: top + i * (box_h + gap) for i, name in enumerate(chain)}
    height = top + len(chain) * (box_h + gap) + 20
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{box_w + 160}" height="{height}" font-family="Helvetica" '
        'font-size="11">',
        f'<text x="{left}" y="22" font-size="14" font-weight="bold">{escape(title)}</text>',
    ]
    for name in chain:
        data = g.nodes[name]
        parts.append(f'<rect x="{left}" y="{y[name]}" width="{box_w}" height="{box_h}" rx="4" fill="#eef" stroke="#446"/>')
        parts.append(f'<text x="{left + 8}" y="{y[name] + 14}">{escape(data.get("label", name))}</text>')
        if data.get("detail"):
            parts.append(f'<text x="{left + 8}" y="{y[name] + 27}" fill="#555">{escape(data["detail"])}</text>')
    for src, dst, data in g.edges(data=True):
        x0, y0, y1 = left + box_w, y[src] + box_h / 2, y[dst] + box_h / 2
        if data["kind"] == "chain":
            parts.append(f'<line x1="{left + 40}" y1="{y[src] + box_h}" x2="{left + 40}" y2="{y[dst]}" stroke="#446"/>')
        else:
            bulge = x0 + 30 + (y1 - y0) / 6
            parts.append(f'<path d="M{x0},{y0} C{bulge},{y0} {bulge},{y1} {x0},{y1}" fill="none" stroke="blue" '
                         'stroke-dasharray="4,3"/>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
