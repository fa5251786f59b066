/* Small helpers: the clock, copies, error lines, picking dictionary items. */
#include "keymiss.h"

#include <ctype.h>
#include <stdint.h>

/* Milliseconds on a clock that never steps back or jumps with the wall clock (deadlines, leases),
 * where the server offers one (Redis >= 7.0, Valkey); else wall-clock milliseconds. */
long long km_now_ms(void) {
    return KM_MonotonicMicroseconds ? (long long)(KM_MonotonicMicroseconds() / 1000) : KM_Milliseconds();
}

/* The server's maxmemory (0: none) and whether its maxmemory-policy is noeviction
 * (km.noeviction), read from INFO memory at most once a second: CONFIG SET may change them at any
 * time, and a fill must not read all of INFO each time. */
unsigned long long km_maxmemory(RedisModuleCtx *ctx, long long now) {
    if (km.maxmemory_at != 0 && now - km.maxmemory_at < 1000) return km.maxmemory;
    km.maxmemory_at = now ? now : 1;
    RedisModuleServerInfoData *info = KM_GetServerInfo(ctx, "memory");
    if (info == NULL) return km.maxmemory; /* the last one read stands */
    int err = RM_ERR;
    unsigned long long max = KM_ServerInfoGetFieldUnsigned(info, "maxmemory", &err);
    if (err == RM_OK) km.maxmemory = max;
    const char *policy = KM_ServerInfoGetFieldC(info, "maxmemory_policy");
    if (policy != NULL) km.noeviction = strcmp(policy, "noeviction") == 0;
    KM_FreeServerInfo(ctx, info);
    return km.maxmemory;
}

char *km_dup_bytes(const char *p, size_t len) {
    char *s = KM_Alloc(len + 1);
    memcpy(s, p, len);
    s[len] = '\0';
    return s;
}

/* An error line a client may receive: one line, a code in capitals first. */
char *km_error_line(const char *msg, size_t len) {
    if (len > KM_MAX_ERROR_LEN) len = KM_MAX_ERROR_LEN;
    int coded = 0;
    size_t i = 0;
    while (i < len && isupper((unsigned char)msg[i])) i++;
    /* ERR or BUSY only: a worker's text must never pass for a MOVED, ASK or LOADING redirect */
    if ((i == 3 && memcmp(msg, "ERR", 3) == 0) || (i == 4 && memcmp(msg, "BUSY", 4) == 0))
        coded = i == len || msg[i] == ' ';
    char *out = KM_Alloc(len + 5);
    size_t n = 0;
    if (!coded) {
        memcpy(out, "ERR ", 4);
        n = 4;
    }
    for (i = 0; i < len; i++) {
        char c = msg[i];
        out[n++] = (c == '\r' || c == '\n') ? ' ' : c;
    }
    out[n] = '\0';
    return out;
}

/* At most `max` items of `d` that `pick` chooses (every item if NULL), in key order, with a copy of
 * each key if `copy_keys`; *n is the count. Free with km_picked_free. */
static KmPicked *km_dict_pick_max(RedisModuleDict *d, KmPick pick, const void *arg, int copy_keys, size_t max,
                                  size_t *n) {
    KmPicked *out = NULL;
    size_t cap = 0;
    *n = 0;
    RedisModuleDictIter *it = KM_DictIteratorStartC(d, "^", NULL, 0);
    char *kp;
    size_t klen;
    void *val;
    while (*n < max && (kp = KM_DictNextC(it, &klen, &val)) != NULL) {
        if (pick && !pick(val, arg)) continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            out = KM_Realloc(out, sizeof(*out) * cap);
        }
        out[*n].key = copy_keys ? km_dup_bytes(kp, klen) : NULL;
        out[*n].len = klen;
        out[*n].val = val;
        (*n)++;
    }
    KM_DictIteratorStop(it);
    return out;
}

KmPicked *km_dict_pick(RedisModuleDict *d, KmPick pick, const void *arg, int copy_keys, size_t *n) {
    return km_dict_pick_max(d, pick, arg, copy_keys, SIZE_MAX, n);
}

/* The first `max` keys of `d` (copies), in key order: a bounded share of a long list. */
KmPicked *km_dict_first(RedisModuleDict *d, size_t max, size_t *n) {
    return km_dict_pick_max(d, NULL, NULL, 1, max, n);
}

void km_picked_free(KmPicked *items, size_t n) {
    for (size_t i = 0; i < n; i++) KM_Free(items[i].key);
    KM_Free(items);
}

/* The items `pick` chooses leave `d`; free_val (if any) frees each one's value. */
void km_dict_purge(RedisModuleDict *d, KmPick pick, const void *arg, void (*free_val)(void *)) {
    size_t n;
    KmPicked *gone = km_dict_pick(d, pick, arg, 1, &n);
    for (size_t i = 0; i < n; i++) {
        void *old = NULL;
        if (KM_DictDelC(d, gone[i].key, gone[i].len, &old) == RM_OK && old && free_val) free_val(old);
    }
    km_picked_free(gone, n);
}
