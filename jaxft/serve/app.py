"""The OpenAI-compatible HTTP API (FastAPI) over the scheduler: /v1/completions, /v1/chat/completions, /v1/models,
/v1/load_lora_adapter, /v1/unload_lora_adapter (vLLM's adapter endpoints), /metrics, /health.

A request names the base model or a loaded adapter in `model` (vLLM's convention). Every parameter is checked
before anything is queued; a bad request gets OpenAI's error JSON (`{"error": {"message", "type", "param",
"code"}}`) with status 400 (bad parameters, prompt beyond the cache, empty prompt, rank above the stack's) or 404
(unknown model or adapter) and never reaches the engine, so it cannot disturb the rows being generated.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from jaxft import peft
from jaxft.errors import ConfigError, JaxftError
from jaxft.generate.sampling import SamplingParams
from jaxft.generate.stops import StopScanner
from jaxft.generate.text import render_chat
from jaxft.serve.scheduler import Job, Scheduler


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type and the offending parameter."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        kind = {400: "invalid_request_error", 404: "not_found_error"}.get(self.status, "server_error")
        return JSONResponse({"error": {"message": self.message, "type": kind, "param": self.param,
                                       "code": self.status}}, status_code=self.status)


@dataclasses.dataclass
class ServeState:
    """What the routes read: the scheduler, the tokenizer, the base model's served name, the engine's cache length
    and logprob capacity, and the sampling defaults (from the model's generation_config.json)."""

    scheduler: Scheduler
    tokenizer: Any
    config: Any
    model_name: str
    max_model_len: int
    max_logprobs: int
    defaults: dict
    created: int = dataclasses.field(default_factory=lambda: int(time.time()))


def _number(body: dict, key: str, default, kind=float, lo=None, hi=None):
    v = body.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ApiError(400, f"{key}={v!r} must be {'an integer' if kind is int else 'a number'}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ApiError(400, f"{key}={v!r} must be in [{lo}, {hi if hi is not None else 'inf'}]", key)
    return kind(v)


def _adapter_of(state: ServeState, body: dict) -> str | None:
    name = body.get("model")
    if name in (None, state.model_name):
        return None
    served = state.scheduler.served()
    if not isinstance(name, str) or name not in served:
        models = ", ".join([state.model_name] + served)
        raise ApiError(404, f"The model `{name}` does not exist (served: {models}).", "model")
    return name


def _sampling(state: ServeState, body: dict) -> tuple[SamplingParams, int, list[str], int]:
    d = state.defaults
    temperature = _number(body, "temperature", d.get("temperature", 1.0), float, 0, 2)
    top_p = _number(body, "top_p", d.get("top_p", 1.0), float, 0, 1)
    if top_p == 0:
        raise ApiError(400, "top_p=0 must be in (0, 1]", "top_p")
    top_k = _number(body, "top_k", d.get("top_k", 0), int, -1)
    min_p = _number(body, "min_p", d.get("min_p", 0.0), float, 0, 1)
    seed = _number(body, "seed", None, int)
    n = _number(body, "n", 1, int, 1, 16)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop) or len(stop) > 4:
        raise ApiError(400, "stop must be a string or a list of at most 4 strings", "stop")
    for key in ("presence_penalty", "frequency_penalty"):
        if body.get(key) not in (None, 0, 0.0):
            raise ApiError(400, f"{key} is not supported by jaxft's server; leave it at 0", key)
    try:
        sp = SamplingParams(temperature=temperature, top_k=max(top_k, 0), top_p=top_p, min_p=min_p, seed=seed)
    except ConfigError as e:
        raise ApiError(400, str(e)) from None
    return sp, n, stop, max(top_k, 0)


def _max_tokens(state: ServeState, body: dict, prompt_len: int) -> int:
    if prompt_len == 0:
        raise ApiError(400, "the prompt is empty; give at least one token", "prompt")
    room = state.max_model_len - prompt_len + 1
    if room < 1:
        raise ApiError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                            f"requested {prompt_len} tokens in the prompt; shorten it", "prompt")
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    mt = _number(body, key, None, int, 1)
    if mt is None:
        return min(room, state.defaults.get("max_tokens", 256))
    if mt > room:
        raise ApiError(400, f"This model's maximum context length is {state.max_model_len} tokens. However, you "
                            f"requested {prompt_len + mt} tokens ({prompt_len} in the prompt, {mt} for the "
                            f"completion); reduce max_tokens or the prompt", key)
    return mt


