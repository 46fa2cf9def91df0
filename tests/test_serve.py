"""pldr serve: the real server on a loopback port, driven by the real openai client and httpx."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import REPO
from typer.testing import CliRunner

from pldr_cli.app import app as cli_app
from pldr_core.build import build_model
from pldr_core.checkpoint import save_model
from pldr_core.config import preset
from pldr_core.serve import load_scheduler
from pldr_core.tokenizer import Tokenizer

create_app = pytest.importorskip("pldr_core.serve.server").create_app  # needs fastapi (the serve extra)
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

runner = CliRunner()
MODEL_ID = "tiny-test"
LONG = "of the cache"  # its greedy continuation runs past 300 tokens before EOS (this model, seed 4)
WORDS = "the metric tensor of power law graph attention learns a curvature from every prompt".split()


def run_cli(*args):
    return runner.invoke(cli_app, list(map(str, args)))


def generate_alone(model_dir, prompt: str, n: int, *extra, sampling=("--greedy",)) -> dict:
    """What `pldr generate --greedy` (or with ``sampling`` options) gives for ``prompt`` alone."""
    r = run_cli("generate", model_dir, "--prompt", prompt, *sampling, "-n", n, "--json", "--device", "cpu",
                *extra)
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout.splitlines()[0])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, spm_model):
    d = tmp_path_factory.mktemp("serve") / "m"
    vocab = Tokenizer(spm_model).vocab_size
    save_model(build_model(preset("tiny", vocab_size=vocab, max_seq_len=512), seed=4), d, tokenizer=spm_model)
    return d


class Server:
    """``pldr serve``'s app under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, model_dir, *, max_batch=4, max_new_tokens=400, api_key=None, gcache=None,
                 engine="eager"):
        scheduler, tok, net = load_scheduler(model_dir, max_batch=max_batch, gcache=gcache, device="cpu",
                                             engine=engine)
        self.scheduler = scheduler
        app = create_app(scheduler, model_id=MODEL_ID, tokenizer=tok, vocab_size=net.config.vocab_size,
                         max_new_tokens=max_new_tokens, api_key=api_key)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key or "none", max_retries=0,
                                    timeout=60)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()
        assert not self.thread.is_alive() and not self.scheduler.alive

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics").text
        return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.fixture(scope="module", params=["eager", "static"])
def server(model_dir, request):
    """The server on each decode step: the eager model's, and the static-cache engine's (uncompiled
    on CPU; compiled with a CUDA graph on a GPU)."""
    s = Server(model_dir, engine=request.param)
    assert s.scheduler.step.name == request.param
    yield s
    s.close()


def complete(server, prompt, n, **kw):
    return server.client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=n, temperature=0, **kw)


def streamed(server, prompt, n, **kw):
    text, ids, finish, pldr = "", [], None, None
    for chunk in complete(server, prompt, n, stream=True, **kw):
        text += chunk.choices[0].text
        ids += chunk.choices[0].model_extra["token_ids"]
        finish = chunk.choices[0].finish_reason or finish
        pldr = chunk.model_extra["pldr"]
    return text, ids, finish, pldr


def test_greedy_equals_pldr_generate_streamed_and_not(server, model_dir):
    for prompt, n in (("the metric tensor", 12), ("power law", 5), ("", 7)):
        want = generate_alone(model_dir, prompt, n)
        got = complete(server, prompt, n)
        choice = got.choices[0]
        choice_ids = choice.model_extra["token_ids"]
        assert choice_ids == want["new_tokens"] and choice.text == want["text"]
        assert choice.finish_reason == ("stop" if want["finish_reason"] == "eos" else "length")
        assert got.usage.prompt_tokens == len(want["prompt_tokens"])
        assert got.usage.completion_tokens == len(want["new_tokens"])
        step = server.scheduler.step.name
        assert got.model_extra["pldr"] == {"g_source": "prefill", "step": step}
        text, ids, finish, pldr = streamed(server, prompt, n)
        assert (text, ids, finish) == (choice.text, choice_ids, choice.finish_reason)
        assert pldr == {"g_source": "prefill", "step": step}


def test_sixteen_concurrent_clients_get_what_they_get_alone(server, model_dir):
    jobs = [(" ".join(WORDS[i % 5:i % 5 + 1 + i % 7]), 3 + (5 * i) % 17, i % 2 == 0) for i in range(16)]
    want = [generate_alone(model_dir, p, n) for p, n, _ in jobs]

    def one(job):
        prompt, n, stream = job
        if stream:
            text, ids, _, _ = streamed(server, prompt, n)
            return text, ids
        c = complete(server, prompt, n).choices[0]
        return c.text, c.model_extra["token_ids"]

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(one, jobs))
    for (text, ids), w in zip(got, want):
        assert ids == w["new_tokens"] and text == w["text"]
    assert server.metric("pldr_active_rows") == 0 and server.metric("pldr_queue_length") == 0


