"""The ``tokenpass`` command line.

Every error a user can cause ends as one line on stderr and exit code 2: usage errors (a missing
argument, a bad option value, an unknown option or command) and the errors tokenpass raises on purpose
(``TokenpassError``). Typer raises its own vendored click's exceptions, not the installed click's, so
they are caught here by typer's public base class, inside the command group, where typer's
``CliRunner`` sees exactly what the installed script does. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperGroup

from tokenpass.errors import TokenpassError

USAGE_EXIT = 2


class OneLineErrors(TyperGroup):
    """The command group: runs a command, and turns usage and tokenpass errors into one line, exit 2."""

    def main(self, args: Any = None, prog_name: str | None = None, complete_var: str | None = None,
             standalone_mode: bool = True, **extra: Any) -> Any:
        try:
            code = super().main(args=args, prog_name=prog_name or "tokenpass", complete_var=complete_var,
                                standalone_mode=False, **extra)
        except TokenpassError as exc:
            fail(str(exc))
        except USER_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # bare `tokenpass`: the help, exit 2 as click does
                if exc.format_message().strip():  # typer's rich help has printed itself already
                    typer.echo(exc.format_message())
                sys.exit(USAGE_EXIT)
            fail(usage_line(exc), getattr(exc, "exit_code", USAGE_EXIT) or USAGE_EXIT)
        except typer.Abort:
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Usage errors of typer's vendored click (typer >= 0.22) and of the installed click (older typer)."""
    errors: list[type[BaseException]] = [typer.TyperException]
    try:
        import click

        errors.append(click.exceptions.ClickException)
    except ImportError:  # pragma: no cover - typer without click installed beside it
        pass
    return tuple(errors)


USER_ERRORS = _user_errors()


def usage_line(exc: BaseException) -> str:
    """``Missing argument 'MODEL'. (see 'tokenpass inspect --help')``: click's message on one line."""
    message = " ".join(str(exc.format_message() if hasattr(exc, "format_message") else exc).split())
    ctx = getattr(exc, "ctx", None)
    return f"{message} (see '{ctx.command_path} --help')" if ctx is not None else message


def fail(message: str, code: int = USAGE_EXIT) -> None:
    """Print ``error: message`` as one line on stderr (never wrapped) and exit."""
    Console(stderr=True, soft_wrap=True).print(f"[red]error:[/red] {escape(message)}", highlight=False)
    sys.exit(code)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="Graph-rewriting passes over causal LMs: inspect what a model's graph holds and what passes change, "
         "save captured steps, benchmark pass lists. Errors print as one line (exit code 2).",
)


class Format(str, Enum):
    text = "text"
    json = "json"
    dot = "dot"
    svg = "svg"
    png = "png"


class Backend(str, Enum):
    torch = "torch"
    onnx = "onnx"


class Phase(str, Enum):
    decode = "decode"
    prefill = "prefill"
    train = "train"  # the forward with labels (training passes: cutcrossentropy)


def _split(passes: str | None) -> list[str]:
    return [p.strip() for p in passes.split(",") if p.strip()] if passes else []


PASSES_HELP = ("comma-separated passes, options as name:key=value (see 'tokenpass passes'); they run as optimize "
               "runs them: lowering first, clean-up after")
LOWER_HELP = "with --passes: lower onto the runtime cache first and clean up after, as optimize does"


