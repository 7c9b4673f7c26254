/* Decode only a region of a JPEG, optionally at 1/2, 1/4 or 1/8 scale, with libjpeg-turbo.
 *
 * A random-resized crop needs a rectangle of the image, often a small one. libjpeg-turbo can
 * skip the IDCT, upsampling and colour conversion of the MCU columns left and right of it
 * (jpeg_crop_scanline), of the rows above it (jpeg_skip_scanlines: entropy decoding only), and
 * of everything below it (the decode stops there). Huffman decoding, most of a decode's time,
 * cannot be skipped that way: each MCU's codes follow the previous one's. A JPEG with a restart
 * marker after every MCU (jpeg_add_restarts, lossless) can skip it too: the MCUs around the
 * region are cut out of the stream into a smaller JPEG of their own, which is decoded instead.
 * Built as a plain shared library and called through ctypes by jpeg_region.py, which falls back
 * to Pillow where it is not built.
 *
 * Anything libjpeg complains about, warnings included (a truncated or corrupt stream), is
 * returned as an error, and the caller lets Pillow decide about that image.
 */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf escape;
    char *message;  /* JMSG_LENGTH_MAX bytes, owned by the caller */
};

static void fail(j_common_ptr cinfo) {
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->escape, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    if (level < 0) fail(cinfo);  /* a warning: corrupt or truncated data */
}

/* Errors and warnings of ``cinfo`` go to ``err`` (its ``escape`` is set by the caller), their
 * text to ``message``; ``cinfo`` is zeroed first, so destroying it is safe even if creating it
 * failed. */
static void init_errors(struct jpeg_decompress_struct *cinfo, struct error_manager *err, char *message) {
    memset(cinfo, 0, sizeof *cinfo);
    cinfo->err = jpeg_std_error(&err->pub);
    err->pub.error_exit = fail;
    err->pub.emit_message = on_message;
    err->message = message;
}

