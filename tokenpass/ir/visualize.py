"""Graph views for analysis and pictures: the fx dataflow as ``networkx`` and the layer structure as
DOT, SVG or PNG.

The layer picture shows what a reader needs to see of a rewritten decoder: the layer chain in layer
order, each layer's attention op (box colour) and cache, and any data edge a pass added from one layer's
attention to another's (an operand of an attention node produced by a different attention node), drawn
as an arc beside the chain. The structure is a ``MultiDiGraph`` because such an edge often joins the
same two layers as a chain edge (a selection layer feeding the next layer), and must not replace it.
SVG and PNG are drawn from one layout (``layout``), so the two pictures agree.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from html import escape

import networkx as nx
from torch import fx

from tokenpass.errors import TokenpassError
from tokenpass.ir.ops import RUNTIME_CACHE
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


def layer_structure(graph: fx.Graph, sites: GraphSites) -> nx.MultiDiGraph:
    """Nodes: inputs, each decoder layer, final norm, LM head; edges: the chain (key ``"chain"``) plus
    cross-layer edges (key ``"cross:<node>"``). ``g.graph["order"]`` is the chain, top to bottom."""
    g = nx.MultiDiGraph()
    g.add_node("inputs", label="input_ids / attention_mask / past KV", kind="io")
    order = ["inputs"]
    by_layer = sites.attention_by_layer()
    for layer in sites.layers:
        site = by_layer.get(layer.index)
        detail, op = "", ""
        if site is not None:
            cache = ("runtime cache" if site.key_cache.past == RUNTIME_CACHE else
                     "cache in/out" if site.key_cache.past else "no cache")
            window = f", window {site.window}" if site.window else ""
            detail = f"{site.op} {site.num_heads}q/{site.num_kv_heads}kv x {site.head_dim}, {cache}{window}"
            op = site.op
        name = f"layer{layer.index}"
        g.add_node(name, label=f"{layer.module} ({layer.module_type})", detail=detail, kind="layer", op=op)
        order.append(name)
    if sites.lm_head is not None:
        if sites.lm_head.norm_module:
            g.add_node("norm", label=f"{sites.lm_head.norm_module} ({sites.lm_head.norm_kind})", kind="norm")
            order.append("norm")
        g.add_node("lm_head", label=f"LM head ({sites.lm_head.node})", kind="head")
        order.append("lm_head")
    for src, dst in zip(order, order[1:]):
        g.add_edge(src, dst, key="chain", kind="chain")
    for src, dst, via in cross_layer_edges(graph, sites):
        g.add_edge(f"layer{src}", f"layer{dst}", key=f"cross:{via}", kind="cross_layer", label=via)
    g.graph["order"] = order
    return g


def chain_order(g: nx.MultiDiGraph) -> list[str]:
    """The chain from ``inputs`` along chain edges only (cross-layer edges never reorder it)."""
    order, node = [], "inputs"
    while node is not None:
        order.append(node)
        node = next((dst for _, dst, key in g.out_edges(node, keys=True) if key == "chain"), None)
    return order + [n for n in g.nodes if n not in order]


# Box fills: inputs/norm/head in grey, layers by attention op in order of first appearance.
_NEUTRAL = "#f2f2f2"
_OP_FILLS = ("#e3e8fb", "#fde3bf", "#d6f0d2", "#f6d5e8", "#d9f1f4", "#ece0f8")
_CROSS = "#1f4fd1"


def op_fills(g: nx.MultiDiGraph) -> dict[str, str]:
    """A fill colour per attention op, so the layers a pass rewrote stand out."""
    fills: dict[str, str] = {}
    for name in chain_order(g):
        op = g.nodes[name].get("op")
        if op and op not in fills:
            fills[op] = _OP_FILLS[len(fills) % len(_OP_FILLS)]
    return fills


def to_dot(g: nx.MultiDiGraph, title: str) -> str:
    """Graphviz source: the chain top to bottom, cross-layer edges dashed and labelled with their node."""
    fills = op_fills(g)
    lines = [f'digraph "{title}" {{',
             "  rankdir=TB; node [shape=box, style=filled, fontname=Helvetica, fontsize=10];"]
    for name in chain_order(g):
        data = g.nodes[name]
        label = data.get("label", name) + (f"\\n{data['detail']}" if data.get("detail") else "")
        fill = fills.get(data.get("op", ""), _NEUTRAL)
        lines.append(f'  "{name}" [label="{label}", fillcolor="{fill}"];')
    for src, dst, data in g.edges(data=True):
        if data.get("kind") == "cross_layer":
            lines.append(f'  "{src}" -> "{dst}" [style=dashed, color="{_CROSS}", label="{data.get("label", "")}", '
                         "constraint=false];")
        else:
            lines.append(f'  "{src}" -> "{dst}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Box:
    name: str
    x: float
    y: float
    w: float
    h: float
    label: str
    detail: str
    fill: str


@dataclass(frozen=True)
class Arrow:
    """``points``: two for a straight line, four for a cubic Bezier curve; the head is at the last one."""

    kind: str
    points: tuple[tuple[float, float], ...]
    label: str = ""


@dataclass
class Layout:
    title: str
    width: float
    height: float
    boxes: list[Box] = field(default_factory=list)
    arrows: list[Arrow] = field(default_factory=list)
    legend: list[tuple[str, str]] = field(default_factory=list)  # (fill colour or "cross", text)


BOX_W, BOX_H, GAP, LEFT, TOP = 460, 34, 16, 20, 40
LEGEND_ROW = 16


def layout(g: nx.MultiDiGraph, title: str) -> Layout:
    """Boxes in chain order top to bottom, chain arrows between them, cross-layer edges as arcs on the
    right (the farther apart the layers, the wider the arc), and a legend of fills and edge kinds."""
    fills = op_fills(g)
    cross = [(s, d, data) for s, d, data in g.edges(data=True) if data.get("kind") == "cross_layer"]
    legend = [(fill, op) for op, fill in fills.items()]
    if cross:
        legend.append(("cross", "operand read from another layer's attention"))
    top = TOP + LEGEND_ROW * len(legend) + (8 if legend else 0)
    order = chain_order(g)
    y = {name: top + i * (BOX_H + GAP) for i, name in enumerate(order)}
    boxes = [Box(name, LEFT, y[name], BOX_W, BOX_H, g.nodes[name].get("label", name), g.nodes[name].get("detail", ""),
                 fills.get(g.nodes[name].get("op", ""), _NEUTRAL)) for name in order]
    arrows = [Arrow("chain", ((LEFT + 40, y[src] + BOX_H), (LEFT + 40, y[dst])))
              for src, dst in zip(order, order[1:]) if g.has_edge(src, dst, key="chain")]
    x0, widest = LEFT + BOX_W, 0.0
    for src, dst, data in cross:
        y0, y1 = y[src] + BOX_H / 2, y[dst] + BOX_H / 2
        bulge = x0 + 36 + abs(y1 - y0) / 5
        widest = max(widest, bulge - x0)
        arrows.append(Arrow("cross_layer", ((x0, y0), (bulge, y0), (bulge, y1), (x0, y1)), data.get("label", "")))
    width = max(LEFT + BOX_W + widest + 30, LEFT + BOX_W + 40)
    return Layout(title, width, top + len(order) * (BOX_H + GAP) + 10, boxes, arrows, legend)


def _label_y(box: Box) -> float:
    """The label's baseline: upper line when a detail line follows, else centred."""
    return 14 if box.detail else box.h / 2 + 4


