/* Size- and cost-aware admission: which computed values are worth the bytes they would take.
 *
 * The server evicts by its own policy (LRU or LFU, sampled), blind to how big a value is and what it
 * cost to compute. Near maxmemory every value stored pushes others out, so a FILL is stored only if
 * the new value is worth more than what it displaces. Worth is frequency x sqrt(1 + compute ms) per
 * byte:
 *
 * - frequency: a count-min sketch of keyspace keys (4 rows of 8-bit counters, TinyLFU's, a key's
 *   four in one cache line), counted
 *   by the command filter on every GET / MGET of a keyspace key from the key's bytes alone (no
 *   lookup), halved every 40 reads per key held (at least every 80,000 reads, unless that is under
 *   12 per key held: km_aging_period) so that it describes recent use;
 * - cost: the milliseconds the worker says the computation took (FILL's COST), else the take-to-fill
 *   time; kept per sketch slot for values stored (a rejected one's would only overwrite a held
 *   value's), log-scaled in one byte, so a value sampled later has its own cost, unless another
 *   stored key shared its slot since (a slot nobody filled reads as its keyspace's mean);
 * - bytes: the value's length plus its key's and a fixed per-key overhead.
 *
 * What it displaces is sampled as the server's eviction samples (RandomKey): of KM_ADMIT_SAMPLE
 * keyspace keys (string values with a TTL, as volatile-* evicts), the one of least worth. If the
 * newcomer is worth no more, it is answered to its readers and not stored (admission_rejects); else
 * the sampled one is deleted (admission_evictions) and sampling goes on until as many bytes as the
 * new value's are freed, or memory is back under km_admit_high of maxmemory, or a later sample
 * outweighs it (then it is stored all the same: it won its contest, and a value was deleted for
 * it): the module makes its own room, GDSF-like, before the server's policy has to. A tie admits
 * the newcomer. A victim goes with its companion (UNLINKed together, replicated); keymiss's own
 * records (`keymiss:`) are never victims, whatever a keyspace's glob matches. Under
 * maxmemory-policy noeviction the module deletes nothing (a loser is still answered, not stored);
 * under the volatile-* and allkeys-* policies the server would evict such a key itself, so the
 * module may. Everything runs on the main thread, at FILL time only; a hit costs the filter one
 * hash and four byte increments in one cache line, no lookup (a read of another database's key of
 * the same name counts as database 0's).
 */
#include "keymiss.h"

#include <math.h>

#define KM_SKETCH_MIN_WIDTH 4096u      /* counters per row at first (16 KB in all) */
#define KM_SKETCH_MAX_WIDTH (1u << 22) /* at most (16 MB in all) */
#ifndef KM_ADMIT_HIGH
#define KM_ADMIT_HIGH 0.95 /* used / maxmemory above which a FILL must earn its room, at least */
#endif
/* What a FILL may use without a contest: all but KM_ADMIT_ROOM bytes, kept free for what comes and
 * goes (client buffers) so the server's own blind eviction rarely acts, but no more than 1 -
 * KM_ADMIT_HIGH of maxmemory and no less than KM_ADMIT_ROOM_MIN of it (km_admit_high). A fixed 5 %
 * cost a 20 % budget 0.2-0.4 points of hits and a 90 % loop 1.1 (bench/hit_ratio.py). */
#ifndef KM_ADMIT_ROOM
#define KM_ADMIT_ROOM (512.0 * 1024)
#endif
#ifndef KM_ADMIT_ROOM_MIN
#define KM_ADMIT_ROOM_MIN 0.01
#endif
#ifndef KM_ADMIT_SAMPLE
#define KM_ADMIT_SAMPLE 16 /* keys sampled per victim (5 lost 1 point of hits to 16 in bench/hit_ratio.py) */
#endif
#ifndef KM_COST_WEIGHT
#define KM_COST_WEIGHT 0.5 /* worth grows as cost to this power */
#endif
#ifndef KM_SKETCH_PER_KEY
#define KM_SKETCH_PER_KEY 8 /* counters a row per key held: the sketch is charged to maxmemory too */
#endif
#ifndef KM_SKETCH_SHARE
#define KM_SKETCH_SHARE (1.0 / 16) /* of maxmemory the sketch may take from values (km_sketch_follow) */
#endif
#define KM_ADMIT_ROUNDS 16             /* victims one FILL may delete at most */
/* The sketch's memory, as the in-process policy's (keymiss/stores/worth.py, where the numbers were
 * measured): halved after KM_AGING additions per key held (TinyLFU's is 10, which forgot
 * favourites read once in a few hundred reads), but at least every KM_AGING_MAX additions so stale
 * favourites lose their counts, unless that is fewer than KM_AGING_MIN per key held (a large
 * cache). The count of additions halves with the counters, as TinyLFU's does, so after the first
 * halving the next comes half as many reads later. */
