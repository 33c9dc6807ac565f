/*
 * Drift test of the C ABI: compiled against the hand-written Sources/DeformUXC/include/deformux.h and
 * linked to libDeformUXC.so, it calls every function with a tiny valid case and with invalid ones,
 * and checks status codes and messages. A signature that no longer matches the header fails to
 * compile (with -Werror) or to link, or returns wrong results.
 *
 *   cc -std=c11 -Wall -Wextra -Werror -I Sources/DeformUXC/include Tests/capi/test_capi.c \
 *      -L DIR -lDeformUXC -Wl,-rpath,DIR -lm -o test_capi && ./test_capi
 *
 * (python/tests/test_capi.py does exactly this with the library of the installed Python package.)
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "deformux.h"

static int failures = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            failures++;                                                    \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, "\n");                                         \
        }                                                                  \
    } while (0)

/* A failing call: the expected status, and a message that names the operation. */
static void expect_error(const char *what, dfx_status got, dfx_status want, const char *op) {
    const char *msg = dfx_last_error();
    CHECK(got == want, "%s: status %d, expected %d", what, (int)got, (int)want);
    CHECK(msg != NULL && msg[0] != '\0', "%s: dfx_last_error() is empty", what);
    if (msg != NULL && op != NULL) CHECK(strstr(msg, op) != NULL, "%s: message \"%s\" lacks \"%s\"", what, msg, op);
}

/* Tiny case: N 1, C 2, D 3, H 2, W 2. */
enum { N = 1, C = 2, D = 3, H = 2, W = 2, V = D * H * W };
static float x[N * C * V], offsets[N * 81 * V], weight[C * 27], bias[C], y[N * C * V];
static float gy[N * C * V], gx[N * C * V], goff[N * 81 * V], gw[C * 27], gb[C];
static float ow[81 * C], ob[81], offsets_out[N * 81 * V], gow[81 * C], gob[81];

static int all_finite(const float *a, int n) {
    for (int i = 0; i < n; i++)
        if (!isfinite(a[i])) return 0;
    return 1;
}

/* A progress callback that cancels once `done` reaches *(int *)user. */
static int32_t cancel_at(void *user, int64_t done, int64_t total) {
    (void)total;
    return done >= *(int *)user;
}

/* ---- text outputs (buf, cap, needed): truncated and terminated, *needed the whole text's size ---- */

typedef dfx_status (*text_fn)(const void *handle, char *buf, int64_t cap, int64_t *needed);

/* The model and NIfTI text functions, and a summary at 16^3, behind one signature. */
static dfx_status config_text(const void *h, char *b, int64_t c, int64_t *n) { return dfx_model_config_json(h, b, c, n); }
static dfx_status report_text(const void *h, char *b, int64_t c, int64_t *n) { return dfx_model_last_report(h, b, c, n); }
static dfx_status summary_text(const void *h, char *b, int64_t c, int64_t *n) {
    return dfx_model_summary(h, 1, 16, 16, 16, b, c, n);
}
static dfx_status nifti_text(const void *h, char *b, int64_t c, int64_t *n) { return dfx_nifti_header_json(h, b, c, n); }

/* For caps 0, 1, 2, 7, needed - 1 and needed: the first cap - 1 bytes of the text and a NUL, nothing
 * written past cap, *needed the same every time; a negative cap is an error. */
static void check_text(const char *what, text_fn fill, const void *handle) {
    int64_t needed = -1;
    CHECK(fill(handle, NULL, 0, &needed) == DFX_OK && needed >= 1, "%s: size query: %s", what, dfx_last_error());
    if (needed < 1) return;
    char *full = malloc((size_t)needed), *buf = malloc((size_t)needed + 16);
    if (full == NULL || buf == NULL) { free(full); free(buf); return; }
    CHECK(fill(handle, full, needed, NULL) == DFX_OK, "%s: fill without needed", what);
    CHECK((int64_t)strlen(full) == needed - 1, "%s: strlen %zu, needed %lld", what, strlen(full), (long long)needed);
    const int64_t caps[] = {0, 1, 2, 7, needed - 1, needed};
    for (int k = 0; k < 6; k++) {
        int64_t cap = caps[k], got = -1;
        if (cap < 0 || cap > needed) continue;
        memset(buf, 'X', (size_t)needed + 16);
        CHECK(fill(handle, buf, cap, &got) == DFX_OK, "%s cap %lld: %s", what, (long long)cap, dfx_last_error());
        CHECK(got == needed, "%s cap %lld: needed %lld, expected %lld", what, (long long)cap, (long long)got,
              (long long)needed);
        if (cap > 0) {
            CHECK(memcmp(buf, full, (size_t)(cap - 1)) == 0 && buf[cap - 1] == '\0',
                  "%s cap %lld: not the text's first %lld bytes and a NUL", what, (long long)cap, (long long)cap - 1);
        }
        for (int64_t i = cap; i < needed + 16; i++) {
            if (buf[i] != 'X') {
                CHECK(0, "%s cap %lld: byte %lld written past cap", what, (long long)cap, (long long)i);
                break;
            }
        }
    }
    expect_error(what, fill(handle, buf, -1, &needed), DFX_ERR_INVALID_ARGUMENT, "cap");
    free(full);
    free(buf);
}

