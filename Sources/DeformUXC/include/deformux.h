/*
 * deformux.h: the C ABI of the deformux engine (libDeformUXC.so).
 *
 * Hand-written; the Swift @_cdecl exports in Sources/DeformUXC must match it exactly
 * (Tests/capi/test_capi.c is compiled against this header and catches drift).
 *
 * Conventions
 *   - Every function returns a dfx_status; 0 (DFX_OK) is success.
 *   - On failure, dfx_last_error() returns a message for the calling thread naming the operation,
 *     what was expected and what came. The pointer stays valid until the next failing call on the
 *     same thread. Nothing traps or unwinds across this boundary.
 *   - Tensors are float32, C-contiguous, layout N x C x D x H x W (W fastest), like PyTorch.
 *     Sizes are int64_t. The caller owns every buffer; outputs are allocated by the caller and
 *     overwritten in full (never accumulated into).
 *   - Calls may be made from any thread; they may run concurrently with each other.
 */
#ifndef DEFORMUX_H
#define DEFORMUX_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef int32_t dfx_status;

enum {
    DFX_OK = 0,
    DFX_ERR_INVALID_ARGUMENT = 1, /* a null pointer, a bad size or a bad option */
    DFX_ERR_SHAPE = 2,            /* sizes that do not fit together */
    DFX_ERR_OUT_OF_MEMORY = 3,
    DFX_ERR_IO = 4,
    DFX_ERR_CANCELLED = 5,
    DFX_ERR_INTERNAL = 6,
    DFX_ERR_BUSY = 7              /* the object is in use by another call (or re-entrantly by this thread) */
};

/* Fields of the last error (dfx_last_error_field). */
enum {
    DFX_FIELD_OPERATION = 0, /* the operation that failed, e.g. "model_forward" */
    DFX_FIELD_MESSAGE = 1,   /* what was wrong, without the operation */
    DFX_FIELD_EXPECTED = 2,  /* what was expected ("" if not given) */
    DFX_FIELD_GOT = 3,       /* what came ("" if not given) */
    DFX_FIELD_PATH = 4       /* the file concerned ("" if none) */
};

/* Offset modes of the DDC layer (ARCHITECTURE.md section 3). */
enum {
    DFX_OFFSET_ALIGNED = 0,  /* the 1x1x1 offset conv has padding 0: voxel o uses the offsets computed at o */
    DFX_OFFSET_OFFICIAL = 1  /* the released code: padding 1, first N*81*D*H*W values of the padded output */
};

/* The message of the last failing call on this thread ("" if none): "operation: message[: expected E,
 * got G]". Never NULL. */
const char *dfx_last_error(void);
/* One field (DFX_FIELD_*) of the last failing call's error on this thread; "" if absent. Never NULL.
 * Valid until the thread's next failing call. */
const char *dfx_last_error_field(int32_t field);
/* The system errno of the last failing call's error on this thread (ENOENT: no such file), or 0. */
int32_t dfx_last_error_errno(void);

/* The engine's version, e.g. "0.1.0". Never NULL. */
const char *dfx_version(void);

/* Worker threads used by every kernel (default: the number of online CPUs). n >= 1. */
dfx_status dfx_set_num_threads(int32_t n);
int32_t dfx_get_num_threads(void);

/* Called between the steps of a long call with (user, steps done, total steps), and periodically during
 * long steps (every ~0.1 s, on the calling thread) with the same numbers; return non-zero to cancel:
 * the call then returns DFX_ERR_CANCELLED. May be NULL wherever it is accepted. */
typedef int32_t (*dfx_progress_fn)(void *user, int64_t done, int64_t total);

/* ------------------------------------------------------------------------------------------------
 * Workspaces: scratch memory for the operator calls below, owned by the caller and kept between calls
 * (a DDC at 48^3 x 48 channels needs about 100 MB; allocating it on every call costs more than the
 * operator). One call at a time uses a workspace; pass NULL to use a temporary one for a single call.
 */
