"""Service settings: environment (prefix ``HOPGATE_``), then the command line, then defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "models" / "default.onnx"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="HOPGATE_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    model: Path = DEFAULT_MODEL

    # batcher
    buckets: list[int] = [1, 2, 4, 8, 16, 32, 64]  # padded batch sizes, all warmed before ready
    max_delay_ms: float = Field(2.0, ge=0)  # longest linger to fill a bucket while busy
    inline_compute_ms: float = Field(2.0, ge=0)  # a lone cheaper image runs on the loop
    # batches in flight at once (1 on CPU: ORT uses all threads); 0: computed on the event
    # loop, no runtime thread (what each of several CPU workers gets: server/workers.py)
    batch_slots: int = Field(1, ge=0)
    queue_images: int = Field(512, ge=1)  # queued images beyond which requests are rejected
    reject_status: int = 503  # 503 or 429
    retry_after_s: int = Field(1, ge=0)
    deadline_ms: float = Field(10_000, gt=0)  # a request header may shorten it, never lengthen

    # runtime
    providers: list[str] = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    intra_op_threads: int = Field(0, ge=0)  # 0: onnxruntime's default (all cores)
    inter_op_threads: int = Field(1, ge=0)
    solo_threads: int = Field(0, ge=0)  # a lone image's onnxruntime threads (0: usable cores)
    ort_spinning: bool = False  # onnxruntime's threads busy-wait between runs (runtime/session.py)
    # pad batches to their bucket: auto (on CUDA, not on CPU), bucket, none
    pad: Literal["auto", "bucket", "none"] = "auto"
    # IOBinding: buffers bound once per bucket (runtime/binding.py); off: plain session.run
    io_binding: bool = True
    # CUDA provider (runtime/cuda.py): a CUDA graph per bucket, cuDNN's conv search, TF32
    cuda_graphs: bool = True
    cuda_conv_algo_search: Literal["EXHAUSTIVE", "HEURISTIC", "DEFAULT"] = "EXHAUSTIVE"
    cuda_tf32: bool = False
    decode_threads: int = Field(2, ge=1)
    inline_decode_bytes: int = Field(64 * 1024, ge=0)  # smaller images decode on the loop
    workers: int = Field(0, ge=0)  # server processes on one port (0: chosen, workers.choose)

    # limits
    max_body_bytes: int = Field(20 * 1024 * 1024, gt=0)
    max_images: int = Field(64, gt=0)
    max_pixels: int = Field(40_000_000, gt=0)  # per image, before decoding (bomb guard)

    # bounded resources (docs/serving.md, "Bounded resources")
    max_inflight_bytes: int = Field(64 * 1024 * 1024, gt=0)  # request bodies, all requests
    decode_queue_images: int = Field(64, ge=1)  # images waiting for or in decoding
    decode_memory_bytes: int = Field(256 * 1024 * 1024, gt=0)  # estimated, all decodes at once
    max_connections: int = Field(256, ge=1)  # open connections + tasks (uvicorn 503s beyond)
    keepalive_timeout_s: int = Field(5, ge=1)  # an idle keep-alive connection is closed
    header_timeout_s: float = Field(10.0, gt=0)  # request line + headers must arrive within
    max_header_bytes: int = Field(16 * 1024, ge=1024)  # request line + headers
    # HTTP/1.1 parser: auto (httptools when installed), httptools, h11 (server/transport.py)
    http_parser: Literal["auto", "httptools", "h11"] = "auto"
    # uvicorn's loop: auto (uvloop when installed), asyncio, uvloop
    event_loop: Literal["auto", "asyncio", "uvloop"] = "auto"

    # operations
    api_key: str | None = None
    api_key_file: Path | None = None
    drain_seconds: float = Field(20.0, ge=0)  # longest wait for accepted work after SIGTERM
    drain_quiet_seconds: float = Field(0.5, ge=0)  # ... and until no request came for this long
    log_requests: bool = True
    reload_poll_s: float = Field(0.0, ge=0)  # reload when the bundle file changes (0: off)

    # gatekeeper mode (service/sidecar/gate.py): forward ID images to this upstream classifier
    upstream_url: str | None = None
    upstream_timeout_s: float = Field(5.0, gt=0)  # the whole call: connect, send, read
    upstream_max_body_bytes: int = Field(1024 * 1024, gt=0)  # larger answers get the policy
    upstream_policy: str = "fail_closed"  # fail_open | fail_closed
    gate_ood_status: int = Field(422, ge=200, le=599)
    gate_ood_body: str = ""  # JSON object merged into OOD answers
    # transparent sidecar (service/sidecar/proxy.py): the classifier's own routes, proxied through
    proxy_routes: list[str] = []  # exact paths, e.g. ["/predict"]
    proxy_methods: list[str] = ["POST"]
    gate_mode: Literal["enforce", "shadow"] = "enforce"  # shadow: forward all, only label
    proxy_unscored: Literal["refuse", "pass"] = "refuse"  # a body with no image in it
    # sidecar mode: hopgate's own endpoints on this port (sidecar/passthrough.py)
    admin_port: int | None = Field(None, ge=1, le=65535)
    speculative: bool = False  # enforce mode: call the classifier while scoring (proxy.py)

    # drift of served scores against the bundle's calibration table (service/drift.py)
    drift_window: int = Field(1000, ge=10)  # the last N scores
    drift_every: int = Field(50, ge=1)  # gauges recomputed every N scores

    @field_validator("proxy_routes")
    @classmethod
    def _routes(cls, v: list[str]) -> list[str]:
        if any(not p.startswith("/") for p in v):
            raise ValueError("proxy_routes must be paths starting with /")
        return v

    @field_validator("proxy_methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        return [m.upper() for m in v]

    @field_validator("reject_status")
    @classmethod
    def _reject(cls, v: int) -> int:
        if v not in (429, 503):
            raise ValueError("reject_status must be 429 or 503")
        return v

    @field_validator("buckets")
    @classmethod
    def _sorted_buckets(cls, v: list[int]) -> list[int]:
        if not v or any(b <= 0 for b in v):
            raise ValueError("buckets must be positive batch sizes")
        return sorted(set(v))

    @model_validator(mode="after")
    def _budget_holds_a_body(self) -> Settings:
        if self.max_inflight_bytes < self.max_body_bytes:
            raise ValueError("max_inflight_bytes must be at least max_body_bytes")
        return self

    @model_validator(mode="after")
    def _proxy_needs_an_upstream(self) -> Settings:
        if self.proxy_routes and not self.upstream_url:
            raise ValueError("proxy_routes need upstream_url (the classifier to proxy to)")
        return self

    @model_validator(mode="after")
    def _sidecar_needs_an_admin_port(self) -> Settings:
        """Sidecar mode passes every other path to the classifier, so hopgate's own
        endpoints need a port of their own (docs/deploy.md, "Ports")."""
        if self.proxy_routes and self.admin_port is None:
            raise ValueError("proxy_routes (sidecar mode) move hopgate's own endpoints to an "
                             "admin port: set HOPGATE_ADMIN_PORT (or --admin-port), e.g. 9901")
        if self.admin_port is not None and self.admin_port == self.port:
            raise ValueError("admin_port must differ from port")
        return self

    def resolved_api_key(self) -> str | None:
        if self.api_key_file is not None:
            return self.api_key_file.read_text().strip() or None
        return self.api_key or None
