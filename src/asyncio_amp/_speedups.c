/*
 * The optional compiled accelerator of asyncio_amp._wire: the box codec's hot paths in C.
 *
 * _wire.py is the reference; this file mirrors it and never the other way round. Each
 * function below names the Python code it mirrors. The functions handle only the usual
 * input (exact bytes, well-formed boxes, within the limits) and hand everything else to
 * the Python function they mirror, so that every error, message and odd argument type
 * comes from one place. The BoxDecoder type, which keeps a partial box between reads,
 * mirrors the whole Python class instead, errors included. The behaviour is the same
 * with or without this module, which tests/test_speedups.py and tests/fuzz_speedups.py
 * check by feeding both the same input. The Parser and Encoder types mirror the code
 * _commands.py generates for each Command, in the same way.
 *
 * Like _wire.py it does no I/O and imports nothing (the sans-I/O rule).
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* Mirrors _wire.MAX_KEY_LENGTH and _wire.MAX_VALUE_LENGTH. */
#define MAX_KEY_LENGTH 255
#define MAX_VALUE_LENGTH 65535

/* The Python code this module hands the unusual input to, given by setup(). */
static PyObject *python_encode_box = NULL;           /* _wire.encode_box (pure Python) */
static PyObject *python_encode_items = NULL;         /* _wire.encode_items (pure Python) */
static PyObject *python_parse_boxes = NULL; /* _wire._parse_boxes_reference */
static PyObject *prefixes = NULL;                 /* _wire.PREFIXES: a tuple of 2-byte bytes */

static int
check_setup(void)
{
    if (prefixes == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "asyncio_amp._speedups: setup() was not called");
        return -1;
    }
    return 0;
}

/* _wire.length_prefix(n), as a new reference: the shared PREFIXES entry when there is one. */
static PyObject *
length_prefix(Py_ssize_t n)
{
    if (n < PyTuple_GET_SIZE(prefixes)) {
        PyObject *prefix = PyTuple_GET_ITEM(prefixes, n);
        Py_INCREF(prefix);
        return prefix;
    }
    char two[2] = {(char)(n >> 8), (char)(n & 0xff)};
    return PyBytes_FromStringAndSize(two, 2);
}

/*
 * Mirrors the one-pass block at the start of a box in BoxDecoder._parse, box after box.
 *
 * Appends to `boxes` each complete, well-formed box from buf[pos] on whose pairs take at
 * most max_box_size bytes and whose pairs are at most max_keys. Stops at the start of the
 * first box that is not (a fault, a limit, an empty box, or the end of the data inside
 * it): the Python code parses that one pair by pair, and reports what is wrong with it.
 * Returns where it stopped (always a box boundary), or -1 with an exception set.
 */
static Py_ssize_t
scan_boxes(const unsigned char *buf, Py_ssize_t pos, Py_ssize_t end, Py_ssize_t max_box_size,
           Py_ssize_t max_keys, PyObject *boxes)
{
    for (;;) {
        /* First pass: find the box's end, checking everything, building nothing. */
        Py_ssize_t p = pos;
        Py_ssize_t pairs = 0;
        for (;;) {
            if (end - p < 2 || buf[p]) {
                return pos; /* cut short, or a key length over 255 */
            }
            Py_ssize_t klen = buf[p + 1];
            if (!klen) {
                break; /* the end marker */
            }
            Py_ssize_t vpos = p + 2 + klen;
            if (end - vpos < 2) {
                return pos;
            }
            Py_ssize_t stop = vpos + 2 + ((Py_ssize_t)buf[vpos] << 8 | buf[vpos + 1]);
            if (stop > end) {
                return pos;
            }
            pairs++;
            p = stop;
            if (p - pos > max_box_size || pairs > max_keys) {
                return pos; /* the limits, as BoxDecoder._parse checks them */
            }
        }
        if (!pairs) {
            return pos; /* an empty box */
        }
        /* Second pass: the box, as `box[data[p + 2 : vpos]] = data[vpos + 2 : stop]`. */
        PyObject *box = PyDict_New();
        if (box == NULL) {
            return -1;
        }
        Py_ssize_t q = pos;
        while (q < p) {
            Py_ssize_t klen = buf[q + 1];
            Py_ssize_t vpos = q + 2 + klen;
            Py_ssize_t vlen = (Py_ssize_t)buf[vpos] << 8 | buf[vpos + 1];
            PyObject *key = PyBytes_FromStringAndSize((const char *)buf + q + 2, klen);
            PyObject *value =
                key ? PyBytes_FromStringAndSize((const char *)buf + vpos + 2, vlen) : NULL;
            if (value == NULL || PyDict_SetItem(box, key, value) < 0) {
                Py_XDECREF(key);
                Py_XDECREF(value);
                Py_DECREF(box);
                return -1;
            }
            Py_DECREF(key);
            Py_DECREF(value);
            q = vpos + 2 + vlen;
        }
        int appended = PyList_Append(boxes, box);
        Py_DECREF(box);
        if (appended < 0) {
            return -1;
        }
        pos = p + 2;
    }
}

/*
 * A limit as a C size. The limits are positive (BoxDecoder's setters check it), and a
 * Python int past the largest C size is no limit at all.
 */
static Py_ssize_t
limit_of(PyObject *value)
{
    Py_ssize_t limit = PyLong_AsSsize_t(value);
    if (limit == -1 && PyErr_ExceptionMatches(PyExc_OverflowError)) {
        PyErr_Clear();
        return PY_SSIZE_T_MAX;
    }
    return limit;
}

PyDoc_STRVAR(scan_boxes_doc,
"scan_boxes($module, data, start, max_box_size, max_keys, /)\n--\n\n"
"Parse the whole boxes at the start of data[start:]; return them and where the rest starts.\n\n"
"Mirrors the one-pass block of BoxDecoder._parse. Stops at a box boundary, at the first box\n"
"that is not complete, well-formed and within the limits (or at once if data is not bytes).");

