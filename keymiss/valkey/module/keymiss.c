/* keymiss inside Valkey / Redis: GET and MGET of a registered keyspace compute on a miss.
 *
 * A command filter sends GET/MGET/GETEX(no options) naming a key of a registered keyspace to
 * KEYMISS.GET / KEYMISS.MGET. A hit is answered from the keyspace like a plain GET. The first miss of
 * a key queues one computation (an "entry"); every client asking meanwhile blocks on that entry.
 * keymiss workers register keyspaces (KEYMISS.REGISTER), take queued keys in batches with a lease
 * (KEYMISS.TAKE), and answer with KEYMISS.FILL (a plain SET, replicated as such) or KEYMISS.FAIL.
 * A client write to a key being computed resolves its entry at once (waiters read what the client
 * wrote) and the late fill is discarded. Where blocking is forbidden (MULTI, Lua, functions) a miss
 * queues the computation and answers nil. Everything here runs on the server's main thread.
 *
 * Freshness: a keyspace with STALE keeps serving a value past its TTL (its PX covers both) while one
 * refresh runs; one with EARLY (XFetch) may start one refresh of a hit before its TTL. A refresh is
 * an entry nobody waits on. A versioned keyspace (VERSION) serves a value only while its companion
 * key (keymiss:v:{<tag of the key's slot>}<key>, in the key's own slot) names the current version,
 * or marks a client's write; KEYMISS.VERSION switches it at run time, hiding every older value.
 */
#include "api.h"

#include <ctype.h>
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#define KM_VERSION 1
#define MAX_KEYSPACES 64
#define MAX_WORKERS 4096
#define MAX_ERROR_RECORDS 10000
#define MAX_ERROR_LEN 512
#define MAX_TAKE 10000
#define TICK_MS 50
#define DEFAULT_TIMEOUT_MS 65000
#define DEFAULT_QUEUE 10000
#define MAX_ATTEMPTS 3
#define MAX_GLOB 512
#define MAX_ROUTED_KEY (4 * 1024)
#define MAX_QUEUE 1000000
#define MAX_VERSION 256
#define MAX_BACKOFFS 10000
#define MAX_DIRTY 100000
#define CLIENT_MARK "client"
#define CLIENT_MARK_LEN 6
#define COMPANION_PREFIX "keymiss:v:{"
#define COMPANION_PREFIX_LEN 11

/* ---------------------------------------------------------------------------------------------- */
/* State                                                                                          */

typedef struct Request Request;
typedef struct Entry Entry;

typedef struct Keyspace {
    char *name; /* the pattern as the worker printed it */
    char *glob;
    size_t globlen;
    size_t prefixlen; /* literal head of the glob: a cheap first test */
    long long ttl_ms, error_ttl_ms, timeout_ms, queue_max;
    long long hits, misses, computations, fills, failures, timeouts, requeues, discarded, busy,
        no_worker, superseded;
    long long stale_ms, early_milli; /* STALE window; EARLY: XFetch's beta, in thousandths */
    char *version, *label;           /* the current version's tag and its name; NULL: unversioned */
    size_t versionlen;
    char *prev_version; /* the tag just replaced, served until prev_until (VSTALE); else NULL */
    size_t prev_versionlen;
    long long vstale_ms, prev_until, version_stale_hits;
    double mean_ms; /* take-to-fill time, smoothed: XFetch's compute time */
    long long stale_hits, early_refreshes, refresh_failures, version_misses, version_discards;
    long long queued, in_flight;
    int workers;
    Entry *qhead, *qtail; /* entries waiting to be taken, oldest first */
} Keyspace;

typedef struct Waiter {
    Request *req;
    int idx;
} Waiter;

enum { QUEUED = 0, TAKEN = 1 };

struct Entry {
    RedisModuleString *key; /* retained */
    int ks;
    int state;
    long long token;
    unsigned long long taker;
    long long lease_deadline, deadline;
    int attempts;
    int refresh; /* started by a hit (stale or early), not by a miss */
    long long taken_at;
    Waiter *waiters;
    int nwaiters, capwaiters;
    Entry *prev, *next; /* queue links while QUEUED */
};

/* A blocked GET (nkeys 1, single) or MGET: answered when every slot it waits on resolves. */
struct Request {
    RedisModuleBlockedClient *bc;
    int single;
    int nkeys;
    int pending;
    RedisModuleString **keys; /* retained */
    Entry **entries;          /* the entry each slot waits on, NULL once resolved */
    char **errors;            /* per slot, NULL unless its computation failed */
};

typedef struct Taker {
    RedisModuleBlockedClient *bc;
    unsigned long long client;
    uint64_t mask;
    long long count, lease_ms, deadline;
    struct Taker *next;
    int woken;
} Taker;

typedef struct Worker {
    unsigned long long client;
    uint64_t mask;
} Worker;

typedef struct ErrorRecord {
    char *msg;
    long long expires;
} ErrorRecord;

typedef struct Backoff { /* a key whose refresh failed: the next waits until `until` */
    long long until, wait;
} Backoff;

static Keyspace *keyspaces[MAX_KEYSPACES];
static int nkeyspaces;
static Worker workers[MAX_WORKERS];
static int nworkers;
static Taker *takers;
static RedisModuleDict *pending; /* key bytes -> Entry */
static RedisModuleDict *errors;  /* key bytes -> ErrorRecord */
static RedisModuleDict *backoffs; /* key bytes -> Backoff */
static RedisModuleDict *dirty;    /* keys of versioned keyspaces a client wrote: companions to rewrite */
static uint64_t rnd_state;        /* xorshift64*: XFetch's draws */
static uint16_t crc16tab[256];
static char slot_tags[16384][4]; /* for each slot, a short hash tag that lands in it */
static unsigned char slot_taglen[16384];
static long long next_token = 1; /* see new_token() */
static uint64_t token_key;        /* random at load: tokens cannot be guessed from one's own */
static long long waiting; /* blocked requests */
static int filling;       /* our own SET is running: its keyspace event is not a client's write */
static RedisModuleString *get_name, *mget_name;
static RedisModuleCtx *filter_ctx; /* database 0, for the filter's lookups */
static int lookup_modes;           /* what the filter's lookups may skip, as the server allows */

/* ---------------------------------------------------------------------------------------------- */
/* Globs: Redis's syntax (* ? [abc] [^a-z] \x), matched without recursion, O(len(glob)*len(key)).  */

/* A [...] class at *pp (on '['), as Redis reads one: `\x` escapes, `a-z` is a range whatever
 * follows it, and an unterminated class runs to the end of the glob. *pp ends on its last char. */
static int class_match(const char **pp, const char *end, unsigned char c) {
    const char *p = *pp + 1;
    int neg = 0, hit = 0;
    if (p < end && *p == '^') {
        neg = 1;
        p++;
    }
    for (;;) {
        if (p >= end) { /* unterminated: the class ends with the glob */
            p = end - 1;
            break;
        }
        if (*p == '\\' && end - p >= 2) {
            p++;
            if ((unsigned char)*p == c) hit = 1;
        } else if (*p == ']') {
            break;
        } else if (end - p >= 3 && p[1] == '-') {
            unsigned char lo = (unsigned char)p[0], hi = (unsigned char)p[2];
            if (lo > hi) {
                unsigned char t = lo;
                lo = hi;
                hi = t;
            }
            if (c >= lo && c <= hi) hit = 1;
            p += 2;
        } else if ((unsigned char)*p == c) {
            hit = 1;
        }
        p++;
    }
    *pp = p;
    return neg ? !hit : hit;
}

static int glob_match(const char *glob, size_t glen, const char *s, size_t slen) {
    const char *p = glob, *pend = glob + glen, *k = s, *kend = s + slen;
    const char *star_p = NULL, *star_k = NULL;
    while (k < kend) {
        if (p < pend) {
            if (*p == '*') {
                while (p < pend && *p == '*') p++;
                if (p == pend) return 1;
                star_p = p;
                star_k = k;
                continue;
            }
            if (*p == '?') {
                p++;
                k++;
                continue;
            }
            if (*p == '[') {
                const char *q = p;
                if (class_match(&q, pend, (unsigned char)*k)) {
                    p = q + 1;
                    k++;
                    continue;
                }
            } else {
                const char *q = p;
                if (*q == '\\' && q + 1 < pend) q++;
                if (*q == *k) {
                    p = q + 1;
                    k++;
                    continue;
                }
            }
        }
        if (star_p == NULL) return 0;
        p = star_p;
        k = ++star_k;
    }
    while (p < pend && *p == '*') p++;
    return p == pend;
}

static size_t glob_prefix_len(const char *glob, size_t len) {
    size_t i = 0;
    while (i < len && glob[i] != '*' && glob[i] != '?' && glob[i] != '[' && glob[i] != '\\') i++;
    return i;
}

/* The keyspace owning a key, or -1: the first registered that matches and has a worker, else the
 * first that matches (so a keyspace whose workers are gone never shadows a live one). Keys longer
 * than MAX_ROUTED_KEY are no keyspace's: matching costs glob length x key length on every GET. */
static int route(const char *key, size_t len) {
    int idle = -1;
    if (len > MAX_ROUTED_KEY) return -1;
    for (int i = 0; i < nkeyspaces; i++) {
        Keyspace *ks = keyspaces[i];
        if (ks->glob == NULL || len < ks->prefixlen || memcmp(key, ks->glob, ks->prefixlen) != 0) continue;
        if (glob_match(ks->glob, ks->globlen, key, len)) {
            if (ks->workers > 0) return i;
            if (idle < 0) idle = i;
        }
    }
    return idle;
}

static int route_str(const RedisModuleString *key) {
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    return route(p, len);
}

/* ---------------------------------------------------------------------------------------------- */
/* Small helpers                                                                                  */

/* Milliseconds on a clock that never steps back or jumps with the wall clock (deadlines, leases),
 * where the server offers one (Redis >= 7.0, Valkey); else wall-clock milliseconds. */