typedef struct dfx_workspace dfx_workspace;
dfx_status dfx_workspace_create(dfx_workspace **out);
void dfx_workspace_free(dfx_workspace *ws);
/* Frees the scratch a workspace holds (it stays usable). */
dfx_status dfx_workspace_release(dfx_workspace *ws);
dfx_status dfx_workspace_bytes(dfx_workspace *ws, int64_t *out);

/*
 * Depthwise deformable 3x3x3 convolution with one offset field shared by all channels.
 *   x        N x C x D x H x W
 *   offsets  N x 81 x D x H x W   channel 3*t + a: tap t = i*9 + j*3 + k, axis a (0 D, 1 H, 2 W), in voxels
 *   weight   C x 1 x 3 x 3 x 3
 *   bias     C, or NULL for none
 *   y        N x C x D x H x W    (output)
 */
dfx_status dfx_deform_conv3d_forward(dfx_workspace *ws, const float *x, const float *offsets,
                                     const float *weight, const float *bias, float *y,
                                     int64_t n, int64_t c, int64_t d, int64_t h, int64_t w,
                                     dfx_progress_fn progress, void *user);

/*
 * Gradients of dfx_deform_conv3d_forward. Any output pointer may be NULL to skip that gradient.
 *   grad_y        N x C x D x H x W
 *   grad_x        N x C x D x H x W    (output)
 *   grad_offsets  N x 81 x D x H x W   (output)
 *   grad_weight   C x 1 x 3 x 3 x 3    (output)
 *   grad_bias     C                    (output)
 */
dfx_status dfx_deform_conv3d_backward(dfx_workspace *ws, const float *x, const float *offsets,
                                      const float *weight, const float *grad_y,
                                      float *grad_x, float *grad_offsets, float *grad_weight,
                                      float *grad_bias,
                                      int64_t n, int64_t c, int64_t d, int64_t h, int64_t w,
                                      dfx_progress_fn progress, void *user);

/*
 * The DDC layer: offsets = conv_offset(x) (1x1x1 conv C -> 81 with bias, padding per offset_mode),
 * then y = deform_conv3d(x, offsets, weight, bias).
 *   offset_weight  81 x C x 1 x 1 x 1,  offset_bias 81
 *   offsets_out    N x 81 x D x H x W, or NULL: receives the offsets the kernel used
 */
dfx_status dfx_ddc_layer_forward(dfx_workspace *ws, const float *x, const float *weight, const float *bias,
                                 const float *offset_weight, const float *offset_bias,
                                 int32_t offset_mode, float *y, float *offsets_out,
                                 int64_t n, int64_t c, int64_t d, int64_t h, int64_t w,
                                 dfx_progress_fn progress, void *user);

/*
 * Gradients of dfx_ddc_layer_forward with respect to x and all four parameters
 * (the offset path included). Any output pointer may be NULL to skip it.
 */
dfx_status dfx_ddc_layer_backward(dfx_workspace *ws, const float *x, const float *weight,
                                  const float *offset_weight, const float *offset_bias, int32_t offset_mode,
                                  const float *grad_y,
                                  float *grad_x, float *grad_weight, float *grad_bias,
                                  float *grad_offset_weight, float *grad_offset_bias,
                                  int64_t n, int64_t c, int64_t d, int64_t h, int64_t w,
                                  dfx_progress_fn progress, void *user);


/* ------------------------------------------------------------------------------------------------
 * The network: DeformUX-Net (or 3D UX-Net). A model is weights (configuration, parameters, their
 * gradients); a session runs it (activations, scratch, weights packed for the kernels, kept between
 * calls and refreshed when the weights change). Several sessions may run one model at the same time
 * from different threads; calls on the model (state dict, load, save) may run while a session
 * computes: the session keeps the weights it started with. A session runs one call at a time. Every
 * create has a matching free; a session keeps its model alive.
 * Text outputs (buf, cap, needed): the text is copied into buf, truncated to cap - 1 bytes and
 * NUL-terminated (when cap > 0); *needed receives the bytes the whole text needs. The copy is
 * complete when *needed <= cap; otherwise call again with a larger buffer.
 */
typedef struct dfx_model dfx_model;
typedef struct dfx_session dfx_session;

