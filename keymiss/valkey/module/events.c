/* Events: client writes (keyspace events), workers going away, the keyspace changing wholesale
 * (flush, swap, load), and the tick that enforces deadlines and leases. */
#include "keymiss.h"

#include <stdio.h>

/* What a keyspace event did to its key. Only a write changes the value: a TTL change (EXPIRE,
 * PERSIST, GETEX with options: "expire", "persist") keeps the value and its version mark, and the
 * server expiring or evicting it ("expired", "evicted") is no client's doing. Every other event of
 * a key (set, del, rename_from/rename_to, move_from/move_to, copy_to, restore, incrby, append,
 * setrange, the other types' writes ...) is a write. */
enum { KM_EVENT_WRITE, KM_EVENT_TTL, KM_EVENT_GONE };

static int km_event_kind(int type, const char *event) {
    if ((type & (RM_NOTIFY_EXPIRED | RM_NOTIFY_EVICTED)) || strcmp(event, "expired") == 0 ||
        strcmp(event, "evicted") == 0)
        return KM_EVENT_GONE;
    if (strcmp(event, "expire") == 0 || strcmp(event, "persist") == 0) return KM_EVENT_TTL;
    return KM_EVENT_WRITE;
}

/* The note of `kp` (a key noted in km.dirty) becomes `note`. */
static void km_note_set(const char *kp, size_t klen, uintptr_t note) {
    KM_DictDelC(km.dirty, (void *)kp, klen, NULL);
    KM_DictSetC(km.dirty, (void *)kp, klen, (void *)note);
}

/* A companion written by a client (not by us) while its value is noted. The Python Redis store
 * writes a value and then its companion in one script: a companion written by the same script
 * execution as the value (`in_script`, same epoch) marks the note KM_NOTE_RECORD, the tick then
 * keeping that record if its CRC is the value's. Any other write of it (another connection, a later
 * command or script) is no record of the value: the note is a client's write again. */
static void km_companion_written(const char *event, RedisModuleString *cname, int in_script) {
    size_t clen;
    const char *cp = KM_StringPtrLen(cname, &clen);
    if (KM_DictSize(km.dirty) == 0) return;
    const char *close = memchr(cp + KM_COMPANION_PREFIX_LEN, '}', clen - KM_COMPANION_PREFIX_LEN);
    if (close == NULL) return;
    const char *kp = close + 1;
    size_t klen = clen - (size_t)(kp - cp);
    int nokey = 1;
    uintptr_t note = (uintptr_t)KM_DictGetC(km.dirty, (void *)kp, klen, &nokey);
    if (nokey) return;
    RedisModuleString *key = KM_CreateString(NULL, kp, klen), *mine = km_companion_name(key);
    size_t mlen;
    const char *mp = KM_StringPtrLen(mine, &mlen);
    if (mlen == clen && memcmp(mp, cp, clen) == 0) {
        uintptr_t value_epoch = note >> 1;
        int same = in_script && strcmp(event, "set") == 0 && value_epoch != 0 && value_epoch == km.script_epoch;
        uintptr_t now = same ? note | KM_NOTE_RECORD : note & ~KM_NOTE_RECORD;
        if (now != note) km_note_set(kp, klen, now);
    }
    KM_FreeString(NULL, mine);
    KM_FreeString(NULL, key);
}

/* A client's write to a key (not ours: our own SET runs with km.filling set) in database 0: a
 * versioned keyspace's value becomes the client's, a remembered failure is forgotten, and a
 * computation of the key is superseded (its waiters still get its value; it is not stored). A TTL
 * change, an expiry or an eviction does none of these: a hidden value of an old version that
 * expires while its key recomputes leaves the recomputation to be stored. Every write is noted,
 * however many (the tick works through them; a noted key is served meanwhile), except while the
 * server loads its data: what it replays holds the companions written then. */
