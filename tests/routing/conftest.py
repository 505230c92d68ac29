"""Fixtures for routing tests (helpers live in routing_helpers.py)."""

from __future__ import annotations

import pytest
from routing_helpers import Node, RouteEvents


@pytest.fixture
def node(netns) -> Node:
    """A namespace with veths vA<->vB, vC<->vD up; 10.9.0.1/24 and fd00:9::1/64 on vA."""
    return Node(netns.new("rt"))


@pytest.fixture
def route_events():
    """Factory of route-notification counters bound to a namespace; closed at teardown."""
    made: list[RouteEvents] = []

    def make(ns: str) -> RouteEvents:
        made.append(RouteEvents(ns))
        return made[-1]

    yield make
    for ev in made:
        ev.close()
