"""Reading and writing the quantised formats other tools use (bitsandbytes, GGUF, MXFP4 blocks, safetensors)."""

from jaxquant.interop import bnb as bnb
from jaxquant.interop import gguf as gguf
from jaxquant.interop import mx as mx
from jaxquant.interop import safetensors as safetensors
