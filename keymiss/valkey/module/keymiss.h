/* keymiss inside Valkey / Redis: GET and MGET of a registered keyspace compute on a miss.
 *
 * A command filter sends GET/MGET/GETEX(no options) naming a key of a registered keyspace to
 * KEYMISS.GET / KEYMISS.MGET. A hit is answered from the keyspace like a plain GET. The first miss of
 * a key queues one computation (an "entry"); every client asking meanwhile blocks on that entry.
 * keymiss workers register keyspaces (KEYMISS.REGISTER), take queued keys in batches with a lease
 * (KEYMISS.TAKE), and answer with KEYMISS.FILL (a plain SET, replicated as such) or KEYMISS.FAIL.
 * A client's write to a key being computed (not a TTL change, nor the server expiring or evicting
 * it) supersedes its entry: the waiters get the computed value when it comes, and it is not stored
 * (the client's write stays). A miss of a keyspace without a worker waits up to GRACE for one (the
 * module's load arguments: GRACE ms, KEYSPACE pattern ... declaring keyspaces before any worker).
 * Where blocking is forbidden (MULTI, Lua, functions) a miss queues the computation and answers nil.
 * Everything here runs on the server's main thread.
 *
 * Freshness: a keyspace with STALE keeps serving a value past its TTL (its PX covers both) while one
 * refresh runs; one with EARLY (XFetch) may start one refresh of a hit before its TTL. A refresh is
 * an entry nobody waits on. A versioned keyspace (VERSION) serves a value only while its companion
 * key (keymiss:v:{<tag of the key's slot>}<key>, in the key's own slot) names the current version,
 * or marks a client's write; KEYMISS.VERSION switches it at run time, hiding every older value.
 *
 * The sources, one concern each:
 *   util.c      clock, copies, error lines, picking dictionary items
 *   glob.c      Redis's glob syntax, and the keyspace a key belongs to
 *   keyspace.c  the keyspace table: one by name, a new one, the workers serving them
 *   slottag.c   hash slots, a tag per slot, companion key names
 *   entries.c   pending entries, their queue, blocked GET/MGET requests, waking a blocked TAKE
 *   errors.c    error records (a keyspace's error TTL)
 *   fresh.c     versions, stale and early refreshes, refresh backoffs, companions of client writes
 *   serve.c     the one serve path of GET / MGET, and the command filter's decision
 *   commands.c  the workers' commands: REGISTER, VERSION, TAKE, FILL, FAIL
 *   tags.c      templates (<field>s) and a keyspace's tags: which keys carry a tag
 *   forget.c    KEYMISS.FORGET: forgetting keys by pattern or tag in timer steps
 *   events.c    keyspace and server events, the tick
 *   admission.c the frequency sketch and FILL's size- and cost-aware admission near maxmemory
 *   info.c      INFO keymiss
 *   load.c      loading: the state, commands, filter, events, timer
 *   api.c       the module API, looked up by name (api.h)
 *
 * Names: a KmKeyspace is always `ks`, its index in km.keyspaces always `ksi`; a KmEntry `e`; an
 * opened server key `open`; a key's name `key` (RedisModuleString) or `kp`/`klen` (bytes).
 */
#ifndef KEYMISS_H
#define KEYMISS_H

#include "api.h"
#include "protocol.h"

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#pragma GCC visibility push(hidden)

#define KM_STR(x) #x
#define KM_XSTR(x) KM_STR(x)

/* The module's own limits (the protocol's are in protocol.h). */
#define KM_MODULE_NAME KM_INFO_SECTION /* INFO's section is the module's name */
#define KM_MODULE_VERSION 1
#define KM_MAX_WORKERS 4096
#define KM_MAX_ERROR_RECORDS 10000
#define KM_MAX_ATTEMPTS 3
#define KM_MAX_ROUTED_KEY (4 * 1024)
#define KM_MAX_BACKOFFS 10000
/* Notes of client writes (km.dirty, km.retimed) are unbounded (one per key a client wrote: no
 * write is ever forgotten); the tick works through this many of each per tick. */
