/* The workers' commands: KEYMISS.REGISTER, KEYMISS.VERSION, KEYMISS.TAKE, KEYMISS.FILL, KEYMISS.FAIL. */
#include "keymiss.h"

#include <errno.h>
#include <stdio.h>

/* ---------------------------------------------------------------------------------------------- */
/* Arguments and options                                                                          */

/* A whole number from min to max. */
static int km_parse_number(RedisModuleString *s, long long min, long long max, long long *out) {
    long long v;
    if (KM_StringToLongLong(s, &v) != RM_OK || v < min || v > max) return RM_ERR;
    *out = v;
    return RM_OK;
}

static int km_parse_token(RedisModuleString *s, long long *out) {
    return KM_StringToLongLong(s, out) == RM_OK && *out > 0 ? RM_OK : RM_ERR;
}

/* A version tag or label as given: 1 to KM_MAX_VERSION bytes, no NUL; a copy (NULL if refused). */
static char *km_version_arg(RedisModuleString *s, size_t *len) {
    const char *p = KM_StringPtrLen(s, len);
    if (*len == 0 || *len > KM_MAX_VERSION || memchr(p, '\0', *len)) return NULL;
    return km_dup_bytes(p, *len);
}

/* What an option's value is: a number from min to max, a version tag or label (copied, as
 * km_version_arg takes it), or bytes as given. */
enum {
    KM_KIND_NUMBER,
    KM_KIND_TAG,
    KM_KIND_BYTES,
    KM_KIND_FLAG, /* no value: num[slot] = 1 */
    KM_KIND_LIST  /* repeatable, read apart (REGISTER's TAG: km_tags_parse) */
};
/* Where it goes: KmOptionValues.num[slot] for a number or a flag, else .tag / .bytes[slot]. */
enum {
    KM_N_TTL,
    KM_N_ERRTTL,
    KM_N_TIMEOUT,
    KM_N_QUEUE,
    KM_N_STALE,
    KM_N_EARLY,
    KM_N_VSTALE,
    KM_N_SHARE,
    KM_N_PX,
    KM_N_NOSTORE,
    KM_N_CODEC,
    KM_N_COST,
    KM_NUMS
};
enum { KM_T_VERSION, KM_T_LABEL, KM_TEXTS };

typedef struct KmOption {
    const char *name;
    int kind, slot;
    long long min, max;
} KmOption;

typedef struct KmOptionValues {
    long long num[KM_NUMS];
    char *tag[KM_TEXTS]; /* retained: free with km_options_free */
    const char *bytes[KM_TEXTS];
    size_t len[KM_TEXTS];
} KmOptionValues;

static const KmOption km_register_options[] = {
    {KM_OPT_TTL, KM_KIND_NUMBER, KM_N_TTL, 0, KM_MAX_MS},
    {KM_OPT_ERRTTL, KM_KIND_NUMBER, KM_N_ERRTTL, 0, KM_MAX_MS},
    {KM_OPT_TIMEOUT, KM_KIND_NUMBER, KM_N_TIMEOUT, 1, KM_MAX_MS},
    {KM_OPT_QUEUE, KM_KIND_NUMBER, KM_N_QUEUE, 1, KM_MAX_QUEUE},
    {KM_OPT_STALE, KM_KIND_NUMBER, KM_N_STALE, 0, KM_MAX_MS},
    {KM_OPT_EARLY, KM_KIND_NUMBER, KM_N_EARLY, 0, KM_MAX_EARLY},
    {KM_OPT_VERSION, KM_KIND_TAG, KM_T_VERSION, 0, 0},
    {KM_OPT_LABEL, KM_KIND_TAG, KM_T_LABEL, 0, 0},
    {KM_OPT_VSTALE, KM_KIND_NUMBER, KM_N_VSTALE, 0, KM_MAX_MS},
    {KM_OPT_SHARE, KM_KIND_NUMBER, KM_N_SHARE, 1, KM_MAX_SHARE},
    {KM_OPT_TAG, KM_KIND_LIST, 0, 0, 0},
};