def test_greedy_sampled_and_logprob_requests_together_get_what_they_get_alone(server, model_dir):
    # Greedy rows alone run several steps a launch (static engine); a sampled or logprobs request
    # among them turns the batch back to single steps and then, once it is done, to chunks again.
    chunks = server.metric("pldr_decode_chunks_total")
    greedy = [(" ".join(WORDS[i:i + 3]), 20 + 7 * i) for i in range(5)]
    want = [generate_alone(model_dir, p, n)["new_tokens"] for p, n in greedy]
    sampled = generate_alone(model_dir, "the", 8, sampling=("--seed", 5, "--temperature", 1.1))

    def one(i):
        time.sleep(0.05 * i)
        if i == 5:
            c = server.client.completions.create(model=MODEL_ID, prompt="the", max_tokens=8, seed=5,
                                                 temperature=1.1, extra_body={"top_k": 50}).choices[0]
        elif i == 6:
            c = complete(server, greedy[0][0], 6, logprobs=1).choices[0]
            assert len(c.logprobs.token_logprobs) == len(c.model_extra["token_ids"])
        else:
            c = complete(server, *greedy[i]).choices[0]
        return c.model_extra["token_ids"]

    with ThreadPoolExecutor(7) as pool:
        got = list(pool.map(one, range(7)))
    assert got[:5] == want and got[5] == sampled["new_tokens"] and got[6] == want[0][:6]
    if server.scheduler.step.chunk:
        assert server.metric("pldr_decode_chunks_total") > chunks
    else:
        assert server.metric("pldr_decode_chunks_total") == chunks == 0


def test_short_request_after_a_long_one_finishes_first(server, model_dir):
    long_prompt, short_prompt = LONG, "power law"
    assert generate_alone(model_dir, long_prompt, 300)["finish_reason"] == "length"
    order = []
    first_chunk = threading.Event()

    def long_request():
        for chunk in complete(server, long_prompt, 300, stream=True):
            first_chunk.set()
            if chunk.choices[0].finish_reason:
                order.append("long")

    t = threading.Thread(target=long_request)
    t.start()
    assert first_chunk.wait(30)
    assert complete(server, short_prompt, 3).choices[0].model_extra["token_ids"]
    order.append("short")
    t.join(60)
    assert order == ["short", "long"]


def test_sampling_seed_stop_and_logprobs(server, model_dir):
    want = generate_alone(model_dir, "the metric", 10)
    text = want["text"]
    stop = text[3:6]
    got = complete(server, "the metric", 10, stop=[stop]).choices[0]
    assert got.finish_reason == "stop" and got.text == text[:text.index(stop)] and stop not in got.text
    text_s, _, finish_s, _ = streamed(server, "the metric", 10, stop=stop)
    assert (text_s, finish_s) == (got.text, "stop")
    lp = complete(server, "the metric", 4, logprobs=2).choices[0].logprobs
    assert len(lp.token_logprobs) == len(lp.tokens) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 2 and max(top.values()) >= v for top, v in zip(lp.top_logprobs, lp.token_logprobs))

    def sample(seed):
        c = server.client.completions.create(model=MODEL_ID, prompt="the", max_tokens=8, seed=seed,
                                             temperature=1.3, extra_body={"top_k": 50}).choices[0]
        return c.text, c.model_extra["token_ids"]
    alone = generate_alone(model_dir, "the", 8, sampling=("--seed", 11, "--temperature", 1.3, "--top-k", 50))
    assert sample(11) == sample(11) == (alone["text"], alone["new_tokens"])
    assert sample(12) != sample(11)
    both = complete(server, ["power law", "the metric tensor"], 6)
    assert [c.index for c in both.choices] == [0, 1]
    assert both.choices[1].model_extra["token_ids"] == generate_alone(model_dir, "the metric tensor", 6)["new_tokens"]


