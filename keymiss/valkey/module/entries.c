/* Pending entries (one computation of a key each), their queues, the blocked GET/MGET requests
 * waiting on them, and waking a blocked TAKE when a key is queued. */
#include "keymiss.h"

#include <stdio.h>

/* ---------------------------------------------------------------------------------------------- */
/* Queues and takers                                                                              */

static void km_queue_push(KmEntry *e, int front) {
    KmKeyspace *ks = km.keyspaces[e->ksi];
    e->state = KM_QUEUED;
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
    if (e->nwaiters == 0) ks->orphans++;
}

static void km_queue_unlink(KmEntry *e) {
    KmKeyspace *ks = km.keyspaces[e->ksi];
    if (e->prev) e->prev->next = e->next;
    else ks->qhead = e->next;
    if (e->next) e->next->prev = e->prev;
    else ks->qtail = e->prev;
    e->prev = e->next = NULL;
    ks->queued--;
    if (e->nwaiters == 0) ks->orphans--;
}

/* The blocked TAKE at *link leaves km.takers and is answered: its reply takes what is queued then. */
void km_taker_wake(KmTaker **link) {
    KmTaker *t = *link;
    *link = t->next;
    t->next = NULL;
    t->woken = 1;
    KM_UnblockClient(t->bc, t);
}

/* Wake one blocked taker that serves keyspace ksi. */
void km_wake_taker(int ksi) {
    for (KmTaker **link = &km.takers; *link; link = &(*link)->next) {
        KmTaker *t = *link;
        if (!t->woken && (t->mask & ((uint64_t)1 << ksi))) {
            km_taker_wake(link);
            return;
        }
    }
}

/* ---------------------------------------------------------------------------------------------- */
/* Entries                                                                                        */

/* A fresh token: 62 bits from the server's CSPRNG (HMAC-SHA256 in counter mode over a seed read
 * from /dev/urandom), never 0. One token tells nothing of another: a FILL must come from the
 * connection that was handed the key, not from whoever can count. */
static long long km_new_token(void) {
    uint64_t z = 0;
    while (z == 0) {
        KM_GetRandomBytes((unsigned char *)&z, sizeof(z));
        z &= 0x3fffffffffffffffULL;
    }
    return (long long)z;
}

/* A computation of `key` for keyspace ksi, queued (a blocked taker is woken for it). */
KmEntry *km_entry_new(RedisModuleString *key, int ksi, long long now) {
    KmKeyspace *ks = km.keyspaces[ksi];
    KmEntry *e = KM_Calloc(1, sizeof(*e));
    e->key = KM_CreateStringFromString(NULL, key);
    e->ksi = ksi;
    e->token = km_new_token();
    e->deadline = now + ks->timeout_ms;
    e->born = now;
    size_t klen;
    const char *kp = KM_StringPtrLen(e->key, &klen);
    KM_DictSetC(km.pending, (void *)kp, klen, e);
    km_queue_push(e, 0);
    km_wake_taker(ksi);
    return e;
}

KmEntry *km_entry_find(const RedisModuleString *key) {
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    return KM_DictGetC(km.pending, (void *)kp, klen, NULL);
}

/* A worker (`client`) takes a queued entry, for lease_ms. */
void km_entry_take(KmEntry *e, unsigned long long client, long long now, long long lease_ms) {
    km_queue_unlink(e);
    e->state = KM_TAKEN;
    e->taker = client;
    e->lease_deadline = now + lease_ms;
    e->taken_at = now;
    e->attempts++;
    km.keyspaces[e->ksi]->in_flight++;
}

/* A taken entry goes back to the front of its queue under a new token (one taker at a time: the
 * one it was taken from can no longer fill it), and a blocked taker is woken for it. */
void km_entry_requeue(KmEntry *e) {
    km.keyspaces[e->ksi]->in_flight--;
    e->taker = 0;
    e->token = km_new_token();
    km_queue_push(e, 1);
    km_wake_taker(e->ksi);
}

/* The worker that took an entry lost it (its lease passed, or it went away): requeued, and failed
 * once it has been lost KM_MAX_ATTEMPTS times (a key that keeps losing its workers, or killing them). */
void km_entry_lost(KmEntry *e) {
    KmKeyspace *ks = km.keyspaces[e->ksi];
    if (e->state != KM_TAKEN) return;
    if (e->superseded && e->nwaiters == 0) { /* nobody needs its value any more */
        km_entry_resolve(e, NULL);
        return;
    }
    if (e->attempts >= KM_MAX_ATTEMPTS) {
        char msg[KM_MAX_ERROR_LEN];
        ks->failures++;
        snprintf(msg, sizeof(msg), KM_ERR_PREFIX "keyspace '%s' lost the key's computation %d times",
                 ks->pattern, e->attempts);
        km_entry_resolve(e, msg);
        return;
    }
    ks->requeues++;
    km_entry_requeue(e);
}

