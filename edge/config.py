"""The edge's settings: `EngineConfig` (sessions, drafting, retries) and `LinkConfig` (how the
gRPC link reaches verifiers). Plain validated dataclasses, importable without a model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgespec.core.validation import check_float, check_int, check_positive


@dataclass(frozen=True)
class EngineConfig:
    """Edge engine settings."""

    default_k: int = 4  # draft length when a request names none
    max_k: int = 32  # largest draft length a request may ask for
    # policy when a request names none: a name in `edgespec.edge.engine.POLICIES` (checked when
    # an engine is built, as policies can be registered until then)
    default_policy: str = "adaptive"
    # draft ahead while verdicts travel, when a request does not say: the edge would otherwise
    # idle for a round trip per round (latency bench: adaptive + pipelined beats adaptive alone at
    # every RTT); False saves the draft compute a missed guess wastes, for edges short of it
    pipelined: bool = True
    max_sessions: int = 64  # concurrent sessions; more answer RESOURCE_EXHAUSTED
    max_retries: int = 6  # reconnect attempts per round before giving up
    backoff_initial_s: float = 0.02  # sleep before the 2nd attempt; doubles each time
    backoff_max_s: float = 1.0
    # Draft on the worker thread (True) or on the event loop (False: saves two thread switches
    # per round but stalls every other session's I/O while one drafts). None = auto: on the loop
    # while this is the engine's only session, on the worker thread when sessions overlap.
    draft_in_thread: bool | None = None
    add_special_tokens: bool = False  # when tokenizing a text prompt
    # write each finished generation's per-round trace (msgpack, edge/trace.py) into this folder
    trace_dir: str | None = None
    # Learn each link across sessions: every session's rounds (whatever its policy) update an
    # estimate per (verifier, sampling regime), and an adaptive session starts from it
    # (`edgespec.core.controller.PolicyMemory`) instead of from priors.
    link_memory: bool = True

    def __post_init__(self) -> None:
        for name, lo in (("default_k", 1), ("max_k", 1), ("max_sessions", 1), ("max_retries", 0)):
            check_int(name, getattr(self, name), lo)
        check_int("default_k", self.default_k, 1, self.max_k)
        for name in ("backoff_initial_s", "backoff_max_s"):
            check_float(name, getattr(self, name), 0.0)
        if not isinstance(self.default_policy, str) or not self.default_policy:
            raise ValueError(
                f"default_policy must be a non-empty policy name, got {self.default_policy!r}"
            )
        for name in ("pipelined", "link_memory"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")


@dataclass(frozen=True)
class LinkConfig:
    """How the edge talks to verifiers over gRPC. Every call has a deadline; times in seconds."""

    token: str | None = None  # bearer token sent as `authorization: Bearer <token>` metadata
    # TLS: PEM root certificate(s) to trust (bytes, or a path to a PEM file); None = plaintext.
    tls_root_cert: bytes | str | Path | None = None
    tls_server_name: str | None = None  # override the name checked in the server's certificate
    model_id: str = ""  # model the edge expects; "" = the verifier's only model
    open_timeout_s: float = 30.0  # OpenSession deadline (includes the verifier's prefill)
    round_timeout_s: float = 10.0  # one round: block written -> verdict read
    close_timeout_s: float = 2.0  # CloseSession deadline (best effort)
    # Deadline of the whole VerifyStream call; a longer session reopens transparently after it.
    stream_timeout_s: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("open_timeout_s", "round_timeout_s", "close_timeout_s", "stream_timeout_s"):
            check_positive(name, getattr(self, name))
        if self.token is not None and (not isinstance(self.token, str) or not self.token):
            raise ValueError(f"token must be a non-empty str or None, got {self.token!r}")
        if not isinstance(self.model_id, str):
            raise ValueError(f"model_id must be a str, got {self.model_id!r}")

    def root_cert_bytes(self) -> bytes | None:
        """The PEM root certificate(s), read from the file when given as a path."""
        cert = self.tls_root_cert
        if cert is None or isinstance(cert, bytes):
            return cert
        return Path(cert).read_bytes()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()
