"""The reconciler's rules with a fake clock and a fake ExaBGP (the speaker port)."""

from __future__ import annotations

import ipaddress

import pytest

from bgp.reconciler import Command, Reconciler
from bgp.routes import Route

A = Route(ipaddress.ip_network("10.77.100.1/32"))
B = Route(ipaddress.ip_network("10.77.100.2/32"))
V6 = Route(ipaddress.ip_network("fd77:100::1/128"))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, s: float) -> None:
        self.now += s


class FakeExabgp:
    """Answers each command like ExaBGP (done/error); `fail` lists command lines to refuse."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fail: set[str] = set()
        self.rib: dict[str, str] = {}

    async def send(self, cmd: Command) -> tuple[bool, str | None]:
        self.lines.append(cmd.text)
        if cmd.text in self.fail:
            return False, "ExaBGP answered error"
        if cmd.route is None:
            self.rib.pop(cmd.prefix, None)
        else:
            self.rib[cmd.prefix] = cmd.text
        return True, None


def make(clock: Clock, **kw) -> Reconciler:
    kw.setdefault("min_change_interval", 1.0)
    return Reconciler(clock=clock, **kw)


async def drain(rec: Reconciler, fake: FakeExabgp, limit: int = 50) -> list[str]:
    """Run the reconciler against the fake until it has nothing to send now."""
    start = len(fake.lines)
    for _ in range(limit):
        if await rec.step(fake.send) is None:
            break
    return fake.lines[start:]


async def test_diff_announces_then_withdraws_only_what_changed():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock)
    rec.set_desired([B, A, V6])
    assert await drain(rec, fake) == [
        "announce route 10.77.100.1/32 next-hop self",
        "announce route 10.77.100.2/32 next-hop self",
        "announce route fd77:100::1/128 next-hop self",
    ]
    assert rec.announced() == {"10.77.100.1/32", "10.77.100.2/32", "fd77:100::1/128"}
    assert rec.converged() and rec.pending() == {}
    clock.advance(5)
    rec.set_desired([B, V6])
    assert await drain(rec, fake) == ["withdraw route 10.77.100.1/32"]
    assert rec.announced() == {"10.77.100.2/32", "fd77:100::1/128"}
    # Same desired again: nothing to do.
    rec.set_desired([B, V6])
    assert await drain(rec, fake) == []


async def test_withdraws_go_before_announces():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock)
    rec.set_desired([B])
    await drain(rec, fake)
    clock.advance(5)
    rec.set_desired([A])
    assert await drain(rec, fake) == ["withdraw route 10.77.100.2/32", "announce route 10.77.100.1/32 next-hop self"]


def test_one_command_in_flight():
    rec = make(Clock())
    rec.set_desired([A, B])
    first = rec.next_command()
    assert first is not None
    assert rec.next_command() is None  # waits for the answer
    rec.on_result(first, True)
    second = rec.next_command()
    assert second is not None and second.prefix != first.prefix


async def test_error_is_retried_with_growing_backoff():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, retry_initial=0.5, retry_max=2.0)
    fake.fail.add("announce route 10.77.100.1/32 next-hop self")
    rec.set_desired([A])
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self"]
    assert rec.announced() == set()
    assert "retry" in rec.pending()["10.77.100.1/32"]
    assert rec.next_wakeup() == pytest.approx(clock.now + 0.5)
    assert await drain(rec, fake) == []  # not before the back-off
    for expected_wait in (0.5, 1.0, 2.0, 2.0):
        clock.advance(expected_wait - 0.01)
        assert await drain(rec, fake) == []
        clock.advance(0.01)
        assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self"]
    fake.fail.clear()
    clock.advance(2.0)
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self"]
    assert rec.announced() == {"10.77.100.1/32"} and rec.converged()
    assert "failed" in rec.last_error


async def test_session_up_resends_everything_announced():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock)
    rec.set_desired([A, V6])
    await drain(rec, fake)
    rec.resend_all()
    assert rec.announced() == set()  # not acknowledged again yet
    cmd = rec.next_command()
    assert cmd is not None and cmd.resend
    rec.on_result(cmd, True)
    assert await drain(rec, fake) == ["announce route fd77:100::1/128 next-hop self"]
    assert rec.announced() == {"10.77.100.1/32", "fd77:100::1/128"}


async def test_resend_is_not_rate_limited():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, min_change_interval=30)
    rec.set_desired([A])
    await drain(rec, fake)
    rec.resend_all()
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self"]


async def test_exabgp_restart_drops_in_flight_and_resends():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock)
    rec.set_desired([A])
    await drain(rec, fake)
    rec.set_desired([A, B])
    stale = rec.next_command()
    rec.channel_reset()  # ExaBGP died with `stale` in flight
    rec.on_result(stale, True)  # a late answer from the old channel must not count
    assert rec.announced() == set()
    lines = await drain(rec, fake)
    assert sorted(lines) == ["announce route 10.77.100.1/32 next-hop self",
                             "announce route 10.77.100.2/32 next-hop self"]
    assert rec.announced() == {"10.77.100.1/32", "10.77.100.2/32"}


async def test_a_withdrawal_never_waits_for_the_rate_limit():
    """Issue 14: only announcements are rate limited; a VIP that must go goes now."""
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, min_change_interval=1.0)
    rec.set_desired([A])
    await drain(rec, fake)
    clock.advance(0.3)
    rec.set_desired([])
    assert await drain(rec, fake) == ["withdraw route 10.77.100.1/32"]
    assert rec.converged()
    withdrawn_at = clock.now
    # ... but the way back is limited from the withdraw on.
    clock.advance(0.5)
    rec.set_desired([A])
    assert await drain(rec, fake) == []
    assert rec.next_wakeup() == pytest.approx(withdrawn_at + 1.0)
    assert "rate limited" in rec.pending()["10.77.100.1/32"]
    assert not rec.converged()
    clock.advance(0.5)
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self"]


async def test_a_quick_flapper_is_withdrawn_at_once_and_announced_at_most_once_per_interval():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, min_change_interval=1.0)
    sent = []
    for _ in range(10):  # flips every 0.25 s for 2.5 s
        rec.set_desired([A])
        sent += await drain(rec, fake)
        clock.advance(0.125)
        rec.set_desired([])
        sent += await drain(rec, fake)
        clock.advance(0.125)
    announces = [line for line in sent if line.startswith("announce")]
    # At 0 and 1.25 s (each at least 1 s after the withdraw before it), not 10 times; every
    # withdrawal went out at once.
    assert len(announces) == 2
    assert len(sent) == 4
    assert sent[-1] == "withdraw route 10.77.100.1/32" and rec.announced() == set()


async def test_attribute_change_is_sent_without_waiting():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, min_change_interval=10)
    rec.set_desired([A])
    await drain(rec, fake)
    rec.set_desired([Route(A.prefix, med=50, communities=("65000:7",))])
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self med 50 community [65000:7]"]


async def test_prepend_is_rendered_with_the_local_asn_and_left_out_without_one():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, min_change_interval=0, local_as=65101)
    rec.set_desired([Route(A.prefix, med=1000, prepend=2)])
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self med 1000 as-path [65101 65101 65101]"]
    rec = make(clock, min_change_interval=0)  # an iBGP node: no local_as, no prepends
    rec.set_desired([Route(A.prefix, med=1000, prepend=2)])
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self med 1000"]


async def test_withdraw_all_ignores_rate_limit():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, min_change_interval=60)
    rec.set_desired([A, V6])
    await drain(rec, fake)
    rec.withdraw_all()
    assert sorted(await drain(rec, fake)) == ["withdraw route 10.77.100.1/32", "withdraw route fd77:100::1/128"]
    assert rec.announced() == set() and rec.converged()
    rec.set_desired([A])  # nothing comes back while stopping
    assert await drain(rec, fake) == []


async def test_graceful_shutdown_community_is_added_to_every_route():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, min_change_interval=60)
    rec.set_desired([A, Route(V6.prefix, communities=("65000:1",))])
    await drain(rec, fake)
    rec.set_extra_communities(("65535:0",))
    assert not rec.converged()
    assert await drain(rec, fake) == [
        "announce route 10.77.100.1/32 next-hop self community [65535:0]",
        "announce route fd77:100::1/128 next-hop self community [65000:1 65535:0]",
    ]
    assert rec.converged()


async def test_configured_next_hop_is_used_for_its_family_only():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, next_hop=ipaddress.ip_address("10.77.1.9"))
    rec.set_desired([A, V6])
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop 10.77.1.9",
                                      "announce route fd77:100::1/128 next-hop self"]


def test_set_desired_rejects_non_routes():
    rec = make(Clock())
    with pytest.raises(TypeError):
        rec.set_desired(["10.77.100.1/32"])  # type: ignore[list-item]


class CountingReconciler(Reconciler):
    """Counts how many prefixes are judged, the work a command costs."""

    judged = 0

    def _target(self, p, now):
        self.judged += 1
        return super()._target(p, now)


async def test_work_per_command_is_proportional_to_what_changed():
    clock, fake = Clock(), FakeExabgp()
    rec = CountingReconciler(clock=clock, min_change_interval=1.0)
    routes = [Route(ipaddress.ip_network(f"10.78.{i // 256}.{i % 256}/32")) for i in range(1000)]
    rec.set_desired(routes)
    assert len(await drain(rec, fake, limit=2000)) == 1000
    # A scan per command would judge 1000 x 1000 prefixes; a few judgements per prefix remain.
    assert rec.judged < 5 * 1000
    assert len(rec.announced()) == 1000
    clock.advance(5)
    rec.judged = 0
    rec.set_desired(routes[1:])
    assert await drain(rec, fake) == ["withdraw route 10.78.0.0/32"]
    assert rec.judged < 10
    assert rec.announced_version > 0 and len(rec.announced()) == 999


async def test_a_retry_that_falls_due_is_a_wakeup_now():
    clock, fake = Clock(), FakeExabgp()
    rec = make(clock, retry_initial=0.5)
    fake.fail.add("announce route 10.77.100.1/32 next-hop self")
    rec.set_desired([A])
    await drain(rec, fake)
    assert rec.next_wakeup() == clock.now + 0.5
    clock.advance(1)  # the retry is due, nothing stepped yet
    assert rec.next_wakeup() == clock.now
    fake.fail.clear()
    assert await drain(rec, fake) == ["announce route 10.77.100.1/32 next-hop self"]
    assert rec.next_wakeup() is None