/* config_json: a JSON object with the Python names (in_channels, out_channels, feature_size, depths,
 * hidden_size, block, mlp, offset_mode, kernel_size, offset_kernel, offset_planes, deformable);
 * absent keys take their defaults, unknown keys are an error. Weights: PyTorch's default init from seed. */
dfx_status dfx_model_create(const char *config_json, uint64_t seed, dfx_model **out);
void dfx_model_free(dfx_model *model);
dfx_status dfx_model_config_json(const dfx_model *model, char *buf, int64_t cap, int64_t *needed);
dfx_status dfx_model_num_parameters(const dfx_model *model, int64_t *out);
/* The input and output channel counts (Cin, Cout); either pointer may be NULL. */
dfx_status dfx_model_channels(const dfx_model *model, int32_t *in_channels, int32_t *out_channels);

/* Parameters by index 0 ..< num_tensors, in the state-dict order; name stays valid while the model lives. */
dfx_status dfx_model_num_tensors(const dfx_model *model, int64_t *out);
dfx_status dfx_model_tensor_info(const dfx_model *model, int64_t index, const char **name, int32_t *rank,
                                 int64_t shape[8]);
/* Copies parameter `index` (count floats) into out. */
dfx_status dfx_model_get_tensor(const dfx_model *model, int64_t index, float *out, int64_t count);
/* Copies the gradient of parameter `index` (count floats, PyTorch layout) into out. */
dfx_status dfx_model_get_grad(const dfx_model *model, int64_t index, float *out, int64_t count);
/* Sets every gradient to zero (backward calls add into the gradients). */
dfx_status dfx_model_zero_grad(dfx_model *model);

/* Loads count float32 tensors: names[i], data[i] (C-contiguous), ranks[i], shapes[8*i .. 8*i+rank).
 * Names may carry a "module." prefix or the prototype names ("convxnet.", ".dcn."). strict != 0: every
 * missing, unexpected or mis-shaped name is listed in the error and nothing is loaded. */
dfx_status dfx_model_load_tensors(dfx_model *model, int64_t count, const char *const *names,
                                  const float *const *data, const int32_t *ranks, const int64_t *shapes,
                                  int32_t strict);
/* Safetensors files (F32, F16, BF16 or F64 in; F32 out, written atomically, config in the metadata). */
dfx_status dfx_model_load(dfx_model *model, const char *path, int32_t strict);
dfx_status dfx_model_save(const dfx_model *model, const char *path);
/* What the last load matched: counts, then every missing, unexpected and mis-shaped name. */
dfx_status dfx_model_last_report(const dfx_model *model, char *buf, int64_t cap, int64_t *needed);

/* Per-module parameters and multiply-adds for an input N x Cin x D x H x W, as a text table. */
dfx_status dfx_model_summary(const dfx_model *model, int64_t n, int64_t d, int64_t h, int64_t w,
                             char *buf, int64_t cap, int64_t *needed);

dfx_status dfx_session_create(dfx_model *model, dfx_session **out);
void dfx_session_free(dfx_session *session);
/* The input and output channel counts of the session's model; either pointer may be NULL. */
dfx_status dfx_session_channels(dfx_session *session, int32_t *in_channels, int32_t *out_channels);

/* Logits y (N x Cout x D x H x W, no softmax) for x (N x Cin x D x H x W); D, H, W multiples of 16. */
dfx_status dfx_session_forward(dfx_session *session, const float *x, int64_t n, int64_t d, int64_t h, int64_t w,
                               float *y, dfx_progress_fn progress, void *user);

/* Adds the gradients of sum(forward(x) * grad_y) with respect to every parameter into the model's
 * gradients (zero them first with dfx_model_zero_grad: gradients accumulate), and writes dL/dx into
 * grad_x (N x Cin x D x H x W) unless it is NULL. grad_y has the logits' shape. */
dfx_status dfx_session_backward(dfx_session *session, const float *x, int64_t n, int64_t d, int64_t h, int64_t w,
                                const float *grad_y, float *grad_x, dfx_progress_fn progress, void *user);