static PyObject *
py_scan_boxes(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "scan_boxes() takes 4 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(args[1]);
    Py_ssize_t max_box_size = limit_of(args[2]);
    Py_ssize_t max_keys = limit_of(args[3]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *boxes = PyList_New(0);
    if (boxes == NULL) {
        return NULL;
    }
    Py_ssize_t pos = start;
    PyObject *data = args[0];
    if (PyBytes_CheckExact(data) && start >= 0) {
        pos = scan_boxes((const unsigned char *)PyBytes_AS_STRING(data), start,
                         PyBytes_GET_SIZE(data), max_box_size, max_keys, boxes);
        if (pos < 0) {
            Py_DECREF(boxes);
            return NULL;
        }
    }
    PyObject *result = Py_BuildValue("(Nn)", boxes, pos);
    return result;
}

PyDoc_STRVAR(parse_boxes_doc,
"parse_boxes($module, data, /)\n--\n\n"
"Parse a complete AMP byte stream into its boxes.\n\n"
"Raises:\n"
"    ProtocolError: ``data`` is not valid AMP, or it ends inside a box.");

/* Mirrors _wire.parse_boxes: one pass, and _parse_boxes_reference for anything else. */
static PyObject *
py_parse_boxes(PyObject *module, PyObject *data)
{
    if (check_setup() < 0) {
        return NULL;
    }
    if (PyBytes_CheckExact(data)) {
        PyObject *boxes = PyList_New(0);
        if (boxes == NULL) {
            return NULL;
        }
        Py_ssize_t end = PyBytes_GET_SIZE(data);
        Py_ssize_t pos = scan_boxes((const unsigned char *)PyBytes_AS_STRING(data), 0, end,
                                    PY_SSIZE_T_MAX, PY_SSIZE_T_MAX, boxes);
        if (pos == end) {
            return boxes;
        }
        Py_DECREF(boxes);
        if (pos < 0) {
            return NULL;
        }
    }
    return PyObject_CallOneArg(python_parse_boxes, data);
}

PyDoc_STRVAR(encode_box_doc,
"encode_box($module, box, /)\n--\n\n"
"Serialize one box, keys in sorted order, terminator included.\n\n"
"Args:\n"
"    box: Wire keys to wire values.\n\n"
"Returns:\n"
"    The box's bytes, exactly as Twisted's ``AmpBox.serialize`` writes them.\n\n"
"Raises:\n"
"    TypeError: A key or value is not bytes.\n"
"    ValueError: A key is empty.\n"
"    TooLongError: A key is over 255 bytes or a value over 65,535 bytes.");

/*
 * Mirrors _wire.encode_box for a dict of bytes keys (1 to 255 bytes) to bytes values
 * (up to 65,535 bytes): the box is written straight into one bytes object. Anything else
 * (another mapping, keys that do not sort, another type, a length over its limit) goes
 * to the Python encode_box, which writes it or raises the error.
 */
/*
 * py_encode_box's shortcut for a box built in sorted key order (as the usual boxes are,
 * and as boxes decoded from Twisted's wire are): if iterating the dict gives its keys
 * in strictly increasing byte order, that is sorted(box), and the box is written in two
 * passes over the dict, with no list of keys to sort and no lookups. Returns the bytes;
 * or NULL with no exception set if the box is not such a box of usual pairs (then
 * py_encode_box takes the general way), or NULL with an exception set.
 */
static PyObject *
encode_sorted_dict(PyObject *box)
{
    Py_ssize_t i = 0;
    PyObject *key, *value;
    const char *previous = NULL;
    Py_ssize_t previous_len = 0;
    Py_ssize_t total = 2; /* BOX_END */
    while (PyDict_Next(box, &i, &key, &value)) {
        if (!PyBytes_CheckExact(key) || !PyBytes_CheckExact(value)) {
            return NULL;
        }
        Py_ssize_t klen = PyBytes_GET_SIZE(key);
        Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        if (klen < 1 || klen > MAX_KEY_LENGTH || vlen > MAX_VALUE_LENGTH) {
            return NULL;
        }
        const char *k = PyBytes_AS_STRING(key);
        if (previous != NULL) {
            /* bytes order: byte by byte, then the shorter first (keys are never equal) */
            int order = memcmp(previous, k, previous_len < klen ? previous_len : klen);
            if (order > 0 || (order == 0 && previous_len > klen)) {
                return NULL;
            }
        }
        previous = k;
        previous_len = klen;
        total += 4 + klen + vlen;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        return NULL;
    }
    char *out = PyBytes_AS_STRING(result);
    i = 0;
    /* Bytes keys and values run no code: the dict is as the first pass saw it. */
    while (PyDict_Next(box, &i, &key, &value)) {
        Py_ssize_t klen = PyBytes_GET_SIZE(key);
        Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        *out++ = 0;
        *out++ = (char)klen;
        memcpy(out, PyBytes_AS_STRING(key), klen);
        out += klen;
        *out++ = (char)(vlen >> 8);
        *out++ = (char)(vlen & 0xff);
        memcpy(out, PyBytes_AS_STRING(value), vlen);
        out += vlen;
    }
    out[0] = 0;
    out[1] = 0;
    return result;
}

static PyObject *
py_encode_box(PyObject *module, PyObject *box)
{
    if (check_setup() < 0) {
        return NULL;
    }
    if (!PyDict_CheckExact(box)) {
        return PyObject_CallOneArg(python_encode_box, box);
    }
    PyObject *encoded = encode_sorted_dict(box);
    if (encoded != NULL || PyErr_Occurred()) {
        return encoded;
    }
    PyObject *keys = PyDict_Keys(box); /* sorted(box) */
    if (keys == NULL) {
        return NULL;
    }
    if (PyList_Sort(keys) < 0) {
        PyErr_Clear();
        goto fallback;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    Py_ssize_t total = 2; /* BOX_END */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(key)) {
            goto fallback;
        }
        Py_ssize_t klen = PyBytes_GET_SIZE(key);
        if (klen < 1 || klen > MAX_KEY_LENGTH) {
            goto fallback;
        }
        PyObject *value = PyDict_GetItemWithError(box, key); /* borrowed */
        if (value == NULL || !PyBytes_CheckExact(value)) {
            PyErr_Clear();
            goto fallback;
        }
        Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        if (vlen > MAX_VALUE_LENGTH) {
            goto fallback;
        }
        total += 4 + klen + vlen;
    }
    PyObject *result = PyBytes_FromStringAndSize(NULL, total);
    if (result == NULL) {
        Py_DECREF(keys);
        return NULL;
    }
    char *out = PyBytes_AS_STRING(result);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        PyObject *value = PyDict_GetItem(box, key); /* found above: bytes keys run no code */
        Py_ssize_t klen = PyBytes_GET_SIZE(key);
        Py_ssize_t vlen = PyBytes_GET_SIZE(value);
        *out++ = 0;
        *out++ = (char)klen;
        memcpy(out, PyBytes_AS_STRING(key), klen);
        out += klen;
        *out++ = (char)(vlen >> 8);
        *out++ = (char)(vlen & 0xff);
        memcpy(out, PyBytes_AS_STRING(value), vlen);
        out += vlen;
    }
    out[0] = 0;
    out[1] = 0;
    Py_DECREF(keys);
    return result;

fallback:
    Py_DECREF(keys);
    return PyObject_CallOneArg(python_encode_box, box);
}

PyDoc_STRVAR(encode_items_doc,
"encode_items($module, items, parts, /)\n--\n\n"
"Append the wire form of sorted ``items`` to ``parts``, checking every length.");

/*
 * Mirrors _wire.encode_items: each (bytes key of 1 to 255 bytes, bytes value up to 65,535
 * bytes) pair is appended as its four parts; any other item goes alone to the Python
 * encode_items, which appends it or raises the error (after the parts of the items before
 * it, as the Python loop leaves them).
 */
static PyObject *
py_encode_items(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_setup() < 0) {
        return NULL;
    }
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "encode_items() takes 2 arguments");
        return NULL;
    }
    PyObject *items = args[0];
    PyObject *parts = args[1];
    if (!PyList_CheckExact(parts)) {
        return PyObject_Vectorcall(python_encode_items, args, 2, NULL);
    }
    PyObject *iterator = PyObject_GetIter(items);
    if (iterator == NULL) {
        return NULL;
    }
    PyObject *item;
    while ((item = PyIter_Next(iterator)) != NULL) {
        PyObject *key, *value;
        Py_ssize_t klen, vlen;
        if (PyTuple_CheckExact(item) && PyTuple_GET_SIZE(item) == 2 &&
            PyBytes_CheckExact(key = PyTuple_GET_ITEM(item, 0)) &&
            (klen = PyBytes_GET_SIZE(key)) >= 1 && klen <= MAX_KEY_LENGTH &&
            PyBytes_CheckExact(value = PyTuple_GET_ITEM(item, 1)) &&
            (vlen = PyBytes_GET_SIZE(value)) <= MAX_VALUE_LENGTH) {
            /* parts += (prefixes[len(key)], key, prefixes[n], given) */
            PyObject *kprefix = length_prefix(klen);
            PyObject *vprefix = kprefix ? length_prefix(vlen) : NULL;
            int failed = vprefix == NULL || PyList_Append(parts, kprefix) < 0 ||
                         PyList_Append(parts, key) < 0 || PyList_Append(parts, vprefix) < 0 ||
                         PyList_Append(parts, value) < 0;
            Py_XDECREF(kprefix);
            Py_XDECREF(vprefix);
            Py_DECREF(item);
            if (failed) {
                Py_DECREF(iterator);
                return NULL;
            }
            continue;
        }
        /* encode_items(((key, value),), parts): the general way, for this item alone. */
        PyObject *one = PyTuple_Pack(1, item);
        Py_DECREF(item);
        PyObject *done = one ? PyObject_CallFunctionObjArgs(python_encode_items, one, parts, NULL)
                             : NULL;
        Py_XDECREF(one);
        if (done == NULL) {
            Py_DECREF(iterator);
            return NULL;
        }
        Py_DECREF(done);
    }
    Py_DECREF(iterator);
    if (PyErr_Occurred()) {
        return NULL;
    }
    Py_RETURN_NONE;
}

/*
 * BoxDecoder: mirrors the class _wire.BoxDecoder (the pure-Python one, _wire.PythonBoxDecoder),
 * method by method, with the same state: the box being built (a dict), the wire bytes of
 * its complete pairs, the start of an incomplete pair (a C buffer here, a bytearray
 * there), how many bytes that pair needs, the stream offset of the first unparsed byte,
 * and the error that broke the stream. Unlike the functions above it takes every input
 * itself, errors included, because it owns its state: each error is built as _error_at
 * builds it, with the same type and message (tests/test_speedups.py and
 * tests/fuzz_speedups.py feed both classes the same bytes, cut everywhere).
 *
 * Buffering: the incomplete pair is at most 2 + 255 + 2 + 65,535 bytes, and its buffer
 * is allocated at the size the pair needs once its length is known, so a big value that
 * arrives in many small reads is copied into it once (no reallocation, no re-parsing),
 * as _complete_pair does.
 */

/* Mirrors _wire.DEFAULT_MAX_BOX_SIZE and _wire.DEFAULT_MAX_KEYS (tests check they agree). */
#define DEFAULT_MAX_BOX_SIZE (16 * 1024 * 1024)
#define DEFAULT_MAX_KEYS 1024

static PyObject *protocol_error = NULL; /* _errors.ProtocolError, given by setup_decoder() */
static PyObject *describe_start = NULL; /* _wire._describe_start */

typedef struct {
    PyObject_HEAD
    PyObject *max_box_size_obj; /* the ints as set, for the properties and the messages */
    PyObject *max_keys_obj;
    Py_ssize_t max_box_size; /* the same, as C sizes (limit_of: past the C size, no limit) */
    Py_ssize_t max_keys;
    PyObject *box;         /* _box: the box being built, or NULL (None, or an empty dict) */
    Py_ssize_t box_size;   /* _box_size */
    unsigned char *rest;   /* _rest: rest_len bytes, in a buffer of rest_cap bytes */
    Py_ssize_t rest_len;
    Py_ssize_t rest_cap;
    Py_ssize_t need;       /* _need */
    Py_ssize_t offset;     /* _offset */
    PyObject *error;       /* _error: a ProtocolError, or NULL */
} Decoder;