static const KmOption km_fill_options[] = {
    {KM_OPT_PX, KM_KIND_NUMBER, KM_N_PX, 1, KM_MAX_MS},
    {KM_OPT_VERSION, KM_KIND_BYTES, KM_T_VERSION, 0, 0},
    {KM_OPT_NOSTORE, KM_KIND_FLAG, KM_N_NOSTORE, 0, 0},
    {KM_OPT_CODEC, KM_KIND_NUMBER, KM_N_CODEC, 0, KM_MAX_CODEC},
    {KM_OPT_COST, KM_KIND_NUMBER, KM_N_COST, 0, KM_MAX_COST_US},
};

#define KM_COUNT_OF(a) (sizeof(a) / sizeof((a)[0]))

/* The options from argv[first] on, each of `table` and followed by its value unless it is a flag
 * (names match whatever their case; of one given twice, the last counts): RM_OK, or RM_ERR at the
 * first that is not one (*unknown set), lacks its value or whose value is not valid. */
static int km_parse_options(RedisModuleString **argv, int first, int argc, const KmOption *table, size_t n,
                            KmOptionValues *out, int *unknown) {
    *unknown = 0;
    for (int i = first; i < argc; i += 2) {
        size_t olen;
        const char *opt = KM_StringPtrLen(argv[i], &olen);
        const KmOption *o = NULL;
        for (size_t j = 0; j < n && o == NULL; j++)
            if (km_word_is(opt, olen, table[j].name)) o = &table[j];
        if (o == NULL) {
            *unknown = 1;
            return RM_ERR;
        }
        if (o->kind == KM_KIND_FLAG) {
            out->num[o->slot] = 1;
            i--; /* no value follows */
            continue;
        }
        if (i + 1 >= argc) return RM_ERR;
        int ok = RM_OK;
        if (o->kind == KM_KIND_LIST) {
            continue;
        } else if (o->kind == KM_KIND_NUMBER) {
            ok = km_parse_number(argv[i + 1], o->min, o->max, &out->num[o->slot]);
        } else if (o->kind == KM_KIND_TAG) {
            KM_Free(out->tag[o->slot]);
            out->tag[o->slot] = km_version_arg(argv[i + 1], &out->len[o->slot]);
            ok = out->tag[o->slot] ? RM_OK : RM_ERR;
        } else {
            out->bytes[o->slot] = KM_StringPtrLen(argv[i + 1], &out->len[o->slot]);
        }
        if (ok != RM_OK) return RM_ERR;
    }
    return RM_OK;
}

static void km_options_free(KmOptionValues *v) {
    for (int t = 0; t < KM_TEXTS; t++) KM_Free(v->tag[t]);
}

/* ---------------------------------------------------------------------------------------------- */
/* REGISTER, VERSION                                                                              */

/* KEYMISS.REGISTER name glob [TTL ms] [ERRTTL ms] [TIMEOUT ms] [QUEUE n] [STALE ms]
 *                  [EARLY beta-thousandths] [VERSION tag] [LABEL name] [VSTALE ms] [SHARE ppm]
 *                  [TAG tag ...]
 * Declares (or updates) a keyspace and counts this connection among its workers. */
