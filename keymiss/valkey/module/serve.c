/* GET / MGET of a registered keyspace: the command filter and KEYMISS.GET / KEYMISS.MGET decide every
 * read of a key in one function (km_decide: served, stale or early and refreshed, of the replaced
 * version and recomputed, hidden, missing); a miss is queued, waited on or refused by km_serve. */
#include "keymiss.h"

#include <stdio.h>

/* Reply with the key's current value, read by the server's own GET (the filter leaves the module's
 * calls alone): bulk, nil, or for GET a WRONGTYPE error (an MGET reads another type as nil).
 * Reading through the module key API instead would rewrite small values' encoding on every read. */
void km_reply_value(RedisModuleCtx *ctx, RedisModuleString *key, int single) {
    RedisModuleCallReply *r = KM_Call(ctx, "GET", "s", key);
    if (r == NULL) KM_ReplyWithNull(ctx);
    else if (KM_CallReplyType(r) == RM_REPLY_ERROR && !single) KM_ReplyWithNull(ctx);
    else KM_ReplyWithCallReply(ctx, r);
    if (r) KM_FreeCallReply(r);
}

/* What a read does with a key of keyspace ksi, decided here alone for the command filter's GET and
 * MGET and for KEYMISS.GET / KEYMISS.MGET: */
enum {
    KM_HIDDEN = -1, /* present but computed under another version: hidden, recomputed (a miss) */
    KM_MISSING = 0, /* absent: a miss (queued, waited on, or refused: km_serve) */
    KM_SERVE = 1,   /* served as it is; a stale or early one also starts its refresh */
    /* KM_PREVIOUS (2): of the version just replaced, inside VSTALE: served, and recomputed */
};
enum { KM_COUNT_HIT = 1, KM_COUNT_MISS = 2, KM_START_REFRESH = 4 };

/* The decision for `key` (of keyspace ksi), read with the server's lookup `modes`: a served hit is
 * counted with KM_COUNT_HIT, a hidden value with KM_COUNT_MISS; a value of the replaced version
 * always starts its recomputation, a stale or early one with KM_START_REFRESH. */
static int km_decide(RedisModuleCtx *ctx, int ksi, RedisModuleString *key, int modes, int act) {
    RedisModuleKey *open = KM_OpenKey(ctx, key, RM_READ | modes);
    int present = open != NULL && KM_KeyType(open) != RM_KEYTYPE_EMPTY;
    int ok = present ? km_version_ok(ctx, ksi, key, (act & KM_COUNT_MISS) != 0) : KM_MISSING;
    if (ok == KM_MISSING && present) ok = KM_HIDDEN;
    if (ok > 0) {
        if (act & KM_COUNT_HIT) km.keyspaces[ksi]->hits++;
        if (ok == KM_PREVIOUS) km_served_previous(ksi, key, (act & KM_COUNT_HIT) != 0);
        if (act & KM_START_REFRESH) km_on_served(ksi, open, key);
    }
    if (open) KM_CloseKey(open);
    return ok;
}

static void km_no_worker_error(RedisModuleCtx *ctx, KmKeyspace *ks) {
    char msg[KM_MAX_ERROR_LEN];
    ks->no_worker++;
    snprintf(msg, sizeof(msg), KM_ERR_PREFIX "no worker for keyspace '%s'", ks->pattern);
    KM_ReplyWithError(ctx, msg);
}

static void km_busy_error(RedisModuleCtx *ctx, KmKeyspace *ks) {
    char msg[KM_MAX_ERROR_LEN];
    ks->busy++;
    snprintf(msg, sizeof(msg), "BUSY keymiss: the queue of keyspace '%s' is full (%lld)", ks->pattern,
             ks->queue_max);
    KM_ReplyWithError(ctx, msg);
}

/* The values of the keys no entry or error answers (NULL where the key holds no string: it is read
 * again when the request is answered), each its own copy. */
static RedisModuleString **km_read_now(RedisModuleCtx *ctx, RedisModuleString **keys, int nkeys, KmEntry **ents,
                                       char **errs) {
    RedisModuleString **vals = KM_Calloc((size_t)nkeys, sizeof(RedisModuleString *));
    for (int i = 0; i < nkeys; i++) {
        if (ents[i] || errs[i]) continue;
        RedisModuleCallReply *r = KM_Call(ctx, "GET", "s", keys[i]);
        if (r != NULL && KM_CallReplyType(r) == RM_REPLY_STRING) {
            size_t len;
            const char *p = KM_CallReplyStringPtr(r, &len);
            if (p) vals[i] = KM_CreateString(NULL, p, len);
        }
        if (r) KM_FreeCallReply(r);
    }
    return vals;
}

