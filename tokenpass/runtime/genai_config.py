"""``genai_config.json``: what onnxruntime-genai needs to run a tokenpass export with its own generator.

onnxruntime-genai runs a decoder split into several ONNX files as a *pipeline*: each stage names its
file, inputs and outputs and whether it runs on the prompt, on generated tokens, or both. A tokenpass
export is exactly two such stages: ``prefill.onnx`` for the prompt and ``decode.onnx`` for each new
token (where a decode-only method rewrote the decode step only), both taking and returning the
standard past/present cache, which onnxruntime-genai keeps between steps::

    {"model": {"type": "decoder-pipeline", "eos_token_id": 2, "decoder": {
        "num_hidden_layers": 4, "num_key_value_heads": 2, "head_size": 16,
        "inputs": {"past_key_names": "past_keys_%d", ...},
        "pipeline": [{"prefill": {"filename": "prefill.onnx", "run_on_prompt": true, "run_on_token_gen": false}},
                     {"decode":  {"filename": "decode.onnx",  "run_on_prompt": false, "run_on_token_gen": true}}]}}}

Token ids come from the model's config when the export had it (``eos_token_id`` stops generation).
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenpass.ir.capture import PHASES, ModelSpec
from tokenpass.runtime.onnx_session import output_names, phase_file

GENAI_CONFIG = "genai_config.json"
STEP_INPUTS = ("input_ids", "attention_mask", "position_ids")
DEFAULT_CONTEXT = 4096  # when the model declares no maximum position


def input_names(num_layers: int) -> list[str]:
    return [*STEP_INPUTS, *[f"past_keys_{i}" for i in range(num_layers)],
            *[f"past_values_{i}" for i in range(num_layers)]]


def pipeline_stage(phase: str, num_layers: int) -> dict:
    """One file of the pipeline: the prefill step runs on the prompt, the decode step on each new token."""
    return {phase: {"filename": phase_file(phase), "inputs": input_names(num_layers),
                    "outputs": output_names(num_layers), "run_on_prompt": phase == PHASES[0],
                    "run_on_token_gen": phase != PHASES[0]}}


def genai_config(spec: ModelSpec, token_ids: dict[str, int | list[int]]) -> dict:
    """The config for an export of ``spec``; ``token_ids``: ``bos``/``eos``/``pad`` ids that are known."""
    decoder = {
        "session_options": {"log_id": "tokenpass"},
        "head_size": spec.head_dim,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads,
        "inputs": {**{name: name for name in STEP_INPUTS}, "past_key_names": "past_keys_%d",
                   "past_value_names": "past_values_%d"},
        "outputs": {"logits": "logits", "present_key_names": "present_keys_%d",
                    "present_value_names": "present_values_%d"},
        "pipeline": [pipeline_stage(phase, spec.num_layers) for phase in PHASES],
    }
    model = {"type": "decoder-pipeline", "vocab_size": spec.vocab_size,
             "context_length": spec.max_positions or DEFAULT_CONTEXT, "decoder": decoder,
             **{f"{name}_token_id": value for name, value in token_ids.items()}}
    search = {"do_sample": False, "num_beams": 1, "max_length": spec.max_positions or DEFAULT_CONTEXT,
              "past_present_share_buffer": False}  # each step returns past ++ new, a fresh buffer
    return {"model": model, "search": search}


def write_genai_config(directory: Path, spec: ModelSpec, token_ids: dict[str, int | list[int]]) -> Path:
    path = directory / GENAI_CONFIG
    path.write_text(json.dumps(genai_config(spec, token_ids), indent=1))
    return path
