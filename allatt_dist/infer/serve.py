"""The Ray Serve deployment: one model behind HTTP JSON, requests batched dynamically.

Routes under the application's prefix: `POST generate` {prompt, max_new_tokens, temperature, top_k,
top_p, seed} -> {text, tokens, prompt, seed, batch}; `POST score` {text} -> {nll, perplexity, tokens,
batch}; `GET health` -> {status, model, params, heads_per_layer}. `batch` is how many requests the
reply was computed with in one forward pass. A bad request gets a 4xx and {"error": one line}: 400
malformed JSON or fields, 404 unknown route, 405 wrong method, 413 over the server's token limits.

`serve.batch` gathers concurrent requests (up to `max_batch_size`, waiting at most `batch_wait_s`);
scoring pads them into one batch, generation decodes the requests whose prompts have the same length
together (decode.py). The model runs in a worker thread, so the replica keeps answering (health, bad
requests) while it computes.
"""

from __future__ import annotations

import asyncio
import json
import math

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from allatt_dist.infer.args import Limits
from allatt_dist.infer.decode import Sampling, generate_batch, score_batch
from allatt_dist.infer.source import Pick, load
from allatt_dist.infer.text import has_words, prompt_ids, text_ids, words


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    prompt: str
    max_new_tokens: int = Field(20, ge=1)
    temperature: float = Field(1.0, ge=0.0, allow_inf_nan=False)
    top_k: int = Field(0, ge=0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0)


class ScoreBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    text: str


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _one_line(e: ValidationError) -> str:
    first = e.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "body"
    return f"{where}: {first['msg']}"


async def _body(request: Request, schema: type[BaseModel]) -> BaseModel:
    try:
        data = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise BadRequest(400, "body: not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest(400, "body: expected a JSON object")
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        raise BadRequest(400, _one_line(e)) from None


@serve.deployment
class LanguageModelServer:
    """One replica: the model of `source` + `pick` (a folder or a bucket; read by the replica itself)."""

    def __init__(self, source: str, pick: Pick, limits: Limits, device: str = "cpu"):
        self.got = load(source, pick, device)
        self.limits = limits
        self.generate_batched.set_max_batch_size(limits.max_batch_size)
        self.generate_batched.set_batch_wait_timeout_s(limits.batch_wait_s)
        self.score_batched.set_max_batch_size(limits.max_batch_size)
        self.score_batched.set_batch_wait_timeout_s(limits.batch_wait_s)

    async def __call__(self, request: Request) -> JSONResponse:
        prefix = request.scope.get("root_path", "")
        route = request.url.path[len(prefix) :].strip("/") if request.url.path.startswith(prefix) else None
        handlers = {"generate": ("POST", self.on_generate), "score": ("POST", self.on_score)}
        handlers["health"] = ("GET", self.on_health)
        try:
            if route not in handlers:
                raise BadRequest(404, f"{request.url.path}: no such route; use {prefix}/generate, /score or /health")
            method, handler = handlers[route]
            if request.method != method:
                raise BadRequest(405, f"{request.url.path}: use {method}")
            return JSONResponse(await handler(request))
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    async def on_health(self, request: Request) -> dict:
        meta = self.got.model
        return {"status": "ok", "model": self.got.name, "heads_per_layer": list(meta.heads_per_layer)}

    async def on_generate(self, request: Request) -> dict:
        body = await _body(request, GenerateBody)
        if not has_words(body.prompt):
            raise BadRequest(400, "prompt: empty; give some words to continue")
        if body.max_new_tokens > self.limits.max_new_tokens:
            raise BadRequest(
                413,
                f"max_new_tokens: {body.max_new_tokens} is over this server's limit of {self.limits.max_new_tokens}",
            )
        ids = prompt_ids(self.got.vocab, body.prompt)
        self._check_length(ids, "prompt")
        s = Sampling(body.max_new_tokens, body.temperature, body.top_k, body.top_p, body.seed)
        out, batch = await self.generate_batched((ids, s))
        return {
            "text": words(self.got.vocab, out.ids),
            "tokens": len(out.ids),
            "prompt": words(self.got.vocab, ids[1:]),
            "seed": out.seed,
            "batch": batch,
        }

    async def on_score(self, request: Request) -> dict:
        body = await _body(request, ScoreBody)
        if not has_words(body.text):
            raise BadRequest(400, "text: empty; give some words to score")
        ids = text_ids(self.got.vocab, body.text)
        self._check_length(ids, "text")
        (nll, n), batch = await self.score_batched(ids)
        return {"nll": nll / n, "perplexity": math.exp(nll / n), "tokens": n, "batch": batch}

    def _check_length(self, ids: list[int], field: str) -> None:
        if len(ids) - 1 > self.limits.max_tokens:
            raise BadRequest(
                413, f"{field}: {len(ids) - 1} tokens, over this server's limit of {self.limits.max_tokens}"
            )

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def generate_batched(self, jobs: list[tuple[list[int], Sampling]]) -> list:
        return await asyncio.to_thread(self._generate_now, jobs)

    def _generate_now(self, jobs: list[tuple[list[int], Sampling]]) -> list:
        groups: dict[int, list[int]] = {}
        for i, (ids, _) in enumerate(jobs):
            groups.setdefault(len(ids), []).append(i)
        out: list = [None] * len(jobs)
        for members in groups.values():  # same prompt length: decoded together
            res = generate_batch(self.got.model, [jobs[i][0] for i in members], [jobs[i][1] for i in members])
            for i, r in zip(members, res, strict=True):
                out[i] = (r, len(members))
        return out

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def score_batched(self, texts: list[list[int]]) -> list:
        scores = await asyncio.to_thread(score_batch, self.got.model, texts)
        return [(s, len(texts)) for s in scores]