int km_on_keyspace_event(RedisModuleCtx *ctx, int type, const char *event, RedisModuleString *key) {
    if (KM_GetSelectedDb(ctx) != 0 || event == NULL) return RM_OK;
    int kind = km_event_kind(type, event);
    if (kind == KM_EVENT_WRITE && strcmp(event, "del") != 0) km_forget_spare(key); /* newer than a running FORGET */
    if (km.filling) return RM_OK;
    if (kind == KM_EVENT_TTL && km.nkeyspaces > 0) {
        if (km_route_str(key) >= 0) { /* its companion (codec, version) follows its TTL, at the tick */
            size_t klen;
            const char *kp = KM_StringPtrLen(key, &klen);
            KM_DictSetC(km.retimed, (void *)kp, klen, NULL);
        }
    }
    if (kind != KM_EVENT_WRITE) return RM_OK;
    if (km.nkeyspaces > 0) {
        size_t klen;
        const char *kp = KM_StringPtrLen(key, &klen);
        int ksi = -1, flags = KM_GetContextFlags(ctx), in_script = (flags & RM_CTX_FLAGS_LUA) != 0;
        if (klen > KM_COMPANION_PREFIX_LEN && memcmp(kp, KM_COMPANION_PREFIX, KM_COMPANION_PREFIX_LEN) == 0)
            km_companion_written(event, key, in_script);
        else
            ksi = km_route_str(key);
        if (ksi >= 0 && km.keyspaces[ksi]->version != NULL && !(flags & RM_CTX_FLAGS_LOADING)) /* rewritten by the tick */
            km_note_set(kp, klen, in_script ? km.script_epoch << 1 : 0);
    }
    if (KM_DictSize(km.errors)) {
        size_t klen;
        const char *kp = KM_StringPtrLen(key, &klen);
        km_error_forget(kp, klen); /* a write replaces a remembered failure */
    }
    if (KM_DictSize(km.pending) == 0) return RM_OK;
    KmEntry *e = km_entry_find(key);
    if (e) km_entry_supersede(e);
    return RM_OK;
}

/* Keys of keyspaces whose TTL a client changed (EXPIRE, PERSIST, GETEX EX ...): each companion (if
 * any) gets its value's TTL, so that the value keeps its record (codec, version mark) as long as it
 * lives and no longer. Run from the timer, where writing is allowed; a replica's master does it. */
static void km_retime_companions(RedisModuleCtx *ctx) {
    size_t n;
    KmPicked *keys = km_dict_first(km.retimed, KM_NOTES_PER_TICK, &n);
    int replica = (KM_GetContextFlags(ctx) & RM_CTX_FLAGS_SLAVE) != 0;
    if (!replica && KM_SelectDb(ctx, 0) != RM_OK) replica = 1;
    for (size_t i = 0; i < n; i++) {
        KM_DictDelC(km.retimed, keys[i].key, keys[i].len, NULL);
        if (replica) continue;
        RedisModuleString *key = KM_CreateString(NULL, keys[i].key, keys[i].len);
        RedisModuleKey *open = KM_OpenKey(ctx, key, RM_READ | km.lookup_modes);
        int present = open != NULL && KM_KeyType(open) != RM_KEYTYPE_EMPTY;
        long long pttl = present ? KM_GetExpire(open) : RM_NO_EXPIRE;
        if (open) KM_CloseKey(open);
        if (present) {
            RedisModuleString *cname = km_companion_name(key);
            km.filling = 1;
            RedisModuleCallReply *r = pttl == RM_NO_EXPIRE || pttl < 0 ? KM_Call(ctx, "PERSIST", "!s", cname)
                                                                        : KM_Call(ctx, "PEXPIRE", "!sl", cname, pttl);
            km.filling = 0;
            if (r == NULL || KM_CallReplyType(r) == RM_REPLY_ERROR) /* it then expires at the old time */
                KM_Log(ctx, "warning", "keymiss: could not give a value's companion its new TTL");
            if (r) KM_FreeCallReply(r);
            KM_FreeString(NULL, cname);
        }
        KM_FreeString(NULL, key);
    }
    km_picked_free(keys, n);
}

static int km_taken_by(const void *val, const void *client) {
    const KmEntry *e = val;
    return e->state == KM_TAKEN && e->taker == *(const unsigned long long *)client;
}

static int km_due_at(const void *val, const void *now) {
    const KmEntry *e = val;
    long long t = *(const long long *)now;
    return t >= e->deadline || (e->state == KM_TAKEN && t >= e->lease_deadline) || km_entry_workerless(e, t);
}

