"""Generation: cache equalities, no-cache semantics, batching, sampling, the CLI."""

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import tiny_model
from pldr_cli.app import app
from pldr_core.cache import GCache
from pldr_core.generate import GenerationStats, gcache_fidelity, generate
from pldr_core.sampling import Sampler
from pldr_core.model import PLDRModel

TOL = 1e-10
PROMPTS = [[5, 9, 17], [3], [40, 2, 8, 8, 21, 33, 7], [11, 12, 13, 14, 15]]
runner = CliRunner()


def run_cli(*args):
    return runner.invoke(app, list(map(str, args)))


@pytest.fixture(scope="module")
def model():
    return tiny_model("learned", seed=3)


def collect(model, prompts, n=10, **kw):
    """tokens [list per row] and logits [list per row of [V]] from the generator."""
    toks, logits = [[] for _ in prompts], [[] for _ in prompts]
    for t in generate(model, prompts, max_new_tokens=n, **kw):
        toks[t.row].append(t.id)
        logits[t.row].append(t.logits)
    return toks, [torch.stack(x) for x in logits]


def file_gcache(model, ids):
    gc = GCache.for_model(model, 1)
    with torch.no_grad():
        model(torch.tensor([ids]), g_cache=gc)
    return GCache.from_tensors(gc.A_LM[:, 0].clone(), gc.G_LM[:, 0].clone())


def fixed_copy(model, gc):
    """The same weights in a g_mode 'fixed' model whose frozen G_LM / A_LM are ``gc``'s."""
    fixed = PLDRModel(model.config.replace(g_mode="fixed")).to(torch.float64).eval()
    missing, unexpected = fixed.load_state_dict(model.state_dict(), strict=False)
    assert all(k.endswith((".G_LM", ".A_LM")) for k in missing) and missing
    assert all(".plgatt_layer." in k or ".reslayerAs." in k or ".mha1.layernorm1." in k for k in unexpected)
    fixed.set_fixed_g(gc.G_LM[:, 0], gc.A_LM[:, 0])
    return fixed


def test_kv_with_prefill_g_equals_kv_only(model):
    t1, l1 = collect(model, PROMPTS[2:3], 12, kv_cache=True, g_cache=True)
    t2, l2 = collect(model, PROMPTS[2:3], 12, kv_cache=True, g_cache=False)
    assert t1 == t2
    torch.testing.assert_close(l1[0], l2[0], atol=TOL, rtol=0)


@pytest.mark.parametrize("kv", [True, False])
def test_gcache_file_equals_fixed_g_model(model, kv):
    gc = file_gcache(model, [3])  # the EOS prompt, the paper's default
    fixed = fixed_copy(model, gc)
    x = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        torch.testing.assert_close(model(x, g_cache=gc).logits, fixed(x).logits, atol=TOL, rtol=0)
    t1, l1 = collect(model, PROMPTS[2:3], 12, kv_cache=kv, g_cache=gc)
    t2, l2 = collect(fixed, PROMPTS[2:3], 12, kv_cache=kv, g_cache=True)
    assert t1 == t2
    torch.testing.assert_close(l1[0], l2[0], atol=TOL, rtol=0)
    # and a G-cache from another prompt really is a different G: the full-PLGA logits differ
    with torch.no_grad():
        assert (model(x).logits - model(x, g_cache=gc).logits).abs().max() > 1e-4


def test_gcache_file_never_runs_metric_path(model, monkeypatch):
    gc = file_gcache(model, [3])
    calls = []
    for layer in model.decoder.dec_layers:
        orig = layer.mha1.metric_A
        monkeypatch.setattr(layer.mha1, "metric_A", lambda q, orig=orig: calls.append(1) or orig(q))
    collect(model, PROMPTS[:2], 4, kv_cache=True, g_cache=gc)
    collect(model, PROMPTS[:1], 3, kv_cache=False, g_cache=gc)
    assert calls == []
    collect(model, PROMPTS[:1], 3, kv_cache=True, g_cache=True)
    assert len(calls) == model.config.num_layers  # the prefill only: A frozen, G cached


@pytest.mark.parametrize("g", [False, True])
def test_no_kv_decoding_reruns_the_whole_text(model, g):
    """Without the KV-cache every step reruns the whole text; without any cache A comes from
    the whole current text, with the G-cache the prompt's G_LM is reused."""
    prompt = PROMPTS[0]
    toks, logits = collect(model, [prompt], 8, kv_cache=False, g_cache=g)
    gc = file_gcache(model, prompt) if g else None
    text = list(prompt)
    with torch.no_grad():
        for step in range(8):
            want = model(torch.tensor([text]), g_cache=gc).logits[0, -1]
            torch.testing.assert_close(logits[0][step], want, atol=TOL, rtol=0)
            assert toks[0][step] == int(want.argmax())
            text.append(toks[0][step])
    if not g:  # A from the whole text departs from A frozen at the prompt
        _, kv_logits = collect(model, [prompt], 8, kv_cache=True, g_cache=False)
        assert (kv_logits[0][1:] - logits[0][1:]).abs().max() > 1e-6


