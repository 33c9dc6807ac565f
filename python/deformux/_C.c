/*
 * deformux._C: the CPython binding of the deformux C ABI (Sources/DeformUXC/include/deformux.h).
 *
 * Mechanical on purpose (STYLE.md habit 14): parse the arguments, borrow every array through the
 * buffer protocol (C-contiguous float32; outputs writable), check ranks and shapes against x, release
 * the GIL around the one engine call, map a non-zero status to an exception, release every buffer at
 * one cleanup exit. No copies: the engine reads and writes the caller's memory. Defaults, dtype
 * policy and friendly messages live in deformux/ops.py, which validates before calling here; the
 * checks below are the backstop that keeps a wrong call from becoming a wild write.
 *
 * Status mapping: see raise_status (ValueError, MemoryError, OSError subclasses for files,
 * deformux.DeformUXError otherwise). The message is dfx_last_error() of the calling thread.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "deformux.h"

#define OFFSET_CHANNELS 81
#define MAX_BUFFERS 12

static PyObject *DeformUXError;   /* deformux.DeformUXError, a RuntimeError */
static PyObject *FileFormatError; /* deformux.FileFormatError, an OSError: a damaged or foreign file */

/* The buffers one call borrows; released together by release_all. */
typedef struct {
    Py_buffer views[MAX_BUFFERS];
    int count;
} Borrowed;

static void release_all(Borrowed *b) {
    for (int i = 0; i < b->count; i++) PyBuffer_Release(&b->views[i]);
    b->count = 0;
}

static int is_float32_format(const char *format) {
    if (format == NULL) return 0; /* NULL means unsigned bytes */
    if (format[0] == '@' || format[0] == '=') format++;
#if PY_LITTLE_ENDIAN
    else if (format[0] == '<') format++;
#else
    else if (format[0] == '>' || format[0] == '!') format++;
#endif
    return strcmp(format, "f") == 0;
}

/*
 * Borrows `obj` as a C-contiguous float32 buffer of rank `ndim` and, if `shape` is not NULL, that shape.
 * obj == Py_None gives *ptr = NULL when `optional`. Returns 0, or -1 with an exception set.
 */
static int borrow(Borrowed *b, PyObject *obj, const char *op, const char *name, int writable,
                  int optional, int ndim, const Py_ssize_t *shape, float **ptr) {
    *ptr = NULL;
    if (obj == Py_None && optional) return 0;
    if (b->count >= MAX_BUFFERS) {
        PyErr_SetString(PyExc_SystemError, "deformux._C: too many buffers");
        return -1;
    }
    Py_buffer *view = &b->views[b->count];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) != 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(PyExc_TypeError,
                     "%s: %s must be a C-contiguous%s float32 buffer (a numpy array), got %.100s",
                     op, name, writable ? " writable" : "", Py_TYPE(obj)->tp_name);
        Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
        return -1;
    }
    b->count++;
    if (!is_float32_format(view->format) || view->itemsize != 4) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be float32, got buffer format '%s'", op, name,
                     view->format ? view->format : "B");
        return -1;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have rank %d, got rank %d", op, name, ndim,
                     view->ndim);
        return -1;
    }
    if (shape != NULL) {
        for (int i = 0; i < ndim; i++) {
            if (view->shape[i] != shape[i]) {
                PyErr_Format(PyExc_ValueError, "%s: %s has size %zd on axis %d, expected %zd", op,
                             name, view->shape[i], i, shape[i]);
                return -1;
            }
        }
    }
    *ptr = (float *)view->buf;
    return 0;
}

/* Sets attribute `name` of exception `exc` to the last error's field (None when empty). */
static void set_field(PyObject *exc, const char *name, int32_t field) {
    const char *v = dfx_last_error_field(field);
    PyObject *o = (v != NULL && v[0] != '\0') ? PyUnicode_DecodeUTF8(v, (Py_ssize_t)strlen(v), "replace")
                                             : Py_NewRef(Py_None);
    if (o == NULL) { PyErr_Clear(); return; }
    if (PyObject_SetAttrString(exc, name, o) < 0) PyErr_Clear();
    Py_DECREF(o);
}

/*
 * Raises the exception for a failed call, from the calling thread's last error:
 *   invalid argument, shape   -> ValueError
 *   out of memory             -> MemoryError
 *   io with an errno          -> OSError(errno, message, path): FileNotFoundError for ENOENT, etc.
 *   io without an errno       -> deformux.FileFormatError (an OSError) with .filename: a damaged file
 *   anything else             -> deformux.DeformUXError (a RuntimeError)
 * Every exception also carries .status (the DFX_ERR_* code), .operation, .expected and .got (None when
 * the engine gave none).
 */
static PyObject *raise_status(dfx_status status) {
    const char *message = dfx_last_error();
    if (message == NULL || message[0] == '\0') message = "deformux: the engine failed without a message";
    PyObject *type, *exc;
    if (status == DFX_ERR_IO) {
        const char *path = dfx_last_error_field(DFX_FIELD_PATH);
        int32_t err = dfx_last_error_errno();
        if (err != 0)
            exc = PyObject_CallFunction(PyExc_OSError, "isz", (int)err, message,
                                        (path != NULL && path[0] != '\0') ? path : NULL);
        else {
            exc = PyObject_CallFunction(FileFormatError, "s", message);
            if (exc != NULL && path != NULL && path[0] != '\0') {
                PyObject *f = PyUnicode_FromString(path);
                if (f == NULL || PyObject_SetAttrString(exc, "filename", f) < 0) PyErr_Clear();
                Py_XDECREF(f);
            }
        }
    } else {
        switch (status) {
        case DFX_ERR_INVALID_ARGUMENT:
        case DFX_ERR_SHAPE: type = PyExc_ValueError; break;
        case DFX_ERR_OUT_OF_MEMORY: type = PyExc_MemoryError; break;
        default: type = DeformUXError; break;
        }
        exc = PyObject_CallFunction(type, "s", message);
    }
    if (exc == NULL) return NULL;
    set_field(exc, "operation", DFX_FIELD_OPERATION);
    set_field(exc, "expected", DFX_FIELD_EXPECTED);
    set_field(exc, "got", DFX_FIELD_GOT);
    PyObject *code = PyLong_FromLong((long)status);
    if (code == NULL || PyObject_SetAttrString(exc, "status", code) < 0) PyErr_Clear();
    Py_XDECREF(code);
    PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    Py_DECREF(exc);
    return NULL;
}

/* The sizes every operator shares, read off x (rank 5). */
typedef struct {
    int64_t n, c, d, h, w;
    Py_ssize_t x[5], offsets[5], weight[5], channels[1], offset_weight[5], offset_channels[1];
} Shapes;

static void shapes_from_x(Shapes *s, const Py_buffer *x) {
    s->n = x->shape[0]; s->c = x->shape[1]; s->d = x->shape[2]; s->h = x->shape[3]; s->w = x->shape[4];
    for (int i = 0; i < 5; i++) { s->x[i] = x->shape[i]; s->offsets[i] = x->shape[i]; }
    s->offsets[1] = OFFSET_CHANNELS;
    s->weight[0] = x->shape[1]; s->weight[1] = 1; s->weight[2] = s->weight[3] = s->weight[4] = 3;
    s->channels[0] = x->shape[1];
    s->offset_weight[0] = OFFSET_CHANNELS; s->offset_weight[1] = x->shape[1];
    s->offset_weight[2] = s->offset_weight[3] = s->offset_weight[4] = 1;
    s->offset_channels[0] = OFFSET_CHANNELS;
}

/* ---- progress and Ctrl-C ---- */

/* The progress callback the engine calls on the calling thread between steps, and periodically during
 * long steps (see dfx_progress_fn). It takes the GIL, checks for Ctrl-C and, when the step count
 * changed, calls the Python callable (if any). An exception, or a callable returning False, cancels the
 * call; the exception stays set in this thread's state and is raised when the engine returns. The
 * engine holds no lock of the model while it calls back, so the callable may use the model. */
typedef struct {
    PyObject *callable; /* or NULL */
    int64_t last_done;
    int failed;
} Progress;

static int32_t progress_trampoline(void *user, int64_t done, int64_t total) {
    Progress *p = (Progress *)user;
    PyGILState_STATE g = PyGILState_Ensure();
    int32_t cancel = 0;
    if (p->failed) {
        cancel = 1;
    } else if (PyErr_CheckSignals() < 0) {
        p->failed = 1;
        cancel = 1;
    } else if (p->callable != NULL && done != p->last_done) {
        p->last_done = done;
        PyObject *r = PyObject_CallFunction(p->callable, "LL", (long long)done, (long long)total);
        if (r == NULL) { p->failed = 1; cancel = 1; }
        else { cancel = (r == Py_False); Py_DECREF(r); }
    }
    PyGILState_Release(g);
    return cancel;
}

/* After an engine call with a Progress: the callback's exception (or KeyboardInterrupt) if it failed,
 * else the engine's error, else success. Returns 0 on success, -1 with an exception set. */