static int
decoder_traverse(Decoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->max_box_size_obj);
    Py_VISIT(self->max_keys_obj);
    Py_VISIT(self->box);
    Py_VISIT(self->error);
    return 0;
}

static int
decoder_clear(Decoder *self)
{
    Py_CLEAR(self->max_box_size_obj);
    Py_CLEAR(self->max_keys_obj);
    Py_CLEAR(self->box);
    Py_CLEAR(self->error);
    return 0;
}

static void
decoder_drop_rest(Decoder *self)
{
    PyMem_Free(self->rest);
    self->rest = NULL;
    self->rest_len = 0;
    self->rest_cap = 0;
}

static void
decoder_dealloc(Decoder *self)
{
    PyObject_GC_UnTrack(self);
    decoder_clear(self);
    decoder_drop_rest(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Sets a limit as the setters of max_box_size and max_keys do (their checks, their message). */
static int
set_limit(PyObject *value, const char *name, PyObject **obj, Py_ssize_t *limit)
{
    if (value == NULL) {
        PyErr_Format(PyExc_AttributeError, "cannot delete %s", name);
        return -1;
    }
    /* not isinstance(value, int) or isinstance(value, bool) or value < 1 */
    int positive = 0;
    if (PyLong_Check(value) && !PyBool_Check(value)) {
        PyObject *zero = PyLong_FromLong(0);
        if (zero == NULL) {
            return -1;
        }
        positive = PyObject_RichCompareBool(value, zero, Py_GT);
        Py_DECREF(zero);
        if (positive < 0) {
            return -1;
        }
    }
    if (!positive) {
        PyErr_Format(PyExc_ValueError, "%s must be a positive int, not %R", name, value);
        return -1;
    }
    Py_ssize_t as_size = limit_of(value);
    if (as_size == -1 && PyErr_Occurred()) {
        return -1;
    }
    Py_INCREF(value);
    Py_XSETREF(*obj, value);
    *limit = as_size;
    return 0;
}

static PyObject *
decoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    Decoder *self = (Decoder *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    /* The defaults, so that an instance whose __init__ was not run is still usable. */
    self->max_box_size_obj = PyLong_FromLong(DEFAULT_MAX_BOX_SIZE);
    self->max_keys_obj = PyLong_FromLong(DEFAULT_MAX_KEYS);
    if (self->max_box_size_obj == NULL || self->max_keys_obj == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->max_box_size = DEFAULT_MAX_BOX_SIZE;
    self->max_keys = DEFAULT_MAX_KEYS;
    return (PyObject *)self;
}

/* Mirrors BoxDecoder.__init__ (keyword-only limits; a second call starts afresh too). */
static int
decoder_init(Decoder *self, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"max_box_size", "max_keys", NULL};
    PyObject *max_box_size = NULL;
    PyObject *max_keys = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|$OO:BoxDecoder", keywords, &max_box_size,
                                     &max_keys)) {
        return -1;
    }
    PyObject *default_size = NULL;
    PyObject *default_keys = NULL;
    if (max_box_size == NULL) {
        max_box_size = default_size = PyLong_FromLong(DEFAULT_MAX_BOX_SIZE);
    }
    if (max_keys == NULL) {
        max_keys = default_keys = PyLong_FromLong(DEFAULT_MAX_KEYS);
    }
    int failed = max_box_size == NULL || max_keys == NULL ||
                 set_limit(max_box_size, "max_box_size", &self->max_box_size_obj,
                           &self->max_box_size) < 0 ||
                 set_limit(max_keys, "max_keys", &self->max_keys_obj, &self->max_keys) < 0;
    Py_XDECREF(default_size);
    Py_XDECREF(default_keys);
    if (failed) {
        return -1;
    }
    Py_CLEAR(self->box);
    self->box_size = 0;
    decoder_drop_rest(self);
    self->need = 0;
    self->offset = 0;
    Py_CLEAR(self->error);
    return 0;
}

/* Copies buf[0:n] to the end of the buffered partial pair, which has room for `need` bytes. */
static int
rest_append(Decoder *self, const unsigned char *buf, Py_ssize_t n)
{
    Py_ssize_t size = self->rest_len + n;
    if (size > self->rest_cap) {
        /* The pair needs self->need bytes in all (at most 65,794): room for all of them. */
        Py_ssize_t cap = self->need > size ? self->need : size;
        unsigned char *grown = PyMem_Realloc(self->rest, cap);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        self->rest = grown;
        self->rest_cap = cap;
    }
    memcpy(self->rest + self->rest_len, buf, n);
    self->rest_len = size;
    return 0;
}

/*
 * Mirrors BoxDecoder._error_at: the ProtocolError for what is wrong at buf[pos], as a new
 * reference (NULL with an exception set if even that failed). `what` is 'e' (an empty box),
 * 'k' (a key length over 255) or 'l' (a limit).
 */
static PyObject *
error_at(Decoder *self, const unsigned char *buf, Py_ssize_t end, Py_ssize_t pos, char what,
         Py_ssize_t size, Py_ssize_t pair)
{
    Py_ssize_t offset = self->offset + pos;
    PyObject *message;
    if (what == 'e') {
        message = PyUnicode_FromFormat(
            "empty box at stream offset %zd: a box needs at least one key", offset);
    }
    else if (what == 'k') {
        /* _describe_start(data[pos:]) looks at 24 bytes at most (text_head). */
        Py_ssize_t klen = (Py_ssize_t)buf[pos] << 8 | buf[pos + 1];
        Py_ssize_t head = end - pos < 24 ? end - pos : 24;
        PyObject *start = PyBytes_FromStringAndSize((const char *)buf + pos, head);
        PyObject *described = start ? PyObject_CallOneArg(describe_start, start) : NULL;
        Py_XDECREF(start);
        if (described == NULL) {
            return NULL;
        }
        message = PyUnicode_FromFormat(
            "key length %zd at stream offset %zd is over the AMP limit of %d%U", klen, offset,
            MAX_KEY_LENGTH, described);
        Py_DECREF(described);
    }
    else if (size + pair > self->max_box_size) {
        Py_ssize_t klen = buf[pos + 1];
        PyObject *key = PyBytes_FromStringAndSize((const char *)buf + pos + 2, klen);
        if (key == NULL) {
            return NULL;
        }
        message = PyUnicode_FromFormat(
            "box at stream offset %zd is over the limit of %S bytes (key %R brings it to %zd)",
            offset - size, self->max_box_size_obj, key, size + pair);
        Py_DECREF(key);
    }
    else {
        message = PyUnicode_FromFormat("box at stream offset %zd has more than %S keys",
                                       offset - size, self->max_keys_obj);
    }
    if (message == NULL) {
        return NULL;
    }
    PyObject *error = PyObject_CallOneArg(protocol_error, message);
    Py_DECREF(message);
    return error;
}

/*
 * The keys decoded lately, so that the usual keys are neither allocated nor hashed again
 * in every box (a bytes object keeps its hash once computed). A bytes object cannot
 * change, so handing out the one kept for an equal key is the same as making a new one.
 * One slot per (length, first byte, last byte) class; a new key takes its class's slot.
 */
#define KEY_CACHE_SIZE 256
#define KEY_CACHE_MAX_LENGTH 32
static PyObject *key_cache[KEY_CACHE_SIZE];

/* data[start:stop] for a key (1 to 255 bytes), as a new reference. */
static PyObject *
key_at(const unsigned char *key, Py_ssize_t klen)
{
    if (klen > KEY_CACHE_MAX_LENGTH) {
        return PyBytes_FromStringAndSize((const char *)key, klen);
    }
    size_t slot = ((size_t)klen * 61 + (size_t)key[0] * 7 + key[klen - 1]) % KEY_CACHE_SIZE;
    PyObject *kept = key_cache[slot];
    if (kept != NULL && PyBytes_GET_SIZE(kept) == klen &&
        memcmp(PyBytes_AS_STRING(kept), key, klen) == 0) {
        Py_INCREF(kept);
        return kept;
    }
    PyObject *made = PyBytes_FromStringAndSize((const char *)key, klen);
    if (made != NULL) {
        Py_INCREF(made);
        Py_XSETREF(key_cache[slot], made);
    }
    return made;
}

/*
 * Mirrors BoxDecoder._parse: buf[start:end] pair by pair, from the next byte of the stream.
 * (The Python method takes the whole boxes at the start of a box in one pass, then
 * checks the limits once for all of them; here every pair is checked as it is added,
 * which is what that pass is equivalent to, and cheap in C.)
 *
 * Returns 0; or -1 with *fault set to the ProtocolError (the stream is bad: the caller
 * records it); or -2 with an exception set (no memory...).
 */