@pytest.mark.parametrize("kv,g", [(True, True), (True, False), (False, True), (False, False)])
def test_batch_gives_each_prompt_what_it_gets_alone(model, kv, g):
    batch_t, batch_l = collect(model, PROMPTS, 9, kv_cache=kv, g_cache=g)
    for b, p in enumerate(PROMPTS):
        alone_t, alone_l = collect(model, [p], 9, kv_cache=kv, g_cache=g)
        assert batch_t[b] == alone_t[0]
        torch.testing.assert_close(batch_l[b], alone_l[0], atol=1e-9, rtol=0)


def test_rows_stop_at_eos_and_others_continue(model):
    alone = [collect(model, [p], 10)[0][0] for p in PROMPTS]
    eos = alone[2][3]  # make row 2's fourth token the "EOS"
    got = collect(model, PROMPTS, 10, eos_id=eos)[0]
    for b, toks in enumerate(alone):
        cut = toks.index(eos) + 1 if eos in toks else len(toks)
        assert got[b] == toks[:cut]
    assert len(got[2]) <= 4


def test_same_seed_same_tokens_and_sampler_limits(model):
    def sample(seed, **kw):
        return collect(model, PROMPTS[:2], 16, sampler=Sampler(temperature=1.5, top_k=None, seed=seed, **kw))[0]

    assert sample(7) == sample(7)
    assert sample(7) != sample(8)
    greedy = collect(model, PROMPTS[:2], 16)[0]
    assert sample(7, top_p=1e-9) == greedy  # nucleus of one token
    assert collect(model, PROMPTS[:2], 16, sampler=Sampler(top_k=1, seed=1))[0] == greedy
    topk = collect(model, PROMPTS[:1], 16, sampler=Sampler(temperature=2.0, top_k=3, seed=0))
    for tok, logit in zip(topk[0][0], topk[1][0]):
        assert tok in logit.topk(3).indices.tolist()


def test_gcache_fidelity(model):
    same = gcache_fidelity(model, PROMPTS[2], file_gcache(model, PROMPTS[2]))
    assert same["max_abs_logit_diff"] < 1e-12 and same["argmax_agreement"] == 1.0 and same["next_token_agrees"]
    other = gcache_fidelity(model, PROMPTS[2], file_gcache(model, [3]))
    with torch.no_grad():
        x = torch.tensor([PROMPTS[2]])
        want = (model(x).logits[0, -1] - model(x, g_cache=file_gcache(model, [3])).logits[0, -1]).abs().max()
    assert other["max_abs_logit_diff_last"] == pytest.approx(float(want), rel=1e-12) and want > 1e-4


# ---- compile: the static-cache engine gives the eager path's tokens ---------------------------------
MIXED = PROMPTS + [[6, 1, 30], [19]]  # distinct lengths and two groups of equal length (1 and 3)


@pytest.fixture
def engine_calls(monkeypatch):
    """Records DecodeEngine prefills (which method, and the prompt lengths each got), so a test knows
    the engine really ran, and how."""
    from pldr_core.engine import DecodeEngine

    calls = []
    real = {name: getattr(DecodeEngine, name) for name in ("prefill", "prefill_row", "prefill_rows")}

    def prefill(self, prompt):
        calls.append(("prefill", (prompt.shape[1],) * prompt.shape[0]))
        return real["prefill"](self, prompt)

    def prefill_row(self, row, ids):
        calls.append(("prefill_row", (len(ids),)))
        return real["prefill_row"](self, row, ids)

    def prefill_rows(self, rows, prompts):
        calls.append(("prefill_rows", tuple(len(p) for p in prompts)))
        return real["prefill_rows"](self, rows, prompts)

    for name, fn in (("prefill", prefill), ("prefill_row", prefill_row), ("prefill_rows", prefill_rows)):
        monkeypatch.setattr(DecodeEngine, name, fn)
    return calls