static long long now_ms(void) {
    return KM_MonotonicMicroseconds ? (long long)(KM_MonotonicMicroseconds() / 1000) : KM_Milliseconds();
}

static char *dup_bytes(const char *p, size_t len) {
    char *s = KM_Alloc(len + 1);
    memcpy(s, p, len);
    s[len] = '\0';
    return s;
}

/* An error line a client may receive: one line, a code in capitals first. */
static char *error_line(const char *msg, size_t len) {
    if (len > MAX_ERROR_LEN) len = MAX_ERROR_LEN;
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

static int worker_index(unsigned long long client) {
    for (int i = 0; i < nworkers; i++)
        if (workers[i].client == client) return i;
    return -1;
}

static void count_workers(void) {
    for (int k = 0; k < nkeyspaces; k++) keyspaces[k]->workers = 0;
    for (int i = 0; i < nworkers; i++)
        for (int k = 0; k < nkeyspaces; k++)
            if (workers[i].mask & ((uint64_t)1 << k)) keyspaces[k]->workers++;
}

/* ---------------------------------------------------------------------------------------------- */
/* Entries and their queue                                                                        */

static void queue_push(Entry *e, int front) {
    Keyspace *ks = keyspaces[e->ks];
    e->state = QUEUED;
    e->prev = e->next = NULL;
    if (ks->qhead == NULL) {
        ks->qhead = ks->qtail = e;
    } else if (front) {
        e->next = ks->qhead;
        ks->qhead->prev = e;
        ks->qhead = e;
    } else {
        e->prev = ks->qtail;
        ks->qtail->next = e;
        ks->qtail = e;
    }
    ks->queued++;
}

static void queue_unlink(Entry *e) {
    Keyspace *ks = keyspaces[e->ks];
    if (e->prev) e->prev->next = e->next;
    else ks->qhead = e->next;
    if (e->next) e->next->prev = e->prev;
    else ks->qtail = e->prev;
    e->prev = e->next = NULL;
    ks->queued--;
}

/* Wake one blocked taker that serves the entry's keyspace: its reply takes what is queued then. */
static void wake_taker(int ks) {
    Taker **pp = &takers;
    while (*pp) {
        Taker *t = *pp;
        if (!t->woken && (t->mask & ((uint64_t)1 << ks))) {
            *pp = t->next;
            t->next = NULL;
            t->woken = 1;
            KM_UnblockClient(t->bc, t);
            return;
        }
        pp = &t->next;
    }
}

/* A fresh token: a counter mixed with a secret (splitmix64), never 0, positive. */
static long long new_token(void) {
    uint64_t z = (uint64_t)(next_token++) + token_key;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    z &= 0x3fffffffffffffffULL;
    return z ? (long long)z : 1;
}

static Entry *entry_new(RedisModuleString *key, int ks, long long now) {
    Entry *e = KM_Calloc(1, sizeof(*e));
    e->key = KM_CreateStringFromString(NULL, key);
    e->ks = ks;
    e->token = new_token();
    e->deadline = now + keyspaces[ks]->timeout_ms;
    size_t len;
    const char *p = KM_StringPtrLen(e->key, &len);
    KM_DictSetC(pending, (void *)p, len, e);
    keyspaces[ks]->computations++;
    queue_push(e, 0);
    wake_taker(ks);
    return e;
}

static void entry_add_waiter(Entry *e, Request *req, int idx) {
    if (e->nwaiters == e->capwaiters) {
        e->capwaiters = e->capwaiters ? e->capwaiters * 2 : 4;
        e->waiters = KM_Realloc(e->waiters, sizeof(Waiter) * (size_t)e->capwaiters);
    }
    e->waiters[e->nwaiters].req = req;
    e->waiters[e->nwaiters].idx = idx;
    e->nwaiters++;
}

/* Every slot of `req` leaves `e`, in one pass over e's waiters (an MGET may name a key many times:
 * slot by slot this was quadratic). */
static void entry_drop_request(Entry *e, Request *req) {
    int n = 0;
    for (int i = 0; i < e->nwaiters; i++) {
        if (e->waiters[i].req == req) req->entries[e->waiters[i].idx] = NULL;
        else e->waiters[n++] = e->waiters[i];
    }
    e->nwaiters = n;
}

static RedisModuleDict *requests; /* blocked requests by handle (timeout and disconnect get no privdata) */

static void request_finish(Request *req) {
    waiting--;
    KM_DictDelC(requests, &req->bc, sizeof(req->bc), NULL);
    KM_UnblockClient(req->bc, req); /* the reply callback reads the keys now; free_request frees */
}

/* The computation of an entry is over: a value is in the keyspace (or a client wrote one), or it
 * failed with `err` (copied). Every waiter's slot resolves; the entry is gone afterwards. */
static void entry_resolve(Entry *e, const char *err) {
    Keyspace *ks = keyspaces[e->ks];
    size_t len;
    const char *p = KM_StringPtrLen(e->key, &len);
    KM_DictDelC(pending, (void *)p, len, NULL);
    if (e->state == QUEUED) queue_unlink(e);
    else ks->in_flight--;
    for (int i = 0; i < e->nwaiters; i++) {
        Request *req = e->waiters[i].req;
        int idx = e->waiters[i].idx;
        req->entries[idx] = NULL;
        if (err) req->errors[idx] = dup_bytes(err, strlen(err));
        if (--req->pending == 0) request_finish(req);
    }
    KM_Free(e->waiters);
    KM_FreeString(NULL, e->key);
    KM_Free(e);
}

static void entry_resolve(Entry *e, const char *err);

static void entry_requeue(Entry *e) {
    Keyspace *ks = keyspaces[e->ks];
    if (e->state != TAKEN) return;
    if (e->attempts >= MAX_ATTEMPTS) { /* a key that keeps losing its workers (or killing them) */
        char msg[MAX_ERROR_LEN];
        ks->failures++;
        snprintf(msg, sizeof(msg), "ERR keymiss: keyspace '%s' lost the key's computation %d times", ks->name,
                 e->attempts);
        entry_resolve(e, msg);
        return;
    }
    ks->in_flight--;
    ks->requeues++;
    e->taker = 0;
    e->token = new_token(); /* one taker at a time: the one whose lease passed can no longer fill */
    queue_push(e, 1);
    wake_taker(e->ks);
}

static Entry *entry_find(const RedisModuleString *key) {
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    return KM_DictGetC(pending, (void *)p, len, NULL);
}

/* ---------------------------------------------------------------------------------------------- */
/* Versions and freshness                                                                         */

/* Redis Cluster's key slot (CRC16/XMODEM of the hash tag, or of the whole key). */
static void crc16_init(void) {
    for (int i = 0; i < 256; i++) {
        uint16_t c = (uint16_t)(i << 8);
        for (int j = 0; j < 8; j++) c = (c & 0x8000) ? (uint16_t)((c << 1) ^ 0x1021) : (uint16_t)(c << 1);
        crc16tab[i] = c;
    }
}

static uint16_t crc16(const char *p, size_t len) {
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++)
        crc = (uint16_t)((crc << 8) ^ crc16tab[((crc >> 8) ^ (unsigned char)p[i]) & 0xff]);
    return crc;
}

static unsigned key_slot(const char *p, size_t len) {
    size_t s, e;
    for (s = 0; s < len && p[s] != '{'; s++) {
    }
    if (s == len) return crc16(p, len) & 16383;
    for (e = s + 1; e < len && p[e] != '}'; e++) {
    }
    if (e == len || e == s + 1) return crc16(p, len) & 16383;
    return crc16(p + s + 1, e - s - 1) & 16383;
}

/* For every slot, the first short base-36 string whose CRC16 lands in it (about 170,000 tries). */
static int slot_tags_init(void) {
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    int left = 16384;
    for (unsigned n = 0; left > 0 && n < 36u * 36 * 36 * 36; n++) {
        char buf[4];
        int len = 0;
        unsigned v = n;
        do {
            buf[len++] = digits[v % 36];
            v /= 36;
        } while (v && len < 4);
        unsigned s = crc16(buf, (size_t)len) & 16383;
        if (slot_taglen[s] == 0) {
            memcpy(slot_tags[s], buf, (size_t)len);
            slot_taglen[s] = (unsigned char)len;
            left--;
        }
    }
    return left == 0 ? RM_OK : RM_ERR;
}

/* keymiss:v:{<tag>}<key>: where a versioned value's version is kept, in the value's own slot. */
static RedisModuleString *companion_name(const RedisModuleString *key) {
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    unsigned s = key_slot(p, len);
    size_t tl = slot_taglen[s], n = COMPANION_PREFIX_LEN + tl + 1 + len;
    char *buf = KM_Alloc(n);
    memcpy(buf, COMPANION_PREFIX, COMPANION_PREFIX_LEN);
    memcpy(buf + COMPANION_PREFIX_LEN, slot_tags[s], tl);
    buf[COMPANION_PREFIX_LEN + tl] = '}';
    memcpy(buf + COMPANION_PREFIX_LEN + tl + 1, p, len);
    RedisModuleString *name = KM_CreateString(NULL, buf, n);
    KM_Free(buf);
    return name;
}

/* Whether the present value of `key` (of keyspace k) may be served: always in an unversioned
 * keyspace; in a versioned one when a client wrote it or its companion names the current version
 * (1), or names the version just replaced inside its VSTALE window (PREVIOUS: served, and the
 * caller starts its refresh). `count`: a refusal is counted (once per read, where it is answered). */
