"""The benchmarks behind ``edgespec bench``: core (co-located), link (gRPC round overhead),
latency (tokens/s vs RTT for every method) and load (concurrent sessions)."""
