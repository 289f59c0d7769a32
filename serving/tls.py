"""TLS settings of every edgespec gRPC endpoint, server or client side, in one dataclass.

`TlsConfig` names this side's own certificate and what it trusts of the other side:

- a server (edge, verifier) needs ``cert`` + ``key``; with ``ca_cert`` it also requires each
  client to present a certificate signed by that CA (mutual TLS);
- a client (the SDK, the edge's link to the verifiers) trusts ``ca_cert`` (None: gRPC's default
  roots), may check the server certificate against ``server_name`` instead of the host it dials,
  and presents ``cert`` + ``key`` for mutual TLS.

PEM material is given as a file path or as the PEM bytes themselves; files are read when the
credentials are built, so a missing file fails there. The SDK exports this class as
``edgespec.TlsConfig``.

Example::

    server_tls = TlsConfig(cert="certs/edge.pem", key="certs/edge.key")
    port = bind(grpc.aio.server(), "0.0.0.0:50051", server_tls)

    client_tls = TlsConfig(ca_cert="certs/ca.pem", server_name="edge.local")
    client = edgespec.Client("10.0.0.5:50051", tls=client_tls, token="s3cret")
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TypeAlias

import grpc

Pem: TypeAlias = bytes | str | Path  # PEM bytes, or the path of a PEM file


def read_pem(source: Pem | None) -> bytes | None:
    """The PEM bytes of `source` (read from the file when it is a path); None stays None."""
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


@dataclass(frozen=True)
class TlsConfig:
    """This side's certificate and what it trusts of the peer (see the module docstring).

    Fields:
        cert: PEM certificate chain of this side (server: required; client: mutual TLS only).
        key: PEM private key of `cert`; given exactly when `cert` is.
        ca_cert: PEM root(s) to trust. Client: the server's CA (None = gRPC's default roots).
            Server: the CA client certificates must chain to (None = no client certificates).
        server_name: client only: the name to check the server certificate against, if not
            the host dialled.

    Raises ValueError when `cert` and `key` are not given together.
    """

    cert: Pem | None = None
    key: Pem | None = None
    ca_cert: Pem | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError(
                "cert and key must be given together (this side's certificate and its private "
                f"key), got cert={self.cert!r}, key={self.key!r}"
            )
        if self.server_name is not None and (
            not isinstance(self.server_name, str) or not self.server_name
        ):
            raise ValueError(
                f"server_name must be None or a non-empty str, got {self.server_name!r}"
            )

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials a server listens with (ValueError without `cert` and `key`)."""
        cert, key = read_pem(self.cert), read_pem(self.key)
        if cert is None or key is None:
            raise ValueError("a TLS server needs cert and key (its certificate chain and key)")
        client_ca = read_pem(self.ca_cert)
        return grpc.ssl_server_credentials(
            [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials a client channel dials with."""
        return grpc.ssl_channel_credentials(
            root_certificates=read_pem(self.ca_cert),
            private_key=read_pem(self.key),
            certificate_chain=read_pem(self.cert),
        )

    def channel_options(self) -> list[tuple[str, str]]:
        """Channel options the client side needs (the server-name override, if any)."""
        return (
            []
            if self.server_name is None
            else [("grpc.ssl_target_name_override", self.server_name)]
        )


def bind(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    """Add a listening port at `address` to `server`: TLS with `tls`'s server credentials, else
    plaintext. Returns the port bound (the free one picked for port 0); OSError if none."""
    try:
        bound = (
            server.add_secure_port(address, tls.server_credentials())
            if tls is not None
            else server.add_insecure_port(address)
        )
    except RuntimeError as err:  # grpc raises RuntimeError for an address it cannot bind
        raise OSError(f"cannot listen on {address}: {err}") from err
    if not bound:
        raise OSError(f"cannot listen on {address}")
    return bound
