/* Freshness: versions (which present values may be served), stale and early (XFetch) refreshes,
 * the backoff of a failed refresh, and the companions of values a client wrote. */
#include "keymiss.h"

#include <math.h>

#define KM_BACKOFF_FIRST_MS 1000
#define KM_BACKOFF_MAX_MS 60000

/* ---------------------------------------------------------------------------------------------- */
/* Versions                                                                                       */

/* Whether the present value of `key` (of keyspace ksi) may be served: always in an unversioned
 * keyspace; in a versioned one when a client wrote it or its companion names the current version
 * (1), or names the version just replaced inside its VSTALE window (KM_PREVIOUS: served, and the
 * caller starts its refresh). `count`: a refusal is counted (once per read, where it is answered). */
int km_version_ok(RedisModuleCtx *ctx, int ksi, RedisModuleString *key, int count) {
    KmKeyspace *ks = km.keyspaces[ksi];
    if (ks->version == NULL) return 1;
    if (KM_DictSize(km.dirty)) {
        size_t klen;
        const char *kp = KM_StringPtrLen(key, &klen);
        int nokey = 1;
        KM_DictGetC(km.dirty, (void *)kp, klen, &nokey);
        if (!nokey) return 1; /* a client's write, its companion not yet rewritten */
    }
    RedisModuleString *cname = km_companion_name(key);
    RedisModuleKey *open = KM_OpenKey(ctx, cname, RM_READ | km.lookup_modes);
    int ok = 0;
    if (open != NULL && KM_KeyType(open) == RM_KEYTYPE_STRING) {
        size_t vlen;
        const char *v = KM_StringDMA(open, &vlen, RM_READ);
        ok = v != NULL && ((vlen == ks->versionlen && memcmp(v, ks->version, vlen) == 0) ||
                           (vlen == KM_CLIENT_MARK_LEN && memcmp(v, KM_CLIENT_MARK, KM_CLIENT_MARK_LEN) == 0));
        if (!ok && v != NULL && ks->prev_version != NULL && vlen == ks->prev_versionlen &&
            memcmp(v, ks->prev_version, vlen) == 0 && km_now_ms() < ks->prev_until)
            ok = KM_PREVIOUS;
    }
    if (open) KM_CloseKey(open);
    KM_FreeString(NULL, cname);
    if (!ok && count) ks->version_misses++;
    return ok;
}

/* The keyspace's version from now on (NULL: unversioned); tag and label are taken over. A switch
 * keeps the replaced tag for the VSTALE window, when one is set; only the version just replaced is
 * kept. */
void km_set_version(KmKeyspace *ks, char *tag, size_t taglen, char *label) {
    int same = tag != NULL && ks->version != NULL && taglen == ks->versionlen && memcmp(tag, ks->version, taglen) == 0;
    if (!same) {
        KM_Free(ks->prev_version);
        ks->prev_version = NULL;
        if (tag != NULL && ks->version != NULL && ks->vstale_ms > 0) {
            ks->prev_version = ks->version;
            ks->prev_versionlen = ks->versionlen;
            ks->prev_until = km_now_ms() + ks->vstale_ms;
            ks->version = NULL;
        }
    }
    KM_Free(ks->version);
    KM_Free(ks->label);
    ks->version = tag;
    ks->versionlen = taglen;
    ks->label = label;
}

/* ---------------------------------------------------------------------------------------------- */
/* Refreshes                                                                                      */

/* Uniform in (0, 1]. */
static double km_rnd_unit(void) {
    km.rnd_state ^= km.rnd_state >> 12;
    km.rnd_state ^= km.rnd_state << 25;
    km.rnd_state ^= km.rnd_state >> 27;
    return ((double)((km.rnd_state * 2685821657736338717ULL) >> 11) + 1.0) / 9007199254740992.0;
}

/* One background recomputation of a present key: none while one runs, while its last refresh's
 * backoff lasts, with no worker, or with the queue full (a refresh never refuses a reader). */
void km_refresh(int ksi, RedisModuleString *key, long long now) {
    KmKeyspace *ks = km.keyspaces[ksi];
    if (ks->workers == 0 || km_entry_find(key) != NULL || ks->queued + ks->in_flight >= ks->queue_max) return;
    if (KM_DictSize(km.backoffs)) {
        size_t klen;
        const char *kp = KM_StringPtrLen(key, &klen);
        KmBackoff *b = KM_DictGetC(km.backoffs, (void *)kp, klen, NULL);
        if (b != NULL && b->until > now) return;
    }
    KmEntry *e = km_entry_new(key, ksi, now);
    e->refresh = 1;
}

/* A value of the version just replaced was served inside VSTALE: it is recomputed under the new. */
void km_served_previous(int ksi, RedisModuleString *key, int count) {
    if (count) km.keyspaces[ksi]->version_stale_hits++;
    km_refresh(ksi, key, km_now_ms());
}

