"""The benchmarks behind ``edgespec bench``: core (co-located), link (gRPC round overhead),
latency (tokens/s vs RTT for every method), load (concurrent sessions), and the reliability
runs on a local deployment: chaos (sessions under actor kills and link faults) and soak (many
sessions for long: errors, RSS)."""