enum { PREVIOUS = 2 };
static int version_ok(RedisModuleCtx *ctx, int k, RedisModuleString *key, int count) {
    Keyspace *ks = keyspaces[k];
    if (ks->version == NULL) return 1;
    if (KM_DictSize(dirty)) {
        size_t len;
        const char *p = KM_StringPtrLen(key, &len);
        int nokey = 1;
        KM_DictGetC(dirty, (void *)p, len, &nokey);
        if (!nokey) return 1; /* a client's write, its companion not yet rewritten */
    }
    RedisModuleString *cname = companion_name(key);
    RedisModuleKey *c = KM_OpenKey(ctx, cname, RM_READ | lookup_modes);
    int ok = 0;
    if (c != NULL && KM_KeyType(c) == RM_KEYTYPE_STRING) {
        size_t vlen;
        const char *v = KM_StringDMA(c, &vlen, RM_READ);
        ok = v != NULL && ((vlen == ks->versionlen && memcmp(v, ks->version, vlen) == 0) ||
                           (vlen == CLIENT_MARK_LEN && memcmp(v, CLIENT_MARK, CLIENT_MARK_LEN) == 0));
        if (!ok && v != NULL && ks->prev_version != NULL && vlen == ks->prev_versionlen &&
            memcmp(v, ks->prev_version, vlen) == 0 && now_ms() < ks->prev_until)
            ok = PREVIOUS;
    }
    if (c) KM_CloseKey(c);
    KM_FreeString(NULL, cname);
    if (!ok && count) ks->version_misses++;
    return ok;
}

/* Uniform in (0, 1]. */
static double rnd_unit(void) {
    rnd_state ^= rnd_state >> 12;
    rnd_state ^= rnd_state << 25;
    rnd_state ^= rnd_state >> 27;
    return ((double)((rnd_state * 2685821657736338717ULL) >> 11) + 1.0) / 9007199254740992.0;
}

/* One background recomputation of a present key: none while one runs, while its last refresh's
 * backoff lasts, with no worker, or with the queue full (a refresh never refuses a reader). */
static void refresh(int k, RedisModuleString *key, long long now) {
    Keyspace *ks = keyspaces[k];
    if (ks->workers == 0 || entry_find(key) != NULL || ks->queued + ks->in_flight >= ks->queue_max) return;
    if (KM_DictSize(backoffs)) {
        size_t len;
        const char *p = KM_StringPtrLen(key, &len);
        Backoff *b = KM_DictGetC(backoffs, (void *)p, len, NULL);
        if (b != NULL && b->until > now) return;
    }
    Entry *e = entry_new(key, k, now);
    e->refresh = 1;
}

/* A value of the version just replaced was served inside VSTALE: it is recomputed under the new. */
static void served_previous(int k, RedisModuleString *key, int count) {
    if (count) keyspaces[k]->version_stale_hits++;
    refresh(k, key, now_ms());
}

/* A hit of keyspace k, `open` its key: past the TTL inside the stale window it is served stale and
 * refreshed; before the TTL, XFetch (Vattani, Chierichetti, Lowenstein, VLDB 2015) refreshes it
 * with probability growing as expiry nears, scaled by the keyspace's compute time, in the second
 * half of the value's life only (at most two computations per TTL). */
static void on_served(int k, RedisModuleKey *open, RedisModuleString *key) {
    Keyspace *ks = keyspaces[k];
    if ((ks->stale_ms == 0 && ks->early_milli == 0) || open == NULL) return;
    long long pttl = KM_GetExpire(open);
    if (pttl == RM_NO_EXPIRE || pttl < 0) return;
    long long remaining = pttl - ks->stale_ms, now = now_ms();
    if (ks->stale_ms > 0 && remaining <= 0) {
        ks->stale_hits++;
        refresh(k, key, now);
        return;
    }
    if (ks->early_milli == 0 || ks->mean_ms <= 0 || ks->ttl_ms <= 0 || remaining > ks->ttl_ms / 2) return;
    if (ks->mean_ms * (double)ks->early_milli / 1000.0 * -log(rnd_unit()) >= (double)remaining) {
        if (ks->workers > 0 && entry_find(key) == NULL) ks->early_refreshes++;
        refresh(k, key, now);
    }
}

/* A refresh failed: the next waits 1 s, doubling to 60 s; the stale value is served meanwhile. */
static void backoff_note(const RedisModuleString *key, long long now) {
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    Backoff *b = KM_DictGetC(backoffs, (void *)p, len, NULL);
    if (b == NULL) {
        if (KM_DictSize(backoffs) >= MAX_BACKOFFS) return; /* bounded: this key may retry sooner */
        b = KM_Calloc(1, sizeof(*b));
        b->wait = 1000;
        KM_DictSetC(backoffs, (void *)p, len, b);
    } else {
        b->wait = b->wait * 2 > 60000 ? 60000 : b->wait * 2;
    }
    b->until = now + b->wait;
}

static void backoff_clear(const RedisModuleString *key) {
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    Backoff *b = NULL;
    if (KM_DictDelC(backoffs, (void *)p, len, &b) == RM_OK) KM_Free(b);
}

/* Keys a client wrote in a versioned keyspace: their companion now marks a client's write (which
 * every version serves), with the value's TTL; a deleted or expired key's companion goes. Run from
 * the timer, where writes are allowed (not from the keyspace event that noted the key). */
static void rewrite_companions(RedisModuleCtx *ctx) {
    size_t n = 0, cap = 0;
    char **keys = NULL;
    size_t *lens = NULL;
    RedisModuleDictIter *it = KM_DictIteratorStartC(dirty, "^", NULL, 0);
    char *k;
    size_t klen;
    while ((k = KM_DictNextC(it, &klen, NULL)) != NULL) {
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            keys = KM_Realloc(keys, sizeof(char *) * cap);
            lens = KM_Realloc(lens, sizeof(size_t) * cap);
        }
        keys[n] = dup_bytes(k, klen);
        lens[n++] = klen;
    }
    KM_DictIteratorStop(it);
    int replica = (KM_GetContextFlags(ctx) & RM_CTX_FLAGS_SLAVE) != 0; /* its master does this */
    if (!replica && KM_SelectDb(ctx, 0) != RM_OK) replica = 1;
    for (size_t i = 0; i < n; i++) {
        KM_DictDelC(dirty, keys[i], lens[i], NULL);
        if (replica) {
            KM_Free(keys[i]);
            continue;
        }
        RedisModuleString *key = KM_CreateString(NULL, keys[i], lens[i]);
        RedisModuleString *cname = companion_name(key);
        RedisModuleKey *open = KM_OpenKey(ctx, key, RM_READ | lookup_modes);
        int present = open != NULL && KM_KeyType(open) != RM_KEYTYPE_EMPTY;
        long long pttl = present ? KM_GetExpire(open) : RM_NO_EXPIRE;
        if (open) KM_CloseKey(open);
        filling = 1;
        RedisModuleCallReply *r;
        if (!present) r = KM_Call(ctx, "DEL", "!s", cname);
        else if (pttl > 0) r = KM_Call(ctx, "SET", "!sccl", cname, CLIENT_MARK, "PX", pttl);
        else r = KM_Call(ctx, "SET", "!sc", cname, CLIENT_MARK);
        filling = 0;
        if (r == NULL || KM_CallReplyType(r) == RM_REPLY_ERROR) /* the value then reads as a miss */
            KM_Log(ctx, "warning", "keymiss: could not mark a client's write to a versioned key");
        if (r) KM_FreeCallReply(r);
        KM_FreeString(NULL, cname);
        KM_FreeString(NULL, key);
        KM_Free(keys[i]);
    }
    KM_Free(keys);
    KM_Free(lens);
}

/* Backoffs whose wait is long over are forgotten. */
static void purge_backoffs(long long now) {
    size_t n = 0, cap = 0;
    char **keys = NULL;
    size_t *lens = NULL;
    RedisModuleDictIter *it = KM_DictIteratorStartC(backoffs, "^", NULL, 0);
    char *k;
    size_t klen;
    Backoff *b;
    while ((k = KM_DictNextC(it, &klen, (void **)&b)) != NULL) {
        if (b->until + 60000 > now) continue;
        if (n == cap) {
            cap = cap ? cap * 2 : 16;
            keys = KM_Realloc(keys, sizeof(char *) * cap);
            lens = KM_Realloc(lens, sizeof(size_t) * cap);
        }
        keys[n] = dup_bytes(k, klen);
        lens[n++] = klen;
    }
    KM_DictIteratorStop(it);
    for (size_t i = 0; i < n; i++) {
        Backoff *old = NULL;
        if (KM_DictDelC(backoffs, keys[i], lens[i], &old) == RM_OK) KM_Free(old);
        KM_Free(keys[i]);
    }
    KM_Free(keys);
    KM_Free(lens);
}

/* ---------------------------------------------------------------------------------------------- */
/* Error records (a keyspace's error TTL)                                                         */

static void error_forget(const char *p, size_t len) {
    ErrorRecord *r = NULL;
    if (KM_DictDelC(errors, (void *)p, len, &r) == RM_OK && r) {
        KM_Free(r->msg);
        KM_Free(r);
    }
}

static void error_remember(const RedisModuleString *key, const char *msg, long long ttl_ms, long long now) {
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    error_forget(p, len);
    if (KM_DictSize(errors) >= MAX_ERROR_RECORDS) return; /* bounded: a flood of failures is not kept */
    ErrorRecord *r = KM_Alloc(sizeof(*r));
    r->msg = dup_bytes(msg, strlen(msg));
    r->expires = now + ttl_ms;
    KM_DictSetC(errors, (void *)p, len, r);
}

static const char *error_fresh(const RedisModuleString *key, long long now) {
    if (KM_DictSize(errors) == 0) return NULL;
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    ErrorRecord *r = KM_DictGetC(errors, (void *)p, len, NULL);
    if (r == NULL) return NULL;
    if (r->expires <= now) {
        error_forget(p, len);
        return NULL;
    }
    return r->msg;
}

/* ---------------------------------------------------------------------------------------------- */
/* GET / MGET                                                                                     */

/* Reply with the key's current value, read by the server's own GET (the filter leaves the module's
 * calls alone): bulk, nil, or for GET a WRONGTYPE error (an MGET reads another type as nil).
 * Reading through the module key API instead would rewrite small values' encoding on every read. */
