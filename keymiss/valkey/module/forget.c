/* KEYMISS.FORGET pattern | KEYMISS.FORGET TAG tag: forget computed values, in steps.
 *
 * Which keys: those a keyspace owns that match the glob (a keyspace's own name, as KEYMISS KEYSPACES
 * prints it, means all of its keys), or that carry the tag (tags.c); each goes with its companion.
 * A glob under `keymiss:` names keymiss's own records instead (contexts; never the companions, which
 * follow their values). A glob no keyspace's keys can match, or a tag no keyspace declares, is
 * refused: FORGET invalidates a cache, DEL removes other keys.
 *
 * How: the caller blocks (the server does not) while a timer walks the database with a SCAN cursor,
 * KM_FORGET_STEP keys a step, each step its own turn of the event loop, and UNLINKs what it takes (replicated
 * as UNLINK); the reply is how many values were forgotten. What it must not touch:
 *  - a computation of a matching key running when it starts is superseded at once, as DEL does (its
 *    readers get the value; it is not stored), and remembered failures of matching keys are forgotten;
 *  - a key written after it started (a fill, a client's SET) is spared: it is newer than the forget;
 *  - a key its caller's user may not delete (ACL key patterns) is kept, its computation and
 *    remembered failure too, and the reply is NOPERM. A user whose key patterns do not cover the
 *    glob itself (or the tag's keys: their template, bound fields filled in) is refused at once,
 *    before any key is looked at, so the reply never depends on keys it may not touch.
 *  - a key over KM_MAX_ROUTED_KEY bytes is no keyspace's (never computed), as on every front end.
 * SWAPDB of database 0 stops it: its reply is an error saying how many it forgot before.
 * Several may run at once, each with its own cursor; a caller that leaves does not stop one. */
#include "keymiss.h"

#include <stdio.h>

typedef struct KmForget {
    RedisModuleBlockedClient *bc;
    RedisModuleScanCursor *cursor;
    RedisModuleString *user; /* the caller's user (checked each step), or NULL where the server has no ACL calls */
    char *glob;              /* by glob (NULL: by matches) */
    size_t globlen;
    int own; /* the glob names keymiss's own records */
    KmTagMatch *matches;
    int nmatches;
    RedisModuleDict *spared; /* keys written since it started */
    RedisModuleString **batch;
    size_t nbatch, capbatch, visited;
    long long deleted, refused;
    const char *error;
    struct KmForget *prev, *next;
} KmForget;

typedef struct KmForgotten { /* what the caller is answered */
    long long deleted, refused;
    const char *error;
} KmForgotten;

static KmForget *km_forgets;

static int km_is_companion(const char *kp, size_t klen) {
    return klen >= KM_COMPANION_PREFIX_LEN && memcmp(kp, KM_COMPANION_PREFIX, KM_COMPANION_PREFIX_LEN) == 0;
}

static int km_is_own(const char *kp, size_t klen) {
    return klen >= sizeof(KM_OWN_PREFIX) - 1 && memcmp(kp, KM_OWN_PREFIX, sizeof(KM_OWN_PREFIX) - 1) == 0;
}

/* Whether the job takes this key. */
static int km_forget_wants(const KmForget *job, const char *kp, size_t klen) {
    if (klen > KM_MAX_ROUTED_KEY) return 0;
    if (km_is_own(kp, klen)) {
        return job->own && !km_is_companion(kp, klen) && km_glob_match(job->glob, job->globlen, kp, klen);
    }
    int ksi = km_route(kp, klen);
    if (ksi < 0) return 0;
    if (job->glob != NULL) return !job->own && km_glob_match(job->glob, job->globlen, kp, klen);
    for (int i = 0; i < job->nmatches; i++)
        if (km_tag_match_key(&job->matches[i], ksi, kp, klen)) return 1;
    return 0;
}

