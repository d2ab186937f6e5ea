"""Several hosts on this machine: a core host and worker hosts joined by links that can be
slowed, made lossy or cut. Used by the tests (``tests/hosts_fixtures.py``) and the
benchmarks (``ops/bench``); needs root and iproute2 (``ip netns``) and nftables.

    from hosts import Hosts, Shape
    with Hosts(workers=3, shape=Shape(delay=0.05, loss=0.01)) as net:
        rpc = net.publish(8545)             # a loopback-only service, on the core's address
        redis = net.start_redis()           # password required: redis://:pw@<core>:port/0
        w1 = net.workers[0]
        proc = w1.popen([...])              # runs inside the worker host's namespace
        w1.cut(); ...; w1.restore()         # the link goes down, then up again

The layout (every name starts with the prefix, ``wph-`` unless told; the subnet is
``10.250.0.0/24`` unless told, ``WP_HOSTS_PREFIX`` and ``WP_HOSTS_SUBNET`` override both):

* **core** — this machine's own network namespace, where the tests' scheduler runs. It gets
  the subnet's first address (``.1``) on ``lo``: the core's services listen there (the Redis
  servers and Sentinels the harness starts) or are relayed there from loopback
  (:meth:`Hosts.publish`: the test chain node, IPFS). Every host reaches the core at the
  same address, so the addresses Redis Sentinel hands out work everywhere.
* **worker host i** (1..N) — a network namespace ``<prefix>w<i>`` with one veth link to the
  core (``<prefix>w<i>h`` on the core's side): the /30 ``.4i/30``, core side ``.4i+1``,
  worker side ``.4i+2``. A worker host reaches nothing but the core, and only over its link.
  Its processes still reach this machine's Docker engine through its unix socket (a socket
  file is not a network address), which is how worker nodes run their apps.
* **shaping** — a link with a :class:`Shape` carries its TCP connections through
  ``proxy.py`` inside the worker host (an nftables rule of that namespace redirects the
  connections to the core into it), which delays and "loses" packets; an unshaped link has
  no proxy at all.
* **cutting** — :meth:`WorkerHost.cut` sets the link down on the core's side: the worker side
  loses carrier, what it sends is dropped, and nothing it had open is closed for it. Before
  the first link is made, a blackhole route for the subnet (metric 1000) is added on the
  core, so that traffic to a cut host is dropped here rather than sent along the default
  route off the machine.

Everything made is undone by :meth:`Hosts.close` (also on an exception), in reverse order:
processes started by the harness (by pid), namespaces, links, the core's address, the route.
A run killed before it could clean up leaves names with its prefix behind: the next
:class:`Hosts` with that prefix removes them first (:func:`remove_leftovers`). Two runs with
one prefix never overlap: the second waits until the first has ended (two runs side by side
need a prefix and a subnet each).
"""

from __future__ import annotations

from hosts.harness import (
    Hosts,
    HostsError,
    RedisServer,
    SentinelGroup,
    WorkerHost,
    netns_available,
    remove_leftovers,
)
from hosts.proxy import Shape

__all__ = [
    "Hosts",
    "HostsError",
    "RedisServer",
    "SentinelGroup",
    "Shape",
    "WorkerHost",
    "netns_available",
    "remove_leftovers",
]
