"""heiindex: fast cross-attention image-text retrieval with HEI hash codes.

Importing the package sets ``OMP_WAIT_POLICY=PASSIVE`` (unless the user chose a value) before
torch or faiss start their OpenMP runtimes: both bundle one, and with the default active
waiting, idle threads of one runtime spin on the cores the other needs (faiss calls were seen
to take ~18 s instead of 0.1 s on 2 cores).
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
