"""Reading and writing the quantised formats other tools use (bitsandbytes, safetensors)."""

from jaxquant.interop import bnb as bnb
from jaxquant.interop import safetensors as safetensors
