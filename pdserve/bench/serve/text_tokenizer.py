"""The tokenizer the bench counts prompt tokens with: a local one (`--tokenizer`) or the
server's own, reached through its POST /tokenize and /detokenize.

Both answer the same three questions: the token ids of a text, the text of token ids,
and how many ids the vocabulary has. Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import httpx

from common.model_files import ModelSource
from common.tokenizer import Tokenizer, load_tokenizer


class TextTokenizer(Protocol):
    name: str

    def encode(self, text: str, add_special_tokens: bool) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def vocab_size(self) -> int: ...


class LocalTokenizer:
    """pdserve's own tokenizer on a local folder, .gguf file or Hub id."""

    def __init__(self, path: str) -> None:
        source = ModelSource("hf_dir", Path(path), path)  # unused: the tokenizer path decides
        self.name = path
        self._tokenizer: Tokenizer = load_tokenizer(source, tokenizer_path=path)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids)

    def vocab_size(self) -> int:
        return self._tokenizer.vocab_size


class ServerTokenizer:
    """The served model's tokenizer, through the server's /tokenize and /detokenize."""

    def __init__(self, base_url: str, model: str, headers: dict[str, str] | None = None) -> None:
        self.name = f"{model} (the server's /tokenize)"
        self._model = model
        self._client = httpx.Client(base_url=base_url, headers=headers, timeout=60.0, trust_env=False)
        self._vocab_size: int | None = None

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        body = {"model": self._model, "prompt": text, "add_special_tokens": add_special_tokens}
        return self._post("/tokenize", body)["tokens"]

    def decode(self, ids: list[int]) -> str:
        return self._post("/detokenize", {"model": self._model, "tokens": ids})["prompt"]

    def vocab_size(self) -> int:
        """The first id /detokenize refuses, found by bisection (the API does not report it)."""
        if self._vocab_size is None:
            known_good, known_bad = 0, 1 << 24
            if not self._accepts(known_good) or self._accepts(known_bad):
                raise RuntimeError("could not find the vocabulary size through /detokenize; pass --tokenizer")
            while known_bad - known_good > 1:
                middle = (known_good + known_bad) // 2
                if self._accepts(middle):
                    known_good = middle
                else:
                    known_bad = middle
            self._vocab_size = known_bad
        return self._vocab_size

    def close(self) -> None:
        self._client.close()

    def _accepts(self, token_id: int) -> bool:
        response = self._client.post("/detokenize", json={"model": self._model, "tokens": [token_id]})
        return response.status_code == 200

    def _post(self, path: str, body: dict) -> dict:
        try:
            response = self._client.post(path, json=body)
        except httpx.HTTPError as exc:
            raise RuntimeError(
                f"could not reach the server's {path} ({type(exc).__name__}: {exc}); "
                "start the server, or pass --tokenizer to count tokens locally"
            ) from None
        if response.status_code != 200:
            raise RuntimeError(
                f"the server's {path} answered {response.status_code}: {response.text[:300]}; "
                "pass --tokenizer to count tokens locally"
            )
        return response.json()
