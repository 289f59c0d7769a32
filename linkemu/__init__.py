"""User-space TCP link emulator: delay, jitter, bandwidth and faults on 127.0.0.1.

This kernel has no netem, so the edge-cloud WAN link is emulated by a TCP proxy. The edge connects
to the emulator instead of the verifier; every chunk of bytes read from one side is held for the
link's one-way delay (and serialisation time, when the bandwidth is limited) before it is written to
the other side.

Vocabulary used throughout:

- **uplink**: client -> upstream (edge -> cloud); **downlink**: upstream -> client.
- **chunk**: one read from a socket (split into segments of at most 16 KiB when the bandwidth is
  limited, so that pacing is smooth); each chunk is one delay sample in the stats.
- **added one-way delay** of a chunk: the time it was written to the far side minus the time it was
  read from the near side. This is what the emulator *achieved*, not what it aimed for; the stats
  report it so that every experiment can record the link it really had.

The link model, per direction:

- one-way delay = ``rtt_ms / 2`` + a uniform draw from ``[0, jitter_ms]`` per chunk;
- bandwidth: each direction is one shared queue for all connections; a chunk occupies the link for
  ``bytes * 8 / bandwidth`` seconds after the previous chunk has left it, then travels for the
  one-way delay;
- order: TCP is ordered, so within a connection and direction a chunk is never delivered before the
  one read before it (deliver time = max(previous deliver time, own arrival + delay)). Jitter
  therefore delays bytes but never reorders them.

Not modelled: the connect handshake (a new connection is one RTT cheaper than over a real link, so
measure long-lived channels after warm-up), packet loss, and TCP's congestion control.

Faults:

- :meth:`LinkEmulator.cut`: every current connection is reset (RST) on both sides, and new ones are
  accepted and reset at once, until :meth:`LinkEmulator.restore`.
- :meth:`LinkEmulator.blackhole`: a partition that TCP outlives. Connections stay open and reads
  continue (until the queue limit back-pressures the sender), but nothing is delivered; new
  connections are accepted and their upstream connect waits. On :meth:`LinkEmulator.restore`
  everything held is delivered in order, as TCP's retransmissions would after the link heals. Held
  time counts in the achieved delay.

Run standalone::

    python -m edgespec.linkemu --listen 127.0.0.1:0 --upstream 127.0.0.1:50051 \\
        --rtt-ms 50 --jitter-ms 5 --bandwidth-mbps 10
"""

from edgespec.linkemu.cli import parse_hostport
from edgespec.linkemu.emulator import LinkEmulator
from edgespec.linkemu.profile import DirectionStats, LinkProfile, LinkStats

__all__ = ["DirectionStats", "LinkEmulator", "LinkProfile", "LinkStats", "parse_hostport"]
