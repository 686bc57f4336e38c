"""heiindex: fast cross-attention image-text retrieval with HEI hash codes.

torch and faiss each bundle an OpenMP runtime (GNU libgomp). Idle threads of one runtime that
spin wait on the cores the other needs (faiss calls were seen to take ~18 s instead of 0.1 s on
2 cores); threads that sleep at once must be woken for every one of torch's many small parallel
regions (re-ranking is made of them), which made re-ranking 2.3x slower on 2 threads and 1.8x
on 16 (``benchmarks/threads.py``). So importing the package, before torch or faiss start their
runtimes, sets ``OMP_WAIT_POLICY=PASSIVE`` and ``GOMP_SPINCOUNT=10000``: idle threads spin
about 0.1 ms, then sleep (and hardly spin when OpenMP threads outnumber the cores). If the user
set either variable, both are left as they are.
"""

import os

OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}
if not any(name in os.environ for name in OMP_DEFAULTS):
    os.environ.update(OMP_DEFAULTS)

__version__ = "0.1.0"