int km_cmd_register(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 3 || (argc - 3) % 2) return KM_WrongArity(ctx);
    size_t nlen, glen;
    const char *pattern = KM_StringPtrLen(argv[1], &nlen);
    const char *glob = KM_StringPtrLen(argv[2], &glen);
    if (nlen == 0 || glen == 0 || nlen > KM_MAX_GLOB || glen > KM_MAX_GLOB || memchr(pattern, '\0', nlen) ||
        memchr(glob, '\0', glen))
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "a keyspace needs a name and a glob (1 to " KM_XSTR(
                                          KM_MAX_GLOB) " bytes)");
    KmOptionValues opt = {
        .num = {[KM_N_TIMEOUT] = KM_DEFAULT_TIMEOUT_MS, [KM_N_QUEUE] = KM_DEFAULT_QUEUE, [KM_N_SHARE] = KM_DEFAULT_SHARE}};
    int unknown;
    if (km_parse_options(argv, 3, argc, km_register_options, KM_COUNT_OF(km_register_options), &opt, &unknown) !=
        RM_OK) {
        km_options_free(&opt);
        if (unknown)
            return KM_ReplyWithError(ctx, KM_ERR_PREFIX "unknown option (" KM_OPT_TTL ", " KM_OPT_ERRTTL
                                                        ", " KM_OPT_TIMEOUT ", " KM_OPT_QUEUE ", " KM_OPT_STALE
                                                        ", " KM_OPT_EARLY ", " KM_OPT_VERSION ", " KM_OPT_LABEL
                                                        ", " KM_OPT_VSTALE ", " KM_OPT_SHARE ", " KM_OPT_TAG ")");
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "an option's value is not valid");
    }
    char *tag = opt.tag[KM_T_VERSION], *label = opt.tag[KM_T_LABEL];
    size_t taglen = opt.len[KM_T_VERSION];
    if ((label != NULL || opt.num[KM_N_VSTALE] > 0) && tag == NULL) {
        KM_Free(label);
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX KM_OPT_LABEL " and " KM_OPT_VSTALE " need a " KM_OPT_VERSION);
    }
    char **tags;
    size_t *taglens;
    int ntags;
    const char *bad_tag = km_tags_parse(argv, 3, argc, pattern, nlen, &tags, &taglens, &ntags);
    if (bad_tag != NULL) {
        KM_Free(tag);
        KM_Free(label);
        return KM_ReplyWithError(ctx, bad_tag);
    }
    int ksi = km_keyspace_find(pattern, nlen);
    unsigned long long client = KM_GetClientId(ctx);
    int w = km_worker_index(client);
    const char *refused = NULL;
    if (w < 0 && km.nworkers == KM_MAX_WORKERS) {
        refused = KM_ERR_PREFIX "too many workers";
        goto refuse;
    }
    if (ksi < 0 && (ksi = km_keyspace_add(pattern, nlen)) < 0) {
        refused = KM_ERR_PREFIX "too many keyspaces (" KM_XSTR(KM_MAX_KEYSPACES) ")";
        goto refuse;
    }
    KmKeyspace *ks = km.keyspaces[ksi];
    int others = ks->workers - (w >= 0 && (km.workers[w].mask & ((uint64_t)1 << ksi)) ? 1 : 0);
    if (ks->glob != NULL && (ks->globlen != glen || memcmp(ks->glob, glob, glen) != 0) && others > 0) {
        refused = KM_ERR_PREFIX "the keyspace is served by live workers with another glob";
        goto refuse;
    }
    if (ks->glob == NULL || ks->globlen != glen || memcmp(ks->glob, glob, glen) != 0) {
        KM_Free(ks->glob);
        ks->glob = km_dup_bytes(glob, glen);
        ks->globlen = glen;
        ks->prefixlen = km_glob_prefix_len(glob, glen);
    }
    ks->ttl_ms = opt.num[KM_N_TTL];
    ks->error_ttl_ms = opt.num[KM_N_ERRTTL];
    ks->timeout_ms = opt.num[KM_N_TIMEOUT];
    ks->queue_max = opt.num[KM_N_QUEUE];
    ks->stale_ms = opt.num[KM_N_STALE];
    ks->early_milli = opt.num[KM_N_EARLY];
    ks->vstale_ms = opt.num[KM_N_VSTALE];
    ks->share_ppm = opt.num[KM_N_SHARE];
    km_tags_free(ks->tags, ks->taglens, ks->ntags);
    ks->tags = tags;
    ks->taglens = taglens;
    ks->ntags = ntags;
    km_set_version(ks, tag, taglen, label ? label : (tag ? km_dup_bytes(tag, taglen) : NULL));
    if (w < 0) {
        w = km.nworkers++;
        km.workers[w].client = client;
        km.workers[w].mask = 0;
    }
    km.workers[w].mask |= (uint64_t)1 << ksi;
    km_count_workers();
    return KM_ReplyWithSimpleString(ctx, "OK");