void km_on_client_change(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    if (data == NULL) return;
    if (subevent == RM_SUBEVENT_CLIENT_CHANGE_CONNECTED) km_clients_connected(data);
    if (subevent != RM_SUBEVENT_CLIENT_CHANGE_DISCONNECTED) return;
    km_clients_disconnected(data);
    unsigned long long client = ((RedisModuleClientInfo *)data)->id;
    int w = km_worker_index(client);
    if (w < 0) return;
    km.workers[w] = km.workers[--km.nworkers];
    km_count_workers();
    /* its blocked take (if any) must not be the one woken for the keys it leaves behind */
    for (KmTaker *t = km.takers; t; t = t->next)
        if (t->client == client) t->mask = 0;
    /* What it had taken goes back to the queue for another worker. */
    size_t nback;
    KmPicked *back = km_dict_pick(km.pending, km_taken_by, &client, 0, &nback);
    for (size_t i = 0; i < nback; i++) km_entry_lost(back[i].val);
    km_picked_free(back, nback);
}

/* The keyspace changed wholesale (FLUSHALL/FLUSHDB, SWAPDB, a reload): every pending key is
 * superseded as if a client had written it (its waiters get the value; nothing is stored). */
static void km_supersede_all(void) {
    size_t n;
    KmPicked *all = km_dict_pick(km.pending, NULL, NULL, 0, &n);
    for (size_t i = 0; i < n; i++) km_entry_supersede(all[i].val);
    km_picked_free(all, n);
}

void km_on_flush(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    RedisModuleFlushInfo *fi = data;
    if (subevent == RM_SUBEVENT_FLUSHDB_END && (fi == NULL || fi->dbnum == -1 || fi->dbnum == 0)) km_supersede_all();
}

void km_on_swapdb(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    (void)subevent;
    RedisModuleSwapDbInfo *si = data;
    if (si == NULL || si->dbnum_first == 0 || si->dbnum_second == 0) {
        km_supersede_all();
        km_forget_abort(KM_ERR_PREFIX "SWAPDB replaced database 0 while FORGET ran; it stopped there");
    }
}

void km_on_loading(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data) {
    (void)ctx;
    (void)eid;
    (void)data;
    if (subevent == RM_SUBEVENT_LOADING_ENDED || subevent == RM_SUBEVENT_LOADING_FAILED) km_supersede_all();
}

/* Every KM_TICK_MS: deadlines and leases, error records, blocked TAKEs, companions, backoffs. */
void km_on_tick(RedisModuleCtx *ctx, void *data) {
    (void)data;
    long long now = km_now_ms();
    if (km.nkeyspaces) km_maxmemory(ctx, now); /* read once a second: the filter's sketch counts under one */
    if (KM_DictSize(km.pending)) {
        size_t ndue;
        KmPicked *due = km_dict_pick(km.pending, km_due_at, &now, 0, &ndue);
        for (size_t i = 0; i < ndue; i++) {
            KmEntry *e = due[i].val;
            KmKeyspace *ks = km.keyspaces[e->ksi];
            char msg[KM_MAX_ERROR_LEN];
            if (km_entry_workerless(e, now)) {
                km_entry_no_worker(e);
            } else if (now >= e->deadline) {
                ks->timeouts++;
                snprintf(msg, sizeof(msg), KM_ERR_PREFIX "keyspace '%s' did not compute the key within %lld ms",
                         ks->pattern, ks->timeout_ms);
                km_entry_resolve(e, msg);
            } else {
                km_entry_lost(e); /* which fails it after KM_MAX_ATTEMPTS */
            }
        }
        km_picked_free(due, ndue);
    }
    if (KM_DictSize(km.errors)) km_errors_purge(now);
    /* Takes whose block time is over answer (with what is queued, if anything). */
    for (KmTaker **link = &km.takers; *link;) {
        if (now >= (*link)->deadline) km_taker_wake(link);
        else link = &(*link)->next;
    }
    /* A woken taker may have gone before taking: queued keys wake another. */
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++)
        if (km.keyspaces[ksi]->qhead) km_wake_taker(ksi);
    if (KM_DictSize(km.dirty)) km_rewrite_companions(ctx);
    if (KM_DictSize(km.retimed)) km_retime_companions(ctx);
    if (KM_DictSize(km.refused)) km_clients_tick(ctx, now);
    if (++km.ticks % 20 == 0 && KM_DictSize(km.backoffs)) km_backoffs_purge(now);
    KM_CreateTimer(ctx, KM_TICK_MS, km_on_tick, NULL);
}
