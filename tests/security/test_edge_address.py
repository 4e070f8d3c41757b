"""Connections are counted per client: IPv4 as itself, IPv4-mapped IPv6 as its IPv4, IPv6 by its /64 (one host
commonly holds a whole /64: counting each address would not cap it). No second IPv6 /64 can be bound on
loopback here, so the grouping is checked on the function the edge calls with each peer address."""

from portcullis.edge import client_key


def test_ipv4_is_itself() -> None:
    assert client_key("203.0.113.7") == "203.0.113.7"


def test_ipv4_mapped_ipv6_counts_as_the_ipv4() -> None:
    assert client_key("::ffff:203.0.113.7") == "203.0.113.7"


def test_addresses_of_one_ipv6_64_count_together() -> None:
    a = client_key("2001:db8:1:2::1")
    assert a == client_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == client_key("2001:db8:1:2::1%eth0")
    assert a != client_key("2001:db8:1:3::1")


def test_unparseable_is_itself() -> None:
    assert client_key("") == "" and client_key("unix:/x") == "unix:/x"
