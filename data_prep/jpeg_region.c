/* Decode only a region of a JPEG, optionally at 1/2, 1/4 or 1/8 scale, with libjpeg-turbo.
 *
 * A random-resized crop needs a rectangle of the image, often a small one. libjpeg-turbo can
 * skip the IDCT, upsampling and colour conversion of the MCU columns left and right of it
 * (jpeg_crop_scanline), of the rows above it (jpeg_skip_scanlines: entropy decoding only), and
 * of everything below it (the decode stops there). Built as a plain shared library and called
 * through ctypes by jpeg_region.py, which falls back to Pillow where it is not built.
 *
 * Anything libjpeg complains about, warnings included (a truncated or corrupt stream), is
 * returned as an error, and the caller lets Pillow decide about that image.
 */
#include <setjmp.h>
#include <stdio.h>
#include <string.h>

#include <jpeglib.h>

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

/* Decode rows top..top+rows-1 and at least columns left..left+columns-1 of the image scaled by
 * 1/scale (scale 1, 2, 4 or 8; coordinates in the scaled image) as RGB into ``out`` (``capacity``
 * bytes, room for rows x scaled width x 3). libjpeg widens the columns to whole MCUs: the decoded
 * columns are *out_left..*out_left+*out_columns-1, stored row after row without padding.
 * Returns 0 on success, -1 with ``message`` set on any error or warning, -2 if a colour
 * space cannot be converted to RGB (CMYK, YCCK), -3 for an uncommon chroma sampling. */
int jpeg_region_decode(const unsigned char *data, unsigned long size, int scale, int left, int top,
                       int columns, int rows, unsigned char *out, unsigned long capacity, int *out_left,
                       int *out_columns, char *message) {
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    JDIMENSION xoffset, width;
    int row;
    init_errors(&cinfo, &err, message);
    if (setjmp(err.escape)) {  /* setjmp must run in the function that calls libjpeg */
        jpeg_destroy_decompress(&cinfo);
        return -1;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, data, size);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        jpeg_destroy_decompress(&cinfo);
        return -2;
    }
    if (!common_sampling(&cinfo)) {
        jpeg_destroy_decompress(&cinfo);
        return -3;
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
