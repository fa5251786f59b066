/* The part of the Valkey / Redis module API that keymiss uses, declared here (not the server's
 * header): every call is looked up by name at load time through the pointer the server puts first
 * in the load context, so one build loads into Redis >= 7.0 and Valkey >= 8. */
#ifndef KEYMISS_API_H
#define KEYMISS_API_H

#include <stddef.h>
#include <stdint.h>

#define RM_OK 0
#define RM_ERR 1
#define RM_APIVER_1 1

#define RM_READ (1 << 0)
#define RM_WRITE (1 << 1)
#define RM_OPEN_KEY_NOTOUCH (1 << 16)
#define RM_OPEN_KEY_NONOTIFY (1 << 17)
#define RM_OPEN_KEY_NOSTATS (1 << 18)
#define RM_OPEN_KEY_NOEXPIRE (1 << 19)

#define RM_KEYTYPE_EMPTY 0
#define RM_KEYTYPE_STRING 1
#define RM_NO_EXPIRE -1

#define RM_REPLY_STRING 0
#define RM_REPLY_ERROR 1
#define RM_REPLY_INTEGER 2

/* a key-spec flag, as ACLCheckKeyPermissions takes it (it accepts only ACCESS, INSERT, DELETE,
 * UPDATE): deleting a key needs write permission to it */
#define RM_CMD_KEY_DELETE (1ULL << 7)

#define RM_CTX_FLAGS_LUA (1 << 0)
#define RM_CTX_FLAGS_MULTI (1 << 1)
#define RM_CTX_FLAGS_SLAVE (1 << 3)
#define RM_CTX_FLAGS_LOADING (1 << 13)
#define RM_CTX_FLAGS_DENY_BLOCKING (1 << 21)

#define RM_NOTIFY_GENERIC (1 << 2)
#define RM_NOTIFY_STRING (1 << 3)
#define RM_NOTIFY_LIST (1 << 4)
#define RM_NOTIFY_SET (1 << 5)
#define RM_NOTIFY_HASH (1 << 6)
#define RM_NOTIFY_ZSET (1 << 7)
#define RM_NOTIFY_EXPIRED (1 << 8)
#define RM_NOTIFY_EVICTED (1 << 9)
#define RM_NOTIFY_STREAM (1 << 10)
#define RM_NOTIFY_MODULE (1 << 13)
#define RM_NOTIFY_NEW (1 << 14)

#define RM_CMDFILTER_NOSELF (1 << 0)
#define RM_CLIENTINFO_FLAG_UNIXSOCKET (1 << 4)
#define RM_CLIENTINFO_FLAG_MULTI (1 << 5)
#define RM_CLIENTINFO_VERSION 1

#define RM_EVENT_FLUSHDB 2
#define RM_EVENT_LOADING 3
#define RM_EVENT_CLIENT_CHANGE 4
#define RM_EVENT_SWAPDB 11
#define RM_SUBEVENT_CLIENT_CHANGE_CONNECTED 0
#define RM_SUBEVENT_CLIENT_CHANGE_DISCONNECTED 1
#define RM_SUBEVENT_FLUSHDB_END 1
#define RM_SUBEVENT_LOADING_ENDED 3
#define RM_SUBEVENT_LOADING_FAILED 4

typedef struct RedisModuleCtx RedisModuleCtx;
typedef struct RedisModuleKey RedisModuleKey;
typedef struct RedisModuleString RedisModuleString;
typedef struct RedisModuleCallReply RedisModuleCallReply;
typedef struct RedisModuleBlockedClient RedisModuleBlockedClient;
typedef struct RedisModuleDict RedisModuleDict;
typedef struct RedisModuleDictIter RedisModuleDictIter;
typedef struct RedisModuleCommandFilterCtx RedisModuleCommandFilterCtx;
typedef struct RedisModuleCommandFilter RedisModuleCommandFilter;
typedef struct RedisModuleInfoCtx RedisModuleInfoCtx;
typedef struct RedisModuleCommand RedisModuleCommand;
typedef struct RedisModuleServerInfoData RedisModuleServerInfoData;
typedef struct RedisModuleUser RedisModuleUser;
typedef struct RedisModuleScanCursor RedisModuleScanCursor;
typedef uint64_t RedisModuleTimerID;

typedef struct RedisModuleEvent {
    uint64_t id;
    uint64_t dataver;
} RedisModuleEvent;