#define KM_AGING 40ULL
#define KM_AGING_MAX 80000ULL
#define KM_AGING_MIN 12ULL
#define KM_KEY_OVERHEAD 64             /* bytes a string key costs the server beyond key and value */

typedef struct KmSketch {
    unsigned char *rows; /* 4 x width counters */
    unsigned char *cost; /* width log-scaled costs (0: unknown) */
    uint32_t width, mask;
    uint64_t additions, period, seed; /* halved every `period` additions: km_aging_period */
} KmSketch;

static KmSketch sk;

/* Reads between two halvings for `held` keys (256 at least, as the first table's width). */
static uint64_t km_aging_period(unsigned long long held) {
    uint64_t n = held > KM_SKETCH_MIN_WIDTH / 16 ? held : KM_SKETCH_MIN_WIDTH / 16;
    uint64_t floor = KM_AGING_MIN * n > KM_AGING_MAX ? KM_AGING_MIN * n : KM_AGING_MAX;
    return KM_AGING * n < floor ? KM_AGING * n : floor;
}

/* 64 bits of the key's bytes (FNV-1a, then a murmur finaliser to spread them over the rows). */
static uint64_t km_hash(const char *p, size_t len) {
    uint64_t h = 1469598103934665603ULL ^ sk.seed;
    for (size_t i = 0; i < len; i++) h = (h ^ (unsigned char)p[i]) * 1099511628211ULL;
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    return h ^ (h >> 33);
}

/* Row r's counter of hash h. The four counters of a key lie in one 64-byte block (a blocked
 * count-min sketch): a read costs the filter one cache line, not four. The block is h's low bits,
 * each row a 16-byte part of it, the counter there from h's high bits. */
static inline size_t km_slot(uint64_t h, int r) {
    size_t block = (size_t)(h & (sk.width / 16 - 1));
    return block * 64 + 16 * (size_t)r + (size_t)((h >> (40 + 4 * r)) & 15);
}

/* The table made `width` wide, every count kept. Growing, the old table is tiled across the new one
 * (a key's new block reduces to its old one under the old mask), as the memory store's sketch grows;
 * shrinking (far fewer keys held), each old counter folds to where its index reduces under the new
 * mask and the larger of those folded together stays, so no key's estimate drops. Allocated with
 * TryAlloc, so that a table the system cannot give (up to 20 MB at once) fails this change, keeping
 * the table there is, not the server: Alloc's failure aborts it, and the whole cache with it. */
static int km_sketch_resize(uint32_t width) {
    unsigned char *rows = KM_TryAlloc((size_t)width * 4);
    unsigned char *cost = rows ? KM_TryAlloc(width) : NULL;
    if (rows == NULL || cost == NULL) {
        KM_Free(rows);
        return RM_ERR;
    }
    if (sk.rows && width >= sk.width) {
        for (size_t i = 0; i < (size_t)width * 4; i++) rows[i] = sk.rows[i & ((size_t)sk.width * 4 - 1)];
        for (uint32_t i = 0; i < width; i++) cost[i] = sk.cost[i & sk.mask];
    } else {
        memset(rows, 0, (size_t)width * 4);
        memset(cost, 0, width);
        for (size_t i = 0; sk.rows && i < (size_t)sk.width * 4; i++) {
            unsigned char *c = &rows[i & ((size_t)width * 4 - 1)];
            if (sk.rows[i] > *c) *c = sk.rows[i];
        }
        for (uint32_t i = 0; sk.rows && i < sk.width; i++)
            if (cost[i & (width - 1)] == 0) cost[i & (width - 1)] = sk.cost[i];
    }
    if (sk.rows == NULL) KM_GetRandomBytes((unsigned char *)&sk.seed, sizeof(sk.seed));
    KM_Free(sk.rows);
    KM_Free(sk.cost);
    sk.rows = rows;
    sk.cost = cost;
    sk.width = width;
    sk.mask = width - 1;
    if (sk.period == 0) sk.period = km_aging_period(0);
    return RM_OK;
}

