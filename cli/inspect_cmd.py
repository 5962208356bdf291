"""``bmrs-compress inspect MODEL``: the traced graph and its coupled groups."""

from __future__ import annotations

import io
import json

import click

from bmrs_surgery.errors import BmrsError

from ._common import (
    fail,
    input_option,
    input_shape_option,
    inputs_file_option,
    load_network_inputs,
    markup_safe,
    printable,
    tracer_option,
)

FORMATS = ("text", "json", "dot", "graphml")


@click.command()
@click.argument("model")
@input_shape_option
@input_option
@inputs_file_option
@tracer_option
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True)
@click.option("--output", "-o", type=click.Path(dir_okay=False, writable=True), help="Write to FILE instead of stdout.")
@click.option("--ignore", multiple=True, metavar="LAYER", help="Layer whose outputs are never pruned (repeatable).")
@click.option("--arch", help="Architecture of a state-dict MODEL (bundled name or torchvision:NAME).")
@click.option("--trust-model", is_flag=True, help="Allow unpickling a whole nn.Module (runs code from the file).")
def inspect(model, input_shape, inputs, inputs_file, tracer, fmt, output, ignore, arch, trust_model):
    """Trace MODEL and show its dependency graph and coupled groups (id, kind, structures,
    channels, member layers, where the gates go)."""
    try:
        import torch

        from bmrs_surgery.graph.export_trace import analyse_model
        from bmrs_surgery.inputs import first, make_inputs

        net, shape, specs, example = load_network_inputs(model, input_shape, inputs, inputs_file, arch, trust_model)
        if specs:
            example = first(example) if example is not None else make_inputs(specs, net, batch=1)
        else:
            example = torch.zeros(shape)
        analysis = analyse_model(net, example, tuple(ignore), tracer)
        text = render(analysis, model, shape, fmt)
        if output:
            from bmrs_surgery.outputs import atomic_write

            try:
                atomic_write(output, lambda f: f.write(text.encode()))
            except OSError as exc:
                raise BmrsError(f"--output {output}: cannot write ({exc.strerror or exc})") from None
        else:
            click.echo(text, nl=not text.endswith("\n"))
    except BmrsError as exc:
        fail(exc)


def document(analysis, model: str, shape) -> dict:
    return {
        "model": model,
        "input_shape": list(shape),
        "nodes": analysis.gm.graph.nodes.__len__(),
        "tracer": getattr(analysis, "tracer", "fx"),
        "groups": analysis.summary(),
        "structures": sum(g.size for g in analysis.groups),
        "opaque": [{"node": n, "why": why} for n, why in analysis.propagation.opaque],
        "untraceable_modules": analysis.opaque_modules,
        "seconds": analysis.timings,
    }


def render(analysis, model: str, shape, fmt: str) -> str:
    if fmt == "json":
        return json.dumps(document(analysis, model, shape), indent=2) + "\n"
    if fmt == "dot":
        return to_dot(analysis)
    if fmt == "graphml":
        return to_graphml(analysis)
    return to_text(analysis, model, shape)


def to_text(analysis, model: str, shape) -> str:
    """The groups as a table. Every name (the MODEL spec, layers, operations) goes through
    :func:`markup_safe`: markup or escape sequences in a name are shown, never interpreted."""
    from rich.console import Console
    from rich.table import Table

    doc = document(analysis, model, shape)
    table = Table(title=f"{markup_safe(model)}: {len(doc['groups'])} coupled groups, "
                        f"{doc['structures']} prunable structures")
    for col in ("id", "kind", "structures", "channels", "members", "gates at"):
        table.add_column(col, justify="right" if col in ("id", "structures", "channels") else "left")
    for g in doc["groups"]:
        members = markup_safe(", ".join(f"{m['name']}[{m['role']}]" for m in g["members"]))
        table.add_row(str(g["id"]), markup_safe(g["kind"]), str(g["structures"]), str(g["channels"]), members,
                      markup_safe(", ".join(g["gates"])))
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=False, highlight=False)
    console.print(table)
    console.print(f"graph: {doc['nodes']} nodes ({doc['tracer']}); input {tuple(shape)}")
    if doc["opaque"]:
        console.print(f"channels kept by {len(doc['opaque'])} operations, e.g. "
                      + "; ".join(f"{markup_safe(o['node'])} ({markup_safe(o['why'])})" for o in doc["opaque"][:3]))
    if doc["untraceable_modules"]:
        console.print("traced as opaque leaves: " + ", ".join(markup_safe(m) for m in doc["untraceable_modules"]))
    return buf.getvalue()


def _node_groups(analysis) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for g in analysis.groups:
        for t in g.taps:
            out.setdefault(t.node, []).append(g.id)
    return out


def _dot(text) -> str:
    """Text inside a double-quoted DOT string: quotes and backslashes escaped, no raw control characters."""
    return printable(text).replace("\\", "\\\\").replace('"', '\\"')


def to_dot(analysis) -> str:
    graph = analysis.graph
    lines = ["digraph model {", "  rankdir=TB;", '  node [shape=box, fontsize=10, fontname="Helvetica"];']
    for name, data in graph.nodes(data=True):
        label = f"{_dot(name)}\\n{_dot(data['kind'])}"
        if data.get("shape"):
            label += "\\n" + "x".join(str(d) for d in data["shape"])
        if data.get("groups"):
            label += "\\ngates: " + ",".join(f"g{g}" for g in data["groups"])
        style = ', style=filled, fillcolor="#cfe8ff"' if data.get("groups") else ""
        lines.append(f'  "{_dot(name)}" [label="{label}"{style}];')
    for a, b in graph.edges():
        lines.append(f'  "{_dot(a)}" -> "{_dot(b)}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_graphml(analysis) -> str:
    import networkx as nx

    g = nx.DiGraph()
    for name, data in analysis.graph.nodes(data=True):
        clean = {k: (",".join(map(str, v)) if isinstance(v, list) else v) for k, v in data.items() if v is not None}
        g.add_node(name, **clean)
    g.add_edges_from(analysis.graph.edges())
    return "\n".join(nx.generate_graphml(g)) + "\n"