def test_bad_requests_answer_openai_errors_and_the_server_keeps_serving(server):
    url = f"{server.url}/v1/completions"
    good = {"model": MODEL_ID, "prompt": "the", "max_tokens": 3, "temperature": 0}
    cases = [
        ({**good, "max_tokens": "ten"}, 400, "max_tokens"),
        ({**good, "temperature": "hot"}, 400, "temperature"),
        ({**good, "max_tokens": 401}, 400, "max_tokens"),
        ({**good, "prompt": "the " * 600}, 400, "prompt"),
        ({**good, "prompt": [5] * 300, "max_tokens": 300}, 400, "max_tokens"),
        ({**good, "temperature": -0.5}, 400, "temperature"),
        ({**good, "prompt": []}, 400, "prompt"),
        ({**good, "echo": True}, 400, "echo"),
        ({**good, "unknown": 1}, 400, "unknown"),
        ({**good, "model": "other"}, 404, "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, json=body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["param"] == param and err["message"]
        assert complete(server, "the", 3).choices[0].model_extra["token_ids"]
    r = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert [m.id for m in server.client.models.list().data] == [MODEL_ID]
    assert server.metric("pldr_request_errors_total") >= len(cases)


def test_client_gone_mid_stream_frees_its_row(server):
    before = server.metric("pldr_completions_cancelled_total")
    body = {"model": MODEL_ID, "prompt": LONG, "max_tokens": 300, "temperature": 0,
            "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    deadline = time.monotonic() + 30
    while server.metric("pldr_completions_cancelled_total") == before:
        assert time.monotonic() < deadline, "the row was not freed"
        time.sleep(0.05)
    assert server.metric("pldr_active_rows") == 0
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("pldr_requests_total", "pldr_tokens_generated_total", "pldr_queue_length",
                 "pldr_tokens_per_second"):
        assert f"# TYPE {name} " in metrics


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_gcache_file_api_key_and_load_script(model_dir, tmp_path, engine):
    g = tmp_path / "g.safetensors"
    assert run_cli("export-gcache", model_dir, "--out", g).exit_code == 0
    s = Server(model_dir, gcache=g, api_key="sesame", max_batch=2, engine=engine)
    try:
        want = generate_alone(model_dir, "the metric tensor", 9, "--gcache", g)
        got = complete(s, "the metric tensor", 9)
        assert got.choices[0].model_extra["token_ids"] == want["new_tokens"]
        assert got.model_extra["pldr"] == {"g_source": "file", "step": engine}
        body = {"model": MODEL_ID, "prompt": "the", "max_tokens": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            r = httpx.post(f"{s.url}/v1/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{s.url}/v1/models").status_code == 401
        out = subprocess.run([sys.executable, str(REPO / "examples" / "serve_load.py"), "--url", s.url,
                              "--api-key", "sesame", "--clients", "3", "--duration", "1", "--max-tokens", "4",
                              "--processes", "2" if engine == "static" else "1"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["requests"] > 0 and report["errors"] == 0 and report["tokens"] > 0
        assert report["processes"] == (2 if engine == "static" else 1)
        for key in ("requests_per_s", "tokens_per_s", "latency_ms", "ttft_ms"):
            assert key in report
        assert report["ttft_ms"]["p50"] <= report["latency_ms"]["p99"]
    finally:
        s.close()


def test_cli_serve_refuses_bad_options(model_dir):
    r = run_cli("serve", model_dir, "--max-batch", 0)
    assert r.exit_code == 2 and "--max-batch" in r.output
    r = run_cli("serve", model_dir, "--max-new-tokens", 5000)
    assert r.exit_code == 2 and "--max-new-tokens" in r.output
    r = run_cli("serve", model_dir, "--engine", "turbo")
    assert r.exit_code == 2 and "--engine" in r.output
    r = run_cli("serve", model_dir, "--max-len", 1)
    assert r.exit_code == 2 and "--max-len" in r.output
    r = run_cli("serve", model_dir, "--chunk-steps", -1)
    assert r.exit_code == 2 and "--chunk-steps" in r.output
    r = run_cli("serve", model_dir, "--stream-interval", -1)
    assert r.exit_code == 2 and "--stream-interval" in r.output
    assert run_cli("serve", "--help").exit_code == 0


def test_a_failed_chunk_fails_its_rows_and_the_next_request_is_served(model_dir):
    # The scheduler on its own (no HTTP): a launch that raises ends the requests it carried with an
    # error event; the next request decodes as it would alone.
    from queue import Queue

    from pldr_core.prompts import encode_prompt
    from pldr_core.sampling import Sampler
    from pldr_core.serve.scheduler import Job

    scheduler, tok, _ = load_scheduler(model_dir, max_batch=2, device="cpu", engine="static")
    launch, calls = scheduler.step.launch, []

    def fails_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return launch()

    scheduler.step.launch = fails_once

    def run(prompt, n):
        events = Queue()
        scheduler.submit(Job(prompt=encode_prompt(tok, prompt), max_tokens=n, sampler=Sampler(greedy=True),
                             emit=events.put))
        out = [events.get(timeout=60)]
        while out[-1].finish_reason is None and out[-1].error is None:
            out.append(events.get(timeout=60))
        return out

    scheduler.start()
    try:
        failed = run("the metric tensor", 30)
        assert failed[-1].error == "RuntimeError: device lost"
        got = run("power law", 12)
    finally:
        scheduler.stop()
    assert got[-1].error is None and len(got) > 1  # the first token, then chunks
    assert [t for e in got for t in e.token_ids] == generate_alone(model_dir, "power law", 12)["new_tokens"]
    assert scheduler.counts["failed"] == 1 and scheduler.counts["finished"] == 1


def test_host_bench_hands_out_every_token_of_every_request(spm_model):
    for chunk in ("8", "0"):
        out = subprocess.run([sys.executable, str(REPO / "examples" / "serve_host_bench.py"), str(spm_model),
                              "--chunk", chunk, "--batch", "4", "--requests", "10", "--max-tokens", "9"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        report = json.loads(out.stdout)
        assert report["requests"] == 10 and report["tokens"] == 90 and report["tokens_per_s"] > 0