/* Frees the memory a session keeps between calls (activations, scratch, packed weights). */
dfx_status dfx_session_release_memory(dfx_session *session);
/* Bytes a session keeps between calls. */
dfx_status dfx_session_retained_bytes(dfx_session *session, int64_t *out);
/* ================================================================================================
 * NIfTI volumes (NIfTI-1 and NIfTI-2, single file .nii or gzip-compressed .nii.gz), read and written by
 * the engine. Sources/DeformUX/IO/README.md has the details; in short:
 *   - A handle holds one file read into memory and checked: every size and offset of the header is
 *     checked against the file before any voxel is touched, a .nii.gz is never decompressed past the
 *     size its header declares; a damaged file fails with DFX_ERR_IO and errno 0, a missing one with
 *     DFX_ERR_IO and errno ENOENT.
 *   - Voxel arrays are C order [x][y][z] (nibabel's get_fdata() indexing; ARCHITECTURE.md section 8).
 *     Files with more axes are channel-first, extra axes outermost first: 4-D [t][x][y][z], 5-D
 *     [u][t][x][y][z]; each 3-D volume is a contiguous [x][y][z] block. Rank 1 and 2 are padded to 3.
 *   - Values as nibabel's get_fdata(dtype=float32): scl_slope and scl_inter applied in double (slope 0
 *     or not finite: no scaling), then rounded to float. The affine as nibabel's img.affine: the sform
 *     if sform_code != 0, else the qform if qform_code != 0, else the pixdim fallback.
 *   - Calls on one handle may come from any thread.
 */
typedef struct dfx_nifti dfx_nifti;

/* What dfx_nifti_read produces. */
enum {
    DFX_NIFTI_FLOAT32 = 0, /* float: nibabel's get_fdata(dtype=float32) values */
    DFX_NIFTI_INT32 = 1,   /* int32_t: exact integers (label maps); fails if a voxel is not an integer
                              in the int32 range after scaling */
    DFX_NIFTI_RAW = 2      /* the file's datatype, unscaled, in this machine's byte order */
};

/* dfx_nifti_affine: which affine; also the best affine's source reported in *code. */
enum {
    DFX_NIFTI_AFFINE_BEST = 0,  /* as a source: the pixdim fallback (neither code set) */
    DFX_NIFTI_AFFINE_QFORM = 1,
    DFX_NIFTI_AFFINE_SFORM = 2
};

/* NIfTI datatype codes (the only ones read and written): 2 uint8, 4 int16, 8 int32, 16 float32,
 * 64 float64, 256 int8, 512 uint16, 768 uint32, 1024 int64, 1280 uint64. */

/* Reads and checks path; *out receives the handle (NULL on failure). Free with dfx_nifti_free. */
dfx_status dfx_nifti_open(const char *path, dfx_nifti **out);
void dfx_nifti_free(dfx_nifti *nifti);

/* Every header field as a JSON object (text convention as dfx_model_config_json: buf, cap, needed):
 *   version (1|2), big_endian, compressed, datatype (code), dtype ("uint8", ...), bitpix, dim[8],
 *   shape (dim[1..dim[0]], nibabel's), array_shape (the dfx_nifti_read layout), voxel_count,
 *   pixdim[8] and zooms (after nibabel's fixes: 0 -> 1, negative -> absolute, qfac -1 or 1),
 *   spacing[3] (column lengths of the affine), vox_offset, scl_slope, scl_inter, cal_min, cal_max,
 *   slice_duration, toffset, slice_start, slice_end, slice_code, xyzt_units, dim_info, intent_code,
 *   intent_p[3], intent_name, descrip, aux_file, qform_code, sform_code (codes outside 0..5 read as 0),
 *   quatern[3] (b, c, d), qoffset[3], srow[12], affine[16] (the best, row-major), affine_source
 *   ("sform", "qform" or "pixdim"), qform[16] (null if the quaternion is invalid), sform[16],
 *   extensions [{"code": int, "content": hex string}].
 * Doubles are in shortest round-trip form; NaN and infinities are written NaN, Infinity, -Infinity. */
dfx_status dfx_nifti_header_json(const dfx_nifti *nifti, char *buf, int64_t cap, int64_t *needed);

/* The dfx_nifti_read layout: *rank (3, 4 or 5) and shape[0 ..< rank], the datatype code and the voxel
 * count (the product of the shape). Any out pointer may be NULL. */
