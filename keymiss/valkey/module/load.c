/* Loading: the module's state, its commands, the command filter, the events it follows, the tick. */
#include "keymiss.h"

KmState km;

/* The commands, one for each of protocol.h's KM_COMMANDS. */
static const struct {
    const char *name;
    RedisModuleCmdFunc fn;
    const char *flags;
    int firstkey, lastkey, keystep;
} km_commands[] = {
    {KM_CMD_GET, km_cmd_get, "readonly", 1, 1, 1},
    {KM_CMD_MGET, km_cmd_mget, "readonly", 1, -1, 1},
    {KM_CMD_REGISTER, km_cmd_register, "deny-script", 0, 0, 0},
    {KM_CMD_TAKE, km_cmd_take, "deny-script", 0, 0, 0},
    {KM_CMD_FILL, km_cmd_fill, "write deny-oom", 1, 1, 1},
    /* FAIL names no key: it touches no keyspace data (only the taken entry its token proves), and
     * a worker whose user lost its key permissions must still be able to fail the keys it holds,
     * or their readers wait their deadline instead of getting the refusal at once. */
    {KM_CMD_FAIL, km_cmd_fail, "", 0, 0, 0},
    {KM_CMD_VERSION, km_cmd_version, "deny-script", 0, 0, 0},
    /* the refusal of a connection past MAXCLIENTS: answered before AUTH, as the server's own is */
    {KM_CMD_REFUSED, km_cmd_refused, "no-auth fast allow-loading allow-stale", 0, 0, 0},
    /* FORGET names no key (a pattern or a tag): each key it deletes is checked against its caller's
     * ACL key patterns as it goes (forget.c) */
    {KM_CMD_FORGET, km_cmd_forget, "write deny-script", 0, 0, 0},
};
#define KM_ONE(name) +1
_Static_assert(sizeof(km_commands) / sizeof(km_commands[0]) == 0 KM_COMMANDS(KM_ONE),
               "a command of KM_COMMANDS is not registered");
#undef KM_ONE

static int km_load_failed(RedisModuleCtx *ctx, int line) {
    KM_Log(ctx, "warning", "keymiss: the module could not initialise (load.c line %d)", line);
    return RM_ERR;
}

/* The load arguments, in any order: GRACE ms (how long a miss of a keyspace without a worker
 * waits for one; default KM_DEFAULT_GRACE_MS) and KEYSPACE pattern, repeatable (a keyspace that
 * exists before any worker registers it). RM_OK, or RM_ERR having said why in the log. */
static int km_load_arguments(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    km.grace_ms = KM_DEFAULT_GRACE_MS;
    for (int i = 0; i < argc; i += 2) {
        size_t len, vlen;
        const char *word = KM_StringPtrLen(argv[i], &len);
        const char *value = i + 1 < argc ? KM_StringPtrLen(argv[i + 1], &vlen) : NULL;
        long long ms;
        if (value != NULL && km_word_is(word, len, KM_OPT_GRACE) && KM_StringToLongLong(argv[i + 1], &ms) == RM_OK &&
            ms >= 0 && ms <= KM_MAX_MS) {
            km.grace_ms = ms;
        } else if (value != NULL && km_word_is(word, len, KM_OPT_MAXCLIENTS) &&
                   KM_StringToLongLong(argv[i + 1], &ms) == RM_OK && ms >= 0) {
            km.max_clients = ms;
        } else if (value != NULL && km_word_is(word, len, KM_OPT_KEYSPACE) && vlen > 0 && vlen <= KM_MAX_GLOB &&
                   memchr(value, '\0', vlen) == NULL) {
            if (km_keyspace_declare(value, vlen) < 0) {
                KM_Log(ctx, "warning", "keymiss: too many keyspaces (" KM_XSTR(KM_MAX_KEYSPACES) ")");
                return RM_ERR;
            }
        } else {
            KM_Log(ctx, "warning",
                   "keymiss: the module's arguments are %s ms (0 to %lld), %s pattern (1 to %d bytes, "
                   "repeatable) and %s n (0 or more), in any order",
                   KM_OPT_GRACE, KM_MAX_MS, KM_OPT_KEYSPACE, KM_MAX_GLOB, KM_OPT_MAXCLIENTS);
            return RM_ERR;
        }
    }
    return RM_OK;
}

