"""The ``tokenpass`` command line. Errors tokenpass raises on purpose print as one line, exit code 2."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from tokenpass.errors import TokenpassError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


class Format(str, Enum):
    text = "text"
    json = "json"
    dot = "dot"
    svg = "svg"


class Phase(str, Enum):
    decode = "decode"
    prefill = "prefill"


def _split(passes: str | None) -> list[str]:
    return [p.strip() for p in passes.split(",") if p.strip()] if passes else []


@app.command()
def inspect(
    model: str = typer.Argument(..., help="smollm2, a tiny family (llama, gpt2, ...), a saved .pt2 program or a .onnx file"),
    passes: str = typer.Option(None, "--passes", "-p", help="comma-separated pass names to run first"),
    fmt: Format = typer.Option(Format.text, "--format", "-f", help="text (tables), json, dot or svg (layer picture)"),
    phase: Phase = typer.Option(Phase.decode, "--phase", help="which captured step to inspect"),
    output: Path = typer.Option(None, "--output", "-o", help="write to this file instead of stdout"),
) -> None:
    """What a graph holds (layers, attention sites, ops, I/O) and what each pass found and changed."""
    from tokenpass.inspector import inspect_source, picture, render_text

    report, graph = inspect_source(model, _split(passes), phase.value)
    if fmt in (Format.dot, Format.svg):
        if graph is None:
            raise TokenpassError("dot/svg pictures are drawn from torch.export graphs, not .onnx files")
        text = picture(graph, fmt.value)
    elif fmt == Format.json:
        text = json.dumps(report, indent=2, default=str) + "\n"
    else:
        console = Console(record=output is not None, width=160)
        render_text(report, console)
        if output is None:
            return
        text = console.export_text()
    if output is not None:
        output.write_text(text)
    else:
        sys.stdout.write(text)


@app.command()
def capture(
    model: str = typer.Argument(..., help="smollm2 or a tiny family"),
    output: Path = typer.Option(..., "--output", "-o", help="where to save the exported program (.pt2)"),
    passes: str = typer.Option(None, "--passes", "-p", help="comma-separated pass names to run before saving"),
    phase: Phase = typer.Option(Phase.decode, "--phase"),
) -> None:
    """Export one step of a model (after optional passes) to a .pt2 file that `inspect` can read."""
    from tokenpass.inspector import inspect_source

    _, graph = inspect_source(model, _split(passes), phase.value)
    graph.save(output)
    typer.echo(f"saved {graph.label} to {output}")


@app.command()
def bench(
    model: str = typer.Argument("smollm2", help="smollm2 or a tiny family"),
    passes: list[str] = typer.Option(
        [], "--passes", "-p", help="comma-separated pass list; repeat the option to compare several configurations"
    ),
    text: Path = typer.Option(None, "--text", help="text file for quality (default: a licence text on this machine)"),
    context: int = typer.Option(512, "--context", help="tokens of context to prefill"),
    continuation: int = typer.Option(256, "--continuation", help="tokens decoded one step at a time after it"),
    greedy_tokens: int = typer.Option(32, "--greedy", help="greedy tokens generated for illustration"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    compile_steps: bool = typer.Option(False, "--compile", help="compile the steps (torch.compile); reports compile s"),
) -> None:
    """Speed, memory and quality of pass lists against the unoptimised model, in one process."""
    from tokenpass.bench import bench as run_bench
    from tokenpass.bench_report import render_bench
    from tokenpass.models import load, load_tokenizer
    from tokenpass.texts import read_text, token_ids

    configs = {f"config{i}" if len(passes) > 1 else "optimized": _split(p) for i, p in enumerate(passes, 1)}
    configs = {(",".join(v) or "no passes") if k != "optimized" else k: v for k, v in configs.items()}
    loaded = load(model)
    ids = token_ids(load_tokenizer(model), read_text(text), context + continuation) if model == "smollm2" else (
        torch_random_ids(loaded.config.vocab_size, context + continuation)
    )
    report = run_bench(loaded, configs, token_ids=ids, context=context, continuation=continuation,
                       greedy_tokens=greedy_tokens, name=model, compile=compile_steps)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_bench(report, Console(width=180))


def torch_random_ids(vocab: int, count: int) -> list[int]:
    """Tiny models have no tokenizer: random ids make speed figures meaningful, quality figures not."""
    import torch

    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(0)).tolist()


@app.command(name="passes")
def list_passes() -> None:
    """List registered passes with their declared contract."""
    from tokenpass.passes import PASSES

    for name, cls in sorted(PASSES.items()):
        kind = "exact" if cls.exact else "approximate"
        requires = ", ".join(sorted(cls.requires)) or "-"
        provides = ", ".join(sorted(cls.provides)) or "-"
        typer.echo(f"{name:28s} {kind:12s} requires: {requires:24s} provides: {provides}")


def main() -> None:
    try:
        app(standalone_mode=False)
    except TokenpassError as exc:
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        sys.exit(130)
    except Exception as exc:  # click usage errors come through here with standalone_mode=False
        import click

        if isinstance(exc, click.exceptions.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


if __name__ == "__main__":
    main()