@pytest.mark.parametrize("g", ["file", True, False])
def test_compile_gives_the_eager_tokens(model, g, engine_calls):
    gc = file_gcache(model, PROMPTS[2]) if g == "file" else g
    eager_t, eager_l = collect(model, MIXED, 10, g_cache=gc)
    assert engine_calls == []
    stats = GenerationStats(rows=[])
    fast_t, fast_l = collect(model, MIXED, 10, g_cache=gc, compile=True, stats=stats)
    # One engine for every row: with G_LM from a file, the mixed lengths in one padded prefill; with
    # G_LM from each prompt's A (its prefill, or the KV-cache's frozen A), each row alone.
    lengths = tuple(len(p) for p in MIXED)
    assert engine_calls == [("prefill_rows", lengths)] + (
        [] if g == "file" else [("prefill_row", (n,)) for n in lengths])
    assert fast_t == eager_t
    for a, b in zip(fast_l, eager_l):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    assert stats.new_tokens == 10 * len(MIXED) and all(r.prefill_ms > 0 for r in stats.rows)
    assert stats.decode_s > 0 and stats.compile_s == 0.0  # nothing is compiled on CPU
    # each row alone, through the engine, also gets the same tokens
    assert collect(model, MIXED[4:5], 10, g_cache=gc, compile=True)[0][0] == eager_t[4]


def test_compile_stops_at_eos_samples_alike_and_needs_the_kv_cache(model, engine_calls):
    alone = [collect(model, [p], 10)[0][0] for p in MIXED]
    eos = alone[2][3]
    assert collect(model, MIXED, 10, eos_id=eos, compile=True)[0] == collect(model, MIXED, 10, eos_id=eos)[0]
    for seed in (7, 8):
        kw = dict(temperature=1.5, top_k=None, seed=seed)
        assert collect(model, MIXED, 16, sampler=Sampler(**kw), compile=True)[0] == \
            collect(model, MIXED, 16, sampler=Sampler(**kw))[0]
    engine_calls.clear()
    no_kv = collect(model, MIXED[:2], 6, kv_cache=False, compile=True)[0]
    assert engine_calls == [] and no_kv == collect(model, MIXED[:2], 6, kv_cache=False)[0]


@pytest.mark.parametrize("g_mode", ["identity", "random"])
def test_compile_without_a_metric_path(g_mode):
    m = tiny_model(g_mode, seed=4)
    assert collect(m, MIXED, 8, compile=True)[0] == collect(m, MIXED, 8)[0]


# ---- CLI -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_model):
    d = tmp_path_factory.mktemp("gen") / "m"
    assert run_cli("init", "--preset", "tiny", "--out", d, "--tokenizer", spm_model, "--seed", 2).exit_code == 0
    return d


def gen_json(*args):
    r = run_cli("generate", *args, "--json", "--device", "cpu")
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.stdout.splitlines() if line.strip()]