/* ---- NIfTI: write, open, read back (every read kind), affines, header, template, errors ---- */
static void test_nifti(void) {
    const char *dir = getenv("TMPDIR") != NULL ? getenv("TMPDIR") : "/tmp";
    char path[512], labels_path[512], bad_path[512];
    srand((unsigned)time(NULL));
    int tag = rand();
    snprintf(path, sizeof path, "%s/dfx_capi_%d.nii.gz", dir, tag);
    snprintf(labels_path, sizeof labels_path, "%s/dfx_capi_%d_labels.nii", dir, tag);
    snprintf(bad_path, sizeof bad_path, "%s/dfx_capi_%d_bad.nii", dir, tag);

    enum { NX = 4, NY = 3, NZ = 2, NV = NX * NY * NZ };
    float vol[NV];  /* [x][y][z] */
    for (int i = 0; i < NV; i++) vol[i] = 0.5f * (float)i - 3.0f;
    const int64_t dims[3] = {NX, NY, NZ};
    const double affine[16] = {2, 0, 0, -10.5, 0, 3, 0, 20, 0, 0, 4, -30.25, 0, 0, 0, 1};
    CHECK(dfx_nifti_write(path, vol, 16, 3, dims, affine, NULL, "test_capi", -1) == DFX_OK,
          "nifti write: %s", dfx_last_error());

    dfx_nifti *img = NULL;
    CHECK(dfx_nifti_open(path, &img) == DFX_OK && img != NULL, "nifti open: %s", dfx_last_error());
    if (img == NULL) return;
    int32_t rank = 0, datatype = 0;
    int64_t shape[5] = {0}, count = 0;
    CHECK(dfx_nifti_array_shape(img, &rank, shape, &datatype, &count) == DFX_OK, "array shape");
    CHECK(rank == 3 && shape[0] == NX && shape[1] == NY && shape[2] == NZ && datatype == 16 && count == NV,
          "array shape: rank %d, %lld x %lld x %lld, datatype %d, count %lld", (int)rank, (long long)shape[0],
          (long long)shape[1], (long long)shape[2], (int)datatype, (long long)count);
    float back[NV];
    CHECK(dfx_nifti_read(img, DFX_NIFTI_FLOAT32, back, NV) == DFX_OK, "nifti read float: %s", dfx_last_error());
    CHECK(memcmp(back, vol, sizeof vol) == 0, "float voxels differ after a round trip");
    float raw[NV];
    CHECK(dfx_nifti_read(img, DFX_NIFTI_RAW, raw, NV) == DFX_OK && memcmp(raw, vol, sizeof vol) == 0, "raw voxels");
    int32_t ints[NV];
    expect_error("nifti int32 of non-integers", dfx_nifti_read(img, DFX_NIFTI_INT32, ints, NV), DFX_ERR_INVALID_ARGUMENT,
                 "nifti_read");
    expect_error("nifti read count", dfx_nifti_read(img, DFX_NIFTI_FLOAT32, back, NV - 1), DFX_ERR_SHAPE, "nifti_read");
    expect_error("nifti read kind", dfx_nifti_read(img, 7, back, NV), DFX_ERR_INVALID_ARGUMENT, "kind");
    expect_error("nifti read NULL", dfx_nifti_read(img, DFX_NIFTI_FLOAT32, NULL, NV), DFX_ERR_INVALID_ARGUMENT, "out");

    double a[16];
    int32_t code = -1;
    CHECK(dfx_nifti_affine(img, DFX_NIFTI_AFFINE_BEST, a, &code) == DFX_OK && code == DFX_NIFTI_AFFINE_SFORM,
          "best affine source %d", (int)code);
    for (int i = 0; i < 16; i++) CHECK(a[i] == affine[i], "affine[%d] = %g, expected %g", i, a[i], affine[i]);
    CHECK(dfx_nifti_affine(img, DFX_NIFTI_AFFINE_QFORM, a, &code) == DFX_OK && code == 1, "qform code %d", (int)code);
    for (int i = 0; i < 16; i++) CHECK(fabs(a[i] - affine[i]) < 1e-5, "qform[%d] = %g, expected %g", i, a[i], affine[i]);
    CHECK(dfx_nifti_affine(img, DFX_NIFTI_AFFINE_SFORM, a, NULL) == DFX_OK, "sform");
    expect_error("nifti affine which", dfx_nifti_affine(img, 3, a, NULL), DFX_ERR_INVALID_ARGUMENT, "which");

    int64_t needed = 0;
    CHECK(dfx_nifti_header_json(img, NULL, 0, &needed) == DFX_OK && needed > 100, "header json size");
    char *json = malloc((size_t)needed);
    if (json != NULL) {
        CHECK(dfx_nifti_header_json(img, json, needed, &needed) == DFX_OK, "header json");
        CHECK(strstr(json, "\"sform_code\": 1") && strstr(json, "\"descrip\": \"test_capi\"") &&
              strstr(json, "\"compressed\": true") && strstr(json, "\"dtype\": \"float32\""), "header json: %s", json);
        free(json);
    }
    check_text("nifti header json", nifti_text, img);
    uint8_t header[348];
    CHECK(dfx_nifti_raw_header(img, NULL, 0, &needed) == DFX_OK && needed == 348, "raw header size %lld", (long long)needed);
    CHECK(dfx_nifti_raw_header(img, header, 348, &needed) == DFX_OK && header[0] == 0x5C && header[1] == 0x01,
          "raw header starts with sizeof_hdr 348 little-endian");

    /* a label map with the float image as template: uint8, no scaling, the template's affine and descrip */
    uint8_t labels[NV];
    for (int i = 0; i < NV; i++) labels[i] = (uint8_t)(i % 3);
    CHECK(dfx_nifti_release_voxels(img) == DFX_OK, "release voxels");
    expect_error("nifti read after release", dfx_nifti_read(img, DFX_NIFTI_FLOAT32, back, NV), DFX_ERR_INVALID_ARGUMENT,
                 "dropped");
    CHECK(dfx_nifti_write(labels_path, labels, 2, 3, dims, affine, img, NULL, -1) == DFX_OK, "write labels: %s",
          dfx_last_error());
    dfx_nifti *lab = NULL;
    CHECK(dfx_nifti_open(labels_path, &lab) == DFX_OK, "open labels: %s", dfx_last_error());
    if (lab != NULL) {
        int32_t lt = 0;
        CHECK(dfx_nifti_array_shape(lab, NULL, NULL, &lt, NULL) == DFX_OK && lt == 2, "labels datatype %d", (int)lt);
        CHECK(dfx_nifti_read(lab, DFX_NIFTI_INT32, ints, NV) == DFX_OK, "labels int32: %s", dfx_last_error());
        for (int i = 0; i < NV; i++) CHECK(ints[i] == labels[i], "label %d = %d", i, (int)ints[i]);
        json = malloc(4096);
        if (json != NULL) {
            CHECK(dfx_nifti_header_json(lab, json, 4096, &needed) == DFX_OK, "labels header json");
            CHECK(strstr(json, "\"scl_slope\": 1.0,") && strstr(json, "\"scl_inter\": 0.0,") &&
                  strstr(json, "\"descrip\": \"test_capi\""), "labels header json: %s", json);
            free(json);
        }
        dfx_nifti_free(lab);
    }
    dfx_nifti_free(img);
    dfx_nifti_free(NULL);

    /* errors: missing file (errno ENOENT), damaged file (errno 0, the path named), bad arguments */
    dfx_nifti *none = (dfx_nifti *)&tag;
    expect_error("nifti open missing", dfx_nifti_open("/nonexistent/x.nii.gz", &none), DFX_ERR_IO, "/nonexistent/x.nii.gz");
    CHECK(dfx_last_error_errno() == ENOENT && none == NULL, "missing file: errno %d", (int)dfx_last_error_errno());
    CHECK(strcmp(dfx_last_error_field(DFX_FIELD_PATH), "/nonexistent/x.nii.gz") == 0, "path field");
    FILE *f = fopen(bad_path, "wb");
    if (f != NULL) {
        fwrite("not a nifti file, just text", 1, 27, f);
        fclose(f);
        expect_error("nifti open damaged", dfx_nifti_open(bad_path, &none), DFX_ERR_IO, "sizeof_hdr");
        CHECK(dfx_last_error_errno() == 0 && strstr(dfx_last_error(), bad_path) != NULL, "damaged file: %s", dfx_last_error());
    }
    expect_error("nifti open NULL path", dfx_nifti_open(NULL, &none), DFX_ERR_INVALID_ARGUMENT, "path");
    expect_error("nifti open NULL out", dfx_nifti_open(path, NULL), DFX_ERR_INVALID_ARGUMENT, "out");
    expect_error("nifti header NULL", dfx_nifti_header_json(NULL, NULL, 0, &needed), DFX_ERR_INVALID_ARGUMENT, "nifti");
    expect_error("nifti write datatype", dfx_nifti_write(path, vol, 32, 3, dims, affine, NULL, NULL, -1),
                 DFX_ERR_INVALID_ARGUMENT, "datatype");
    expect_error("nifti write suffix", dfx_nifti_write("/tmp/x.img", vol, 16, 3, dims, affine, NULL, NULL, -1),
                 DFX_ERR_INVALID_ARGUMENT, ".nii");
    expect_error("nifti write ndim", dfx_nifti_write(path, vol, 16, 6, dims, affine, NULL, NULL, -1),
                 DFX_ERR_INVALID_ARGUMENT, "ndim");
    expect_error("nifti write level", dfx_nifti_write(path, vol, 16, 3, dims, affine, NULL, NULL, 10),
                 DFX_ERR_INVALID_ARGUMENT, "compression_level");
    const int64_t huge_dims[][3] = {{INT64_MAX, 2, 2}, {((int64_t)1 << 62) + 1, 4, 1}, {-1, -4, 1}, {INT64_MIN, 1, 1}};
    for (int i = 0; i < 4; i++)
        expect_error("nifti write huge dims", dfx_nifti_write(path, vol, 16, 3, huge_dims[i], affine, NULL, NULL, -1),
                     DFX_ERR_INVALID_ARGUMENT, "nifti_write");
    remove(path);
    remove(labels_path);
    remove(bad_path);
}
/* ---- end of NIfTI ---- */