/* No table: its counts and costs are forgotten, as after CONFIG SET maxmemory (see km_admit). */
static void km_sketch_free(void) {
    KM_Free(sk.rows);
    KM_Free(sk.cost);
    sk = (KmSketch){0};
}

/* One read of a keyspace key (the filter's): its four counters, capped at 255; aging by halving. */
void km_sketch_add(const RedisModuleString *key) {
    if (sk.rows == NULL && km_sketch_resize(KM_SKETCH_MIN_WIDTH) != RM_OK) return;
    size_t len;
    const char *p = KM_StringPtrLen(key, &len);
    uint64_t h = km_hash(p, len);
    int added = 0;
    for (int r = 0; r < 4; r++) {
        unsigned char *c = &sk.rows[km_slot(h, r)];
        if (*c < 255) {
            (*c)++;
            added = 1;
        }
    }
    if (added && ++sk.additions >= sk.period) {
        for (size_t i = 0; i < (size_t)sk.width * 4; i++) sk.rows[i] >>= 1;
        /* as if the period had just ended: once, even where the count went on past a period that
         * fell since (fewer keys held: after a FLUSHALL it halved up to every read until the count
         * was back under it, all the counts gone and the table swept each time) */
        sk.additions = sk.additions / 2 < sk.period / 2 ? sk.additions / 2 : sk.period / 2;
    }
}

static unsigned km_sketch_freq(uint64_t h) {
    unsigned f = 255;
    for (int r = 0; r < 4; r++) {
        unsigned c = sk.rows[km_slot(h, r)];
        if (c < f) f = c;
    }
    return f;
}

/* Milliseconds as one byte: 16 steps per doubling, 0 kept for "unknown". */
static unsigned char km_cost_code(double ms) {
    double q = 1.0 + 16.0 * log2(1.0 + (ms > 0 ? ms : 0));
    return (unsigned char)(q > 255 ? 255 : q);
}

static double km_cost_ms(unsigned char code) {
    return exp2((code - 1) / 16.0) - 1.0;
}

/* The share of maxmemory (max > 0) a FILL may fill without a contest (see KM_ADMIT_ROOM). */
static double km_admit_high(unsigned long long max) {
    double room = (double)KM_ADMIT_ROOM / (double)max;
    if (room > 1.0 - KM_ADMIT_HIGH) room = 1.0 - KM_ADMIT_HIGH;
    if (room < KM_ADMIT_ROOM_MIN) room = KM_ADMIT_ROOM_MIN;
    return 1.0 - room;
}

/* What keeping `bytes` of key hash `h` that cost `ms` to compute is worth: frequency x sqrt(1 + ms)
 * per byte. The square root balances hits against compute seconds: on bench/hit_ratio.py's traces
 * the full cost weight saved the most seconds but lost hits to GDSF, no weight the reverse. */
static double km_worth_ms(uint64_t h, double ms, size_t bytes) {
    return (double)km_sketch_freq(h) * pow(1.0 + ms, KM_COST_WEIGHT) / (double)(bytes ? bytes : 1);
}

/* The same for a value held (of keyspace ks): its cost from its slot (its keyspace's mean if nobody
 * noted one). */
static double km_worth(uint64_t h, const KmKeyspace *ks, size_t bytes) {
    unsigned char code = sk.cost[h & sk.mask];
    return km_worth_ms(h, code ? km_cost_ms(code) : ks->mean_compute_ms, bytes);
}

/* Remember what computing `key` cost, for when it is sampled later. */
static void km_note_cost(uint64_t h, double ms) {
    sk.cost[h & sk.mask] = km_cost_code(ms);
}

/* Whether keymiss's own record (a companion, a context: the `keymiss:` prefix) is named: a glob
 * such as `*` routes them too, but they are never victims (a companion is never read, so it would
 * weigh nothing and go first, leaving its value without its codec). */
static int km_is_own_record(const char *kp, size_t klen) {
    return klen >= sizeof(KM_OWN_PREFIX) - 1 && memcmp(kp, KM_OWN_PREFIX, sizeof(KM_OWN_PREFIX) - 1) == 0;
}

/* The bytes of key's companion (its name, record and per-key overhead), 0 if it has none. */
static size_t km_companion_bytes(RedisModuleCtx *ctx, const RedisModuleString *key) {
    RedisModuleString *cname = km_companion_name(key);
    RedisModuleKey *open = KM_OpenKey(ctx, cname, RM_READ | km.lookup_modes);
    size_t bytes = 0;
    if (open != NULL && KM_KeyType(open) == RM_KEYTYPE_STRING) {
        size_t clen;
        KM_StringPtrLen(cname, &clen);
        bytes = KM_ValueLength(open) + clen + KM_KEY_OVERHEAD;
    }
    if (open) KM_CloseKey(open);
    KM_FreeString(NULL, cname);
    return bytes;
}

