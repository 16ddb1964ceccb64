/* A source of rows (tensors) read chunk by chunk.
 *
 * Every SPIRT computation is written as passes over coordinate chunks of its input
 * rows, fetched through this interface. Commands on small inputs fetch straight from
 * Redis memory on the main thread; worker-thread commands fetch copies taken under the
 * module lock, so Redis keeps serving between chunks. A fetch fails (returns -1, with
 * the message in err) when an input is modified meanwhile, when the client gives up,
 * or on a non-finite value. */
#ifndef SPIRT_SRC_H
#define SPIRT_SRC_H

#include <stddef.h>

#define SPIRT_ERRLEN 256

/* A float that may sit at any address. A Redis string's bytes follow a 3, 5, 9 or
 * 17-byte header, so a tensor in Redis is rarely float-aligned, and reading it through
 * a plain `float *` would be undefined behaviour. A typedef may lower alignment (GCC and
 * Clang both honour it), so loads through `const f32u *` are well-defined anywhere;
 * on x86 the vectorised loops compile to the same unaligned vector loads (movups,
 * vcvtps2pd from memory) as with `float *`. Rows handed out by a Src are of this type,
 * so the kernels read Redis' bytes in place, with no copy. */
typedef float f32u __attribute__((aligned(1)));

typedef struct Src Src;
struct Src {
    size_t rows;  /* number of rows */
    size_t len;   /* elements per row */
    size_t chunk; /* elements per fetch (the last one may be shorter) */
    /* Points out[i] at elements [off, off+cnt) of row i (NULL for an absent optional
     * row); any alignment. The pointers stay valid until the next fetch. */
    int (*fetch)(Src *s, size_t off, size_t cnt, const f32u **out);
    char *err; /* SPIRT_ERRLEN bytes */
};

/* Formats an error into s->err and returns -1 (so callers can `return src_fail(...)`). */
int src_fail(Src *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static inline size_t src_chunk_len(const Src *s, size_t off) {
    return s->len - off < s->chunk ? s->len - off : s->chunk;
}

/* Chunk size for a job over `rows` rows: about 256 KiB of float32 per fetch, so one
 * fetch under the module lock stays short and its copy stays in L2. */
size_t src_pick_chunk(size_t rows);

#endif
