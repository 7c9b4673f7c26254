/* Pillow's resampling of an RGB image (Image.resize with a box; libImaging/Resample.c), bit for
 * bit, on packed RGB rows, for the box, bilinear and bicubic filters.
 *
 * The same weights (computed in double, then 22-bit fixed point), the same two passes
 * (horizontal over the rows the vertical pass reads, rounded to uint8, then vertical) and the
 * same rounding, so the loader's crops equal Pillow's. What differs is only the speed:
 * - no conversion to and from Pillow's 4-byte pixels (the input is the decoder's buffer, the
 *   output the caller's array);
 * - the vertical pass runs along whole rows (one weight times a row of bytes, added into a row of
 *   int32 sums), which compilers vectorise; integer sums do not depend on their order, so
 *   reordering Pillow's loops keeps every result;
 * - both passes are compiled for AVX2 as well, picked at run time where the CPU has it.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PRECISION_BITS (32 - 8 - 2)
#define HALF (1 << (PRECISION_BITS - 1))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define VECTOR_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define VECTOR_CLONES
#endif

static double box_filter(double x) { return (x > -0.5 && x <= 0.5) ? 1.0 : 0.0; }

static double bilinear_filter(double x) {
    if (x < 0.0) x = -x;
    return x < 1.0 ? 1.0 - x : 0.0;
}

static double bicubic_filter(double x) {  /* a = -0.5, as Pillow */
    const double a = -0.5;
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * a;
    return 0.0;
}

static const struct {
    double (*weight)(double);
    double support;
} FILTERS[] = {{box_filter, 0.5}, {bilinear_filter, 1.0}, {bicubic_filter, 2.0}};

static inline uint8_t clip8(int32_t sum) {
    int32_t value = sum >> PRECISION_BITS;
    return (uint8_t)(value < 0 ? 0 : value > 255 ? 255 : value);
}

/* Pillow's precompute_coeffs + normalize_coeffs_8bpc: output pixel i reads ``bounds[2i + 1]``
 * input pixels from ``bounds[2i]`` with weights ``weights[i * ksize ...]``. Returns ksize, or 0
 * when memory runs out (nothing then to free). */
static int coefficients(int in_size, float in0, float in1, int out_size, int filter, int **bounds_out,
                        int32_t **weights_out) {
    double scale, filterscale, support, center, total, inverse;
    double *k;
    int ksize, i, x, first, count;
    int *bounds;
    int32_t *weights;

    filterscale = scale = (double)(in1 - in0) / out_size;  /* float subtraction, as Pillow */
    if (filterscale < 1.0) filterscale = 1.0;
    support = FILTERS[filter].support * filterscale;
    ksize = (int)ceil(support) * 2 + 1;
    k = malloc((size_t)ksize * sizeof *k);
    bounds = malloc((size_t)out_size * 2 * sizeof *bounds);
    weights = malloc((size_t)out_size * ksize * sizeof *weights);
    if (!k || !bounds || !weights) {
        free(k), free(bounds), free(weights);
        return 0;
    }
    for (i = 0; i < out_size; i++) {
        center = in0 + (i + 0.5) * scale;
        total = 0.0;
        inverse = 1.0 / filterscale;
        first = (int)(center - support + 0.5);
        if (first < 0) first = 0;
        count = (int)(center + support + 0.5);
        if (count > in_size) count = in_size;
        count -= first;
        for (x = 0; x < count; x++) {
            k[x] = FILTERS[filter].weight((x + first - center + 0.5) * inverse);
            total += k[x];
        }
        for (x = 0; x < ksize; x++) {
            double w = x < count ? (total != 0.0 ? k[x] / total : k[x]) : 0.0;
            weights[i * ksize + x] = (int32_t)(w < 0 ? -0.5 + w * (1 << PRECISION_BITS)
                                                     : 0.5 + w * (1 << PRECISION_BITS));
        }
        bounds[2 * i] = first;
        bounds[2 * i + 1] = count;
    }
    free(k);
    *bounds_out = bounds;
    *weights_out = weights;
    return ksize;
}

