/* INFO keymiss: the fields protocol.h lists (KM_INFO_FIELDS, KM_INFO_KEYSPACE_FIELDS), in order. */
#include "keymiss.h"

#include <stdio.h>

#define KM_INFO_TEXT_SIZE 256 /* a text field (pattern, version) shows at most this less one byte */

/* The section's own fields, each by its name there (one protocol.h adds must be given here). */
#define KM_SECTION_keyspaces ((long long)km.nkeyspaces)
#define KM_SECTION_workers ((long long)km.nworkers)
#define KM_SECTION_pending ((long long)KM_DictSize(km.pending))
#define KM_SECTION_blocked_readers (km.waiting)
#define KM_SECTION_error_records ((long long)KM_DictSize(km.errors))
#define KM_SECTION_refused_clients (km.refused_clients) /* client connections refused past MAXCLIENTS */
#define KM_SECTION_admission_rejects (km.admission_rejects)
#define KM_SECTION_admission_evictions (km.admission_evictions)
#define KM_SECTION_admission_sketch_bytes (km_sketch_bytes()) /* counted against maxmemory */

/* A keyspace's field by its INFO name (one protocol.h adds must be given here). Most are the
 * keyspace's member of that name; INFO's words are the Python server's, so a member the module
 * names otherwise is read under INFO's word (errors: failures), and under its earlier name as an
 * alias for a release. The compute seconds (mean, p50, p99) are the handler's, as the workers'
 * FILLs said them (COST): the Python server's and /metrics' meaning, not the wait for a worker. */
#define KM_FIELD_pattern(ks) ((ks)->pattern)
#define KM_FIELD_hits(ks) ((ks)->hits)
#define KM_FIELD_misses(ks) ((ks)->misses)
#define KM_FIELD_computations(ks) ((ks)->computations)
#define KM_FIELD_queued(ks) ((ks)->queued)
#define KM_FIELD_in_flight(ks) ((ks)->in_flight)
#define KM_FIELD_fills(ks) ((ks)->fills)
#define KM_FIELD_errors(ks) ((ks)->failures)
#define KM_FIELD_timeouts(ks) ((ks)->timeouts)
#define KM_FIELD_requeues(ks) ((ks)->requeues)
#define KM_FIELD_discarded_fills(ks) ((ks)->discarded_fills)
#define KM_FIELD_superseded(ks) ((ks)->superseded)
#define KM_FIELD_busy(ks) ((ks)->busy)
#define KM_FIELD_no_worker(ks) ((ks)->no_worker)
#define KM_FIELD_oversized(ks) ((ks)->oversized)
#define KM_FIELD_dropped(ks) ((ks)->dropped)
#define KM_FIELD_workers(ks) ((ks)->workers)
#define KM_FIELD_version(ks) ((ks)->version)
#define KM_FIELD_version_misses(ks) ((ks)->version_misses)
#define KM_FIELD_version_discards(ks) ((ks)->version_discards)
#define KM_FIELD_version_stale_hits(ks) ((ks)->version_stale_hits)
#define KM_FIELD_stale_hits(ks) ((ks)->stale_hits)
#define KM_FIELD_early_refreshes(ks) ((ks)->early_refreshes)
#define KM_FIELD_refresh_failures(ks) ((ks)->refresh_failures)
#define KM_FIELD_mean_compute_seconds(ks) km_compute_mean(ks)
#define KM_FIELD_p50_compute_seconds(ks) km_compute_quantile((ks), 0.5)
#define KM_FIELD_p99_compute_seconds(ks) km_compute_quantile((ks), 0.99)
#define KM_FIELD_failures(ks) ((ks)->failures)
#define KM_FIELD_mean_compute_ms(ks) ((long long)(km_compute_mean(ks) * 1000.0))

static const double km_compute_bounds[KM_COMPUTE_BUCKETS] = KM_COMPUTE_BOUNDS;

void km_observe_compute(KmKeyspace *ks, double seconds) {
    int i = 0;
    while (i < KM_COMPUTE_BUCKETS && seconds > km_compute_bounds[i]) i++;
    ks->compute_hist[i]++;
    ks->compute_seconds += seconds;
}

/* The mean handler seconds per key computed, over every key since the module loaded. */
static double km_compute_mean(const KmKeyspace *ks) {
    long long total = 0;
    for (int i = 0; i <= KM_COMPUTE_BUCKETS; i++) total += ks->compute_hist[i];
    return total ? ks->compute_seconds / (double)total : 0.0;
}