static void km_forget_scanned(RedisModuleCtx *ctx, RedisModuleString *keyname, RedisModuleKey *key, void *privdata) {
    (void)ctx;
    (void)key;
    KmForget *job = privdata;
    size_t klen;
    const char *kp = KM_StringPtrLen(keyname, &klen);
    job->visited++;
    if (!km_forget_wants(job, kp, klen)) return;
    if (job->nbatch == job->capbatch) {
        job->capbatch = job->capbatch ? job->capbatch * 2 : 64;
        job->batch = KM_Realloc(job->batch, sizeof(RedisModuleString *) * job->capbatch);
    }
    job->batch[job->nbatch++] = KM_CreateStringFromString(NULL, keyname);
}

static int km_forget_reply(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    KmForgotten *r = KM_GetBlockedClientPrivateData(ctx);
    char line[300];
    if (r->error) {
        snprintf(line, sizeof(line), "%s (%lld values were forgotten before)", r->error, r->deleted);
        return KM_ReplyWithError(ctx, line);
    }
    if (r->refused > 0) {
        snprintf(line, sizeof(line), "NOPERM keymiss: %lld keys forgotten; others kept: this user may not delete them",
                 r->deleted);
        return KM_ReplyWithError(ctx, line);
    }
    return KM_ReplyWithLongLong(ctx, r->deleted);
}

static void km_forget_free_reply(RedisModuleCtx *ctx, void *privdata) {
    (void)ctx;
    KM_Free(privdata);
}

static void km_forget_free(KmForget *job) {
    for (size_t i = 0; i < job->nbatch; i++) KM_FreeString(NULL, job->batch[i]);
    KM_Free(job->batch);
    if (job->cursor) KM_ScanCursorDestroy(job->cursor);
    if (job->user) KM_FreeString(NULL, job->user);
    KM_Free(job->glob);
    km_tag_matches_free(job->matches, job->nmatches);
    if (job->spared) KM_FreeDict(NULL, job->spared);
    KM_Free(job);
}

static void km_forget_end(KmForget *job) {
    KmForgotten *r = KM_Calloc(1, sizeof(*r));
    r->deleted = job->deleted;
    r->refused = job->refused;
    r->error = job->error;
    KM_UnblockClient(job->bc, r); /* a caller that left: freed without a reply */
    if (job->prev) job->prev->next = job->next;
    else km_forgets = job->next;
    if (job->next) job->next->prev = job->prev;
    km_forget_free(job);
}

/* Database 0 was swapped with another: the rest of the walk would take keys of the other dataset
 * (and its cursor means nothing there), so each job stops at its next step with `why`. */
void km_forget_abort(const char *why) {
    for (KmForget *job = km_forgets; job; job = job->next)
        if (job->error == NULL) job->error = why;
}

/* Whether the user may delete `key` (every user may where the server has no ACL calls). */
static int km_forget_may(RedisModuleUser *user, const char *kp, size_t klen) {
    if (user == NULL) return 1;
    RedisModuleString *s = KM_CreateString(NULL, kp, klen);
    int ok = KM_ACLCheckKeyPermissions(user, s, (int)RM_CMD_KEY_DELETE) == RM_OK;
    KM_FreeString(NULL, s);
    return ok;
}

/* Whether the user's key patterns cover what the job names, taken as a key name: the glob, or each
 * tag match's scope. A user who may not is refused before any key is looked at. */
static int km_forget_covered(const KmForget *job, RedisModuleUser *user) {
    if (user == NULL) return 1;
    if (job->glob != NULL) return km_forget_may(user, job->glob, job->globlen);
    for (int i = 0; i < job->nmatches; i++) {
        size_t len = 0;
        char *scope = km_tag_match_scope(&job->matches[i], &len);
        int ok = scope == NULL || km_forget_may(user, scope, len);
        KM_Free(scope);
        if (!ok) return 0;
    }
    return 1;
}

/* One key: UNLINKed with its companion unless it was written since the job began or its caller
 * may not delete it. */
