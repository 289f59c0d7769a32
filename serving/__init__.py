"""Serving plumbing shared by the edge and cloud gRPC services: Prometheus metrics, the server
command-line helpers, authentication and TLS. Nothing here knows a model or a session."""
