"""The request side of a `Generate` call, shared by `Client` and `AsyncClient`: the
`GenerateRequest` built from the call's arguments, and the checks of the clients' own arguments.

Only what the wire cannot carry is checked here (types, the int32 range); value ranges are the
server's to judge, and it answers `InvalidArgument` naming the field.
"""

from __future__ import annotations

from collections.abc import Sequence

from edgespec.core.params import SamplingParams
from edgespec.core.validation import check_float, check_int
from edgespec.errors import InvalidArgument
from edgespec.protos.convert import params_to_proto
from edgespec.protos.edgespec.v1 import edgespec_pb2 as pb
from edgespec.serving.tls import TlsConfig

INT32_MAX = 2**31 - 1
DEFAULT_TIMEOUT_S = 60.0


def check_timeout(name: str, value: object) -> float:
    """A call's deadline in seconds: finite and > 0, else `InvalidArgument` naming `name`."""
    try:
        return check_float(name, value, 0.0, lo_open=True, unit="(seconds)")
    except ValueError as err:
        raise InvalidArgument(str(err), field=name) from None


def build_request(
    prompt: str | Sequence[int],
    params: SamplingParams | None = None,
    *,
    policy: str = "adaptive",
    draft_tokens: int = 0,
    pipelined: bool | None = None,
) -> pb.GenerateRequest:
    """The `GenerateRequest` for these arguments (what `Client.generate` sends).

    Checks only what the wire cannot carry (types, int32 range); value ranges are the server's
    to judge, and it answers `InvalidArgument` naming the field. `params=None` sends the
    `SamplingParams` defaults (greedy, 64 new tokens).

    Example::

        request = build_request([1, 2, 3], SamplingParams(max_new_tokens=8), policy="fixed",
                                draft_tokens=4)
    """
    if params is None:
        params = SamplingParams()
    elif not isinstance(params, SamplingParams):
        raise InvalidArgument(
            f"params must be an edgespec.SamplingParams, got {type(params).__name__}",
            field="params",
        )
    if not isinstance(policy, str):
        raise InvalidArgument(
            f"policy must be a str such as 'adaptive' or 'fixed', got {policy!r}", field="policy"
        )
    try:
        k = check_int("draft_tokens", draft_tokens, 0, INT32_MAX)
    except ValueError as err:
        raise InvalidArgument(f"{err} (0 = server default)", field="draft_tokens") from None
    if pipelined is not None and not isinstance(pipelined, bool):
        raise InvalidArgument(
            f"pipelined must be a bool or None (None = edge default), got {pipelined!r}",
            field="pipelined",
        )
    request = pb.GenerateRequest(params=params_to_proto(params), policy=policy, draft_tokens=k)
    if pipelined is not None:
        request.pipelined = pipelined
    if isinstance(prompt, str):
        request.prompt = prompt
        return request
    if isinstance(prompt, (bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise InvalidArgument(
            f"prompt must be a str or a sequence of token ids, got {type(prompt).__name__}",
            field="prompt",
        )
    ids = []
    for i, token in enumerate(prompt):
        try:
            ids.append(check_int(f"prompt[{i}]", token, 0, INT32_MAX))
        except ValueError as err:
            raise InvalidArgument(f"{err} (a token id)", field=f"prompt[{i}]") from None
    # Set through CopyFrom so the oneof says "prompt_ids" even for an empty list (which the
    # server then rejects by name, instead of seeing no prompt at all).
    request.prompt_ids.CopyFrom(pb.TokenIds(ids=ids))
    return request


def auth_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata carrying `token` (none without one)."""
    return () if token is None else (("authorization", f"Bearer {token}"),)


def check_client_args(address: object, timeout: object, token: object, tls: object) -> float:
    """Check a client's constructor arguments (ValueError naming the bad one); returns the
    timeout as a float."""
    if not isinstance(address, str) or not address.strip():
        raise ValueError(f"address must be a non-empty 'host:port' string, got {address!r}")
    if token is not None and (not isinstance(token, str) or not token or "\n" in token):
        raise ValueError("token must be None or a non-empty single-line string")
    if tls is not None and not isinstance(tls, TlsConfig):
        raise ValueError(f"tls must be None or an edgespec.TlsConfig, got {type(tls).__name__}")
    return check_float("timeout", timeout, 0.0, lo_open=True, unit="(seconds)")