static void km_entry_add_waiter(KmEntry *e, KmRequest *req, int idx) {
    if (e->nwaiters == 0 && e->state == KM_QUEUED) km.keyspaces[e->ksi]->orphans--;
    if (e->nwaiters == e->capwaiters) {
        e->capwaiters = e->capwaiters ? e->capwaiters * 2 : 4;
        e->waiters = KM_Realloc(e->waiters, sizeof(KmWaiter) * (size_t)e->capwaiters);
    }
    e->waiters[e->nwaiters].req = req;
    e->waiters[e->nwaiters].idx = idx;
    e->nwaiters++;
}

/* Every slot of `req` leaves `e`, in one pass over e's waiters (an MGET may name a key many times:
 * slot by slot this was quadratic). */
static void km_entry_drop_request(KmEntry *e, KmRequest *req) {
    int n = 0;
    for (int i = 0; i < e->nwaiters; i++) {
        if (e->waiters[i].req == req) req->entries[e->waiters[i].idx] = NULL;
        else e->waiters[n++] = e->waiters[i];
    }
    if (n == 0 && e->nwaiters > 0 && e->state == KM_QUEUED) km.keyspaces[e->ksi]->orphans++;
    e->nwaiters = n;
}

static void km_request_finish(KmRequest *req) {
    km.waiting--;
    KM_DictDelC(km.requests, &req->bc, sizeof(req->bc), NULL);
    KM_UnblockClient(req->bc, req); /* the reply callback reads the keys now; km_free_request frees */
}

/* The computation of an entry is over: a value is in the keyspace (or a client wrote one), it was
 * computed but not stored (`value`, given to each waiter), or it failed with `err` (copied). Every
 * waiter's slot resolves; the entry is gone afterwards. */
static void km_entry_finish(KmEntry *e, const char *err, RedisModuleString *value) {
    KmKeyspace *ks = km.keyspaces[e->ksi];
    size_t klen;
    const char *kp = KM_StringPtrLen(e->key, &klen);
    KM_DictDelC(km.pending, (void *)kp, klen, NULL);
    if (e->state == KM_QUEUED) km_queue_unlink(e);
    else ks->in_flight--;
    for (int i = 0; i < e->nwaiters; i++) {
        KmRequest *req = e->waiters[i].req;
        int idx = e->waiters[i].idx;
        req->entries[idx] = NULL;
        if (err) {
            req->errors[idx] = km_dup_bytes(err, strlen(err));
        } else if (value) {
            /* one reference a slot (a copy only of a string the server cannot share), freed by
             * km_free_request; none: the slot reads the keyspace, as a stored value would */
            if (req->values == NULL) req->values = KM_Calloc((size_t)req->nkeys, sizeof(RedisModuleString *));
            req->values[idx] = KM_HoldString(NULL, value);
        }
        if (--req->pending == 0) km_request_finish(req);
    }
    KM_Free(e->waiters);
    KM_FreeString(NULL, e->key);
    KM_Free(e);
}

void km_entry_resolve(KmEntry *e, const char *err) {
    km_entry_finish(e, err, NULL);
}

/* A client wrote the key (SET, DEL, RENAME onto it, a flush ...) while it computes: the client's
 * write stays, and the computation goes on for the readers already waiting, who get its value when
 * the fill comes (not stored: km_entry_answer). One nobody waits on is given up now. */
void km_entry_supersede(KmEntry *e) {
    if (e->superseded) return;
    km.keyspaces[e->ksi]->superseded++;
    if (e->nwaiters == 0) km_entry_resolve(e, NULL); /* its late fill is discarded */
    else e->superseded = 1;
}

/* Whether e waits on a keyspace that has had no worker for GRACE (counted from when its last
 * worker went, or from when e was queued, whichever is later). A taken entry has a live worker. */
int km_entry_workerless(const KmEntry *e, long long now) {
    const KmKeyspace *ks = km.keyspaces[e->ksi];
    if (ks->workers > 0 || e->state != KM_QUEUED) return 0;
    long long since = ks->workerless_since > e->born ? ks->workerless_since : e->born;
    return now - since >= km.grace_ms;
}

/* No worker came for the keyspace within GRACE: every waiter gets the no-worker error. */
void km_entry_no_worker(KmEntry *e) {
    KmKeyspace *ks = km.keyspaces[e->ksi];
    char msg[KM_MAX_ERROR_LEN];
    ks->no_worker += e->nwaiters;
    snprintf(msg, sizeof(msg), KM_ERR_PREFIX "no worker for keyspace '%s'", ks->pattern);
    km_entry_resolve(e, msg);
}

/* The value was computed but is not stored: each waiter gets it, later readers compute it again. */
void km_entry_answer(KmEntry *e, RedisModuleString *value) {
    km_entry_finish(e, NULL, value);
}

/* A queued computation nobody waits for is given up before it starts (its keyspace is full). */
void km_entry_drop(KmEntry *e) {
    km.keyspaces[e->ksi]->dropped++;
    km_entry_finish(e, NULL, NULL);
}