/* A hit of keyspace ksi, `open` its key: past the TTL inside the stale window it is served stale and
 * refreshed; before the TTL, XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015) refreshes it
 * with probability growing as expiry nears, scaled by the keyspace's compute time, in the second
 * half of the value's life only (at most two computations per TTL). */
void km_on_served(int ksi, RedisModuleKey *open, RedisModuleString *key) {
    KmKeyspace *ks = km.keyspaces[ksi];
    if ((ks->stale_ms == 0 && ks->early_milli == 0) || open == NULL) return;
    long long pttl = KM_GetExpire(open);
    if (pttl == RM_NO_EXPIRE || pttl < 0) return;
    long long remaining = pttl - ks->stale_ms, now = km_now_ms();
    if (ks->stale_ms > 0 && remaining <= 0) {
        ks->stale_hits++;
        km_refresh(ksi, key, now);
        return;
    }
    if (ks->early_milli == 0 || ks->mean_compute_ms <= 0 || ks->ttl_ms <= 0 || remaining > ks->ttl_ms / 2) return;
    if (ks->mean_compute_ms * (double)ks->early_milli / 1000.0 * -log(km_rnd_unit()) >= (double)remaining) {
        if (ks->workers > 0 && km_entry_find(key) == NULL) ks->early_refreshes++;
        km_refresh(ksi, key, now);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Backoffs                                                                                       */

/* A refresh failed: the next waits 1 s, doubling to 60 s; the stale value is served meanwhile. */
void km_backoff_note(const RedisModuleString *key, long long now) {
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    KmBackoff *b = KM_DictGetC(km.backoffs, (void *)kp, klen, NULL);
    if (b == NULL) {
        if (KM_DictSize(km.backoffs) >= KM_MAX_BACKOFFS) return; /* bounded: this key may retry sooner */
        b = KM_Calloc(1, sizeof(*b));
        b->wait = KM_BACKOFF_FIRST_MS;
        KM_DictSetC(km.backoffs, (void *)kp, klen, b);
    } else {
        b->wait = b->wait * 2 > KM_BACKOFF_MAX_MS ? KM_BACKOFF_MAX_MS : b->wait * 2;
    }
    b->until = now + b->wait;
}

void km_backoff_clear(const RedisModuleString *key) {
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    KmBackoff *b = NULL;
    if (KM_DictDelC(km.backoffs, (void *)kp, klen, &b) == RM_OK) KM_Free(b);
}

static int km_backoff_over(const void *val, const void *now) {
    return ((const KmBackoff *)val)->until + KM_BACKOFF_MAX_MS <= *(const long long *)now;
}

/* Backoffs whose wait is long over are forgotten. */
void km_backoffs_purge(long long now) {
    km_dict_purge(km.backoffs, km_backoff_over, &now, KM_Free);
}

/* ---------------------------------------------------------------------------------------------- */
/* Client writes in versioned keyspaces                                                           */

/* Keys a client wrote in a versioned keyspace: their companion now marks a client's write (which
 * every version serves), with the value's TTL; a deleted or expired key's companion goes. Run from
 * the timer, where writes are allowed (not from the keyspace event that noted the key). */
void km_rewrite_companions(RedisModuleCtx *ctx) {
    size_t n;
    KmPicked *keys = km_dict_pick(km.dirty, NULL, NULL, 1, &n);
    int replica = (KM_GetContextFlags(ctx) & RM_CTX_FLAGS_SLAVE) != 0; /* its master does this */
    if (!replica && KM_SelectDb(ctx, 0) != RM_OK) replica = 1;
    for (size_t i = 0; i < n; i++) {
        KM_DictDelC(km.dirty, keys[i].key, keys[i].len, NULL);
        if (replica) continue;
        RedisModuleString *key = KM_CreateString(NULL, keys[i].key, keys[i].len);
        RedisModuleString *cname = km_companion_name(key);
        RedisModuleKey *open = KM_OpenKey(ctx, key, RM_READ | km.lookup_modes);
        int present = open != NULL && KM_KeyType(open) != RM_KEYTYPE_EMPTY;
        long long pttl = present ? KM_GetExpire(open) : RM_NO_EXPIRE;
        if (open) KM_CloseKey(open);
        km.filling = 1;
        RedisModuleCallReply *r;
        if (!present) r = KM_Call(ctx, "DEL", "!s", cname);
        else if (pttl > 0) r = KM_Call(ctx, "SET", "!sccl", cname, KM_CLIENT_MARK, "PX", pttl);
        else r = KM_Call(ctx, "SET", "!sc", cname, KM_CLIENT_MARK);
        km.filling = 0;
        if (r == NULL || KM_CallReplyType(r) == RM_REPLY_ERROR) /* the value then reads as a miss */
            KM_Log(ctx, "warning", "keymiss: could not mark a client's write to a versioned key");
        if (r) KM_FreeCallReply(r);
        KM_FreeString(NULL, cname);
        KM_FreeString(NULL, key);
    }
    km_picked_free(keys, n);
}