static int finish(dfx_status status, const Progress *p) {
    if (p->failed && PyErr_Occurred()) return -1;
    if (status != DFX_OK) { raise_status(status); return -1; }
    return 0;
}

/* ---- module functions ---- */

static PyObject *py_version(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyUnicode_FromString(dfx_version());
}

static PyObject *py_last_error(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyUnicode_FromString(dfx_last_error());
}

static PyObject *py_set_num_threads(PyObject *self, PyObject *args) {
    (void)self;
    int n;
    if (!PyArg_ParseTuple(args, "i:set_num_threads", &n)) return NULL;
    dfx_status status = dfx_set_num_threads((int32_t)n);
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

static PyObject *py_get_num_threads(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    return PyLong_FromLong((long)dfx_get_num_threads());
}

/* ---- workspaces (dfx_workspace_*): a PyCapsule owns the handle ---- */

static const char *WORKSPACE_CAPSULE = "deformux.workspace";

static void workspace_capsule_free(PyObject *capsule) {
    dfx_workspace *w = (dfx_workspace *)PyCapsule_GetPointer(capsule, WORKSPACE_CAPSULE);
    if (w != NULL) dfx_workspace_free(w);
}

/* The workspace of an op call: a capsule, or None for a temporary one. 0, or -1 with an exception. */
static int workspace_from(PyObject *o, dfx_workspace **out) {
    *out = NULL;
    if (o == Py_None) return 0;
    *out = (dfx_workspace *)PyCapsule_GetPointer(o, WORKSPACE_CAPSULE);
    return *out == NULL ? -1 : 0;
}

static PyObject *py_workspace_create(PyObject *self, PyObject *noargs) {
    (void)self; (void)noargs;
    dfx_workspace *w = NULL;
    dfx_status status = dfx_workspace_create(&w);
    if (status != DFX_OK) return raise_status(status);
    PyObject *capsule = PyCapsule_New(w, WORKSPACE_CAPSULE, workspace_capsule_free);
    if (capsule == NULL) dfx_workspace_free(w);
    return capsule;
}

static PyObject *py_workspace_release(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_workspace *w;
    if (workspace_from(capsule, &w) < 0) return NULL;
    if (w == NULL) Py_RETURN_NONE;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_workspace_release(w);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

static PyObject *py_workspace_bytes(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_workspace *w;
    if (workspace_from(capsule, &w) < 0) return NULL;
    if (w == NULL) return PyLong_FromLong(0);
    int64_t n = 0;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_workspace_bytes(w, &n);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    return PyLong_FromLongLong((long long)n);
}

/* deform_conv3d_forward(ws, x, offsets, weight, bias_or_None, y) -> None; fills y. */
static PyObject *py_deform_conv3d_forward(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "deform_conv3d";
    PyObject *ows, *ox, *ooff, *ow, *ob, *oy, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOO:deform_conv3d_forward", &ows, &ox, &ooff, &ow, &ob, &oy)) return NULL;
    dfx_workspace *ws;
    if (workspace_from(ows, &ws) < 0) return NULL;
    Borrowed b = {.count = 0};
    Shapes s;
    float *x, *off, *w, *bias, *y;
    if (borrow(&b, ox, op, "x", 0, 0, 5, NULL, &x) < 0) goto done;
    shapes_from_x(&s, &b.views[0]);
    if (borrow(&b, ooff, op, "offsets", 0, 0, 5, s.offsets, &off) < 0) goto done;
    if (borrow(&b, ow, op, "weight", 0, 0, 5, s.weight, &w) < 0) goto done;
    if (borrow(&b, ob, op, "bias", 0, 1, 1, s.channels, &bias) < 0) goto done;
    if (borrow(&b, oy, op, "y", 1, 0, 5, s.x, &y) < 0) goto done;
    Progress p = {.callable = NULL, .last_done = -1, .failed = 0};
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_deform_conv3d_forward(ws, x, off, w, bias, y, s.n, s.c, s.d, s.h, s.w, progress_trampoline, &p);
    Py_END_ALLOW_THREADS
    if (finish(status, &p) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    release_all(&b);
    return result;
}

/* deform_conv3d_backward(ws, x, offsets, weight, grad_y, grad_x, grad_offsets, grad_weight, grad_bias)
 * -> None; fills every output that is not None. */
static PyObject *py_deform_conv3d_backward(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "deform_conv3d_backward";
    PyObject *ows, *ox, *ooff, *ow, *ogy, *ogx, *ogoff, *ogw, *ogb, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOOOOOOO:deform_conv3d_backward", &ows, &ox, &ooff, &ow, &ogy, &ogx,
                          &ogoff, &ogw, &ogb))
        return NULL;
    dfx_workspace *ws;
    if (workspace_from(ows, &ws) < 0) return NULL;
    Borrowed b = {.count = 0};
    Shapes s;
    float *x, *off, *w, *gy, *gx, *goff, *gw, *gb;
    if (borrow(&b, ox, op, "x", 0, 0, 5, NULL, &x) < 0) goto done;
    shapes_from_x(&s, &b.views[0]);
    if (borrow(&b, ooff, op, "offsets", 0, 0, 5, s.offsets, &off) < 0) goto done;
    if (borrow(&b, ow, op, "weight", 0, 0, 5, s.weight, &w) < 0) goto done;
    if (borrow(&b, ogy, op, "grad_output", 0, 0, 5, s.x, &gy) < 0) goto done;
    if (borrow(&b, ogx, op, "grad_x", 1, 1, 5, s.x, &gx) < 0) goto done;
    if (borrow(&b, ogoff, op, "grad_offsets", 1, 1, 5, s.offsets, &goff) < 0) goto done;
    if (borrow(&b, ogw, op, "grad_weight", 1, 1, 5, s.weight, &gw) < 0) goto done;
    if (borrow(&b, ogb, op, "grad_bias", 1, 1, 1, s.channels, &gb) < 0) goto done;
    Progress p = {.callable = NULL, .last_done = -1, .failed = 0};
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_deform_conv3d_backward(ws, x, off, w, gy, gx, goff, gw, gb, s.n, s.c, s.d, s.h, s.w,
                                        progress_trampoline, &p);
    Py_END_ALLOW_THREADS
    if (finish(status, &p) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    release_all(&b);
    return result;
}

/* ddc_layer_forward(ws, x, weight, bias_or_None, offset_weight, offset_bias, offset_mode, y, offsets_or_None)
 * -> None; fills y (and the offsets the kernel used). */
static PyObject *py_ddc_layer_forward(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "ddc_layer";
    PyObject *ows, *ox, *ow, *ob, *oow, *oob, *oy, *ooff, *result = NULL;
    int mode;
    if (!PyArg_ParseTuple(args, "OOOOOOiOO:ddc_layer_forward", &ows, &ox, &ow, &ob, &oow, &oob, &mode, &oy,
                          &ooff))
        return NULL;
    dfx_workspace *ws;
    if (workspace_from(ows, &ws) < 0) return NULL;
    Borrowed b = {.count = 0};
    Shapes s;
    float *x, *w, *bias, *ow_, *ob_, *y, *off;
    if (borrow(&b, ox, op, "x", 0, 0, 5, NULL, &x) < 0) goto done;
    shapes_from_x(&s, &b.views[0]);
    if (borrow(&b, ow, op, "weight", 0, 0, 5, s.weight, &w) < 0) goto done;
    if (borrow(&b, ob, op, "bias", 0, 1, 1, s.channels, &bias) < 0) goto done;
    if (borrow(&b, oow, op, "offset_weight", 0, 0, 5, s.offset_weight, &ow_) < 0) goto done;
    if (borrow(&b, oob, op, "offset_bias", 0, 0, 1, s.offset_channels, &ob_) < 0) goto done;
    if (borrow(&b, oy, op, "y", 1, 0, 5, s.x, &y) < 0) goto done;
    if (borrow(&b, ooff, op, "offsets", 1, 1, 5, s.offsets, &off) < 0) goto done;
    Progress p = {.callable = NULL, .last_done = -1, .failed = 0};
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_ddc_layer_forward(ws, x, w, bias, ow_, ob_, (int32_t)mode, y, off, s.n, s.c, s.d, s.h, s.w,
                                   progress_trampoline, &p);
    Py_END_ALLOW_THREADS
    if (finish(status, &p) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    release_all(&b);
    return result;
}

/* ddc_layer_backward(ws, x, weight, offset_weight, offset_bias, offset_mode, grad_y,
 *                    grad_x, grad_weight, grad_bias, grad_offset_weight, grad_offset_bias) -> None */
static PyObject *py_ddc_layer_backward(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "ddc_layer_backward";
    PyObject *ows, *ox, *ow, *oow, *oob, *ogy, *ogx, *ogw, *ogb, *ogow, *ogob, *result = NULL;
    int mode;
    if (!PyArg_ParseTuple(args, "OOOOOiOOOOOO:ddc_layer_backward", &ows, &ox, &ow, &oow, &oob, &mode, &ogy,
                          &ogx, &ogw, &ogb, &ogow, &ogob))
        return NULL;
    dfx_workspace *ws;
    if (workspace_from(ows, &ws) < 0) return NULL;
    Borrowed b = {.count = 0};
    Shapes s;
    float *x, *w, *ow_, *ob_, *gy, *gx, *gw, *gb, *gow, *gob;
    if (borrow(&b, ox, op, "x", 0, 0, 5, NULL, &x) < 0) goto done;
    shapes_from_x(&s, &b.views[0]);
    if (borrow(&b, ow, op, "weight", 0, 0, 5, s.weight, &w) < 0) goto done;
    if (borrow(&b, oow, op, "offset_weight", 0, 0, 5, s.offset_weight, &ow_) < 0) goto done;
    if (borrow(&b, oob, op, "offset_bias", 0, 0, 1, s.offset_channels, &ob_) < 0) goto done;
    if (borrow(&b, ogy, op, "grad_output", 0, 0, 5, s.x, &gy) < 0) goto done;
    if (borrow(&b, ogx, op, "grad_x", 1, 1, 5, s.x, &gx) < 0) goto done;
    if (borrow(&b, ogw, op, "grad_weight", 1, 1, 5, s.weight, &gw) < 0) goto done;
    if (borrow(&b, ogb, op, "grad_bias", 1, 1, 1, s.channels, &gb) < 0) goto done;
    if (borrow(&b, ogow, op, "grad_offset_weight", 1, 1, 5, s.offset_weight, &gow) < 0) goto done;
    if (borrow(&b, ogob, op, "grad_offset_bias", 1, 1, 1, s.offset_channels, &gob) < 0) goto done;
    Progress p = {.callable = NULL, .last_done = -1, .failed = 0};
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_ddc_layer_backward(ws, x, w, ow_, ob_, (int32_t)mode, gy, gx, gw, gb, gow, gob, s.n, s.c,
                                    s.d, s.h, s.w, progress_trampoline, &p);
    Py_END_ALLOW_THREADS
    if (finish(status, &p) < 0) goto done;
    result = Py_NewRef(Py_None);
done:
    release_all(&b);
    return result;
}

/* ---- the network: PyCapsules own the model (dfx_model_*) and session (dfx_session_*) handles ----
 * Every call that may wait for an engine lock releases the GIL first (a session's progress callback
 * takes the GIL), so that no thread waits for a lock while holding the GIL. */

static const char *MODEL_CAPSULE = "deformux.model";
static const char *SESSION_CAPSULE = "deformux.session";

static void model_capsule_free(PyObject *capsule) {
    dfx_model *m = (dfx_model *)PyCapsule_GetPointer(capsule, MODEL_CAPSULE);
    if (m != NULL) dfx_model_free(m);
}

static dfx_model *model_from(PyObject *capsule) {
    return (dfx_model *)PyCapsule_GetPointer(capsule, MODEL_CAPSULE); /* sets TypeError/ValueError */
}

static void session_capsule_free(PyObject *capsule) {
    dfx_session *s = (dfx_session *)PyCapsule_GetPointer(capsule, SESSION_CAPSULE);
    if (s != NULL) dfx_session_free(s);
}

static dfx_session *session_from(PyObject *capsule) {
    return (dfx_session *)PyCapsule_GetPointer(capsule, SESSION_CAPSULE);
}

/* A text output of the engine (buf, cap, needed): asks for the size, fills, and asks again with a
 * larger buffer while the text grew in between, so the result is always complete and terminated. */
typedef dfx_status (*text_fn)(const dfx_model *, char *, int64_t, int64_t *);

static PyObject *model_text(PyObject *capsule, text_fn fill) {
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    int64_t cap = 256, needed = 0;
    for (;;) {
        char *buf = PyMem_Malloc((size_t)cap);
        if (buf == NULL) return PyErr_NoMemory();
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = fill(m, buf, cap, &needed);
        Py_END_ALLOW_THREADS
        if (status != DFX_OK) { PyMem_Free(buf); return raise_status(status); }
        if (needed <= cap) {
            PyObject *r = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)strnlen(buf, (size_t)cap), "replace");
            PyMem_Free(buf);
            return r;
        }
        PyMem_Free(buf);
        cap = needed;
    }
}

/* model_create(config_json, seed) -> capsule */
static PyObject *py_model_create(PyObject *self, PyObject *args) {
    (void)self;
    const char *config;
    unsigned long long seed;
    if (!PyArg_ParseTuple(args, "sK:model_create", &config, &seed)) return NULL;
    dfx_model *m = NULL;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_model_create(config, (uint64_t)seed, &m);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    PyObject *capsule = PyCapsule_New(m, MODEL_CAPSULE, model_capsule_free);
    if (capsule == NULL) dfx_model_free(m);
    return capsule;
}

static PyObject *py_model_config_json(PyObject *self, PyObject *capsule) {
    (void)self;
    return model_text(capsule, dfx_model_config_json);
}

static PyObject *py_model_last_report(PyObject *self, PyObject *capsule) {
    (void)self;
    return model_text(capsule, dfx_model_last_report);
}

static PyObject *py_model_num_parameters(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    int64_t n = 0;
    dfx_status status = dfx_model_num_parameters(m, &n);
    if (status != DFX_OK) return raise_status(status);
    return PyLong_FromLongLong((long long)n);
}

/* model_tensors(capsule) -> [(name, shape tuple)] in state-dict order */
static PyObject *py_model_tensors(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    int64_t count = 0;
    dfx_status status = dfx_model_num_tensors(m, &count);
    if (status != DFX_OK) return raise_status(status);
    PyObject *list = PyList_New((Py_ssize_t)count);
    if (list == NULL) return NULL;
    for (int64_t i = 0; i < count; i++) {
        const char *name = NULL;
        int32_t rank = 0;
        int64_t shape[8];
        status = dfx_model_tensor_info(m, i, &name, &rank, shape);
        if (status != DFX_OK) { Py_DECREF(list); return raise_status(status); }
        PyObject *dims = PyTuple_New(rank);
        if (dims == NULL) { Py_DECREF(list); return NULL; }
        for (int32_t k = 0; k < rank; k++) PyTuple_SET_ITEM(dims, k, PyLong_FromLongLong((long long)shape[k]));
        PyObject *item = Py_BuildValue("(sN)", name, dims);
        if (item == NULL) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, (Py_ssize_t)i, item);
    }
    return list;
}