/* The shared body of KEYMISS.GET and KEYMISS.MGET. */
static int km_serve(RedisModuleCtx *ctx, RedisModuleString **keys, int nkeys, int single) {
    int flags = KM_GetContextFlags(ctx);
    /* another database, a replica, or loading: answered as a plain GET / MGET */
    int unrouted = KM_GetSelectedDb(ctx) != 0 || (flags & (RM_CTX_FLAGS_SLAVE | RM_CTX_FLAGS_LOADING));
    int can_block = !(flags & (RM_CTX_FLAGS_DENY_BLOCKING | RM_CTX_FLAGS_MULTI | RM_CTX_FLAGS_LUA));
    int act = KM_COUNT_HIT | KM_COUNT_MISS | KM_START_REFRESH;
    long long now = km_now_ms();
    /* First pass: hits, errors, and what must be computed. Nothing is queued unless the whole
     * command can be served (a no-worker or full-queue key refuses a GET; an MGET reads it as nil). */
    int *ksof = KM_Alloc(sizeof(int) * (size_t)nkeys);
    char *other_version = KM_Calloc((size_t)nkeys, 1); /* present, but computed under another version */
    int misses = 0;
    for (int i = 0; i < nkeys; i++) {
        ksof[i] = unrouted ? -1 : km_route_str(keys[i]);
        if (ksof[i] < 0) continue;
        int ok = km_decide(ctx, ksof[i], keys[i], 0, act);
        if (ok > 0) {
            ksof[i] = -1;
            continue;
        }
        other_version[i] = ok == KM_HIDDEN;
        km.keyspaces[ksof[i]]->misses++;
        misses++;
    }
    if (misses == 0) {
        KM_Free(ksof);
        KM_Free(other_version);
        if (!single) KM_ReplyWithArray(ctx, nkeys);
        for (int i = 0; i < nkeys; i++) km_reply_value(ctx, keys[i], single);
        return RM_OK;
    }
    char **errs = KM_Calloc((size_t)nkeys, sizeof(char *));
    KmEntry **ents = KM_Calloc((size_t)nkeys, sizeof(KmEntry *));
    int waits = 0;
    for (int i = 0; i < nkeys; i++) {
        if (ksof[i] < 0) continue;
        KmKeyspace *ks = km.keyspaces[ksof[i]];
        const char *rec = km_error_fresh(keys[i], now);
        if (rec) {
            errs[i] = km_dup_bytes(rec, strlen(rec));
            continue;
        }
        KmEntry *e = km_entry_find(keys[i]);
        if (e == NULL) {
            /* no worker: the reader waits up to GRACE for one (the tick answers the no-worker
             * error then); where it cannot wait, it is refused at once (an MGET reads it as nil) */
            if (ks->workers == 0 && (!can_block || km.grace_ms == 0)) {
                if (single) {
                    km_no_worker_error(ctx, ks);
                    goto done;
                }
                ks->no_worker++;
                continue;
            }
            /* a full queue first drops a computation nobody waits for (its readers left) */
            if (ks->queued + ks->in_flight >= ks->queue_max && !km_drop_orphan(ksof[i])) {
                /* where blocking is forbidden (MULTI, Lua) a miss reads as nil, a full queue too:
                 * an error would abort a script part-way through its writes */
                if (single && can_block) {
                    km_busy_error(ctx, ks);
                    goto done;
                }
                ks->busy++;
                continue;
            }
            e = km_entry_new(keys[i], ksof[i], now);
        }
        ents[i] = e;
        e->pinned = 1; /* this request waits on it: no other key of it may drop it as an orphan */
        waits++;
    }
    for (int i = 0; i < nkeys; i++)
        if (ents[i]) ents[i]->pinned = 0;
    for (int i = 0; i < nkeys; i++) /* not computing: an old version's value still reads as nil */
        if (other_version[i] && ents[i] == NULL && errs[i] == NULL) errs[i] = km_dup_bytes("", 0);
    if (waits == 0 || !can_block) {
        /* Nothing to wait for, or waiting is forbidden here: the computations stay queued. */
        if (!single) KM_ReplyWithArray(ctx, nkeys);
        for (int i = 0; i < nkeys; i++) {
            if (errs[i] && errs[i][0] && single) KM_ReplyWithError(ctx, errs[i]);
            else if (errs[i] || ents[i]) KM_ReplyWithNull(ctx);
            else km_reply_value(ctx, keys[i], single);
        }
        goto done;
    }
    /* An MGET's keys served as they are read now, not when the last computation comes: a stale
     * one's refresh may be stored before then (each key as a GET now would answer it). */
    RedisModuleString **vals = single ? NULL : km_read_now(ctx, keys, nkeys, ents, errs);
    km_request_block(ctx, keys, nkeys, single, ents, errs, vals, waits); /* takes ents, errs, vals over */
    ents = NULL;
    errs = NULL;
done:
    if (errs)
        for (int i = 0; i < nkeys; i++) KM_Free(errs[i]);
    KM_Free(errs);
    KM_Free(ents);
    KM_Free(ksof);
    KM_Free(other_version);
    return RM_OK;
}

