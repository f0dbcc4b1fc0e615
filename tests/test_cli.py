"""The CLI, early checks and inputs as a new user meets them: every mistake is one line naming what is
wrong, and arrives before the slow work, not after it."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import tokenpass
from tokenpass.bench import bench
from tokenpass.cli import app, torch_random_ids
from tokenpass.errors import PassError, PassOrderError, TokenpassError
from tokenpass.methods.tidaldecode import TidalDecode

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def _one_line_failure(args: list[str]) -> str:
    """Run the CLI through typer's runner: exit code 2, nothing on stdout, one line on stderr."""
    result = runner.invoke(app, args)
    err = result.stderr.strip()
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and not result.stdout.strip(), result.output
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args,message", [
    (["inspect"], "Missing argument 'MODEL'"),
    (["inspect", "llama", "--format", "xml"], "'xml' is not one of"),
    (["inspect", "llama", "--bogus"], "No such option: --bogus"),
    (["bench", "--context", "abc"], "Invalid value for '--context'"),
    (["bogus"], "No such command 'bogus'"),
    (["capture", "llama"], "Missing option '--output'"),
], ids=["missing-argument", "bad-choice", "unknown-option", "bad-integer", "unknown-command", "missing-option"])
def test_usage_errors_are_one_line_with_exit_code_2(args, message):
    err = _one_line_failure(args)
    assert message in err and err.startswith("error: ") and "--help" in err


@pytest.mark.parametrize("args,message", [
    (["inspect", "bert"], "unknown model 'bert'"),
    (["inspect", "llama", "--format", "png"], "give a file with -o"),
    (["inspect", "llama", "--passes", "tidaldecode:top_k=0"], "top_k must be a positive integer"),
    (["inspect", "llama", "--no-lower", "--passes", "tidaldecode"], "requires attention_canonical"),
    (["bench", "gpt5"], "unknown model 'gpt5'"),
])
def test_input_errors_are_one_line_before_any_model_is_loaded(args, message, monkeypatch):
    monkeypatch.setattr("tokenpass.models.load", _must_not_run("loading a model"))
    assert message in _one_line_failure(args)


def _must_not_run(what: str):
    def fail(*args, **kwargs):
        raise AssertionError(f"{what} ran before the error was reported")
    return fail


