"""Reading and writing the quantised formats other tools use (bitsandbytes, GGUF, safetensors)."""

from jaxquant.interop import bnb as bnb
from jaxquant.interop import gguf as gguf
from jaxquant.interop import safetensors as safetensors