static int
decoder_parse(Decoder *self, const unsigned char *buf, Py_ssize_t end, Py_ssize_t start,
              PyObject *boxes, PyObject **fault)
{
    PyObject *box = self->box; /* owned by this function until it is put back */
    self->box = NULL;
    Py_ssize_t size = self->box_size;
    Py_ssize_t max_box_size = self->max_box_size;
    Py_ssize_t max_keys = self->max_keys;
    if (start) {
        self->offset -= start; /* stream offsets are counted from buf[0] while parsing */
    }
    Py_ssize_t pos = start;
    self->need = 2;
    while (end - pos >= 2) {
        /* A key length's first byte is 0, or the key is over MAX_KEY_LENGTH (255). */
        if (buf[pos]) {
            *fault = error_at(self, buf, end, pos, 'k', 0, 0);
            goto failed;
        }
        Py_ssize_t klen = buf[pos + 1];
        if (!klen) {
            if (box == NULL || PyDict_GET_SIZE(box) == 0) {
                *fault = error_at(self, buf, end, pos, 'e', 0, 0);
                goto failed;
            }
            int appended = PyList_Append(boxes, box);
            Py_CLEAR(box);
            if (appended < 0) {
                goto crashed;
            }
            size = 0;
            pos += 2;
            continue;
        }
        Py_ssize_t vpos = pos + 2 + klen;
        if (end - vpos < 2) {
            self->need = vpos + 2 - pos;
            break;
        }
        Py_ssize_t stop = vpos + 2 + ((Py_ssize_t)buf[vpos] << 8 | buf[vpos + 1]);
        Py_ssize_t pair = stop - pos;
        if (size + pair > max_box_size || (box != NULL && PyDict_GET_SIZE(box) >= max_keys)) {
            *fault = error_at(self, buf, end, pos, 'l', size, pair);
            goto failed;
        }
        if (stop > end) {
            self->need = pair;
            break;
        }
        if (box == NULL && (box = PyDict_New()) == NULL) {
            goto crashed;
        }
        /* box[data[pos + 2 : vpos]] = data[vpos + 2 : stop] */
        PyObject *key = key_at(buf + pos + 2, klen);
        PyObject *value =
            key ? PyBytes_FromStringAndSize((const char *)buf + vpos + 2, stop - vpos - 2) : NULL;
        int added = value ? PyDict_SetItem(box, key, value) : -1;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (added < 0) {
            goto crashed;
        }
        size += pair;
        pos = stop;
    }
    /* XSETREF, not `=`: should code run by an allocation (a finalizer) have fed this
       decoder meanwhile, its box is dropped, not leaked. */
    Py_XSETREF(self->box, box);
    self->box_size = size;
    self->offset += pos;
    if (pos < end) {
        /* self._rest = bytearray(data[pos:]): the caller has no rest buffered now. */
        self->rest_len = 0;
        return rest_append(self, buf + pos, end - pos) < 0 ? -2 : 0;
    }
    return 0;

failed:
    Py_XDECREF(box);
    return *fault == NULL ? -2 : -1;

crashed:
    /* As when a Python statement fails halfway: what was added to the box stays. */
    Py_XSETREF(self->box, box);
    return -2;
}

/*
 * Mirrors BoxDecoder._complete_pair: completes the buffered partial pair with just the
 * bytes of buf it needs, parsing it (alone) each time a part of it is complete. Returns
 * where the rest of buf starts, -1 if all of it went into the buffer, or -2/-3 as
 * decoder_parse returns -1/-2.
 */
static Py_ssize_t
decoder_complete_pair(Decoder *self, const unsigned char *buf, Py_ssize_t len, PyObject *boxes,
                      PyObject **fault)
{
    Py_ssize_t start = 0;
    while (self->rest_len) {
        Py_ssize_t take = self->need - self->rest_len;
        if (take > len - start) {
            return rest_append(self, buf + start, len - start) < 0 ? -3 : -1;
        }
        if (rest_append(self, buf + start, take) < 0) {
            return -3;
        }
        start += take;
        /* self._rest = None; self._parse(bytes(rest), boxes): the buffer is parsed alone. */
        unsigned char *pair = self->rest;
        Py_ssize_t pair_len = self->rest_len;
        self->rest = NULL;
        self->rest_len = 0;
        self->rest_cap = 0;
        int parsed = decoder_parse(self, pair, pair_len, 0, boxes, fault);
        PyMem_Free(pair);
        if (parsed < 0) {
            return parsed - 1;
        }
    }
    return start;
}

/* The stream is broken: mirrors the `except ProtocolError` blocks of receive_data(_partial). */
static void
decoder_break(Decoder *self, PyObject *fault)
{
    Py_XSETREF(self->error, fault); /* steals fault */
    Py_CLEAR(self->box);
    self->box_size = 0;
    decoder_drop_rest(self);
}

/*
 * Mirrors BoxDecoder.receive_data_partial. Returns 0 (*fault NULL, or the new reference to
 * the error that stopped the stream) or -1 with an exception set.
 */
static int
decoder_feed(Decoder *self, PyObject *data, PyObject *boxes, PyObject **fault)
{
    *fault = NULL;
    if (self->error != NULL) {
        Py_INCREF(self->error);
        *fault = self->error;
        return 0;
    }
    if (protocol_error == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "asyncio_amp._speedups: setup_decoder() was not called");
        return -1;
    }
    Py_buffer view;
    const unsigned char *buf;
    Py_ssize_t len;
    int viewed = 0;
    if (PyBytes_Check(data)) {
        buf = (const unsigned char *)PyBytes_AS_STRING(data);
        len = PyBytes_GET_SIZE(data);
    }
    else {
        /* Another bytes-like object: read as bytes (keys and values are bytes). */
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            return -1;
        }
        viewed = 1;
        buf = view.buf;
        len = view.len;
    }
    int result;
    if (!self->rest_len) {
        result = decoder_parse(self, buf, len, 0, boxes, fault);
    }
    else {
        Py_ssize_t start = decoder_complete_pair(self, buf, len, boxes, fault);
        if (start >= 0 && start < len) {
            result = decoder_parse(self, buf, len, start, boxes, fault);
        }
        else {
            result = start < -1 ? (int)start + 1 : 0;
        }
    }
    if (viewed) {
        PyBuffer_Release(&view);
    }
    if (result == -1) {
        Py_INCREF(*fault);
        decoder_break(self, *fault);
        return 0;
    }
    return result < 0 ? -1 : 0;
}

PyDoc_STRVAR(receive_data_doc,
"receive_data($self, data, /)\n--\n\n"
"Parse ``data`` and return the boxes it completes, in order.\n\n"
"Raises:\n"
"    ProtocolError: The stream is not valid AMP or breaks a limit. The boxes\n"
"        completed before the bad bytes are lost to the caller; use\n"
"        [`receive_data_partial`][] to keep them.");

/* Mirrors BoxDecoder.receive_data. */
static PyObject *
decoder_receive_data(Decoder *self, PyObject *data)
{
    PyObject *boxes = PyList_New(0);
    if (boxes == NULL) {
        return NULL;
    }
    PyObject *fault;
    if (decoder_feed(self, data, boxes, &fault) < 0) {
        Py_DECREF(boxes);
        return NULL;
    }
    if (fault != NULL) {
        Py_DECREF(boxes);
        /* raise error: the same exception object every time */
        PyErr_SetObject((PyObject *)Py_TYPE(fault), fault);
        Py_DECREF(fault);
        return NULL;
    }
    return boxes;
}

PyDoc_STRVAR(receive_data_partial_doc,
"receive_data_partial($self, data, /)\n--\n\n"
"Parse ``data``; return the boxes it completes and the error that stopped it, if any.\n\n"
"The boxes that came before bad bytes are returned with the error, so a\n"
"connection can act on everything the peer sent correctly before it failed.");

/* Mirrors BoxDecoder.receive_data_partial. */
static PyObject *
decoder_receive_data_partial(Decoder *self, PyObject *data)
{
    PyObject *boxes = PyList_New(0);
    if (boxes == NULL) {
        return NULL;
    }
    PyObject *fault;
    if (decoder_feed(self, data, boxes, &fault) < 0) {
        Py_DECREF(boxes);
        return NULL;
    }
    if (fault == NULL) {
        Py_INCREF(Py_None);
        fault = Py_None;
    }
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(boxes);
        Py_DECREF(fault);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, boxes);
    PyTuple_SET_ITEM(result, 1, fault);
    return result;
}

static int
decoder_in_box(Decoder *self)
{
    return (self->box != NULL && PyDict_GET_SIZE(self->box) > 0) || self->rest_len > 0;
}

PyDoc_STRVAR(end_of_stream_doc,
"end_of_stream($self, /)\n--\n\n"
"Report whether the stream stopped in the middle of a box.\n\n"
"Returns:\n"
"    A [`ProtocolError`][] describing the unfinished box, or ``None`` if\n"
"    the stream ended on a box boundary.");

