"""The HTTP service's wire format and settings: `ServiceConfig`, the admin token, the request and
answer bodies (pydantic, so /docs shows them) and `ApiError`, the JSON error every failure becomes."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

TOKEN_ENV = "PEFTKIT_ADMIN_TOKEN"


@dataclass
class ServiceConfig:
    """The service's limits and settings (each has a command-line option of the same name)."""

    max_texts: int = 64          # texts per request; more: 413
    max_chars: int = 2000        # characters per text; more: 413 (the model reads 128 tokens anyway)
    batch_wait_ms: float = 5.0   # how long the first request of a batch waits for company
    max_batch: int = 64          # texts per forward; a batch closes early when it is full
    admin_token: str | None = None  # bearer token for POST/DELETE /adapters; None: read-only
    monitor_window: int = 200    # each adapter's Monitor window
    feedback_texts: int = 20_000  # texts of recent requests kept for /feedback (oldest dropped)
    drain_seconds: int = 30      # SIGTERM: longest wait for in-flight requests

    def __post_init__(self):
        for name in ("max_texts", "max_chars", "max_batch", "monitor_window", "feedback_texts", "drain_seconds"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}.")
        if not (isinstance(self.batch_wait_ms, (int, float)) and 0 <= self.batch_wait_ms <= 10_000):
            raise ValueError(f"batch_wait_ms must be between 0 and 10000 (a few ms is usual), got {self.batch_wait_ms!r}.")
        if self.admin_token is not None and not self.admin_token.strip():
            raise ValueError("the admin token is empty; set a non-empty PEFTKIT_ADMIN_TOKEN or token file.")

    @property
    def max_body_bytes(self) -> int:
        """The largest request body read: every text at its limit, 4 bytes a character, plus room."""
        return self.max_texts * (4 * self.max_chars + 256) + 65536


def read_token(token_file=None) -> str | None:
    """The admin token: from `token_file` if given, else PEFTKIT_ADMIN_TOKEN, else None (read-only)."""
    if token_file is not None:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"cannot read the admin token file {token_file}: {e.strerror}.") from None
        if not token:
            raise ValueError(f"the admin token file {token_file} is empty.")
        return token
    return os.environ.get(TOKEN_ENV) or None


# -- the wire format ----------------------------------------------------------------------------

class PredictRequest(BaseModel):
    """Texts to classify, with one adapter for all of them or one per text ("__base__": the base alone)."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"texts": ["a wonderful film", "dull and far too long"], "adapter": "movies"},
        {"texts": ["great phone", "late again, thanks a lot"], "adapters": ["amazon", "tweets"]}]})
    texts: list[str] = Field(description="the texts, in order; at most max_texts, each at most max_chars characters")
    adapter: str | None = Field(None, description="one adapter for every text")
    adapters: list[str] | None = Field(None, description="one adapter per text (mixed batch)")

    @model_validator(mode="after")
    def _one_way(self):
        if (self.adapter is None) == (self.adapters is None):
            raise ValueError("give either 'adapter' (one name for every text) or 'adapters' (one name per text)")
        if self.adapters is not None and len(self.adapters) != len(self.texts):
            raise ValueError(f"'adapters' has {len(self.adapters)} names for {len(self.texts)} texts; give one per text")
        return self

    def names(self) -> list[str]:
        return list(self.adapters) if self.adapters is not None else [self.adapter] * len(self.texts)


class Prediction(BaseModel):
    label: int = Field(description="the predicted label (as Deployer.predict's `label`)")
    probability: float = Field(description="its probability")
    adapter: str = Field(description="the adapter that answered")


class PredictResponse(BaseModel):
    predictions: list[Prediction] = Field(description="one per text, in the request's order")


class ErrorResponse(BaseModel):
    error: str = Field(description="a short code: too_many_texts, text_too_long, body_too_large, "
                                   "malformed_request, unknown_adapter, missing_token, wrong_token, ...")
    detail: Any = Field(None, description="what was wrong, and what to do")


class RegisterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
    path: str = Field(description="an adapter folder on the server's disk (adapter.safetensors + adapter.json)")
    replace: bool = Field(False, description="replace an adapter of that name")


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    request_id: str = Field(description="the X-Request-ID header of the /predict answer")
    labels: list[int | None] = Field(description="the true label of each text of that request; null: not known")


class ApiError(Exception):
    """An error answered as {"error": code, "detail": detail} with `status`."""

    def __init__(self, status: int, error: str, detail, headers: dict | None = None):
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers


def error_docs(status: int, *codes: str) -> dict:
    return {status: {"model": ErrorResponse, "description": ", ".join(codes)}}