def to_svg(g: nx.MultiDiGraph, title: str) -> str:
    """A self-contained SVG of ``layout``."""
    pic = layout(g, title)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{pic.width:.0f}" height="{pic.height:.0f}" '
        'font-family="Helvetica, Arial, sans-serif" font-size="11">',
        '<defs>',
        '<marker id="chain-head" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
        '<path d="M0,0 L8,4 L0,8 z" fill="#446"/></marker>',
        f'<marker id="cross-head" markerWidth="8" markerHeight="8" refX="7" refY="4" orient="auto">'
        f'<path d="M0,0 L8,4 L0,8 z" fill="{_CROSS}"/></marker>',
        '</defs>',
        '<rect width="100%" height="100%" fill="white"/>',
        f'<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{escape(pic.title)}</text>',
    ]
    for i, (fill, text) in enumerate(pic.legend):
        ly = TOP + i * LEGEND_ROW
        if fill == "cross":
            parts.append(f'<line x1="{LEFT}" y1="{ly - 4}" x2="{LEFT + 22}" y2="{ly - 4}" stroke="{_CROSS}" '
                         'stroke-dasharray="4,3" marker-end="url(#cross-head)"/>')
        else:
            parts.append(f'<rect x="{LEFT}" y="{ly - 10}" width="22" height="11" fill="{fill}" stroke="#446"/>')
        parts.append(f'<text x="{LEFT + 30}" y="{ly}">{escape(text)}</text>')
    for box in pic.boxes:
        parts.append(f'<g id="{escape(box.name)}"><rect x="{box.x}" y="{box.y}" width="{box.w}" height="{box.h}" '
                     f'rx="4" fill="{box.fill}" stroke="#446"/>')
        parts.append(f'<text x="{box.x + 8}" y="{box.y + _label_y(box)}">{escape(box.label)}</text>')
        if box.detail:
            parts.append(f'<text x="{box.x + 8}" y="{box.y + 27}" fill="#444">{escape(box.detail)}</text>')
        parts.append("</g>")
    for arrow in pic.arrows:
        if arrow.kind == "chain":
            (xa, ya), (xb, yb) = arrow.points
            parts.append(f'<line x1="{xa}" y1="{ya}" x2="{xb}" y2="{yb - 1}" stroke="#446" '
                         'marker-end="url(#chain-head)"/>')
        else:
            (xa, ya), (c1x, c1y), (c2x, c2y), (xb, yb) = arrow.points
            parts.append(f'<path d="M{xa},{ya} C{c1x},{c1y} {c2x},{c2y} {xb + 1},{yb}" fill="none" stroke="{_CROSS}" '
                         f'stroke-dasharray="4,3" marker-end="url(#cross-head)"><title>{escape(arrow.label)}</title>'
                         "</path>")
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def to_png(g: nx.MultiDiGraph, title: str, scale: float = 2.0) -> bytes:
    """The SVG's layout rasterised with Pillow (an optional dependency: ``pip install 'tokenpass[pictures]'``)."""
    try:
        from PIL import Image, ImageDraw, ImageFont
    except ImportError:
        raise TokenpassError("--format png needs Pillow: pip install 'tokenpass[pictures]' (or use --format svg)") from None
    pic = layout(g, title)
    image = Image.new("RGB", (round(pic.width * scale), round(pic.height * scale)), "white")
    draw = ImageDraw.Draw(image)
    font, bold = ImageFont.load_default(size=11 * scale), ImageFont.load_default(size=14 * scale)

    def at(x: float, y: float) -> tuple[float, float]:
        return x * scale, y * scale

    def text(x: float, y: float, value: str, fill: str = "black", face=font) -> None:
        draw.text(at(x, y), value, fill=fill, font=face, anchor="ls")  # SVG's baseline-left anchor

    text(LEFT, 22, pic.title, face=bold)
    for i, (fill, label) in enumerate(pic.legend):
        ly = TOP + i * LEGEND_ROW
        if fill == "cross":
            _dashed(draw, [at(LEFT, ly - 4), at(LEFT + 22, ly - 4)], _CROSS, scale)
            _head(draw, at(LEFT + 14, ly - 4), at(LEFT + 22, ly - 4), _CROSS, scale)
        else:
            draw.rectangle([at(LEFT, ly - 10), at(LEFT + 22, ly + 1)], fill=fill, outline="#446")
        text(LEFT + 30, ly, label)
    for box in pic.boxes:
        draw.rounded_rectangle([at(box.x, box.y), at(box.x + box.w, box.y + box.h)], radius=4 * scale,
                               fill=box.fill, outline="#446", width=max(1, round(scale / 2)))
        text(box.x + 8, box.y + _label_y(box), box.label)
        if box.detail:
            text(box.x + 8, box.y + 27, box.detail, fill="#444")
    for arrow in pic.arrows:
        if arrow.kind == "chain":
            start, end = at(*arrow.points[0]), at(*arrow.points[1])
            draw.line([start, end], fill="#446", width=max(1, round(scale / 2)))
            _head(draw, start, end, "#446", scale)
        else:
            curve = [at(*p) for p in _bezier(arrow.points)]
            _dashed(draw, curve, _CROSS, scale)
            _head(draw, curve[-2], curve[-1], _CROSS, scale)
    out = io.BytesIO()
    image.save(out, format="PNG", optimize=True)
    return out.getvalue()