static void reply_value(RedisModuleCtx *ctx, RedisModuleString *key, int single) {
    RedisModuleCallReply *r = KM_Call(ctx, "GET", "s", key);
    if (r == NULL) KM_ReplyWithNull(ctx);
    else if (KM_CallReplyType(r) == RM_REPLY_ERROR && !single) KM_ReplyWithNull(ctx);
    else KM_ReplyWithCallReply(ctx, r);
    if (r) KM_FreeCallReply(r);
}

/* 1 if the key holds a value (of any type), 0 if it is missing. */
static int key_exists(RedisModuleCtx *ctx, RedisModuleString *key) {
    RedisModuleKey *k = KM_OpenKey(ctx, key, RM_READ | lookup_modes);
    int present = k != NULL && KM_KeyType(k) != RM_KEYTYPE_EMPTY;
    if (k) KM_CloseKey(k);
    return present;
}

static void reply_key(RedisModuleCtx *ctx, RedisModuleKey *k, RedisModuleString *key, int single) {
    if (k) KM_CloseKey(k);
    reply_value(ctx, key, single);
}

static void free_request(RedisModuleCtx *ctx, void *privdata) {
    (void)ctx;
    Request *req = privdata;
    if (req == NULL) return;
    for (int i = 0; i < req->nkeys; i++) {
        KM_FreeString(NULL, req->keys[i]);
        KM_Free(req->errors[i]);
    }
    KM_Free(req->keys);
    KM_Free(req->entries);
    KM_Free(req->errors);
    KM_Free(req);
}

static int request_reply(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    Request *req = KM_GetBlockedClientPrivateData(ctx);
    if (!req->single) KM_ReplyWithArray(ctx, req->nkeys);
    for (int i = 0; i < req->nkeys; i++) {
        /* an empty error: a value of another version, not to be read (nil) */
        if (req->errors[i] && req->errors[i][0] && req->single) KM_ReplyWithError(ctx, req->errors[i]);
        else if (req->errors[i]) KM_ReplyWithNull(ctx); /* MGET: a failed key reads as missing */
        else reply_value(ctx, req->keys[i], req->single);
    }
    return RM_OK;
}

/* Stop waiting: the client timed out or went away. Its slots leave their entries, which go on. */
static void request_abandon(Request *req) {
    for (int i = 0; i < req->nkeys; i++)
        if (req->entries[i]) entry_drop_request(req->entries[i], req);
    req->pending = 0;
    waiting--;
    KM_UnblockClient(req->bc, req); /* frees it: no reply is sent to a client no longer blocked */
}

static Request *blocked_request(RedisModuleCtx *ctx);

static int request_timeout(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    Request *req = blocked_request(ctx);
    const char *name = "?";
    if (req) {
        int ks = route_str(req->keys[0]);
        if (ks >= 0) name = keyspaces[ks]->name;
        request_abandon(req);
    }
    char msg[MAX_ERROR_LEN];
    snprintf(msg, sizeof(msg), "ERR keymiss: timed out waiting for keyspace '%s'", name);
    return KM_ReplyWithError(ctx, msg);
}

static Request *blocked_request(RedisModuleCtx *ctx) {
    RedisModuleBlockedClient *bc = KM_GetBlockedClientHandle(ctx);
    Request *req = NULL;
    if (bc && KM_DictDelC(requests, &bc, sizeof(bc), &req) != RM_OK) req = NULL;
    return req;
}

static void request_disconnected(RedisModuleCtx *ctx, RedisModuleBlockedClient *bc) {
    (void)ctx;
    Request *req = NULL;
    if (KM_DictDelC(requests, &bc, sizeof(bc), &req) == RM_OK && req) request_abandon(req);
}

static void no_worker_error(RedisModuleCtx *ctx, Keyspace *ks) {
    char msg[MAX_ERROR_LEN];
    ks->no_worker++;
    snprintf(msg, sizeof(msg), "ERR keymiss: no worker for keyspace '%s'", ks->name);
    KM_ReplyWithError(ctx, msg);
}

static void busy_error(RedisModuleCtx *ctx, Keyspace *ks) {
    char msg[MAX_ERROR_LEN];
    ks->busy++;
    snprintf(msg, sizeof(msg), "BUSY keymiss: the queue of keyspace '%s' is full (%lld)", ks->name,
             ks->queue_max);
    KM_ReplyWithError(ctx, msg);
}

/* The shared body of KEYMISS.GET and KEYMISS.MGET. */
static int serve(RedisModuleCtx *ctx, RedisModuleString **keys, int nkeys, int single) {
    int flags = KM_GetContextFlags(ctx);
    int plain = KM_GetSelectedDb(ctx) != 0 || (flags & (RM_CTX_FLAGS_SLAVE | RM_CTX_FLAGS_LOADING));
    int can_block = !(flags & (RM_CTX_FLAGS_DENY_BLOCKING | RM_CTX_FLAGS_MULTI | RM_CTX_FLAGS_LUA));
    if (single) { /* the common case: one lookup for a hit */
        int k = plain ? -1 : route_str(keys[0]);
        RedisModuleKey *key = KM_OpenKey(ctx, keys[0], RM_READ);
        int ok = k < 0 ? 1 : key != NULL && KM_KeyType(key) != RM_KEYTYPE_EMPTY ? version_ok(ctx, k, keys[0], 1) : 0;
        if (ok) {
            if (k >= 0) {
                keyspaces[k]->hits++;
                if (ok == PREVIOUS) served_previous(k, keys[0], 1);
                on_served(k, key, keys[0]);
            }
            reply_key(ctx, key, keys[0], 1);
            return RM_OK;
        }
        if (key) KM_CloseKey(key);
    }
    long long now = now_ms();
    Request *req = NULL;
    /* First pass: hits, errors, and what must be computed. Nothing is queued unless the whole
     * command can be served (a no-worker or full-queue key refuses a GET; an MGET reads it as nil). */
    int *ksof = KM_Alloc(sizeof(int) * (size_t)nkeys);
    char *hidden = KM_Calloc((size_t)nkeys, 1); /* present, but computed under another version */
    int misses = 0;
    for (int i = 0; i < nkeys; i++) {
        ksof[i] = plain ? -1 : route_str(keys[i]);
        if (ksof[i] < 0) continue;
        if (!single) {
            RedisModuleKey *open = KM_OpenKey(ctx, keys[i], RM_READ);
            int hit = open != NULL && KM_KeyType(open) != RM_KEYTYPE_EMPTY ? version_ok(ctx, ksof[i], keys[i], 1) : 0;
            if (hit) {
                keyspaces[ksof[i]]->hits++;
                if (hit == PREVIOUS) served_previous(ksof[i], keys[i], 1);
                on_served(ksof[i], open, keys[i]);
            }
            if (open) KM_CloseKey(open);
            if (hit) {
                ksof[i] = -1;
                continue;
            }
        }
        hidden[i] = keyspaces[ksof[i]]->version != NULL && key_exists(ctx, keys[i]);
        keyspaces[ksof[i]]->misses++;
        misses++;
    }
    if (misses == 0) {
        KM_Free(ksof);
        KM_Free(hidden);
        if (!single) KM_ReplyWithArray(ctx, nkeys);
        for (int i = 0; i < nkeys; i++) reply_value(ctx, keys[i], single);
        return RM_OK;
    }
    char **errs = KM_Calloc((size_t)nkeys, sizeof(char *));
    Entry **ents = KM_Calloc((size_t)nkeys, sizeof(Entry *));
    int waits = 0;
    for (int i = 0; i < nkeys; i++) {
        if (ksof[i] < 0) continue;
        Keyspace *ks = keyspaces[ksof[i]];
        const char *rec = error_fresh(keys[i], now);
        if (rec) {
            errs[i] = dup_bytes(rec, strlen(rec));
            continue;
        }
        Entry *e = entry_find(keys[i]);
        if (e == NULL) {
            if (ks->workers == 0) {
                if (single) {
                    no_worker_error(ctx, ks);
                    goto done;
                }
                ks->no_worker++;
                continue;
            }
            if (ks->queued + ks->in_flight >= ks->queue_max) {
                /* where blocking is forbidden (MULTI, Lua) a miss reads as nil, a full queue too:
                 * an error would abort a script part-way through its writes */
                if (single && can_block) {
                    busy_error(ctx, ks);
                    goto done;
                }
                ks->busy++;
                continue;
            }
            e = entry_new(keys[i], ksof[i], now);
        }
        ents[i] = e;
        waits++;
    }
    for (int i = 0; i < nkeys; i++) /* not computing: an old version's value still reads as nil */
        if (hidden[i] && ents[i] == NULL && errs[i] == NULL) errs[i] = dup_bytes("", 0);
    if (waits == 0 || !can_block) {
        /* Nothing to wait for, or waiting is forbidden here: the computations stay queued. */
        if (!single) KM_ReplyWithArray(ctx, nkeys);
        for (int i = 0; i < nkeys; i++) {
            if (errs[i] && errs[i][0] && single) KM_ReplyWithError(ctx, errs[i]);
            else if (errs[i] || ents[i]) KM_ReplyWithNull(ctx);
            else reply_value(ctx, keys[i], single);
        }
        goto done;
    }
    req = KM_Calloc(1, sizeof(*req));
    req->single = single;
    req->nkeys = nkeys;
    req->pending = waits;
    req->keys = KM_Alloc(sizeof(RedisModuleString *) * (size_t)nkeys);
    req->entries = ents;
    req->errors = errs;
    ents = NULL;
    errs = NULL;
    for (int i = 0; i < nkeys; i++) {
        req->keys[i] = KM_CreateStringFromString(NULL, keys[i]);
        if (req->entries[i]) entry_add_waiter(req->entries[i], req, i);
    }
    /* No server timeout: every entry has a deadline the tick enforces, which answers the request.
     * (Redis 7.0 drops the reply of a client unblocked in the loop iteration its server timeout
     * comes due.) The timeout callback still serves CLIENT UNBLOCK. */
    req->bc = KM_BlockClient(ctx, request_reply, request_timeout, free_request, 0);
    if (req->bc == NULL) { /* cannot happen where blocking is allowed; answer nil rather than hang */
        for (int i = 0; i < nkeys; i++)
            if (req->entries[i]) entry_drop_request(req->entries[i], req);
        free_request(ctx, req);
        if (!single) KM_ReplyWithArray(ctx, nkeys);
        for (int i = 0; i < nkeys; i++) KM_ReplyWithNull(ctx);
        goto done;
    }
    KM_SetDisconnectCallback(req->bc, request_disconnected);
    KM_DictSetC(requests, &req->bc, sizeof(req->bc), req);
    waiting++;
done:
    if (errs)
        for (int i = 0; i < nkeys; i++) KM_Free(errs[i]);
    KM_Free(errs);
    KM_Free(ents);
    KM_Free(ksof);
    KM_Free(hidden);
    return RM_OK;
}

