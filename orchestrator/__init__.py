"""The control plane: Ray actors, the orchestrator's registry, cluster bring-up and deployment.

- `orchestrator.names`: the Ray namespace, actor names and node-role resources.
- `orchestrator.registry`: endpoints, health, load, least-loaded session assignment, draining
  (plain Python, no Ray); `orchestrator.health`: the gRPC health checks that feed it.
- Actors, thin async shims around plain classes: `orchestrator.verifier_actor` (`VerifierActor`
  on ``cloud`` nodes, around ``cloud/``'s engine), `orchestrator.edge_actor` (`EdgeActor` on ``edge``
  nodes, around ``edge/``'s engine), `orchestrator.orchestrator_actor` (the named
  `OrchestratorActor`, around the registry and the health checks); `orchestrator.endpoint_actor`
  is what the two model actors share (start, serve, register with the orchestrator).
- `orchestrator.nodes`: a local multi-node cluster (``ray start`` processes) and the state file;
  `orchestrator.connection`: connecting a process to the cluster; `orchestrator.deploy`:
  `deploy` / `teardown` of the actors on any cluster, capacity checks, `status`.

The CLI commands over them are ``edgespec.commands`` (``edgespec up / status / generate / down /
demo``). Nothing is imported here, so ``import edgespec.orchestrator.registry`` stays free of Ray
and torch.
"""
