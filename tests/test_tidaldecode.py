"""TidalDecode: exactness, faithfulness to a masked reference, quality on real text, errors, inspection."""

import pytest
import torch

from transformers.integrations.sdpa_attention import sdpa_attention_forward
from typer.testing import CliRunner

import tokenpass
from tokenpass.bench import bench, teacher_forced
from tokenpass.cli import app
from tokenpass.errors import PassError
from tokenpass.ir.requests import PolicySpec
from tokenpass.passes import PassManager, make_pass
from tokenpass.methods.tidaldecode import TidalDecode, named_selection_layers, paper_selection_layers

from conftest import hf_greedy, hf_reference_logprobs, padded_batch

DENSE_SPARSE = "tidaldecode:top_k=4096:selection_layers=2"  # layer 3 reads layer 2's selection


def test_top_k_covering_the_context_reproduces_dense_greedy(family):
    model = tokenpass.tiny(family)
    optimized = tokenpass.optimize(model, passes=[DENSE_SPARSE])
    counts = optimized.reports["decode"][2].counts
    assert counts == {"dense_layers": 2, "selection_layers": 1, "sparse_layers": 1}
    ids, mask = padded_batch(model.config.vocab_size, length=30, pad=7)
    assert torch.equal(optimized.generate(ids, mask, max_new_tokens=24), hf_greedy(model, ids, mask, 24))


class _MaskedTidalReference:
    """The method written plainly as HF attention: dense scores, non-selected positions masked out."""

    def __init__(self, top_k: int, sparse_start: int, selection: list[int], per_kv_head: bool, sparse_output: bool,
                 score_dtype: torch.dtype | None, score_channels: int):
        self.top_k, self.sparse_start, self.selection, self.chosen = top_k, sparse_start, selection, None
        self.per_kv_head, self.sparse_output = per_kv_head, sparse_output
        self.score_dtype, self.score_channels = score_dtype, score_channels

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        if query.shape[2] > 1 or layer < self.sparse_start:
            return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        group = query.shape[1] // key.shape[1]
        k, v = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        scores = (query @ k.transpose(-1, -2)) * scaling  # [B, H, 1, S]; the last position is this token
        if layer in self.selection:
            past = self._ranking(query, key, scaling) if self.score_dtype or self.score_channels else scores
            past = past[..., :-1]
            k = min(self.top_k, past.shape[-1])
            if self.per_kv_head:  # the group's query heads vote with their attention probabilities
                votes = past.softmax(-1).unflatten(1, (key.shape[1], group)).sum(2)
                self.chosen = votes.topk(k, dim=-1).indices.repeat_interleave(group, 1)
            else:
                self.chosen = past.topk(k, dim=-1).indices
        if layer not in self.selection or self.sparse_output:
            keep = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, self.chosen, True)
            keep[..., -1] = True
            scores = scores.masked_fill(~keep, float("-inf"))
        return (scores.softmax(-1) @ v).transpose(1, 2).contiguous(), None

    def _ranking(self, query, key, scaling):
        """Scores for ranking: the ``score_channels`` channels where the group's queries are largest, with
        queries and keys rounded to ``score_dtype`` (a GEMM in that dtype, as the op's)."""
        b, hkv, s, d = key.shape
        dtype = self.score_dtype or key.dtype
        q = query.reshape(b, hkv, -1, d).to(dtype)
        keys = key.transpose(-1, -2).to(dtype).contiguous()  # [B, Hkv, D, S]
        if self.score_channels:
            picked = q.abs().float().sum(2).topk(self.score_channels, -1).indices  # [B, Hkv, r]
            q = q.gather(-1, picked[:, :, None].expand(-1, -1, q.shape[2], -1))
            keys = keys.gather(2, picked[..., None].expand(-1, -1, -1, s))
        return ((q @ keys).float() * scaling).reshape(b, query.shape[1], 1, s)


def channels_of(fraction: float, model) -> int:
    """Channels a ranking reads for ``fraction`` of the head dimension (0: all of them)."""
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    return 0 if fraction == 1.0 else round(fraction * head_dim)