typedef dfx_status (*tensor_fn)(const dfx_model *, int64_t, float *, int64_t);

/* Copies parameter `index` (or its gradient) into out (float32, C-contiguous, any shape). */
static PyObject *model_copy(PyObject *args, const char *format, tensor_fn copy) {
    PyObject *capsule, *oout;
    long long index;
    if (!PyArg_ParseTuple(args, format, &capsule, &index, &oout)) return NULL;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(oout, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) return NULL;
    PyObject *result = NULL;
    if (!is_float32_format(view.format) || view.itemsize != 4) {
        PyErr_SetString(PyExc_TypeError, "model tensor copy: out must be float32");
    } else {
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = copy(m, (int64_t)index, (float *)view.buf, (int64_t)(view.len / 4));
        Py_END_ALLOW_THREADS
        result = status == DFX_OK ? Py_NewRef(Py_None) : raise_status(status);
    }
    PyBuffer_Release(&view);
    return result;
}

/* model_get_tensor(capsule, index, out) / model_get_grad(capsule, index, out) -> None */
static PyObject *py_model_get_tensor(PyObject *self, PyObject *args) {
    (void)self;
    return model_copy(args, "OLO:model_get_tensor", dfx_model_get_tensor);
}

static PyObject *py_model_get_grad(PyObject *self, PyObject *args) {
    (void)self;
    return model_copy(args, "OLO:model_get_grad", dfx_model_get_grad);
}

