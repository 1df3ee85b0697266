"""``python -m rwkv_mm.kernels [--backend cpp|cuda]``: build every compiled kernel, print build times."""

from .build import main

main()
