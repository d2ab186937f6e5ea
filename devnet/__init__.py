"""A local chain for development, tests and the demo: anvil, the PoCo deployer, a requester
that buys the pool's capacity. Never imported by the runtime services."""