int km_cmd_get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 2) return KM_WrongArity(ctx);
    return km_serve(ctx, argv + 1, 1, 1);
}

int km_cmd_mget(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc < 2) return KM_WrongArity(ctx);
    return km_serve(ctx, argv + 1, argc - 1, 0);
}

/* What the filter knows of the client that sent the command: 1 with *ci filled in, 0 where the
 * server cannot say. Redis 7.0 has no CommandFilterGetClientId: there the filter cannot tell the
 * client's database, MULTI state or user (a delete is taken as the client's write as it arrives);
 * a script's or module's own client has no info either. */
static int km_filter_client(RedisModuleCommandFilterCtx *f, RedisModuleClientInfo *ci, unsigned long long *id) {
    if (KM_CommandFilterGetClientId == NULL || KM_GetClientInfoById == NULL) return 0;
    *id = KM_CommandFilterGetClientId(f);
    memset(ci, 0, sizeof(*ci));
    ci->version = RM_CLIENTINFO_VERSION;
    return KM_GetClientInfoById(ci, *id) == RM_OK;
}

/* Whether the client `id`'s user may run the filter's command (the command and its keys, by its
 * ACL): 1 where the server lacks these calls or the client runs as no user (the server's own). */
static int km_filter_permitted(RedisModuleCommandFilterCtx *f, unsigned long long id, int argc) {
    if (!KM_GetClientUserNameById || !KM_GetModuleUserFromUserName || !KM_ACLCheckCommandPermissions ||
        !KM_FreeModuleUser)
        return 1;
    RedisModuleString *name = KM_GetClientUserNameById(km.filter_ctx, id);
    if (name == NULL) return 1;
    RedisModuleUser *user = KM_GetModuleUserFromUserName(name);
    KM_FreeString(NULL, name);
    if (user == NULL) return 0; /* its user was deleted: the server refuses it */
    RedisModuleString **argv = KM_Alloc(sizeof(*argv) * (size_t)argc);
    for (int i = 0; i < argc; i++) argv[i] = (RedisModuleString *)KM_CommandFilterArgGet(f, i);
    int ok = KM_ACLCheckCommandPermissions(user, argv, argc) == RM_OK;
    KM_Free(argv);
    KM_FreeModuleUser(user);
    return ok;
}

/* A DEL / UNLINK / GETDEL while the key computes is a client's write even where the key is absent
 * (no keyspace event then): its waiters get the computed value, and it is not stored. Only one
 * that will run: right arity and, where the server tells the filter who sent it, a client of
 * database 0, not queueing it in MULTI (EXEC runs no filter: a delete of an absent key inside a
 * transaction does not supersede), whose user may run it. Without that API (Redis 7.0) a delete
 * that is then refused, discarded or sent in another database supersedes all the same. */
static void km_filter_delete(RedisModuleCommandFilterCtx *f, int argc, int getdel) {
    if (KM_DictSize(km.pending) == 0 || (getdel && argc != 2)) return;
    int any = 0;
    for (int i = 1; i < argc && !any; i++) any = km_entry_find(KM_CommandFilterArgGet(f, i)) != NULL;
    if (!any) return;
    RedisModuleClientInfo ci;
    unsigned long long id = 0;
    if (km_filter_client(f, &ci, &id) &&
        (ci.db != 0 || (ci.flags & RM_CLIENTINFO_FLAG_MULTI) || !km_filter_permitted(f, id, argc)))
        return;
    for (int i = 1; i < argc && KM_DictSize(km.pending); i++) {
        KmEntry *e = km_entry_find(KM_CommandFilterArgGet(f, i));
        if (e) km_entry_supersede(e);
    }
}

/* Whether a command runs a script (EVAL, EVALSHA, their _RO forms, FCALL, FCALL_RO). */
static int km_is_script(const char *cmd, size_t len) {
    static const char *const scripts[] = {"eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro"};
    for (size_t i = 0; i < sizeof(scripts) / sizeof(scripts[0]); i++)
        if (km_word_is(cmd, len, scripts[i])) return 1;
    return 0;
}