dfx_status dfx_nifti_array_shape(const dfx_nifti *nifti, int32_t *rank, int64_t shape[5], int32_t *datatype,
                                 int64_t *count);

/* The affine `which` (DFX_NIFTI_AFFINE_*) into out[16], row-major. *code (may be NULL): for the best
 * affine its source (DFX_NIFTI_AFFINE_SFORM, _QFORM, or _BEST for the pixdim fallback), else that
 * form's code. The qform of an invalid quaternion is DFX_ERR_INVALID_ARGUMENT. */
dfx_status dfx_nifti_affine(const dfx_nifti *nifti, int32_t which, double out[16], int32_t *code);

/* The voxels into out, count = the voxel count: floats, int32_t or raw voxels (DFX_NIFTI_*), in the
 * array layout. For DFX_NIFTI_RAW out holds count x the datatype's size bytes. */
dfx_status dfx_nifti_read(const dfx_nifti *nifti, int32_t kind, void *out, int64_t count);

/* Frees the voxel bytes the handle holds; the header stays (dfx_nifti_read then fails). */
dfx_status dfx_nifti_release_voxels(dfx_nifti *nifti);

/* The header bytes as they are in the file (348 or 540, the file's byte order): copied when cap is
 * large enough; *needed always receives the size. */
dfx_status dfx_nifti_raw_header(const dfx_nifti *nifti, uint8_t *buf, int64_t cap, int64_t *needed);

/*
 * Writes a single-file NIfTI-1 to path (".nii", or ".nii.gz" for gzip), atomically (a temporary file in
 * the same directory, fsync, rename).
 *   data        voxels of `datatype` (a code above), this machine's byte order, in the read layout
 *   dims        x, y, z[, t[, u]]: ndim (1..5) sizes, each 1..32767
 *   affine      16 doubles, row-major, finite, non-singular 3 x 3 part
 *   template_   a handle whose header is kept (intent, units, description, extensions, ...), or NULL
 *   description the descrip field (at most 79 bytes are kept), or NULL to keep the template's
 *   compression_level  gzip level 0..9, or -1 for the default (1, as nibabel)
 * The header: dim, datatype and bitpix from the data, scl_slope 1 and scl_inter 0 (the values are
 * written as given: a uint8 label map written with a float image's template has no scaling). If the
 * template's own affine is close to `affine` (numpy allclose), its sform and qform fields are kept as
 * they are; otherwise both are set from `affine` (pixdim[1..3] = the column lengths, qfac = the sign of
 * the determinant, shears dropped from the qform) with the template's codes, or code 1 (scanner).
 */
dfx_status dfx_nifti_write(const char *path, const void *data, int32_t datatype, int32_t ndim,
                           const int64_t *dims, const double affine[16], const dfx_nifti *template_,
                           const char *description, int32_t compression_level);

/* ======================================= end of NIfTI ========================================= */

/* ================================================================================================
 * Training (ARCHITECTURE.md section 7; issue 9).
 */

/* MONAI's DiceCELoss(to_onehot_y=True, softmax=True) with its defaults: logits n x c x d x h x w
 * (channels first), labels n x d x h x w int32 class indices in 0..<c, class_weights (c floats) or NULL.
 * grad (may be NULL) receives dL/dlogits (overwritten); out (may be NULL) receives the loss, its Dice
 * part and its cross-entropy part. */
dfx_status dfx_dice_ce(const float *logits, const int32_t *labels, int64_t n, int64_t c, int64_t d, int64_t h,
                       int64_t w, const float *class_weights, float *grad, double out[3]);

/* A trainer runs one model (and keeps it alive): AdamW on every parameter (the optimiser moments live
 * in the model's store), the Dice + CE loss, gradient accumulation, drop path. options_json (may be
 * NULL): learning_rate, betas [b1, b2], eps, weight_decay, decay_norms_and_biases, accumulation,
 * drop_path, class_weights, seed, scheduler, plateau_factor, plateau_patience; absent keys take the
 * recipe's defaults (1e-4, [0.9, 0.999], 1e-8, 0.08, true, 1, 0, none, 0, true, 0.9, 10). */
