"""CPU backends: gptlab's C decoding kernels (`kernels`, sources in `csrc/`)."""
