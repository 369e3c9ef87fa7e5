"""TwELL inference backend: a gate GEMM that packs its output into TwELL, and a sparse up/down.

Public API (kernels/README.md):
    prepare_weights(w_gate, w_up, w_down) -> TwellWeights
    twell_ffn(x, weights) -> y
References (pure torch): ffn_reference, twell_ffn_reference, gate_twell_reference,
pack_reference, unpack_reference. Optional: calibrate() to route popular neurons densely.
See format.py for the layout and NOTES.md for measurements.
"""
from .format import TwellActs, decode_pairs, encode_pairs, pack_reference, unpack_reference
from .reference import ffn_reference, gate_reference, gate_twell_reference, twell_ffn_reference
from .weights import TwellWeights, calibrate, prepare_weights, reorder
from .ffn import twell_ffn

__all__ = ["TwellActs", "decode_pairs", "encode_pairs", "TwellWeights", "calibrate", "ffn_reference", "gate_reference", "gate_twell_reference",
           "pack_reference", "prepare_weights", "reorder", "twell_ffn", "twell_ffn_reference", "unpack_reference"]