def _token_str(tokenizer, tid: int) -> str:
    return tokenizer.decode([tid])


def _chat_logprobs(tokenizer, job: Job, start: int, end: int, k: int) -> dict:
    content = []
    out = job.out
    logprobs, top_logprobs = out.logprobs or [], out.top_logprobs or []
    for i in range(start, end):
        tok = _token_str(tokenizer, out.tokens[i])
        entry = {"token": tok, "logprob": logprobs[i], "bytes": list(tok.encode()), "top_logprobs": []}
        if k and i < len(top_logprobs):
            entry["top_logprobs"] = [{"token": (t := _token_str(tokenizer, tid)), "logprob": lp,
                                      "bytes": list(t.encode())} for tid, lp in top_logprobs[i][:k]]
        content.append(entry)
    return {"content": content}


def _completion_logprobs(tokenizer, job: Job, start: int, end: int, k: int, offset: int) -> dict:
    out = job.out
    tokens = [_token_str(tokenizer, t) for t in out.tokens[start:end]]
    offsets, pos = [], offset
    for t in tokens:
        offsets.append(pos)
        pos += len(t)
    top_logprobs = out.top_logprobs or []
    top = [{_token_str(tokenizer, tid): lp for tid, lp in top_logprobs[i][:k]} if k and i < len(top_logprobs)
           else None for i in range(start, end)]
    return {"tokens": tokens, "token_logprobs": (out.logprobs or [])[start:end], "top_logprobs": top,
            "text_offset": offsets}