def test_cli_generate_json_and_batching(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("the metric tensor\n\npower law\nkeys and values in the model\n")
    batch = gen_json(model_dir, "--prompts-file", tmp_path / "p.txt", "--greedy", "-n", 12)
    assert [r["prompt"] for r in batch] == ["the metric tensor", "power law", "keys and values in the model"]
    for row in batch:
        assert row["tokens"] == row["prompt_tokens"] + row["new_tokens"]
        assert 1 <= len(row["new_tokens"]) <= 12 and row["prefill_ms"] > 0
        assert row["finish_reason"] in ("eos", "length") and row["g_cache"] == "prefill"
        alone = gen_json(model_dir, "--prompt", row["prompt"], "--greedy", "-n", 12)[0]
        assert alone["tokens"] == row["tokens"] and alone["text"] == row["text"]
        nocache = gen_json(model_dir, "--prompt", row["prompt"], "--greedy", "-n", 12,
                           "--no-kv-cache", "--no-g-cache")[0]
        assert nocache["tokens"][:len(row["prompt_tokens"]) + 1] == row["tokens"][:len(row["prompt_tokens"]) + 1]


def test_cli_generate_json_carries_the_whole_runs_totals(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("the metric tensor\npower law\nkeys and values in the model\n")
    for extra in ([], ["--compile"]):
        rows = gen_json(model_dir, "--prompts-file", tmp_path / "p.txt", "--greedy", "-n", 6, *extra)
        keys = ("total_new_tokens", "total_seconds", "total_tokens_per_s",
                "total_tokens_per_s_excluding_compile")
        assert len({tuple(r[k] for k in keys) for r in rows}) == 1  # one run: the same totals in every record
        total = rows[0]
        assert total["total_new_tokens"] == sum(len(r["new_tokens"]) for r in rows)
        assert total["total_seconds"] > 0
        rate = total["total_new_tokens"] / total["total_seconds"]
        assert total["total_tokens_per_s"] == pytest.approx(rate, rel=1e-3)
        # The totals cover the prefills and every decode step of the batch.
        assert total["total_seconds"] * 1e3 >= max(r["prefill_ms"] + r["decode_ms"] for r in rows)


def test_cli_generate_seed_and_stream(model_dir):
    a = gen_json(model_dir, "--prompt", "the model", "--seed", 5, "-n", 15, "--temperature", 1.2)
    b = gen_json(model_dir, "--prompt", "the model", "--seed", 5, "-n", 15, "--temperature", 1.2)
    assert a[0]["tokens"] == b[0]["tokens"]
    r = run_cli("generate", model_dir, "--prompt", "the model", "--seed", 5, "-n", 15, "--temperature", 1.2,
                "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert r.stdout.startswith("the model" + a[0]["text"])


def test_cli_generate_with_gcache_reports_fidelity(model_dir, tmp_path):
    g = tmp_path / "g.safetensors"
    assert run_cli("export-gcache", model_dir, "--out", g).exit_code == 0
    rows = gen_json(model_dir, "--prompt", "the metric", "--greedy", "-n", 6, "--gcache", g)
    fid = rows[0]["gcache_fidelity"]
    assert rows[0]["g_cache"] == "file" and fid["max_abs_logit_diff_last"] > 0
    assert 0.0 <= fid["argmax_agreement"] <= 1.0 and fid["positions"] == len(rows[0]["prompt_tokens"])
    r = run_cli("generate", model_dir, "--prompt", "the metric", "-n", 3, "--gcache", g, "--device", "cpu")
    assert r.exit_code == 0 and "max |logit diff|" in r.stderr


def test_cli_generate_errors(model_dir, tmp_path, spm_model):
    other = tmp_path / "other"
    assert run_cli("init", "--preset", "tiny", "--out", other, "--tokenizer", spm_model, "--seed", 9).exit_code == 0
    foreign = tmp_path / "foreign.safetensors"
    assert run_cli("export-gcache", other, "--out", foreign).exit_code == 0
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(foreign.read_bytes()[:300])
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a safetensors file\n")
    bare = tmp_path / "bare"
    assert run_cli("init", "--preset", "tiny", "--out", bare).exit_code == 0
    cases = [
        (["--gcache", foreign], "another model"),
        (["--gcache", trunc], "not a readable G-cache"),
        (["--gcache", junk], "not a readable G-cache"),
        (["--gcache", model_dir / "model.safetensors"], "not a pldr G-cache"),
        (["--gcache", tmp_path / "missing.safetensors"], "not found"),
        (["--gcache", foreign, "--no-g-cache"], "contradict"),
        (["-n", 0], "max-new-tokens"),
        (["--top-p", 0], "top-p"),
        (["-n", 5000], "context"),
    ]
    for extra, words in cases:
        r = run_cli("generate", model_dir, "--prompt", "the", *extra)
        assert r.exit_code == 2, (extra, r.output)
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("generate", bare, "--prompt", "the")
    assert r.exit_code == 2 and "tokenizer" in r.stderr
    assert run_cli("generate", bare, "--tokens", "3,5", "-n", 2, "--json").exit_code == 0
    # --force accepts a foreign G of the same shape
    assert gen_json(model_dir, "--prompt", "the", "-n", 2, "--gcache", foreign, "--force")[0]["g_cache"] == "file"


def test_cli_generate_compile_gives_the_same_tokens(model_dir, tmp_path):
    (tmp_path / "p.txt").write_text("the metric tensor\npower law\nthe model\nkeys and values\n")
    g = tmp_path / "g.safetensors"
    assert run_cli("export-gcache", model_dir, "--out", g).exit_code == 0
    for extra in ([], ["--gcache", g], ["--no-g-cache"], ["--seed", 3, "--temperature", 1.3]):
        if "--seed" not in extra:
            extra = extra + ["--greedy"]
        default = gen_json(model_dir, "--prompts-file", tmp_path / "p.txt", "-n", 10, *extra)
        eager = gen_json(model_dir, "--prompts-file", tmp_path / "p.txt", "-n", 10, "--no-compile", *extra)
        fast = gen_json(model_dir, "--prompts-file", tmp_path / "p.txt", "-n", 10, "--compile", *extra)
        assert [r["tokens"] for r in fast] == [r["tokens"] for r in eager] == [r["tokens"] for r in default]
        assert [r["text"] for r in fast] == [r["text"] for r in eager]
        assert [r["finish_reason"] for r in fast] == [r["finish_reason"] for r in eager]
        assert all(r["compile"] for r in fast) and not any(r["compile"] for r in eager + default)
    ignored = gen_json(model_dir, "--prompt", "the", "-n", 3, "--compile", "--no-kv-cache")
    assert ignored[0]["compile"] is False
    r = run_cli("generate", model_dir, "--prompt", "the model", "-n", 4, "--compile", "--device", "cpu")
    assert r.exit_code == 0 and "static engine" in r.stderr
    # --torch-compile compiles the step on CUDA only; elsewhere the same engine, the same tokens.
    compiled = gen_json(model_dir, "--prompts-file", tmp_path / "p.txt", "-n", 10, "--greedy", "--torch-compile")
    assert [r["tokens"] for r in compiled] == [r["tokens"] for r in gen_json(
        model_dir, "--prompts-file", tmp_path / "p.txt", "-n", 10, "--greedy", "--no-compile")]