/* ---- segmentation (dfx_segmenter_*, dfx_segment, dfx_model_card_normalize) ---- */
static int64_t progress_calls = 0, progress_total = 0, progress_last = -1;
static int monotone = 1;
static int32_t count_progress(void *user, int64_t done, int64_t total) {
    (void)user;
    if (done < progress_last) monotone = 0;
    progress_calls++;
    progress_last = done;
    progress_total = total;
    return 0;
}

static void test_segment(void) {
    char text[4096];
    int64_t needed = 0;
    /* cards: defaults written out; errors name the key */
    CHECK(dfx_model_card_normalize("{\"overlap\": 0.25}", text, (int64_t)sizeof text, &needed) == DFX_OK &&
          needed <= (int64_t)sizeof text && strstr(text, "\"overlap\": 0.25") != NULL && strstr(text, "\"window\": [96, 96, 96]") != NULL,
          "card normalize: %s", text);
    expect_error("card overlap", dfx_model_card_normalize("{\"overlap\": 1}", text, (int64_t)sizeof text, &needed),
                 DFX_ERR_INVALID_ARGUMENT, "overlap");
    expect_error("card NULL", dfx_model_card_normalize(NULL, text, (int64_t)sizeof text, &needed), DFX_ERR_INVALID_ARGUMENT,
                 "model_card_normalize");

    dfx_model *m = NULL;
    dfx_session *sess = NULL;
    dfx_segmenter *seg = NULL;
    CHECK(dfx_model_create("{\"out_channels\": 3, \"feature_size\": [4, 8, 8, 8], \"hidden_size\": 8}", 2, &m) == DFX_OK,
          "segment model: %s", dfx_last_error());
    CHECK(dfx_session_create(m, &sess) == DFX_OK, "segment session: %s", dfx_last_error());
    expect_error("segmenter NULL session", dfx_segmenter_create(NULL, "{}", &seg), DFX_ERR_INVALID_ARGUMENT, "session");
    expect_error("segmenter bad card", dfx_segmenter_create(sess, "{\"window\": [16, 16, 20]}", &seg), DFX_ERR_INVALID_ARGUMENT,
                 "window");
    CHECK(seg == NULL, "a failed create left a handle");
    expect_error("segmenter wrong classes", dfx_segmenter_create(sess, "{\"classes\": [\"background\", \"a\"]}", &seg),
                 DFX_ERR_INVALID_ARGUMENT, "one class per output channel");
    CHECK(dfx_segmenter_create(sess, "{\"window\": [16, 16, 16], \"orientation\": null, \"classes\": [\"b\", \"x\", \"y\"]}",
                               &seg) == DFX_OK && seg != NULL, "segmenter create: %s", dfx_last_error());
    int32_t seg_in = 0, seg_out = 0;
    CHECK(dfx_segmenter_channels(seg, &seg_in, &seg_out) == DFX_OK && seg_in == 1 && seg_out == 3, "segmenter channels");
    CHECK(dfx_segmenter_statistics_json(seg, text, (int64_t)sizeof text, &needed) == DFX_OK && strcmp(text, "null") == 0,
          "statistics before a run: %s", text);
    CHECK(dfx_segmenter_config_json(seg, text, (int64_t)sizeof text, &needed) == DFX_OK && strstr(text, "\"window\": [16, 16, 16]"),
          "segmenter config: %s", text);

    enum { SX = 20, SY = 9, SZ = 12, SN = SX * SY * SZ };
    static float image[SN], probabilities[3 * SN];
    static uint8_t labels[SN];
    for (int i = 0; i < SN; i++) image[i] = (float)((i * 7919) % 101) / 10.0f;
    const int64_t size[3] = {SX, SY, SZ};
    const double affine[16] = {1, 0, 0, 0, 0, 1.5, 0, 0, 0, 0, 2, 0, 0, 0, 0, 1};
    memset(labels, 255, sizeof labels);
    CHECK(dfx_segment(seg, image, 1, size, affine, labels, probabilities, count_progress, NULL) == DFX_OK, "segment: %s",
          dfx_last_error());
    int in_range = 1;
    for (int i = 0; i < SN; i++) {
        if (labels[i] > 2) in_range = 0;
        float p = probabilities[i] + probabilities[SN + i] + probabilities[2 * SN + i];
        if (fabsf(p - 1.0f) > 1e-5f) in_range = 0;
    }
    CHECK(in_range, "labels 0..2 and probabilities summing to 1");
    /* network grid 32 x 16 x 16, windows of 16 at overlap 0.5: 3 x 1 x 1, 12 steps each */
    CHECK(progress_total == 3 * 12 && progress_last == progress_total && monotone && progress_calls >= 36,
          "progress: %lld calls, last %lld of %lld", (long long)progress_calls, (long long)progress_last,
          (long long)progress_total);
    CHECK(dfx_segmenter_statistics_json(seg, text, (int64_t)sizeof text, &needed) == DFX_OK &&
          strstr(text, "\"windows\": 3") != NULL && strstr(text, "\"network_size\": [32, 16, 16]") != NULL &&
          strstr(text, "\"units_per_window\": 12") != NULL, "statistics: %s", text);
    CHECK(dfx_segment(seg, image, 1, size, affine, labels, NULL, NULL, NULL) == DFX_OK, "segment without probabilities");
    static int cancel_after = 5;
    expect_error("segment cancelled", dfx_segment(seg, image, 1, size, affine, labels, NULL, cancel_at, &cancel_after),
                 DFX_ERR_CANCELLED, "cancelled");
    expect_error("segment channels", dfx_segment(seg, image, 2, size, affine, labels, NULL, NULL, NULL), DFX_ERR_SHAPE,
                 "channels");
    expect_error("segment image NULL", dfx_segment(seg, NULL, 1, size, affine, labels, NULL, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "image");
    expect_error("segment labels NULL", dfx_segment(seg, image, 1, size, affine, NULL, NULL, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "labels");
    const int64_t zero[3] = {SX, 0, SZ};
    expect_error("segment size 0", dfx_segment(seg, image, 1, zero, affine, labels, NULL, NULL, NULL), DFX_ERR_INVALID_ARGUMENT,
                 "size");
    const double bad_affine[16] = {1, 0, 0, 0, 0, NAN, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1};
    expect_error("segment NaN affine", dfx_segment(seg, image, 1, size, bad_affine, labels, NULL, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "non-finite");
    image[17] = NAN;
    expect_error("segment NaN", dfx_segment(seg, image, 1, size, affine, labels, NULL, NULL, NULL), DFX_ERR_INVALID_ARGUMENT,
                 "non-finite");
    int64_t retained = 0;
    CHECK(dfx_segmenter_retained_bytes(seg, &retained) == DFX_OK && retained > 0, "segmenter retained bytes");
    CHECK(dfx_segmenter_release_memory(seg) == DFX_OK, "segmenter release");
    CHECK(dfx_segmenter_retained_bytes(seg, &retained) == DFX_OK && retained == 0, "retained after release: %lld",
          (long long)retained);
    expect_error("segmenter NULL", dfx_segmenter_retained_bytes(NULL, &retained), DFX_ERR_INVALID_ARGUMENT, "segmenter");
    dfx_model_free(m);
    dfx_session_free(sess); /* the segmenter keeps its session (and model) alive */
    image[17] = 1.0f;
    CHECK(dfx_segment(seg, image, 1, size, affine, labels, NULL, NULL, NULL) == DFX_OK, "segment after freeing the session");
    dfx_segmenter_free(seg);
    dfx_segmenter_free(NULL);
}

/* ---- extreme sizes: every entry point that takes sizes refuses them with an error, never a trap ---- */

/* Sizes (n, c, d, h, w) each operator must refuse before touching memory (the buffers are tiny). */
static const int64_t bad_sizes[][5] = {
    {INT64_MAX, 1, 1, 1, 1}, {1, INT64_MAX, 1, 1, 1}, {1, 1, INT64_MAX, 1, 1}, {1, 1, 1, INT64_MAX, 1},
    {1, 1, 1, 1, INT64_MAX}, {1, 1, INT64_MAX - 1, 1, 1}, /* d + 2 overflowed */ {1, 1, 1, INT64_MAX - 2, 1},
    {INT64_MIN, 1, 1, 1, 1}, {1, 1, 1, -1, 1}, {1, 1, 1, 1, (int64_t)1 << 31}, {1, 1, 1, 1, 0},
    {INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX, INT32_MAX}, {1, (int64_t)1 << 30, 2048, 2048, 2048},
};
enum { BAD_SIZES = sizeof bad_sizes / sizeof bad_sizes[0] };

static void test_extreme_operator_sizes(dfx_workspace *ws) {
    for (int i = 0; i < BAD_SIZES; i++) {
        const int64_t *s = bad_sizes[i];
        char what[96];
        snprintf(what, sizeof what, "sizes %lld %lld %lld %lld %lld", (long long)s[0], (long long)s[1],
                 (long long)s[2], (long long)s[3], (long long)s[4]);
        expect_error(what, dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, y, s[0], s[1], s[2], s[3], s[4], NULL, NULL),
                     DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
        expect_error(what, dfx_deform_conv3d_backward(ws, x, offsets, weight, gy, gx, goff, gw, gb, s[0], s[1], s[2], s[3],
                                                      s[4], NULL, NULL), DFX_ERR_INVALID_ARGUMENT, "deform_conv3d_backward");
        expect_error(what, dfx_ddc_layer_forward(ws, x, weight, bias, ow, ob, DFX_OFFSET_ALIGNED, y, offsets_out, s[0], s[1],
                                                 s[2], s[3], s[4], NULL, NULL), DFX_ERR_INVALID_ARGUMENT, "ddc_layer");
        expect_error(what, dfx_ddc_layer_backward(ws, x, weight, ow, ob, DFX_OFFSET_OFFICIAL, gy, gx, gw, gb, gow, gob, s[0],
                                                  s[1], s[2], s[3], s[4], NULL, NULL), DFX_ERR_INVALID_ARGUMENT,
                     "ddc_layer_backward");
        expect_error(what, dfx_deform_conv3d_forward(NULL, x, offsets, weight, bias, y, s[0], s[1], s[2], s[3], s[4], NULL,
                                                     NULL), DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
    }
    expect_error("threads INT32_MAX", dfx_set_num_threads(INT32_MAX), DFX_ERR_INVALID_ARGUMENT, "set_num_threads");
    expect_error("threads INT32_MIN", dfx_set_num_threads(INT32_MIN), DFX_ERR_INVALID_ARGUMENT, "set_num_threads");
}

/* Inputs (n, d, h, w) of a forward, backward or summary that must be refused. */
static const int64_t bad_inputs[][4] = {
    {INT64_MAX, 16, 16, 16}, {1, INT64_MAX, 16, 16}, {1, 16, INT64_MAX, 16}, {1, 16, 16, INT64_MAX},
    {1, INT64_MAX - 15, 16, 16}, /* a multiple of 16 */ {1, 16, 16, (int64_t)1 << 62}, {(int64_t)1 << 62, 96, 96, 96},
    {1, (int64_t)1 << 21, (int64_t)1 << 21, (int64_t)1 << 21}, {INT64_MIN, 16, 16, 16}, {1, 16, -16, 16}, {0, 16, 16, 16},
};
enum { BAD_INPUTS = sizeof bad_inputs / sizeof bad_inputs[0] };

static void test_extreme_model_sizes(void) {
    dfx_model *m = NULL;
    const char *config = "{\"out_channels\": 2, \"feature_size\": [4, 4, 4, 4], \"depths\": [1, 1, 1, 1], \"hidden_size\": 4}";
    CHECK(dfx_model_create(config, 1, &m) == DFX_OK && m != NULL, "model create: %s", dfx_last_error());
    if (m == NULL) return;
    dfx_session *s = NULL;
    CHECK(dfx_session_create(m, &s) == DFX_OK, "session create: %s", dfx_last_error());
    static float in[16 * 16 * 16], out[2 * 16 * 16 * 16];
    int64_t needed = 0;
    for (int i = 0; i < BAD_INPUTS; i++) {
        const int64_t *b = bad_inputs[i];
        char what[96];
        snprintf(what, sizeof what, "input %lld %lld %lld %lld", (long long)b[0], (long long)b[1], (long long)b[2],
                 (long long)b[3]);
        dfx_status st = dfx_session_forward(s, in, b[0], b[1], b[2], b[3], out, NULL, NULL);
        CHECK(st == DFX_ERR_INVALID_ARGUMENT || st == DFX_ERR_SHAPE, "%s: forward status %d", what, (int)st);
        st = dfx_session_backward(s, in, b[0], b[1], b[2], b[3], out, in, NULL, NULL);
        CHECK(st == DFX_ERR_INVALID_ARGUMENT || st == DFX_ERR_SHAPE, "%s: backward status %d", what, (int)st);
        st = dfx_model_summary(m, b[0], b[1], b[2], b[3], NULL, 0, &needed);
        CHECK(st == DFX_ERR_INVALID_ARGUMENT || st == DFX_ERR_SHAPE, "%s: summary status %d", what, (int)st);
        CHECK(strstr(dfx_last_error(), "summary") != NULL, "%s: summary message \"%s\"", what, dfx_last_error());
    }
    /* a summary with a large but countable input is fine */
    CHECK(dfx_model_summary(m, 1 << 20, 96, 96, 96, NULL, 0, &needed) == DFX_OK, "large summary: %s", dfx_last_error());

    /* parameter copies: the index and the count are checked */
    float buf[16];
    expect_error("get tensor INT64_MAX", dfx_model_get_tensor(m, INT64_MAX, buf, 1), DFX_ERR_INVALID_ARGUMENT, "index");
    expect_error("get tensor INT64_MIN", dfx_model_get_tensor(m, INT64_MIN, buf, 1), DFX_ERR_INVALID_ARGUMENT, "index");
    expect_error("get grad INT64_MAX", dfx_model_get_grad(m, INT64_MAX, buf, 1), DFX_ERR_INVALID_ARGUMENT, "index");
    expect_error("get tensor count", dfx_model_get_tensor(m, 0, buf, INT64_MAX), DFX_ERR_SHAPE, "floats");
    expect_error("get tensor count -1", dfx_model_get_tensor(m, 0, buf, -1), DFX_ERR_SHAPE, "floats");

    /* loads with impossible shapes: refused by name, nothing read from the (tiny) data */
    const char *name = NULL;
    int32_t rank = 0;
    int64_t shape[8];
    CHECK(dfx_model_tensor_info(m, 0, &name, &rank, shape) == DFX_OK, "tensor info");
    const char *names[1] = {name};
    const float *data[1] = {buf};
    const int64_t huge[][8] = {{INT64_MAX}, {-5}, {(int64_t)1 << 32, (int64_t)1 << 32}, {INT64_MIN, 0}};
    const int32_t huge_ranks[] = {1, 1, 2, 2};
    for (int i = 0; i < 4; i++) {
        char what[64];
        snprintf(what, sizeof what, "load a tensor of shape %lld...", (long long)huge[i][0]);
        for (int32_t strict = 0; strict <= 1; strict++) {
            dfx_status st = dfx_model_load_tensors(m, 1, names, data, &huge_ranks[i], huge[i], strict);
            CHECK(st == DFX_ERR_INVALID_ARGUMENT || (st == DFX_OK && !strict), "%s (strict %d): status %d: %s", what,
                  (int)strict, (int)st, dfx_last_error());
        }
    }
    const int32_t rank9 = 9, rank_negative = -1;
    expect_error("load rank 9", dfx_model_load_tensors(m, 1, names, data, &rank9, huge[0], 1), DFX_ERR_INVALID_ARGUMENT, "rank");
    expect_error("load rank -1", dfx_model_load_tensors(m, 1, names, data, &rank_negative, huge[0], 1),
                 DFX_ERR_INVALID_ARGUMENT, "rank");
    expect_error("load count -1", dfx_model_load_tensors(m, -1, names, data, &rank9, huge[0], 1), DFX_ERR_INVALID_ARGUMENT,
                 "count");
    dfx_session_free(s);
    dfx_model_free(m);

    /* configurations out of bounds, or too large to hold, are refused before anything is allocated */
    const char *bad_configs[] = {
        "{\"hidden_size\": 9223372036854775807}", "{\"hidden_size\": 1e300}", "{\"depths\": [1, 1, 1, 100000000000]}",
        "{\"block\": \"uxnet\", \"kernel_size\": 524287, \"depths\": [9, 1, 1, 1]}", "{\"feature_size\": [-1, 4, 4, 4]}",
        "{\"feature_size\": [16384, 16384, 16384, 16384], \"depths\": [64, 64, 64, 64], \"hidden_size\": 16384}",
        "{\"in_channels\": 18446744073709551616}",
    };
    for (size_t i = 0; i < sizeof bad_configs / sizeof bad_configs[0]; i++) {
        dfx_model *bad = NULL;
        expect_error(bad_configs[i], dfx_model_create(bad_configs[i], 0, &bad), DFX_ERR_INVALID_ARGUMENT, NULL);
        CHECK(bad == NULL, "%s: a handle was returned", bad_configs[i]);
        dfx_model_free(bad);
    }
}

int main(void) {
    for (int i = 0; i < N * C * V; i++) { x[i] = (float)((i * 37 % 11) - 5) / 5.0f; gy[i] = 1.0f; }
    for (int i = 0; i < C * 27; i++) weight[i] = (float)((i * 13 % 7) - 3) / 7.0f;
    for (int i = 0; i < C; i++) bias[i] = 0.5f * (float)(i + 1);
    for (int i = 0; i < N * 81 * V; i++) offsets[i] = 0.0f;
    for (int i = 0; i < 81 * C; i++) ow[i] = 0.0f;
    for (int i = 0; i < 81; i++) ob[i] = 0.0f;
    /* The operator calls' scratch: a caller-owned workspace (NULL would make a temporary one). */
    dfx_workspace *ws = NULL;
    CHECK(dfx_workspace_create(&ws) == DFX_OK && ws != NULL, "workspace create");

    /* version, last error, threads */
    const char *version = dfx_version();
    CHECK(version != NULL && version[0] != '\0', "dfx_version() is empty");
    CHECK(dfx_last_error() != NULL, "dfx_last_error() is NULL");
    int32_t threads = dfx_get_num_threads();
    CHECK(threads >= 1, "dfx_get_num_threads() = %d", (int)threads);
    CHECK(dfx_set_num_threads(1) == DFX_OK, "set 1 thread");
    CHECK(dfx_get_num_threads() == 1, "get after set 1: %d", (int)dfx_get_num_threads());
    expect_error("set 0 threads", dfx_set_num_threads(0), DFX_ERR_INVALID_ARGUMENT, "set_num_threads");
    expect_error("set -3 threads", dfx_set_num_threads(-3), DFX_ERR_INVALID_ARGUMENT, "set_num_threads");
    CHECK(dfx_get_num_threads() == 1, "a failed set changed the count");
    CHECK(dfx_set_num_threads(threads) == DFX_OK, "restore threads");

    /* operator forward: zero offsets = depthwise conv; check one interior-free value by hand:
       y[c] at voxel 0 = bias[c] + sum over taps inside the volume of weight * x */
    CHECK(dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, y, N, C, D, H, W, NULL, NULL) == DFX_OK, "forward: %s", dfx_last_error());
    for (int c = 0; c < C; c++) {
        double expect = bias[c];
        for (int i = 0; i < 3; i++)
            for (int j = 0; j < 3; j++)
                for (int k = 0; k < 3; k++) {
                    int d = i - 1, h = j - 1, w = k - 1;
                    if (d < 0 || h < 0 || w < 0 || d >= D || h >= H || w >= W) continue;
                    expect += (double)weight[c * 27 + i * 9 + j * 3 + k] * x[c * V + (d * H + h) * W + w];
                }
        CHECK(fabs(y[c * V] - expect) < 1e-5, "forward y[%d, voxel 0] = %g, expected %g", c, y[c * V], expect);
    }
    CHECK(dfx_deform_conv3d_forward(ws, x, offsets, weight, NULL, y, N, C, D, H, W, NULL, NULL) == DFX_OK, "forward without bias");
    expect_error("forward x NULL", dfx_deform_conv3d_forward(ws, NULL, offsets, weight, bias, y, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
    expect_error("forward offsets NULL", dfx_deform_conv3d_forward(ws, x, NULL, weight, bias, y, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
    expect_error("forward y NULL", dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, NULL, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
    expect_error("forward c 0", dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, y, N, 0, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
    expect_error("forward d -1", dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, y, N, C, -1, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");

    /* operator backward: all outputs, then with some skipped */
    CHECK(dfx_deform_conv3d_backward(ws, x, offsets, weight, gy, gx, goff, gw, gb, N, C, D, H, W, NULL, NULL) == DFX_OK,
          "backward: %s", dfx_last_error());
    CHECK(all_finite(gx, N * C * V) && all_finite(goff, N * 81 * V) && all_finite(gw, C * 27), "backward finite");
    CHECK(fabsf(gb[0] - (float)V) < 1e-5f && fabsf(gb[1] - (float)V) < 1e-5f,
          "grad_bias = sum of grad_y = %d, got %g %g", V, gb[0], gb[1]);
    CHECK(dfx_deform_conv3d_backward(ws, x, offsets, weight, gy, NULL, goff, NULL, NULL, N, C, D, H, W, NULL, NULL) == DFX_OK,
          "backward with NULL outputs: %s", dfx_last_error());
    expect_error("backward grad_y NULL",
                 dfx_deform_conv3d_backward(ws, x, offsets, weight, NULL, gx, goff, gw, gb, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d_backward");
    expect_error("backward w 0",
                 dfx_deform_conv3d_backward(ws, x, offsets, weight, gy, gx, goff, gw, gb, N, C, D, H, 0, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d_backward");

    /* layer: zero offset conv -> the operator with zero offsets, in both modes */
    float y2[N * C * V];
    for (int mode = DFX_OFFSET_ALIGNED; mode <= DFX_OFFSET_OFFICIAL; mode++) {
        CHECK(dfx_ddc_layer_forward(ws, x, weight, bias, ow, ob, mode, y2, offsets_out, N, C, D, H, W, NULL, NULL) == DFX_OK,
              "layer forward mode %d: %s", mode, dfx_last_error());
        CHECK(dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, y, N, C, D, H, W, NULL, NULL) == DFX_OK, "forward again");
        for (int i = 0; i < N * C * V; i++) CHECK(fabsf(y2[i] - y[i]) < 1e-5f, "layer mode %d y[%d]", mode, i);
        for (int i = 0; i < N * 81 * V; i++) CHECK(offsets_out[i] == 0.0f, "layer mode %d offsets[%d]", mode, i);
        CHECK(dfx_ddc_layer_forward(ws, x, weight, bias, ow, ob, mode, y2, NULL, N, C, D, H, W, NULL, NULL) == DFX_OK,
              "layer forward without offsets_out");
        CHECK(dfx_ddc_layer_backward(ws, x, weight, ow, ob, mode, gy, gx, gw, gb, gow, gob, N, C, D, H, W, NULL, NULL) == DFX_OK,
              "layer backward mode %d: %s", mode, dfx_last_error());
        CHECK(all_finite(gx, N * C * V) && all_finite(gow, 81 * C) && all_finite(gob, 81), "layer backward finite");
        CHECK(dfx_ddc_layer_backward(ws, x, weight, ow, ob, mode, gy, NULL, NULL, NULL, gow, NULL, N, C, D, H, W, NULL, NULL) == DFX_OK,
              "layer backward with NULL outputs");
    }
    expect_error("layer bad mode", dfx_ddc_layer_forward(ws, x, weight, bias, ow, ob, 2, y2, NULL, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "offset_mode");
    expect_error("layer mode -1", dfx_ddc_layer_backward(ws, x, weight, ow, ob, -1, gy, gx, gw, gb, gow, gob, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "offset_mode");
    expect_error("layer offset_weight NULL",
                 dfx_ddc_layer_forward(ws, x, weight, bias, NULL, ob, DFX_OFFSET_ALIGNED, y2, NULL, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "ddc_layer");
    expect_error("layer n 0",
                 dfx_ddc_layer_forward(ws, x, weight, bias, ow, ob, DFX_OFFSET_ALIGNED, y2, NULL, 0, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "ddc_layer");
    expect_error("layer backward x NULL",
                 dfx_ddc_layer_backward(ws, NULL, weight, ow, ob, DFX_OFFSET_ALIGNED, gy, gx, gw, gb, gow, gob, N, C, D, H, W, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "ddc_layer_backward");

    /* the network behind a handle */
    {
        static int cancel_after = 3;
        dfx_model *m = NULL;
        expect_error("model bad json", dfx_model_create("{\"blocks\": 1}", 0, &m), DFX_ERR_INVALID_ARGUMENT, "unknown key");
        CHECK(m == NULL, "a failed create left a handle");
        expect_error("model NULL out", dfx_model_create("{}", 0, NULL), DFX_ERR_INVALID_ARGUMENT, "model_create");
        const char *config = "{\"out_channels\": 2, \"feature_size\": [4, 8, 8, 8], \"hidden_size\": 8}";
        CHECK(dfx_model_create(config, 1, &m) == DFX_OK && m != NULL, "model create: %s", dfx_last_error());
        int64_t count = 0, tensors = 0, needed = 0;
        CHECK(dfx_model_num_parameters(m, &count) == DFX_OK && count > 0, "num parameters");
        CHECK(dfx_model_num_tensors(m, &tensors) == DFX_OK && tensors > 0, "num tensors");
        const char *name = NULL;
        int32_t rank = 0;
        int64_t shape[8];
        CHECK(dfx_model_tensor_info(m, 0, &name, &rank, shape) == DFX_OK && name != NULL && rank >= 1, "tensor info");
        expect_error("tensor info index", dfx_model_tensor_info(m, tensors, &name, &rank, shape), DFX_ERR_INVALID_ARGUMENT,
                     "index");
        CHECK(dfx_model_config_json(m, NULL, 0, &needed) == DFX_OK && needed > 1, "config size");
        static float mx[16 * 16 * 16], my[2 * 16 * 16 * 16];
        for (int i = 0; i < 16 * 16 * 16; i++) mx[i] = (float)(i % 7) * 0.1f;
        dfx_session *sess = NULL;
        expect_error("session NULL model", dfx_session_create(NULL, &sess), DFX_ERR_INVALID_ARGUMENT, "model");
        CHECK(dfx_session_create(m, &sess) == DFX_OK && sess != NULL, "session create: %s", dfx_last_error());
        CHECK(dfx_session_forward(sess, mx, 1, 16, 16, 16, my, NULL, NULL) == DFX_OK, "session forward: %s", dfx_last_error());
        CHECK(all_finite(my, 2 * 16 * 16 * 16), "session forward finite");
        expect_error("session forward 24", dfx_session_forward(sess, mx, 1, 16, 16, 24, my, NULL, NULL), DFX_ERR_SHAPE,
                     "multiples of 16");
        expect_error("session forward NULL", dfx_session_forward(sess, NULL, 1, 16, 16, 16, my, NULL, NULL),
                     DFX_ERR_INVALID_ARGUMENT, "session_forward");
        expect_error("session forward huge", dfx_session_forward(sess, mx, INT64_MAX, 16, 16, 16, my, NULL, NULL),
                     DFX_ERR_INVALID_ARGUMENT, "too large");
        expect_error("session cancelled", dfx_session_forward(sess, mx, 1, 16, 16, 16, my, cancel_at, &cancel_after),
                     DFX_ERR_CANCELLED, "cancelled");
        /* backward: gradients accumulate into the model's; grad_x is optional */
        static float mgy[2 * 16 * 16 * 16], mgx[16 * 16 * 16], grad[8192];
        for (int i = 0; i < 2 * 16 * 16 * 16; i++) mgy[i] = (float)((i % 5) - 2) * 0.25f;
        CHECK(dfx_model_zero_grad(m) == DFX_OK, "zero grad");
        CHECK(dfx_session_backward(sess, mx, 1, 16, 16, 16, mgy, mgx, NULL, NULL) == DFX_OK, "session backward: %s",
              dfx_last_error());
        CHECK(all_finite(mgx, 16 * 16 * 16), "input gradient finite");
        int64_t n0 = 1;
        for (int k = 0; k < rank; k++) n0 *= shape[k];
        CHECK(n0 <= 8192 && dfx_model_get_grad(m, 0, grad, n0) == DFX_OK, "get grad: %s", dfx_last_error());
        CHECK(all_finite(grad, (int)n0), "gradient finite");
        expect_error("get grad size", dfx_model_get_grad(m, 0, grad, n0 + 1), DFX_ERR_SHAPE, "floats");
        CHECK(dfx_session_backward(sess, mx, 1, 16, 16, 16, mgy, NULL, NULL, NULL) == DFX_OK, "backward without grad_x");
        int64_t retained = 0;
        CHECK(dfx_session_retained_bytes(sess, &retained) == DFX_OK && retained > 0, "retained bytes");
        CHECK(dfx_session_release_memory(sess) == DFX_OK, "release memory");
        /* truncated text: terminated, and *needed says how much is missing */
        char small[8];
        CHECK(dfx_model_config_json(m, small, (int64_t)sizeof small, &needed) == DFX_OK && needed > (int64_t)sizeof small &&
              small[sizeof small - 1] == '\0', "truncated text");
        check_text("config json", config_text, m);
        check_text("summary", summary_text, m);
        /* a report of a few thousand bytes: a non-strict load of nothing lists every parameter missing */
        CHECK(dfx_model_load_tensors(m, 0, NULL, NULL, NULL, NULL, 0) == DFX_OK, "empty non-strict load: %s",
              dfx_last_error());
        check_text("last report", report_text, m);
        CHECK(dfx_model_last_report(m, NULL, 0, &needed) == DFX_OK && needed > 1000, "report size %lld", (long long)needed);
        expect_error("model load missing", dfx_model_load(m, "/nonexistent/w.safetensors", 1), DFX_ERR_IO,
                     "/nonexistent/w.safetensors");
        CHECK(dfx_last_error_errno() == 2, "missing file errno %d", (int)dfx_last_error_errno());
        CHECK(strcmp(dfx_last_error_field(DFX_FIELD_PATH), "/nonexistent/w.safetensors") == 0, "error path field");
        expect_error("summary huge", dfx_model_summary(m, INT64_MAX, 16, 16, 16, NULL, 0, &needed), DFX_ERR_INVALID_ARGUMENT,
                     "too large");
        dfx_model_free(m);  /* the session keeps the model alive */
        CHECK(dfx_session_forward(sess, mx, 1, 16, 16, 16, my, NULL, NULL) == DFX_OK, "session after model free");
        dfx_session_free(sess);
        dfx_session_free(NULL);
        m = NULL;
        CHECK(dfx_model_create(config, 1, &m) == DFX_OK, "model create again");
        expect_error("model NULL", dfx_model_num_parameters(NULL, &count), DFX_ERR_INVALID_ARGUMENT, "model");
        dfx_model_free(m);
        dfx_model_free(NULL);
    }

    /* huge sizes are errors, never traps */
    expect_error("forward huge", dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, y, 1, 1, INT64_MAX, 1, 1, NULL, NULL),
                 DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
    expect_error("forward huge 2", dfx_deform_conv3d_forward(ws, x, offsets, weight, bias, y, INT64_MAX, INT64_MAX, 2, 2, 2,
                                                              NULL, NULL), DFX_ERR_INVALID_ARGUMENT, "deform_conv3d");
    test_extreme_operator_sizes(ws);
    test_extreme_model_sizes();
    int64_t ws_bytes = -1;
    CHECK(dfx_workspace_bytes(ws, &ws_bytes) == DFX_OK && ws_bytes > 0, "workspace bytes");
    CHECK(dfx_workspace_release(ws) == DFX_OK, "workspace release");
    dfx_workspace_free(ws);
    dfx_workspace_free(NULL);
    test_nifti();
    test_segment();

    /* the last error is per thread and survives successful calls */
    dfx_set_num_threads(0);
    const char *msg = dfx_last_error();
    CHECK(dfx_get_num_threads() >= 1 && msg[0] != '\0', "message lost");

    if (failures) {
        fprintf(stderr, "test_capi: %d failure(s)\n", failures);
        return 1;
    }
    printf("test_capi: all checks passed (engine %s)\n", version);
    return 0;
}