refuse:
    KM_Free(tag);
    KM_Free(label);
    km_tags_free(tags, taglens, ntags);
    return KM_ReplyWithError(ctx, refused);
}

/* KEYMISS.VERSION name tag [label]: the version a registered keyspace's values are served under
 * from now on (an application switched models). Every value computed under another is hidden at
 * once; no key is deleted. Only a connection that registered the keyspace (one of its workers) may
 * switch it: a version no worker computes under would leave its readers nothing to be served. Does
 * not make this connection a worker. */
int km_cmd_version(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 3 && argc != 4) return KM_WrongArity(ctx);
    size_t nlen;
    const char *pattern = KM_StringPtrLen(argv[1], &nlen);
    int ksi = km_keyspace_find(pattern, nlen);
    if (ksi < 0) return KM_ReplyWithError(ctx, KM_ERR_PREFIX "no such keyspace is registered");
    int w = km_worker_index(KM_GetClientId(ctx));
    if (w < 0 || !(km.workers[w].mask & ((uint64_t)1 << ksi)))
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "REGISTER the keyspace on this connection first");
    size_t taglen, labellen;
    char *tag = km_version_arg(argv[2], &taglen);
    char *label = argc == 4 ? km_version_arg(argv[3], &labellen) : (tag ? km_dup_bytes(tag, taglen) : NULL);
    if (tag == NULL || label == NULL) {
        KM_Free(tag);
        KM_Free(label);
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "a version is 1 to " KM_XSTR(KM_MAX_VERSION) " bytes");
    }
    km_set_version(km.keyspaces[ksi], tag, taglen, label);
    return KM_ReplyWithSimpleString(ctx, "OK");
}

/* ---------------------------------------------------------------------------------------------- */
/* TAKE                                                                                           */

/* Take up to `count` queued keys of the worker's keyspaces (`mask`), at most limit[ksi] of each: a
 * flat array of key, token pairs. Keyspaces take turns at going first. A queued key nobody waits
 * for is dropped instead of taken while its keyspace is full: a reader's miss needs the room. */
static void km_reply_taken(RedisModuleCtx *ctx, uint64_t mask, const long long *limit, long long count,
                           long long lease_ms, unsigned long long client) {
    long long now = km_now_ms(), n = 0;
    int first = km.nkeyspaces ? km.take_next % km.nkeyspaces : 0;
    km.take_next = first + 1;
    KM_ReplyWithArray(ctx, -1 /* postponed */);
    for (int i = 0; i < km.nkeyspaces && n < count; i++) {
        int ksi = (first + i) % km.nkeyspaces;
        if (!(mask & ((uint64_t)1 << ksi))) continue;
        KmKeyspace *ks = km.keyspaces[ksi];
        long long mine = 0;
        while (ks->qhead && n < count && mine < limit[ksi]) {
            KmEntry *e = ks->qhead;
            if (e->nwaiters == 0 && ks->queued + ks->in_flight >= ks->queue_max) {
                km_entry_drop(e);
                continue;
            }
            km_entry_take(e, client, now, lease_ms);
            KM_ReplyWithString(ctx, e->key);
            KM_ReplyWithLongLong(ctx, e->token);
            n++;
            mine++;
        }
    }
    KM_ReplySetArrayLength(ctx, n * 2);
}

static int km_take_reply(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    KmTaker *t = KM_GetBlockedClientPrivateData(ctx);
    int w = km_worker_index(t->client);
    km_reply_taken(ctx, w < 0 ? 0 : km.workers[w].mask & t->mask, t->limit, t->count, t->lease_ms, t->client);
    return RM_OK;
}

