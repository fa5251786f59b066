/* Globs: Redis's syntax (* ? [abc] [^a-z] \x), matched without recursion, O(len(glob)*len(key)),
 * and the keyspace a key belongs to (the filter asks on every GET: the match is inlined there). */
#include "keymiss.h"

/* A [...] class at *pp (on '['), as Redis reads one: `\x` escapes, `a-z` is a range whatever
 * follows it, and an unterminated class runs to the end of the glob. *pp ends on its last char. */
static int km_class_match(const char **pp, const char *end, unsigned char c) {
    const char *p = *pp + 1;
    int neg = 0, hit = 0;
    if (p < end && *p == '^') {
        neg = 1;
        p++;
    }
    for (;;) {
        if (p >= end) { /* unterminated: the class ends with the glob */
            p = end - 1;
            break;
        }
        if (*p == '\\' && end - p >= 2) {
            p++;
            if ((unsigned char)*p == c) hit = 1;
        } else if (*p == ']') {
            break;
        } else if (end - p >= 3 && p[1] == '-') {
            unsigned char lo = (unsigned char)p[0], hi = (unsigned char)p[2];
            if (lo > hi) {
                unsigned char t = lo;
                lo = hi;
                hi = t;
            }
            if (c >= lo && c <= hi) hit = 1;
            p += 2;
        } else if ((unsigned char)*p == c) {
            hit = 1;
        }
        p++;
    }
    *pp = p;
    return neg ? !hit : hit;
}

int km_glob_match(const char *glob, size_t glen, const char *s, size_t slen) {
    const char *p = glob, *pend = glob + glen, *kp = s, *kend = s + slen;
    const char *star_p = NULL, *star_k = NULL;
    while (kp < kend) {
        if (p < pend) {
            if (*p == '*') {
                while (p < pend && *p == '*') p++;
                if (p == pend) return 1;
                star_p = p;
                star_k = kp;
                continue;
            }
            if (*p == '?') {
                p++;
                kp++;
                continue;
            }
            if (*p == '[') {
                const char *q = p;
                if (km_class_match(&q, pend, (unsigned char)*kp)) {
                    p = q + 1;
                    kp++;
                    continue;
                }
            } else {
                const char *q = p;
                if (*q == '\\' && q + 1 < pend) q++;
                if (*q == *kp) {
                    p = q + 1;
                    kp++;
                    continue;
                }
            }
        }
        if (star_p == NULL) return 0;
        p = star_p;
        kp = ++star_k;
    }
    while (p < pend && *p == '*') p++;
    return p == pend;
}

size_t km_glob_prefix_len(const char *glob, size_t len) {
    size_t i = 0;
    while (i < len && glob[i] != '*' && glob[i] != '?' && glob[i] != '[' && glob[i] != '\\') i++;
    return i;
}

/* The keyspace owning a key, or -1: the first registered that matches and has a worker, else the
 * first that matches (so a keyspace whose workers are gone never shadows a live one). Keys longer
 * than KM_MAX_ROUTED_KEY are no keyspace's: matching costs glob length x key length on every GET. */
int km_route(const char *key, size_t len) {
    int idle = -1;
    if (len > KM_MAX_ROUTED_KEY) return -1;
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++) {
        KmKeyspace *ks = km.keyspaces[ksi];
        if (ks->glob == NULL || len < ks->prefixlen || memcmp(key, ks->glob, ks->prefixlen) != 0) continue;
        if (km_glob_match(ks->glob, ks->globlen, key, len)) {
            if (ks->workers > 0) return ksi;
            if (idle < 0) idle = ksi;
        }
    }
    return idle;
}

int km_route_str(const RedisModuleString *key) {
    size_t len;
    const char *kp = KM_StringPtrLen(key, &len);
    return km_route(kp, len);
}