#define KM_NOTES_PER_TICK 2000
#define KM_SLOTS 16384
/* a TCP connection past MAXCLIENTS that sends nothing is closed after this long */
#define KM_REFUSED_GRACE_MS 1000
/* the compute-time histogram's upper bounds in seconds: keymiss.stats.COMPUTE_BUCKETS, so both
 * servers estimate INFO's p50/p99_compute_seconds over the same buckets the same way */
#define KM_COMPUTE_BOUNDS {0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0}
#define KM_COMPUTE_BUCKETS 14
/* FORGET's steps: keys one step looks at (and deletes at most), and the pause between steps in ms
 * (0: the next turn of the event loop, after the clients that are waiting) */
#define KM_FORGET_STEP 500
#define KM_FORGET_PAUSE_MS 0
#define KM_CLIENT_MARK_LEN (sizeof(KM_CLIENT_MARK) - 1)
#define KM_COMPANION_PREFIX_LEN (sizeof(KM_COMPANION_PREFIX) - 1)

/* ---------------------------------------------------------------------------------------------- */
/* Types                                                                                          */

typedef struct KmRequest KmRequest;
typedef struct KmEntry KmEntry;

typedef struct KmKeyspace {
    char *pattern; /* its name, as the worker printed it */
    char *glob;
    size_t globlen;
    size_t prefixlen; /* literal head of the glob: a cheap first test */
    long long ttl_ms, error_ttl_ms, timeout_ms, queue_max;
    long long stale_ms, early_milli; /* STALE window; EARLY: XFetch's beta, in thousandths */
    char *version, *label;           /* the current version's tag and its name; NULL: unversioned */
    size_t versionlen;
    char *prev_version; /* the tag just replaced, served until prev_until (VSTALE); else NULL */
    size_t prev_versionlen;
    long long vstale_ms, prev_until;
    /* INFO's fields (KM_INFO_KEYSPACE_FIELDS), each named as there */
    long long hits, misses, computations, queued, in_flight, fills, failures, timeouts, requeues,
        discarded_fills, superseded, busy, no_worker, oversized, dropped;
    int workers;
    long long version_misses, version_discards, version_stale_hits, stale_hits, early_refreshes,
        refresh_failures;
    double mean_compute_ms; /* take-to-fill time, smoothed: XFetch's compute time (not in INFO) */
    /* the handler seconds FILL's COST said, per KM_COMPUTE_BOUNDS bucket, one overflow slot last,
     * and their sum: INFO's p50/p99 and mean compute seconds, as the Python server's */
    long long compute_hist[KM_COMPUTE_BUCKETS + 1];
    double compute_seconds;
    KmEntry *qhead, *qtail; /* entries waiting to be taken, oldest first */
    long long orphans;      /* queued entries nobody waits on (their readers left, or a refresh) */
    long long share_ppm;    /* SHARE: a value over this share of maxmemory is answered, not stored */
    int declared;              /* named by the module's KEYSPACE argument: never gives way to another */
    long long workerless_since; /* when its last worker went (or it was declared): GRACE runs from then */
    char **tags;                /* REGISTER's TAGs: templates over the pattern's <field>s, or labels */
    size_t *taglens;
    int ntags;
} KmKeyspace;

typedef struct KmWaiter {
    KmRequest *req;
    int idx;
} KmWaiter;

enum { KM_QUEUED = 0, KM_TAKEN = 1 };

/* One computation of a key: queued, then taken by a worker until filled, failed or given up. */
struct KmEntry {
    RedisModuleString *key; /* retained */
    int ksi;
    int state;
    long long token;
    unsigned long long taker;
    long long lease_deadline, deadline;
    int attempts;
    int refresh; /* started by a hit (stale or early), not by a miss */
    int pinned;  /* a request being served is about to wait on it: not an orphan to drop */
    int superseded; /* a client wrote the key meanwhile: its waiters get the value, nothing is stored */
    int version_discards; /* fills discarded for their version, in a row: the second fails it */
    long long born; /* when it was queued first */
    long long taken_at;
    KmWaiter *waiters;
    int nwaiters, capwaiters;
    KmEntry *prev, *next; /* queue links while KM_QUEUED */
};

