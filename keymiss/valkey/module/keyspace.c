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
            if (ks->workers == 0 && ks->queued == 0 && ks->in_flight == 0) break;
        }
        if (ksi == km.nkeyspaces) return -1;
        KmKeyspace *ks = km.keyspaces[ksi];
        KM_Free(ks->pattern);
        KM_Free(ks->glob);
        KM_Free(ks->version);
        KM_Free(ks->label);
        KM_Free(ks->prev_version);
        memset(ks, 0, sizeof(*ks));
    } else {
        ksi = km.nkeyspaces++;
        km.keyspaces[ksi] = KM_Calloc(1, sizeof(KmKeyspace));
    }
    km.keyspaces[ksi]->pattern = km_dup_bytes(pattern, len);
    return ksi;
}

int km_worker_index(unsigned long long client) {
    for (int w = 0; w < km.nworkers; w++)
        if (km.workers[w].client == client) return w;
    return -1;
}

void km_count_workers(void) {
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++) km.keyspaces[ksi]->workers = 0;
    for (int w = 0; w < km.nworkers; w++)
        for (int ksi = 0; ksi < km.nkeyspaces; ksi++)
            if (km.workers[w].mask & ((uint64_t)1 << ksi)) km.keyspaces[ksi]->workers++;
}