@app.command(help="What a model's graph holds (attention sites by layer, LM head) and what each pass changed there.")
def inspect(
    model: str = typer.Argument(..., metavar="MODEL",
                                help="smollm2, a tiny family (llama, gpt2, ...), a saved .pt2 program or a .onnx file"),
    passes: str = typer.Option(None, "--passes", "-p", help=PASSES_HELP),
    lower: bool = typer.Option(True, "--lower/--no-lower", help=LOWER_HELP),
    fmt: Format = typer.Option(Format.text, "--format", "-f",
                               help="text (tables), json, or a layer picture: dot, svg or png (png needs Pillow)"),
    phase: Phase = typer.Option(Phase.decode, "--phase", help="which captured step to inspect"),
    io: bool = typer.Option(False, "--io", help="text: also the inputs and outputs with their (symbolic) shapes"),
    ops: bool = typer.Option(False, "--ops", help="text: also the op histogram"),
    diff: bool = typer.Option(False, "--diff", help="text: also every node each pass added, removed or replaced, "
                                                   "with its layer and provenance"),
    output: Path = typer.Option(None, "--output", "-o", help="write to this file instead of stdout",
                                dir_okay=False),
) -> None:
    from tokenpass.inspector import PICTURES, inspect_source, picture, render_text

    if fmt.value in PICTURES and Path(model).suffix == ".onnx":
        raise TokenpassError("dot/svg/png pictures are drawn from torch.export graphs, not .onnx files")
    if fmt == Format.png and output is None:
        raise TokenpassError("--format png writes binary data: give a file with -o")
    if fmt == Format.png:
        _require_pillow()
    report, graph = inspect_source(model, _split(passes), phase.value, lower)
    if fmt.value in PICTURES:
        _write(picture(graph, fmt.value), output)
    elif fmt == Format.json:
        _write(json.dumps(report, indent=2, default=str) + "\n", output)
    else:
        console = Console(record=output is not None, width=160, file=None if output is None else _Discard())
        render_text(report, console, io=io, ops=ops, diff=diff)
        if output is not None:
            _write(console.export_text(), output)


class _Discard:
    """A file that drops what a recording console prints (the text goes to ``-o`` only)."""

    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


def _require_pillow() -> None:
    import importlib.util

    if importlib.util.find_spec("PIL") is None:
        raise TokenpassError("--format png needs Pillow: pip install 'tokenpass[pictures]' (or use --format svg)")


def _write(content: str | bytes, output: Path | None) -> None:
    """To ``output`` or stdout; an unwritable file is a one-line error."""
    if output is None:
        sys.stdout.write(content)
        return
    try:
        output.write_bytes(content) if isinstance(content, bytes) else output.write_text(content)
    except OSError as exc:
        raise TokenpassError(f"cannot write {output}: {exc.strerror or exc}") from None


@app.command(help="Export one step of a model (after optional passes) to a .pt2 file that 'tokenpass inspect' reads.")
def capture(
    model: str = typer.Argument(..., metavar="MODEL", help="smollm2 or a tiny family"),
    output: Path = typer.Option(..., "--output", "-o", help="where to save the exported program (.pt2)", dir_okay=False),
    passes: str = typer.Option(None, "--passes", "-p", help=PASSES_HELP),
    lower: bool = typer.Option(True, "--lower/--no-lower", help=LOWER_HELP),
    phase: Phase = typer.Option(Phase.decode, "--phase", help="which step to export"),
) -> None:
    from tokenpass.inspector import inspect_source

    if Path(model).suffix == ".onnx":
        raise TokenpassError("capture exports models, not .onnx files")
    _, graph = inspect_source(model, _split(passes), phase.value, lower)
    try:
        graph.save(output)
    except OSError as exc:
        raise TokenpassError(f"cannot write {output}: {exc.strerror or exc}") from None
    typer.echo(f"saved {graph.label} to {output}")


@app.command(name="export", help="Export a model's prefill and decode steps (after optional passes) as ONNX files "
                                  "that onnxruntime runs (tokenpass.OnnxModel loads the directory).")