/* A blocked GET (nkeys 1, single) or MGET: answered when every slot it waits on resolves. */
struct KmRequest {
    RedisModuleBlockedClient *bc;
    int single;
    int nkeys;
    int pending;
    RedisModuleString **keys; /* retained */
    KmEntry **entries;        /* the entry each slot waits on, NULL once resolved */
    char **errors;            /* per slot, NULL unless its computation failed */
    RedisModuleString **values; /* per slot, a value answered but not stored (retained); NULL: none */
};

/* A blocked TAKE. */
typedef struct KmTaker {
    RedisModuleBlockedClient *bc;
    unsigned long long client;
    uint64_t mask;                        /* the keyspaces it takes now (none of a LIMIT of 0) */
    long long limit[KM_MAX_KEYSPACES];    /* keys of each keyspace it takes at most (LIMIT) */
    long long count, lease_ms, deadline;
    struct KmTaker *next;
    int woken;
} KmTaker;

typedef struct KmWorker {
    unsigned long long client;
    uint64_t mask; /* bit ksi: serves km.keyspaces[ksi] */
} KmWorker;

typedef struct KmErrorRecord {
    char *msg;
    long long expires;
} KmErrorRecord;

typedef struct KmBackoff { /* a key whose refresh failed: the next waits until `until` */
    long long until, wait;
} KmBackoff;

/* Everything the module keeps, in one place (defined in load.c). */
typedef struct KmState {
    KmKeyspace *keyspaces[KM_MAX_KEYSPACES];
    int nkeyspaces;
    KmWorker workers[KM_MAX_WORKERS];
    int nworkers;
    KmTaker *takers;           /* blocked TAKEs */
    RedisModuleDict *pending;  /* key bytes -> KmEntry */
    RedisModuleDict *requests; /* blocked requests by handle (timeout and disconnect get no privdata) */
    RedisModuleDict *errors;   /* key bytes -> KmErrorRecord */
    RedisModuleDict *backoffs; /* key bytes -> KmBackoff */
    RedisModuleDict *dirty;    /* keys of versioned keyspaces a client wrote: companions to rewrite
                                * (a noted key is served as a client's value until then) */
    RedisModuleDict *retimed;  /* keys of keyspaces whose TTL a client changed: their companions' too */
    long long waiting;         /* blocked requests */
    int filling;               /* our own SET is running: its keyspace event is not a client's write */
    uintptr_t script_epoch;    /* scripts (EVAL*, FCALL*) the filter saw: tells one script's writes from the next's */
    long long grace_ms;        /* GRACE: how long a miss waits for a keyspace without a worker */
    long long max_clients;     /* MAXCLIENTS: TCP client connections admitted (0: the server's limit) */
    long long tcp_clients;     /* TCP client connections admitted now */
    long long refused_clients; /* TCP client connections refused past MAXCLIENTS, ever */
    RedisModuleDict *refused;  /* client id -> KmRefused: TCP connections past MAXCLIENTS */
    RedisModuleString *refused_name;
    uint64_t rnd_state;        /* xorshift64*: XFetch's draws (seeded from the server's CSPRNG) */
    unsigned long ticks;
    int take_next;                 /* the keyspace the next TAKE starts from: each gets its turn */
    unsigned long long maxmemory;  /* the server's, read at most once a second (km_maxmemory) */
    int noeviction;                /* its maxmemory-policy is noeviction (read with maxmemory) */
    long long maxmemory_at, oversized_logged_at;
    RedisModuleString *get_name, *mget_name;
    RedisModuleCtx *filter_ctx; /* database 0, for the filter's lookups */
    int lookup_modes;           /* what the filter's lookups may skip, as the server allows */
    long long admission_rejects;   /* FILLs answered but not stored: worth less than what they displace */
    long long admission_evictions; /* keyspace values the module deleted to make room for worthier ones */
    uint16_t crc16tab[256];
    char slot_tags[KM_SLOTS][4]; /* for each slot, a short hash tag that lands in it */
    unsigned char slot_taglen[KM_SLOTS];
} KmState;

