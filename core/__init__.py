"""edgespec's transport-free core: sampling, exact rejection sampling, model runners with KV-cache
rollback, the drafter/verifier session halves, co-located generation, draft-length policies (built
by name through `registry`) and compute profiles. No Ray, no gRPC.

Import from the modules (`edgespec.core.runner`, `edgespec.core.params`, ...): this package
re-exports nothing, so that importing a light module (`validation`, `demo_pair`) does not load
torch.
"""