/* Where the blocked TAKE of `bc` is linked in km.takers, or NULL (already woken). */
static KmTaker **km_taker_link(RedisModuleBlockedClient *bc) {
    for (KmTaker **link = &km.takers; *link; link = &(*link)->next)
        if ((*link)->bc == bc) return link;
    return NULL;
}

static int km_take_timeout(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    KmTaker **link = km_taker_link(KM_GetBlockedClientHandle(ctx));
    if (link) km_taker_wake(link);
    return KM_ReplyWithArray(ctx, 0);
}

static void km_take_disconnected(RedisModuleCtx *ctx, RedisModuleBlockedClient *bc) {
    (void)ctx;
    KmTaker **link = km_taker_link(bc);
    if (link) km_taker_wake(link);
}

static void km_free_taker(RedisModuleCtx *ctx, void *privdata) {
    (void)ctx;
    KM_Free(privdata);
}

/* KEYMISS.TAKE count block-ms lease-ms [LIMIT name n ...]: queued keys of this worker's keyspaces,
 * waiting up to block-ms for one; of the keyspace `name`, at most n (0: none, and no waiting for
 * it), so that a worker whose slots a hung keyspace holds still takes the others' keys. A key not
 * filled or failed within lease-ms goes back to the queue. */
int km_cmd_take(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 4 || (argc - 4) % 3) return KM_WrongArity(ctx);
    long long count, block_ms, lease_ms;
    if (km_parse_number(argv[1], 1, KM_MAX_TAKE, &count) != RM_OK ||
        km_parse_number(argv[2], 0, KM_MAX_MS, &block_ms) != RM_OK ||
        km_parse_number(argv[3], 1, KM_MAX_MS, &lease_ms) != RM_OK)
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "TAKE count (1-" KM_XSTR(KM_MAX_TAKE) ") block-ms lease-ms [" KM_OPT_LIMIT " name n ...]");
    unsigned long long client = KM_GetClientId(ctx);
    int w = km_worker_index(client);
    if (w < 0) return KM_ReplyWithError(ctx, KM_ERR_PREFIX "REGISTER a keyspace on this connection first");
    uint64_t mask = km.workers[w].mask;
    long long limit[KM_MAX_KEYSPACES];
    for (int ksi = 0; ksi < KM_MAX_KEYSPACES; ksi++) limit[ksi] = count;
    for (int i = 4; i < argc; i += 3) {
        size_t len, nlen;
        const char *word = KM_StringPtrLen(argv[i], &len);
        const char *name = KM_StringPtrLen(argv[i + 1], &nlen);
        long long n;
        if (!km_word_is(word, len, KM_OPT_LIMIT) || km_parse_number(argv[i + 2], 0, KM_MAX_TAKE, &n) != RM_OK)
            return KM_ReplyWithError(ctx, KM_ERR_PREFIX "TAKE's " KM_OPT_LIMIT " is a keyspace's name and 0-" KM_XSTR(KM_MAX_TAKE));
        int ksi = km_keyspace_find(name, nlen); /* one gone meanwhile is no error */
        if (ksi < 0) continue;
        limit[ksi] = n;
        if (n == 0) mask &= ~((uint64_t)1 << ksi);
    }
    int ready = 0;
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++)
        if ((mask & ((uint64_t)1 << ksi)) && km.keyspaces[ksi]->qhead) ready = 1;
    int flags = KM_GetContextFlags(ctx);
    if (ready || block_ms == 0 || (flags & (RM_CTX_FLAGS_DENY_BLOCKING | RM_CTX_FLAGS_MULTI | RM_CTX_FLAGS_LUA))) {
        km_reply_taken(ctx, mask, limit, count, lease_ms, client);
        return RM_OK;
    }
    KmTaker *t = KM_Calloc(1, sizeof(*t));
    t->client = client;
    t->mask = mask;
    memcpy(t->limit, limit, sizeof(limit));
    t->count = count;
    t->lease_ms = lease_ms;
    t->deadline = km_now_ms() + block_ms; /* the tick answers it then (no server timeout) */
    t->bc = KM_BlockClient(ctx, km_take_reply, km_take_timeout, km_free_taker, 0);
    if (t->bc == NULL) {
        KM_Free(t);
        return KM_ReplyWithArray(ctx, 0);
    }
    KM_SetDisconnectCallback(t->bc, km_take_disconnected);
    t->next = km.takers;
    km.takers = t;
    return RM_OK;
}

