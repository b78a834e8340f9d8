/* The host loops of jaxquant.entropy: chunked rANS (jaxquant.entropy.rans documents the
 * stream format) and the packing of decoded codes (jaxquant.entropy.symbols).
 *
 * Range asymmetric numeral systems (Duda 2013, "Asymmetric numeral systems: entropy coding
 * combining speed of Huffman coding with compression rate of arithmetic coding",
 * arXiv:1311.2540) with word-wise renormalisation (Giesen 2014, "Interleaved entropy
 * coders", arXiv:1402.3392, §2), here with a 64-bit state and 32-bit words: the state x
 * lies in [L, 2^64) with L = 2^32, and symbol probabilities are f(s) / 2^n with n <= 15.
 *
 *   encode s: if x >= 2^(64-n) f(s), emit the low 32 bits of x and shift them out; then
 *             x <- floor(x / f(s)) 2^n + (x mod f(s)) + c(s)          (c: cumulative f)
 *   decode:   slot = x mod 2^n, s = the symbol with c(s) <= slot < c(s) + f(s),
 *             x <- f(s) floor(x / 2^n) + slot - c(s); if x < L, x <- 2^32 x + next word.
 *
 * At most one word moves per symbol either way (x < 2^64 is below L after one shift, and
 * L <= 2^(64-n) f; a decoded x >= 2^17 f reaches L with one word). L/2^n >= 2^17 keeps the
 * loss of rANS's integer state negligible (it grows as 2^n/L shrinks). Each chunk starts from x = L and its stream begins with the final state (high word
 * first), so a decoder that ends a chunk anywhere but at x = L with every word read has
 * been given a corrupt chunk.
 *
 * The loops run with the GIL released, so Python threads decode chunks in parallel.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define STATE_LOW ((uint64_t)1 << 32)
#define MAX_PRECISION 15

/* A C-contiguous buffer of `object` whose items are `itemsize` bytes (0: 1 or 2 bytes). */
static int view_of(PyObject *object, Py_buffer *view, int writable, Py_ssize_t itemsize,
                   const char *name) {
  int flags = PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(object, view, flags) < 0) return -1;
  int fits = itemsize ? view->itemsize == itemsize
                      : (view->itemsize == 1 || view->itemsize == 2);
  if (!fits) {
    PyErr_Format(PyExc_TypeError, "%s has %zd-byte items, expected %zd", name, view->itemsize,
                 itemsize ? itemsize : (Py_ssize_t)2);
    PyBuffer_Release(view);
    return -1;
  }
  return 0;
}

static uint32_t symbol_at(const void *symbols, Py_ssize_t itemsize, Py_ssize_t i) {
  return itemsize == 1 ? ((const uint8_t *)symbols)[i] : ((const uint16_t *)symbols)[i];
}

/* encode(symbols, chunk_size, freq u32[K], cum u32[K], precision, out u32[], ends u64[m])
 * -> words written. Chunk j's stream is out[ends[j-1]:ends[j]] (ends[-1] = 0). Raises
 * ValueError for a symbol >= K or of zero frequency, or an `out` too small. */
