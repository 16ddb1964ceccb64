#include "scratch.h"

#include <pthread.h>
#include <stdlib.h>

#define SLOTS 6
#define MAX_KEPT ((size_t)1 << 30) /* never keep more than 1 GiB idle */
#define SMALL ((size_t)1 << 20)    /* below this malloc is cheap enough */

typedef struct {
    void *p;
    size_t cap;
} Slot;

static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static Slot slots[SLOTS];
static size_t kept;

void *scratch_take(size_t bytes) {
    if (bytes == 0) bytes = 1;
    if (bytes >= SMALL) {
        pthread_mutex_lock(&mu);
        int best = -1;
        for (int i = 0; i < SLOTS; i++)
            /* Fits, and not wastefully large (at most twice the request). */
            if (slots[i].p && slots[i].cap >= bytes && slots[i].cap / 2 <= bytes &&
                (best < 0 || slots[i].cap < slots[best].cap))
                best = i;
        if (best >= 0) {
            void *p = slots[best].p;
            kept -= slots[best].cap;
            slots[best].p = NULL;
            pthread_mutex_unlock(&mu);
            return p;
        }
        pthread_mutex_unlock(&mu);
    }
    return malloc(bytes);
}

void scratch_give(void *p, size_t bytes) {
    if (!p) return;
    if (bytes == 0) bytes = 1;
    if (bytes >= SMALL && bytes <= MAX_KEPT) {
        pthread_mutex_lock(&mu);
        int slot = -1;
        for (int i = 0; i < SLOTS && slot < 0; i++)
            if (!slots[i].p) slot = i;
        if (slot < 0) { /* full: replace the smallest kept buffer if this one is larger */
            slot = 0;
            for (int i = 1; i < SLOTS; i++)
                if (slots[i].cap < slots[slot].cap) slot = i;
            if (slots[slot].cap >= bytes) slot = -1;
        }
        while (slot >= 0 && kept + bytes > MAX_KEPT) { /* make room: drop other buffers */
            int victim = -1;
            for (int i = 0; i < SLOTS; i++)
                if (slots[i].p && (victim < 0 || slots[i].cap < slots[victim].cap)) victim = i;
            if (victim < 0) break;
            free(slots[victim].p);
            kept -= slots[victim].cap;
            slots[victim].p = NULL;
        }
        if (slot >= 0 && kept + bytes <= MAX_KEPT) {
            void *old = slots[slot].p;
            if (old) kept -= slots[slot].cap;
            slots[slot].p = p;
            slots[slot].cap = bytes;
            kept += bytes;
            pthread_mutex_unlock(&mu);
            free(old);
            return;
        }
        pthread_mutex_unlock(&mu);
    }
    free(p);
}
