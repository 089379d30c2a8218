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

/* Table entries may be stored narrow (node/maglev.py: one byte per entry for up to 255
 * backends, two up to 65535): arrays of format 'B', 'H' or 'I'. */
static int get_entries(PyObject *obj, Py_buffer *view)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    const char *f = view->format;
    if (f == NULL || !((strcmp(f, "B") == 0 && view->itemsize == 1) || (strcmp(f, "H") == 0 && view->itemsize == 2) ||
                       (strcmp(f, "I") == 0 && view->itemsize == 4))) {
        PyErr_SetString(PyExc_TypeError, "entries must be a contiguous buffer of format 'B', 'H' or 'I'");
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

/* Integer loops the compiler may vectorize (gcc does so only at -O3; there is no floating
 * point in them, so the table's rounding rules are not affected). */
#if defined(__GNUC__) && !defined(__clang__)
#define VECTORIZE __attribute__((optimize("O3")))
#else
#define VECTORIZE
#endif

/* The largest entry, to check every entry indexes the id maps. */
#define MAX_OF(T)                                                          \
    static VECTORIZE uint32_t max_##T(const T *ent, Py_ssize_t n)          \
    {                                                                      \
        T m = 0;                                                           \
        for (Py_ssize_t j = 0; j < n; j++)                                 \
            m = ent[j] > m ? ent[j] : m;                                   \
        return m;                                                          \
    }
MAX_OF(uint8_t)
MAX_OF(uint16_t)
MAX_OF(uint32_t)
#undef MAX_OF

/* The three buffers write_ids and patch_ids both take first: dest (writable, the mapped
 * table), the builder's compact entries, and an id map of uint32 (named in the error). On
 * failure nothing stays acquired. */
static int get_table_buffers(PyObject *d_obj, Py_buffer *db, PyObject *e_obj, Py_buffer *eb,
                             PyObject *m_obj, Py_buffer *mb, const char *map_name)
{
    if (PyObject_GetBuffer(d_obj, db, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    if (get_entries(e_obj, eb) < 0) {
        PyBuffer_Release(db);
        return -1;
    }
    if (get_buffer(m_obj, mb, "I", 4, map_name) < 0) {
        PyBuffer_Release(db);
        PyBuffer_Release(eb);
        return -1;
    }
    return 0;
}

static void release_table_buffers(Py_buffer *db, Py_buffer *eb, Py_buffer *mb)
{
    PyBuffer_Release(db);
    PyBuffer_Release(eb);
    PyBuffer_Release(mb);
}

static inline uint32_t entry_at(const Py_buffer *v, Py_ssize_t j)
{
    switch (v->itemsize) {
    case 1:
        return ((const uint8_t *)v->buf)[j];
    case 2:
        return ((const uint16_t *)v->buf)[j];
    default:
        return ((const uint32_t *)v->buf)[j];
    }
}

/* widen(entries) -> bytes: entries ('B', 'H' or 'I') as native uint32 (for the digest). */
static PyObject *widen(PyObject *self, PyObject *arg)
{
    Py_buffer eb;
    if (get_entries(arg, &eb) < 0)
        return NULL;
    Py_ssize_t n = eb.len / eb.itemsize;
    PyObject *result = PyBytes_FromStringAndSize(NULL, n * 4);
    if (result != NULL) {
        uint32_t *out = (uint32_t *)PyBytes_AS_STRING(result);
        for (Py_ssize_t j = 0; j < n; j++)
            out[j] = entry_at(&eb, j);
    }
    PyBuffer_Release(&eb);
    return result;
}

/* narrow(entries, width) -> bytes: uint32 entries as width-byte (1, 2 or 4) unsigned ints;
 * every entry must fit. */
static PyObject *narrow(PyObject *self, PyObject *args)
{
    PyObject *e_obj;
    int width;
    if (!PyArg_ParseTuple(args, "Oi", &e_obj, &width))
        return NULL;
    if (width != 1 && width != 2 && width != 4) {
        PyErr_SetString(PyExc_ValueError, "width must be 1, 2 or 4");
        return NULL;
    }
    Py_buffer eb;
    if (get_buffer(e_obj, &eb, "I", 4, "entries") < 0)
        return NULL;
    Py_ssize_t n = eb.len / 4;
    const uint32_t *in = eb.buf;
    uint32_t limit = width == 4 ? UINT32_MAX : (1u << (8 * width)) - 1;
    for (Py_ssize_t j = 0; j < n; j++) {
        if (in[j] > limit) {
            PyBuffer_Release(&eb);
            PyErr_Format(PyExc_ValueError, "entry %zd (%u) does not fit in %d byte(s)", j, in[j], width);
            return NULL;
        }
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, n * width);
    if (result != NULL) {
        char *out = PyBytes_AS_STRING(result);
        for (Py_ssize_t j = 0; j < n; j++) {
            if (width == 1)
                ((uint8_t *)out)[j] = (uint8_t)in[j];
            else if (width == 2)
                ((uint16_t *)out)[j] = (uint16_t)in[j];
            else
                ((uint32_t *)out)[j] = in[j];
        }
    }
    PyBuffer_Release(&eb);
    return result;
}

/* write_ids(dest, entries, idmap, live) -> bool
 *   Writes table entries as backend ids straight into dest (the forwarder's mmap'ed spare
 *   slot): dest[j] = idmap[entries[j]]. An idmap value of 0 marks a backend that left the
 *   pool: its entries take the id of the next entry (cyclically) whose backend is still there,
 *   a pure function of the old table, so every node computes the same stop-gap table while
 *   the exact one is built. live: the VIP's live slot (same length) or None; returns whether
 *   the written table differs from it. One pass in C instead of one Python object per entry. */
static PyObject *write_ids(PyObject *self, PyObject *args)
{
    PyObject *d_obj, *e_obj, *m_obj, *l_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &d_obj, &e_obj, &m_obj, &l_obj))
        return NULL;
    Py_buffer db, eb, mb, lb;
    int have_live = l_obj != Py_None;
    if (get_table_buffers(d_obj, &db, e_obj, &eb, m_obj, &mb, "idmap") < 0)
        return NULL;
    if (have_live && PyObject_GetBuffer(l_obj, &lb, PyBUF_C_CONTIGUOUS) < 0) {
        release_table_buffers(&db, &eb, &mb);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = eb.len / eb.itemsize, nmap = mb.len / 4;
    const uint32_t *idmap = mb.buf;
    if (db.len != n * 4 || (have_live && lb.len != n * 4)) {
        PyErr_SetString(PyExc_ValueError, "dest, entries and live must have the same length");
        goto done;
    }
    int alive = 0;
    for (Py_ssize_t i = 0; i < nmap; i++)
        alive |= idmap[i] != 0;
    if (n && !alive) {
        PyErr_SetString(PyExc_ValueError, "idmap marks every backend as gone");
        goto done;
    }
    uint32_t top = eb.itemsize == 1 ? max_uint8_t(eb.buf, n)
                 : eb.itemsize == 2 ? max_uint16_t(eb.buf, n) : max_uint32_t(eb.buf, n);
    if (n && top >= (uint32_t)nmap) {
        for (Py_ssize_t j = 0; j < n; j++) { /* name the first bad entry */
            if (entry_at(&eb, j) >= (uint32_t)nmap) {
                PyErr_Format(PyExc_ValueError, "entry %zd names backend index %u of %zd", j, entry_at(&eb, j), nmap);
                goto done;
            }
        }
    }
    int differs = !have_live;
    /* The GIL stays held: a table takes ~0.1 ms, and releasing it per table would make the
     * writing thread queue behind the event loop for the GIL once per table. */
    uint32_t *out = db.buf;
    int holes = 0;
    for (Py_ssize_t j = 0; j < n; j++) {
        out[j] = idmap[entry_at(&eb, j)];
        holes |= out[j] == 0;
    }
    if (holes) {
        uint32_t carry = 0;
        for (Py_ssize_t j = 0; j < n && !carry; j++)
            carry = out[j];
        for (Py_ssize_t j = n - 1; j >= 0; j--) {
            if (out[j] == 0)
                out[j] = carry;
            else
                carry = out[j];
        }
    }
    if (have_live)
        differs = memcmp(out, lb.buf, (size_t)db.len) != 0;
    /* The table's stores complete before any later store (the slot flip that publishes it),
     * on weakly ordered CPUs too: the mapping may stay open across the flip. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    result = PyBool_FromLong(differs);
done:
    release_table_buffers(&db, &eb, &mb);
    if (have_live)
        PyBuffer_Release(&lb);
    return result;
}

/* patch_ids(dest, entries, before, after) -> int
 *   dest holds the table write_ids(entries, before) wrote (a live table); make it what
 *   write_ids(entries, after) would write, storing only the entries of backends gone under
 *   ``after`` (or, when ids changed, those that differ). Both rules are evaluated from the
 *   builder's compact entries (in this process's memory, 1-2 bytes an entry), so a stop-gap
 *   over a live table writes only the moved entries, each one aligned 32-bit store: a packet
 *   meets the entry's old or new backend. Returns the number of entries whose value changed. */

#if defined(__SSE2__)
#include <emmintrin.h>
#define GONE_VECTORS 8 /* gone backends compared 16 entries at a time; more: a lookup per entry */
#endif

#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4096 /* entries (four pages) ahead of the walk: the page walk of the next pages
                             * overlaps this one's stores (~15 % less CPU over a thousand tables here) */
#endif

/* The backend indexes gone under ``after`` (1-byte entries: at most 256). */
struct gone_set {
    unsigned char is_gone[256];
    int n;
#ifdef GONE_VECTORS
    __m128i vec[GONE_VECTORS];
#endif
};

/* Bit t set when entry p[t] is gone (len <= 64). */
static inline uint64_t gone_mask(const struct gone_set *g, const uint8_t *p, Py_ssize_t len)
{
    uint64_t m = 0;
#ifdef GONE_VECTORS
    if (len == 64 && g->n <= GONE_VECTORS) {
        for (int q = 0; q < 4; q++) {
            __m128i v = _mm_loadu_si128((const __m128i *)(p + 16 * q));
            __m128i hit = _mm_cmpeq_epi8(v, g->vec[0]);
            for (int i = 1; i < g->n; i++)
                hit = _mm_or_si128(hit, _mm_cmpeq_epi8(v, g->vec[i]));
            m |= (uint64_t)(uint16_t)_mm_movemask_epi8(hit) << (16 * q);
        }
        return m;
    }
#endif
    for (Py_ssize_t t = 0; t < len; t++)
        m |= (uint64_t)g->is_gone[p[t]] << t;
    return m;
}

/* patch_ids' fast path, for the forwarder's case: ``after`` only marks more backends gone
 * (every index it keeps has the same id in ``before``) and the entries are 1 byte. Only
 * entries of gone backends can change then, and each takes the id of the next kept entry
 * (cyclically). The gone entries are found 64 at a time as a bit mask and visited from the
 * table's end backwards, so the id carried back from a run's first kept entry after it
 * serves the whole run: per gone entry a few instructions and no hard-to-predict branch (a
 * backend of ten leaving a 65537-entry table: ~20 us, three times the byte-flag walk). Gone
 * entries whose id does not change are stored again with the same value. Returns the count
 * of changed entries, or -1 (nothing written) when it does not apply. The caller checked
 * that every entry indexes the maps and that some entry is kept. */
static Py_ssize_t patch_sparse(const Py_buffer *eb, Py_ssize_t n, const uint32_t *before,
                               const uint32_t *after, Py_ssize_t nmap, uint32_t *out)
{
    if (eb->itemsize != 1 || n == 0 || nmap > 256)
        return -1;
    struct gone_set g;
    memset(g.is_gone, 0, sizeof g.is_gone);
    g.n = 0;
    for (Py_ssize_t i = 0; i < nmap; i++) {
        if (after[i] == 0) {
#ifdef GONE_VECTORS
            if (g.n < GONE_VECTORS)
                g.vec[g.n] = _mm_set1_epi8((char)i);
#endif
            g.is_gone[i] = 1;
            g.n++;
        } else if (after[i] != before[i]) {
            return -1;
        }
    }
    if (!g.n)
        return 0;
    const uint8_t *ent = eb->buf;
    Py_ssize_t f = 0;
    while (g.is_gone[ent[f]])
        f++;
    uint32_t carry = after[ent[f]]; /* what a run through the table's end (and on from 0) takes */
    uint64_t next_first = g.is_gone[ent[0]]; /* is the entry after the block's last one gone */
    Py_ssize_t written = 0;
    for (Py_ssize_t base = (n - 1) / 64 * 64; base >= 0; base -= 64) {
        Py_ssize_t len = n - base < 64 ? n - base : 64;
        if (PREFETCH_AHEAD && base % 1024 == 0 && base >= PREFETCH_AHEAD)
            __builtin_prefetch(out + base - PREFETCH_AHEAD, 1, 0);
        uint64_t m = gone_mask(&g, ent + base, len);
        uint64_t ends = m & ~((m >> 1) | (next_first << (len - 1))); /* gone, the next kept */
        next_first = m & 1;
        while (m) {
            int t = 63 - __builtin_clzll(m);
            m ^= (uint64_t)1 << t;
            Py_ssize_t j = base + t;
            uint32_t next = after[ent[j + 1 == n ? 0 : j + 1]];
            carry = (ends >> t) & 1 ? next : carry;
            written += out[j] != carry;
            out[j] = carry;
        }
    }
    return written;
}

/* The full pass (ids that changed, wide entries): both rules carried back through every
 * entry, storing where they differ. The caller checked what patch_sparse's did. */
static Py_ssize_t patch_full(const Py_buffer *eb, Py_ssize_t n, const uint32_t *before,
                             const uint32_t *after, uint32_t *out)
{
    uint32_t cb = 0, ca = 0;
    Py_ssize_t written = 0;
    for (Py_ssize_t j = 0; j < n && (!cb || !ca); j++) {
        uint32_t e = entry_at(eb, j);
        if (!cb)
            cb = before[e];
        if (!ca)
            ca = after[e];
    }
    /* One loop per entry width, so the compiler keeps each tight. */
#define PATCH_LOOP(T)                                                  \
    do {                                                               \
        const T *ent = eb->buf;                                        \
        for (Py_ssize_t j = n - 1; j >= 0; j--) {                      \
            uint32_t vb = before[ent[j]], va = after[ent[j]];          \
            cb = vb ? vb : cb;                                         \
            ca = va ? va : ca;                                         \
            if (ca != cb) {                                            \
                out[j] = ca;                                           \
                written++;                                             \
            }                                                          \
        }                                                              \
    } while (0)
    if (eb->itemsize == 1)
        PATCH_LOOP(uint8_t);
    else if (eb->itemsize == 2)
        PATCH_LOOP(uint16_t);
    else
        PATCH_LOOP(uint32_t);
#undef PATCH_LOOP
    return written;
}

/* What patch_ids and patch_tables check before writing anything: every entry indexes the
 * maps, and both maps keep some entry. 0, or -1 with a Python exception set. */
static int check_patch(const Py_buffer *eb, Py_ssize_t nmap, const uint32_t *before, const uint32_t *after)
{
    Py_ssize_t n = eb->len / eb->itemsize;
    if (!n)
        return 0;
    uint32_t top = eb->itemsize == 1 ? max_uint8_t(eb->buf, n)
                 : eb->itemsize == 2 ? max_uint16_t(eb->buf, n) : max_uint32_t(eb->buf, n);
    if (top >= (uint32_t)nmap) {
        PyErr_Format(PyExc_ValueError, "an entry names backend index %u of %zd", top, nmap);
        return -1;
    }
    uint32_t cb = 0, ca = 0;
    for (Py_ssize_t j = 0; j < n && (!cb || !ca); j++) {
        uint32_t e = entry_at(eb, j);
        cb = cb ? cb : before[e];
        ca = ca ? ca : after[e];
    }
    if (!cb || !ca) {
        PyErr_SetString(PyExc_ValueError, "before or after marks every backend as gone");
        return -1;
    }
    return 0;
}

static Py_ssize_t patch_table(const Py_buffer *eb, const uint32_t *before, const uint32_t *after,
                              Py_ssize_t nmap, uint32_t *out)
{
    Py_ssize_t n = eb->len / eb->itemsize;
    Py_ssize_t written = patch_sparse(eb, n, before, after, nmap, out);
    return written >= 0 ? written : patch_full(eb, n, before, after, out);
}

static PyObject *patch_ids(PyObject *self, PyObject *args)
{
    PyObject *d_obj, *e_obj, *b_obj, *a_obj;
    if (!PyArg_ParseTuple(args, "OOOO", &d_obj, &e_obj, &b_obj, &a_obj))
        return NULL;
    Py_buffer db, eb, bb, ab;
    if (get_table_buffers(d_obj, &db, e_obj, &eb, b_obj, &bb, "before") < 0)
        return NULL;
    if (get_buffer(a_obj, &ab, "I", 4, "after") < 0) {
        release_table_buffers(&db, &eb, &bb);
        return NULL;
    }
    PyObject *result = NULL;
    Py_ssize_t n = eb.len / eb.itemsize, nmap = bb.len / 4;
    if (db.len != n * 4 || ab.len != bb.len) {
        PyErr_SetString(PyExc_ValueError, "dest must hold every entry; before and after the same length");
        goto done;
    }
    if (check_patch(&eb, nmap, bb.buf, ab.buf) < 0)
        goto done;
    result = PyLong_FromSsize_t(patch_table(&eb, bb.buf, ab.buf, nmap, db.buf));
done:
    __atomic_thread_fence(__ATOMIC_RELEASE); /* as in write_ids */
    release_table_buffers(&db, &eb, &bb);
    PyBuffer_Release(&ab);
    return result;
}

#ifdef __linux__
#include <errno.h>
#include <sys/mman.h>
#include <unistd.h>

#define PATCH_WINDOW (4 << 20) /* bytes of the tables map mapped at once (as the loader's sync) */

struct patch_job {
    Py_ssize_t offset; /* the table's first entry in the tables map */
    Py_buffer eb, bb, ab;
};

/* patch_tables(fd, map_len, jobs) -> int
 *   Many live tables patched as patch_ids would, in one call: the stop-gap for a backend
 *   shared by a thousand VIPs. jobs: (offset, entries, before, after) per table, offset being
 *   its first entry in the mmap'able tables map behind fd (map_len bytes); sorted by offset,
 *   neighbours share a mapping. Every job is checked before anything is written (a ValueError
 *   names the job); then the interpreter lock is released and the map is mapped a window at a
 *   time, so no more of it is mapped at once than a sync maps. Returns the entries changed;
 *   OSError if a window cannot be mapped (the tables before it are patched, no other). */
static PyObject *patch_tables(PyObject *self, PyObject *args)
{
    int fd;
    Py_ssize_t map_len;
    PyObject *jobs_obj;
    if (!PyArg_ParseTuple(args, "inO", &fd, &map_len, &jobs_obj))
        return NULL;
    PyObject *jobs = PySequence_Fast(jobs_obj, "jobs must be a sequence");
    if (jobs == NULL)
        return NULL;
    Py_ssize_t nj = PySequence_Fast_GET_SIZE(jobs), ready = 0, written = 0;
    struct patch_job *js = calloc(nj ? nj : 1, sizeof *js);
    PyObject *result = NULL;
    int err = 0;
    if (js == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; ready < nj; ready++) {
        PyObject *item = PySequence_Fast_GET_ITEM(jobs, ready), *e_obj, *b_obj, *a_obj;
        struct patch_job *j = &js[ready];
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "nOOO", &j->offset, &e_obj, &b_obj, &a_obj)) {
            PyErr_Format(PyExc_TypeError, "job %zd must be (offset, entries, before, after)", ready);
            goto done;
        }
        if (get_entries(e_obj, &j->eb) < 0)
            goto done;
        if (get_buffer(b_obj, &j->bb, "I", 4, "before") < 0) {
            PyBuffer_Release(&j->eb);
            goto done;
        }
        if (get_buffer(a_obj, &j->ab, "I", 4, "after") < 0) {
            PyBuffer_Release(&j->eb);
            PyBuffer_Release(&j->bb);
            goto done;
        }
        Py_ssize_t n = j->eb.len / j->eb.itemsize;
        int bad = j->ab.len != j->bb.len || j->offset < 0 || (j->offset + n) * 4 > map_len;
        if (bad || check_patch(&j->eb, j->bb.len / 4, j->bb.buf, j->ab.buf) < 0) {
            if (bad)
                PyErr_Format(PyExc_ValueError, "job %zd: before and after must have the same length "
                             "and the table lie within the map", ready);
            PyBuffer_Release(&j->eb);
            PyBuffer_Release(&j->bb);
            PyBuffer_Release(&j->ab);
            goto done;
        }
    }
    size_t page = (size_t)sysconf(_SC_PAGESIZE), total = ((size_t)map_len + page - 1) / page * page;
    Py_BEGIN_ALLOW_THREADS
    char *win = NULL;
    size_t wbase = 0, wlen = 0;
    for (Py_ssize_t i = 0; i < nj; i++) {
        struct patch_job *j = &js[i];
        size_t start = (size_t)j->offset * 4, end = start + (size_t)j->eb.len / j->eb.itemsize * 4;
        if (win == NULL || start < wbase || end > wbase + wlen) {
            if (win != NULL)
                munmap(win, wlen);
            wbase = start / page * page;
            wlen = (end - wbase + page - 1) / page * page;
            wlen = wlen < PATCH_WINDOW ? PATCH_WINDOW : wlen;
            wlen = wbase + wlen > total ? total - wbase : wlen;
            void *p = mmap(NULL, wlen, PROT_READ | PROT_WRITE, MAP_SHARED, fd, (off_t)wbase);
            if (p == MAP_FAILED) {
                err = errno;
                win = NULL;
                break;
            }
            win = p;
        }
        written += patch_table(&j->eb, j->bb.buf, j->ab.buf, j->bb.len / 4, (uint32_t *)(win + (start - wbase)));
    }
    __atomic_thread_fence(__ATOMIC_RELEASE); /* as in write_ids */
    if (win != NULL)
        munmap(win, wlen);
    Py_END_ALLOW_THREADS
    if (err) {
        errno = err;
        PyErr_SetFromErrno(PyExc_OSError);
    } else {
        result = PyLong_FromSsize_t(written);
    }
done:
    for (Py_ssize_t i = 0; i < ready; i++) {
        PyBuffer_Release(&js[i].eb);
        PyBuffer_Release(&js[i].bb);
        PyBuffer_Release(&js[i].ab);
    }
    free(js);
    Py_DECREF(jobs);
    return result;
}
#endif

/* counts(entries, n) -> list of n ints: entries per backend index (table shares). */
static PyObject *counts(PyObject *self, PyObject *args)
{
    PyObject *e_obj;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "On", &e_obj, &n))
        return NULL;
    if (n < 0 || n > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "n must be in 0..2**24");
        return NULL;
    }
    Py_buffer eb;
    if (get_entries(e_obj, &eb) < 0)
        return NULL;
    PyObject *result = NULL;
    uint64_t *tally = calloc((size_t)n + 1, sizeof(uint64_t));
    if (tally == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < eb.len / eb.itemsize; j++) {
        uint32_t e = entry_at(&eb, j);
        if (e >= (uint64_t)n) {
            PyErr_Format(PyExc_ValueError, "entry %zd names backend index %u of %zd", j, e, n);
            goto done;
        }
        tally[e]++;
    }
    result = PyList_New(n);
    for (Py_ssize_t i = 0; result && i < n; i++)
        PyList_SET_ITEM(result, i, PyLong_FromUnsignedLongLong(tally[i]));
done:
    free(tally);
    PyBuffer_Release(&eb);
    return result;
}

static PyMethodDef methods[] = {
    {"populate", populate, METH_VARARGS,
     "populate(offsets, skips, weights, max_weight, size) -> bytes of uint32 backend indexes"},
    {"write_ids", write_ids, METH_VARARGS,
     "write_ids(dest, entries, idmap, live) -> bool: table entries as backend ids into dest"},
    {"patch_ids", patch_ids, METH_VARARGS,
     "patch_ids(dest, entries, before, after) -> entries written: rewrite a live table in place"},
#ifdef __linux__
    {"patch_tables", patch_tables, METH_VARARGS,
     "patch_tables(fd, map_len, jobs) -> entries written: patch_ids over many mapped tables at once"},
#endif
    {"widen", widen, METH_O, "widen(entries) -> bytes of native uint32 entries"},
    {"narrow", narrow, METH_VARARGS, "narrow(entries, width) -> bytes of width-byte entries"},
    {"counts", counts, METH_VARARGS, "counts(entries, n) -> entries per backend index"},
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
