"""The operator's persisted overrides (node.admin_state): a state file of any shape is read or
ignored with a warning, never fatal to the node's start."""

from __future__ import annotations

import json

from node.admin_state import AdminStore
from node.events import EventLog


def store(tmp_path, text: str) -> tuple[AdminStore, EventLog]:
    path = tmp_path / "state.json"
    path.write_text(text)
    events = EventLog()
    s = AdminStore(path, events)
    s.load()
    return s, events


def test_a_saved_state_is_read_back(tmp_path):
    events = EventLog()
    s = AdminStore(tmp_path / "state.json", events)
    s.node_drained = True
    s.overrides[("web", "10.0.1.1:80")] = "drain"
    s.save()
    again, events = store(tmp_path, (tmp_path / "state.json").read_text())
    assert again.node_drained and again.overrides == {("web", "10.0.1.1:80"): "drain"}
    assert not events.recent


def test_a_state_file_of_another_shape_is_ignored_with_a_warning(tmp_path):
    for text in ("[1, 2]", '"drained"', json.dumps({"overrides": ["web"]}),
                 json.dumps({"overrides": {"web": "drain"}}), "{not json"):
        s, events = store(tmp_path, text)
        assert not s.node_drained and s.overrides == {}, text
        assert [e["event"] for e in events.recent] == ["state_unreadable"], text
        assert str(tmp_path / "state.json") in events.recent[0]["msg"]


def test_only_known_states_and_a_true_drain_are_taken(tmp_path):
    s, _ = store(tmp_path, json.dumps({"node_drained": "no",
                                       "overrides": {"web": {"a": "drain", "b": "sideways"}}}))
    assert s.node_drained is False and s.overrides == {("web", "a"): "drain"}
