/* The keyspace table: a keyspace by name, a new one, and the workers serving them. */
#include "keymiss.h"

/* The keyspace registered under this name (its pattern), or -1. */
int km_keyspace_find(const char *pattern, size_t len) {
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++) {
        const char *have = km.keyspaces[ksi]->pattern;
        if (strlen(have) == len && memcmp(have, pattern, len) == 0) return ksi;
    }
    return -1;
}

/* A new keyspace of this name, with nothing else set; -1 when the table is full and every keyspace
 * in it has a worker or something queued or computing (else one that has none gives way). */
int km_keyspace_add(const char *pattern, size_t len) {
    int ksi;
    if (km.nkeyspaces == KM_MAX_KEYSPACES) {
        for (ksi = 0; ksi < km.nkeyspaces; ksi++) {
            KmKeyspace *ks = km.keyspaces[ksi];
            if (ks->workers == 0 && ks->queued == 0 && ks->in_flight == 0 && !ks->declared) break;
        }
        if (ksi == km.nkeyspaces) return -1;
        KmKeyspace *ks = km.keyspaces[ksi];
        KM_Free(ks->pattern);
        KM_Free(ks->glob);
        KM_Free(ks->version);
        KM_Free(ks->label);
        KM_Free(ks->prev_version);
        km_tags_free(ks->tags, ks->taglens, ks->ntags);
        memset(ks, 0, sizeof(*ks));
    } else {
        ksi = km.nkeyspaces++;
        km.keyspaces[ksi] = KM_Calloc(1, sizeof(KmKeyspace));
    }
    km.keyspaces[ksi]->pattern = km_dup_bytes(pattern, len);
    km.keyspaces[ksi]->workerless_since = km_now_ms();
    return ksi;
}

static int km_field_char(char c, int first) {
    return c == '_' || ((c | 32) >= 'a' && (c | 32) <= 'z') || (!first && c >= '0' && c <= '9');
}

/* The glob of a keyspace's name: the name itself, or for a template (`<field>`s, as in
 * keymiss/keyspace.py) every key that starts with its literal head, escaped (the engine reports a
 * key there that does not fit the template, rather than leaving it a silent miss). A copy. */
static char *km_declared_glob(const char *pattern, size_t len, size_t *globlen) {
    size_t head = len; /* where the first <field> starts */
    for (size_t i = 0; i + 2 < len && head == len; i++) {
        if (pattern[i] != '<' || !km_field_char(pattern[i + 1], 1)) continue;
        size_t j = i + 2;
        while (j < len && km_field_char(pattern[j], 0)) j++;
        if (j < len && pattern[j] == '>') head = i;
    }
    if (head == len) {
        *globlen = len;
        return km_dup_bytes(pattern, len);
    }
    char *glob = KM_Alloc(2 * head + 2);
    size_t n = 0;
    for (size_t i = 0; i < head; i++) {
        if (pattern[i] == '*' || pattern[i] == '?' || pattern[i] == '[' || pattern[i] == ']' || pattern[i] == '\\')
            glob[n++] = '\\';
        glob[n++] = pattern[i];
    }
    glob[n++] = '*';
    glob[n] = '\0';
    *globlen = n;
    return glob;
}

/* A keyspace named by the module's KEYSPACE argument: it exists, and routes its keys, before any
 * worker registers it (their misses wait up to GRACE for one); REGISTER later sets its options.
 * Its index, or -1 when the table is full. */
int km_keyspace_declare(const char *pattern, size_t len) {
    int ksi = km_keyspace_find(pattern, len);
    if (ksi < 0 && (ksi = km_keyspace_add(pattern, len)) < 0) return -1;
    KmKeyspace *ks = km.keyspaces[ksi];
    if (ks->glob == NULL) {
        ks->glob = km_declared_glob(pattern, len, &ks->globlen);
        ks->prefixlen = km_glob_prefix_len(ks->glob, ks->globlen);
        ks->timeout_ms = KM_DEFAULT_TIMEOUT_MS;
        ks->queue_max = KM_DEFAULT_QUEUE;
        ks->share_ppm = KM_DEFAULT_SHARE;
    }
    ks->declared = 1;
    return ksi;
}

int km_worker_index(unsigned long long client) {
    for (int w = 0; w < km.nworkers; w++)
        if (km.workers[w].client == client) return w;
    return -1;
}

/* Each keyspace's live workers; one whose last worker just went notes when (GRACE runs from then). */
void km_count_workers(void) {
    int before[KM_MAX_KEYSPACES];
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++) {
        before[ksi] = km.keyspaces[ksi]->workers;
        km.keyspaces[ksi]->workers = 0;
    }
    for (int w = 0; w < km.nworkers; w++)
        for (int ksi = 0; ksi < km.nkeyspaces; ksi++)
            if (km.workers[w].mask & ((uint64_t)1 << ksi)) km.keyspaces[ksi]->workers++;
    long long now = km_now_ms();
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++)
        if (before[ksi] > 0 && km.keyspaces[ksi]->workers == 0) km.keyspaces[ksi]->workerless_since = now;
}