@pytest.mark.parametrize("per_kv_head,sparse_output,score_dtype,score_fraction", [
    (False, False, None, 1.0), (True, True, None, 1.0), (True, True, None, 0.25),
    (True, True, torch.bfloat16, 0.25),
], ids=["paper", "exact-ranking", "default", "bf16-ranking"])
def test_logits_equal_a_masked_attention_reference_step_by_step(per_kv_head, sparse_output, score_dtype,
                                                                 score_fraction):
    model = tokenpass.tiny("qwen2")
    context, steps = 48, 12
    ids = torch.randint(3, 300, (1, context + steps), generator=torch.Generator().manual_seed(3))
    spec = (f"tidaldecode:top_k=5:sparse_start=1:selection_layers=1/3:per_kv_head={per_kv_head}"
            f":sparse_selection_output={sparse_output}:score_dtype={str(score_dtype).replace('torch.', '').lower()}"
            f":score_fraction={score_fraction}")
    optimized = tokenpass.optimize(model, passes=[spec])
    got = teacher_forced(optimized, ids[:, :context], ids[0, context:], "tidal").logprobs

    want = hf_reference_logprobs(model, ids, context, steps, "tidal_reference", _MaskedTidalReference(
        5, 1, [1, 3], per_kv_head, sparse_output, score_dtype, channels_of(score_fraction, model)))
    dense = teacher_forced(tokenpass.optimize(model), ids[:, :context], ids[0, context:], "dense").logprobs
    assert (dense - want).abs().max() > 1e-2  # the sparsity really changes the predictions ...
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # ... exactly as the method says


def test_rewrite_adds_cross_layer_edges_visible_in_inspect():
    result = CliRunner().invoke(app, ["inspect", "llama", "--passes",
                                      "canonicalize_attention,lower_kv_cache,tidaldecode:selection_layers=2",
                                      "--format", "dot"])
    assert result.exit_code == 0, result.output
    assert '"layer2" -> "layer3" [style=dashed' in result.stdout
    report = CliRunner().invoke(app, ["inspect", "llama", "--passes",
                                      "canonicalize_attention,lower_kv_cache,tidaldecode:selection_layers=2",
                                      "--format", "json"])
    ops = [s["op"] for s in __import__("json").loads(report.stdout)["attention_sites"]]
    assert ops == ["tokenpass.cached_attention"] * 2 + ["tokenpass.selection_attention", "tokenpass.sparse_attention"]


def test_second_application_is_a_no_op_and_prefill_is_untouched():
    optimized = tokenpass.optimize(tokenpass.tiny("llama"), passes=[DENSE_SPARSE, DENSE_SPARSE])
    first, second = optimized.reports["decode"][2:4]
    assert first.modified and not second.modified and second.counts["already_applied"] == 1
    prefill = optimized.reports["prefill"][2]
    assert prefill.skipped and not prefill.modified


@pytest.mark.parametrize("options,message", [
    (dict(top_k=0), "top_k must be a positive integer"),
    (dict(selection_layers=[1, 5], sparse_start=2), "selection layer 1 is below sparse_start=2"),
    (dict(selection_layers=[3, 2]), "increasing"),
    (dict(score_fraction=0), "score_fraction must be in \\(0, 1\\]"),
    (dict(score_dtype="int8"), "option score_dtype must be one of 'bfloat16', 'float16', 'float32' or None, got 'int8'"),
    (dict(per_kv_head="false"), "option per_kv_head must be true/false, got 'false'"),
    (dict(top_k=2.5), "option top_k must be an integer, got 2.5"),
    (dict(selection_layers=[2, "x"]), "option selection_layers must be a list of an integer or a string"),
])
def test_bad_options_are_clear_errors(options, message):
    with pytest.raises(PassError, match=message):
        TidalDecode(**options)


@pytest.mark.parametrize("spec,message", [
    ("tidaldecode:per_kv_head=no", "option per_kv_head='no' is not true/false"),
    ("tidaldecode:top_k=many", "option top_k='many' is not an integer"),
    ("tidaldecode:topk=5", "pass 'tidaldecode' has no option 'topk' \\(options: top_k, sparse_start"),
    ("tidaldecode:score_dtype=int8", "option score_dtype='int8' is not one of"),
])
def test_cli_option_strings_are_parsed_by_the_option_types_before_any_capture(spec, message):
    with pytest.raises(PassError, match=message):
        make_pass(spec)


def test_option_strings_parse_to_the_annotated_types():
    tidal = make_pass("tidaldecode:top_k=64:per_kv_head=FALSE:selection_layers=2/3:score_dtype=none:score_fraction=1")
    assert (tidal.top_k, tidal.per_kv_head, tidal.selection_layers, tidal.score_dtype, tidal.score_fraction) == (
        64, False, [2, 3], None, 1.0)
    assert make_pass("tidaldecode:selection_layers=every4").selection_layers == "every4"
    assert make_pass(TidalDecode) == TidalDecode()  # a class means its default options