/* Make room in a full keyspace: its oldest queued entry nobody waits on is dropped. 1 if one was. */
int km_drop_orphan(int ksi) {
    KmKeyspace *ks = km.keyspaces[ksi];
    if (ks->orphans <= 0) return 0;
    for (KmEntry *e = ks->qhead; e; e = e->next) {
        if (e->nwaiters == 0 && !e->pinned) {
            km_entry_drop(e);
            return 1;
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Blocked requests                                                                               */

static void km_free_request(RedisModuleCtx *ctx, void *privdata) {
    (void)ctx;
    KmRequest *req = privdata;
    if (req == NULL) return;
    for (int i = 0; i < req->nkeys; i++) {
        KM_FreeString(NULL, req->keys[i]);
        KM_Free(req->errors[i]);
        if (req->values && req->values[i]) KM_FreeString(NULL, req->values[i]);
    }
    KM_Free(req->values);
    KM_Free(req->keys);
    KM_Free(req->entries);
    KM_Free(req->errors);
    KM_Free(req);
}

static int km_request_reply(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    KmRequest *req = KM_GetBlockedClientPrivateData(ctx);
    if (!req->single) KM_ReplyWithArray(ctx, req->nkeys);
    for (int i = 0; i < req->nkeys; i++) {
        /* an empty error: a value of another version, not to be read (nil) */
        if (req->errors[i] && req->errors[i][0] && req->single) KM_ReplyWithError(ctx, req->errors[i]);
        else if (req->errors[i]) KM_ReplyWithNull(ctx); /* MGET: a failed key reads as missing */
        else if (req->values && req->values[i]) KM_ReplyWithString(ctx, req->values[i]); /* not stored */
        else km_reply_value(ctx, req->keys[i], req->single);
    }
    return RM_OK;
}

/* Stop waiting: the client timed out or went away. Its slots leave their entries, which go on. */
static void km_request_abandon(KmRequest *req) {
    for (int i = 0; i < req->nkeys; i++)
        if (req->entries[i]) km_entry_drop_request(req->entries[i], req);
    req->pending = 0;
    km.waiting--;
    KM_UnblockClient(req->bc, req); /* frees it: no reply is sent to a client no longer blocked */
}

static KmRequest *km_blocked_request(RedisModuleCtx *ctx) {
    RedisModuleBlockedClient *bc = KM_GetBlockedClientHandle(ctx);
    KmRequest *req = NULL;
    if (bc && KM_DictDelC(km.requests, &bc, sizeof(bc), &req) != RM_OK) req = NULL;
    return req;
}

static int km_request_timeout(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    KmRequest *req = km_blocked_request(ctx);
    const char *pattern = "?";
    if (req) {
        int ksi = km_route_str(req->keys[0]);
        if (ksi >= 0) pattern = km.keyspaces[ksi]->pattern;
        km_request_abandon(req);
    }
    char msg[KM_MAX_ERROR_LEN];
    snprintf(msg, sizeof(msg), KM_ERR_PREFIX "timed out waiting for keyspace '%s'", pattern);
    return KM_ReplyWithError(ctx, msg);
}

static void km_request_disconnected(RedisModuleCtx *ctx, RedisModuleBlockedClient *bc) {
    (void)ctx;
    KmRequest *req = NULL;
    if (KM_DictDelC(km.requests, &bc, sizeof(bc), &req) == RM_OK && req) km_request_abandon(req);
}

/* Block the client on `waits` entries: ents[i] is the entry slot i waits on (NULL: answered from
 * the keyspace, or by errs[i], or by vals[i] (a value read when the request was decided), when the
 * request is), taken over with errs and vals (which may be NULL). */
void km_request_block(RedisModuleCtx *ctx, RedisModuleString **keys, int nkeys, int single, KmEntry **ents,
                      char **errs, RedisModuleString **vals, int waits) {
    KmRequest *req = KM_Calloc(1, sizeof(*req));
    req->single = single;
    req->nkeys = nkeys;
    req->pending = waits;
    req->keys = KM_Alloc(sizeof(RedisModuleString *) * (size_t)nkeys);
    req->entries = ents;
    req->errors = errs;
    req->values = vals;
    for (int i = 0; i < nkeys; i++) {
        req->keys[i] = KM_CreateStringFromString(NULL, keys[i]);
        if (req->entries[i]) km_entry_add_waiter(req->entries[i], req, i);
    }
    /* No server timeout: every entry has a deadline the tick enforces, which answers the request.
     * (Redis 7.0 drops the reply of a client unblocked in the loop iteration its server timeout
     * comes due.) The timeout callback still serves CLIENT UNBLOCK. */
    req->bc = KM_BlockClient(ctx, km_request_reply, km_request_timeout, km_free_request, 0);
    if (req->bc == NULL) { /* cannot happen where blocking is allowed; answer nil rather than hang */
        for (int i = 0; i < nkeys; i++)
            if (req->entries[i]) km_entry_drop_request(req->entries[i], req);
        km_free_request(ctx, req);
        if (!single) KM_ReplyWithArray(ctx, nkeys);
        for (int i = 0; i < nkeys; i++) KM_ReplyWithNull(ctx);
        return;
    }
    KM_SetDisconnectCallback(req->bc, km_request_disconnected);
    KM_DictSetC(km.requests, &req->bc, sizeof(req->bc), req);
    km.waiting++;
}