/* Mirrors BoxDecoder.end_of_stream. */
static PyObject *
decoder_end_of_stream(Decoder *self, PyObject *unused)
{
    if (self->error != NULL || !decoder_in_box(self)) {
        Py_RETURN_NONE;
    }
    if (protocol_error == NULL) {
        PyErr_SetString(PyExc_RuntimeError,
                        "asyncio_amp._speedups: setup_decoder() was not called");
        return NULL;
    }
    PyObject *message = PyUnicode_FromFormat(
        "the stream ended inside a box (%zd bytes of it received, %zd complete keys)",
        self->box_size + self->rest_len, self->box ? PyDict_GET_SIZE(self->box) : 0);
    if (message == NULL) {
        return NULL;
    }
    PyObject *error = PyObject_CallOneArg(protocol_error, message);
    Py_DECREF(message);
    return error;
}

PyDoc_STRVAR(skip_doc,
"_skip($self, nbytes, /)\n--\n\n"
"Account for ``nbytes`` of whole boxes that were parsed without the decoder.");

/* Mirrors BoxDecoder._skip. */
static PyObject *
decoder_skip(Decoder *self, PyObject *nbytes)
{
    Py_ssize_t n = PyLong_AsSsize_t(nbytes);
    if (n == -1 && PyErr_Occurred()) {
        return NULL;
    }
    self->offset += n;
    Py_RETURN_NONE;
}

static PyObject *
decoder_get_max_box_size(Decoder *self, void *closure)
{
    Py_INCREF(self->max_box_size_obj);
    return self->max_box_size_obj;
}

static int
decoder_set_max_box_size(Decoder *self, PyObject *value, void *closure)
{
    return set_limit(value, "max_box_size", &self->max_box_size_obj, &self->max_box_size);
}

static PyObject *
decoder_get_max_keys(Decoder *self, void *closure)
{
    Py_INCREF(self->max_keys_obj);
    return self->max_keys_obj;
}

static int
decoder_set_max_keys(Decoder *self, PyObject *value, void *closure)
{
    return set_limit(value, "max_keys", &self->max_keys_obj, &self->max_keys);
}

static PyObject *
decoder_get_in_box(Decoder *self, void *closure)
{
    return PyBool_FromLong(decoder_in_box(self));
}

static PyObject *
decoder_get_buffered(Decoder *self, void *closure)
{
    return PyLong_FromSsize_t(self->box_size + self->rest_len);
}

static PyObject *
decoder_get_at_boundary(Decoder *self, void *closure)
{
    return PyBool_FromLong(!decoder_in_box(self) && self->error == NULL);
}

static PyObject *
decoder_get_rest(Decoder *self, void *closure)
{
    if (!self->rest_len) {
        Py_RETURN_NONE;
    }
    /* A copy: the buffer stays the decoder's. */
    return PyByteArray_FromStringAndSize((const char *)self->rest, self->rest_len);
}

static PyObject *
decoder_get_offset(Decoder *self, void *closure)
{
    return PyLong_FromSsize_t(self->offset);
}

static PyObject *
decoder_get_error(Decoder *self, void *closure)
{
    PyObject *error = self->error ? self->error : Py_None;
    Py_INCREF(error);
    return error;
}

static PyGetSetDef decoder_getset[] = {
    {"max_box_size", (getter)decoder_get_max_box_size, (setter)decoder_set_max_box_size,
     "The most bytes the keys and values of one box may take (settable).", NULL},
    {"max_keys", (getter)decoder_get_max_keys, (setter)decoder_set_max_keys,
     "The most keys one box may have (settable).", NULL},
    {"in_box", (getter)decoder_get_in_box, NULL,
     "``True`` if part of a box has been received and its end has not.", NULL},
    {"buffered", (getter)decoder_get_buffered, NULL,
     "Bytes received that belong to the unfinished box.", NULL},
    {"_at_boundary", (getter)decoder_get_at_boundary, NULL,
     "``True`` if the decoder is between boxes and not broken (nothing is buffered).", NULL},
    {"_rest", (getter)decoder_get_rest, NULL,
     "A copy of the start of an incomplete pair, or ``None``.", NULL},
    {"_offset", (getter)decoder_get_offset, NULL,
     "The stream offset of the first byte not parsed yet.", NULL},
    {"_error", (getter)decoder_get_error, NULL,
     "The error that broke the stream, or ``None``.", NULL},
    {NULL},
};

static PyMethodDef decoder_methods[] = {
    {"receive_data", (PyCFunction)decoder_receive_data, METH_O, receive_data_doc},
    {"receive_data_partial", (PyCFunction)decoder_receive_data_partial, METH_O,
     receive_data_partial_doc},
    {"end_of_stream", (PyCFunction)decoder_end_of_stream, METH_NOARGS, end_of_stream_doc},
    {"_skip", (PyCFunction)decoder_skip, METH_O, skip_doc},
    {NULL, NULL, 0, NULL},
};

/* The docstring of _wire.BoxDecoder. */
PyDoc_STRVAR(decoder_doc,
"BoxDecoder(*, max_box_size=16777216, max_keys=1024)\n--\n\n"
"Turn a byte stream into boxes, incrementally.\n\n"
"Feed it bytes as they arrive with [`receive_data`][]; it returns the boxes\n"
"completed by those bytes. A partial box is kept between calls: each complete\n"
"key/value pair is moved into the box being built as soon as it has arrived, so\n"
"only one partial pair (at most 65,797 bytes) is ever buffered, and a stream fed\n"
"one byte at a time is still decoded in time proportional to its length.\n\n"
"After a [`ProtocolError`][] the decoder is broken: every later call raises\n"
"the same error.\n\n"
"Args:\n"
"    max_box_size: The most bytes the keys and values of one box may take on\n"
"        the wire, their length prefixes included (the 2-byte end marker is not\n"
"        counted). Checked as soon as a value's length is known, before its\n"
"        bytes are buffered.\n"
"    max_keys: The most keys one box may have.");

static PyTypeObject DecoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncio_amp._wire.BoxDecoder",
    .tp_basicsize = sizeof(Decoder),
    .tp_dealloc = (destructor)decoder_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = decoder_doc,
    .tp_traverse = (traverseproc)decoder_traverse,
    .tp_clear = (inquiry)decoder_clear,
    .tp_methods = decoder_methods,
    .tp_getset = decoder_getset,
    .tp_init = (initproc)decoder_init,
    .tp_new = decoder_new,
};

PyDoc_STRVAR(setup_decoder_doc,
"setup_decoder($module, protocol_error, describe_start, /)\n--\n\n"
"Give BoxDecoder the error type it raises and _wire._describe_start (_wire calls it).");

static PyObject *
py_setup_decoder(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2 || !PyExceptionClass_Check(args[0]) || !PyCallable_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "setup_decoder(protocol_error, describe_start)");
        return NULL;
    }
    Py_INCREF(args[0]);
    Py_XSETREF(protocol_error, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(describe_start, args[1]);
    Py_RETURN_NONE;
}

/*
 * Parser: mirrors the function _commands._compile_parser generates for one schema (the
 * arguments or the response of a Command), which decodes the rest of a box straight
 * from the received bytes when it has the usual layout: each field's key in order (an
 * optional one may be absent), then the empty key that ends the box. It returns the
 * values and the offset just past the box, or raises for anything else, as the
 * generated code does (its caller then parses the box the general way, which reports
 * any fault). Where the generated code would raise, this raises too: the same
 * exception when a value does not decode, a LookupError when the layout is not the
 * usual one or the bytes stop short.
 */

/* How a field's value is decoded: _commands._INLINE_DECODE, or the argument's from_bytes. */
enum { KIND_CALL = 0, KIND_INTEGER = 1, KIND_BYTES = 2, KIND_STRING = 3, KIND_FLOAT = 4 };

typedef struct {
    PyObject *name;    /* the Python name (a str) */
    PyObject *header;  /* the key's length prefix and bytes */
    PyObject *convert; /* argument.from_bytes, for KIND_CALL */
    int kind;
    int optional;
} ParserField;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *python_parse; /* the generated function: for arguments other than (bytes, int) */
    Py_ssize_t count;
    ParserField *fields;
} Parser;

static int
parser_traverse(Parser *self, visitproc visit, void *arg)
{
    Py_VISIT(self->python_parse);
    for (Py_ssize_t i = 0; i < self->count; i++) {
        Py_VISIT(self->fields[i].name);
        Py_VISIT(self->fields[i].header);
        Py_VISIT(self->fields[i].convert);
    }
    return 0;
}

static int
parser_clear(Parser *self)
{
    Py_CLEAR(self->python_parse);
    for (Py_ssize_t i = 0; i < self->count; i++) {
        Py_CLEAR(self->fields[i].name);
        Py_CLEAR(self->fields[i].header);
        Py_CLEAR(self->fields[i].convert);
    }
    return 0;
}

