"""tapbox.net.dns: a UDP reply never exceeds what one datagram on the link may carry.

RFC 1035 §4.2.1 and RFC 6891 §6.2.5: the reply fits the client's advertised UDP payload size
(512 without EDNS, less than 512 counts as 512), and tapbox caps that by what the link's MTU
allows; what does not fit is cut and TC is set, so the client retries over TCP.
"""

from __future__ import annotations

import dns.flags
import dns.message
import trio
from test_dns import addresses, make_forwarder, query, start_fake_upstream


async def test_udp_reply_is_capped_by_the_link_as_well_as_the_client(
        nursery: trio.Nursery) -> None:
    up = await start_fake_upstream(nursery)
    fwd, _, _ = make_forwarder([("127.0.0.1", up.port)])
    q = query("big.example.test", use_edns=0, payload=65535)  # ~1 KB answer
    wire = await fwd.answer(q.to_wire(), udp_limit=600)
    assert wire is not None and len(wire) <= 600
    resp = dns.message.from_wire(wire)
    assert resp.flags & dns.flags.TC
    # The client's own smaller limit still counts, and a big enough link changes nothing.
    wire = await fwd.answer(query("big.example.test", use_edns=0, payload=700).to_wire(),
                            udp_limit=65_000)
    assert wire is not None and len(wire) <= 700
    assert dns.message.from_wire(wire).flags & dns.flags.TC
    wire = await fwd.answer(q.to_wire(), udp_limit=65_000)
    assert wire is not None
    resp = dns.message.from_wire(wire)
    assert not resp.flags & dns.flags.TC and len(addresses(resp)) == 60

