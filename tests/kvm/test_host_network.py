"""Host networks opened at once (vmctl up of several machines, parallel test runs) each get
their own link and /30: a shared /30 makes the host route one guest's address to another's
TAP, so a port forward reaches the wrong machine."""

from __future__ import annotations

import os
import threading

import pytest

from vmctl.net.host import HostNetwork, random_mac

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/dev/net/tun"),
                                reason="needs root and /dev/net/tun")


def test_networks_opened_at_the_same_moment_get_distinct_links_and_subnets():
    count = 6
    start = threading.Barrier(count)
    opened: list[HostNetwork] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        network = HostNetwork("isolated", random_mac())
        start.wait()
        try:
            opened.append(network.open())
        except BaseException as error:  # reported below, with the others closed first
            errors.append(error)

    threads = [threading.Thread(target=open_one) for _ in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert not errors, errors
        subnets = [str(network.subnet) for network in opened]
        links = [network.tap.name for network in opened if network.tap]
        assert len(set(subnets)) == count, subnets
        assert len(set(links)) == count, links
    finally:
        for network in opened:
            network.close()
