/* Error records: a keyspace with an error TTL answers a failed key's error line to later readers
 * until the TTL passes or a client writes the key. */
#include "keymiss.h"

static void km_error_free(void *val) {
    KmErrorRecord *r = val;
    KM_Free(r->msg);
    KM_Free(r);
}

void km_error_forget(const char *kp, size_t klen) {
    KmErrorRecord *r = NULL;
    if (KM_DictDelC(km.errors, (void *)kp, klen, &r) == RM_OK && r) km_error_free(r);
}

void km_error_remember(const RedisModuleString *key, const char *msg, long long ttl_ms, long long now) {
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    km_error_forget(kp, klen);
    if (KM_DictSize(km.errors) >= KM_MAX_ERROR_RECORDS) return; /* bounded: a flood of failures is not kept */
    KmErrorRecord *r = KM_Alloc(sizeof(*r));
    r->msg = km_dup_bytes(msg, strlen(msg));
    r->expires = now + ttl_ms;
    KM_DictSetC(km.errors, (void *)kp, klen, r);
}

/* The error line remembered for the key, while its TTL lasts; else NULL. */
const char *km_error_fresh(const RedisModuleString *key, long long now) {
    if (KM_DictSize(km.errors) == 0) return NULL;
    size_t klen;
    const char *kp = KM_StringPtrLen(key, &klen);
    KmErrorRecord *r = KM_DictGetC(km.errors, (void *)kp, klen, NULL);
    if (r == NULL) return NULL;
    if (r->expires <= now) {
        km_error_forget(kp, klen);
        return NULL;
    }
    return r->msg;
}

static int km_error_expired(const void *val, const void *now) {
    return ((const KmErrorRecord *)val)->expires <= *(const long long *)now;
}

/* Records whose TTL passed are forgotten. */
void km_errors_purge(long long now) {
    km_dict_purge(km.errors, km_error_expired, &now, km_error_free);
}