static void km_forget_one(RedisModuleCtx *ctx, KmForget *job, RedisModuleUser *user, RedisModuleString *key) {
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    int nokey = 1;
    if (KM_DictSize(job->spared)) KM_DictGetC(job->spared, (void *)kp, klen, &nokey);
    if (!nokey) return;
    if (user != NULL && KM_ACLCheckKeyPermissions(user, key, (int)RM_CMD_KEY_DELETE) != RM_OK) {
        job->refused++;
        return;
    }
    RedisModuleCallReply *r = KM_Call(ctx, "UNLINK", "!s", key);
    if (r == NULL) return;
    int gone = KM_CallReplyType(r) == RM_REPLY_INTEGER && KM_CallReplyInteger(r) > 0;
    KM_FreeCallReply(r);
    if (!gone) return;
    job->deleted++;
    if (km_is_own(kp, klen)) return;
    RedisModuleString *cname = km_companion_name(key);
    RedisModuleKey *open = KM_OpenKey(ctx, cname, RM_READ | km.lookup_modes);
    int has = open != NULL && KM_KeyType(open) != RM_KEYTYPE_EMPTY; /* most values have none */
    if (open) KM_CloseKey(open);
    if (has && (r = KM_Call(ctx, "UNLINK", "!s", cname)) != NULL) KM_FreeCallReply(r);
    KM_FreeString(NULL, cname);
}

static void km_forget_step(RedisModuleCtx *ctx, void *data) {
    KmForget *job = data;
    RedisModuleUser *user = NULL;
    if (job->error) { /* stopped by an event since its last step */
    } else if (KM_GetContextFlags(ctx) & RM_CTX_FLAGS_SLAVE) job->error = KM_ERR_PREFIX "the server became a replica";
    else if (KM_SelectDb(ctx, 0) != RM_OK) job->error = KM_ERR_PREFIX "database 0 cannot be selected";
    else if (job->user && (user = KM_GetModuleUserFromUserName(job->user)) == NULL)
        job->error = KM_ERR_PREFIX "the user that asked was deleted";
    if (job->error) {
        km_forget_end(job);
        return;
    }
    int more = 1;
    job->visited = 0;
    while (more && job->visited < KM_FORGET_STEP) more = KM_Scan(ctx, job->cursor, km_forget_scanned, job);
    for (size_t i = 0; i < job->nbatch; i++) {
        km_forget_one(ctx, job, user, job->batch[i]);
        KM_FreeString(NULL, job->batch[i]);
    }
    job->nbatch = 0;
    if (user) KM_FreeModuleUser(user);
    if (!more) km_forget_end(job);
    else KM_CreateTimer(ctx, KM_FORGET_PAUSE_MS, km_forget_step, job);
}

/* A key written (not deleted) while forgets run is newer than them: they spare it. */
void km_forget_spare(RedisModuleString *key) {
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    for (KmForget *job = km_forgets; job; job = job->next) KM_DictSetC(job->spared, (void *)kp, klen, NULL);
}

/* At the start: computations of the job's keys that its user may delete are superseded, their
 * remembered failures forgotten (another user's fill of a key this one may not delete is kept). */
static void km_forget_pending(KmForget *job, RedisModuleUser *user) {
    size_t n;
    KmPicked *all = km_dict_pick(km.pending, NULL, NULL, 0, &n);
    for (size_t i = 0; i < n; i++) {
        KmEntry *e = all[i].val;
        size_t klen;
        const char *kp = KM_StringPtrLen(e->key, &klen);
        if (!km_forget_wants(job, kp, klen)) continue;
        if (user != NULL && KM_ACLCheckKeyPermissions(user, e->key, (int)RM_CMD_KEY_DELETE) != RM_OK) job->refused++;
        else km_entry_supersede(e);
    }
    km_picked_free(all, n);
    KmPicked *errs = km_dict_pick(km.errors, NULL, NULL, 1, &n);
    for (size_t i = 0; i < n; i++) {
        if (!km_forget_wants(job, errs[i].key, errs[i].len)) continue;
        if (km_forget_may(user, errs[i].key, errs[i].len)) km_error_forget(errs[i].key, errs[i].len);
        else job->refused++;
    }
    km_picked_free(errs, n);
}

