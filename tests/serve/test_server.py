"""`jaxft.serve` end to end: a server started on 127.0.0.1 (a free port, uvicorn in a thread of this process) over a
tiny random Llama with SmolLM2's tokenizer and two LoRA adapters, driven by the official `openai` client with
concurrent requests to different adapters. Each greedy reply equals jaxft's own single-adapter greedy decoding
(`peft.bind` + `greedy_generate`, no stack: peft parity of both paths is tested in tests/peft and tests/generate);
/metrics shows that rows on different adapters shared decode passes; bad requests get OpenAI-style errors while a
good request in flight is unharmed."""

from __future__ import annotations

import concurrent.futures
import json
import socket
import threading
import time

import jax
import numpy as np
import pytest

from jaxft import peft
from optional_import import installed

openai = pytest.importorskip("openai", reason="the server tests use the official openai client")
uvicorn = pytest.importorskip("uvicorn", reason="the server runs on uvicorn")
httpx = pytest.importorskip("httpx", reason="raw SSE is read with httpx (an openai dependency)")

import jaxft  # noqa: E402
from jaxft.generate import engine as engine_module  # noqa: E402
from jaxft.generate import greedy_generate  # noqa: E402
from jaxft.serve import ServeOptions, build, create_app  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not installed("torch"), reason="the tiny model is written by transformers "
                                                                          "(torch) with the tokenizer of the embedded GGUF")]

SPECS = {"sql": peft.LoraSpec(r=8, alpha=16, target_modules=("q_proj", "v_proj")),
         "poet": peft.LoraSpec(r=8, alpha=4, use_rslora=True, target_modules="all-linear"),
         "late": peft.LoraSpec(r=1, alpha=4, target_modules=("o_proj",)),
         "wide": peft.LoraSpec(r=32, alpha=32, target_modules=("q_proj",))}
NEW = 12  # new tokens per greedy request


def _random_adapter(spec, config, params, seed):
    shapes = jax.eval_shape(lambda: peft.init(spec, config, params, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda v: np.asarray(0.5 * rng.standard_normal(v.shape), v.dtype), shapes)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from hf_models import write_tiny_smollm_vocab_model

    root = tmp_path_factory.mktemp("serve")
    model = str(root / "model")
    write_tiny_smollm_vocab_model(model)
    with open(f"{model}/generation_config.json", "w") as f:  # the server's defaults: greedy, 5 tokens
        json.dump({"temperature": 0.0, "max_new_tokens": 5}, f)
    config, params = jaxft.load_pretrained(model)
    adapters = {}
    for i, (name, spec) in enumerate(SPECS.items()):
        tree = _random_adapter(spec, config, params, i)
        peft.save_adapter(spec, tree, str(root / name), config, base_model_name_or_path="tiny")
        adapters[name] = (spec, tree)
    state = build(ServeOptions(model, enable_lora=True, lora_modules={"sql": str(root / "sql"),
                                                                       "poet": str(root / "poet")},
                               max_loras=3, max_lora_rank=8, max_model_len=64, max_num_seqs=8,
                               served_model_name="tiny"))
    state.scheduler.start()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    base_url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", max_retries=0, timeout=120)
    yield dict(client=client, url=base_url, state=state, config=config, params=params, adapters=adapters, root=root)
    server.should_exit = True
    thread.join(timeout=10)
    state.scheduler.close()


def _reference(served, name, prompt_ids, new=NEW):
    config, params = served["config"], served["params"]
    if name not in (None, "tiny"):
        spec, tree = served["adapters"][name]
        params = peft.bind(params, spec, tree)
    eos = [served["state"].tokenizer.eos_token_id]
    toks = greedy_generate(config, params, [prompt_ids], max_new_tokens=new, eos_token_ids=eos)[0]
    return served["state"].tokenizer.decode(toks, skip_special_tokens=True)


def _ids(served, text):
    return served["state"].tokenizer(text, add_special_tokens=False)["input_ids"]


def _metrics(served) -> dict:
    text = httpx.get(served["url"] + "/metrics").text
    return {k: int(v) for k, v in (line.split() for line in text.strip().splitlines())}


class _Hold:
    """Holds the scheduler thread (a `call` that waits) until released: requests sent meanwhile queue up."""

    def __init__(self, sched, then=None):
        self.gate, self.then = threading.Event(), then
        self.future = sched.call(self._wait)

    def _wait(self):
        out = self.then() if self.then is not None else None
        assert self.gate.wait(60), "never released"
        return out

    def release(self):
        self.gate.set()
        return self.future.result(timeout=60)


def test_concurrent_requests_to_different_adapters_match_single_adapter_decoding(served):
    client = served["client"]
    prompts = {"sql": "select the rows", "poet": "the sea at night", "tiny": "hello there"}

    def complete(model, prompt):
        return client.completions.create(model=model, prompt=prompt, max_tokens=NEW, temperature=0)

    jobs = [("sql", prompts["sql"]), ("poet", prompts["poet"]), ("tiny", prompts["tiny"]),
            ("poet", prompts["sql"]), ("sql", prompts["poet"]), ("tiny", prompts["sql"])]
    before = _metrics(served)
    hold = _Hold(served["state"].scheduler)  # the six arrive together: one prefill pass (all prompts < 16 tokens)
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(complete, *j) for j in jobs]
        deadline = time.monotonic() + 60
        while _metrics(served)["jaxft_waiting_requests"] < len(jobs) and time.monotonic() < deadline:
            time.sleep(0.02)
        hold.release()
        results = [f.result() for f in futures]
    after = _metrics(served)
    assert after["jaxft_prefill_passes_total"] - before["jaxft_prefill_passes_total"] == 1, after
    assert after["jaxft_prefill_rows_total"] - before["jaxft_prefill_rows_total"] == len(jobs)
    assert after["jaxft_max_prefill_rows"] == len(jobs)
    for (model, prompt), r in zip(jobs, results):
        assert r.choices[0].text == _reference(served, model, _ids(served, prompt)), (model, prompt)
        assert r.usage.prompt_tokens == len(_ids(served, prompt)) and r.usage.completion_tokens == NEW
        assert r.choices[0].finish_reason == "length"
    # the adapters change the replies (else the comparison above could not tell them apart)
    assert len({_reference(served, m, _ids(served, prompts["sql"])) for m in ("sql", "poet", "tiny")}) == 3
    assert after["jaxft_multi_adapter_passes_total"] >= 1, after  # rows of different adapters, one pass
    assert after["jaxft_max_rows"] >= 2


