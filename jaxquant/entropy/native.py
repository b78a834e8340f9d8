"""The compiled host loops of `jaxquant.entropy` (`_loops.c`: rANS coding, packing decoded
codes), or a clear error where they were not built."""

from __future__ import annotations

try:
  from jaxquant.entropy import _loops
except ImportError as error:  # pragma: no cover - a source checkout without its build
  _loops, _IMPORT_ERROR = None, error


def loops():
  """The extension module `jaxquant.entropy._loops`.

  Raises:
    ImportError: it was not built; the message says how to build it.
  """
  if _loops is None:
    raise ImportError("jaxquant's entropy-coding loops are a C extension "
                      "(jaxquant/entropy/_loops.c) built when jaxquant is installed; install it "
                      f"with `pip install -e .` (a C compiler is needed): {_IMPORT_ERROR}")
  return _loops