/* ---------------------------------------------------------------------------------------------- */
/* FILL, FAIL                                                                                     */

/* Whether a value of `len` bytes is too large to store for keyspace ks: over its SHARE of the
 * server's maxmemory (none is too large without one). Storing it would make the server evict other
 * values first, perhaps every one. */
static int km_oversized(RedisModuleCtx *ctx, const KmKeyspace *ks, size_t len, long long now) {
    unsigned long long max = km_maxmemory(ctx, now);
    return max > 0 && (long double)len > (long double)max * (long double)ks->share_ppm / KM_MAX_SHARE;
}

/* The value of a key is answered to its waiters and not stored (NOSTORE, or km_oversized): said in
 * the log, once a second at most (INFO counts every one). */
static int km_fill_unstored(RedisModuleCtx *ctx, KmEntry *e, RedisModuleString *value, int asked, long long now) {
    KmKeyspace *ks = km.keyspaces[e->ksi];
    size_t len;
    KM_StringPtrLen(value, &len);
    ks->oversized++;
    if (now - km.oversized_logged_at >= 1000 || km.oversized_logged_at == 0) {
        km.oversized_logged_at = now;
        KM_Log(ctx, "warning",
               "keymiss: keyspace '%s': a value of %zu bytes is answered to its %d reader(s) and not stored: "
               "over %s share of maxmemory (%llu bytes; %s %.4g%%), storing it would evict other values "
               "(INFO keymiss counts these as oversized)",
               ks->pattern, len, e->nwaiters, asked ? "the worker's" : "the keyspace's", km.maxmemory,
               KM_OPT_SHARE, (double)ks->share_ppm * 100.0 / KM_MAX_SHARE);
    }
    if (e->refresh && e->nwaiters == 0) km_backoff_note(e->key, now); /* the present value stays */
    km_entry_answer(e, value);
    return KM_ReplyWithLongLong(ctx, KM_FILL_NOT_STORED);
}

/* KEYMISS.FILL key token value [PX ms] [VERSION tag] [CODEC n] [COST us] [NOSTORE]: store the computed value
 * (a plain SET, replicated as such; its companion first, naming CODEC and VERSION, where it has a
 * codec or a version: km_companion_fill) and wake the key's waiters. 1 if
 * stored; 0 if discarded (a client wrote the key meanwhile: the waiters get the value, the client's
 * write stays; the computation was given up; or it ran under another version than the keyspace's
 * now: then the key is computed again); 2 if the
 * waiters got the value but it is not stored (NOSTORE, over the keyspace's SHARE of maxmemory, or
 * worth less than what it would displace near maxmemory: km_admit). */