__attribute__((visibility("default"))) int RedisModule_OnLoad(RedisModuleCtx *ctx, RedisModuleString **argv, int argc) {
    if (keymiss_api_init(ctx, KM_MODULE_NAME, KM_MODULE_VERSION) != RM_OK) return RM_ERR; /* no API: nothing to log with */
    if (km_load_arguments(ctx, argv, argc) != RM_OK) return km_load_failed(ctx, __LINE__);
    KM_GetRandomBytes((unsigned char *)&km.rnd_state, sizeof(km.rnd_state));
    km.rnd_state |= 1; /* xorshift's state is never 0 */
    if (km_slot_tags_init() != RM_OK) return km_load_failed(ctx, __LINE__);
    km.pending = KM_CreateDict(NULL);
    km.errors = KM_CreateDict(NULL);
    km.requests = KM_CreateDict(NULL);
    km.backoffs = KM_CreateDict(NULL);
    km.dirty = KM_CreateDict(NULL);
    km.retimed = KM_CreateDict(NULL);
    km.refused = KM_CreateDict(NULL);
    km.refused_name = KM_CreateString(NULL, KM_CMD_REFUSED, sizeof(KM_CMD_REFUSED) - 1);
    km.get_name = KM_CreateString(NULL, KM_CMD_GET, sizeof(KM_CMD_GET) - 1);
    km.mget_name = KM_CreateString(NULL, KM_CMD_MGET, sizeof(KM_CMD_MGET) - 1);
    if (!km.pending || !km.errors || !km.requests || !km.backoffs || !km.dirty || !km.retimed || !km.get_name ||
        !km.mget_name || !km.refused || !km.refused_name)
        return km_load_failed(ctx, __LINE__);
    for (size_t i = 0; i < sizeof(km_commands) / sizeof(km_commands[0]); i++)
        if (KM_CreateCommand(ctx, km_commands[i].name, km_commands[i].fn, km_commands[i].flags, km_commands[i].firstkey,
                             km_commands[i].lastkey, km_commands[i].keystep) != RM_OK)
            return km_load_failed(ctx, __LINE__);
    /* Where the server has ACL categories for module commands, a user allowed @read may read
     * keyspaces; elsewhere (Redis 7.0) a user listing commands needs +keymiss.get +keymiss.mget. */
    if (KM_GetCommand && KM_SetCommandACLCategories) {
        const char *reads[] = {KM_CMD_GET, KM_CMD_MGET};
        for (int i = 0; i < 2; i++) {
            RedisModuleCommand *c = KM_GetCommand(ctx, reads[i]);
            if (c == NULL || KM_SetCommandACLCategories(c, "read") != RM_OK) return km_load_failed(ctx, __LINE__);
        }
        RedisModuleCommand *forget = KM_GetCommand(ctx, KM_CMD_FORGET);
        if (forget == NULL || KM_SetCommandACLCategories(forget, "write keyspace") != RM_OK)
            return km_load_failed(ctx, __LINE__);
    }
    km.filter_ctx = KM_GetDetachedThreadSafeContext(ctx);
    if (km.filter_ctx == NULL) return km_load_failed(ctx, __LINE__);
    km.lookup_modes = RM_OPEN_KEY_NOTOUCH;
    if (KM_GetOpenKeyModesAll) {
        int all = KM_GetOpenKeyModesAll();
        km.lookup_modes |= all & (RM_OPEN_KEY_NONOTIFY | RM_OPEN_KEY_NOSTATS | RM_OPEN_KEY_NOEXPIRE);
    }
    if (KM_RegisterCommandFilter(ctx, km_command_filter, RM_CMDFILTER_NOSELF) == NULL)
        return km_load_failed(ctx, __LINE__);
    int events = RM_NOTIFY_GENERIC | RM_NOTIFY_STRING | RM_NOTIFY_LIST | RM_NOTIFY_SET | RM_NOTIFY_HASH |
                 RM_NOTIFY_ZSET | RM_NOTIFY_EXPIRED | RM_NOTIFY_EVICTED | RM_NOTIFY_STREAM | RM_NOTIFY_MODULE |
                 RM_NOTIFY_NEW;
    if (KM_SubscribeToKeyspaceEvents(ctx, events, km_on_keyspace_event) != RM_OK) return km_load_failed(ctx, __LINE__);
    RedisModuleEvent client_change = {RM_EVENT_CLIENT_CHANGE, 1};
    if (KM_SubscribeToServerEvent(ctx, client_change, km_on_client_change) != RM_OK)
        return km_load_failed(ctx, __LINE__);
    RedisModuleEvent flush = {RM_EVENT_FLUSHDB, 1}, swapdb = {RM_EVENT_SWAPDB, 1}, loading = {RM_EVENT_LOADING, 1};
    if (KM_SubscribeToServerEvent(ctx, flush, km_on_flush) != RM_OK ||
        KM_SubscribeToServerEvent(ctx, swapdb, km_on_swapdb) != RM_OK ||
        KM_SubscribeToServerEvent(ctx, loading, km_on_loading) != RM_OK)
        return km_load_failed(ctx, __LINE__);
    if (KM_RegisterInfoFunc(ctx, km_on_info) != RM_OK) return km_load_failed(ctx, __LINE__);
    KM_CreateTimer(ctx, KM_TICK_MS, km_on_tick, NULL);
    return RM_OK;
}

/* Blocked clients and the filter hold pointers into this module: it stays loaded. */
__attribute__((visibility("default"))) int RedisModule_OnUnload(RedisModuleCtx *ctx) {
    (void)ctx;
    return RM_ERR;
}