/* Whether some keyspace's keys could match the glob: its literal head and a keyspace's agree. */
static int km_glob_reaches_keyspace(const char *glob, size_t len) {
    size_t head = km_glob_prefix_len(glob, len);
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++) {
        const KmKeyspace *ks = km.keyspaces[ksi];
        if (ks->glob == NULL) continue;
        size_t n = head < ks->prefixlen ? head : ks->prefixlen;
        if (memcmp(glob, ks->glob, n) == 0) return 1;
    }
    return 0;
}

int km_cmd_forget(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (argc != 2 && argc != 3) return KM_WrongArity(ctx);
    size_t len, wlen;
    const char *arg = KM_StringPtrLen(argv[argc - 1], &len);
    const char *word = KM_StringPtrLen(argv[1], &wlen);
    if (argc == 3 && !km_word_is(word, wlen, KM_OPT_TAG))
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "FORGET takes a pattern, or " KM_OPT_TAG " and a tag");
    if (len == 0 || len > KM_MAX_GLOB) return KM_ReplyWithError(ctx, KM_ERR_PREFIX "a pattern or tag is 1 to " KM_XSTR(KM_MAX_GLOB) " bytes");
    if (KM_GetContextFlags(ctx) & (RM_CTX_FLAGS_MULTI | RM_CTX_FLAGS_LUA | RM_CTX_FLAGS_DENY_BLOCKING))
        return KM_ReplyWithError(ctx, KM_ERR_PREFIX "FORGET cannot run inside MULTI or a script");
    if (KM_GetSelectedDb(ctx) != 0) return KM_ReplyWithError(ctx, KM_ERR_PREFIX "keyspaces live in database 0");
    KmForget *job = KM_Calloc(1, sizeof(*job));
    if (argc == 3) {
        job->matches = km_tag_matches(arg, len, &job->nmatches);
        if (job->nmatches == 0) {
            KM_Free(job);
            return KM_ReplyWithError(ctx, KM_ERR_PREFIX "no keyspace declares that tag");
        }
    } else {
        int ksi = km_keyspace_find(arg, len);
        if (ksi >= 0) { /* a keyspace's name: all of its keys */
            job->matches = KM_Calloc(1, sizeof(KmTagMatch));
            job->nmatches = 1;
            job->matches[0].patlen = len;
            job->matches[0].pattern = km_dup_bytes(arg, len);
        } else {
            job->own = km_is_own(arg, len);
            if (!job->own && !km_glob_reaches_keyspace(arg, len)) {
                KM_Free(job);
                return KM_ReplyWithError(ctx, KM_ERR_PREFIX "no keyspace's keys match that pattern (FORGET forgets "
                                                            "computed values; DEL removes other keys)");
            }
            job->glob = km_dup_bytes(arg, len);
            job->globlen = len;
        }
    }
    RedisModuleUser *user = NULL;
    if (KM_GetCurrentUserName && KM_GetModuleUserFromUserName && KM_FreeModuleUser && KM_ACLCheckKeyPermissions) {
        job->user = KM_GetCurrentUserName(ctx); /* NULL: no user to check (as for the steps) */
        if (job->user != NULL && ((user = KM_GetModuleUserFromUserName(job->user)) == NULL ||
                                  !km_forget_covered(job, user))) {
            if (user) KM_FreeModuleUser(user);
            km_forget_free(job);
            return KM_ReplyWithError(ctx, "NOPERM keymiss: this user may not delete every key that pattern or tag "
                                          "can name (its ACL key patterns must cover it)");
        }
    }
    job->cursor = KM_ScanCursorCreate();
    job->spared = KM_CreateDict(NULL);
    km_forget_pending(job, user);
    if (user) KM_FreeModuleUser(user);
    job->next = km_forgets;
    if (km_forgets) km_forgets->prev = job;
    km_forgets = job;
    job->bc = KM_BlockClient(ctx, km_forget_reply, NULL, km_forget_free_reply, 0);
    KM_CreateTimer(ctx, 0, km_forget_step, job);
    return RM_OK;
}
