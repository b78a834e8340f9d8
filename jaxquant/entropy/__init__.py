"""Entropy-coded storage of quantised codes: ideal code lengths, chunked rANS, coded sizes.

Orr et al. 2025, §1 and the `CompressedLUTFormat`: variable-length codes for the indices of a
uniform grid beat the best fixed-length codebooks at equal bits (the grid that meets a rate is
`jaxquant.fitting.fit_grid`).

`compress` rANS-codes the codes of any `QuantisedArray` into an `EntropyCodedArray`, whose
`decompress` gives the fixed-length `QuantisedArray` back, bit for bit, for `qmatmul`;
`coded_size` gives the bits per element under the ideal coder, rANS and the packed
fixed-length storage.

Modules: `ideal` (ideal code lengths of symbol streams), `rans` (the chunked, checked rANS
codec of symbol streams; its loops are the C extension `_rans`), `symbols` (the codes of a
`QuantisedArray` as symbols, and back), `sizes` (scale bits and ideal rates), `coded_array`
(`EntropyCodedArray`, `compress`, `coded_size`).
"""

from jaxquant.entropy.coded_array import EntropyCodedArray as EntropyCodedArray
from jaxquant.entropy.coded_array import coded_size as coded_size
from jaxquant.entropy.coded_array import compress as compress
from jaxquant.entropy.ideal import ideal_bits as ideal_bits
from jaxquant.entropy.rans import CodedStream as CodedStream
from jaxquant.entropy.rans import decode as decode
from jaxquant.entropy.rans import encode as encode

__all__ = ["CodedStream", "EntropyCodedArray", "coded_size", "compress", "decode", "encode",
           "ideal_bits"]