def export(
    model: str = typer.Argument(..., metavar="MODEL", help="smollm2, a tiny family, or a .onnx decoder exported "
                                "elsewhere (its cache as inputs/outputs) to apply the passes to"),
    output: Path = typer.Option(..., "--output", "-o", help="the directory to write (prefill.onnx, decode.onnx, "
                                "tokenpass_onnx.json)"),
    passes: str = typer.Option(None, "--passes", "-p", help=PASSES_HELP),
    force: bool = typer.Option(False, "--force", help="replace an existing export at OUTPUT"),
) -> None:
    from tokenpass.api import user_passes
    from tokenpass.inspector import MODEL_CHOICES
    from tokenpass.models import load
    from tokenpass.onnx_export import export_onnx
    from tokenpass.progress import status

    if Path(model).suffix == ".onnx":
        from tokenpass.onnx_optimize import optimize_onnx

        result = optimize_onnx(model, output, _split(passes), force=force)
        typer.echo(f"rewrote {model} ({', '.join(result.passes)}) into {result.directory}: "
                   f"{', '.join(f.name for f in result.files.values())} (opset {result.opset})")
        return
    if model not in MODEL_CHOICES:
        raise TokenpassError(f"unknown model '{model}': give one of {', '.join(MODEL_CHOICES)} or a .onnx file")
    requested = user_passes(_split(passes))  # names and options fail before the model loads
    with status(f"loading {model}"):
        loaded = load(model)
    result = export_onnx(loaded, output, requested, force=force)
    names = ", ".join(result.passes) or "no passes"
    typer.echo(f"exported {model} ({names}) to {result.directory}: "
               f"{', '.join(f.name for f in result.files.values())} (opset {result.opset})")


@app.command(help="Speed, memory and quality of pass lists against the unoptimised model, in one process.")
def bench(
    model: str = typer.Argument("smollm2", metavar="MODEL", help="smollm2 or a tiny family"),
    passes: list[str] = typer.Option(
        [], "--passes", "-p", help="comma-separated pass list; repeat the option to compare several configurations"
    ),
    text: Path = typer.Option(None, "--text", help="text file for quality (default: a licence text on this machine)",
                              exists=True, dir_okay=False),
    context: int = typer.Option(512, "--context", help="tokens of context to prefill"),
    continuation: int = typer.Option(256, "--continuation", help="tokens decoded one step at a time after it"),
    greedy_tokens: int = typer.Option(32, "--greedy", help="greedy tokens generated for illustration"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a table"),
    compile_steps: bool = typer.Option(False, "--compile", help="compile the steps (torch.compile); reports compile s"),
    backend: Backend = typer.Option(Backend.torch, "--backend", help="run the configurations on the torch runtime "
                                    "or exported to ONNX under onnxruntime (the baseline stays on torch)"),
) -> None:
    from tokenpass.api import plan
    from tokenpass.bench import bench as run_bench
    from tokenpass.bench_report import render_bench
    from tokenpass.inspector import MODEL_CHOICES
    from tokenpass.models import load, load_tokenizer
    from tokenpass.texts import read_text, token_ids

    if model not in MODEL_CHOICES:
        raise TokenpassError(f"unknown model '{model}': give one of {', '.join(MODEL_CHOICES)}")
    configs = {f"config{i}" if len(passes) > 1 else "optimized": _split(p) for i, p in enumerate(passes, 1)}
    configs = {(",".join(v) or "no passes") if k != "optimized" else k: v for k, v in configs.items()}
    if backend == Backend.onnx and not configs:
        configs = {"onnx": []}
    for pass_list in configs.values():  # names, options and order: before the model is even loaded
        plan(pass_list)
    loaded = load(model)
    ids = token_ids(load_tokenizer(model), read_text(text), context + continuation) if model == "smollm2" else (
        torch_random_ids(loaded.config.vocab_size, context + continuation)
    )
    report = run_bench(loaded, configs, token_ids=ids, context=context, continuation=continuation,
                       greedy_tokens=greedy_tokens, name=model, compile=compile_steps, backend=backend.value)
    if as_json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
    else:
        render_bench(report, Console(width=180))


def torch_random_ids(vocab: int, count: int) -> list[int]:
    """Tiny models have no tokenizer: random ids make speed figures meaningful, quality figures not."""
    import torch

    return torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(0)).tolist()


@app.command(name="passes", help="List the registered passes: exact or approximate, what each requires and provides.")
def list_passes() -> None:
    from tokenpass.passes import PASSES

    for name, cls in sorted(PASSES.items()):
        kind = "exact" if cls.exact else "approximate"
        requires = ", ".join(sorted(cls.requires)) or "-"
        provides = ", ".join(sorted(cls.provides)) or "-"
        typer.echo(f"{name:28s} {kind:12s} requires: {requires:24s} provides: {provides}")


def main() -> None:
    """The ``tokenpass`` script."""
    app(prog_name="tokenpass")


if __name__ == "__main__":
    main()