/* The sampled key of least worth (*worth and *bytes set, its companion's bytes included; a new
 * string the caller frees), or NULL if no keyspace key came up. The newcomer itself, keys being
 * computed and keymiss's own records are no victims. */
static RedisModuleString *km_sample_victim(RedisModuleCtx *ctx, const RedisModuleString *self, double *worth,
                                           size_t *bytes) {
    RedisModuleString *best = NULL;
    size_t slen;
    const char *sp = KM_StringPtrLen(self, &slen);
    for (int i = 0; i < KM_ADMIT_SAMPLE; i++) {
        RedisModuleString *key = KM_RandomKey(ctx);
        if (key == NULL) break;
        size_t klen;
        const char *kp = KM_StringPtrLen(key, &klen);
        int ksi = km_route_str(key);
        /* a versioned keyspace's value has a companion key: left to the server's eviction */
        if (ksi < 0 || km.keyspaces[ksi]->version != NULL || km_is_own_record(kp, klen) ||
            (klen == slen && memcmp(kp, sp, klen) == 0) || km_entry_find(key) != NULL) {
            KM_FreeString(ctx, key);
            continue;
        }
        /* only a string with a TTL: what volatile-* would evict (a value without one, a client's
         * or a context, is never ours to delete) */
        RedisModuleKey *open = KM_OpenKey(ctx, key, RM_READ | km.lookup_modes);
        size_t vlen = 0;
        int evictable = open != NULL && KM_KeyType(open) == RM_KEYTYPE_STRING && KM_GetExpire(open) != RM_NO_EXPIRE;
        if (evictable) vlen = KM_ValueLength(open);
        if (open) KM_CloseKey(open);
        if (!evictable) {
            KM_FreeString(ctx, key);
            continue;
        }
        size_t held = vlen + klen + KM_KEY_OVERHEAD + km_companion_bytes(ctx, key);
        double w = km_worth(km_hash(kp, klen), km.keyspaces[ksi], held);
        if (best == NULL || w < *worth) {
            if (best) KM_FreeString(ctx, best);
            best = key;
            *worth = w;
            *bytes = held;
        } else {
            KM_FreeString(ctx, key);
        }
    }
    return best;
}

/* KM_SKETCH_PER_KEY counters a row per key the server holds (the sketch also counts the keys
 * that were not admitted, or were evicted: a scan's one-off keys), and aging by km_aging_period, so
 * that yesterday's favourites make room. The table doubles while the next size fits the room below
 * `high` of `max`, or, up to KM_SKETCH_SHARE of `max` in all, half the room below `max` itself (the
 * other half is left to what comes and goes, client buffers; the contests that follow delete
 * values by worth to get back under `high`). Never past `max`: a server holding a million keys of
 * others (contexts, no TTL) went 20 MB over maxmemory at its first FILL, evicted every computed
 * value and refused every write after. A table that cannot grow keeps its width (crowded counts,
 * not lost values), and a failed growth keeps the table it has. */
static int km_sketch_follow(RedisModuleCtx *ctx, unsigned long long max, double high) {
    unsigned long long held = KM_DbSize(ctx);
    sk.period = km_aging_period(held);
    if (4ULL * KM_SKETCH_PER_KEY * held < sk.width && sk.width > KM_SKETCH_MIN_WIDTH) {
        /* far fewer keys held (a FLUSHALL, a mass delete): down to the width they need, so a table
         * once grown for millions of keys does not keep their bytes from the values for good */
        uint32_t w = KM_SKETCH_MIN_WIDTH;
        while (w < KM_SKETCH_PER_KEY * held) w <<= 1;
        (void)km_sketch_resize(w); /* a failed one keeps the wider table: crowded by nothing */
        return RM_OK;
    }
    if (KM_SKETCH_PER_KEY * held <= sk.width || sk.width >= KM_SKETCH_MAX_WIDTH) return RM_OK;
    double used = (double)KM_GetUsedMemoryRatio();
    double below_high = (high - used) * (double)max, below_max = (1.0 - used) * (double)max / 2;
    uint32_t w = sk.width;
    while (w < KM_SKETCH_PER_KEY * held && w < KM_SKETCH_MAX_WIDTH) {
        double more = 5.0 * (double)(2 * w - sk.width), total = 10.0 * (double)w;
        if (more > below_high && (more > below_max || total > KM_SKETCH_SHARE * (double)max)) break;
        w <<= 1;
    }
    return w == sk.width ? RM_OK : km_sketch_resize(w);
}

