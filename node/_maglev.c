/*
 * node._maglev: the Maglev population loop in C.
 *
 * Why C: the loop does about M * ln(M) slot probes (roughly 730,000 for M = 65537), which takes
 * a pure-Python interpreter a good fraction of a second; here it takes about a millisecond.
 *
 * populate(offsets, skips, weights, max_weight, size) -> bytes
 *   offsets, skips: buffers of uint64 ('Q'), one per backend in key order;
 *   weights: buffer of double ('d'), the normalised weights; max_weight: their maximum;
 *   returns size native-endian uint32 backend indexes.
 *
 * The turn rule must match node/maglev.py bit for bit: `(double)iteration * w < target`
 * and `target += max_weight`, both plain IEEE double operations (setup.py turns off
 * floating-point contraction so the compiler cannot fuse or reorder them).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FREE_SLOT UINT32_MAX /* sizes must stay below this */

/* Per-backend state, kept together so one turn touches one cache line. */
struct walker {
    uint64_t pos;    /* next slot of the preference list: (offset + next * skip) % size */
    uint64_t skip;
    double weight;
    double target;
};

/* Fills table[0..size) and returns 0, or -1 if memory ran out. Occupancy lives in a bitmap
 * (8 KiB for M = 65537, so it stays in L1 cache) because the walk to a free slot probes far
 * more often than it writes: about M * ln(M) probes for M writes. */
static int fill(uint32_t *table, uint64_t size, Py_ssize_t n, const uint64_t *offsets,
                const uint64_t *skips, const double *weights, double max_weight)
{
    struct walker *w = malloc(sizeof(struct walker) * (size_t)n);
    uint64_t *used = calloc((size_t)(size / 64 + 1), sizeof(uint64_t));
    if (w == NULL || used == NULL) {
        free(w);
        free(used);
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        w[i].pos = offsets[i];
        w[i].skip = skips[i];
        w[i].weight = weights[i];
        w[i].target = 0.0;
    }

    uint64_t filled = 0;
    for (uint64_t iteration = 1; filled < size; iteration++) {
        double it = (double)iteration;
        for (Py_ssize_t i = 0; i < n && filled < size; i++) {
            struct walker *b = &w[i];
            if (it * b->weight < b->target)
                continue;
            b->target += max_weight;
            uint64_t c = b->pos;
            uint64_t skip = b->skip;
            while (used[c >> 6] & ((uint64_t)1 << (c & 63))) {
                c += skip;
                if (c >= size)
                    c -= size;
            }
            used[c >> 6] |= (uint64_t)1 << (c & 63);
            table[c] = (uint32_t)i;
            c += skip;
            b->pos = c >= size ? c - size : c;
            filled++;
        }
    }
    free(w);
    free(used);
    return 0;
}

static int get_buffer(PyObject *obj, Py_buffer *view, const char *fmt, Py_ssize_t itemsize,
                      const char *name)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (view->itemsize != itemsize || view->format == NULL || strcmp(view->format, fmt) != 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a contiguous buffer of format '%s'", name, fmt);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *populate(PyObject *self, PyObject *args)
{
    PyObject *o_obj, *s_obj, *w_obj;
    double max_weight;
    unsigned long long size_arg;
    if (!PyArg_ParseTuple(args, "OOOdK", &o_obj, &s_obj, &w_obj, &max_weight, &size_arg))
        return NULL;

    Py_buffer ob, sb, wb;
    if (get_buffer(o_obj, &ob, "Q", 8, "offsets") < 0)
        return NULL;
    if (get_buffer(s_obj, &sb, "Q", 8, "skips") < 0) {
        PyBuffer_Release(&ob);
        return NULL;
    }
    if (get_buffer(w_obj, &wb, "d", 8, "weights") < 0) {
        PyBuffer_Release(&ob);
        PyBuffer_Release(&sb);
        return NULL;
    }

    PyObject *result = NULL;
    uint64_t size = (uint64_t)size_arg;
    Py_ssize_t n = ob.len / 8;
    const uint64_t *offsets = ob.buf, *skips = sb.buf;
    const double *weights = wb.buf;

    /* Checks that keep the loop finite and in bounds; the Python caller has validated the
     * rest (size prime, weights finite and > 0). */
    if (sb.len / 8 != n || wb.len / 8 != n) {
        PyErr_SetString(PyExc_ValueError, "offsets, skips and weights must have equal length");
        goto done;
    }
    if (!(max_weight > 0.0) || max_weight > 1e300) {
        PyErr_SetString(PyExc_ValueError, "max_weight must be a finite number > 0");
        goto done;
    }
    if (n == 0 || size < 2 || size >= FREE_SLOT || (uint64_t)n > size) {
        PyErr_SetString(PyExc_ValueError, "need 1 <= backends <= size < 2**32 - 1");
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        if (offsets[i] >= size || skips[i] < 1 || skips[i] >= size || !(weights[i] > 0.0)) {
            PyErr_Format(PyExc_ValueError,
                         "backend %zd: offset must be < size, skip in 1..size-1, weight > 0", i);
            goto done;
        }
    }

    result = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(size * sizeof(uint32_t)));
    if (result == NULL)
        goto done;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fill((uint32_t *)PyBytes_AS_STRING(result), size, n, offsets, skips, weights, max_weight);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        Py_CLEAR(result);
        PyErr_NoMemory();
    }

done:
    PyBuffer_Release(&ob);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&wb);
    return result;
}

static PyMethodDef methods[] = {
    {"populate", populate, METH_VARARGS,
     "populate(offsets, skips, weights, max_weight, size) -> bytes of uint32 backend indexes"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_maglev", "Maglev table population loop (see node/maglev.py).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__maglev(void)
{
    return PyModule_Create(&module);
}