def test_selection_layer_out_of_range_names_the_model_size():
    graph = tokenpass.capture(tokenpass.tiny("llama"), phases=("decode",))["decode"]
    with pytest.raises(PassError, match="selection layer 9 is out of range \\(the model has 4 layers\\)"):
        PassManager(["canonicalize_attention", "lower_kv_cache", TidalDecode(selection_layers=[2, 9])]).run(graph)


def test_named_selection_layer_sets():
    assert paper_selection_layers(32, 2) == [2, 13] and paper_selection_layers(30, 2) == [2, 12]
    assert named_selection_layers("every4", 16, 2) == [2, 6, 10, 14]
    assert named_selection_layers("all", 5, 2) == [2, 3, 4]
    paper = TidalDecode.paper()
    assert (paper.top_k, paper.selection_layers, paper.per_kv_head, paper.sparse_selection_output) == (
        256, "paper", False, False)
    with pytest.raises(PassError, match="is not 'paper', 'all', 'everyN'"):
        TidalDecode(selection_layers="often")


@pytest.mark.smollm2
def test_quality_on_real_text_within_bounds(smollm2):
    """The shipped default at the issue's 4096-token context (64 continuation tokens here; 256 in the
    benchmarks: 1.006 / 0.961 / 0.0065). A top_k covering the context reproducing dense decoding is
    tested on the tiny models (``DENSE_SPARSE``): a third 4096-token run here cost CI half a minute."""
    from tokenpass.models import load_tokenizer
    from tokenpass.texts import read_text, token_ids

    ids = token_ids(load_tokenizer("smollm2"), read_text(), 4096 + 64)
    configs = {"default": ["tidaldecode"]}
    report = bench(smollm2, configs, token_ids=ids, context=4096, continuation=64, greedy_tokens=0, name="smollm2")
    base, default = report["configs"]
    assert default["ppl_ratio"] < 1.05 and default["top1_agreement"] >= 0.92 and 1e-5 < default["kl"] < 0.03
    assert default["kv_read_bytes_per_step"] < 0.5 * base["kv_read_bytes_per_step"]


def test_cache_correction_rewrites_sparse_tokens_with_dense_keys():
    model = tokenpass.tiny("llama")
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(4))
    dense = tokenpass.optimize(model)
    sparse = tokenpass.optimize(model, passes=["tidaldecode:top_k=3:sparse_start=1:selection_layers=1:correction_interval=4"])
    assert sparse.graphs["decode"].policies == [PolicySpec.of("tidaldecode.cache_correction", interval=4)]

    def run(optimized, steps):
        """Prefill 32 tokens, decode ``steps`` more one at a time (through the session's policies)."""
        session = optimized.session(1, capacity=40)
        positions = torch.arange(40)[None]
        session.step(ids[:, :32], torch.ones_like(ids[:, :32]), positions[:, :32])
        for i in range(32, 32 + steps):
            session.step(ids[:, i : i + 1], torch.ones((1, 1), dtype=torch.long), positions[:, i : i + 1])
        return session.cache.layers[3].keys[:, :, 32:40], session.cache.layers[3].values[:, :, 32:40]

    want_k, want_v = run(dense, 8)
    drift_k, _ = run(sparse, 7)  # 7 decode steps: the policy has not corrected yet ...
    got_k, got_v = run(sparse, 8)  # ... the 8th step's policy re-encodes steps 1-4 and 5-8 densely
    assert (drift_k[:, :, 4:7] - want_k[:, :, 4:7]).abs().max() > 1e-3  # sparse decoding drifted the cache ...
    torch.testing.assert_close(got_k, want_k, rtol=0, atol=1e-5)  # ... and correction restores it
    torch.testing.assert_close(got_v, want_v, rtol=0, atol=1e-5)


def test_correction_interval_is_validated():
    with pytest.raises(PassError, match="correction_interval must be an integer >= 2"):
        TidalDecode(correction_interval=1)