def _bezier(points: tuple[tuple[float, float], ...], steps: int = 40) -> list[tuple[float, float]]:
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points
    curve = []
    for i in range(steps + 1):
        t = i / steps
        a, b, c, d = (1 - t) ** 3, 3 * (1 - t) ** 2 * t, 3 * (1 - t) * t ** 2, t ** 3
        curve.append((a * x0 + b * x1 + c * x2 + d * x3, a * y0 + b * y1 + c * y2 + d * y3))
    return curve


def _dashed(draw, points: list[tuple[float, float]], colour: str, scale: float) -> None:
    """A dashed polyline (4 on, 3 off, as the SVG's stroke-dasharray)."""
    on, off, drawing, left = 4 * scale, 3 * scale, True, 4 * scale
    for (xa, ya), (xb, yb) in zip(points, points[1:]):
        length = ((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5
        done = 0.0
        while done < length:
            step = min(left, length - done)
            t0, t1 = done / length, (done + step) / length
            if drawing:
                draw.line([(xa + (xb - xa) * t0, ya + (yb - ya) * t0), (xa + (xb - xa) * t1, ya + (yb - ya) * t1)],
                          fill=colour, width=max(1, round(scale / 2)))
            done += step
            left -= step
            if left <= 1e-9:
                drawing = not drawing
                left = on if drawing else off


def _head(draw, start: tuple[float, float], end: tuple[float, float], colour: str, scale: float) -> None:
    """A filled arrowhead at ``end`` pointing along ``start -> end``."""
    (xa, ya), (xb, yb) = start, end
    length = max(((xb - xa) ** 2 + (yb - ya) ** 2) ** 0.5, 1e-9)
    ux, uy = (xb - xa) / length, (yb - ya) / length
    size = 7 * scale
    back = (xb - ux * size, yb - uy * size)
    draw.polygon([(xb, yb), (back[0] - uy * size / 2, back[1] + ux * size / 2),
                  (back[0] + uy * size / 2, back[1] - ux * size / 2)], fill=colour)
