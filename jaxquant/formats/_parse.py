"""Formats from their names, so command lines and checkpoints can name them."""

from __future__ import annotations

import re

from jaxquant.formats._builtin import fp_format, int_format, nf4, sf4, uint_format, uniform_grid
from jaxquant.formats._crd import crd_format
from jaxquant.formats._format import Format
from jaxquant.formats._lloyd_max import lut_format
from jaxquant.formats._mx import MX_FORMATS, mx_format, nvfp4

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?"
_ALIASES = {"fp4": "e2m1", "fp6": "e2m3", "fp8": "e4m3"}
_INT = re.compile(r"int(?P<bits>\d+)(?:-(?P<mode>sym|asym))?")
_UINT = re.compile(r"uint(?P<bits>\d+)")
_FP = re.compile(r"e(?P<e>\d+)m(?P<m>\d+)")
_GRID = re.compile(rf"grid(?P<n>\d+)(?:-max(?P<max>{_NUMBER}))?")
_CRD = re.compile(
    rf"crd-(?P<family>normal|laplace|t(?P<df>{_NUMBER}))-(?P<scaling>rms|absmax|signmax)"
    r"(?:-(?P<mode>sym|asym))?-(?P<bits>\d+)b(?:-b(?P<block>\d+))?")
_LUT = re.compile(
    rf"lut(?P<bits>\d+)(?:-(?P<scaling>rms|absmax|signmax))?(?:-b(?P<block>\d+))?:"
    rf"(?P<values>{_NUMBER}(?:,{_NUMBER})+)")

EXAMPLES = ("nf4", "sf4", "int4", "int3-sym", "e2m1", "fp4", "e3m0",
            "crd-t7-absmax-sym-4b-B64", "crd-normal-signmax-3b", "crd-laplace-rms-4b",
            "grid15-max1", "lut2:-1,-0.3,0.3,1")


def parse(name: str, *, block_size: int | None = None) -> Format:
  """Builds the format a name describes; every `Format.name` parses back to an equal format.

  Accepted names (case-insensitive):
    - ``nf4``, ``sf4``;
    - ``int{b}`` (two's complement), ``int{b}-sym`` (half-integers);
    - ``e{E}m{M}`` floating point, and the aliases ``fp4`` (e2m1), ``fp6`` (e2m3), ``fp8`` (e4m3);
    - the OCP MX element formats ``mxfp4``, ``mxfp6_e2m3``, ``mxfp6_e3m2``, ``mxfp8_e4m3``,
      ``mxfp8_e5m2``, ``mxint8`` (`mx_format`: scaling ``"mx"``, B = 32), and NVIDIA's
      ``nvfp4`` (`nvfp4`: E2M1, B = 16, E4M3 scales);
    - ``uint{b}``: the unsigned integers 0 … 2^b - 1, for scaling ``"minmax"``;
    - ``crd-{normal|laplace|t<ν>}-{rms|absmax|signmax}[-{sym|asym}]-{b}b[-B{block}]``: a
      cube-root-density format; the mode defaults as in `crd_format`, the block size to
      `block_size`, else 64;
    - ``grid{n}[-max{m}]``: a uniform grid;
    - ``lut{b}[-{scaling}][-B{block}]:v0,v1,...``: an explicit codebook (e.g. from Lloyd–Max).

  Args:
    name: the format's name.
    block_size: the block size for names that leave it open (a CRD name without ``-B``).

  Raises:
    ValueError: naming the input and listing examples of valid names.

  Example:
    >>> parse("crd-t7-signmax-4b").name
    'crd-t7-signmax-asym-4b-B64'
  """
  if not isinstance(name, str):
    raise TypeError(f"{name=} must be a str, e.g. one of {EXAMPLES}")
  text = _ALIASES.get(name.strip().lower(), name.strip().lower())
  if text == "nf4":
    return nf4()
  if text == "sf4":
    return sf4()
  if text in MX_FORMATS:
    return mx_format(text)
  if text == "nvfp4":
    return nvfp4()
  if match := _UINT.fullmatch(text):
    return uint_format(int(match["bits"]))
  if match := _INT.fullmatch(text):
    return int_format(int(match["bits"]), symmetric=match["mode"] == "sym")
  if match := _FP.fullmatch(text):
    return fp_format(int(match["e"]), int(match["m"]))
  if match := _GRID.fullmatch(text):
    return uniform_grid(int(match["n"]), float(match["max"] or 1.0))
  if match := _CRD.fullmatch(text):
    family = "t" if match["df"] else match["family"]
    return crd_format(
        family, int(match["bits"]), scaling=match["scaling"],
        block_size=int(match["block"] or block_size or 64),
        symmetric=None if match["mode"] is None else match["mode"] == "sym",
        df=float(match["df"]) if match["df"] else None)
  if match := _LUT.fullmatch(text):
    values = [float(v) for v in match["values"].split(",")]
    return lut_format(values, int(match["bits"]), scaling=match["scaling"],
                      block_size=int(match["block"]) if match["block"] else None)
  raise ValueError(f"unknown format name {name!r}; valid names look like {', '.join(EXAMPLES)}")