static PyObject *encode(PyObject *self, PyObject *args) {
  PyObject *objects[5];
  Py_ssize_t chunk_size;
  int precision;
  if (!PyArg_ParseTuple(args, "OnOOiOO", &objects[0], &chunk_size, &objects[1], &objects[2],
                        &precision, &objects[3], &objects[4]))
    return NULL;
  static const char *names[5] = {"symbols", "freq", "cum", "out", "ends"};
  static const Py_ssize_t sizes[5] = {0, 4, 4, 4, 8};
  Py_buffer views[5];
  int got = 0;
  PyObject *result = NULL;
  for (; got < 5; got++)
    if (view_of(objects[got], &views[got], got >= 3, sizes[got], names[got]) < 0) goto done;
  Py_ssize_t itemsize = views[0].itemsize, n = views[0].len / itemsize;
  Py_ssize_t n_symbols = views[1].len / 4, capacity = views[3].len / 4;
  Py_ssize_t n_chunks = views[4].len / 8;
  if (chunk_size < 1 || precision < 1 || precision > MAX_PRECISION ||
      views[2].len != views[1].len || n_chunks != (n + chunk_size - 1) / chunk_size ||
      capacity < n + 2 * n_chunks) {
    PyErr_SetString(PyExc_ValueError, "encode: inconsistent sizes");
    goto done;
  }
  const void *symbols = views[0].buf;
  const uint32_t *freq = views[1].buf, *cum = views[2].buf;
  uint32_t *out = views[3].buf;
  uint64_t *ends = views[4].buf;
  uint32_t *scratch = malloc(sizeof(uint32_t) * (size_t)(chunk_size + 2));
  if (scratch == NULL) {
    PyErr_NoMemory();
    goto done;
  }
  Py_ssize_t bad = -1, total = 0;
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t j = 0; j < n_chunks && bad < 0; j++) {
    Py_ssize_t start = j * chunk_size, stop = start + chunk_size < n ? start + chunk_size : n;
    uint32_t *end = scratch + chunk_size + 2, *p = end;
    uint64_t x = STATE_LOW;
    for (Py_ssize_t i = stop - 1; i >= start; i--) {
      uint32_t s = symbol_at(symbols, itemsize, i);
      if (s >= (uint32_t)n_symbols || freq[s] == 0) {
        bad = i;
        break;
      }
      uint64_t f = freq[s];
      if ((x >> (64 - precision)) >= f) { /* x >= 2^(64-n) f, which may be 2^64 */
        *--p = (uint32_t)x;
        x >>= 32;
      }
      x = ((x / f) << precision) + (x % f) + cum[s];
    }
    *--p = (uint32_t)x;
    *--p = (uint32_t)(x >> 32);
    memcpy(out + total, p, sizeof(uint32_t) * (size_t)(end - p));
    total += end - p;
    ends[j] = (uint64_t)total;
  }
  Py_END_ALLOW_THREADS
  free(scratch);
  if (bad >= 0) {
    PyErr_Format(PyExc_ValueError, "symbol %zd (value %u) is not in the model's alphabet of "
                 "%zd symbols or has zero frequency", bad, symbol_at(symbols, itemsize, bad),
                 n_symbols);
    goto done;
  }
  result = PyLong_FromSsize_t(total);
done:
  while (got-- > 0) PyBuffer_Release(&views[got]);
  return result;
}

/* decode(words u32[], starts u64[m+1], chunk_size, table u64[2^n], precision, out) -> -1, or
 * the index of the first chunk that does not decode (it reads past its words, or ends off
 * the state L or with words unread). Chunk j is words[starts[j]:starts[j+1]] and decodes
 * into out[j chunk_size : min((j+1) chunk_size, len(out))]; table[slot] packs
 * s << 32 | f(s) << 16 | (slot - c(s)). */
static PyObject *decode(PyObject *self, PyObject *args) {
  PyObject *objects[4];
  Py_ssize_t chunk_size;
  int precision;
  if (!PyArg_ParseTuple(args, "OOnOiO", &objects[0], &objects[1], &chunk_size, &objects[2],
                        &precision, &objects[3]))
    return NULL;
  static const char *names[4] = {"words", "starts", "table", "out"};
  static const Py_ssize_t sizes[4] = {4, 8, 8, 0};
  Py_buffer views[4];
  int got = 0;
  PyObject *result = NULL;
  for (; got < 4; got++)
    if (view_of(objects[got], &views[got], got == 3, sizes[got], names[got]) < 0) goto done;
  Py_ssize_t n_words = views[0].len / 4, n_chunks = views[1].len / 8 - 1;
  Py_ssize_t itemsize = views[3].itemsize, n = views[3].len / itemsize;
  if (chunk_size < 1 || precision < 1 || precision > MAX_PRECISION || n_chunks < 0 ||
      views[2].len != 8 * ((Py_ssize_t)1 << precision) ||
      n_chunks != (n + chunk_size - 1) / chunk_size) {
    PyErr_SetString(PyExc_ValueError, "decode: inconsistent sizes");
    goto done;
  }
  const uint32_t *words = views[0].buf;
  const uint64_t *starts = views[1].buf, *table = views[2].buf;
  const uint64_t mask = ((uint64_t)1 << precision) - 1;
  Py_ssize_t bad = -1;
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t j = 0; j < n_chunks && bad < 0; j++) {
    Py_ssize_t start = j * chunk_size, stop = start + chunk_size < n ? start + chunk_size : n;
    if (starts[j] > starts[j + 1] || starts[j + 1] > (uint64_t)n_words ||
        starts[j + 1] - starts[j] < 2) {
      bad = j;
      break;
    }
    const uint32_t *p = words + starts[j] + 2, *end = words + starts[j + 1];
    uint64_t x = ((uint64_t)p[-2] << 32) | p[-1];
    int overrun = 0;
#define DECODE_INTO(type)                                        \
    {                                                            \
      type *o = (type *)views[3].buf;                            \
      for (Py_ssize_t i = start; i < stop; i++) {                \
        uint64_t e = table[x & mask];                            \
        o[i] = (type)(e >> 32);                                  \
        x = ((e >> 16) & 0xFFFF) * (x >> precision) + (e & 0xFFFF); \
        if (x < STATE_LOW) {                                     \
          if (p == end) {                                        \
            overrun = 1;                                         \
            break;                                               \
          }                                                      \
          x = (x << 32) | *p++;                                  \
        }                                                        \
      }                                                          \
    }
    if (itemsize == 1) DECODE_INTO(uint8_t) else DECODE_INTO(uint16_t)
#undef DECODE_INTO
    if (overrun || x != STATE_LOW || p != end) bad = j;
  }
  Py_END_ALLOW_THREADS
  result = PyLong_FromSsize_t(bad);
