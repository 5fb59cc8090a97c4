"""The cluster tier: node agents fetch from each other, so a closure crosses the internet once.

  rendezvous.py  which peer owns a key (highest-random-weight hashing), pure
  membership.py  the live peers: --peer URLs plus the ready endpoints of the agent's Service
  protocol.py    the headers and the bearer token shared by both sides
  source.py      PeerSource: the peer set as one read-through source, shaped like an Upstream
  listener.py    the peer listener: the cache protocol behind token auth, one hop at most
"""