static void
parser_dealloc(Parser *self)
{
    PyObject_GC_UnTrack(self);
    parser_clear(self);
    PyMem_Free(self->fields);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* int(data[s:p]) (as _INLINE_DECODE's Integer), with plain decimal digits done here. */
static PyObject *
decode_integer(const unsigned char *digits, Py_ssize_t n)
{
    Py_ssize_t i = n > 0 && digits[0] == '-';
    if (n - i >= 1 && n - i <= 18) {
        long long value = 0;
        Py_ssize_t j = i;
        while (j < n && digits[j] >= '0' && digits[j] <= '9') {
            value = value * 10 + (digits[j] - '0');
            j++;
        }
        if (j == n) {
            return PyLong_FromLongLong(i ? -value : value);
        }
    }
    /* Anything else (a sign, spaces, underscores, a fault): int() itself says. */
    PyObject *text = PyBytes_FromStringAndSize((const char *)digits, n);
    if (text == NULL) {
        return NULL;
    }
    PyObject *value = PyNumber_Long(text);
    Py_DECREF(text);
    return value;
}

static PyObject *
decode_value(ParserField *field, const unsigned char *buf, Py_ssize_t n)
{
    if (field->kind == KIND_INTEGER) {
        return decode_integer(buf, n);
    }
    if (field->kind == KIND_STRING) {
        return PyUnicode_DecodeUTF8((const char *)buf, n, NULL); /* .decode("utf-8") */
    }
    PyObject *raw = PyBytes_FromStringAndSize((const char *)buf, n);
    if (raw == NULL || field->kind == KIND_BYTES) {
        return raw;
    }
    PyObject *value =
        field->kind == KIND_FLOAT ? PyNumber_Float(raw) : PyObject_CallOneArg(field->convert, raw);
    Py_DECREF(raw);
    return value;
}

static PyObject *
not_usual(void)
{
    PyErr_SetString(PyExc_LookupError, "not the usual layout");
    return NULL;
}

/* Mirrors the generated `parse(data, p)`, line by line. */
static PyObject *
parser_vectorcall(Parser *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    Py_ssize_t p = -1;
    if (nargs == 2 && kwnames == NULL && PyLong_CheckExact(args[1])) {
        p = PyLong_AsSsize_t(args[1]);
        if (p == -1 && PyErr_Occurred()) {
            PyErr_Clear();
        }
    }
    if (p < 0 || !PyBytes_CheckExact(args[0])) {
        return PyObject_Vectorcall(self->python_parse, args, nargsf, kwnames);
    }
    const unsigned char *data = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t len = PyBytes_GET_SIZE(args[0]);
    PyObject *values = PyDict_New();
    if (values == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < self->count; i++) {
        ParserField *field = &self->fields[i];
        Py_ssize_t size = PyBytes_GET_SIZE(field->header);
        Py_ssize_t s = p + size + 2;
        PyObject *value;
        /* if data[p : s - 2] == header */
        if (p + size <= len && memcmp(data + p, PyBytes_AS_STRING(field->header), size) == 0) {
            if (s > len) {
                Py_DECREF(values);
                return not_usual(); /* data[s - 1]: IndexError */
            }
            Py_ssize_t stop = s + ((Py_ssize_t)data[s - 2] << 8 | data[s - 1]);
            if (stop > len) {
                Py_DECREF(values);
                return not_usual(); /* a long value not all here, or the end past the data */
            }
            value = decode_value(field, data + s, stop - s);
            if (value == NULL) {
                Py_DECREF(values);
                return NULL;
            }
            p = stop;
        }
        else if (field->optional) {
            Py_INCREF(Py_None);
            value = Py_None;
        }
        else {
            Py_DECREF(values);
            return not_usual();
        }
        int set = PyDict_SetItem(values, field->name, value);
        Py_DECREF(value);
        if (set < 0) {
            Py_DECREF(values);
            return NULL;
        }
    }
    /* The empty key that ends the box. */
    if (p + 2 > len || data[p] || data[p + 1]) {
        Py_DECREF(values);
        return not_usual();
    }
    PyObject *end = PyLong_FromSsize_t(p + 2);
    if (end == NULL) {
        Py_DECREF(values);
        return NULL;
    }
    PyObject *result = PyTuple_New(2);
    if (result == NULL) {
        Py_DECREF(values);
        Py_DECREF(end);
        return NULL;
    }
    PyTuple_SET_ITEM(result, 0, values);
    PyTuple_SET_ITEM(result, 1, end);
    return result;
}

/* Parser(python_parse, fields): fields is a tuple of (name, header, kind, from_bytes, optional). */
static PyObject *
parser_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *python_parse, *fields;
    if (!PyArg_ParseTuple(args, "OO!:Parser", &python_parse, &PyTuple_Type, &fields)) {
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(fields);
    Parser *self = (Parser *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)parser_vectorcall;
    Py_INCREF(python_parse);
    self->python_parse = python_parse;
    self->fields = PyMem_Calloc(count ? count : 1, sizeof(ParserField));
    if (self->fields == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *name, *header, *convert;
        int kind, optional;
        if (!PyArg_ParseTuple(PyTuple_GET_ITEM(fields, i), "UO!iOp:Parser field", &name,
                              &PyBytes_Type, &header, &kind, &convert, &optional)) {
            Py_DECREF(self);
            return NULL;
        }
        if (kind < KIND_CALL || kind > KIND_FLOAT || PyBytes_GET_SIZE(header) < 3) {
            PyErr_SetString(PyExc_ValueError, "Parser: bad field");
            Py_DECREF(self);
            return NULL;
        }
        ParserField *field = &self->fields[i];
        Py_INCREF(name);
        field->name = name;
        Py_INCREF(header);
        field->header = header;
        Py_INCREF(convert);
        field->convert = convert;
        field->kind = kind;
        field->optional = optional;
        self->count = i + 1;
    }
    return (PyObject *)self;
}

PyDoc_STRVAR(parser_doc,
"Parser(python_parse, fields, /)\n--\n\n"
"A Command schema's parser of the usual box layout: mirrors the function\n"
"_commands._compile_parser generates (python_parse), called as parse(data, p).");

static PyTypeObject ParserType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncio_amp._speedups.Parser",
    .tp_basicsize = sizeof(Parser),
    .tp_dealloc = (destructor)parser_dealloc,
    .tp_vectorcall_offset = sizeof(PyObject), /* Parser.vectorcall comes first after the head */
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = parser_doc,
    .tp_traverse = (traverseproc)parser_traverse,
    .tp_clear = (inquiry)parser_clear,
    .tp_new = parser_new,
};

/*
 * Encoder: mirrors the function _commands._compile_encoder generates for one box of a
 * Command (its ask, its send without answer, or its answer), which writes the box's
 * keys in sorted order. It handles the usual call only: an exact dict of exactly the
 * schema's names, exact int, bytes, str, float and bool values within the limits, and
 * an exact bytes tag. For anything else it calls the generated function itself, so
 * every error, and every result of an odd value, comes from that one place.
 *
 * It returns what the generated function returns, in fewer parts: (parts, slot) where
 * the box has the tag's placeholder (an ask), parts otherwise. The parts are the box's
 * bytes around the slot's b"" and the long bytes values (KEEP_VALUE_LENGTH): for the
 * usual call, ([head, b"", tail], 1) or [box].
 */

/* How a field's value is encoded: _commands._INLINE_ENCODE, and Boolean.to_bytes. */
enum {
    ENCODE_INTEGER = 1,
    ENCODE_BYTES = 2,
    ENCODE_STRING = 3,
    ENCODE_FLOAT = 4,
    ENCODE_BOOLEAN = 5,
};

/* The steps of the generated function, in the order it writes them. */
enum { STEP_CONSTANT = 0, STEP_SLOT = 1, STEP_PARAMETER = 2, STEP_FIELD = 3 };

typedef struct {
    int op;
    PyObject *data; /* the constant bytes (STEP_CONSTANT), the key's header (STEP_FIELD) */
    PyObject *name; /* the Python name of a field (a str) */
    int kind;
    int optional;
    Py_ssize_t index; /* the parameter's position after `values`, or the field's number */
} EncoderStep;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *python_encode; /* the generated function: it takes anything unusual */
    Py_ssize_t count;        /* steps */
    Py_ssize_t fields;
    Py_ssize_t parameters;
    int has_slot;
    EncoderStep *steps;
} Encoder;

/* One field's value, encoded: n bytes at p, kept alive by the references it holds. */
typedef struct {
    PyObject *value; /* a strong reference to the value, or NULL if it is not written */
    PyObject *owned; /* what p points into when it is neither value nor buf */
    const char *p;
    Py_ssize_t n;
    int kept;     /* whether the value goes into the parts as it is (KEEP_VALUE_LENGTH) */
    char buf[32]; /* a formatted int or float */
} Encoded;

/*
 * A bytes value at least this long goes into the parts as it is, a part of its own, as
 * the generated code puts every value: a call held until the transport drains then
 * keeps the caller's bytes rather than a copy of them. Shorter ones are copied, which
 * costs less than a part of their own.
 */
