"""The control plane: Ray actors, the orchestrator's registry, cluster bring-up, CLI commands.

- `orchestrator.registry`: endpoints, health, load, least-loaded session assignment, draining
  (plain Python, no Ray).
- `orchestrator.actors`: `VerifierActor` (on ``cloud`` nodes), `EdgeActor` (on ``edge`` nodes)
  and the named `OrchestratorActor`: thin async shims around the engines of ``cloud/`` and
  ``edge/`` that serve their gRPC endpoints and register them.
- `orchestrator.cluster`: a local multi-node cluster (``ray start`` processes), `deploy` /
  `teardown` of the actors on any cluster, the state file.
- `orchestrator.commands`: ``edgespec up / status / generate / down / demo``.

Nothing is imported here, so ``import edgespec.orchestrator.registry`` stays free of Ray and torch.
"""
