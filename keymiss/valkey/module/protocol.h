/* The KEYMISS.* protocol between keymiss's server module and its workers, defined once for C.
 *
 * Its Python twin is keymiss/valkey/protocol.py: every KM_<NAME> here is <NAME> there, with the
 * same value (command names are lowercase here: the server shows them as registered; it matches
 * them whatever their case), and KM_<NAME>(X) lists the tuple <NAME> in the same order.
 * tests/valkey/test_protocol.py parses this file and compares the two, constant by constant.
 * Only protocol constants belong here: the module's own limits are in keymiss.h. */
#ifndef KEYMISS_PROTOCOL_H
#define KEYMISS_PROTOCOL_H

/* --- command names ------------------------------------------------------------------------ */
#define KM_CMD_GET "keymiss.get"
#define KM_CMD_MGET "keymiss.mget"
#define KM_CMD_REGISTER "keymiss.register"
#define KM_CMD_TAKE "keymiss.take"
#define KM_CMD_FILL "keymiss.fill"
#define KM_CMD_FAIL "keymiss.fail"
#define KM_CMD_VERSION "keymiss.version"
/* what a client connection past MAXCLIENTS runs instead of each command it sends (the refusal) */
#define KM_CMD_REFUSED "keymiss.refused"
/* FORGET pattern | FORGET TAG tag: a client's (or operator's) invalidation, run in steps */
#define KM_CMD_FORGET "keymiss.forget"

/* every command the module adds */
#define KM_COMMANDS(X)                                                                                \
    X(KM_CMD_GET) X(KM_CMD_MGET) X(KM_CMD_REGISTER) X(KM_CMD_TAKE) X(KM_CMD_FILL) X(KM_CMD_FAIL)      \
    X(KM_CMD_VERSION) X(KM_CMD_REFUSED) X(KM_CMD_FORGET)
/* the commands only workers may send (clients are denied them by ACL) */
#define KM_WORKER_COMMANDS(X) X(KM_CMD_REGISTER) X(KM_CMD_TAKE) X(KM_CMD_FILL) X(KM_CMD_FAIL) X(KM_CMD_VERSION)

/* --- options (matched whatever their case) -------------------------------------------------- */
#define KM_OPT_TTL "TTL"
#define KM_OPT_ERRTTL "ERRTTL"
#define KM_OPT_TIMEOUT "TIMEOUT"
#define KM_OPT_QUEUE "QUEUE"
#define KM_OPT_STALE "STALE"
#define KM_OPT_EARLY "EARLY"
#define KM_OPT_VERSION "VERSION"
#define KM_OPT_LABEL "LABEL"
#define KM_OPT_VSTALE "VSTALE"
#define KM_OPT_PX "PX"
#define KM_OPT_SHARE "SHARE"
#define KM_OPT_NOSTORE "NOSTORE"
#define KM_OPT_LIMIT "LIMIT"
#define KM_OPT_CODEC "CODEC"
/* REGISTER's tag of a keyspace (repeatable): a template over its key's <field>s, or a fixed label;
 * FORGET TAG tag forgets the keys carrying it */
#define KM_OPT_TAG "TAG"
/* FILL's COST us: the microseconds of handler time the value cost (a batch's call divided among
 * its keys), what INFO's mean/p50/p99_compute_seconds are made of */
#define KM_OPT_COST "COST"
/* FAIL's flag for a key that does not fit its keyspace's template: nothing ran, so it counts in
 * neither computations nor errors (a timeout, flagged TIMEOUT, counts in timeouts) */
#define KM_OPT_MISMATCH "MISMATCH"
/* the module's load arguments: GRACE ms, KEYSPACE pattern (repeatable), MAXCLIENTS n (TCP client
 * connections admitted; keymiss's own come through the unix socket), in any order */
#define KM_OPT_GRACE "GRACE"
#define KM_OPT_KEYSPACE "KEYSPACE"
#define KM_OPT_MAXCLIENTS "MAXCLIENTS"