static int cmd_get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 2) return KM_WrongArity(ctx);
    return serve(ctx, argv + 1, 1, 1);
}

static int cmd_mget(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 2) return KM_WrongArity(ctx);
    return serve(ctx, argv + 1, argc - 1, 0);
}

/* ---------------------------------------------------------------------------------------------- */
/* Workers: REGISTER, TAKE, FILL, FAIL                                                            */

static int parse_ms(RedisModuleString *s, long long *out, long long min) {
    long long v;
    if (KM_StringToLongLong(s, &v) != RM_OK || v < min || v > 365LL * 24 * 3600 * 1000) return RM_ERR;
    *out = v;
    return RM_OK;
}

/* A version tag or label as given: 1 to MAX_VERSION bytes, no NUL; a copy (NULL if refused). */
static char *version_arg(RedisModuleString *s, size_t *len) {
    const char *p = KM_StringPtrLen(s, len);
    if (*len == 0 || *len > MAX_VERSION || memchr(p, '\0', *len)) return NULL;
    return dup_bytes(p, *len);
}

/* The keyspace's version from now on (NULL: unversioned). A switch keeps the replaced tag for the
 * VSTALE window, when one is set; only the version just replaced is kept. */
static void set_version(Keyspace *ks, char *tag, size_t taglen, char *label) {
    int same = tag != NULL && ks->version != NULL && taglen == ks->versionlen && memcmp(tag, ks->version, taglen) == 0;
    if (!same) {
        KM_Free(ks->prev_version);
        ks->prev_version = NULL;
        if (tag != NULL && ks->version != NULL && ks->vstale_ms > 0) {
            ks->prev_version = ks->version;
            ks->prev_versionlen = ks->versionlen;
            ks->prev_until = now_ms() + ks->vstale_ms;
            ks->version = NULL;
        }
    }
    KM_Free(ks->version);
    KM_Free(ks->label);
    ks->version = tag;
    ks->versionlen = taglen;
    ks->label = label;
}

/* KEYMISS.REGISTER name glob [TTL ms] [ERRTTL ms] [TIMEOUT ms] [QUEUE n] [STALE ms] [EARLY beta-thousandths]
 *                  [VERSION tag] [LABEL name]
 * Declares (or updates) a keyspace and counts this connection among its workers. */
static int cmd_register(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 3 || (argc - 3) % 2) return KM_WrongArity(ctx);
    size_t nlen, glen;
    const char *name = KM_StringPtrLen(argv[1], &nlen);
    const char *glob = KM_StringPtrLen(argv[2], &glen);
    if (nlen == 0 || glen == 0 || nlen > MAX_GLOB || glen > MAX_GLOB || memchr(name, '\0', nlen) ||
        memchr(glob, '\0', glen))
        return KM_ReplyWithError(ctx, "ERR keymiss: a keyspace needs a name and a glob (1 to 512 bytes)");
    long long ttl = 0, errttl = 0, timeout = DEFAULT_TIMEOUT_MS, queue = DEFAULT_QUEUE, stale = 0, early = 0,
              vstale = 0;
    char *tag = NULL, *label = NULL;
    size_t taglen = 0, labellen = 0;
    for (int i = 3; i < argc; i += 2) {
        size_t olen;
        const char *opt = KM_StringPtrLen(argv[i], &olen);
        int ok;
        if (olen == 7 && strncasecmp(opt, "VERSION", 7) == 0) {
            KM_Free(tag);
            tag = version_arg(argv[i + 1], &taglen);
            ok = tag ? RM_OK : RM_ERR;
        } else if (olen == 5 && strncasecmp(opt, "LABEL", 5) == 0) {
            KM_Free(label);
            label = version_arg(argv[i + 1], &labellen);
            ok = label ? RM_OK : RM_ERR;
        } else if (olen == 5 && strncasecmp(opt, "STALE", 5) == 0) ok = parse_ms(argv[i + 1], &stale, 0);
        else if (olen == 6 && strncasecmp(opt, "VSTALE", 6) == 0) ok = parse_ms(argv[i + 1], &vstale, 0);
        else if (olen == 5 && strncasecmp(opt, "EARLY", 5) == 0)
            ok = parse_ms(argv[i + 1], &early, 0) == RM_OK && early <= 1000000 ? RM_OK : RM_ERR;
        else if (olen == 3 && strncasecmp(opt, "TTL", 3) == 0) ok = parse_ms(argv[i + 1], &ttl, 0);
        else if (olen == 6 && strncasecmp(opt, "ERRTTL", 6) == 0) ok = parse_ms(argv[i + 1], &errttl, 0);
        else if (olen == 7 && strncasecmp(opt, "TIMEOUT", 7) == 0) ok = parse_ms(argv[i + 1], &timeout, 1);
        else if (olen == 5 && strncasecmp(opt, "QUEUE", 5) == 0)
            ok = parse_ms(argv[i + 1], &queue, 1) == RM_OK && queue <= MAX_QUEUE ? RM_OK : RM_ERR;
        else {
            KM_Free(tag);
            KM_Free(label);
            return KM_ReplyWithError(
                ctx, "ERR keymiss: unknown option (TTL, ERRTTL, TIMEOUT, QUEUE, STALE, EARLY, VERSION, LABEL, VSTALE)");
        }
        if (ok != RM_OK) {
            KM_Free(tag);
            KM_Free(label);
            return KM_ReplyWithError(ctx, "ERR keymiss: an option's value is not valid");
        }
    }
    if ((label != NULL || vstale > 0) && tag == NULL) {
        KM_Free(label);
        return KM_ReplyWithError(ctx, "ERR keymiss: LABEL and VSTALE need a VERSION");
    }
    int k;
    for (k = 0; k < nkeyspaces; k++)
        if (strlen(keyspaces[k]->name) == nlen && memcmp(keyspaces[k]->name, name, nlen) == 0) break;
    unsigned long long client = KM_GetClientId(ctx);
    int w = worker_index(client);
    const char *refused = NULL;
    if (w < 0 && nworkers == MAX_WORKERS) {
        refused = "ERR keymiss: too many workers";
        goto refuse;
    }
    if (k == nkeyspaces) {
        if (nkeyspaces == MAX_KEYSPACES) {
            /* full: take the place of a keyspace no worker serves and nothing waits on */
            for (k = 0; k < nkeyspaces; k++)
                if (keyspaces[k]->workers == 0 && keyspaces[k]->queued == 0 && keyspaces[k]->in_flight == 0)
                    break;
            if (k == nkeyspaces) {
                refused = "ERR keymiss: too many keyspaces (64)";
                goto refuse;
            }
            KM_Free(keyspaces[k]->name);
            KM_Free(keyspaces[k]->glob);
            KM_Free(keyspaces[k]->version);
            KM_Free(keyspaces[k]->label);
            KM_Free(keyspaces[k]->prev_version);
            memset(keyspaces[k], 0, sizeof(Keyspace));
        } else {
            keyspaces[k] = KM_Calloc(1, sizeof(Keyspace));
            nkeyspaces++;
        }
        keyspaces[k]->name = dup_bytes(name, nlen);
    }
    Keyspace *ks = keyspaces[k];
    int others = ks->workers - (w >= 0 && (workers[w].mask & ((uint64_t)1 << k)) ? 1 : 0);
    if (ks->glob != NULL && (ks->globlen != glen || memcmp(ks->glob, glob, glen) != 0) && others > 0) {
        refused = "ERR keymiss: the keyspace is served by live workers with another glob";
        goto refuse;
    }
    if (ks->glob == NULL || ks->globlen != glen || memcmp(ks->glob, glob, glen) != 0) {
        KM_Free(ks->glob);
        ks->glob = dup_bytes(glob, glen);
        ks->globlen = glen;
        ks->prefixlen = glob_prefix_len(glob, glen);
    }
    ks->ttl_ms = ttl;
    ks->error_ttl_ms = errttl;
    ks->timeout_ms = timeout;
    ks->queue_max = queue;
    ks->stale_ms = stale;
    ks->early_milli = early;
    ks->vstale_ms = vstale;
    set_version(ks, tag, taglen, label ? label : (tag ? dup_bytes(tag, taglen) : NULL));
    if (w < 0) {
        w = nworkers++;
        workers[w].client = client;
        workers[w].mask = 0;
    }
    workers[w].mask |= (uint64_t)1 << k;
    count_workers();
    return KM_ReplyWithSimpleString(ctx, "OK");
refuse:
    KM_Free(tag);
    KM_Free(label);
    return KM_ReplyWithError(ctx, refused);
}

/* KEYMISS.VERSION name tag [label]: the version a registered keyspace's values are served under
 * from now on (an application switched models). Every value computed under another is hidden at
 * once; no key is deleted. Does not make this connection a worker. */
