"""Second chance (issue 17): which backend each table entry pointed to before the last change.

Pure: tables in, tables out (array('I') of backend ids, as the `tables` map holds them).
The loader calls previous_owners() when it stages a VIP's new table and writes the result in a
region of `tables` of the same size (maglev.h: vip_meta.prev); the data path
(bpf/second_chance.h) names entry i's previous owner in the GRE key while the window is open.

What "previous" means, so that every node agrees:
- entry i changed in this table change (old[i] != new[i]): its previous owner is old[i];
- entry i did not change, but it had moved in a change whose window is still open, to the
  owner it still has: it keeps the previous owner it had (a second change within the window
  does not erase what the first one moved); the window restarts at each change;
- otherwise 0 (none).
Two nodes that apply the same sequence of tables (same config, same health transitions)
therefore hold the same previous owners, by backend key; ids are per node, but the data path
only ever sends the address. A node that starts with no pinned maps (a reboot, a node joining
late) has no history: its entries name no previous owner until the next change. A controller
restart keeps them (the regions and the deadline live in the pinned maps).
"""

from __future__ import annotations

from array import array
from typing import Sequence


def previous_owners(old: Sequence[int], new: Sequence[int], carried: Sequence[int] | None) -> array:
    """Entry i's previous owner after the change old -> new (0 = none). carried: the previous
    owners of ``old`` while its window is open, else None. Tables of different sizes share no
    entry positions: nothing is carried (all zeros)."""
    if len(old) != len(new):
        return array("I", bytes(4 * len(new)))
    if carried is None or len(carried) != len(new):
        return array("I", [o if o != n else 0 for o, n in zip(old, new)])
    return array("I", [o if o != n else (c if c != n else 0) for o, n, c in zip(old, new, carried)])


def window_ns(seconds: float) -> int:
    return int(seconds * 1e9)
