"""The firewall half: the stack between the sandbox's TAP device and the host's sockets.

- engine.py     the stack's owner: decides new flows, dispatches the stack's events, flushes
- reactor.py    the loop: fd readiness (one epoll set), timers, deferred work; one flush point
- link.py       the TAP device; pcap capture and the test-only fault seam wrap it
- tcpproxy.py   one proxied TCP flow: connect, then its two pumps
- relay.py      UDP and ICMP echo flows through connected host sockets; refused flows
- dnsstream.py  DNS over TCP on the sandbox's DNS address
- dns.py        the policy-checking DNS forwarder (dnspython)
- upstream.py   where DNS goes upstream (resolv.conf, --dns-upstream); light to import
- faults.py     seeded frame faults for tests

Nothing here imports tapbox.isolate (the process half), and it never imports this.
"""