typedef struct dfx_trainer dfx_trainer;
dfx_status dfx_trainer_create(dfx_model *model, const char *options_json, dfx_trainer **out);
void dfx_trainer_free(dfx_trainer *trainer);
/* One micro-batch: images n x Cin x d x h x w (d, h, w multiples of 16), labels n x d x h x w int32;
 * when `accumulation` micro-batches are in, the AdamW update. out (may be NULL): the loss before the
 * update (total, Dice part, cross-entropy part). */
dfx_status dfx_trainer_step(dfx_trainer *trainer, const float *images, int64_t n, int64_t d, int64_t h, int64_t w,
                            const int32_t *labels, double out[3], dfx_progress_fn progress, void *user);
/* The learning rate, optimiser steps taken and micro-batches accumulated; any pointer may be NULL. */
dfx_status dfx_trainer_info(dfx_trainer *trainer, double *learning_rate, int64_t *step, int64_t *accumulated);
dfx_status dfx_trainer_set_learning_rate(dfx_trainer *trainer, double learning_rate);
/* Reports a validation metric (higher is better, e.g. the mean Dice) to the ReduceLROnPlateau schedule
 * (mode max, factor and patience from the options); *learning_rate (may be NULL) receives the rate now
 * in force. Without a schedule (scheduler false) the rate does not change. */
dfx_status dfx_trainer_report_validation(dfx_trainer *trainer, double metric, double *learning_rate);
/* The optimiser's state (moments, step, hyperparameters, drop-path generator) as safetensors, written
 * atomically; the weights are saved with dfx_model_save. Save between optimiser steps. */
dfx_status dfx_trainer_save_state(dfx_trainer *trainer, const char *path);
dfx_status dfx_trainer_load_state(dfx_trainer *trainer, const char *path);

/* A patch sampler keeps copies of training volumes and draws augmented patches from them (MONAI's
 * RandCropByPosNegLabeld, then one resampling pass for rotation/scaling, bias field, noise, shift).
 * config_json: {"classes": C, "sampler": {"patchSize": [..], "samplesPerVolume": 2, "positive": 1,
 * "negative": 1, "imageThreshold": null}, "preset": "paper" | "mrRobust" | "none"} or an explicit
 * "augmentation" object (see Sources/DeformUX/Training/Augment.swift). */
typedef struct dfx_sampler dfx_sampler;
dfx_status dfx_sampler_create(const char *config_json, dfx_sampler **out);
void dfx_sampler_free(dfx_sampler *sampler);
/* Adds a volume (copied): image channels x size[0] x size[1] x size[2] float32, labels size[0] x size[1] x
 * size[2] int32 in 0..<classes. *index (may be NULL) receives its index. */
dfx_status dfx_sampler_add(dfx_sampler *sampler, const float *image, int64_t channels, const int64_t size[3],
                           const int32_t *labels, int64_t *index);
/* samplesPerVolume patches from each of the `count` volumes `indices`, drawn with the generator whose
 * state is *rng_state (advanced): images (count*samplesPerVolume) x channels x patch, labels int32
 * (count*samplesPerVolume) x patch. The same state gives the same patches. */
dfx_status dfx_sampler_batch(dfx_sampler *sampler, const int64_t *indices, int64_t count, uint64_t *rng_state,
                             float *images, int32_t *labels);

/* ====================================== end of training ======================================= */

/* ================================================================================================
 * Segmentation: whole volumes in, label maps out (Sources/DeformUX/Pipeline/README.md). A segmenter
 * runs a session's network over a volume with a model card's settings: reorientation to RAS,
 * resampling, the intensity preset, padding, sliding windows with blending, and back onto the input
 * grid. It keeps its working memory (network grid, accumulator, window buffers) between volumes and
 * keeps its session alive. One call at a time per segmenter (others wait; a call from its own
 * progress callback gets DFX_ERR_BUSY); segmenters on different sessions run concurrently.
 *
 * Model cards (JSON; Sources/DeformUX/Model/ModelCard.swift lists every key and default): "name",
 * "version", "config" (the network, as dfx_model_create's JSON), "weights", "classes", "spacing"
 * ([x, y, z] mm or null: keep the input's grid), "orientation" ("RAS" or null), "intensity" ({"kind":
 * "mr"|"ct"|"none", "clip", "percentiles", "nonzero"}), "window" ([x, y, z], multiples of 16, or null:
 * 96 reduced to small images), "overlap", "blend" ("gaussian"|"constant"), "batch", "skip_background"
 * (null or {"threshold": t in input units}), "tta", "largest_component", "training" (free-form),
 * "license". Missing keys take their defaults; unknown keys are kept.
 */
