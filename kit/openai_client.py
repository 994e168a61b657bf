"""A client for OpenAI-compatible completion servers (vLLM's `make serve`, or any other), shaped like
the kit's decoder so stages/evaluate.py scores a served model exactly as it scores a checkpoint.

    ep = Endpoint("http://127.0.0.1:8000", api_key_env="VLLM_API_KEY")
    ep.complete(prompts_ids, max_new_tokens=64, eos_id=1, temperature=0.0)   # -> [kv_decoding.Rollout]
    ep.prompt_logprobs(ids)                                                 # -> log p(ids[i] | ids[:i])
    ep.chat([messages], mode="thinking", sampling=preset, seeds=[7])       # -> [{"text", "finish_reason"}]

Prompts travel as token ids (the kit's chat template already applied, so both modes' control tags
are exactly the kit's) and come back as token ids (`return_token_ids`, vLLM >= 0.10); a server
without that field gets its text re-encoded with the kit tokenizer. The API key is read from an
environment variable, never passed on a command line.

`chat` is the benchmark path (stages/eval_bench.py): the server applies its own chat template, so any
OpenAI-compatible model is scored the same way; the mode travels as chat_template_kwargs.enable_thinking
and skip_special_tokens=false keeps the think tags (special tokens) in the text, where the answer is
read after </think>.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import torch

from kit.kv_decoding import Rollout, request_seeds


class EndpointError(RuntimeError):
    pass


class Endpoint:
    def __init__(self, url: str, *, model: str | None = None, api_key_env: str = "VLLM_API_KEY",
                 timeout_s: float = 600.0, parallel: int = 8, tokenizer=None):
        self.url, self.timeout_s, self.parallel, self.tok = url.rstrip("/"), timeout_s, parallel, tokenizer
        if self.url.endswith("/v1"):
            self.url = self.url[:-3]
        self.key = os.environ.get(api_key_env) or None
        self.model = model or self._first_model()

    def _request(self, path: str, body: dict | None = None) -> dict:
        req = urllib.request.Request(self.url + path, data=None if body is None else json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json",
                                              **({"Authorization": f"Bearer {self.key}"} if self.key else {})})
        try:
            with urllib.request.urlopen(req, timeout=self.timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise EndpointError(f"{self.url}{path}: HTTP {e.code} {e.read()[:300]!r}") from e
        except urllib.error.URLError as e:
            raise EndpointError(f"{self.url}{path}: {e.reason} (is the server up? make serve)") from e

    def _first_model(self) -> str:
        models = self._request("/v1/models").get("data") or []
        if not models:
            raise EndpointError(f"{self.url}/v1/models: the server lists no model")
        return models[0]["id"]

    def _one(self, ids: list[int], max_new_tokens: int, eos_id: int, temperature: float, top_k: int,
             seed: int | None) -> Rollout:
        body = {"model": self.model, "prompt": ids, "max_tokens": max_new_tokens, "temperature": temperature,
                "skip_special_tokens": False, "return_token_ids": True}
        if temperature > 0:
            body.update(seed=seed, **({"top_k": top_k} if top_k > 0 else {}))
        choice = self._request("/v1/completions", body)["choices"][0]
        tokens = choice.get("token_ids")
        if tokens is None:  # a server without token ids: re-encode its text with the kit tokenizer
            if self.tok is None:
                raise EndpointError(f"{self.url}: the server returns no token_ids; pass the kit tokenizer")
            tokens = self.tok.encode(choice["text"], add_special_tokens=False)
            tokens += [eos_id] if choice.get("finish_reason") == "stop" else []
        tokens = list(tokens)[:max_new_tokens]
        return Rollout.of(tokens, eos_id)

    def complete(self, prompts: list[list[int]], *, max_new_tokens: int, eos_id: int, temperature: float = 0.0,
                 top_k: int = 0, generator: torch.Generator | None = None, **_) -> list[Rollout]:
        """kv_decoding.generate's contract: greedy at temperature 0, else seeded sampling per prompt."""
        seeds = request_seeds(len(prompts), generator)
        with ThreadPoolExecutor(self.parallel) as pool:
            return list(pool.map(lambda a: self._one(a[0], max_new_tokens, eos_id, temperature, top_k, a[1]),
                                 zip(prompts, seeds)))

    def chat_body(self, messages: list[dict], mode: str, sampling, seed: int) -> dict:
        """One /v1/chat/completions request in `mode` with the preset's sampling and its own seed."""
        return {"model": self.model, "messages": messages, "max_tokens": int(sampling.max_tokens),
                "temperature": float(sampling.temperature), "top_p": float(sampling.top_p),
                "top_k": int(sampling.top_k), "seed": int(seed), "skip_special_tokens": False,
                "chat_template_kwargs": {"enable_thinking": mode == "thinking"}}

    def chat(self, conversations: list[list[dict]], *, mode: str, sampling, seeds: list[int]) -> list[dict]:
        """The generated text (think tags kept) and finish reason of each conversation, in order."""
        def one(pair):
            choice = self._request("/v1/chat/completions", self.chat_body(pair[0], mode, sampling, pair[1]))["choices"][0]
            message = choice.get("message") or {}
            text = message.get("content") or ""
            if message.get("reasoning_content"):  # a server running a reasoning parser splits the trace off
                text = f"{message['reasoning_content']}</think>{text}"
            return {"text": text, "finish_reason": choice.get("finish_reason")}
        with ThreadPoolExecutor(self.parallel) as pool:
            return list(pool.map(one, zip(conversations, seeds)))

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        """log p(ids[i] | ids[:i]) for i >= 1 (the OpenAI `echo` + `logprobs` form)."""
        body = {"model": self.model, "prompt": ids, "max_tokens": 1, "temperature": 0.0, "echo": True, "logprobs": 0}
        lp = self._request("/v1/completions", body)["choices"][0]["logprobs"]["token_logprobs"]
        if len(lp) < len(ids) or any(v is None for v in lp[1:len(ids)]):
            raise EndpointError(f"{self.url}: the server returned no prompt log-probabilities (echo + logprobs)")
        return [float(v) for v in lp[1:len(ids)]]