def create_app(state: ServeState) -> FastAPI:
    """The FastAPI application for `state` (its scheduler must be started by the caller)."""
    app = FastAPI(title="jaxft OpenAI-compatible server")
    sched = state.scheduler

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        return e.response()

    async def _body(request: Request) -> dict:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    @app.get("/health")
    async def health():
        return PlainTextResponse("")

    @app.get("/v1/models")
    async def models():
        data = [{"id": state.model_name, "object": "model", "created": state.created, "owned_by": "jaxft",
                 "root": state.model_name, "parent": None, "max_model_len": state.max_model_len}]
        data += [{"id": n, "object": "model", "created": state.created, "owned_by": "jaxft", "root": n,
                  "parent": state.model_name} for n in sched.served()]
        return {"object": "list", "data": data}

    @app.get("/metrics")
    async def metrics():
        m = dataclasses.asdict(sched.metrics)
        lines = [f"jaxft_{k}{'' if k.startswith('max_') else '_total'} {v}" for k, v in m.items()]
        lines.append(f"jaxft_loaded_adapters {len(sched.served())}")
        lines.append(f"jaxft_waiting_requests {sched.waiting()}")
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        body = await _body(request)
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not name or not isinstance(path, str) or not path:
            raise ApiError(400, "give lora_name and lora_path (strings)", "lora_name")
        if name == state.model_name:
            raise ApiError(400, f"'{name}' is the base model's name; choose another lora_name", "lora_name")
        try:
            spec, tree = await asyncio.to_thread(peft.load_adapter, path, state.config)
            await asyncio.wrap_future(sched.call(lambda: sched.load(name, spec, tree)))
        except JaxftError as e:
            raise ApiError(400, str(e), "lora_path") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        body = await _body(request)
        name = body.get("lora_name")
        if name not in sched.served():
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "lora_name")
        try:  # requests already accepted finish on it; new ones are refused from now on
            await asyncio.wrap_future(sched.call(lambda: sched.unload(name)))
        except JaxftError as e:
            raise ApiError(400, str(e), "lora_name") from None
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")

    async def _generate(body: dict, chat: bool):
        adapter = _adapter_of(state, body)
        sp, n, stop, _ = _sampling(state, body)
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and isinstance(m.get("role"), str)
                    for m in msgs):
                raise ApiError(400, "messages must be a non-empty list of {role, content} objects", "messages")
            try:
                prompt = render_chat(state.tokenizer, msgs)
            except JaxftError as e:
                raise ApiError(400, str(e), "messages") from None
            want_lp = bool(body.get("logprobs"))
            k = _number(body, "top_logprobs", 0, int, 0, state.max_logprobs) if want_lp else 0
            if body.get("top_logprobs") and not want_lp:
                raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        else:
            p = body.get("prompt")
            if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
                p = p[0]
            if isinstance(p, str):
                prompt = state.tokenizer(p, add_special_tokens=False)["input_ids"] if p else []
            elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
                prompt = list(p)
                if any(t < 0 or t >= state.config.vocab_size for t in prompt):
                    raise ApiError(400, f"prompt token ids must be in [0, {state.config.vocab_size})", "prompt")
            else:
                raise ApiError(400, "prompt must be a string, or a list of token ids (one prompt per request)",
                               "prompt")
            lp = body.get("logprobs")
            want_lp = lp is not None
            k = _number(body, "logprobs", 0, int, 0, state.max_logprobs) if want_lp else 0
            if body.get("echo"):
                raise ApiError(400, "echo is not supported by jaxft's server", "echo")
        max_tokens = _max_tokens(state, body, len(prompt))
        stream = bool(body.get("stream", False))
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        out: asyncio.Queue = asyncio.Queue()

        def on_event(job, delta, event, error):
            loop.call_soon_threadsafe(out.put_nowait, (job, delta, error))

        jobs = []
        for i in range(n):
            seeded = sp if sp.seed is None else dataclasses.replace(sp, seed=sp.seed + i)
            jobs.append(Job(list(prompt), seeded, max_tokens, adapter, StopScanner(state.tokenizer, stop), on_event))
        for j in jobs:
            sched.submit(j)
        index = {id(j): i for i, j in enumerate(jobs)}
        meta = dict(id=rid, created=int(time.time()), model=body.get("model") or state.model_name)
        obj = "chat.completion" if chat else "text_completion"

        def usage():
            done = sum(len(j.out.tokens) for j in jobs)
            return {"prompt_tokens": len(prompt), "completion_tokens": done, "total_tokens": len(prompt) + done}

        if not stream:
            pending = n
            while pending:
                job, _, error = await out.get()
                if error is not None:
                    for j in jobs:
                        j.cancelled = True
                    raise ApiError(400, str(error))
                if job.out.finish is not None:
                    pending -= 1
            choices = []
            for i, j in enumerate(jobs):
                o = j.out
                if chat:
                    c = {"index": i, "message": {"role": "assistant", "content": o.text},
                         "logprobs": _chat_logprobs(state.tokenizer, j, 0, len(o.tokens), k) if want_lp else None,
                         "finish_reason": o.finish}
                else:
                    c = {"index": i, "text": o.text, "finish_reason": o.finish,
                         "logprobs": _completion_logprobs(state.tokenizer, j, 0, len(o.tokens), k, 0)
                         if want_lp else None}
                choices.append(c)
            return {**meta, "object": obj, "choices": choices, "usage": usage()}

        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events():
            obj_chunk = "chat.completion.chunk" if chat else "text_completion"
            marks = {id(j): 0 for j in jobs}
            if chat:
                for i in range(n):
                    yield _sse({**meta, "object": obj_chunk, "choices": [
                        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None}]})
            pending = n
            try:
                while pending:
                    job, delta, error = await out.get()
                    i = index[id(job)]
                    if error is not None:
                        yield _sse({"error": {"message": str(error), "type": "invalid_request_error",
                                              "param": None, "code": 400}})
                        pending -= 1
                        continue
                    o = job.out
                    start, end = marks[id(job)], len(o.tokens)
                    marks[id(job)] = end
                    lp = None
                    if want_lp and end > start:
                        lp = (_chat_logprobs(state.tokenizer, job, start, end, k) if chat else
                              _completion_logprobs(state.tokenizer, job, start, end, k, o.sent - len(delta)))
                    if o.finish is not None:
                        pending -= 1
                    if not delta and o.finish is None and lp is None:
                        continue
                    choice = ({"index": i, "delta": {"content": delta} if delta else {}, "logprobs": lp,
                               "finish_reason": o.finish} if chat else
                              {"index": i, "text": delta, "logprobs": lp, "finish_reason": o.finish})
                    yield _sse({**meta, "object": obj_chunk, "choices": [choice]})
                if include_usage:
                    yield _sse({**meta, "object": obj_chunk, "choices": [], "usage": usage()})
                yield "data: [DONE]\n\n"
            finally:
                for j in jobs:  # a client that went away frees its rows
                    j.cancelled = j.out.finish is None

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(await _body(request), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(await _body(request), chat=True)

    return app


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"