static int cmd_version(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3 && argc != 4) return KM_WrongArity(ctx);
    size_t nlen;
    const char *name = KM_StringPtrLen(argv[1], &nlen);
    int k;
    for (k = 0; k < nkeyspaces; k++)
        if (strlen(keyspaces[k]->name) == nlen && memcmp(keyspaces[k]->name, name, nlen) == 0) break;
    if (k == nkeyspaces) return KM_ReplyWithError(ctx, "ERR keymiss: no such keyspace is registered");
    size_t taglen, labellen;
    char *tag = version_arg(argv[2], &taglen);
    char *label = argc == 4 ? version_arg(argv[3], &labellen) : (tag ? dup_bytes(tag, taglen) : NULL);
    if (tag == NULL || label == NULL) {
        KM_Free(tag);
        KM_Free(label);
        return KM_ReplyWithError(ctx, "ERR keymiss: a version is 1 to 256 bytes");
    }
    set_version(keyspaces[k], tag, taglen, label);
    return KM_ReplyWithSimpleString(ctx, "OK");
}

/* Take up to t->count queued keys of the worker's keyspaces: a flat array of key, token pairs. */
static void reply_taken(RedisModuleCtx *ctx, uint64_t mask, long long count, long long lease_ms,
                        unsigned long long client) {
    long long now = now_ms(), n = 0;
    KM_ReplyWithArray(ctx, -1 /* postponed */);
    for (int k = 0; k < nkeyspaces && n < count; k++) {
        if (!(mask & ((uint64_t)1 << k))) continue;
        Keyspace *ks = keyspaces[k];
        while (ks->qhead && n < count) {
            Entry *e = ks->qhead;
            queue_unlink(e);
            e->state = TAKEN;
            e->taker = client;
            e->lease_deadline = now + lease_ms;
            e->taken_at = now;
            e->attempts++;
            ks->in_flight++;
            KM_ReplyWithString(ctx, e->key);
            KM_ReplyWithLongLong(ctx, e->token);
            n++;
        }
    }
    KM_ReplySetArrayLength(ctx, n * 2);
}

static int take_reply(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    Taker *t = KM_GetBlockedClientPrivateData(ctx);
    int w = worker_index(t->client);
    reply_taken(ctx, w < 0 ? 0 : workers[w].mask, t->count, t->lease_ms, t->client);
    return RM_OK;
}

static void takers_unlink(Taker *t) {
    for (Taker **pp = &takers; *pp; pp = &(*pp)->next) {
        if (*pp == t) {
            *pp = t->next;
            return;
        }
    }
}

static Taker *taker_of(RedisModuleBlockedClient *bc) {
    for (Taker *t = takers; t; t = t->next)
        if (t->bc == bc) return t;
    return NULL;
}

static int take_timeout(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    Taker *t = taker_of(KM_GetBlockedClientHandle(ctx));
    if (t) {
        takers_unlink(t);
        t->woken = 1;
        KM_UnblockClient(t->bc, t);
    }
    return KM_ReplyWithArray(ctx, 0);
}

static void take_disconnected(RedisModuleCtx *ctx, RedisModuleBlockedClient *bc) {
    (void)ctx;
    Taker *t = taker_of(bc);
    if (t) {
        takers_unlink(t);
        t->woken = 1;
        KM_UnblockClient(t->bc, t);
    }
}

static void free_taker(RedisModuleCtx *ctx, void *privdata) {
    (void)ctx;
    KM_Free(privdata);
}

/* KEYMISS.TAKE count block-ms lease-ms: queued keys of this worker's keyspaces, waiting up to
 * block-ms for one. A key not filled or failed within lease-ms goes back to the queue. */
static int cmd_take(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 4) return KM_WrongArity(ctx);
    long long count, block_ms, lease_ms;
    if (KM_StringToLongLong(argv[1], &count) != RM_OK || count < 1 || count > MAX_TAKE ||
        parse_ms(argv[2], &block_ms, 0) != RM_OK || parse_ms(argv[3], &lease_ms, 1) != RM_OK)
        return KM_ReplyWithError(ctx, "ERR keymiss: TAKE count (1-10000) block-ms lease-ms");
    unsigned long long client = KM_GetClientId(ctx);
    int w = worker_index(client);
    if (w < 0) return KM_ReplyWithError(ctx, "ERR keymiss: REGISTER a keyspace on this connection first");
    uint64_t mask = workers[w].mask;
    int ready = 0;
    for (int k = 0; k < nkeyspaces; k++)
        if ((mask & ((uint64_t)1 << k)) && keyspaces[k]->qhead) ready = 1;
    int flags = KM_GetContextFlags(ctx);
    if (ready || block_ms == 0 || (flags & (RM_CTX_FLAGS_DENY_BLOCKING | RM_CTX_FLAGS_MULTI | RM_CTX_FLAGS_LUA))) {
        reply_taken(ctx, mask, count, lease_ms, client);
        return RM_OK;
    }
    Taker *t = KM_Calloc(1, sizeof(*t));
    t->client = client;
    t->mask = mask;
    t->count = count;
    t->lease_ms = lease_ms;
    t->deadline = now_ms() + block_ms; /* the tick answers it then (no server timeout) */
    t->bc = KM_BlockClient(ctx, take_reply, take_timeout, free_taker, 0);
    if (t->bc == NULL) {
        KM_Free(t);
        return KM_ReplyWithArray(ctx, 0);
    }
    KM_SetDisconnectCallback(t->bc, take_disconnected);
    t->next = takers;
    takers = t;
    return RM_OK;
}

static int parse_token(RedisModuleString *s, long long *out) {
    return KM_StringToLongLong(s, out) == RM_OK && *out > 0 ? RM_OK : RM_ERR;
}

/* KEYMISS.FILL key token value [PX ms] [VERSION tag]: store the computed value (a plain SET,
 * replicated as such; a versioned keyspace's companion first) and wake the key's waiters. 1 if
 * stored; 0 if discarded (a client wrote the key meanwhile, the computation was given up, or it
 * ran under another version than the keyspace's now: then the key is computed again). */
static int cmd_fill(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 4 || argc % 2) return KM_WrongArity(ctx);
    long long token, px = 0;
    const char *vtag = NULL;
    size_t vlen = 0;
    if (parse_token(argv[2], &token) != RM_OK) return KM_ReplyWithError(ctx, "ERR keymiss: bad token");
    for (int i = 4; i < argc; i += 2) {
        size_t olen;
        const char *opt = KM_StringPtrLen(argv[i], &olen);
        if (olen == 2 && strncasecmp(opt, "PX", 2) == 0 && parse_ms(argv[i + 1], &px, 1) == RM_OK) continue;
        if (olen == 7 && strncasecmp(opt, "VERSION", 7) == 0) {
            vtag = KM_StringPtrLen(argv[i + 1], &vlen);
            continue;
        }
        return KM_ReplyWithError(ctx, "ERR keymiss: FILL key token value [PX ms] [VERSION tag]");
    }
    Entry *e = entry_find(argv[1]);
    if (e == NULL || e->token != token) {
        int ks = route_str(argv[1]);
        if (ks >= 0) keyspaces[ks]->discarded++;
        return KM_ReplyWithLongLong(ctx, 0);
    }
    Keyspace *ks = keyspaces[e->ks];
    if (ks->version != NULL && (vtag == NULL || vlen != ks->versionlen || memcmp(vtag, ks->version, vlen) != 0)) {
        ks->version_discards++; /* computed under the version before a switch: computed again */
        if (e->state == TAKEN) {
            ks->in_flight--;
            e->taker = 0;
            e->token = new_token();
            queue_push(e, 1);
            wake_taker(e->ks);
        }
        return KM_ReplyWithLongLong(ctx, 0);
    }
    if (px == 0) px = ks->ttl_ms;
    /* Keyspaces live in database 0, whichever database the worker's connection selected. */
    int db = KM_GetSelectedDb(ctx);
    if (db != 0 && KM_SelectDb(ctx, 0) != RM_OK) return KM_ReplyWithError(ctx, "ERR keymiss: cannot select db 0");
    filling = 1;
    RedisModuleCallReply *r = NULL;
    if (ks->version != NULL) {
        RedisModuleString *cname = companion_name(argv[1]);
        r = px > 0 ? KM_Call(ctx, "SET", "!sbcl", cname, ks->version, ks->versionlen, "PX", px)
                   : KM_Call(ctx, "SET", "!sb", cname, ks->version, ks->versionlen);
        KM_FreeString(NULL, cname);
        if (r != NULL && KM_CallReplyType(r) != RM_REPLY_ERROR) {
            KM_FreeCallReply(r);
            r = NULL;
        }
    }
    if (r == NULL)
        r = px > 0 ? KM_Call(ctx, "SET", "!sscl", argv[1], argv[3], "PX", px)
                   : KM_Call(ctx, "SET", "!ss", argv[1], argv[3]);
    filling = 0;
    if (db != 0) KM_SelectDb(ctx, db);
    if (r == NULL || KM_CallReplyType(r) == RM_REPLY_ERROR) {
        char msg[MAX_ERROR_LEN];
        snprintf(msg, sizeof(msg), "ERR keymiss: the value for keyspace '%s' could not be stored (%s)",
                 ks->name, r == NULL ? strerror(errno) : "the server refused the write");
        ks->failures++;
        entry_resolve(e, msg);
        if (r) {
            KM_ReplyWithCallReply(ctx, r);
            KM_FreeCallReply(r);
            return RM_OK;
        }
        return KM_ReplyWithError(ctx, msg);
    }
    KM_FreeCallReply(r);
    ks->fills++;
    if (e->taken_at > 0) {
        double took = (double)(now_ms() - e->taken_at);
        ks->mean_ms = ks->mean_ms > 0 ? 0.8 * ks->mean_ms + 0.2 * took : (took > 0 ? took : 1);
    }
    if (KM_DictSize(backoffs)) backoff_clear(argv[1]);
    entry_resolve(e, NULL);
    return KM_ReplyWithLongLong(ctx, 1);
}

/* KEYMISS.FAIL key token message: every waiter gets the error line; the keyspace's error TTL keeps
 * it for later readers. 1 if the key was waiting, 0 if not. */
