/*
 * The optional compiled accelerator of asyncio_amp._wire: the box codec's hot paths in C.
 *
 * _wire.py is the reference; this file mirrors it and never the other way round. Each
 * function below names the Python code it mirrors. It handles only the usual input
 * (exact bytes, well-formed boxes, within the limits) and hands everything else to the
 * Python function it mirrors, so that every error, message and odd argument type
 * comes from one place: the behaviour is the same with or without this module, which
 * tests/test_speedups.py and tests/fuzz_speedups.py check by feeding both the same input.
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
static PyObject *
py_encode_box(PyObject *module, PyObject *box)
{
    if (check_setup() < 0) {
        return NULL;
    }
    if (!PyDict_CheckExact(box)) {
        return PyObject_CallOneArg(python_encode_box, box);
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
    return PyModule_Create(&speedups_module);
}
