"""The teacher server: serves the soft targets of multi-task PyTorch models over gRPC and HTTP.

Our own protocol (`v1/`) and the Open Inference Protocol (`v2/`) from one asyncio process, over one
serving core (`serving/`) and one model repository (`repository/`); docs/architecture.md draws it.
"""

import os

# Set before torch, and with it the OpenMP runtime, is first imported (the runtime reads it once).
# By default OpenMP's worker threads spin for a while after every parallel region, waiting for
# the next one. In a server the forward shares the cores with the event loop and gRPC's threads,
# and a spinning worker takes a core from them; a worker preempted in turn stalls the next
# forward at its barrier. Passive waiting gives those cores back (the throughput it buys is in
# docs/performance.md). An explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