static int cmd_fail(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 4) return KM_WrongArity(ctx);
    long long token;
    if (parse_token(argv[2], &token) != RM_OK) return KM_ReplyWithError(ctx, "ERR keymiss: bad token");
    Entry *e = entry_find(argv[1]);
    if (e == NULL || e->token != token) return KM_ReplyWithLongLong(ctx, 0);
    Keyspace *ks = keyspaces[e->ks];
    size_t len;
    const char *msg = KM_StringPtrLen(argv[3], &len);
    char *line = error_line(msg, len);
    /* a worker out of handler slots is busy, not a failure of the key: counted as such in INFO,
     * and not remembered (the next read may well be computed) */
    int busy = strncmp(line, "BUSY", 4) == 0;
    if (busy) ks->busy++;
    else ks->failures++;
    if (e->refresh && e->nwaiters == 0) {
        /* a refresh nobody waits on: the value stays served (stale, if it is); retried later */
        ks->refresh_failures++;
        backoff_note(argv[1], now_ms());
    } else if (!busy && ks->error_ttl_ms > 0) {
        error_remember(argv[1], line, ks->error_ttl_ms, now_ms());
    }
    entry_resolve(e, line);
    KM_Free(line);
    return KM_ReplyWithLongLong(ctx, 1);
}

/* ---------------------------------------------------------------------------------------------- */
/* Events: client writes, worker disconnects, the clock                                            */

static int on_keyspace_event(RedisModuleCtx *ctx, int type, const char *event, RedisModuleString *key) {
    (void)type;
    (void)event;
    if (filling || KM_GetSelectedDb(ctx) != 0) return RM_OK;
    if (nkeyspaces > 0 && KM_DictSize(dirty) < MAX_DIRTY) {
        int k = route_str(key);
        if (k >= 0 && keyspaces[k]->version != NULL) { /* its companion is rewritten by the tick */
            size_t len;
            const char *p = KM_StringPtrLen(key, &len);
            KM_DictSetC(dirty, (void *)p, len, NULL);
        }
    }
    if (KM_DictSize(errors)) {
        size_t len;
        const char *p = KM_StringPtrLen(key, &len);
        error_forget(p, len); /* a write replaces a remembered failure */
    }
    if (KM_DictSize(pending) == 0) return RM_OK;
    Entry *e = entry_find(key);
    if (e) {
        keyspaces[e->ks]->superseded++;
        entry_resolve(e, NULL); /* the waiters read what the client wrote; the fill is discarded */
    }
    return RM_OK;
}

/* The pending entries `want` picks, copied out (resolving one mutates the dict); *n is the count. */
static Entry **collect_entries(int (*want)(const Entry *e, const void *arg), const void *arg, size_t *n) {
    Entry **out = NULL, *e;
    size_t cap = 0;
    *n = 0;
    RedisModuleDictIter *it = KM_DictIteratorStartC(pending, "^", NULL, 0);
    while (KM_DictNextC(it, NULL, (void **)&e)) {
        if (!want(e, arg)) continue;
        if (*n == cap) {
            cap = cap ? cap * 2 : 16;
            out = KM_Realloc(out, sizeof(Entry *) * cap);
        }
        out[(*n)++] = e;
    }
    KM_DictIteratorStop(it);
    return out;
}

static int any_entry(const Entry *e, const void *arg) {
    (void)e;
    (void)arg;
    return 1;
}

static int taken_by(const Entry *e, const void *client) {
    return e->state == TAKEN && e->taker == *(const unsigned long long *)client;
}

static int due_at(const Entry *e, const void *now) {
    long long t = *(const long long *)now;
    return t >= e->deadline || (e->state == TAKEN && t >= e->lease_deadline);
}

static void on_client_change(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    if (subevent != RM_SUBEVENT_CLIENT_CHANGE_DISCONNECTED || data == NULL) return;
    unsigned long long client = ((RedisModuleClientInfo *)data)->id;
    int w = worker_index(client);
    if (w < 0) return;
    workers[w] = workers[--nworkers];
    count_workers();
    /* its blocked take (if any) must not be the one woken for the keys it leaves behind */
    for (Taker *t = takers; t; t = t->next)
        if (t->client == client) t->mask = 0;
    /* What it had taken goes back to the queue for another worker. */
    size_t nback;
    Entry **back = collect_entries(taken_by, &client, &nback);
    for (size_t i = 0; i < nback; i++) entry_requeue(back[i]);
    KM_Free(back);
}

/* The keyspace changed wholesale (FLUSHALL/FLUSHDB, SWAPDB, a reload): every pending key resolves
 * as if a client had written it, and the late fills are discarded. */
static void resolve_all(void) {
    size_t n;
    Entry **all = collect_entries(any_entry, NULL, &n);
    for (size_t i = 0; i < n; i++) {
        keyspaces[all[i]->ks]->superseded++;
        entry_resolve(all[i], NULL);
    }
    KM_Free(all);
}

static void on_flush(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    RedisModuleFlushInfo *fi = data;
    if (subevent == RM_SUBEVENT_FLUSHDB_END && (fi == NULL || fi->dbnum == -1 || fi->dbnum == 0)) resolve_all();
}

static void on_swapdb(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    (void)subevent;
    RedisModuleSwapDbInfo *si = data;
    if (si == NULL || si->dbnum_first == 0 || si->dbnum_second == 0) resolve_all();
}

static void on_loading(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    (void)data;
    if (subevent == RM_SUBEVENT_LOADING_ENDED || subevent == RM_SUBEVENT_LOADING_FAILED) resolve_all();
}

static void on_tick(RedisModuleCtx *ctx, void *data) {
    (void)data;
    long long now = now_ms();
    if (KM_DictSize(pending)) {
        size_t ndue;
        Entry **due = collect_entries(due_at, &now, &ndue);
        for (size_t i = 0; i < ndue; i++) {
            Entry *e = due[i];
            Keyspace *ks = keyspaces[e->ks];
            char msg[MAX_ERROR_LEN];
            if (now >= e->deadline) {
                ks->timeouts++;
                snprintf(msg, sizeof(msg), "ERR keymiss: keyspace '%s' did not compute the key within %lld ms",
                         ks->name, ks->timeout_ms);
                entry_resolve(e, msg);
            } else {
                entry_requeue(e); /* which fails it after MAX_ATTEMPTS */
            }
        }
        KM_Free(due);
    }
    if (KM_DictSize(errors)) {
        char **gone = NULL;
        size_t *lens = NULL, ngone = 0, cap = 0;
        RedisModuleDictIter *it = KM_DictIteratorStartC(errors, "^", NULL, 0);
        char *k;
        size_t klen;
        ErrorRecord *r;
        while ((k = KM_DictNextC(it, &klen, (void **)&r)) != NULL) {
            if (r->expires > now) continue;
            if (ngone == cap) {
                cap = cap ? cap * 2 : 16;
                gone = KM_Realloc(gone, sizeof(char *) * cap);
                lens = KM_Realloc(lens, sizeof(size_t) * cap);
            }
            gone[ngone] = dup_bytes(k, klen);
            lens[ngone++] = klen;
        }
        KM_DictIteratorStop(it);
        for (size_t i = 0; i < ngone; i++) {
            error_forget(gone[i], lens[i]);
            KM_Free(gone[i]);
        }
        KM_Free(gone);
        KM_Free(lens);
    }
    /* Takes whose block time is over answer (with what is queued, if anything). */
    for (Taker **pp = &takers; *pp;) {
        Taker *t = *pp;
        if (now >= t->deadline) {
            *pp = t->next;
            t->woken = 1;
            KM_UnblockClient(t->bc, t);
        } else {
            pp = &t->next;
        }
    }
    /* A woken taker may have gone before taking: queued keys wake another. */
    for (int k = 0; k < nkeyspaces; k++)
        if (keyspaces[k]->qhead) wake_taker(k);
    if (KM_DictSize(dirty)) rewrite_companions(ctx);
    static int ticks;
    if (++ticks % 20 == 0 && KM_DictSize(backoffs)) purge_backoffs(now);
    KM_CreateTimer(ctx, TICK_MS, on_tick, NULL);
}

/* ---------------------------------------------------------------------------------------------- */
/* The filter: GET / MGET / GETEX(key only) of a registered keyspace go through keymiss            */

static int is_cmd(const char *p, size_t len, const char *name, size_t nlen) {
    return len == nlen && strncasecmp(p, name, nlen) == 0;
}