/* The image's size and components (1 grey, 3 YCbCr/RGB, 4 CMYK/YCCK); 0 on success. */
int jpeg_region_info(const unsigned char *data, unsigned long size, int *width, int *height,
                     int *components, char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    init_errors(&cinfo, &err, message);
    if (setjmp(err.escape)) {
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    *width = (int)cinfo.image_width;
    *height = (int)cinfo.image_height;
    *components = cinfo.num_components;
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* Whether cropped decoding gives a full decode's pixels: libjpeg-turbo upsamples the chroma
 * of a cropped region as if its edges were the image's, which the caller's margin absorbs for
 * 4:4:4, 4:2:2, 4:4:0 and 4:2:0, but not for rarer samplings (4x2, 2x4, ...). */
static int common_sampling(const struct jpeg_decompress_struct *cinfo) {
    int c;
    if (cinfo->comp_info[0].h_samp_factor > 2 || cinfo->comp_info[0].v_samp_factor > 2) return 0;
    for (c = 1; c < cinfo->num_components; c++)
        if (cinfo->comp_info[c].h_samp_factor != 1 || cinfo->comp_info[c].v_samp_factor != 1) return 0;
    return 1;
}

/* -2 for CMYK/YCCK (libjpeg has no RGB conversion for them), -3 for an uncommon chroma sampling,
 * else 0: the images left to Pillow. */
static int unsupported(const struct jpeg_decompress_struct *cinfo) {
    if (cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK) return -2;
    return common_sampling(cinfo) ? 0 : -3;
}

/* ------------------------------------------------------------------ restart-marker streams */

/* Where a baseline JPEG's frame header and entropy-coded data are, and its MCU grid. */
struct layout {
    size_t frame;      /* offset of the SOF segment's length field */
    size_t data;       /* offset of the first entropy-coded byte (after the SOS segment) */
    int width, height;
    int mcu_width, mcu_height, mcus_per_row, mcu_rows;
};

static int be16(const unsigned char *p) { return p[0] << 8 | p[1]; }

/* Fills ``layout`` for a Huffman-coded sequential JPEG with one interleaved scan of all its
 * components and a restart marker after every MCU (as jpeg_add_restarts writes); 0 otherwise. */
static int restart_layout(const unsigned char *d, size_t n, struct layout *layout) {
    size_t pos = 2, length;
    int restart_interval = 0, components = 0, max_h = 1, max_v = 1, c, marker;
    memset(layout, 0, sizeof *layout);
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) return 0;
    while (pos + 4 <= n) {
        if (d[pos] != 0xFF) return 0;
        while (pos < n && d[pos] == 0xFF) pos++;  /* fill bytes */
        if (pos + 3 > n) return 0;
        marker = d[pos++];
        length = (size_t)be16(d + pos);
        if (length < 2 || pos + length > n) return 0;
        if (marker == 0xC0 || marker == 0xC1) {  /* baseline or extended sequential, Huffman */
            if (length < 8) return 0;
            layout->frame = pos;
            layout->height = be16(d + pos + 3);
            layout->width = be16(d + pos + 5);
            components = d[pos + 7];
            if (components < 1 || length < 8 + 3 * (size_t)components) return 0;
            for (c = 0; c < components; c++) {
                int h = d[pos + 9 + 3 * c] >> 4, v = d[pos + 9 + 3 * c] & 15;
                if (h > max_h) max_h = h;
                if (v > max_v) max_v = v;
            }
        } else if (marker >= 0xC2 && marker <= 0xCF && marker != 0xC4 && marker != 0xC8 && marker != 0xCC) {
            return 0;  /* progressive, lossless or arithmetic-coded */
        } else if (marker == 0xDD) {
            if (length < 4) return 0;
            restart_interval = be16(d + pos + 2);
        } else if (marker == 0xDA) {
            size_t end = pos + length;  /* Ns, its component table, then Ss, Se, Ah/Al */
            if (!layout->frame || restart_interval != 1 || length < 6 + 2 * (size_t)components ||
                d[pos + 2] != components || layout->width < 1 || layout->height < 1 || d[end - 3] != 0 ||
                d[end - 2] != 63 || d[end - 1] != 0)
                return 0;  /* one full sequential scan of all components, a restart after every MCU */
            layout->data = pos + length;
            /* A single-component scan has one block per MCU, whatever its sampling factors. */
            layout->mcu_width = components == 1 ? 8 : 8 * max_h;
            layout->mcu_height = components == 1 ? 8 : 8 * max_v;
            layout->mcus_per_row = (layout->width + layout->mcu_width - 1) / layout->mcu_width;
            layout->mcu_rows = (layout->height + layout->mcu_height - 1) / layout->mcu_height;
            return 1;
        } else if (marker == 0xD9) {
            return 0;
        }
        pos += length;
    }
    return 0;
}

/* A JPEG of MCU columns c0..c1-1 and rows r0..r1-1 of ``d`` (see restart_layout): the tables,
 * the frame header with the smaller size, and those MCUs' entropy-coded segments, renumbered;
 * NULL if the stream has fewer segments than its size needs (a damaged file: the caller then
 * decodes it the usual way, which reports the damage). Free with free(). */
static unsigned char *sub_jpeg(const unsigned char *d, size_t n, const struct layout *layout, int c0, int c1,
                               int r0, int r1, size_t *size) {
    const long last = (long)(r1 - 1) * layout->mcus_per_row + c1 - 1;  /* the last MCU needed */
    size_t *starts = malloc(sizeof *starts * (size_t)(last + 2)), pos = layout->data, total;
    unsigned char *out, *w;
    long mcu = 0;
    int r, written = 0, width, height;
    if (!starts) return NULL;
    starts[0] = pos;
    /* Segment k runs from starts[k] to the marker before starts[k + 1]. */
    while (mcu <= last && pos + 1 < n) {
        if (d[pos] != 0xFF) {  /* jump to the next 0xFF: memchr is vectorised */
            const unsigned char *next = memchr(d + pos, 0xFF, n - 1 - pos);
            if (!next) break;
            pos = (size_t)(next - d);
            continue;
        }
        if (d[pos + 1] == 0x00 || d[pos + 1] == 0xFF) {  /* a stuffed 0xFF, or fill */
            pos += 1 + (d[pos + 1] == 0x00);
            continue;
        }
        if (d[pos + 1] < 0xD0 || d[pos + 1] > 0xD7) {  /* EOI (or another marker): the data ends */
            if (mcu == last) starts[++mcu] = pos + 2;
            break;
        }
        starts[++mcu] = pos + 2;
        pos += 2;
    }
    if (mcu <= last) {
        free(starts);
        return NULL;
    }
    total = layout->data + 2;
    for (r = r0; r < r1; r++)
        total += starts[(long)r * layout->mcus_per_row + c1] - starts[(long)r * layout->mcus_per_row + c0];
    out = malloc(total);
    if (!out) {
        free(starts);
        return NULL;
    }
    memcpy(out, d, layout->data);
    width = (c1 == layout->mcus_per_row ? layout->width : c1 * layout->mcu_width) - c0 * layout->mcu_width;
    height = (r1 == layout->mcu_rows ? layout->height : r1 * layout->mcu_height) - r0 * layout->mcu_height;
    out[layout->frame + 3] = (unsigned char)(height >> 8), out[layout->frame + 4] = (unsigned char)height;
    out[layout->frame + 5] = (unsigned char)(width >> 8), out[layout->frame + 6] = (unsigned char)width;
    w = out + layout->data;
    for (r = r0; r < r1; r++) {
        long k;
        for (k = (long)r * layout->mcus_per_row + c0; k < (long)r * layout->mcus_per_row + c1; k++) {
            size_t length = starts[k + 1] - 2 - starts[k];  /* without the marker after it */
            memcpy(w, d + starts[k], length);
            w += length;
            *w++ = 0xFF;
            *w++ = (unsigned char)(0xD0 + written++ % 8);
        }
    }
    w[-1] = 0xD9;  /* the last segment's marker becomes EOI */
    *size = (size_t)(w - out);
    free(starts);
    return out;
}

/* A memory destination that owns its buffer (realloc'ed as it fills), so that an error at any
 * point leaves one buffer to free; libjpeg's jpeg_mem_dest reports its buffer only at the end. */
struct growing_destination {
    struct jpeg_destination_mgr pub;
    unsigned char *buffer;
    size_t capacity;
};

static void destination_start(j_compress_ptr cinfo) { (void)cinfo; }

static boolean destination_grow(j_compress_ptr cinfo) {
    struct growing_destination *dest = (struct growing_destination *)cinfo->dest;
    unsigned char *bigger = realloc(dest->buffer, dest->capacity * 2);
    if (!bigger) ERREXIT1(cinfo, JERR_OUT_OF_MEMORY, 0);
    dest->buffer = bigger;
    dest->pub.next_output_byte = bigger + dest->capacity;  /* the whole buffer was full */
    dest->pub.free_in_buffer = dest->capacity;
    dest->capacity *= 2;
    return TRUE;
}

static void destination_end(j_compress_ptr cinfo) { (void)cinfo; }

/* Rewrite a JPEG losslessly (the same DCT coefficients, so the same pixels) with a restart
 * marker after every MCU and optimised Huffman tables, baseline even if it was progressive;
 * other markers (EXIF, ICC, comments) are dropped. ``*out`` is malloc'ed (free with
 * jpeg_region_free). Returns 0, -1 with ``message`` set on any error or warning, -2 for CMYK/YCCK,
 * -3 for an uncommon chroma sampling (both are left as they are: the loader gives them to Pillow). */
int jpeg_add_restarts(const unsigned char *data, unsigned long size, unsigned char **out, unsigned long *out_size,
                      char *message) {
    struct jpeg_decompress_struct source;
    struct jpeg_compress_struct target;
    struct error_manager err;  /* shared by both: libjpeg allows it, and one setjmp serves */
    struct growing_destination dest;
    jvirt_barray_ptr *coefficients;
    int status;
    init_errors(&source, &err, message);
    memset(&target, 0, sizeof target);
    memset(&dest, 0, sizeof dest);
    target.err = &err.pub;
    *out = NULL;
    *out_size = 0;
    if (setjmp(err.escape)) {
        jpeg_destroy_compress(&target);
        jpeg_destroy_decompress(&source);
        free(dest.buffer);
        return -1;
    }
    jpeg_create_decompress(&source);
    jpeg_mem_src(&source, data, size);
    jpeg_read_header(&source, TRUE);
    status = unsupported(&source);
    if (status) {
        jpeg_destroy_decompress(&source);
        return status;
    }
    coefficients = jpeg_read_coefficients(&source);
    jpeg_create_compress(&target);
    dest.capacity = size + size / 8 + 4096;  /* usually enough: markers add about 6% */
    dest.buffer = malloc(dest.capacity);
    if (!dest.buffer) ERREXIT1(&target, JERR_OUT_OF_MEMORY, 1);
    dest.pub.next_output_byte = dest.buffer;
    dest.pub.free_in_buffer = dest.capacity;
    dest.pub.init_destination = destination_start;
    dest.pub.empty_output_buffer = destination_grow;
    dest.pub.term_destination = destination_end;
    target.dest = &dest.pub;
    jpeg_copy_critical_parameters(&source, &target);
    target.restart_interval = 1;
    target.optimize_coding = TRUE;
    jpeg_write_coefficients(&target, coefficients);
    jpeg_finish_compress(&target);
    jpeg_destroy_compress(&target);
    jpeg_finish_decompress(&source);
    jpeg_destroy_decompress(&source);
    *out = dest.buffer;
    *out_size = dest.capacity - dest.pub.free_in_buffer;
    return 0;
}

void jpeg_region_free(void *pointer) { free(pointer); }

/* A hash of jpeg_region.c and resample.c, given by jpeg_region.py's build (-DSOURCE_HASH), so
 * that a library built from other sources is refused at load instead of used silently. */
#ifndef SOURCE_HASH
#define SOURCE_HASH "unknown"
#endif
const char *jpeg_region_source_hash(void) { return SOURCE_HASH; }

/* Decode rows top..top+rows-1 and at least columns left..left+columns-1 of the image scaled by
 * 1/scale (scale 1, 2, 4 or 8; coordinates in the scaled image) as RGB into ``out`` (``capacity``
 * bytes, room for rows x scaled width x 3). libjpeg widens the columns to whole MCUs: the decoded
 * columns are *out_left..*out_left+*out_columns-1, stored row after row without padding.
 * Returns 0 on success, -1 with ``message`` set on any error or warning, -2 if a colour
 * space cannot be converted to RGB (CMYK, YCCK), -3 for an uncommon chroma sampling. */
static int decode_rows(const unsigned char *data, unsigned long size, int scale, int left, int top, int columns,
                       int rows, unsigned char *out, unsigned long capacity, int *out_left, int *out_columns,
                       char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JDIMENSION xoffset, width;
    int row, status;
    init_errors(&cinfo, &err, message);
    if (setjmp(err.escape)) {  /* setjmp must run in the function that calls libjpeg */
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    status = unsupported(&cinfo);
    if (status) {
        jpeg_destroy_decompress(&cinfo);
        return status;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale;
    jpeg_start_decompress(&cinfo);
    if (left < 0 || top < 0 || columns < 1 || rows < 1 || (JDIMENSION)left >= cinfo.output_width ||
        (JDIMENSION)columns > cinfo.output_width - (JDIMENSION)left || (JDIMENSION)top >= cinfo.output_height ||
        (JDIMENSION)rows > cinfo.output_height - (JDIMENSION)top) {
        snprintf(message, JMSG_LENGTH_MAX, "region %dx%d+%d+%d outside the %ux%u image", columns, rows, left,
                 top, cinfo.output_width, cinfo.output_height);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    xoffset = (JDIMENSION)left;
    width = (JDIMENSION)columns;
    if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoffset, &width);
    if ((unsigned long)rows * width * 3 > capacity) {
        snprintf(message, JMSG_LENGTH_MAX, "%d rows of %u columns do not fit in %lu bytes", rows, width, capacity);
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    if (top > 0) jpeg_skip_scanlines(&cinfo, (JDIMENSION)top);
    for (row = 0; row < rows; row++) {
        JSAMPROW line = out + (size_t)row * width * 3;
        if (jpeg_read_scanlines(&cinfo, &line, 1) != 1) {
            snprintf(message, JMSG_LENGTH_MAX, "no scanline %d", top + row);
            jpeg_destroy_decompress(&cinfo);
            return -1;
        }
    }
    *out_left = (int)xoffset;
    *out_columns = (int)width;
    jpeg_abort_decompress(&cinfo);  /* the rows below the region are never decoded */
    jpeg_destroy_decompress(&cinfo);
    return 0;
}

/* decode_rows, from a cut-out of just the MCUs around the region where the file has a restart
 * marker after every MCU (restart_layout), else from the whole stream. */
int jpeg_region_decode(const unsigned char *data, unsigned long size, int scale, int left, int top, int columns,
                       int rows, unsigned char *out, unsigned long capacity, int *out_left, int *out_columns,
                       char *message) {
    struct layout layout;
    if ((scale == 1 || scale == 2 || scale == 4 || scale == 8) && left >= 0 && top >= 0 && columns >= 1 &&
        rows >= 1 && restart_layout(data, size, &layout)) {
        /* The MCUs around the region (coordinates in the image scaled by 1/scale; an MCU is a
         * whole number of scaled pixels, scale dividing 8). */
        int mw = layout.mcu_width / scale, mh = layout.mcu_height / scale;
        int c0 = left / mw, r0 = top / mh, c1 = (left + columns + mw - 1) / mw, r1 = (top + rows + mh - 1) / mh;
        size_t sub_size;
        unsigned char *sub;
        if (c1 > layout.mcus_per_row) c1 = layout.mcus_per_row;
        if (r1 > layout.mcu_rows) r1 = layout.mcu_rows;
        /* libjpeg upsamples chroma only 2 samples wide by repeating them, not by its usual
         * interpolation: at least 3 MCUs wide, the cut is upsampled as the whole image is. */
        while (c1 - c0 < 3 && (c1 < layout.mcus_per_row || c0 > 0)) {
            if (c1 < layout.mcus_per_row)
                c1++;
            else
                c0--;
        }
        sub = c0 < c1 && r0 < r1 ? sub_jpeg(data, size, &layout, c0, c1, r0, r1, &sub_size) : NULL;
        if (sub) {
            int status = decode_rows(sub, sub_size, scale, left - c0 * mw, top - r0 * mh, columns, rows, out,
                                     capacity, out_left, out_columns, message);
            free(sub);
            if (status == 0) {
                *out_left += c0 * mw;
                return 0;
            }  /* else: the whole stream decides (and names the damage) */
        }
    }
    return decode_rows(data, size, scale, left, top, columns, rows, out, capacity, out_left, out_columns, message);
}