/* The q quantile of the keyspace's compute times, interpolated inside its bucket as Prometheus's
 * histogram_quantile does (keymiss.stats.histogram_quantile, the Python server's, is the same
 * estimate); past the last bound, the last bound; 0 before any fill. */
static double km_compute_quantile(const KmKeyspace *ks, double q) {
    long long total = 0, below = 0;
    for (int i = 0; i <= KM_COMPUTE_BUCKETS; i++) total += ks->compute_hist[i];
    if (total == 0) return 0.0;
    double rank = q * (double)total;
    for (int i = 0; i <= KM_COMPUTE_BUCKETS; i++) {
        long long n = ks->compute_hist[i];
        if (n > 0 && (double)(below + n) >= rank) {
            if (i == KM_COMPUTE_BUCKETS) break;
            double lower = i > 0 ? km_compute_bounds[i - 1] : 0.0;
            return lower + (km_compute_bounds[i] - lower) * (rank - (double)below) / (double)n;
        }
        below += n;
    }
    return km_compute_bounds[KM_COMPUTE_BUCKETS - 1];
}

/* A name as an INFO value can carry it, as the Python server writes it (keymiss.stats.info_name):
 * '%', ',', '=', space, the control bytes below it and DEL percent-encoded (%2C), the rest as it is
 * (UTF-8 passes); cut where the next whole character would not fit. */
static void km_info_name(char *out, size_t size, const char *name) {
    static const char hex[] = "0123456789ABCDEF";
    size_t n = 0;
    for (; *name; name++) {
        unsigned char c = (unsigned char)*name;
        int encode = c == '%' || c == ',' || c == '=' || c <= ' ' || c == 127;
        if (n + (encode ? 3 : 1) >= size) break;
        if (encode) {
            out[n++] = '%';
            out[n++] = hex[c >> 4];
            out[n++] = hex[c & 15];
        } else {
            out[n++] = (char)c;
        }
    }
    out[n] = '\0';
}

/* A keyspace's text field: its pattern, or its version, shown by its label and only when it has one. */
static void km_info_text(RedisModuleInfoCtx *ctx, const KmKeyspace *ks, const char *field, const char *text) {
    char shown[KM_INFO_TEXT_SIZE];
    if (strcmp(field, "version") == 0) {
        if (ks->version == NULL) return;
        text = ks->label ? ks->label : ks->version;
    }
    km_info_name(shown, sizeof(shown), text);
    KM_InfoAddFieldCString(ctx, field, shown);
}

/* A keyspace's counter or gauge. */
static void km_info_number(RedisModuleInfoCtx *ctx, const KmKeyspace *ks, const char *field, long long n) {
    (void)ks;
    KM_InfoAddFieldLongLong(ctx, field, n);
}

/* A keyspace's measure in seconds, to the microsecond (as the Python server shows its own). */
static void km_info_seconds(RedisModuleInfoCtx *ctx, const KmKeyspace *ks, const char *field, double seconds) {
    char shown[32];
    (void)ks;
    snprintf(shown, sizeof(shown), "%.6f", seconds);
    KM_InfoAddFieldCString(ctx, field, shown);
}

void km_on_info(RedisModuleInfoCtx *ctx, int for_crash_report) {
    (void)for_crash_report;
    KM_InfoAddSection(ctx, ""); /* the module's name: INFO keymiss */
#define KM_INFO_SECTION_FIELD(field) KM_InfoAddFieldLongLong(ctx, #field, KM_SECTION_##field);
    KM_INFO_FIELDS(KM_INFO_SECTION_FIELD)
#undef KM_INFO_SECTION_FIELD
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++) {
        KmKeyspace *ks = km.keyspaces[ksi];
        char field[32];
        snprintf(field, sizeof(field), "keyspace_%d", ksi);
        KM_InfoBeginDictField(ctx, field);
        /* each field is a text (char *), a measure in seconds (double) or a number */
#define KM_INFO_KEYSPACE_FIELD(name)                                                                  \
    _Generic(KM_FIELD_##name(ks), char *: km_info_text, double: km_info_seconds, default: km_info_number)( \
        ctx, ks, #name, KM_FIELD_##name(ks));
        KM_INFO_KEYSPACE_FIELDS(KM_INFO_KEYSPACE_FIELD)
#undef KM_INFO_KEYSPACE_FIELD
        KM_InfoEndDictField(ctx);
    }
}
