/* MAXCLIENTS: the clients' connections, counted apart from the server's own unix-socket ones.
 *
 * keymiss's own connections (workers, health checks, shutdown) reach the embedded server through
 * its unix socket; clients come over TCP. The server's maxclients counts both, so keymiss sets it
 * to --max-clients plus room for its own, and the module holds the clients to --max-clients
 * exactly: a TCP connection past the limit is refused — each command it sends is answered
 * "ERR max number of clients reached" (the server's own words), and the tick closes it once it
 * was told, or after KM_REFUSED_GRACE_MS if it sends nothing.
 *
 * A server that cannot tell the filter which client sent a command (Redis 7.0) would run the
 * refused connection's commands until a tick closed it, so there the connection is closed as it
 * connects, untold: DeauthenticateAndCloseClient frees it asynchronously (the server's own
 * freeClientAsync, safe inside its accept handler, unlike CLIENT KILL's synchronous free), and the
 * server reads no command from a client marked to close — what it pipelined never runs. */
#include "keymiss.h"

#include <stdio.h>

typedef struct KmRefused {
    long long since;        /* when it connected */
    int told;               /* it was answered the refusal: close it once the reply went out */
    unsigned long told_tick; /* the tick count then: a later tick has written the reply first */
} KmRefused;

void km_clients_connected(const RedisModuleClientInfo *ci) {
    if (km.max_clients <= 0 || (ci->flags & RM_CLIENTINFO_FLAG_UNIXSOCKET)) return;
    if (km.tcp_clients < km.max_clients) {
        km.tcp_clients++;
        return;
    }
    km.refused_clients++;
    KmRefused *r = KM_Calloc(1, sizeof(*r));
    r->since = km_now_ms();
    uint64_t id = ci->id;
    if (KM_DictSetC(km.refused, &id, sizeof(id), r) != RM_OK) KM_Free(r);
    /* nothing will tell the filter it is refused: close it now (the tick kills it if still there) */
    if (KM_CommandFilterGetClientId == NULL && KM_DeauthenticateAndCloseClient(NULL, ci->id) != RM_OK)
        KM_Log(NULL, "warning", "keymiss: could not close refused client %llu", (unsigned long long)ci->id);
}

void km_clients_disconnected(const RedisModuleClientInfo *ci) {
    if (km.max_clients <= 0 || (ci->flags & RM_CLIENTINFO_FLAG_UNIXSOCKET)) return;
    uint64_t id = ci->id;
    KmRefused *r = NULL;
    if (KM_DictSize(km.refused) && KM_DictDelC(km.refused, &id, sizeof(id), &r) == RM_OK) {
        KM_Free(r);
        return;
    }
    if (km.tcp_clients > 0) km.tcp_clients--;
}

/* Whether the filter's command comes from a refused connection: then it becomes KEYMISS.REFUSED. */
int km_filter_refused(RedisModuleCommandFilterCtx *f) {
    if (KM_CommandFilterGetClientId == NULL) return 0;
    uint64_t id = KM_CommandFilterGetClientId(f);
    int nokey = 1;
    KmRefused *r = KM_DictGetC(km.refused, &id, sizeof(id), &nokey);
    if (nokey || r == NULL) return 0;
    if (!r->told) r->told_tick = km.ticks;
    r->told = 1;
    KM_RetainString(NULL, km.refused_name); /* the filter takes one reference */
    KM_CommandFilterArgReplace(f, 0, km.refused_name);
    return 1;
}

int km_cmd_refused(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    (void)argv;
    (void)argc;
    return KM_ReplyWithError(ctx, "ERR max number of clients reached");
}

static int km_refused_due(const void *val, const void *now) {
    const KmRefused *r = val;
    return (r->told && km.ticks > r->told_tick) || KM_CommandFilterGetClientId == NULL ||
           *(const long long *)now - r->since >= KM_REFUSED_GRACE_MS;
}

/* The tick: close the refused connections that were told (or waited long enough). */
void km_clients_tick(RedisModuleCtx *ctx, long long now) {
    size_t n;
    KmPicked *due = km_dict_pick(km.refused, km_refused_due, &now, 1, &n);
    for (size_t i = 0; i < n; i++) {
        uint64_t id;
        memcpy(&id, due[i].key, sizeof(id));
        char text[24];
        snprintf(text, sizeof(text), "%llu", (unsigned long long)id);
        RedisModuleCallReply *reply = KM_Call(ctx, "CLIENT", "ccc", "KILL", "ID", text);
        if (reply) KM_FreeCallReply(reply);
        KmRefused *r = NULL;
        if (KM_DictDelC(km.refused, &id, sizeof(id), &r) == RM_OK) KM_Free(r); /* gone already, or now */
    }
    km_picked_free(due, n);
}