def test_kv_bytes_read_per_step_fall_to_dense_layers_plus_selected_slots():
    """Tiny llama: 4 layers, 2 KV heads of 16 channels, fp32; 11 decode steps over 41..51 cache slots."""
    from tokenpass.cli import torch_random_ids

    configs = {"tidal": ["tidaldecode:top_k=8:selection_layers=2"],
               "covering": ["tidaldecode:top_k=64:selection_layers=2"]}  # top_k >= context: plain dense reads
    report = bench(tokenpass.tiny("llama"), configs, token_ids=torch_random_ids(320, 52), context=40, continuation=12)
    base, tidal, covering = report["configs"]
    assert covering["kv_read_bytes_per_step"] == base["kv_read_bytes_per_step"] and covering["kl"] < 1e-10
    slots = sum(range(41, 52)) / 11  # mean slots per layer over the decode steps
    row = 2 * 16 * 4  # one slot of one layer: 2 KV heads x 16 channels x 4 bytes (keys or values)
    assert base["kv_read_bytes_per_step"] == pytest.approx(4 * slots * 2 * row)
    dense, ranking, chosen = 2 * slots * 2 * row, slots * row // 4, 2 * (8 + 1) * 2 * row  # layers 0-1; 2; 2-3
    assert tidal["kv_read_bytes_per_step"] == pytest.approx(dense + ranking + chosen)


def test_left_padded_ragged_batch_through_the_sparse_path_gives_each_row_what_it_gives_alone():
    """top_k 6 over prompts of 40, 28 and 17 tokens (rows 1-2 left-padded): selection really prunes in
    every row, and each row's tokens equal that row generated alone."""
    model = tokenpass.tiny("llama")
    optimized = tokenpass.optimize(model, passes=["tidaldecode:top_k=6:sparse_start=1:selection_layers=1/3"])
    generator = torch.Generator().manual_seed(7)
    lengths = (40, 28, 17)
    rows = [torch.randint(3, 300, (1, n), generator=generator) for n in lengths]
    ids = torch.zeros((3, max(lengths)), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, -row.shape[1]:], mask[i, -row.shape[1]:] = row, 1
    batch = optimized.generate(ids, mask, max_new_tokens=16)
    dense = tokenpass.optimize(model).generate(ids, mask, max_new_tokens=16)
    assert not torch.equal(batch, dense)  # the sparse path changed something (it is not the dense fallback)
    for i, row in enumerate(rows):
        alone = optimized.generate(row, max_new_tokens=16)
        assert torch.equal(batch[i, -(row.shape[1] + 16):], alone[0]), f"row {i}"


EXPLICIT_SPARSE = TidalDecode(top_k=4, sparse_start=1, selection_layers=[1])  # what ONNX exports run


def test_on_explicit_cache_tensors_it_generates_the_runtime_forms_tokens():
    """Positive (explicit form): the unlowered graph gets the explicit-cache ops, by count, and decodes the
    runtime form's tokens for a left-padded batch, which are not dense decoding's (other families: the
    ONNX exports in tests/test_onnx_methods.py run this form)."""
    model = tokenpass.tiny("llama")
    explicit = tokenpass.optimize(model, ["canonicalize_attention", EXPLICIT_SPARSE], lower=False)
    report = next(r for r in explicit.reports["decode"] if r.pass_name == "tidaldecode")
    assert report.counts == {"dense_layers": 1, "selection_layers": 1, "sparse_layers": 2, "explicit_cache": 1}
    ops = {s.op for s in explicit.step_graphs["decode"].sites().attention}
    assert ops == {"tokenpass.attention", "tokenpass.explicit_selection_attention",
                   "tokenpass.explicit_sparse_attention"}
    ids, mask = padded_batch(model.config.vocab_size, length=12, pad=5)
    tokens = explicit.generate(ids, mask, max_new_tokens=48)
    assert torch.equal(tokens, tokenpass.optimize(model, [EXPLICIT_SPARSE]).generate(ids, mask, max_new_tokens=48))
    assert not torch.equal(tokens, tokenpass.optimize(model, []).generate(ids, mask, max_new_tokens=48))


def test_on_explicit_cache_tensors_a_second_application_is_a_no_op():
    explicit = tokenpass.optimize(tokenpass.tiny("llama"), ["canonicalize_attention", EXPLICIT_SPARSE,
                                                            EXPLICIT_SPARSE], lower=False)
    first, second = [r for r in explicit.reports["decode"] if r.pass_name == "tidaldecode"]
    assert first.modified and not second.modified and second.counts["already_applied"] == 1


def test_on_explicit_cache_tensors_the_runtime_only_correction_is_refused_with_its_reason():
    """Negative (explicit form): cache correction re-encodes tokens in the runtime's cache."""
    corrected = TidalDecode(top_k=4, sparse_start=1, selection_layers=[1], correction_interval=4)
    with pytest.raises(PassError, match="could not apply: .*correction_interval re-encodes tokens"):
        tokenpass.optimize(tokenpass.tiny("llama"), ["canonicalize_attention", corrected], lower=False)