/* --- limits (plain decimals where an error text quotes them) -------------------------------- */
/* the longest time in milliseconds any option may say (a year) */
#define KM_MAX_MS (365LL * 24 * 3600 * 1000)
/* FILL's COST, at most this many microseconds (a day) */
#define KM_MAX_COST_US (24LL * 3600 * 1000000)
/* EARLY is XFetch's beta in thousandths, at most this */
#define KM_MAX_EARLY 1000000
/* a keyspace's QUEUE, at most this */
#define KM_MAX_QUEUE 1000000
/* bytes of a version tag or label */
#define KM_MAX_VERSION 256
/* bytes of a keyspace's name or glob */
#define KM_MAX_GLOB 512
/* tags one keyspace may declare */
#define KM_MAX_TAGS 32
/* <field>s of a keyspace's template that its tags may use */
#define KM_MAX_FIELDS 32
/* keys one TAKE may ask for */
#define KM_MAX_TAKE 10000
/* keyspaces one server holds */
#define KM_MAX_KEYSPACES 64
/* bytes of an error line the module keeps (longer ones are cut) */
#define KM_MAX_ERROR_LEN 512
/* a keyspace's TIMEOUT when REGISTER does not give one */
#define KM_DEFAULT_TIMEOUT_MS 65000
/* a keyspace's QUEUE when REGISTER does not give one */
#define KM_DEFAULT_QUEUE 10000
/* SHARE is in millionths of maxmemory: at most this, the whole of it */
#define KM_MAX_SHARE 1000000
/* a keyspace's SHARE when REGISTER does not give one (a tenth of maxmemory) */
#define KM_DEFAULT_SHARE 100000
/* how long a miss of a keyspace without a worker waits for one when GRACE does not say */
#define KM_DEFAULT_GRACE_MS 5000
/* FILL's replies: stored, discarded, answered to the key's readers but not stored */
#define KM_FILL_STORED 1
#define KM_FILL_DISCARDED 0
#define KM_FILL_NOT_STORED 2
/* how often the module's timer runs (expired leases, deadlines, version switches) */
#define KM_TICK_MS 50
/* FILL's CODEC, at most this */
#define KM_MAX_CODEC 255
/* what an earlier release's companion held for a client's write (read, no longer written) */
#define KM_CLIENT_MARK "client"
/* keymiss's own records (contexts, companions, markers) are named under this */
#define KM_OWN_PREFIX "keymiss:"
/* a value's companion key: this, a short tag in the value's slot, '}', the key */
#define KM_COMPANION_PREFIX "keymiss:v:{"
/* between a companion's fields: <codec>:<crc32, 8 hex>:<version> (empty version: a client's) */
#define KM_RECORD_SEP ":"
/* what every error line of the module starts with */
#define KM_ERR_PREFIX "ERR keymiss: "
/* why a tag is refused whose text after a <field> does not start with the text after it in the key
 * (a field's value may hold it, so one tag would name several keys' values) */
#define KM_TAG_AMBIGUOUS "a tag's <field> must end the tag or be followed by the text that follows it in the key"

/* --- INFO keymiss --------------------------------------------------------------------------- */
#define KM_INFO_SECTION "keymiss"
/* the section's own fields (keymiss_<name> in INFO) */
#define KM_INFO_FIELDS(X)                                                                             \
    X(keyspaces) X(workers) X(pending) X(blocked_readers) X(error_records) X(refused_clients) X(admission_rejects) \
        X(admission_evictions) X(admission_sketch_bytes)
/* the fields of each keymiss_keyspace_<n> line, in order (version only when versioned): the words
 * the Python server's INFO keymiss uses for the same counters, in the same units; the last ones are
 * KM_INFO_KEYSPACE_ALIASES */
#define KM_INFO_KEYSPACE_FIELDS(X)                                                                    \
    X(pattern)                                                                                        \
    X(hits)                                                                                           \
    X(misses)                                                                                         \
    X(computations)                                                                                   \
    X(queued)                                                                                         \
    X(in_flight)                                                                                      \
    X(fills)                                                                                          \
    X(errors)                                                                                         \
    X(timeouts)                                                                                       \
    X(requeues)                                                                                       \
    X(discarded_fills)                                                                                \
    X(superseded)                                                                                     \
    X(busy)                                                                                           \
    X(no_worker)                                                                                      \
    X(oversized)                                                                                      \
    X(dropped)                                                                                        \
    X(workers)                                                                                        \
    X(version)                                                                                        \
    X(version_misses)                                                                                 \
    X(version_discards)                                                                               \
    X(version_stale_hits)                                                                             \
    X(stale_hits)                                                                                     \
    X(early_refreshes)                                                                                \
    X(refresh_failures)                                                                               \
    X(mean_compute_seconds)                                                                           \
    X(p50_compute_seconds)                                                                            \
    X(p99_compute_seconds)                                                                            \
    X(failures)                                                                                       \
    X(mean_compute_ms)
/* an earlier release's names, still shown for one release: failures (now errors) and
 * mean_compute_ms (now mean_compute_seconds) */
#define KM_INFO_KEYSPACE_ALIASES(X) X(failures) X(mean_compute_ms)

#endif
