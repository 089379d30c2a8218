"""What a desired state turns into for each effector: a VipSpec per VIP for the forwarder, a
route per announced address for the BGP speaker. Pure functions of the decision."""

from __future__ import annotations

import ipaddress
from typing import Any

from node.reconcile import Desired, VipDecision


def forwarder_spec(d: VipDecision, previous: tuple[VipDecision, Any] | None = None) -> Any:
    """``previous``: this VIP's last (decision, spec); a backend whose decision object is
    unchanged keeps its BackendSpec (a backend shared by every VIP going down changes one
    backend per VIP; making the other nine again was most of the spec's cost)."""
    from node.forwarder.loader import BackendSpec, VipSpec

    old = previous[1].backends if previous is not None and previous[0].vip is d.vip else ()
    backends = tuple(old[i] if old and previous[0].backends[i] is b
                     else BackendSpec(key=b.key, address=b.address, state=b.data_state)
                     for i, b in enumerate(d.backends))
    # The table goes as the builder made it: backend keys and an array of indexes into them.
    keys = d.table.backends if d.table is not None else ()
    return VipSpec(
        name=d.vip.name,
        address=d.vip.address,
        protocol=d.vip.protocol,
        port=d.vip.port,
        backends=backends,
        table_keys=keys,
        table_entries=d.table.entries if keys else (),
        table_gone=getattr(d.table, "gone", frozenset()) if keys else frozenset(),
        second_chance_window=d.vip.second_chance.window if d.vip.second_chance else 0.0,
    )


def routes_for(desired: Desired) -> list[Any]:
    """One route per announced (or de-preferred) VIP address, with the attributes the announce
    policy chose. Several VIPs on one address share the /32: it is announced when any of them
    is, with the attributes of the best of them (announced before de-preferred), then by name."""
    from bgp.routes import Route

    by_prefix: dict[str, Any] = {}
    for name in sorted(desired.vips, key=lambda n: (desired.vips[n].state != "announced", n)):
        d = desired.vips[name]
        attrs = d.policy.attributes
        if attrs is None or d.vip.prefix in by_prefix:
            continue
        by_prefix[d.vip.prefix] = Route(
            prefix=ipaddress.ip_network(d.vip.prefix),
            med=attrs.med,
            communities=attrs.communities,
            prepend=attrs.prepend,
        )
    return list(by_prefix.values())