typedef struct dfx_segmenter dfx_segmenter;

/* Parses and checks a model card; the card with every default written out, as JSON text (text
 * convention as dfx_model_config_json). Bad cards: DFX_ERR_INVALID_ARGUMENT naming the key. */
dfx_status dfx_model_card_normalize(const char *card_json, char *buf, int64_t cap, int64_t *needed);

/* A segmenter running session's network with config_json (a model card; NULL: the defaults of a model
 * without a card). A card "config" must equal the session's model's, and "classes" must name one class
 * per output channel. *out is NULL on failure. */
dfx_status dfx_segmenter_create(dfx_session *session, const char *config_json, dfx_segmenter **out);
void dfx_segmenter_free(dfx_segmenter *segmenter);
/* The input and output channel counts (Cin, Cout) of the segmenter's model; either pointer may be NULL. */
dfx_status dfx_segmenter_channels(const dfx_segmenter *segmenter, int32_t *in_channels, int32_t *out_channels);
/* The segmenter's model card with every default written out (text convention as above). */
dfx_status dfx_segmenter_config_json(const dfx_segmenter *segmenter, char *buf, int64_t cap, int64_t *needed);

/*
 * Segments one volume.
 *   image          channels x X x Y x Z float32, C order (channels first; x, y, z indexed as nibabel's
 *                  get_fdata(), ARCHITECTURE.md section 8); finite values; channels = the model's Cin
 *   size           X, Y, Z (each >= 1)
 *   affine         16 doubles, row-major, voxel (i, j, k) -> world mm (nibabel's img.affine)
 *   labels         X x Y x Z uint8 (output): the argmax class on the input grid
 *   probabilities  Cout x X x Y x Z float32 (output), the softmax on the input grid; or NULL
 *   progress       (user, done, total) in work units: one unit is one of the network's steps for one
 *                  window (12 per window, 96 with flip TTA), so total = windows x units per window
 *                  ("units_per_window" in the statistics); called before the first window (skipped
 *                  windows counted done), after each step and window, and polled every ~0.1 s inside
 *                  the network's kernels; return non-zero to cancel (DFX_ERR_CANCELLED). May be NULL.
 */
dfx_status dfx_segment(dfx_segmenter *segmenter, const float *image, int64_t channels, const int64_t size[3],
                       const double affine[16], uint8_t *labels, float *probabilities,
                       dfx_progress_fn progress, void *user);

/* The last successful dfx_segment's statistics as a JSON object ("null" before the first): windows,
 * windows_run, windows_skipped, batches, forwards, window, units_per_window, accumulator_planes,
 * accumulator_planes_high_water, accumulator_bytes, input_size, canonical_size, reorientation_axes,
 * reorientation_flips, resampled_size, network_size, padding_before, intensity_lower, intensity_upper,
 * preprocess_seconds, predict_seconds (inside the network), blend_seconds (gathering windows, blending,
 * argmax), postprocess_seconds (back onto the input grid, largest component), total_seconds. */
dfx_status dfx_segmenter_statistics_json(const dfx_segmenter *segmenter, char *buf, int64_t cap, int64_t *needed);
/* Frees the working memory a segmenter keeps between volumes (not its session's). */
dfx_status dfx_segmenter_release_memory(dfx_segmenter *segmenter);
/* Bytes of working memory a segmenter keeps between volumes (not counting its session's). */
dfx_status dfx_segmenter_retained_bytes(dfx_segmenter *segmenter, int64_t *out);

/* ==================================== end of segmentation ===================================== */

#ifdef __cplusplus
}
#endif

#endif /* DEFORMUX_H */