static PyObject *py_model_zero_grad(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_model_zero_grad(m);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

/* model_load_tensors(capsule, [(name, array)], strict) -> None */
static PyObject *py_model_load_tensors(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *items;
    int strict;
    if (!PyArg_ParseTuple(args, "OO!p:model_load_tensors", &capsule, &PyList_Type, &items, &strict)) return NULL;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(items);
    Py_ssize_t ok = 0;
    PyObject *result = NULL;
    Py_buffer *views = PyMem_Calloc((size_t)(count > 0 ? count : 1), sizeof(Py_buffer));
    const char **names = PyMem_Calloc((size_t)(count > 0 ? count : 1), sizeof(char *));
    const float **data = PyMem_Calloc((size_t)(count > 0 ? count : 1), sizeof(float *));
    int32_t *ranks = PyMem_Calloc((size_t)(count > 0 ? count : 1), sizeof(int32_t));
    int64_t *shapes = PyMem_Calloc((size_t)(count > 0 ? count : 1) * 8, sizeof(int64_t));
    if (!views || !names || !data || !ranks || !shapes) { PyErr_NoMemory(); goto done; }
    for (; ok < count; ok++) {
        PyObject *item = PyList_GET_ITEM(items, ok), *oname, *oarr;
        if (!PyArg_ParseTuple(item, "OO:model_load_tensors item", &oname, &oarr)) goto done;
        names[ok] = PyUnicode_AsUTF8(oname);
        if (names[ok] == NULL) goto done;
        if (PyObject_GetBuffer(oarr, &views[ok], PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) goto done;
        if (!is_float32_format(views[ok].format) || views[ok].itemsize != 4 || views[ok].ndim > 8) {
            PyErr_Format(PyExc_TypeError, "load_state_dict: %s must be a float32 array of rank <= 8", names[ok]);
            ok++;
            goto done;
        }
        data[ok] = (const float *)views[ok].buf;
        ranks[ok] = views[ok].ndim;
        for (int k = 0; k < views[ok].ndim; k++) shapes[8 * ok + k] = views[ok].shape[k];
    }
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_model_load_tensors(m, (int64_t)count, names, data, ranks, shapes, strict);
    Py_END_ALLOW_THREADS
    result = status == DFX_OK ? Py_NewRef(Py_None) : raise_status(status);
done:
    for (Py_ssize_t i = 0; i < ok; i++) PyBuffer_Release(&views[i]);
    PyMem_Free(views); PyMem_Free(names); PyMem_Free(data); PyMem_Free(ranks); PyMem_Free(shapes);
    return result;
}

/* model_load(capsule, path, strict) / model_save(capsule, path); path is str or bytes (os.fsencode) */
static PyObject *py_model_load(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *opath;
    int strict;
    if (!PyArg_ParseTuple(args, "OO&p:model_load", &capsule, PyUnicode_FSConverter, &opath, &strict)) return NULL;
    dfx_model *m = model_from(capsule);
    if (m == NULL) { Py_DECREF(opath); return NULL; }
    const char *path = PyBytes_AS_STRING(opath);
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_model_load(m, path, strict);
    Py_END_ALLOW_THREADS
    Py_DECREF(opath);
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

static PyObject *py_model_save(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *opath;
    if (!PyArg_ParseTuple(args, "OO&:model_save", &capsule, PyUnicode_FSConverter, &opath)) return NULL;
    dfx_model *m = model_from(capsule);
    if (m == NULL) { Py_DECREF(opath); return NULL; }
    const char *path = PyBytes_AS_STRING(opath);
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_model_save(m, path);
    Py_END_ALLOW_THREADS
    Py_DECREF(opath);
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

/* model_summary(capsule, n, d, h, w) -> str */
static PyObject *py_model_summary(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    long long n, d, h, w;
    if (!PyArg_ParseTuple(args, "OLLLL:model_summary", &capsule, &n, &d, &h, &w)) return NULL;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    int64_t cap = 4096, needed = 0;
    for (;;) {
        char *buf = PyMem_Malloc((size_t)cap);
        if (buf == NULL) return PyErr_NoMemory();
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_model_summary(m, n, d, h, w, buf, cap, &needed);
        Py_END_ALLOW_THREADS
        if (status != DFX_OK) { PyMem_Free(buf); return raise_status(status); }
        if (needed <= cap) {
            PyObject *r = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)strnlen(buf, (size_t)cap), "replace");
            PyMem_Free(buf);
            return r;
        }
        PyMem_Free(buf);
        cap = needed;
    }
}

/* session_create(model_capsule) -> session capsule (the session keeps the model alive) */
static PyObject *py_session_create(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    dfx_session *s = NULL;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_session_create(m, &s);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    PyObject *out = PyCapsule_New(s, SESSION_CAPSULE, session_capsule_free);
    if (out == NULL) dfx_session_free(s);
    return out;
}

/* The channel counts of a session's model, checked against x and y (a backstop for model.py). */
static int session_check(dfx_session *s, const char *op, const Py_ssize_t *xs, const Py_ssize_t *ys) {
    int32_t cin = 0, cout = 0;
    dfx_status st = dfx_session_channels(s, &cin, &cout);
    if (st != DFX_OK) { raise_status(st); return -1; }
    if (xs[1] != cin) {
        PyErr_Format(PyExc_ValueError, "%s: x must have %d channels, got %zd", op, (int)cin, xs[1]);
        return -1;
    }
    if (ys != NULL && (ys[0] != xs[0] || ys[1] != cout || ys[2] != xs[2] || ys[3] != xs[3] || ys[4] != xs[4])) {
        PyErr_Format(PyExc_ValueError, "%s: the logits (or their gradient) must have shape (N, %d, D, H, W) with "
                     "the N, D, H, W of x", op, (int)cout);
        return -1;
    }
    return 0;
}

/* session_forward(session, x, y, progress_or_None) -> None; fills y. */
static PyObject *py_session_forward(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "DeformUXNet.forward";
    PyObject *capsule, *ox, *oy, *ocb;
    if (!PyArg_ParseTuple(args, "OOOO:session_forward", &capsule, &ox, &oy, &ocb)) return NULL;
    dfx_session *s = session_from(capsule);
    if (s == NULL) return NULL;
    Borrowed b = {.count = 0};
    PyObject *result = NULL;
    float *x, *y;
    if (borrow(&b, ox, op, "x", 0, 0, 5, NULL, &x) < 0) goto done;
    if (borrow(&b, oy, op, "y", 1, 0, 5, NULL, &y) < 0) goto done;
    {
        Py_ssize_t *xs = b.views[0].shape;
        if (session_check(s, op, xs, b.views[1].shape) < 0) goto done;
        Progress p = {.callable = ocb == Py_None ? NULL : ocb, .last_done = 0, .failed = 0};
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_session_forward(s, x, xs[0], xs[2], xs[3], xs[4], y, progress_trampoline, &p);
        Py_END_ALLOW_THREADS
        if (finish(status, &p) < 0) goto done;
        result = Py_NewRef(Py_None);
    }
done:
    release_all(&b);
    return result;
}

/* session_backward(session, x, grad_y, grad_x_or_None, progress_or_None) -> None: adds the parameter
 * gradients into the model's and fills grad_x. */
static PyObject *py_session_backward(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "DeformUXNet.backward";
    PyObject *capsule, *ox, *ogy, *ogx, *ocb;
    if (!PyArg_ParseTuple(args, "OOOOO:session_backward", &capsule, &ox, &ogy, &ogx, &ocb)) return NULL;
    dfx_session *s = session_from(capsule);
    if (s == NULL) return NULL;
    Borrowed b = {.count = 0};
    PyObject *result = NULL;
    float *x, *gy, *gx;
    if (borrow(&b, ox, op, "x", 0, 0, 5, NULL, &x) < 0) goto done;
    if (borrow(&b, ogy, op, "grad_output", 0, 0, 5, NULL, &gy) < 0) goto done;
    if (borrow(&b, ogx, op, "grad_x", 1, 1, 5, b.views[0].shape, &gx) < 0) goto done;
    {
        Py_ssize_t *xs = b.views[0].shape;
        if (session_check(s, op, xs, b.views[1].shape) < 0) goto done;
        Progress p = {.callable = ocb == Py_None ? NULL : ocb, .last_done = 0, .failed = 0};
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_session_backward(s, x, xs[0], xs[2], xs[3], xs[4], gy, gx, progress_trampoline, &p);
        Py_END_ALLOW_THREADS
        if (finish(status, &p) < 0) goto done;
        result = Py_NewRef(Py_None);
    }
done:
    release_all(&b);
    return result;
}

static PyObject *py_session_release_memory(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_session *s = session_from(capsule);
    if (s == NULL) return NULL;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_session_release_memory(s);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

static PyObject *py_session_retained_bytes(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_session *s = session_from(capsule);
    if (s == NULL) return NULL;
    int64_t n = 0;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_session_retained_bytes(s, &n);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    return PyLong_FromLongLong((long long)n);
}

/* ================================================================================================
 * NIfTI (dfx_nifti_*): a PyCapsule owns the handle. deformux/nifti.py holds the policy (dtypes, array
 * shapes, header dict); these functions only marshal. Paths are str, bytes or os.PathLike
 * (PyUnicode_FSConverter).
 */

static const char *NIFTI_CAPSULE = "deformux.nifti";

static void nifti_capsule_free(PyObject *capsule) {
    dfx_nifti *h = (dfx_nifti *)PyCapsule_GetPointer(capsule, NIFTI_CAPSULE);
    if (h != NULL) dfx_nifti_free(h);
}

static dfx_nifti *nifti_from(PyObject *capsule) {
    return (dfx_nifti *)PyCapsule_GetPointer(capsule, NIFTI_CAPSULE); /* sets an exception on failure */
}

/* nifti_open(path) -> capsule */
static PyObject *py_nifti_open(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *opath = NULL;
    if (!PyArg_ParseTuple(args, "O&:nifti_open", PyUnicode_FSConverter, &opath)) return NULL;
    dfx_nifti *h = NULL;
    dfx_status status;
    const char *path = PyBytes_AS_STRING(opath);
    Py_BEGIN_ALLOW_THREADS
    status = dfx_nifti_open(path, &h);
    Py_END_ALLOW_THREADS
    Py_DECREF(opath);
    if (status != DFX_OK) return raise_status(status);
    PyObject *capsule = PyCapsule_New(h, NIFTI_CAPSULE, nifti_capsule_free);
    if (capsule == NULL) dfx_nifti_free(h);
    return capsule;
}

/* nifti_header_json(capsule) -> str */
static PyObject *py_nifti_header_json(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_nifti *h = nifti_from(capsule);
    if (h == NULL) return NULL;
    int64_t needed = 0;
    dfx_status status = dfx_nifti_header_json(h, NULL, 0, &needed);
    if (status != DFX_OK) return raise_status(status);
    char *buf = PyMem_Malloc((size_t)needed);
    if (buf == NULL) return PyErr_NoMemory();
    status = dfx_nifti_header_json(h, buf, needed, &needed);
    PyObject *r = status == DFX_OK ? PyUnicode_DecodeUTF8(buf, (Py_ssize_t)strlen(buf), "replace") : raise_status(status);
    PyMem_Free(buf);
    return r;
}

/* nifti_raw_header(capsule) -> bytes */
static PyObject *py_nifti_raw_header(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_nifti *h = nifti_from(capsule);
    if (h == NULL) return NULL;
    int64_t needed = 0;
    dfx_status status = dfx_nifti_raw_header(h, NULL, 0, &needed);
    if (status != DFX_OK) return raise_status(status);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)needed);
    if (out == NULL) return NULL;
    status = dfx_nifti_raw_header(h, (uint8_t *)PyBytes_AS_STRING(out), needed, &needed);
    if (status != DFX_OK) { Py_DECREF(out); return raise_status(status); }
    return out;
}

/* nifti_read(capsule, kind, out) -> None; out is a writable C-contiguous buffer of the voxel count's
 * elements (float32 for DFX_NIFTI_FLOAT32, int32 for _INT32, the file's datatype for _RAW). */
static PyObject *py_nifti_read(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *oout;
    int kind;
    if (!PyArg_ParseTuple(args, "OiO:nifti_read", &capsule, &kind, &oout)) return NULL;
    dfx_nifti *h = nifti_from(capsule);
    if (h == NULL) return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(oout, &view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) return NULL;
    PyObject *result = NULL;
    int64_t count = 0;
    int32_t datatype = 0;
    dfx_status status = dfx_nifti_array_shape(h, NULL, NULL, &datatype, &count);
    if (status != DFX_OK) { raise_status(status); goto done; }
    if ((kind == DFX_NIFTI_FLOAT32 && !is_float32_format(view.format)) ||
        (kind != DFX_NIFTI_RAW && view.itemsize != 4) || view.itemsize <= 0 || view.len != count * view.itemsize) {
        PyErr_Format(PyExc_ValueError, "nifti_read: out must hold %lld elements of the requested type, got %zd bytes of "
                     "itemsize %zd", (long long)count, view.len, view.itemsize);
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    status = dfx_nifti_read(h, (int32_t)kind, view.buf, count);
    Py_END_ALLOW_THREADS
    result = status == DFX_OK ? Py_NewRef(Py_None) : raise_status(status);
done:
    PyBuffer_Release(&view);
    return result;
}

/* nifti_release_voxels(capsule) -> None */
static PyObject *py_nifti_release_voxels(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_nifti *h = nifti_from(capsule);
    if (h == NULL) return NULL;
    dfx_status status = dfx_nifti_release_voxels(h);
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

/* nifti_write(path, data, datatype, dims tuple, affine (16 float64), template capsule or None,
 *             description str or None, compression_level) -> None */
static PyObject *py_nifti_write(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *opath = NULL, *odata, *odims, *oaffine, *otemplate, *odesc, *result = NULL;
    int datatype, level;
    if (!PyArg_ParseTuple(args, "O&OiO!OOOi:nifti_write", PyUnicode_FSConverter, &opath, &odata, &datatype,
                          &PyTuple_Type, &odims, &oaffine, &otemplate, &odesc, &level))
        return NULL;
    Py_buffer data = {0}, affine = {0};
    int have_data = 0, have_affine = 0;
    const dfx_nifti *template_ = NULL;
    const char *description = NULL;
    int64_t dims[5];
    Py_ssize_t ndim = PyTuple_GET_SIZE(odims);
    if (ndim < 1 || ndim > 5) {
        PyErr_Format(PyExc_ValueError, "nifti_write: dims must have 1 to 5 sizes, got %zd", ndim);
        goto done;
    }
    for (Py_ssize_t i = 0; i < ndim; i++) {
        dims[i] = PyLong_AsLongLong(PyTuple_GET_ITEM(odims, i));
        if (dims[i] == -1 && PyErr_Occurred()) goto done;
    }
    if (otemplate != Py_None) {
        template_ = nifti_from(otemplate);
        if (template_ == NULL) goto done;
    }
    if (odesc != Py_None) {
        description = PyUnicode_AsUTF8(odesc);
        if (description == NULL) goto done;
    }
    if (PyObject_GetBuffer(odata, &data, PyBUF_C_CONTIGUOUS) != 0) goto done;
    have_data = 1;
    if (PyObject_GetBuffer(oaffine, &affine, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) goto done;
    have_affine = 1;
    if (affine.len != 16 * (Py_ssize_t)sizeof(double) || affine.itemsize != (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "nifti_write: affine must be 16 float64 values");
        goto done;
    }
    {
        /* The voxel count, overflow-checked (a product that wrapped around could match data.len). */
        int64_t voxels = 1;
        for (Py_ssize_t i = 0; i < ndim; i++) {
            if (dims[i] <= 0 || __builtin_mul_overflow(voxels, dims[i], &voxels)) {
                PyErr_Format(PyExc_ValueError, "nifti_write: dims must be positive sizes whose product fits in 64 "
                             "bits, got %lld on axis %zd", (long long)dims[i], i);
                goto done;
            }
        }
        if (voxels <= 0 || data.len / voxels <= 0 || data.len % voxels != 0) {
            PyErr_Format(PyExc_ValueError, "nifti_write: data holds %zd bytes, not a whole number of voxels for the dims",
                         data.len);
            goto done;
        }
        int64_t itemsize = data.len / voxels;
        int expected = (datatype == 2 || datatype == 256) ? 1 : (datatype == 4 || datatype == 512) ? 2
                     : (datatype == 8 || datatype == 16 || datatype == 768) ? 4 : 8;
        if (itemsize != expected) {
            PyErr_Format(PyExc_ValueError, "nifti_write: data has %lld bytes per voxel, datatype %d needs %d",
                         (long long)itemsize, datatype, expected);
            goto done;
        }
    }
    {
        const char *path = PyBytes_AS_STRING(opath);
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_nifti_write(path, data.buf, (int32_t)datatype, (int32_t)ndim, dims, (const double *)affine.buf,
                                 template_, description, (int32_t)level);
        Py_END_ALLOW_THREADS
        result = status == DFX_OK ? Py_NewRef(Py_None) : raise_status(status);
    }
done:
    if (have_data) PyBuffer_Release(&data);
    if (have_affine) PyBuffer_Release(&affine);
    Py_XDECREF(opath);
    return result;
}

/* ======================================= end of NIfTI ========================================= */

/* ---- training (dfx_dice_ce, dfx_trainer_*, dfx_sampler_*) ---- */

static const char *TRAINER_CAPSULE = "deformux.trainer";
static const char *SAMPLER_CAPSULE = "deformux.sampler";

/* Borrows obj as a C-contiguous int32 buffer of rank ndim (shape checked when given), like borrow(). */
static int borrow_int32(Borrowed *b, PyObject *obj, const char *op, const char *name, int writable, int ndim,
                        const Py_ssize_t *shape, int32_t **ptr) {
    *ptr = NULL;
    if (b->count >= MAX_BUFFERS) {
        PyErr_SetString(PyExc_SystemError, "deformux._C: too many buffers");
        return -1;
    }
    Py_buffer *view = &b->views[b->count];
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0)) != 0) {
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_Format(PyExc_TypeError, "%s: %s must be a C-contiguous%s int32 array, got %.100s", op, name,
                     writable ? " writable" : "", Py_TYPE(obj)->tp_name);
        Py_XDECREF(type); Py_XDECREF(value); Py_XDECREF(tb);
        return -1;
    }
    b->count++;
    const char *f = view->format ? view->format : "B";
    if (f[0] == '@' || f[0] == '=' || f[0] == '<') f++;
    if (view->itemsize != 4 || (strcmp(f, "i") != 0 && strcmp(f, "l") != 0)) {
        PyErr_Format(PyExc_TypeError, "%s: %s must be int32, got buffer format '%s'", op, name, view->format ? view->format : "B");
        return -1;
    }
    if (view->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: %s must have rank %d, got rank %d", op, name, ndim, view->ndim);
        return -1;
    }
    if (shape != NULL) {
        for (int i = 0; i < ndim; i++) {
            if (view->shape[i] != shape[i]) {
                PyErr_Format(PyExc_ValueError, "%s: %s has size %zd on axis %d, expected %zd", op, name,
                             view->shape[i], i, shape[i]);
                return -1;
            }
        }
    }
    *ptr = (int32_t *)view->buf;
    return 0;
}

/* dice_ce(logits, labels, class_weights_or_None, grad_or_None) -> (total, dice, ce) */
static PyObject *py_dice_ce(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "dice_ce";
    PyObject *ol, *olab, *ow, *og, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOO:dice_ce", &ol, &olab, &ow, &og)) return NULL;
    Borrowed b = {.count = 0};
    float *logits, *weights = NULL, *grad = NULL;
    int32_t *labels;
    if (borrow(&b, ol, op, "logits", 0, 0, 5, NULL, &logits) < 0) goto done;
    {
        Py_ssize_t *ls = b.views[0].shape;
        Py_ssize_t lab_shape[4] = {ls[0], ls[2], ls[3], ls[4]};
        Py_ssize_t c[1] = {ls[1]};
        if (borrow_int32(&b, olab, op, "labels", 0, 4, lab_shape, &labels) < 0) goto done;
        if (borrow(&b, ow, op, "class_weights", 0, 1, 1, c, &weights) < 0) goto done;
        if (borrow(&b, og, op, "grad", 1, 1, 5, ls, &grad) < 0) goto done;
        double out[3] = {0, 0, 0};
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_dice_ce(logits, labels, ls[0], ls[1], ls[2], ls[3], ls[4], weights, grad, out);
        Py_END_ALLOW_THREADS
        if (status != DFX_OK) { raise_status(status); goto done; }
        result = Py_BuildValue("(ddd)", out[0], out[1], out[2]);
    }
done:
    release_all(&b);
    return result;
}

static void trainer_capsule_free(PyObject *capsule) {
    dfx_trainer *t = (dfx_trainer *)PyCapsule_GetPointer(capsule, TRAINER_CAPSULE);
    if (t != NULL) dfx_trainer_free(t);
}

static dfx_trainer *trainer_from(PyObject *capsule) {
    return (dfx_trainer *)PyCapsule_GetPointer(capsule, TRAINER_CAPSULE);
}

/* trainer_create(model, options_json) -> trainer (keeps the model alive) */
static PyObject *py_trainer_create(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    const char *options;
    if (!PyArg_ParseTuple(args, "Os:trainer_create", &capsule, &options)) return NULL;
    dfx_model *m = model_from(capsule);
    if (m == NULL) return NULL;
    dfx_trainer *t = NULL;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_trainer_create(m, options, &t);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    PyObject *out = PyCapsule_New(t, TRAINER_CAPSULE, trainer_capsule_free);
    if (out == NULL) dfx_trainer_free(t);
    return out;
}

/* trainer_step(trainer, images, labels, progress_or_None) -> (total, dice, ce) */
static PyObject *py_trainer_step(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "Trainer.train_step";
    PyObject *capsule, *oi, *olab, *ocb, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOOO:trainer_step", &capsule, &oi, &olab, &ocb)) return NULL;
    dfx_trainer *t = trainer_from(capsule);
    if (t == NULL) return NULL;
    Borrowed b = {.count = 0};
    float *images;
    int32_t *labels;
    if (borrow(&b, oi, op, "images", 0, 0, 5, NULL, &images) < 0) goto done;
    {
        Py_ssize_t *is = b.views[0].shape;
        Py_ssize_t lab_shape[4] = {is[0], is[2], is[3], is[4]};
        if (borrow_int32(&b, olab, op, "labels", 0, 4, lab_shape, &labels) < 0) goto done;
        Progress p = {.callable = ocb == Py_None ? NULL : ocb, .last_done = 0, .failed = 0};
        double out[3] = {0, 0, 0};
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_trainer_step(t, images, is[0], is[2], is[3], is[4], labels, out, progress_trampoline, &p);
        Py_END_ALLOW_THREADS
        if (finish(status, &p) < 0) goto done;
        result = Py_BuildValue("(ddd)", out[0], out[1], out[2]);
    }
done:
    release_all(&b);
    return result;
}

/* trainer_info(trainer) -> (learning_rate, step, accumulated) */
static PyObject *py_trainer_info(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_trainer *t = trainer_from(capsule);
    if (t == NULL) return NULL;
    double lr = 0;
    int64_t step = 0, acc = 0;
    dfx_status status = dfx_trainer_info(t, &lr, &step, &acc);
    if (status != DFX_OK) return raise_status(status);
    return Py_BuildValue("(dLL)", lr, (long long)step, (long long)acc);
}

static PyObject *py_trainer_set_learning_rate(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    double lr;
    if (!PyArg_ParseTuple(args, "Od:trainer_set_learning_rate", &capsule, &lr)) return NULL;
    dfx_trainer *t = trainer_from(capsule);
    if (t == NULL) return NULL;
    dfx_status status = dfx_trainer_set_learning_rate(t, lr);
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

/* trainer_report_validation(trainer, metric) -> learning rate now in force */
static PyObject *py_trainer_report_validation(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule;
    double metric, lr = 0;
    if (!PyArg_ParseTuple(args, "Od:trainer_report_validation", &capsule, &metric)) return NULL;
    dfx_trainer *t = trainer_from(capsule);
    if (t == NULL) return NULL;
    dfx_status status = dfx_trainer_report_validation(t, metric, &lr);
    if (status != DFX_OK) return raise_status(status);
    return PyFloat_FromDouble(lr);
}

typedef dfx_status (*trainer_path_fn)(dfx_trainer *, const char *);

static PyObject *trainer_path_call(PyObject *args, const char *format, trainer_path_fn fn) {
    PyObject *capsule, *opath;
    if (!PyArg_ParseTuple(args, format, &capsule, PyUnicode_FSConverter, &opath)) return NULL;
    dfx_trainer *t = trainer_from(capsule);
    if (t == NULL) { Py_DECREF(opath); return NULL; }
    const char *path = PyBytes_AS_STRING(opath);
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = fn(t, path);
    Py_END_ALLOW_THREADS
    Py_DECREF(opath);
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

static PyObject *py_trainer_save_state(PyObject *self, PyObject *args) {
    (void)self;
    return trainer_path_call(args, "OO&:trainer_save_state", dfx_trainer_save_state);
}

static PyObject *py_trainer_load_state(PyObject *self, PyObject *args) {
    (void)self;
    return trainer_path_call(args, "OO&:trainer_load_state", dfx_trainer_load_state);
}

static void sampler_capsule_free(PyObject *capsule) {
    dfx_sampler *s = (dfx_sampler *)PyCapsule_GetPointer(capsule, SAMPLER_CAPSULE);
    if (s != NULL) dfx_sampler_free(s);
}

static dfx_sampler *sampler_from(PyObject *capsule) {
    return (dfx_sampler *)PyCapsule_GetPointer(capsule, SAMPLER_CAPSULE);
}

/* sampler_create(config_json) -> sampler */
static PyObject *py_sampler_create(PyObject *self, PyObject *args) {
    (void)self;
    const char *config;
    if (!PyArg_ParseTuple(args, "s:sampler_create", &config)) return NULL;
    dfx_sampler *s = NULL;
    dfx_status status = dfx_sampler_create(config, &s);
    if (status != DFX_OK) return raise_status(status);
    PyObject *out = PyCapsule_New(s, SAMPLER_CAPSULE, sampler_capsule_free);
    if (out == NULL) dfx_sampler_free(s);
    return out;
}

/* sampler_add(sampler, image [C][X][Y][Z] float32, labels [X][Y][Z] int32) -> index */
static PyObject *py_sampler_add(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "PatchSampler.add";
    PyObject *capsule, *oi, *olab, *result = NULL;
    if (!PyArg_ParseTuple(args, "OOO:sampler_add", &capsule, &oi, &olab)) return NULL;
    dfx_sampler *s = sampler_from(capsule);
    if (s == NULL) return NULL;
    Borrowed b = {.count = 0};
    float *image;
    int32_t *labels;
    if (borrow(&b, oi, op, "image", 0, 0, 4, NULL, &image) < 0) goto done;
    {
        Py_ssize_t *is = b.views[0].shape;
        Py_ssize_t lab_shape[3] = {is[1], is[2], is[3]};
        if (borrow_int32(&b, olab, op, "labels", 0, 3, lab_shape, &labels) < 0) goto done;
        int64_t size[3] = {is[1], is[2], is[3]}, index = -1;
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_sampler_add(s, image, is[0], size, labels, &index);
        Py_END_ALLOW_THREADS
        if (status != DFX_OK) { raise_status(status); goto done; }
        result = PyLong_FromLongLong((long long)index);
    }
done:
    release_all(&b);
    return result;
}

/* sampler_batch(sampler, [indices], rng_state, images_out, labels_out) -> new rng_state */
static PyObject *py_sampler_batch(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "PatchSampler.batch";
    PyObject *capsule, *oidx, *oi, *olab, *result = NULL;
    unsigned long long state;
    if (!PyArg_ParseTuple(args, "OO!KOO:sampler_batch", &capsule, &PyList_Type, &oidx, &state, &oi, &olab)) return NULL;
    dfx_sampler *s = sampler_from(capsule);
    if (s == NULL) return NULL;
    Py_ssize_t count = PyList_GET_SIZE(oidx);
    if (count < 1) {
        PyErr_Format(PyExc_ValueError, "%s: at least one volume index is needed", op);
        return NULL;
    }
    int64_t *idx = PyMem_Calloc((size_t)count, sizeof(int64_t));
    if (idx == NULL) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < count; i++) {
        idx[i] = PyLong_AsLongLong(PyList_GET_ITEM(oidx, i));
        if (idx[i] == -1 && PyErr_Occurred()) { PyMem_Free(idx); return NULL; }
    }
    Borrowed b = {.count = 0};
    float *images;
    int32_t *labels;
    if (borrow(&b, oi, op, "images", 1, 0, 5, NULL, &images) < 0) goto done;
    {
        Py_ssize_t *is = b.views[0].shape;
        Py_ssize_t lab_shape[4] = {is[0], is[2], is[3], is[4]};
        if (borrow_int32(&b, olab, op, "labels", 1, 4, lab_shape, &labels) < 0) goto done;
        uint64_t st = (uint64_t)state;
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_sampler_batch(s, idx, (int64_t)count, &st, images, labels);
        Py_END_ALLOW_THREADS
        if (status != DFX_OK) { raise_status(status); goto done; }
        result = PyLong_FromUnsignedLongLong((unsigned long long)st);
    }
done:
    release_all(&b);
    PyMem_Free(idx);
    return result;
}

/* ================================================================================================
 * Segmentation (dfx_segmenter_*, dfx_segment, dfx_model_card_normalize): a PyCapsule owns the
 * segmenter handle (which keeps its session alive). deformux/segment.py holds the policy (inputs,
 * model cards, progress bar, results); these functions only marshal.
 */

static const char *SEGMENTER_CAPSULE = "deformux.segmenter";

static void segmenter_capsule_free(PyObject *capsule) {
    dfx_segmenter *h = (dfx_segmenter *)PyCapsule_GetPointer(capsule, SEGMENTER_CAPSULE);
    if (h != NULL) dfx_segmenter_free(h);
}

static dfx_segmenter *segmenter_from(PyObject *capsule) {
    return (dfx_segmenter *)PyCapsule_GetPointer(capsule, SEGMENTER_CAPSULE);
}

/* A text output of a segmenter (buf, cap, needed), asked again while it grew. */
typedef dfx_status (*segmenter_text_fn)(const dfx_segmenter *, char *, int64_t, int64_t *);

static PyObject *segmenter_text(PyObject *capsule, segmenter_text_fn fill) {
    dfx_segmenter *h = segmenter_from(capsule);
    if (h == NULL) return NULL;
    int64_t cap = 1024, needed = 0;
    for (;;) {
        char *buf = PyMem_Malloc((size_t)cap);
        if (buf == NULL) return PyErr_NoMemory();
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = fill(h, buf, cap, &needed);
        Py_END_ALLOW_THREADS
        if (status != DFX_OK) { PyMem_Free(buf); return raise_status(status); }
        if (needed <= cap) {
            PyObject *r = PyUnicode_DecodeUTF8(buf, (Py_ssize_t)strnlen(buf, (size_t)cap), "replace");
            PyMem_Free(buf);
            return r;
        }
        PyMem_Free(buf);
        cap = needed;
    }
}

/* model_card_normalize(card_json) -> str: the card with every default written out. */
static PyObject *py_model_card_normalize(PyObject *self, PyObject *args) {
    (void)self;
    const char *card;
    if (!PyArg_ParseTuple(args, "s:model_card_normalize", &card)) return NULL;
    int64_t needed = 0;
    dfx_status status = dfx_model_card_normalize(card, NULL, 0, &needed);
    if (status != DFX_OK) return raise_status(status);
    char *buf = PyMem_Malloc((size_t)needed);
    if (buf == NULL) return PyErr_NoMemory();
    status = dfx_model_card_normalize(card, buf, needed, &needed);
    PyObject *r = status == DFX_OK ? PyUnicode_DecodeUTF8(buf, (Py_ssize_t)strlen(buf), "replace") : raise_status(status);
    PyMem_Free(buf);
    return r;
}

/* segmenter_create(session_capsule, config_json_or_None) -> capsule */
static PyObject *py_segmenter_create(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *osession, *oconfig;
    if (!PyArg_ParseTuple(args, "OO:segmenter_create", &osession, &oconfig)) return NULL;
    dfx_session *s = session_from(osession);
    if (s == NULL) return NULL;
    const char *config = NULL;
    if (oconfig != Py_None) {
        config = PyUnicode_AsUTF8(oconfig);
        if (config == NULL) return NULL;
    }
    dfx_segmenter *h = NULL;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_segmenter_create(s, config, &h);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    PyObject *capsule = PyCapsule_New(h, SEGMENTER_CAPSULE, segmenter_capsule_free);
    if (capsule == NULL) dfx_segmenter_free(h);
    return capsule;
}

static PyObject *py_segmenter_config_json(PyObject *self, PyObject *capsule) {
    (void)self;
    return segmenter_text(capsule, dfx_segmenter_config_json);
}

static PyObject *py_segmenter_statistics_json(PyObject *self, PyObject *capsule) {
    (void)self;
    return segmenter_text(capsule, dfx_segmenter_statistics_json);
}

/* segment(segmenter, image, affine, labels, probabilities_or_None, progress_or_None) -> None
 *   image          float32 (C, X, Y, Z), C-contiguous
 *   affine         16 float64 (4 x 4), C-contiguous
 *   labels         uint8 (X, Y, Z), writable, C-contiguous (filled)
 *   probabilities  float32 (Cout, X, Y, Z), writable, or None (filled) */
static PyObject *py_segment(PyObject *self, PyObject *args) {
    (void)self;
    static const char *op = "segment";
    PyObject *capsule, *oimage, *oaffine, *olabels, *oprob, *ocb;
    if (!PyArg_ParseTuple(args, "OOOOOO:segment", &capsule, &oimage, &oaffine, &olabels, &oprob, &ocb)) return NULL;
    dfx_segmenter *h = segmenter_from(capsule);
    if (h == NULL) return NULL;
    Borrowed b = {.count = 0};
    Py_buffer affine = {0}, labels = {0};
    int have_affine = 0, have_labels = 0;
    PyObject *result = NULL;
    float *image, *prob;
    if (borrow(&b, oimage, op, "image", 0, 0, 4, NULL, &image) < 0) goto done;
    if (PyObject_GetBuffer(oaffine, &affine, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) != 0) goto done;
    have_affine = 1;
    if (affine.len != 16 * (Py_ssize_t)sizeof(double) || affine.itemsize != (Py_ssize_t)sizeof(double)) {
        PyErr_SetString(PyExc_ValueError, "segment: affine must be 16 float64 values (4 x 4)");
        goto done;
    }
    if (PyObject_GetBuffer(olabels, &labels, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | PyBUF_WRITABLE) != 0) goto done;
    have_labels = 1;
    {
        Py_ssize_t *is = b.views[0].shape;
        if (labels.itemsize != 1 || labels.format == NULL || strcmp(labels.format, "B") != 0 || labels.ndim != 3 || labels.shape[0] != is[1] || labels.shape[1] != is[2] ||
            labels.shape[2] != is[3]) {
            PyErr_Format(PyExc_ValueError, "segment: labels must be uint8 of shape (%zd, %zd, %zd)", is[1], is[2], is[3]);
            goto done;
        }
        int32_t cin = 0, cout = 0;
        dfx_status st = dfx_segmenter_channels(h, &cin, &cout);
        if (st != DFX_OK) { raise_status(st); goto done; }
        if (is[0] != cin) {
            PyErr_Format(PyExc_ValueError, "segment: the image must have %d channel(s), got %zd", (int)cin, is[0]);
            goto done;
        }
        if (oprob != Py_None) {
            const Py_ssize_t pshape[4] = {cout, is[1], is[2], is[3]};
            if (borrow(&b, oprob, op, "probabilities", 1, 0, 4, pshape, &prob) < 0) goto done;
        } else {
            prob = NULL;
        }
        int64_t size[3] = {is[1], is[2], is[3]};
        Progress p = {.callable = ocb == Py_None ? NULL : ocb, .last_done = -1, .failed = 0};
        dfx_status status;
        Py_BEGIN_ALLOW_THREADS
        status = dfx_segment(h, image, is[0], size, (const double *)affine.buf, (uint8_t *)labels.buf, prob,
                             progress_trampoline, &p);
        Py_END_ALLOW_THREADS
        if (finish(status, &p) < 0) goto done;
        result = Py_NewRef(Py_None);
    }
done:
    release_all(&b);
    if (have_affine) PyBuffer_Release(&affine);
    if (have_labels) PyBuffer_Release(&labels);
    return result;
}

static PyObject *py_segmenter_release_memory(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_segmenter *h = segmenter_from(capsule);
    if (h == NULL) return NULL;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_segmenter_release_memory(h);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    Py_RETURN_NONE;
}

static PyObject *py_segmenter_retained_bytes(PyObject *self, PyObject *capsule) {
    (void)self;
    dfx_segmenter *h = segmenter_from(capsule);
    if (h == NULL) return NULL;
    int64_t n = 0;
    dfx_status status;
    Py_BEGIN_ALLOW_THREADS
    status = dfx_segmenter_retained_bytes(h, &n);
    Py_END_ALLOW_THREADS
    if (status != DFX_OK) return raise_status(status);
    return PyLong_FromLongLong((long long)n);
}

/* ==================================== end of segmentation ===================================== */

static PyMethodDef methods[] = {
    {"version", py_version, METH_NOARGS, "version() -> str: dfx_version()"},
    {"last_error", py_last_error, METH_NOARGS, "last_error() -> str: dfx_last_error() of this thread"},
    {"set_num_threads", py_set_num_threads, METH_VARARGS, "set_num_threads(n): dfx_set_num_threads"},
    {"get_num_threads", py_get_num_threads, METH_NOARGS, "get_num_threads() -> int"},
    {"workspace_create", py_workspace_create, METH_NOARGS, "workspace_create() -> workspace"},
    {"workspace_release", py_workspace_release, METH_O, "workspace_release(workspace): frees its scratch"},
    {"workspace_bytes", py_workspace_bytes, METH_O, "workspace_bytes(workspace) -> int"},
    {"deform_conv3d_forward", py_deform_conv3d_forward, METH_VARARGS,
     "deform_conv3d_forward(ws, x, offsets, weight, bias_or_None, y): fills y"},
    {"deform_conv3d_backward", py_deform_conv3d_backward, METH_VARARGS,
     "deform_conv3d_backward(ws, x, offsets, weight, grad_y, grad_x, grad_offsets, grad_weight, grad_bias)"},
    {"ddc_layer_forward", py_ddc_layer_forward, METH_VARARGS,
     "ddc_layer_forward(ws, x, weight, bias, offset_weight, offset_bias, offset_mode, y, offsets_or_None)"},
    {"ddc_layer_backward", py_ddc_layer_backward, METH_VARARGS,
     "ddc_layer_backward(ws, x, weight, offset_weight, offset_bias, offset_mode, grad_y, grad_x, "
     "grad_weight, grad_bias, grad_offset_weight, grad_offset_bias)"},
    {"model_create", py_model_create, METH_VARARGS, "model_create(config_json, seed) -> model"},
    {"model_config_json", py_model_config_json, METH_O, "model_config_json(model) -> str"},
    {"model_last_report", py_model_last_report, METH_O, "model_last_report(model) -> str"},
    {"model_num_parameters", py_model_num_parameters, METH_O, "model_num_parameters(model) -> int"},
    {"model_tensors", py_model_tensors, METH_O, "model_tensors(model) -> [(name, shape)]"},
    {"model_get_tensor", py_model_get_tensor, METH_VARARGS, "model_get_tensor(model, index, out)"},
    {"model_get_grad", py_model_get_grad, METH_VARARGS, "model_get_grad(model, index, out)"},
    {"model_zero_grad", py_model_zero_grad, METH_O, "model_zero_grad(model)"},
    {"model_load_tensors", py_model_load_tensors, METH_VARARGS, "model_load_tensors(model, [(name, array)], strict)"},
    {"model_load", py_model_load, METH_VARARGS, "model_load(model, path, strict)"},
    {"model_save", py_model_save, METH_VARARGS, "model_save(model, path)"},
    {"model_summary", py_model_summary, METH_VARARGS, "model_summary(model, n, d, h, w) -> str"},
    {"session_create", py_session_create, METH_O, "session_create(model) -> session"},
    {"session_forward", py_session_forward, METH_VARARGS, "session_forward(session, x, y, progress_or_None)"},
    {"session_backward", py_session_backward, METH_VARARGS,
     "session_backward(session, x, grad_y, grad_x_or_None, progress_or_None)"},
    {"session_release_memory", py_session_release_memory, METH_O, "session_release_memory(session)"},
    {"session_retained_bytes", py_session_retained_bytes, METH_O, "session_retained_bytes(session) -> int"},
    /* NIfTI */
    {"nifti_open", py_nifti_open, METH_VARARGS, "nifti_open(path) -> handle"},
    {"nifti_header_json", py_nifti_header_json, METH_O, "nifti_header_json(handle) -> str"},
    {"nifti_raw_header", py_nifti_raw_header, METH_O, "nifti_raw_header(handle) -> bytes"},
    {"nifti_read", py_nifti_read, METH_VARARGS, "nifti_read(handle, kind, out): fills out"},
    {"nifti_release_voxels", py_nifti_release_voxels, METH_O, "nifti_release_voxels(handle)"},
    {"nifti_write", py_nifti_write, METH_VARARGS,
     "nifti_write(path, data, datatype, dims, affine, template_or_None, description_or_None, level)"},
    /* training */
    {"dice_ce", py_dice_ce, METH_VARARGS, "dice_ce(logits, labels, class_weights_or_None, grad_or_None) -> (total, dice, ce)"},
    {"trainer_create", py_trainer_create, METH_VARARGS, "trainer_create(model, options_json) -> trainer"},
    {"trainer_step", py_trainer_step, METH_VARARGS, "trainer_step(trainer, images, labels, progress_or_None) -> (total, dice, ce)"},
    {"trainer_info", py_trainer_info, METH_O, "trainer_info(trainer) -> (learning_rate, step, accumulated)"},
    {"trainer_set_learning_rate", py_trainer_set_learning_rate, METH_VARARGS, "trainer_set_learning_rate(trainer, lr)"},
    {"trainer_report_validation", py_trainer_report_validation, METH_VARARGS,
     "trainer_report_validation(trainer, metric) -> learning rate"},
    {"trainer_save_state", py_trainer_save_state, METH_VARARGS, "trainer_save_state(trainer, path)"},
    {"trainer_load_state", py_trainer_load_state, METH_VARARGS, "trainer_load_state(trainer, path)"},
    {"sampler_create", py_sampler_create, METH_VARARGS, "sampler_create(config_json) -> sampler"},
    {"sampler_add", py_sampler_add, METH_VARARGS, "sampler_add(sampler, image, labels) -> index"},
    {"sampler_batch", py_sampler_batch, METH_VARARGS, "sampler_batch(sampler, [indices], rng_state, images, labels) -> rng_state"},
    /* segmentation */
    {"model_card_normalize", py_model_card_normalize, METH_VARARGS, "model_card_normalize(card_json) -> str"},
    {"segmenter_create", py_segmenter_create, METH_VARARGS, "segmenter_create(session, config_json_or_None) -> segmenter"},
    {"segmenter_config_json", py_segmenter_config_json, METH_O, "segmenter_config_json(segmenter) -> str"},
    {"segmenter_statistics_json", py_segmenter_statistics_json, METH_O, "segmenter_statistics_json(segmenter) -> str"},
    {"segment", py_segment, METH_VARARGS,
     "segment(segmenter, image, affine, labels, probabilities_or_None, progress_or_None): fills labels"},
    {"segmenter_release_memory", py_segmenter_release_memory, METH_O, "segmenter_release_memory(segmenter)"},
    {"segmenter_retained_bytes", py_segmenter_retained_bytes, METH_O, "segmenter_retained_bytes(segmenter) -> int"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "deformux._C",
    "Thin binding of the deformux C ABI; use deformux.ops instead.", -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__C(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    DeformUXError = PyErr_NewExceptionWithDoc(
        "deformux.DeformUXError",
        "An error reported by the deformux engine (other than bad arguments or out of memory).",
        PyExc_RuntimeError, NULL);
    FileFormatError = PyErr_NewExceptionWithDoc(
        "deformux.FileFormatError",
        "A file that is damaged, truncated or not in the expected format (an OSError; .filename is the path).",
        PyExc_OSError, NULL);
    if (DeformUXError == NULL || PyModule_AddObjectRef(m, "DeformUXError", DeformUXError) < 0 ||
        FileFormatError == NULL || PyModule_AddObjectRef(m, "FileFormatError", FileFormatError) < 0 ||
        PyModule_AddIntConstant(m, "OFFSET_ALIGNED", DFX_OFFSET_ALIGNED) < 0 ||
        PyModule_AddIntConstant(m, "OFFSET_OFFICIAL", DFX_OFFSET_OFFICIAL) < 0 ||
        PyModule_AddStringConstant(m, "__version__", dfx_version()) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
