/* Freshness: versions (which present values may be served), stale and early (XFetch) refreshes,
 * the backoff of a failed refresh, and the companions that record each value's codec and version. */
#include "keymiss.h"

#include <math.h>
#include <stdio.h>

#define KM_BACKOFF_FIRST_MS 1000
#define KM_BACKOFF_MAX_MS 60000
/* the longest companion: codec, CRC, two separators, a version */
#define KM_RECORD_MAX (24 + KM_MAX_VERSION)

/* ---------------------------------------------------------------------------------------------- */
/* Companions: <codec>:<crc32>:<version> beside a value (protocol.py says why, for every writer)  */

/* CRC-32 as zlib computes it (reflected 0xEDB88320): of a FILL's value and of a client's write,
 * never on a hit (the module learns of client writes from keyspace events, not from the CRC). */
static uint32_t km_crc32(const char *p, size_t len) {
    static uint32_t table[256];
    static int ready;
    if (!ready) {
        for (uint32_t i = 0; i < 256; i++) {
            uint32_t c = i;
            for (int j = 0; j < 8; j++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            table[i] = c;
        }
        ready = 1;
    }
    uint32_t crc = 0xFFFFFFFFu;
    for (size_t i = 0; i < len; i++) crc = table[(crc ^ (unsigned char)p[i]) & 0xff] ^ (crc >> 8);
    return crc ^ 0xFFFFFFFFu;
}

/* The version a companion names (*ver, *verlen; empty for a client's value): 1, or 0 for bytes that
 * are no companion. An earlier release's companion held the version alone, or KM_CLIENT_MARK. */
static int km_record_version(const char *v, size_t vlen, const char **ver, size_t *verlen) {
    const char *a = memchr(v, KM_RECORD_SEP[0], vlen);
    if (a == NULL) {
        *ver = v;
        *verlen = vlen == KM_CLIENT_MARK_LEN && memcmp(v, KM_CLIENT_MARK, vlen) == 0 ? 0 : vlen;
        return 1;
    }
    const char *b = memchr(a + 1, KM_RECORD_SEP[0], vlen - (size_t)(a + 1 - v));
    if (b == NULL) return 0;
    *ver = b + 1;
    *verlen = vlen - (size_t)(b + 1 - v);
    return 1;
}

/* A companion's bytes, into buf (KM_RECORD_MAX bytes; verlen at most KM_MAX_VERSION): its length. */
static size_t km_record_format(char *buf, long long codec, uint32_t crc, const char *ver, size_t verlen) {
    int n = snprintf(buf, KM_RECORD_MAX, "%lld" KM_RECORD_SEP "%08x" KM_RECORD_SEP, codec, (unsigned)crc);
    if (n < 0 || (size_t)n + verlen > KM_RECORD_MAX) return 0;
    memcpy(buf + n, ver, verlen);
    return (size_t)n + verlen;
}

/* A FILL's companion, written before its value and with the same PX: <codec>:<crc32>:<version>
 * where the value has a codec other than plain bytes (0) or a version (ver not NULL); otherwise
 * a companion an earlier value left goes. NULL when done, else the server's error reply (the
 * value must then not be written). Runs with km.filling set, in database 0. */
RedisModuleCallReply *km_companion_fill(RedisModuleCtx *ctx, RedisModuleString *key, RedisModuleString *value,
                                        long long codec, const char *ver, size_t verlen, long long px) {
    RedisModuleString *cname = km_companion_name(key);
    RedisModuleCallReply *r = NULL;
    if (codec != 0 || ver != NULL) {
        size_t len;
        const char *p = KM_StringPtrLen(value, &len);
        char buf[KM_RECORD_MAX];
        size_t n = km_record_format(buf, codec, km_crc32(p, len), ver ? ver : "", ver ? verlen : 0);
        r = px > 0 ? KM_Call(ctx, "SET", "!sbcl", cname, buf, n, "PX", px) : KM_Call(ctx, "SET", "!sb", cname, buf, n);
    } else {
        RedisModuleKey *open = KM_OpenKey(ctx, cname, RM_READ | km.lookup_modes);
        int present = open != NULL && KM_KeyType(open) != RM_KEYTYPE_EMPTY;
        if (open) KM_CloseKey(open);
        if (present) r = KM_Call(ctx, "DEL", "!s", cname);
    }
    KM_FreeString(NULL, cname);
    if (r != NULL && KM_CallReplyType(r) != RM_REPLY_ERROR) {
        KM_FreeCallReply(r);
        r = NULL;
    }
    return r;
}

/* ---------------------------------------------------------------------------------------------- */
/* Versions                                                                                       */

/* Whether the present value of `key` (of keyspace ksi) may be served: always in an unversioned
 * keyspace; in a versioned one when a client wrote it (its companion's version is empty, or the
 * write is noted and its companion not yet rewritten) or its companion names the current version
 * (1), or names the version just replaced inside its VSTALE window (KM_PREVIOUS: served, and the
 * caller starts its refresh). `count`: a refusal is counted (once per read, where it is answered). */
int km_version_ok(RedisModuleCtx *ctx, int ksi, RedisModuleString *key, int count) {
    KmKeyspace *ks = km.keyspaces[ksi];
    if (ks->version == NULL) return 1;
    if (KM_DictSize(km.dirty)) {
        size_t klen;
        const char *kp = KM_StringPtrLen(key, &klen);
        int nokey = 1;
        uintptr_t note = (uintptr_t)KM_DictGetC(km.dirty, (void *)kp, klen, &nokey);
        if (!nokey && !(note & KM_NOTE_RECORD)) return 1; /* a client's write, its companion not yet rewritten */
    }
    RedisModuleString *cname = km_companion_name(key);
    RedisModuleKey *open = KM_OpenKey(ctx, cname, RM_READ | km.lookup_modes);
    int ok = 0;
    if (open != NULL && KM_KeyType(open) == RM_KEYTYPE_STRING) {
        size_t vlen, verlen;
        const char *v = KM_StringDMA(open, &vlen, RM_READ), *ver;
        if (v != NULL && km_record_version(v, vlen, &ver, &verlen)) { /* no CRC here: see km_crc32 */
            ok = verlen == 0 || (verlen == ks->versionlen && memcmp(ver, ks->version, verlen) == 0);
            if (!ok && ks->prev_version != NULL && verlen == ks->prev_versionlen &&
                memcmp(ver, ks->prev_version, verlen) == 0 && km_now_ms() < ks->prev_until)
                ok = KM_PREVIOUS;
        }
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

/* Whether the companion `cname` holds a record (<codec>:<crc32>:<version>) whose CRC is `crc`. */
static int km_record_matches(RedisModuleCtx *ctx, RedisModuleString *cname, uint32_t crc) {
    RedisModuleCallReply *got = KM_Call(ctx, "GET", "s", cname);
    size_t len = 0;
    const char *p = got && KM_CallReplyType(got) == RM_REPLY_STRING ? KM_CallReplyStringPtr(got, &len) : NULL;
    int ok = 0;
    const char *a = p ? memchr(p, KM_RECORD_SEP[0], len) : NULL;
    const char *b = a ? memchr(a + 1, KM_RECORD_SEP[0], len - (size_t)(a + 1 - p)) : NULL;
    if (b != NULL && b - a - 1 >= 1 && b - a - 1 <= 8) {
        uint32_t have = 0;
        ok = 1;
        for (const char *c = a + 1; c < b && ok; c++) {
            int d = *c >= '0' && *c <= '9' ? *c - '0' : (*c | 0x20) >= 'a' && (*c | 0x20) <= 'f' ? (*c | 0x20) - 'a' + 10 : -1;
            if (d < 0) ok = 0;
            else have = have << 4 | (uint32_t)d;
        }
        ok = ok && have == crc;
    }
    if (got) KM_FreeCallReply(got);
    return ok;
}

/* The companion of a key a client wrote, present with `pttl`: rewritten to 0:<crc32>:, a client's
 * write, with the value's TTL (none if the value has none). A writer that wrote the value's record
 * in the same script (the Python Redis store; `record`: km_companion_written) keeps it when its
 * CRC is the value's. The value is read by GET, not the key API (which would rewrite a small
 * value's encoding); one of another type is a client's too. */
static int km_mark_client(RedisModuleCtx *ctx, RedisModuleString *key, RedisModuleString *cname, long long pttl,
                          int record) {
    RedisModuleCallReply *got = KM_Call(ctx, "GET", "s", key);
    size_t len = 0;
    const char *p = got && KM_CallReplyType(got) == RM_REPLY_STRING ? KM_CallReplyStringPtr(got, &len) : NULL;
    uint32_t crc = km_crc32(p ? p : "", p ? len : 0);
    if (got) KM_FreeCallReply(got);
    if (record && p != NULL && km_record_matches(ctx, cname, crc)) return RM_OK;
    char buf[KM_RECORD_MAX];
    size_t blen = km_record_format(buf, 0, crc, "", 0);
    RedisModuleCallReply *r = pttl > 0 ? KM_Call(ctx, "SET", "!sbcl", cname, buf, blen, "PX", pttl)
                                       : KM_Call(ctx, "SET", "!sb", cname, buf, blen);
    int ok = r != NULL && KM_CallReplyType(r) != RM_REPLY_ERROR;
    if (r) KM_FreeCallReply(r);
    return ok ? RM_OK : RM_ERR;
}

/* Keys a client wrote in a versioned keyspace: their companion now marks a client's write (which
 * every version serves; km_mark_client), a deleted key's companion goes. Run from the timer, where
 * writes are allowed (not from the keyspace event that noted the key), KM_NOTES_PER_TICK keys a
 * tick (the rest stay noted, and served, until their turn); the CRC is computed here, once per
 * write, never on a hit. */
void km_rewrite_companions(RedisModuleCtx *ctx) {
    size_t n;
    KmPicked *keys = km_dict_first(km.dirty, KM_NOTES_PER_TICK, &n);
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
        int ok = RM_OK;
        if (present) {
            ok = km_mark_client(ctx, key, cname, pttl, ((uintptr_t)keys[i].val & KM_NOTE_RECORD) != 0);
        } else {
            RedisModuleCallReply *r = KM_Call(ctx, "DEL", "!s", cname);
            ok = r != NULL && KM_CallReplyType(r) != RM_REPLY_ERROR ? RM_OK : RM_ERR;
            if (r) KM_FreeCallReply(r);
        }
        km.filling = 0;
        if (ok != RM_OK) /* the value then reads as a miss */
            KM_Log(ctx, "warning", "keymiss: could not mark a client's write to a versioned key");
        KM_FreeString(NULL, cname);
        KM_FreeString(NULL, key);
    }
    km_picked_free(keys, n);
}
