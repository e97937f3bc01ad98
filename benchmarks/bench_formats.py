"""asv: quantize + pack throughput (target >= 1 G weights/s on 2560x6912 float32) and unpack."""

import numpy as np

import bitnet as bn

SHAPE = (2560, 6912)


class QuantizePack:
    params = [list(bn.FORMATS)]
    param_names = ["format"]

    def setup(self, fmt):
        self.w = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
        self.t = bn.quantize_weights(self.w)
        self.p = bn.pack(self.t, fmt)  # also compiles the kernels outside the timing

    def time_quantize_and_pack(self, fmt):
        bn.pack(bn.quantize_weights(self.w), fmt)

    def time_pack(self, fmt):
        bn.pack(self.t, fmt)

    def time_unpack(self, fmt):
        bn.unpack(self.p)

    def track_quantize_pack_gweights_per_s(self, fmt):
        import timeit

        seconds = min(timeit.repeat(lambda: bn.pack(bn.quantize_weights(self.w), fmt), number=1, repeat=7))
        return self.w.size / seconds / 1e9

    track_quantize_pack_gweights_per_s.unit = "G weights/s"


class QuantizeGranularity:
    params = [["tensor", "channel", "group"]]
    param_names = ["granularity"]

    def setup(self, granularity):
        self.w = np.random.default_rng(0).standard_normal(SHAPE).astype(np.float32)
        self.kwargs = {"group_size": 256} if granularity == "group" else {}
        bn.quantize_weights(self.w, granularity, **self.kwargs)

    def time_quantize_absmean(self, granularity):
        bn.quantize_weights(self.w, granularity, **self.kwargs)


def timeraw_import_and_first_quantize_pack():
    """Cold start: import bitnet and quantize + pack once (compilation or cache load included)."""
    return """
import numpy as np
import bitnet as bn
bn.pack(bn.quantize_weights(np.ones((64, 300), np.float32)), "i2")
"""
