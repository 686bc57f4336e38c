"""heiindex: fast cross-attention image-text retrieval with HEI hash codes.

torch and faiss each bundle an OpenMP runtime (GNU libgomp on Linux wheels). Idle threads of one
runtime that spin wait on the cores the other needs (faiss calls were seen to take ~18 s instead
of 0.1 s on 2 cores); threads that sleep at once must be woken for each of torch's many small
parallel regions (re-ranking is made of them), which made re-ranking one chunk at a time
2.2-2.4x slower on 2 threads and 1.8x on 16 (``benchmarks/threads.py``). So importing the
package sets ``OMP_WAIT_POLICY=PASSIVE`` and ``GOMP_SPINCOUNT=10000``: idle threads spin a short
while (libgomp's estimate: 0.1 ms; longer on CPUs with a slow ``pause``), then sleep, and do not
spin at all once one runtime's threads outnumber the cores. If the user set either variable,
both are left as they are.

OpenMP reads these variables when its library loads, so they reach torch only when heiindex is
imported before torch (the CLI does). ``GOMP_SPINCOUNT`` is GNU's: LLVM's and Intel's OpenMP
(macOS, some conda builds) read only ``OMP_WAIT_POLICY`` and sleep at once (not measured there).
"""

import os

OMP_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}
if not any(name in os.environ for name in OMP_DEFAULTS):
    os.environ.update(OMP_DEFAULTS)

__version__ = "0.1.0"