extern KmState km;

/* ---------------------------------------------------------------------------------------------- */
/* util.c                                                                                         */

/* `word` (a C string), whatever its case, is the `len` bytes at `p`: commands and options. */
static inline int km_word_is(const char *p, size_t len, const char *word) {
    return strlen(word) == len && strncasecmp(p, word, len) == 0;
}

long long km_now_ms(void);
unsigned long long km_maxmemory(RedisModuleCtx *ctx, long long now);
char *km_dup_bytes(const char *p, size_t len);
char *km_error_line(const char *msg, size_t len);

/* Items of a dictionary, copied out: deleting or resolving one mutates the dictionary. */
typedef int (*KmPick)(const void *val, const void *arg);
/* A km.dirty note's value: the script epoch of the value's write (0: not in a script), shifted;
 * KM_NOTE_RECORD: its companion was written by the same script (the writer's record, kept at the
 * tick if its CRC is the value's). */
#define KM_NOTE_RECORD ((uintptr_t)1)

typedef struct KmPicked {
    char *key; /* a copy, when asked for */
    size_t len;
    void *val;
} KmPicked;
KmPicked *km_dict_pick(RedisModuleDict *d, KmPick pick, const void *arg, int copy_keys, size_t *n);
KmPicked *km_dict_first(RedisModuleDict *d, size_t max, size_t *n);
void km_picked_free(KmPicked *items, size_t n);
void km_dict_purge(RedisModuleDict *d, KmPick pick, const void *arg, void (*free_val)(void *));

/* ---------------------------------------------------------------------------------------------- */
/* glob.c, keyspace.c, slottag.c                                                                  */

size_t km_glob_prefix_len(const char *glob, size_t len);
int km_glob_match(const char *glob, size_t glen, const char *s, size_t slen);

int km_route(const char *key, size_t len);
int km_route_str(const RedisModuleString *key);
int km_keyspace_find(const char *pattern, size_t len);
int km_keyspace_add(const char *pattern, size_t len);
int km_keyspace_declare(const char *pattern, size_t len);
int km_worker_index(unsigned long long client);
void km_count_workers(void);

int km_slot_tags_init(void);
RedisModuleString *km_companion_name(const RedisModuleString *key);

/* tags.c, forget.c */

/* A template split at its <field>s: lit[0] name[0] lit[1] ... name[n-1] lit[n] (as keymiss/keyspace.py). */
typedef struct KmSpan {
    const char *p;
    size_t len;
} KmSpan;
typedef struct KmTemplate {
    int nfields; /* -1: more than KM_MAX_FIELDS */
    KmSpan lit[KM_MAX_FIELDS + 1], name[KM_MAX_FIELDS];
} KmTemplate;
/* Which keys carry a tag: a keyspace's (by its pattern, a copy) whose fields name[i] are value[i]. */
typedef struct KmTagMatch {
    char *pattern;
    size_t patlen;
    int nbound;
    int field[KM_MAX_FIELDS]; /* an index into the pattern's fields */
    char *value[KM_MAX_FIELDS];
    size_t vlen[KM_MAX_FIELDS];
} KmTagMatch;

void km_template_split(const char *p, size_t len, KmTemplate *t);
int km_template_parse(const KmTemplate *t, const char *key, size_t klen, KmSpan *values);
const char *km_tags_parse(RedisModuleString **argv, int first, int argc, const char *pattern, size_t plen,
                          char ***tags, size_t **lens, int *n);
void km_tags_free(char **tags, size_t *lens, int n);
KmTagMatch *km_tag_matches(const char *tag, size_t len, int *n);
int km_tag_match_key(const KmTagMatch *m, int ksi, const char *kp, size_t klen);
void km_tag_matches_free(KmTagMatch *m, int n);
char *km_tag_match_scope(const KmTagMatch *m, size_t *len);