typedef struct RedisModuleClientInfo {
    uint64_t version;
    uint64_t flags;
    uint64_t id;
    char addr[46];
    uint16_t port;
    uint16_t db;
} RedisModuleClientInfo;

typedef struct RedisModuleFlushInfo {
    uint64_t version;
    int32_t sync;
    int32_t dbnum; /* -1 for all */
} RedisModuleFlushInfo;

typedef struct RedisModuleSwapDbInfo {
    uint64_t version;
    int32_t dbnum_first;
    int32_t dbnum_second;
} RedisModuleSwapDbInfo;

typedef int (*RedisModuleCmdFunc)(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
typedef void (*RedisModuleDisconnectFunc)(RedisModuleCtx *ctx, RedisModuleBlockedClient *bc);
typedef int (*RedisModuleNotificationFunc)(RedisModuleCtx *ctx, int type, const char *event,
                                           RedisModuleString *key);
typedef void (*RedisModuleTimerProc)(RedisModuleCtx *ctx, void *data);
typedef void (*RedisModuleCommandFilterFunc)(RedisModuleCommandFilterCtx *filter);
typedef void (*RedisModuleInfoFunc)(RedisModuleInfoCtx *ctx, int for_crash_report);
typedef void (*RedisModuleEventCallback)(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent,
                                         void *data);
typedef void (*RedisModuleFreePrivdata)(RedisModuleCtx *ctx, void *privdata);
typedef void (*RedisModuleScanCB)(RedisModuleCtx *ctx, RedisModuleString *keyname, RedisModuleKey *key,
                                  void *privdata);

#ifdef KEYMISS_API_DEFINE
#define KM_API
#else
#define KM_API extern
#endif

/* X(return type, name, parameters) for every call used. */
#define KEYMISS_API_CALLS(X)                                                                          \
    X(void *, Alloc, (size_t bytes))                                                                 \
    X(void *, Calloc, (size_t nmemb, size_t size))                                                   \
    X(void *, TryAlloc, (size_t bytes))                                                              \
    X(void *, Realloc, (void *ptr, size_t bytes))                                                    \
    X(void, Free, (void *ptr))                                                                       \
    X(int, CreateCommand, (RedisModuleCtx * ctx, const char *name, RedisModuleCmdFunc f,            \
                           const char *flags, int firstkey, int lastkey, int keystep))               \
    X(void, SetModuleAttribs, (RedisModuleCtx * ctx, const char *name, int ver, int apiver))        \
    X(int, IsModuleNameBusy, (const char *name))                                                     \
    X(int, WrongArity, (RedisModuleCtx * ctx))                                                       \
    X(int, ReplyWithLongLong, (RedisModuleCtx * ctx, long long ll))                                  \
    X(int, ReplyWithError, (RedisModuleCtx * ctx, const char *err))                                  \
    X(int, ReplyWithSimpleString, (RedisModuleCtx * ctx, const char *msg))                           \
    X(int, ReplyWithArray, (RedisModuleCtx * ctx, long len))                                         \
    X(void, ReplySetArrayLength, (RedisModuleCtx * ctx, long len))                                   \
    X(int, ReplyWithStringBuffer, (RedisModuleCtx * ctx, const char *buf, size_t len))              \
    X(int, ReplyWithString, (RedisModuleCtx * ctx, RedisModuleString * str))                         \
    X(int, ReplyWithNull, (RedisModuleCtx * ctx))                                                    \
    X(int, ReplyWithCallReply, (RedisModuleCtx * ctx, RedisModuleCallReply * reply))                \
    X(int, GetSelectedDb, (RedisModuleCtx * ctx))                                                    \
    X(int, SelectDb, (RedisModuleCtx * ctx, int db))                                                 \
    X(void *, OpenKey, (RedisModuleCtx * ctx, RedisModuleString * keyname, int mode))               \
    X(void, CloseKey, (RedisModuleKey * kp))                                                         \
    X(int, KeyType, (RedisModuleKey * kp))                                                           \
    X(char *, StringDMA, (RedisModuleKey * key, size_t *len, int mode))                              \
    X(long long, GetExpire, (RedisModuleKey * key))                                                  \
    X(RedisModuleCallReply *, Call, (RedisModuleCtx * ctx, const char *cmd, const char *fmt, ...))  \
    X(int, CallReplyType, (RedisModuleCallReply * reply))                                            \
    X(void, FreeCallReply, (RedisModuleCallReply * reply))                                           \
    X(const char *, CallReplyStringPtr, (RedisModuleCallReply * reply, size_t *len))               \
    X(long long, CallReplyInteger, (RedisModuleCallReply * reply))                                   \
    X(RedisModuleScanCursor *, ScanCursorCreate, (void))                                             \
    X(void, ScanCursorDestroy, (RedisModuleScanCursor * cursor))                                     \
    X(int, Scan, (RedisModuleCtx * ctx, RedisModuleScanCursor * cursor, RedisModuleScanCB fn,        \
                  void *privdata))                                                                   \
    X(RedisModuleString *, CreateString, (RedisModuleCtx * ctx, const char *ptr, size_t len))       \
    X(RedisModuleString *, CreateStringFromString, (RedisModuleCtx * ctx,                           \
                                                    const RedisModuleString *str))                   \
    X(void, FreeString, (RedisModuleCtx * ctx, RedisModuleString * str))                             \
    X(void, RetainString, (RedisModuleCtx * ctx, RedisModuleString * str))                           \
    X(RedisModuleString *, HoldString, (RedisModuleCtx * ctx, RedisModuleString * str))              \
    X(const char *, StringPtrLen, (const RedisModuleString *str, size_t *len))                       \
    X(int, StringToLongLong, (const RedisModuleString *str, long long *ll))                          \
    X(unsigned long long, GetClientId, (RedisModuleCtx * ctx))                                       \
    X(int, DeauthenticateAndCloseClient, (RedisModuleCtx * ctx, uint64_t client_id))                \
    X(int, GetContextFlags, (RedisModuleCtx * ctx))                                                  \
    X(void, Log, (RedisModuleCtx * ctx, const char *level, const char *fmt, ...))                   \
    X(long long, Milliseconds, (void))                                                               \
    X(RedisModuleDict *, CreateDict, (RedisModuleCtx * ctx))                                         \
    X(void, FreeDict, (RedisModuleCtx * ctx, RedisModuleDict * d))                                   \
    X(uint64_t, DictSize, (RedisModuleDict * d))                                                     \
    X(int, DictSetC, (RedisModuleDict * d, void *key, size_t keylen, void *ptr))                     \
    X(void *, DictGetC, (RedisModuleDict * d, void *key, size_t keylen, int *nokey))                 \
    X(int, DictDelC, (RedisModuleDict * d, void *key, size_t keylen, void *oldval))                  \
    X(RedisModuleDictIter *, DictIteratorStartC, (RedisModuleDict * d, const char *op, void *key,   \
                                                  size_t keylen))                                    \
    X(void *, DictNextC, (RedisModuleDictIter * di, size_t *keylen, void **dataptr))                 \
    X(int, DictIteratorReseekC, (RedisModuleDictIter * di, const char *op, void *key,               \
                                 size_t keylen))                                                     \
    X(void, DictIteratorStop, (RedisModuleDictIter * di))                                            \
    X(int, RegisterInfoFunc, (RedisModuleCtx * ctx, RedisModuleInfoFunc cb))                         \
    X(int, InfoAddSection, (RedisModuleInfoCtx * ctx, const char *name))                             \
    X(int, InfoBeginDictField, (RedisModuleInfoCtx * ctx, const char *name))                         \
    X(int, InfoEndDictField, (RedisModuleInfoCtx * ctx))                                             \
    X(int, InfoAddFieldCString, (RedisModuleInfoCtx * ctx, const char *field, const char *value))   \
    X(int, InfoAddFieldLongLong, (RedisModuleInfoCtx * ctx, const char *field, long long value))    \
    X(int, SubscribeToServerEvent, (RedisModuleCtx * ctx, RedisModuleEvent event,                    \
                                    RedisModuleEventCallback cb))                                    \
    X(RedisModuleBlockedClient *, BlockClient, (RedisModuleCtx * ctx, RedisModuleCmdFunc reply_cb,  \
                                                RedisModuleCmdFunc timeout_cb,                       \
                                                RedisModuleFreePrivdata free_privdata,               \
                                                long long timeout_ms))                               \
    X(int, UnblockClient, (RedisModuleBlockedClient * bc, void *privdata))                           \
    X(void *, GetBlockedClientPrivateData, (RedisModuleCtx * ctx))                                   \
    X(RedisModuleBlockedClient *, GetBlockedClientHandle, (RedisModuleCtx * ctx))                    \
    X(void, SetDisconnectCallback, (RedisModuleBlockedClient * bc, RedisModuleDisconnectFunc cb))   \
    X(int, SubscribeToKeyspaceEvents, (RedisModuleCtx * ctx, int types,                             \
                                       RedisModuleNotificationFunc cb))                              \
    X(RedisModuleTimerID, CreateTimer, (RedisModuleCtx * ctx, long long period,                     \
                                        RedisModuleTimerProc cb, void *data))                        \
    X(RedisModuleCommandFilter *, RegisterCommandFilter, (RedisModuleCtx * ctx,                     \
                                                          RedisModuleCommandFilterFunc cb,           \
                                                          int flags))                                \
    X(RedisModuleCtx *, GetDetachedThreadSafeContext, (RedisModuleCtx * ctx))                        \
    X(int, CommandFilterArgsCount, (RedisModuleCommandFilterCtx * fctx))                             \
    X(const RedisModuleString *, CommandFilterArgGet, (RedisModuleCommandFilterCtx * fctx, int pos))\
    X(int, CommandFilterArgReplace, (RedisModuleCommandFilterCtx * fctx, int pos,                   \
                                     RedisModuleString *arg))                                        \
    X(void, GetRandomBytes, (unsigned char *dst, size_t len))                                        \
    X(RedisModuleString *, RandomKey, (RedisModuleCtx * ctx))                                        \
    X(unsigned long long, DbSize, (RedisModuleCtx * ctx))                                            \
    X(size_t, ValueLength, (RedisModuleKey * key))                                                   \
    X(float, GetUsedMemoryRatio, (void))                                                             \
    X(RedisModuleServerInfoData *, GetServerInfo, (RedisModuleCtx * ctx, const char *section))      \
    X(void, FreeServerInfo, (RedisModuleCtx * ctx, RedisModuleServerInfoData * data))                \
    X(unsigned long long, ServerInfoGetFieldUnsigned, (RedisModuleServerInfoData * data,             \
                                                       const char *field, int *out_err))             \
    X(const char *, ServerInfoGetFieldC, (RedisModuleServerInfoData * data, const char *field))

/* Hidden: a server built with exported symbols (-rdynamic) has functions named like these. */
/* Calls only newer servers have (Redis >= 7.2, Valkey; CommandFilterGetClientId: Redis >= 7.2,
 * Valkey >= 8): NULL where absent. */
#define KEYMISS_API_OPTIONAL(X)                                                                       \
    X(RedisModuleCommand *, GetCommand, (RedisModuleCtx * ctx, const char *name))                   \
    X(int, SetCommandACLCategories, (RedisModuleCommand * command, const char *categories))         \
    X(int, GetOpenKeyModesAll, (void))                                                               \
    X(uint64_t, MonotonicMicroseconds, (void))                                                      \
    X(unsigned long long, CommandFilterGetClientId, (RedisModuleCommandFilterCtx * fctx))            \
    X(int, GetClientInfoById, (void *ci, uint64_t id))                                               \
    X(RedisModuleString *, GetClientUserNameById, (RedisModuleCtx * ctx, uint64_t id))              \
    X(RedisModuleUser *, GetModuleUserFromUserName, (RedisModuleString * name))                      \
    X(void, FreeModuleUser, (RedisModuleUser * user))                                                \
    X(int, ACLCheckCommandPermissions, (RedisModuleUser * user, RedisModuleString **argv, int argc))   \
    X(RedisModuleString *, GetCurrentUserName, (RedisModuleCtx * ctx))                               \
    X(int, ACLCheckKeyPermissions, (RedisModuleUser * user, RedisModuleString * key, int flags))

#define KEYMISS_DECLARE(ret, name, params) KM_API __attribute__((visibility("hidden"))) ret(*KM_##name) params;
KEYMISS_API_CALLS(KEYMISS_DECLARE)
KEYMISS_API_OPTIONAL(KEYMISS_DECLARE)
#undef KEYMISS_DECLARE

/* Looks up every call; RM_ERR if the server lacks one. */
int keymiss_api_init(RedisModuleCtx *ctx, const char *name, int ver);

#endif