int km_cmd_fill(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 4) return KM_WrongArity(ctx);
    long long token;
    if (km_parse_token(argv[2], &token) != RM_OK) return KM_ReplyWithError(ctx, KM_ERR_PREFIX "bad token");
    KmOptionValues opt = {.num = {[KM_N_COST] = -1}};
    int unknown;
    if (km_parse_options(argv, 4, argc, km_fill_options, KM_COUNT_OF(km_fill_options), &opt, &unknown) != RM_OK)
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "FILL key token value [" KM_OPT_PX " ms] [" KM_OPT_VERSION
                                                    " tag] [" KM_OPT_CODEC " n] [" KM_OPT_COST " us] [" KM_OPT_NOSTORE "]");
    long long px = opt.num[KM_N_PX];
    const char *vtag = opt.bytes[KM_T_VERSION];
    size_t vlen = opt.len[KM_T_VERSION];
    if (vlen > KM_MAX_VERSION)
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "a version is 1 to " KM_XSTR(KM_MAX_VERSION) " bytes");
    KmEntry *e = km_entry_find(argv[1]);
    if (e == NULL || e->token != token) {
        int ksi = km_route_str(argv[1]);
        if (ksi >= 0) km.keyspaces[ksi]->discarded_fills++;
        return KM_ReplyWithLongLong(ctx, KM_FILL_DISCARDED);
    }
    KmKeyspace *ks = km.keyspaces[e->ksi];
    ks->computations++; /* the function computed it (whatever becomes of the value): as the Python server counts */
    if (opt.num[KM_N_COST] >= 0) km_observe_compute(ks, (double)opt.num[KM_N_COST] / 1e6); /* its handler time */
    if (ks->version != NULL && (vtag == NULL || vlen != ks->versionlen || memcmp(vtag, ks->version, vlen) != 0)) {
        ks->version_discards++; /* computed under the version before a switch: computed again, once */
        if (++e->version_discards >= 2) { /* no worker computes under this version: readers must not wait on */
            char msg[KM_MAX_ERROR_LEN];
            snprintf(msg, sizeof(msg), KM_ERR_PREFIX "keyspace '%s': its version changed during the computation twice; retry",
                     ks->pattern);
            ks->failures++;
            km_entry_resolve(e, msg);
        } else if (e->state == KM_TAKEN) {
            km_entry_requeue(e);
        }
        return KM_ReplyWithLongLong(ctx, KM_FILL_DISCARDED);
    }
    if (e->superseded) { /* a client wrote the key meanwhile: its write stays, the waiters get this */
        ks->discarded_fills++;
        km_entry_answer(e, argv[3]);
        return KM_ReplyWithLongLong(ctx, KM_FILL_DISCARDED);
    }
    long long now = km_now_ms();
    size_t vlen_bytes;
    KM_StringPtrLen(argv[3], &vlen_bytes);
    if (opt.num[KM_N_NOSTORE] || km_oversized(ctx, ks, vlen_bytes, now))
        return km_fill_unstored(ctx, e, argv[3], opt.num[KM_N_NOSTORE] != 0, now);
    if (px == 0) px = ks->ttl_ms;
    /* Keyspaces live in database 0, whichever database the worker's connection selected. */
    int db = KM_GetSelectedDb(ctx);
    if (db != 0 && KM_SelectDb(ctx, 0) != RM_OK) return KM_ReplyWithError(ctx, KM_ERR_PREFIX "cannot select db 0");
    /* near maxmemory, a value worth less per byte than what it would displace is answered only */
    double cost_ms = opt.num[KM_N_COST] >= 0 ? (double)opt.num[KM_N_COST] / 1000.0 /* COST is in us */
                     : e->taken_at > 0         ? (double)(now - e->taken_at)
                                               : 0.0;
    if (!km_admit(ctx, argv[1], vlen_bytes, cost_ms)) {
        if (db != 0) KM_SelectDb(ctx, db);
        if (e->refresh && e->nwaiters == 0) km_backoff_note(e->key, now); /* the present value stays */
        km_entry_answer(e, argv[3]);
        return KM_ReplyWithLongLong(ctx, KM_FILL_NOT_STORED);
    }
    km.filling = 1;
    RedisModuleCallReply *r = km_companion_fill(ctx, argv[1], argv[3], opt.num[KM_N_CODEC], vtag, vlen, px);
    if (r == NULL)
        r = px > 0 ? KM_Call(ctx, "SET", "!sscl", argv[1], argv[3], "PX", px)
                   : KM_Call(ctx, "SET", "!ss", argv[1], argv[3]);
    km.filling = 0;
    if (db != 0) KM_SelectDb(ctx, db);
    if (r == NULL || KM_CallReplyType(r) == RM_REPLY_ERROR) {
        char msg[KM_MAX_ERROR_LEN];
        snprintf(msg, sizeof(msg), KM_ERR_PREFIX "the value for keyspace '%s' could not be stored (%s)",
                 ks->pattern, r == NULL ? strerror(errno) : "the server refused the write");
        ks->failures++;
        km_entry_resolve(e, msg);
        if (r) {
            KM_ReplyWithCallReply(ctx, r);
            KM_FreeCallReply(r);
            return RM_OK;
        }
        return KM_ReplyWithError(ctx, msg);
    }
    KM_FreeCallReply(r);
    ks->fills++;
    if (KM_DictSize(km.dirty)) { /* a client's earlier write, not yet marked: this value replaced it */
        size_t klen;
        const char *kp = KM_StringPtrLen(argv[1], &klen);
        KM_DictDelC(km.dirty, (void *)kp, klen, NULL);
    }
    if (e->taken_at > 0) {
        double took = (double)(km_now_ms() - e->taken_at);
        ks->mean_compute_ms = ks->mean_compute_ms > 0 ? 0.8 * ks->mean_compute_ms + 0.2 * took : (took > 0 ? took : 1);
    }
    if (KM_DictSize(km.backoffs)) km_backoff_clear(argv[1]);
    km_entry_resolve(e, NULL);
    return KM_ReplyWithLongLong(ctx, KM_FILL_STORED);
}