done:
  while (got-- > 0) PyBuffer_Release(&views[got]);
  return result;
}

/* pack(codes, outer, n, inner, bits, blocked, pad_code, out u32[]) -> None: the codes, C
 * order over [outer, n, inner] (u8 or u16), packed along their middle axis in the layout of
 * jaxquant.packing ("bitstream-u32" version 1): along that axis, positions n..blocked-1 take
 * `pad_code` and blocked..padded-1 take 0, padded = blocked rounded up to 32; each group of
 * 32 codes becomes `bits` words, code t of the group at stream bits [t bits, (t + 1) bits),
 * least significant first. out is [outer, padded bits / 32, inner]. Raises ValueError for a
 * code of more than `bits` bits. */
static PyObject *pack(PyObject *self, PyObject *args) {
  PyObject *codes_object, *out_object;
  Py_ssize_t outer, n, inner, blocked;
  int bits;
  unsigned int pad_code;
  if (!PyArg_ParseTuple(args, "OnnniInO", &codes_object, &outer, &n, &inner, &bits, &pad_code,
                        &blocked, &out_object))
    return NULL;
  Py_buffer codes_view, out_view;
  if (view_of(codes_object, &codes_view, 0, 0, "codes") < 0) return NULL;
  if (view_of(out_object, &out_view, 1, 4, "out") < 0) {
    PyBuffer_Release(&codes_view);
    return NULL;
  }
  PyObject *result = NULL;
  Py_ssize_t itemsize = codes_view.itemsize, groups = (blocked + 31) / 32;
  if (bits < 1 || bits > 8 || outer < 0 || inner < 0 || n < 0 || blocked < n ||
      codes_view.len != outer * n * inner * itemsize ||
      out_view.len != 4 * outer * groups * bits * inner || (pad_code >> bits) != 0) {
    PyErr_SetString(PyExc_ValueError, "pack: inconsistent sizes");
    goto done;
  }
  const void *codes = codes_view.buf;
  uint32_t *out = out_view.buf;
  int wide = 0;
  Py_BEGIN_ALLOW_THREADS
  for (Py_ssize_t o = 0; o < outer; o++)
    for (Py_ssize_t g = 0; g < groups; g++)
      for (Py_ssize_t i = 0; i < inner; i++) {
        uint64_t stream = 0;
        int filled = 0;
        uint32_t *word = out + (o * groups * bits + g * bits) * inner + i;
        for (Py_ssize_t k = 32 * g; k < 32 * g + 32; k++) {
          uint32_t code = k < n ? symbol_at(codes, itemsize, (o * n + k) * inner + i)
                                : (k < blocked ? pad_code : 0);
          wide |= (int)(code >> bits);
          stream |= (uint64_t)code << filled;
          filled += bits;
          if (filled >= 32) {
            *word = (uint32_t)stream;
            word += inner;
            stream >>= 32;
            filled -= 32;
          }
        }
      }
  Py_END_ALLOW_THREADS
  if (wide) {
    PyErr_Format(PyExc_ValueError, "pack: a code does not fit in %d bits", bits);
    goto done;
  }
  result = Py_NewRef(Py_None);
done:
  PyBuffer_Release(&codes_view);
  PyBuffer_Release(&out_view);
  return result;
}

static PyMethodDef methods[] = {
    {"encode", encode, METH_VARARGS, "Encodes chunks of symbols (see jaxquant.entropy.rans)."},
    {"decode", decode, METH_VARARGS, "Decodes chunks of symbols (see jaxquant.entropy.rans)."},
    {"pack", pack, METH_VARARGS, "Packs decoded codes (see jaxquant.entropy.symbols)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_loops",
                                    "Host loops of jaxquant.entropy.", -1, methods};

PyMODINIT_FUNC PyInit__loops(void) { return PyModule_Create(&module); }