#define KEEP_VALUE_LENGTH 512

#define ENCODER_STACK_FIELDS 16

static int
encoder_traverse(Encoder *self, visitproc visit, void *arg)
{
    Py_VISIT(self->python_encode);
    for (Py_ssize_t i = 0; i < self->count; i++) {
        Py_VISIT(self->steps[i].data);
        Py_VISIT(self->steps[i].name);
    }
    return 0;
}

static int
encoder_clear(Encoder *self)
{
    Py_CLEAR(self->python_encode);
    for (Py_ssize_t i = 0; i < self->count; i++) {
        Py_CLEAR(self->steps[i].data);
        Py_CLEAR(self->steps[i].name);
    }
    return 0;
}

static void
encoder_dealloc(Encoder *self)
{
    PyObject_GC_UnTrack(self);
    encoder_clear(self);
    PyMem_Free(self->steps);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/*
 * Encode an exact int as `b"%d" % v` does. Returns 0, or 1 for a value it leaves to the
 * generated function (an int too large for a long long whose decimal form fails).
 */
static int
encode_integer(PyObject *v, Encoded *out)
{
    int overflow;
    long long x = PyLong_AsLongLongAndOverflow(v, &overflow);
    if (!overflow && !(x == -1 && PyErr_Occurred())) {
        char *end = out->buf + sizeof(out->buf);
        char *q = end;
        unsigned long long u = x < 0 ? 0ULL - (unsigned long long)x : (unsigned long long)x;
        do {
            *--q = (char)('0' + u % 10);
            u /= 10;
        } while (u);
        if (x < 0) {
            *--q = '-';
        }
        out->p = q;
        out->n = end - q;
        return 0;
    }
    PyErr_Clear();
    PyObject *text = PyObject_Str(v); /* long_to_decimal_string, as "%d" uses for an int */
    if (text == NULL || !PyUnicode_IS_COMPACT_ASCII(text)) {
        Py_XDECREF(text);
        PyErr_Clear();
        return 1; /* e.g. over sys.get_int_max_str_digits(): the generated code says */
    }
    out->owned = text;
    out->p = (const char *)PyUnicode_DATA(text);
    out->n = PyUnicode_GET_LENGTH(text);
    return 0;
}

/* Encode one value of an exact usual type. Returns 0, or 1 for the generated function. */
static int
encode_field(int kind, PyObject *v, Encoded *out)
{
    switch (kind) {
    case ENCODE_INTEGER: /* (b"%d" % v) if type(v) is int */
        return PyLong_CheckExact(v) ? encode_integer(v, out) : 1;
    case ENCODE_BYTES: /* v if type(v) is bytes */
        if (!PyBytes_CheckExact(v)) {
            return 1;
        }
        out->p = PyBytes_AS_STRING(v);
        out->n = PyBytes_GET_SIZE(v);
        return 0;
    case ENCODE_STRING: /* v.encode("utf-8") if type(v) is str */
        if (!PyUnicode_CheckExact(v)) {
            return 1;
        }
        if (PyUnicode_IS_COMPACT_ASCII(v)) {
            out->p = (const char *)PyUnicode_DATA(v);
            out->n = PyUnicode_GET_LENGTH(v);
            return 0;
        }
        out->owned = PyUnicode_AsUTF8String(v);
        if (out->owned == NULL) {
            PyErr_Clear(); /* a lone surrogate: the generated code raises it */
            return 1;
        }
        out->p = PyBytes_AS_STRING(out->owned);
        out->n = PyBytes_GET_SIZE(out->owned);
        return 0;
    case ENCODE_FLOAT: { /* repr(v).encode("ascii") if type(v) is float: float_repr */
        if (!PyFloat_CheckExact(v)) {
            return 1;
        }
        char *text = PyOS_double_to_string(PyFloat_AS_DOUBLE(v), 'r', 0, Py_DTSF_ADD_DOT_0,
                                           NULL);
        if (text == NULL) {
            PyErr_Clear();
            return 1;
        }
        size_t n = strlen(text);
        if (n > sizeof(out->buf)) {
            PyMem_Free(text);
            return 1;
        }
        memcpy(out->buf, text, n);
        PyMem_Free(text);
        out->p = out->buf;
        out->n = (Py_ssize_t)n;
        return 0;
    }
    case ENCODE_BOOLEAN: /* Boolean.to_bytes, for an exact bool */
        if (!PyBool_Check(v)) {
            return 1;
        }
        out->p = v == Py_True ? "True" : "False";
        out->n = v == Py_True ? 4 : 5;
        return 0;
    }
    return 1;
}

static void
release_encoded(Encoded *encoded, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_XDECREF(encoded[i].value);
        Py_XDECREF(encoded[i].owned);
    }
}

/* Take a new segment of `size` bytes as parts[*k]; NULL with an exception set on failure. */
static char *
next_segment(PyObject *parts, Py_ssize_t *k, Py_ssize_t size)
{
    PyObject *segment = PyBytes_FromStringAndSize(NULL, size);
    if (segment == NULL) {
        return NULL;
    }
    PyList_SET_ITEM(parts, (*k)++, segment);
    return PyBytes_AS_STRING(segment);
}

/* Mirrors the generated `encode(values[, tag])`; hands anything unusual to it. */
static PyObject *
encoder_vectorcall(Encoder *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 1 + self->parameters || kwnames != NULL || !PyDict_CheckExact(args[0])) {
        return PyObject_Vectorcall(self->python_encode, args, nargsf, kwnames);
    }
    for (Py_ssize_t i = 1; i < nargs; i++) {
        if (!PyBytes_CheckExact(args[i]) ||
            PyBytes_GET_SIZE(args[i]) >= PyTuple_GET_SIZE(prefixes)) {
            return PyObject_Vectorcall(self->python_encode, args, nargsf, kwnames);
        }
    }
    PyObject *values = args[0];
    Encoded stack[ENCODER_STACK_FIELDS];
    Py_ssize_t stack_segments[ENCODER_STACK_FIELDS + 2];
    Encoded *encoded = stack;
    Py_ssize_t *segments = stack_segments; /* the sizes of the parts this writes */
    if (self->fields > ENCODER_STACK_FIELDS) {
        encoded = PyMem_Malloc(self->fields * sizeof(Encoded));
        segments = PyMem_Malloc((self->fields + 2) * sizeof(Py_ssize_t));
        if (encoded == NULL || segments == NULL) {
            PyMem_Free(encoded);
            PyMem_Free(segments);
            return PyErr_NoMemory();
        }
    }
    Py_ssize_t done = 0; /* fields whose Encoded holds references to release */
    Py_ssize_t counted = 0;
    Py_ssize_t count = 0; /* segments */
    Py_ssize_t size = 0;  /* of the segment being measured */
    Py_ssize_t kept = 0;  /* values that are parts of their own */
    int usual = 1;
    /* First pass: check and encode every value, as the generated code does in order. */
    for (Py_ssize_t i = 0; usual && i < self->count; i++) {
        EncoderStep *step = &self->steps[i];
        switch (step->op) {
        case STEP_CONSTANT:
            size += PyBytes_GET_SIZE(step->data);
            break;
        case STEP_SLOT:
            segments[count++] = size;
            size = 0;
            break;
        case STEP_PARAMETER:
            size += 2 + PyBytes_GET_SIZE(args[1 + step->index]);
            break;
        case STEP_FIELD: {
            Encoded *e = &encoded[done++];
            e->value = e->owned = NULL;
            PyObject *v = PyDict_GetItemWithError(values, step->name);
            if (v == NULL) {
                /* values[name]: a KeyError the generated code raises (or a failed lookup) */
                PyErr_Clear();
                usual = step->optional;
                break;
            }
            counted++;
            if (v == Py_None) {
                usual = step->optional; /* a required None raises _Fallback there */
                break;
            }
            Py_INCREF(v);
            e->value = v;
            if (encode_field(step->kind, v, e) || e->n > MAX_VALUE_LENGTH) {
                usual = 0;
                break;
            }
            size += PyBytes_GET_SIZE(step->data) + 2;
            e->kept = step->kind == ENCODE_BYTES && e->n >= KEEP_VALUE_LENGTH;
            if (e->kept) {
                segments[count++] = size;
                size = 0;
                kept++;
            }
            else {
                size += e->n;
            }
            break;
        }
        }
    }
    segments[count++] = size;
    PyObject *result = NULL;
    /* if len(values) != count: raise _Fallback (a name the schema does not have) */
    if (!usual || PyDict_GET_SIZE(values) != counted) {
        result = PyObject_Vectorcall(self->python_encode, args, nargsf, kwnames);
        goto finish;
    }
    /* Second pass: write the segments, with the tag's slot and the kept values between. */
    PyObject *parts = PyList_New(count + self->has_slot + kept);
    if (parts == NULL) {
        goto finish;
    }
    Py_ssize_t k = 0, slot = -1, segment = 0;
    char *q = next_segment(parts, &k, segments[segment++]);
    for (Py_ssize_t i = 0; q != NULL && i < self->count; i++) {
        EncoderStep *step = &self->steps[i];
        switch (step->op) {
        case STEP_CONSTANT:
            memcpy(q, PyBytes_AS_STRING(step->data), PyBytes_GET_SIZE(step->data));
            q += PyBytes_GET_SIZE(step->data);
            break;
        case STEP_SLOT: { /* b"", which the caller replaces with the tag */
            PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
            if (empty == NULL) {
                q = NULL;
                break;
            }
            slot = k;
            PyList_SET_ITEM(parts, k++, empty);
            q = next_segment(parts, &k, segments[segment++]);
            break;
        }
        case STEP_PARAMETER: { /* _P[len(tag)] + tag */
            PyObject *tag = args[1 + step->index];
            Py_ssize_t n = PyBytes_GET_SIZE(tag);
            *q++ = (char)(n >> 8);
            *q++ = (char)(n & 0xff);
            memcpy(q, PyBytes_AS_STRING(tag), n);
            q += n;
            break;
        }
        case STEP_FIELD: {
            Encoded *e = &encoded[step->index];
            if (e->value == NULL) {
                break; /* an optional value absent or None */
            }
            memcpy(q, PyBytes_AS_STRING(step->data), PyBytes_GET_SIZE(step->data));
            q += PyBytes_GET_SIZE(step->data);
            *q++ = (char)(e->n >> 8);
            *q++ = (char)(e->n & 0xff);
            if (e->kept) {
                Py_INCREF(e->value);
                PyList_SET_ITEM(parts, k++, e->value);
                q = next_segment(parts, &k, segments[segment++]);
            }
            else {
                memcpy(q, e->p, e->n);
                q += e->n;
            }
            break;
        }
        }
    }
    if (q == NULL) {
        Py_DECREF(parts); /* the items not set yet are NULL, which the list skips */
        goto finish;
    }
    if (!self->has_slot) {
        result = parts;
        goto finish;
    }
    PyObject *index = PyLong_FromSsize_t(slot);
    result = index == NULL ? NULL : PyTuple_New(2);
    if (result == NULL) {
        Py_XDECREF(index);
        Py_DECREF(parts);
        goto finish;
    }
    PyTuple_SET_ITEM(result, 0, parts);
    PyTuple_SET_ITEM(result, 1, index);