def test_stop_strings_and_no_cache_reuse_across_adapters(served):
    """A stop string cuts the text before it, finish_reason "stop", usage counts the tokens through the one that
    completed it. The same prompt on another adapter right after (a freed slot holding that prompt's cache,
    computed with the first adapter) must not reuse that cache: its reply equals its own reference."""
    client, tok = served["client"], served["state"].tokenizer
    prompt = "the sea at night"
    first = client.completions.create(model="sql", prompt=prompt, max_tokens=NEW, temperature=0)
    assert first.choices[0].text == _reference(served, "sql", _ids(served, prompt))
    want = _reference(served, "poet", _ids(served, prompt))
    toks = greedy_generate(served["config"], peft.bind(served["params"], *served["adapters"]["poet"]),
                           [_ids(served, prompt)], max_new_tokens=NEW, eos_token_ids=[tok.eos_token_id])[0]
    stop, at = next((want[i:i + 3], i) for i in range(len(want) // 2, len(want) - 3) if want.find(want[i:i + 3]) == i)
    used = next(n for n in range(1, NEW + 1) if stop in tok.decode(toks[:n], skip_special_tokens=True))
    got = client.completions.create(model="poet", prompt=prompt, max_tokens=NEW, temperature=0, stop=[stop])
    assert got.choices[0].text == want[:at] and got.choices[0].finish_reason == "stop"
    assert got.usage.completion_tokens == used


def test_chat_stream_n_seed_logprobs_and_defaults(served):
    client = served["client"]
    msgs = [{"role": "user", "content": "Say something."}]
    prompt = served["state"].tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    want = _reference(served, "sql", _ids(served, prompt))
    full = client.chat.completions.create(model="sql", messages=msgs, max_tokens=NEW, temperature=0, logprobs=True,
                                          top_logprobs=3)
    assert full.choices[0].message.content == want
    lps = full.choices[0].logprobs.content
    assert len(lps) == NEW and all(len(t.top_logprobs) == 3 for t in lps)
    assert all(t.logprob == pytest.approx(t.top_logprobs[0].logprob, abs=1e-5) for t in lps)  # greedy: the top one
    chunks = list(client.chat.completions.create(model="sql", messages=msgs, max_tokens=NEW, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert chunks[-1].usage.completion_tokens == NEW
    raw = httpx.post(served["url"] + "/v1/completions", json={"model": "poet", "prompt": "abc", "max_tokens": 3,
                                                             "stream": True}, timeout=60).text
    assert raw.rstrip().endswith("data: [DONE]")
    # n and seed: two samples per request, the same two again with the same seed
    a = client.completions.create(model="poet", prompt="the", max_tokens=8, temperature=1.0, n=2, seed=7,
                                  extra_body={"min_p": 0.01, "top_k": 50})
    b = client.completions.create(model="poet", prompt="the", max_tokens=8, temperature=1.0, n=2, seed=7,
                                  extra_body={"min_p": 0.01, "top_k": 50})
    assert [c.text for c in a.choices] == [c.text for c in b.choices] and len(a.choices) == 2
    # defaults from generation_config.json: greedy, 5 tokens
    d = client.completions.create(model="tiny", prompt="hello there")
    assert d.usage.completion_tokens == 5 and d.choices[0].text == _reference(served, None, _ids(served, "hello there"), 5)
    assert {m.id for m in client.models.list().data} == {"tiny", "sql", "poet"}


def test_bad_requests_get_openai_errors_and_spare_other_rows(served):
    client = served["client"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        good = pool.submit(client.completions.create, model="sql", prompt="select the rows", max_tokens=NEW,
                           temperature=0)
        with pytest.raises(openai.NotFoundError, match="does not exist"):
            client.completions.create(model="nope", prompt="x", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 64"):
            client.completions.create(model="sql", prompt="word " * 80, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="temperature"):
            client.completions.create(model="sql", prompt="x", max_tokens=2, temperature=-1)
        with pytest.raises(openai.BadRequestError, match="prompt is empty"):
            client.completions.create(model="sql", prompt="", max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="max_tokens"):
            client.completions.create(model="sql", prompt="x", max_tokens=0)
        assert good.result().choices[0].text == _reference(served, "sql", _ids(served, "select the rows"))
    r = httpx.post(served["url"] + "/v1/load_lora_adapter",
                   json={"lora_name": "wide", "lora_path": str(served["root"] / "wide")})
    assert r.status_code == 400 and "exceeds the stack's max rank 8" in r.json()["error"]["message"]


def test_load_and_unload_adapters_without_recompiling(served):
    client, url = served["client"], served["url"]
    engine = served["state"].scheduler.engine
    want = _reference(served, "late", _ids(served, "warm"))  # (greedy_generate runs the same jitted engine code)
    client.completions.create(model="sql", prompt="warm", max_tokens=2, temperature=0)
    sizes = (engine_module._decode._cache_size(), engine_module._prefill._cache_size())
    r = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(served["root"] / "late")})
    assert r.status_code == 200, r.text
    got = client.completions.create(model="late", prompt="warm", max_tokens=NEW, temperature=0)
    assert got.choices[0].text == want
    assert (engine_module._decode._cache_size(), engine_module._prefill._cache_size()) == sizes  # no recompile
    assert httpx.post(url + "/v1/unload_lora_adapter", json={"lora_name": "late"}).status_code == 200
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="late", prompt="warm", max_tokens=2)
    assert engine is served["state"].scheduler.engine


def test_unload_drains_accepted_requests_then_frees_the_slot(served):
    """An adapter unloaded while a request for it waits: the request still finishes on that adapter (its reply is
    its own reference), new requests for the name are refused at once, and the stack slot is freed only when the
    request is done (then the name can be loaded again)."""
    client, url, sched = served["client"], served["url"], served["state"].scheduler
    path = str(served["root"] / "late")
    if "late" not in sched.served():  # (an earlier test may have unloaded it)
        assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path}).status_code == 200
    want = _reference(served, "late", _ids(served, "warm"))
    seen = {}
    hold = _Hold(sched)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        reply = pool.submit(client.completions.create, model="late", prompt="warm", max_tokens=NEW, temperature=0)
        deadline = time.monotonic() + 60
        while sched.waiting() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        unloaded = pool.submit(httpx.post, url + "/v1/unload_lora_adapter", json={"lora_name": "late"}, timeout=60)
        while sched._calls.qsize() < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        # runs in the scheduler thread right after the unload, before the request is admitted
        during = _Hold(sched, then=lambda: seen.update(served=sched.served(), names=list(sched.stack.names)))
        hold.release()
        assert unloaded.result().status_code == 200
        deadline = time.monotonic() + 60
        while not seen and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "late" not in seen["served"] and "late" in seen["names"], seen  # out of service, slot still held
        with pytest.raises(openai.NotFoundError):
            client.completions.create(model="late", prompt="warm", max_tokens=2)
        during.release()
        got = reply.result()
    assert got.choices[0].text == want and got.usage.completion_tokens == NEW
    assert "late" not in sched.stack.names  # freed once its last request finished
    assert httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": path}).status_code == 200
    assert client.completions.create(model="late", prompt="warm", max_tokens=NEW, temperature=0).choices[0].text == want


@pytest.mark.parametrize("extra, field", [({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
                                          ({"min_p": -0.1}, "min_p"), ({"min_p": 2}, "min_p"),
                                          ({"top_k": -2}, "top_k"), ({"n": 0}, "n"), ({"n": 17}, "n"),
                                          ({"temperature": "hot"}, "temperature"), ({"seed": 1.5}, "seed"),
                                          ({"logprobs": 99}, "logprobs")])
def test_sampling_parameters_out_of_range_get_a_400_naming_the_field(served, extra, field):
    r = httpx.post(served["url"] + "/v1/completions", json={"model": "sql", "prompt": "x", "max_tokens": 2, **extra},
                   timeout=60)
    assert r.status_code == 400, (extra, r.text)
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and field in err["message"], err
