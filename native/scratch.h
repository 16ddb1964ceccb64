/* Reuse of large working buffers between commands.
 *
 * Fresh multi-megabyte allocations come from mmap, and first-touch page faults then
 * cost more than the arithmetic (about 100 ms per 40 MB on a small VM). Job outputs and
 * iterative rules' working vectors are therefore recycled: a few freed buffers are kept
 * (bounded count and bytes) and handed out again for requests they fit. */
#ifndef SPIRT_SCRATCH_H
#define SPIRT_SCRATCH_H

#include <stddef.h>

void *scratch_take(size_t bytes);          /* NULL if out of memory */
void scratch_give(void *p, size_t bytes);  /* bytes: what was asked of scratch_take */

#endif