/* The bytes the sketch holds (its counters and its cost slots), which count against maxmemory. */
long long km_sketch_bytes(void) {
    return sk.rows == NULL ? 0 : 5LL * (long long)sk.width;
}

/* Whether the FILL of `key` (a value of vlen bytes that took cost_ms) may be stored:
 * 1 if memory is not tight or it outweighs each value it displaces (those are deleted here first),
 * 0 if it loses to one (counted in km.admission_rejects). `max` is the server's maxmemory (> 0). */
static int km_admit_decide(RedisModuleCtx *ctx, RedisModuleString *key, uint64_t h, size_t klen, size_t vlen,
                           double cost_ms, unsigned long long max) {
    size_t bytes = vlen + klen + KM_KEY_OVERHEAD;
    double need = (double)bytes / (double)max;
    double high = km_admit_high(max);
    /* The sketch follows the keys the server holds from the first FILL on, not only once memory
     * is tight: sized at contests only, it stayed 4,096 counters wide and halved every 10,240 reads
     * while the cache filled, so the values held then were weighed by crowded, halved counts (0.8 to
     * 1.0 points of hits and 44-63 s lost at 20 % budgets in bench/hit_ratio.py). */
    if (km_sketch_follow(ctx, max, high) != RM_OK) return 1;
    if ((double)KM_GetUsedMemoryRatio() + need <= high) return 1;
    double mine = km_worth_ms(h, cost_ms, bytes);
    size_t freed = 0;
    for (int round = 0; round < KM_ADMIT_ROUNDS; round++) {
        double theirs = 0;
        size_t their_bytes = 0;
        RedisModuleString *victim = km_sample_victim(ctx, key, &theirs, &their_bytes);
        if (victim == NULL) return 1; /* nothing of ours to weigh: the server's eviction decides */
        /* a tie admits the newcomer: nothing says the held value is worth more (after CONFIG SET
         * maxmemory every count is 0), and the server's own policy would keep the newer one */
        if (theirs > mine) {
            KM_FreeString(ctx, victim);
            /* it already outweighed a value deleted for it: stored, the server's eviction makes
             * the rest of its room (refused now, it would cost that value for nothing) */
            if (freed > 0) break;
            km.admission_rejects++;
            return 0;
        }
        if (km.noeviction) { /* the server deletes nothing for room: neither do we */
            KM_FreeString(ctx, victim);
            return 1;
        }
        /* our own delete (km.filling: not a client's write), the value's companion with it (in
         * its slot), replicated, as FORGET deletes */
        RedisModuleString *cname = km_companion_name(victim);
        km.filling = 1;
        RedisModuleCallReply *r = KM_Call(ctx, "UNLINK", "!ss", victim, cname);
        km.filling = 0;
        if (r) KM_FreeCallReply(r);
        KM_FreeString(NULL, cname);
        KM_FreeString(ctx, victim);
        if (r == NULL) return 1;
        km.admission_evictions++;
        freed += their_bytes;
        /* room made: as many bytes as it takes, or memory back under the mark */
        if (freed >= bytes || (double)KM_GetUsedMemoryRatio() + need <= high) break;
    }
    return 1;
}

/* km_admit_decide's answer for the FILL of `key`, its cost noted if the value is stored; without a
 * maxmemory, 1 and no sketch. */
int km_admit(RedisModuleCtx *ctx, RedisModuleString *key, size_t vlen, double cost_ms) {
    unsigned long long max = km_maxmemory(ctx, km_now_ms());
    if (max == 0) { /* nothing is counted or weighed: no sketch (one made under a maxmemory goes) */
        km_sketch_free();
        return 1;
    }
    if (sk.rows == NULL && km_sketch_resize(KM_SKETCH_MIN_WIDTH) != RM_OK) return 1;
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    uint64_t h = km_hash(kp, klen);
    int stored = km_admit_decide(ctx, key, h, klen, vlen, cost_ms, max);
    /* only a stored value's cost is kept: a slot is shared, and a value answered but not stored is
     * never sampled, so noting its cost would only overwrite a held value's */
    if (stored) km_note_cost(h, cost_ms);
    return stored;
}