finish:
    release_encoded(encoded, done);
    if (encoded != stack) {
        PyMem_Free(encoded);
        PyMem_Free(segments);
    }
    return result;
}

/*
 * Encoder(python_encode, steps, parameters, /): steps is a tuple of (0, constant),
 * (1,) for the tag's slot, (2, position) for a parameter after `values`, and
 * (3, name, header, kind, optional) for a field, in the order the generated function
 * writes them.
 */
static PyObject *
encoder_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *python_encode, *steps;
    Py_ssize_t parameters;
    if (!PyArg_ParseTuple(args, "OO!n:Encoder", &python_encode, &PyTuple_Type, &steps,
                          &parameters)) {
        return NULL;
    }
    if (check_setup() < 0) {
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(steps);
    Encoder *self = (Encoder *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->vectorcall = (vectorcallfunc)encoder_vectorcall;
    Py_INCREF(python_encode);
    self->python_encode = python_encode;
    self->parameters = parameters;
    self->steps = PyMem_Calloc(count ? count : 1, sizeof(EncoderStep));
    if (self->steps == NULL) {
        Py_DECREF(self);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *item = PyTuple_GET_ITEM(steps, i);
        EncoderStep *step = &self->steps[i];
        PyObject *data = NULL, *name = NULL;
        int op = -1, bad = 0;
        if (PyTuple_Check(item) && PyTuple_GET_SIZE(item) >= 1) {
            op = PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        }
        if (op == STEP_CONSTANT) {
            if (!PyArg_ParseTuple(item, "iO!:Encoder step", &op, &PyBytes_Type, &data)) {
                Py_DECREF(self);
                return NULL;
            }
        }
        else if (op == STEP_SLOT) {
            bad = PyTuple_GET_SIZE(item) != 1 || self->has_slot;
            self->has_slot = 1;
        }
        else if (op == STEP_PARAMETER) {
            if (!PyArg_ParseTuple(item, "in:Encoder step", &op, &step->index)) {
                Py_DECREF(self);
                return NULL;
            }
            bad = step->index < 0 || step->index >= parameters;
        }
        else if (op == STEP_FIELD) {
            if (!PyArg_ParseTuple(item, "iUO!ip:Encoder step", &op, &name, &PyBytes_Type,
                                  &data, &step->kind, &step->optional)) {
                Py_DECREF(self);
                return NULL;
            }
            bad = step->kind < ENCODE_INTEGER || step->kind > ENCODE_BOOLEAN;
            step->index = self->fields++;
        }
        else {
            PyErr_Clear();
            bad = 1;
        }
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "Encoder: bad step");
            Py_DECREF(self);
            return NULL;
        }
        step->op = op;
        Py_XINCREF(data);
        step->data = data;
        Py_XINCREF(name);
        step->name = name;
        self->count = i + 1;
    }
    return (PyObject *)self;
}

PyDoc_STRVAR(encoder_doc,
"Encoder(python_encode, steps, parameters, /)\n--\n\n"
"A Command box's encoder for the usual values: mirrors the function\n"
"_commands._compile_encoder generates (python_encode), called as encode(values[, tag]).");

static PyTypeObject EncoderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "asyncio_amp._speedups.Encoder",
    .tp_basicsize = sizeof(Encoder),
    .tp_dealloc = (destructor)encoder_dealloc,
    .tp_vectorcall_offset = sizeof(PyObject), /* Encoder.vectorcall comes first after the head */
    .tp_call = PyVectorcall_Call,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = encoder_doc,
    .tp_traverse = (traverseproc)encoder_traverse,
    .tp_clear = (inquiry)encoder_clear,
    .tp_new = encoder_new,
};

PyDoc_STRVAR(setup_doc,
"setup($module, encode_box, encode_items, parse_boxes_reference, prefixes, /)\n--\n\n"
"Give the module the pure-Python functions it hands the unusual input to (_wire calls it).");

static PyObject *
py_setup(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError,
                        "setup(encode_box, encode_items, parse_boxes_reference, prefixes)");
        return NULL;
    }
    Py_ssize_t count = PyTuple_GET_SIZE(args[3]);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *prefix = PyTuple_GET_ITEM(args[3], i);
        const unsigned char *two = (const unsigned char *)PyBytes_AsString(prefix);
        if (two == NULL || PyBytes_GET_SIZE(prefix) != 2 || (two[0] << 8 | two[1]) != i) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "prefixes[n] must be n in 2 big-endian bytes");
            return NULL;
        }
    }
    Py_INCREF(args[0]);
    Py_XSETREF(python_encode_box, args[0]);
    Py_INCREF(args[1]);
    Py_XSETREF(python_encode_items, args[1]);
    Py_INCREF(args[2]);
    Py_XSETREF(python_parse_boxes, args[2]);
    Py_INCREF(args[3]);
    Py_XSETREF(prefixes, args[3]);
    Py_RETURN_NONE;
}

static PyMethodDef speedups_methods[] = {
    {"encode_box", (PyCFunction)py_encode_box, METH_O, encode_box_doc},
    {"encode_items", (PyCFunction)(void (*)(void))py_encode_items, METH_FASTCALL,
     encode_items_doc},
    {"parse_boxes", (PyCFunction)py_parse_boxes, METH_O, parse_boxes_doc},
    {"scan_boxes", (PyCFunction)(void (*)(void))py_scan_boxes, METH_FASTCALL, scan_boxes_doc},
    {"setup", (PyCFunction)(void (*)(void))py_setup, METH_FASTCALL, setup_doc},
    {"setup_decoder", (PyCFunction)(void (*)(void))py_setup_decoder, METH_FASTCALL,
     setup_decoder_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef speedups_module = {
    PyModuleDef_HEAD_INIT,
    "asyncio_amp._speedups",
    "The box codec's hot paths in C: an optional accelerator of asyncio_amp._wire.",
    -1,
    speedups_methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    if (PyType_Ready(&DecoderType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&speedups_module);
    if (module == NULL) {
        return NULL;
    }
    if (PyType_Ready(&ParserType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&ParserType);
    if (PyModule_AddObject(module, "Parser", (PyObject *)&ParserType) < 0) {
        Py_DECREF(&ParserType);
        Py_DECREF(module);
        return NULL;
    }
    if (PyType_Ready(&EncoderType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&EncoderType);
    if (PyModule_AddObject(module, "Encoder", (PyObject *)&EncoderType) < 0) {
        Py_DECREF(&EncoderType);
        Py_DECREF(module);
        return NULL;
    }
    Py_INCREF(&DecoderType);
    if (PyModule_AddObject(module, "BoxDecoder", (PyObject *)&DecoderType) < 0) {
        Py_DECREF(&DecoderType);
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
