"""Workerpool orders: the rules an order must pass, the pool's orderbook and its sync with
the chain, the replenish policy, and the client of an orderbook."""
