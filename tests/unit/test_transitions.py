"""The events of one health transition: one per VIP for a few owners, one summary for many."""

from node.transitions import PER_VIP_EVENTS_MAX, transition_events


def test_a_backend_of_a_few_vips_gets_an_event_per_vip():
    events = transition_events([("web", "10.0.0.1:80"), ("api", "10.0.0.1:80")], "down", "connect refused")
    assert [e.fields["vip"] for e in events] == ["web", "api"]
    assert events[0].name == "backend_down" and events[0].level == "warning"
    assert events[0].message == "backend 10.0.0.1:80 of VIP web is DOWN: connect refused"


def test_a_backend_shared_by_many_vips_gets_one_summary_naming_the_first():
    owners = [(f"vip-{i:04d}", "10.0.0.9:8081") for i in range(1000, 0, -1)]
    (event,) = transition_events(owners, "up", "connected", dampened=True)
    assert event.name == "backend_up" and event.level == "info"
    assert event.fields == {"backend": "10.0.0.9:8081", "vips": 1000, "reason": "connected"}
    assert event.message.startswith("backend 10.0.0.9:8081 is UP in 1000 VIPs (vip-0001, vip-0002, vip-0003, "
                                    "vip-0004, vip-0005 and 995 more): connected (held down: flapping)")


def test_keys_are_summarised_separately():
    owners = [(f"v{i}", "10.0.0.1") for i in range(PER_VIP_EVENTS_MAX + 1)] + [("w", "10.0.0.1:80")]
    events = transition_events(owners, "down", "timeout")
    assert [e.fields.get("vips") for e in events] == [PER_VIP_EVENTS_MAX + 1, None]