/* The filter: GET / MGET / GETEX(key only) naming a missing key of a registered keyspace become
 * KEYMISS.GET / KEYMISS.MGET; a delete of a key being computed supersedes it (km_filter_delete). */
void km_command_filter(RedisModuleCommandFilterCtx *f) {
    if (KM_DictSize(km.refused) && km_filter_refused(f)) return; /* a connection past MAXCLIENTS */
    if (km.nkeyspaces == 0) return;
    int argc = KM_CommandFilterArgsCount(f);
    if (argc < 2) return;
    size_t len;
    const char *cmd = KM_StringPtrLen(KM_CommandFilterArgGet(f, 0), &len);
    if (len >= 4 && (cmd[0] | 0x20) != 'g' && (cmd[0] | 0x20) != 'm' && km_is_script(cmd, len)) {
        km.script_epoch++; /* a script starts: km_on_keyspace_event tells its writes from others' */
        return;
    }
    if (km_word_is(cmd, len, "del") || km_word_is(cmd, len, "unlink") || km_word_is(cmd, len, "getdel")) {
        km_filter_delete(f, argc, km_word_is(cmd, len, "getdel"));
        return;
    }
    RedisModuleString *to;
    if (km_word_is(cmd, len, "get") || km_word_is(cmd, len, "getex")) {
        if (argc != 2) return;
        to = km.get_name;
    } else if (km_word_is(cmd, len, "mget")) {
        to = km.mget_name;
    } else {
        return;
    }
    /* A key that is present is the server's own: GET stays GET, at the server's speed. Only a
     * command naming a missing key of a keyspace goes through keymiss. The lookup neither touches
     * the key's LRU/LFU, counts, notifies, nor (where the server can avoid it) expires: the GET that
     * follows does what a GET does. Database 0 is the keyspaces' database (a cluster has no other);
     * KEYMISS.GET answers clients of other databases as a plain GET. A GET's hit is counted and
     * refreshed here; an MGET's keys are refreshed once every one of them is known present (else
     * KEYMISS.MGET serves them all, and does). */
    int rewrite = 0, fresh = 0, asked = 0;
    for (int i = 1; i < argc && !rewrite; i++) {
        RedisModuleString *key = (RedisModuleString *)KM_CommandFilterArgGet(f, i);
        int ksi = km_route_str(key);
        if (ksi < 0) continue;
        if (!asked && (km.keyspaces[ksi]->stale_ms > 0 || km.keyspaces[ksi]->early_milli > 0)) {
            /* another database's read is a plain one: it refreshes nothing, where the server says
             * which database the client is in (Redis 7.0 does not: there it may refresh database
             * 0's key). Asked only where a hit may start a refresh, so a plain hit makes no client
             * lookup: a read of another database's key of the same name counts for admission's
             * frequency as a read of database 0's (it can raise a key's worth, never lose one). */
            RedisModuleClientInfo ci;
            unsigned long long id = 0;
            asked = 1;
            if (km_filter_client(f, &ci, &id) && ci.db != 0) return;
        }
        /* admission's frequency: bytes only, no lookup. An MGET naming a key n times counts n
         * reads, as n GETs do: a cap would cost a comparison with every other key named */
        if (km.maxmemory) km_sketch_add(key);
        /* missing, or computed under another version: KEYMISS.GET decides (and counts) */
        rewrite = km_decide(km.filter_ctx, ksi, key, km.lookup_modes, argc == 2 ? KM_COUNT_HIT | KM_START_REFRESH : 0) <= 0;
        fresh |= km.keyspaces[ksi]->stale_ms > 0 || km.keyspaces[ksi]->early_milli > 0;
    }
    if (fresh && !rewrite && argc > 2) { /* every key is served as it is: stale or early ones refresh */
        for (int i = 1; i < argc; i++) {
            RedisModuleString *key = (RedisModuleString *)KM_CommandFilterArgGet(f, i);
            int ksi = km_route_str(key);
            if (ksi >= 0 && (km.keyspaces[ksi]->stale_ms > 0 || km.keyspaces[ksi]->early_milli > 0))
                km_decide(km.filter_ctx, ksi, key, km.lookup_modes, KM_START_REFRESH);
        }
    }
    if (rewrite) {
        KM_RetainString(NULL, to); /* the filter takes one reference */
        KM_CommandFilterArgReplace(f, 0, to);
    }
}