static void command_filter(RedisModuleCommandFilterCtx *f) {
    if (nkeyspaces == 0) return;
    int argc = KM_CommandFilterArgsCount(f);
    if (argc < 2) return;
    size_t len;
    const char *cmd = KM_StringPtrLen(KM_CommandFilterArgGet(f, 0), &len);
    RedisModuleString *to;
    if (is_cmd(cmd, len, "get", 3) || is_cmd(cmd, len, "getex", 5)) {
        if (argc != 2) return;
        to = get_name;
    } else if (is_cmd(cmd, len, "mget", 4)) {
        to = mget_name;
    } else {
        return;
    }
    /* A key that is present is the server's own: GET stays GET, at the server's speed. Only a
     * command naming a missing key of a keyspace goes through keymiss. The lookup neither touches
     * the key's LRU/LFU, counts, notifies, nor (where the server can avoid it) expires: the GET that
     * follows does what a GET does. Database 0 is the keyspaces' database (a cluster has no other);
     * KEYMISS.GET answers clients of other databases as a plain GET. */
    int rewrite = 0, fresh = 0;
    for (int i = 1; i < argc; i++) {
        RedisModuleString *key = (RedisModuleString *)KM_CommandFilterArgGet(f, i);
        int ks = route_str(key);
        if (ks < 0) continue;
        RedisModuleKey *k = KM_OpenKey(filter_ctx, key, RM_READ | lookup_modes);
        int present = k != NULL && KM_KeyType(k) != RM_KEYTYPE_EMPTY ? version_ok(filter_ctx, ks, key, 0) : 0;
        if (k) KM_CloseKey(k);
        if (present == PREVIOUS) served_previous(ks, key, argc == 2);
        if (!present) { /* missing, or computed under another version: KEYMISS.GET decides */
            rewrite = 1;
            break;
        }
        if (argc == 2) keyspaces[ks]->hits++;
        fresh |= keyspaces[ks]->stale_ms > 0 || keyspaces[ks]->early_milli > 0;
    }
    if (fresh && !rewrite) { /* every key is served as it is: stale ones, or early ones, refresh */
        for (int i = 1; i < argc; i++) {
            RedisModuleString *key = (RedisModuleString *)KM_CommandFilterArgGet(f, i);
            int ks = route_str(key);
            if (ks < 0 || (keyspaces[ks]->stale_ms == 0 && keyspaces[ks]->early_milli == 0)) continue;
            RedisModuleKey *k = KM_OpenKey(filter_ctx, key, RM_READ | lookup_modes);
            on_served(ks, k, key);
            if (k) KM_CloseKey(k);
        }
    }
    if (rewrite) {
        KM_RetainString(NULL, to); /* the filter takes one reference */
        KM_CommandFilterArgReplace(f, 0, to);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* INFO keymiss                                                                                   */

static void info_name(char *out, size_t size, const char *name) {
    size_t n = 0;
    for (; *name && n + 1 < size; name++) {
        unsigned char c = (unsigned char)*name;
        out[n++] = (c == ',' || c == '=' || c <= ' ' || c >= 127) ? '_' : (char)c;
    }
    out[n] = '\0';
}

static void on_info(RedisModuleInfoCtx *ctx, int for_crash_report) {
    (void)for_crash_report;
    KM_InfoAddSection(ctx, ""); /* the module's name: INFO keymiss */
    KM_InfoAddFieldLongLong(ctx, "keyspaces", nkeyspaces);
    KM_InfoAddFieldLongLong(ctx, "workers", nworkers);
    KM_InfoAddFieldLongLong(ctx, "pending", (long long)KM_DictSize(pending));
    KM_InfoAddFieldLongLong(ctx, "blocked_readers", waiting);
    KM_InfoAddFieldLongLong(ctx, "error_records", (long long)KM_DictSize(errors));
    for (int k = 0; k < nkeyspaces; k++) {
        Keyspace *ks = keyspaces[k];
        char field[32], name[256];
        snprintf(field, sizeof(field), "keyspace_%d", k);
        info_name(name, sizeof(name), ks->name);
        KM_InfoBeginDictField(ctx, field);
        KM_InfoAddFieldCString(ctx, "pattern", name);
        KM_InfoAddFieldLongLong(ctx, "hits", ks->hits);
        KM_InfoAddFieldLongLong(ctx, "misses", ks->misses);
        KM_InfoAddFieldLongLong(ctx, "computations", ks->computations);
        KM_InfoAddFieldLongLong(ctx, "queued", ks->queued);
        KM_InfoAddFieldLongLong(ctx, "in_flight", ks->in_flight);
        KM_InfoAddFieldLongLong(ctx, "fills", ks->fills);
        KM_InfoAddFieldLongLong(ctx, "failures", ks->failures);
        KM_InfoAddFieldLongLong(ctx, "timeouts", ks->timeouts);
        KM_InfoAddFieldLongLong(ctx, "requeues", ks->requeues);
        KM_InfoAddFieldLongLong(ctx, "discarded_fills", ks->discarded);
        KM_InfoAddFieldLongLong(ctx, "superseded", ks->superseded);
        KM_InfoAddFieldLongLong(ctx, "busy", ks->busy);
        KM_InfoAddFieldLongLong(ctx, "no_worker", ks->no_worker);
        KM_InfoAddFieldLongLong(ctx, "workers", ks->workers);
        if (ks->version != NULL) {
            char label[256];
            info_name(label, sizeof(label), ks->label ? ks->label : ks->version);
            KM_InfoAddFieldCString(ctx, "version", label);
        }
        KM_InfoAddFieldLongLong(ctx, "version_misses", ks->version_misses);
        KM_InfoAddFieldLongLong(ctx, "version_discards", ks->version_discards);
        KM_InfoAddFieldLongLong(ctx, "version_stale_hits", ks->version_stale_hits);
        KM_InfoAddFieldLongLong(ctx, "stale_hits", ks->stale_hits);
        KM_InfoAddFieldLongLong(ctx, "early_refreshes", ks->early_refreshes);
        KM_InfoAddFieldLongLong(ctx, "refresh_failures", ks->refresh_failures);
        KM_InfoAddFieldLongLong(ctx, "mean_compute_ms", (long long)ks->mean_ms);
        KM_InfoEndDictField(ctx);
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Loading                                                                                        */

static int load_failed(RedisModuleCtx *ctx, int line) {
    KM_Log(ctx, "warning", "keymiss: the module could not initialise (keymiss.c line %d)", line);
    return RM_ERR;
}

__attribute__((visibility("default"))) int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    if (keymiss_api_init(ctx, "keymiss", KM_VERSION) != RM_OK) return RM_ERR; /* no API: nothing to log with */
    if (argc != 0) {
        KM_Log(ctx, "warning", "keymiss: the module takes no arguments");
        return load_failed(ctx, __LINE__);
    }
    FILE *rnd = fopen("/dev/urandom", "rb");
    if (rnd == NULL || fread(&token_key, sizeof(token_key), 1, rnd) != 1) token_key = (uint64_t)KM_Milliseconds();
    if (rnd) fclose(rnd);
    rnd_state = token_key | 1;
    crc16_init();
    if (slot_tags_init() != RM_OK) return load_failed(ctx, __LINE__);
    pending = KM_CreateDict(NULL);
    errors = KM_CreateDict(NULL);
    requests = KM_CreateDict(NULL);
    backoffs = KM_CreateDict(NULL);
    dirty = KM_CreateDict(NULL);
    if (!backoffs || !dirty) return load_failed(ctx, __LINE__);
    get_name = KM_CreateString(NULL, "keymiss.get", 11);
    mget_name = KM_CreateString(NULL, "keymiss.mget", 12);
    if (!pending || !errors || !requests || !get_name || !mget_name) return load_failed(ctx, __LINE__);
    if (KM_CreateCommand(ctx, "keymiss.get", cmd_get, "readonly", 1, 1, 1) != RM_OK ||
        KM_CreateCommand(ctx, "keymiss.mget", cmd_mget, "readonly", 1, -1, 1) != RM_OK ||
        KM_CreateCommand(ctx, "keymiss.register", cmd_register, "deny-script", 0, 0, 0) != RM_OK ||
        KM_CreateCommand(ctx, "keymiss.take", cmd_take, "deny-script", 0, 0, 0) != RM_OK ||
        KM_CreateCommand(ctx, "keymiss.fill", cmd_fill, "write deny-oom", 1, 1, 1) != RM_OK ||
        KM_CreateCommand(ctx, "keymiss.fail", cmd_fail, "", 1, 1, 1) != RM_OK ||
        KM_CreateCommand(ctx, "keymiss.version", cmd_version, "deny-script", 0, 0, 0) != RM_OK)
        return load_failed(ctx, __LINE__);
    /* Where the server has ACL categories for module commands, a user allowed @read may read
     * keyspaces; elsewhere (Redis 7.0) a user listing commands needs +keymiss.get +keymiss.mget. */
    if (KM_GetCommand && KM_SetCommandACLCategories) {
        const char *reads[] = {"keymiss.get", "keymiss.mget"};
        for (int i = 0; i < 2; i++) {
            RedisModuleCommand *c = KM_GetCommand(ctx, reads[i]);
            if (c == NULL || KM_SetCommandACLCategories(c, "read") != RM_OK) return load_failed(ctx, __LINE__);
        }
    }
    filter_ctx = KM_GetDetachedThreadSafeContext(ctx);
    if (filter_ctx == NULL) return load_failed(ctx, __LINE__);
    lookup_modes = RM_OPEN_KEY_NOTOUCH;
    if (KM_GetOpenKeyModesAll) {
        int all = KM_GetOpenKeyModesAll();
        lookup_modes |= all & (RM_OPEN_KEY_NONOTIFY | RM_OPEN_KEY_NOSTATS | RM_OPEN_KEY_NOEXPIRE);
    }
    if (KM_RegisterCommandFilter(ctx, command_filter, RM_CMDFILTER_NOSELF) == NULL) return load_failed(ctx, __LINE__);
    int events = RM_NOTIFY_GENERIC | RM_NOTIFY_STRING | RM_NOTIFY_LIST | RM_NOTIFY_SET | RM_NOTIFY_HASH |
                 RM_NOTIFY_ZSET | RM_NOTIFY_EXPIRED | RM_NOTIFY_EVICTED | RM_NOTIFY_STREAM | RM_NOTIFY_MODULE |
                 RM_NOTIFY_NEW;
    if (KM_SubscribeToKeyspaceEvents(ctx, events, on_keyspace_event) != RM_OK) return load_failed(ctx, __LINE__);
    RedisModuleEvent client_change = {RM_EVENT_CLIENT_CHANGE, 1};
    if (KM_SubscribeToServerEvent(ctx, client_change, on_client_change) != RM_OK) return load_failed(ctx, __LINE__);
    RedisModuleEvent flush = {RM_EVENT_FLUSHDB, 1}, swapdb = {RM_EVENT_SWAPDB, 1}, loading = {RM_EVENT_LOADING, 1};
    if (KM_SubscribeToServerEvent(ctx, flush, on_flush) != RM_OK ||
        KM_SubscribeToServerEvent(ctx, swapdb, on_swapdb) != RM_OK ||
        KM_SubscribeToServerEvent(ctx, loading, on_loading) != RM_OK)
        return load_failed(ctx, __LINE__);
    if (KM_RegisterInfoFunc(ctx, on_info) != RM_OK) return load_failed(ctx, __LINE__);
    KM_CreateTimer(ctx, TICK_MS, on_tick, NULL);
    return RM_OK;
}

/* Blocked clients and the filter hold pointers into this module: it stays loaded. */
__attribute__((visibility("default"))) int RedisModule_OnUnload(RedisModuleCtx *ctx) {
    (void)ctx;
    return RM_ERR;
}
