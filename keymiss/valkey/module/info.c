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

/* A name as an INFO value can carry it: no separators, spaces or control bytes. */
static void km_info_name(char *out, size_t size, const char *name) {
    size_t n = 0;
    for (; *name && n + 1 < size; name++) {
        unsigned char c = (unsigned char)*name;
        out[n++] = (c == ',' || c == '=' || c <= ' ' || c >= 127) ? '_' : (char)c;
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
        /* each field is the keyspace's member of that name: a text (char *) or a number */
#define KM_INFO_KEYSPACE_FIELD(name)                                                                  \
    _Generic(ks->name, char *: km_info_text, default: km_info_number)(ctx, ks, #name, ks->name);
        KM_INFO_KEYSPACE_FIELDS(KM_INFO_KEYSPACE_FIELD)
#undef KM_INFO_KEYSPACE_FIELD
        KM_InfoEndDictField(ctx);
    }
}