def test_the_installed_entry_point_prints_one_line_and_exits_2():
    """The real script path (``python -m tokenpass.cli`` runs ``main`` as ``tokenpass`` does), not the runner."""
    for args, message in ((["inspect"], "Missing argument 'MODEL'"), (["inspect", "llama", "--format", "xml"], "xml")):
        proc = subprocess.run([sys.executable, "-m", "tokenpass.cli", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
        assert "tokenpass inspect --help" in proc.stderr and not proc.stdout


def test_help_is_user_text_not_docstrings():
    for args in ([], ["inspect"], ["capture"], ["bench"], ["passes"]):
        result = runner.invoke(app, [*args, "--help"], prog_name="tokenpass")
        assert result.exit_code == 0, result.output
        assert "`" not in result.output, result.output
        assert "Usage: tokenpass" in result.output
    assert "--diff" in runner.invoke(app, ["inspect", "--help"]).output
    bare = runner.invoke(app, [], prog_name="tokenpass")  # no command: the help, exit 2 as click does
    assert bare.exit_code == 2 and "Usage: tokenpass" in bare.stdout and not bare.stderr.strip()


def test_bench_refuses_a_bad_pass_in_any_configuration_before_the_baseline(monkeypatch):
    """`tokenpass bench --passes bogus` used to run the whole baseline first."""
    monkeypatch.setattr("tokenpass.models.load", _must_not_run("loading the model"))
    assert "unknown pass 'bogus'" in _one_line_failure(["bench", "llama", "--passes", "dce", "--passes", "bogus"])
    err = _one_line_failure(["bench", "llama", "--passes", "dce", "--passes", "tidaldecode:selection_layers=3/2"])
    assert "increasing" in err


def test_bench_checks_the_model_shape_of_every_configuration_before_the_baseline(monkeypatch):
    monkeypatch.setattr("tokenpass.bench.capture", _must_not_run("the baseline"))
    model = tokenpass.tiny("llama")
    configs = {"fine": ["dce"], "bad": ["tidaldecode:selection_layers=99"]}
    with pytest.raises(PassError, match="selection layer 99 is out of range .the model has 4 layers"):
        bench(model, configs, token_ids=torch_random_ids(320, 100), context=64, continuation=12)


def test_model_shape_is_checked_after_the_probe_before_export(monkeypatch):
    """TidalDecode(selection_layers=[99]) was refused only after the whole capture."""
    monkeypatch.setattr("tokenpass.api.export_phase", _must_not_run("torch.export"))
    model = tokenpass.tiny("llama")
    with pytest.raises(PassError, match="selection layer 99 is out of range"):
        tokenpass.optimize(model, passes=[TidalDecode(selection_layers=[99])])
    with pytest.raises(PassOrderError, match="requires attention_canonical"):  # the order, before capture too
        tokenpass.optimize(model, passes=["tidaldecode"], lower=False)
    assert "selection layer 99" in _one_line_failure(["inspect", "llama", "--passes", "tidaldecode:selection_layers=99"])


@pytest.fixture(scope="module")
def trained():
    """A tiny model handed to ``optimize`` in training mode, one submodule in eval mode, and the result."""
    model = tokenpass.tiny("llama").train()
    model.model.layers[1].eval()
    before = {name: module.training for name, module in model.named_modules()}
    return model, before, tokenpass.optimize(model)


def test_optimize_leaves_the_callers_training_flags_alone(trained):
    model, before, optimized = trained
    assert {name: module.training for name, module in model.named_modules()} == before
    ids = torch.tensor([[5, 6, 7]])
    model.eval()
    with torch.no_grad():  # and what was captured is the eval-mode model (no dropout)
        torch.testing.assert_close(optimized(ids)[0], model(ids).logits[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("call,message", [
    (lambda m: m.generate(torch.tensor([[1.0, 2.0]])), "input_ids must hold integer token ids, got dtype float32"),
    (lambda m: m.generate(torch.tensor([[1, 320]])), r"input_ids must be token ids in \[0, 320\).*got 320 at row 0, position 1"),
    (lambda m: m(torch.tensor([[3, -1]])), r"input_ids must be token ids in \[0, 320\).*got -1"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), max_new_tokens=2.5), "max_new_tokens must be a non-negative integer, got 2.5"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), max_new_tokens=-1), "max_new_tokens must be a non-negative integer"),
    (lambda m: m.generate(torch.tensor([[1, 2], [3, 4]]), torch.tensor([[1, 1], [0, 0]])),
     "attention_mask row 1 is all zeros"),
    (lambda m: m.generate(torch.tensor([[1, 2]]), torch.tensor([[1, 2]])), "attention_mask must hold only 0 .padding. and 1"),
    (lambda m: m(torch.tensor([[1, 2]]), [[1, 1]]), "attention_mask must be a tensor"),
], ids=["float-ids", "id-past-vocab", "negative-id", "fractional-new-tokens", "negative-new-tokens", "all-padding-row",
        "mask-value-2", "mask-list"])
def test_bad_inputs_are_one_line_errors_naming_the_argument(trained, call, message):
    with pytest.raises(TokenpassError, match=message) as info:
        call(trained[2])
    assert len(str(info.value).splitlines()) == 1


def test_valid_inputs_in_other_integer_types_still_work(trained):
    optimized = trained[2]
    ids = torch.tensor([[5, 6, 7]])
    want = optimized.generate(ids, max_new_tokens=3)
    assert torch.equal(optimized.generate(ids.to(torch.int32), torch.ones(1, 3, dtype=torch.bool), max_new_tokens=3), want)


def test_a_bare_pass_string_is_refused_and_a_pass_class_accepted(monkeypatch):
    model = tokenpass.tiny("llama")
    with pytest.raises(TokenpassError, match=r"did you mean passes=\['dce'\]"):
        tokenpass.optimize(model, passes="dce")
    optimized = tokenpass.optimize(model, passes=[TidalDecode])  # the class: default options
    assert [r.pass_name for r in optimized.reports["decode"]][2] == "tidaldecode"
