"""Entropy-coded storage of quantised codes: ideal code lengths, Huffman coding, coded sizes.

Orr et al. 2025, §1 and the `CompressedLUTFormat`: variable-length codes for the indices of a
uniform grid beat the best fixed-length codebooks at equal bits (the grid that meets a rate is
`jaxquant.fitting.fit_grid`).

`compress` Huffman-codes the codes of any `QuantisedArray` into an `EntropyCodedArray`, whose
`decompress` gives the fixed-length `QuantisedArray` back, bit for bit, for `qmatmul`;
`coded_size` gives the bits per element under the ideal coder, the Huffman code and the packed
fixed-length storage.

Modules: `huffman` (the codec and ideal code lengths of symbol streams), `symbols` (the codes
of a `QuantisedArray` as symbols, and back), `framing` (the payload: the Huffman stream with
its CRC-32 checks), `sizes` (bits under each coding), `coded_array` (`EntropyCodedArray`,
`compress`).
"""

from jaxquant.entropy.coded_array import EntropyCodedArray as EntropyCodedArray
from jaxquant.entropy.coded_array import compress as compress
from jaxquant.entropy.huffman import LENGTH_FIELD_BITS as LENGTH_FIELD_BITS
from jaxquant.entropy.huffman import MAX_CODE_LENGTH as MAX_CODE_LENGTH
from jaxquant.entropy.huffman import HuffmanCode as HuffmanCode
from jaxquant.entropy.huffman import ideal_bits as ideal_bits
from jaxquant.entropy.sizes import coded_size as coded_size

__all__ = ["LENGTH_FIELD_BITS", "MAX_CODE_LENGTH", "EntropyCodedArray", "HuffmanCode",
           "coded_size", "compress", "ideal_bits"]
