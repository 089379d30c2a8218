"""The fleet: VIP configuration from etcd, a lease-based node registry, and the fleet view.

- ``etcd``: a small asyncio client for etcd's v3 JSON gateway (through aiohttp);
- ``source``: the etcd config source a node's controller reads its VIP set from;
- ``registry``: each node's record under a lease (revision, digests, announce and health);
- ``view``: the pure comparison of node records (which VIPs disagree, and why);
- ``objects``: validating and writing VIP objects (``maglev fleet apply/get/delete/diff``).

Nothing here is in the data path: a node that loses etcd keeps serving its last good config.
"""