/* One output pixel of the horizontal pass, plain C (any CPU, and the pixels at a row's end). */
static inline void horizontal_pixel(const uint8_t *p, int count, const int32_t *k, uint8_t *o) {
    int32_t r = HALF, g = HALF, b = HALF;
    int t;
    for (t = 0; t < count; t++) {
        r += p[3 * t] * k[t];
        g += p[3 * t + 1] * k[t];
        b += p[3 * t + 2] * k[t];
    }
    o[0] = clip8(r), o[1] = clip8(g), o[2] = clip8(b);
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
/* The horizontal pass with the three channels of a pixel in one vector: per tap, 4 bytes
 * (R, G, B and the next pixel's R, whose sum is never used) widened to int32 and multiplied by
 * the weight. A 4-byte load may not pass the row's last pixel: the few output pixels whose
 * window reaches it take the plain path. */
__attribute__((target("sse4.1")))
static void horizontal_sse41(const uint8_t *in, long in_stride, int in_width, int rows, int out_width, int ksize,
                             const int *bounds, const int32_t *weights, uint8_t *out, long out_stride) {
    int y, x, t;
    for (y = 0; y < rows; y++) {
        const uint8_t *row = in + y * in_stride;
        uint8_t *o = out + y * out_stride;
        for (x = 0; x < out_width; x++) {
            const uint8_t *p = row + 3 * bounds[2 * x];
            const int32_t *k = weights + x * ksize;
            __m128i sum = _mm_set1_epi32(HALF);
            int32_t packed;
            if (bounds[2 * x] + bounds[2 * x + 1] >= in_width) {  /* reaches the row's last pixel */
                horizontal_pixel(p, bounds[2 * x + 1], k, o + 3 * x);
                continue;
            }
            for (t = 0; t < bounds[2 * x + 1]; t++) {
                int32_t bytes;
                memcpy(&bytes, p + 3 * t, 4);
                sum = _mm_add_epi32(sum, _mm_mullo_epi32(_mm_cvtepu8_epi32(_mm_cvtsi32_si128(bytes)),
                                                         _mm_set1_epi32(k[t])));
            }
            sum = _mm_srai_epi32(sum, PRECISION_BITS);
            sum = _mm_packus_epi16(_mm_packs_epi32(sum, sum), sum);  /* clamps to 0..255 */
            packed = _mm_cvtsi128_si32(sum);
            memcpy(o + 3 * x, &packed, 3);
        }
    }
}
#endif

static void horizontal(const uint8_t *in, long in_stride, int in_width, int rows, int out_width, int ksize,
                       const int *bounds, const int32_t *weights, uint8_t *out, long out_stride) {
    int y, x;
#if defined(__x86_64__) && defined(__GNUC__)
    if (__builtin_cpu_supports("sse4.1")) {
        horizontal_sse41(in, in_stride, in_width, rows, out_width, ksize, bounds, weights, out, out_stride);
        return;
    }
#endif
    for (y = 0; y < rows; y++)
        for (x = 0; x < out_width; x++)
            horizontal_pixel(in + y * in_stride + 3 * bounds[2 * x], bounds[2 * x + 1], weights + x * ksize,
                             out + y * out_stride + 3 * x);
}

VECTOR_CLONES
static void vertical(const uint8_t *in, long in_stride, int row_bytes, int out_height, int ksize, const int *bounds,
                     const int32_t *weights, uint8_t *out, long out_stride, int32_t *sums) {
    int y, t, i;
    for (y = 0; y < out_height; y++) {
        const int32_t *k = weights + y * ksize;
        uint8_t *o = out + y * out_stride;
        for (i = 0; i < row_bytes; i++) sums[i] = HALF;
        for (t = 0; t < bounds[2 * y + 1]; t++) {
            const uint8_t *row = in + (bounds[2 * y] + t) * in_stride;
            const int32_t w = k[t];
            for (i = 0; i < row_bytes; i++) sums[i] += row[i] * w;
        }
        for (i = 0; i < row_bytes; i++) o[i] = clip8(sums[i]);
    }
}

/* Output column i takes output column out_width - 1 - i's input pixels and weights. */
static void reverse_columns(int out_width, int ksize, int *bounds, int32_t *weights) {
    int i, j, t;
    for (i = 0, j = out_width - 1; i < j; i++, j--) {
        for (t = 0; t < 2; t++) {
            int b = bounds[2 * i + t];
            bounds[2 * i + t] = bounds[2 * j + t], bounds[2 * j + t] = b;
        }
        for (t = 0; t < ksize; t++) {
            int32_t w = weights[i * ksize + t];
            weights[i * ksize + t] = weights[j * ksize + t], weights[j * ksize + t] = w;
        }
    }
}

/* Resize the box x0, y0, x1, y1 of a packed RGB image (width x height, rows ``stride`` bytes
 * apart) to out_width x out_height into ``out`` (rows ``out_stride`` bytes apart) as Pillow's
 * ``Image.resize((out_width, out_height), filter, box)`` does; filter 0 box, 1 bilinear,
 * 2 bicubic; ``mirror``: flipped left to right (the horizontal pass writes its columns in
 * reverse order, which costs nothing). Returns 0, -1 when memory runs out, -2 for a filter or
 * box out of range.
 *
 * The horizontal pass goes first, as Pillow has done for years. Pillow 13 goes vertical first for
 * some inputs (portrait images such as 333x500 among them), which rounds the intermediate result
 * differently: by a level or two, more where a bicubic overshoot is clipped. */
int resample_rgb(const uint8_t *in, int width, int height, long stride, float x0, float y0, float x1, float y1,
                 int out_width, int out_height, int filter, int mirror, uint8_t *out, long out_stride) {
    int need_horizontal, need_vertical, first_row, last_row, i, status = -1;
    int *bounds_h = NULL, *bounds_v = NULL;
    int32_t *weights_h = NULL, *weights_v = NULL, *sums = NULL;
    int ksize_h, ksize_v;
    uint8_t *temp = NULL;

    /* Written so that NaN fails every check. */
    if (filter < 0 || filter > 2 || width < 1 || height < 1 || out_width < 1 || out_height < 1 || !(x0 >= 0) ||
        !(y0 >= 0) || !(x1 <= width) || !(y1 <= height) || !(x1 - x0 >= 0) || !(y1 - y0 >= 0))
        return -2;
    if (!mirror && out_width == width && out_height == height && x0 == 0 && y0 == 0 && x1 == width &&
        y1 == height) {
        for (i = 0; i < height; i++) memcpy(out + i * out_stride, in + i * stride, (size_t)width * 3);
        return 0;  /* Image.resize copies */
    }
    /* A mirror needs the horizontal pass; where Pillow has none, its weights are exactly 1. */
    need_horizontal = mirror || out_width != width || x0 != 0 || x1 != out_width;
    need_vertical = out_height != height || y0 != 0 || y1 != out_height;
    ksize_h = coefficients(width, x0, x1, out_width, filter, &bounds_h, &weights_h);
    ksize_v = coefficients(height, y0, y1, out_height, filter, &bounds_v, &weights_v);
    if (!ksize_h || !ksize_v) goto done;
    if (mirror) reverse_columns(out_width, ksize_h, bounds_h, weights_h);
    first_row = bounds_v[0];
    last_row = bounds_v[2 * out_height - 2] + bounds_v[2 * out_height - 1];
    sums = malloc((size_t)(width > out_width ? width : out_width) * 3 * sizeof *sums);
    if (!sums) goto done;

    if (!need_horizontal) {
        vertical(in, stride, width * 3, out_height, ksize_v, bounds_v, weights_v, out, out_stride, sums);
    } else if (!need_vertical) {
        horizontal(in, stride, width, height, out_width, ksize_h, bounds_h, weights_h, out, out_stride);
    } else {  /* horizontal over the rows the vertical pass reads, then vertical */
        long temp_stride = (long)out_width * 3;
        temp = malloc((size_t)(last_row - first_row) * temp_stride);
        if (!temp) goto done;
        horizontal(in + first_row * stride, stride, width, last_row - first_row, out_width, ksize_h, bounds_h,
                   weights_h, temp, temp_stride);
        for (i = 0; i < out_height; i++) bounds_v[2 * i] -= first_row;
        vertical(temp, temp_stride, out_width * 3, out_height, ksize_v, bounds_v, weights_v, out, out_stride, sums);
    }
    status = 0;
done:
    free(bounds_h), free(weights_h), free(bounds_v), free(weights_v), free(sums), free(temp);
    return status;
}