int km_cmd_forget(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
void km_forget_spare(RedisModuleString *key);
void km_forget_abort(const char *why);

/* ---------------------------------------------------------------------------------------------- */
/* entries.c                                                                                      */

KmEntry *km_entry_new(RedisModuleString *key, int ksi, long long now);
KmEntry *km_entry_find(const RedisModuleString *key);
void km_entry_take(KmEntry *e, unsigned long long client, long long now, long long lease_ms);
void km_entry_requeue(KmEntry *e);
void km_entry_lost(KmEntry *e);
void km_entry_resolve(KmEntry *e, const char *err);
void km_entry_supersede(KmEntry *e);
int km_entry_workerless(const KmEntry *e, long long now);
void km_entry_no_worker(KmEntry *e);
void km_entry_answer(KmEntry *e, RedisModuleString *value);
void km_entry_drop(KmEntry *e);
int km_drop_orphan(int ksi);
KmPicked *km_entries_pick(KmPick pick, const void *arg, size_t *n);
void km_request_block(RedisModuleCtx *ctx, RedisModuleString **keys, int nkeys, int single, KmEntry **ents,
                      char **errs, RedisModuleString **vals, int waits);
void km_wake_taker(int ksi);
void km_taker_wake(KmTaker **link);

/* ---------------------------------------------------------------------------------------------- */
/* errors.c, fresh.c                                                                              */

void km_error_forget(const char *kp, size_t klen);
void km_error_remember(const RedisModuleString *key, const char *msg, long long ttl_ms, long long now);
const char *km_error_fresh(const RedisModuleString *key, long long now);
void km_errors_purge(long long now);

enum { KM_PREVIOUS = 2 }; /* km_version_ok: a value of the version just replaced, inside VSTALE */
int km_version_ok(RedisModuleCtx *ctx, int ksi, RedisModuleString *key, int count);
void km_set_version(KmKeyspace *ks, char *tag, size_t taglen, char *label);
void km_refresh(int ksi, RedisModuleString *key, long long now);
void km_served_previous(int ksi, RedisModuleString *key, int count);
void km_on_served(int ksi, RedisModuleKey *open, RedisModuleString *key);
void km_backoff_note(const RedisModuleString *key, long long now);
void km_backoff_clear(const RedisModuleString *key);
void km_backoffs_purge(long long now);
void km_rewrite_companions(RedisModuleCtx *ctx);
RedisModuleCallReply *km_companion_fill(RedisModuleCtx *ctx, RedisModuleString *key, RedisModuleString *value,
                                        long long codec, const char *ver, size_t verlen, long long px);

/* ---------------------------------------------------------------------------------------------- */
/* serve.c, commands.c, events.c, info.c                                                          */

void km_reply_value(RedisModuleCtx *ctx, RedisModuleString *key, int single);
int km_cmd_get(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int km_cmd_mget(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
void km_command_filter(RedisModuleCommandFilterCtx *f);

int km_cmd_register(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int km_cmd_version(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int km_cmd_take(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int km_cmd_fill(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
int km_cmd_fail(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);

int km_on_keyspace_event(RedisModuleCtx *ctx, int type, const char *event, RedisModuleString *key);
void km_on_client_change(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data);
void km_on_flush(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data);
void km_on_swapdb(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data);
void km_on_loading(RedisModuleCtx *ctx, RedisModuleEvent eid, uint64_t subevent, void *data);
void km_on_tick(RedisModuleCtx *ctx, void *data);

/* clients.c: MAXCLIENTS */
void km_clients_connected(const RedisModuleClientInfo *ci);
void km_clients_disconnected(const RedisModuleClientInfo *ci);
int km_filter_refused(RedisModuleCommandFilterCtx *f);
int km_cmd_refused(RedisModuleCtx *ctx, RedisModuleString **argv, int argc);
void km_clients_tick(RedisModuleCtx *ctx, long long now);
/* one key's handler time (FILL's COST), counted in its keyspace's compute-time histogram */
void km_observe_compute(KmKeyspace *ks, double seconds);
void km_on_info(RedisModuleInfoCtx *ctx, int for_crash_report);

void km_sketch_add(const RedisModuleString *key);
int km_admit(RedisModuleCtx *ctx, RedisModuleString *key, size_t vlen, double cost_ms);
long long km_sketch_bytes(void);

#pragma GCC visibility pop

#endif
