"""edgespec: distributed edge-cloud speculative decoding.

A small draft model on an edge node proposes blocks of tokens; the large target model in the
cloud verifies each block in one forward pass. The output is exactly the target's.
"""

__version__ = "0.1.0"