/* KEYMISS.FAIL key token message [MISMATCH | TIMEOUT]: every waiter gets the error line; the
 * keyspace's error TTL keeps it for later readers. 1 if the key was waiting, 0 if not. The flag
 * says why, for the counters, which mean what the Python server's do: a key that does not fit its
 * template (nothing ran: no error), the function's timeout (timeouts); without one, the function
 * (or storing its value) failed (errors). A BUSY line is busy. Only a FILL is a computation. */
int km_cmd_fail(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 4 && argc != 5) return KM_WrongArity(ctx);
    long long token;
    if (km_parse_token(argv[2], &token) != RM_OK) return KM_ReplyWithError(ctx, KM_ERR_PREFIX "bad token");
    int mismatch = 0, timeout = 0;
    if (argc == 5) {
        size_t flen;
        const char *flag = KM_StringPtrLen(argv[4], &flen);
        mismatch = km_word_is(flag, flen, KM_OPT_MISMATCH);
        timeout = km_word_is(flag, flen, KM_OPT_TIMEOUT);
        if (!mismatch && !timeout)
            return KM_ReplyWithError(ctx, KM_ERR_PREFIX "FAIL key token message [" KM_OPT_MISMATCH " | " KM_OPT_TIMEOUT "]");
    }
    KmEntry *e = km_entry_find(argv[1]);
    if (e == NULL || e->token != token) return KM_ReplyWithLongLong(ctx, 0);
    KmKeyspace *ks = km.keyspaces[e->ksi];
    size_t len;
    const char *msg = KM_StringPtrLen(argv[3], &len);
    char *line = km_error_line(msg, len);
    /* a worker out of handler slots is busy, not a failure of the key: counted as such in INFO,
     * and not remembered (the next read may well be computed) */
    int busy = strncmp(line, "BUSY", 4) == 0;
    if (busy) {
        ks->busy++;
    } else if (timeout) {
        ks->timeouts++;
    } else if (!mismatch) {
        ks->failures++;
    }
    if (e->refresh && e->nwaiters == 0) {
        /* a refresh nobody waits on: the value stays served (stale, if it is); retried later */
        ks->refresh_failures++;
        km_backoff_note(argv[1], km_now_ms());
    } else if (!busy && ks->error_ttl_ms > 0 && !e->superseded) { /* a client's write replaced it */
        km_error_remember(argv[1], line, ks->error_ttl_ms, km_now_ms());
    }
    km_entry_resolve(e, line);
    KM_Free(line);
    return KM_ReplyWithLongLong(ctx, 1);
}
