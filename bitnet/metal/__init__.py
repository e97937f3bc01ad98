"""Metal backend: MSL shaders dispatched through metalcompute on Apple GPUs (see the Metal issue)."""
