/* Templates and tags. A keyspace named by a template (`user:<user>:feed:<page>`, as in
 * keymiss/keyspace.py) may declare tags (REGISTER ... TAG user:<user> TAG feeds): each a template
 * over its key's fields, or a fixed label that every key of the keyspace carries. A key carries
 * the tag its fields render, so FORGET TAG user:42 forgets exactly the keys whose <user> is 42.
 * The key is parsed here as the engine parses it: each field runs up to the first occurrence of the
 * literal after it, the last takes the rest; no field is empty. */
#include "keymiss.h"

static int km_name_char(char c, int first) {
    return c == '_' || ((c | 32) >= 'a' && (c | 32) <= 'z') || (!first && c >= '0' && c <= '9');
}

/* Splits at every <name> (leftmost first, as a regex search would); nfields -1 past KM_MAX_FIELDS. */
void km_template_split(const char *p, size_t len, KmTemplate *t) {
    size_t lit = 0, i = 0;
    t->nfields = 0;
    while (i < len) {
        if (p[i] == '<' && i + 1 < len && km_name_char(p[i + 1], 1)) {
            size_t j = i + 2;
            while (j < len && km_name_char(p[j], 0)) j++;
            if (j < len && p[j] == '>') {
                if (t->nfields == KM_MAX_FIELDS) {
                    t->nfields = -1;
                    return;
                }
                t->lit[t->nfields] = (KmSpan){p + lit, i - lit};
                t->name[t->nfields] = (KmSpan){p + i + 1, j - i - 1};
                t->nfields++;
                i = lit = j + 1;
                continue;
            }
        }
        i++;
    }
    t->lit[t->nfields] = (KmSpan){p + lit, len - lit};
}

static const char *km_find(const char *hay, size_t hlen, const KmSpan *needle) {
    if (needle->len == 0) return hay;
    for (size_t i = 0; i + needle->len <= hlen; i++)
        if (hay[i] == needle->p[0] && memcmp(hay + i, needle->p, needle->len) == 0) return hay + i;
    return NULL;
}

/* The key's fields (spans into the key), 1; or 0 when it does not fit. */
int km_template_parse(const KmTemplate *t, const char *key, size_t klen, KmSpan *values) {
    size_t pos = t->lit[0].len;
    if (t->nfields <= 0 || klen < pos || memcmp(key, t->lit[0].p, pos) != 0) return 0;
    int last = t->nfields - 1;
    for (int i = 0; i < t->nfields; i++) {
        if (i < last) {
            const char *end = km_find(key + pos, klen - pos, &t->lit[i + 1]);
            if (end == NULL) return 0;
            values[i] = (KmSpan){key + pos, (size_t)(end - key) - pos};
            pos = (size_t)(end - key) + t->lit[i + 1].len;
        } else {
            const KmSpan *trail = &t->lit[t->nfields];
            if (klen < pos + trail->len || memcmp(key + klen - trail->len, trail->p, trail->len) != 0) return 0;
            values[i] = (KmSpan){key + pos, klen - trail->len - pos};
        }
        if (values[i].len == 0) return 0;
    }
    return 1;
}

static int km_field_index(const KmTemplate *t, const KmSpan *name) {
    for (int i = 0; i < t->nfields; i++)
        if (t->name[i].len == name->len && memcmp(t->name[i].p, name->p, name->len) == 0) return i;
    return -1;
}

void km_tags_free(char **tags, size_t *lens, int n) {
    for (int i = 0; i < n; i++) KM_Free(tags[i]);
    KM_Free(tags);
    KM_Free(lens);
}

/* Whether the tag's text after its field f starts with the text after that field in the key. A tag
 * is read back as a key is (a field runs up to the first occurrence of the text after it), and a
 * value never holds the key's text after it: otherwise one tag names several keys' values (u<a>-<b>
 * on k:<a>:<b>: a=4-2,b=3 and a=4,b=2-3 both render u4-2-3) and FORGET TAG would miss some. */
static int km_tag_follows_key(const KmTemplate *kt, const KmTemplate *tt, int f) {
    int k = km_field_index(kt, &tt->name[f]);
    if (k < 0 || k + 1 >= kt->nfields) return 0; /* the key's last field may hold anything */
    const KmSpan *in_tag = &tt->lit[f + 1], *in_key = &kt->lit[k + 1];
    return in_tag->len >= in_key->len && memcmp(in_tag->p, in_key->p, in_key->len) == 0;
}

/* REGISTER's TAG options (argv[first..] in option/value pairs) of the keyspace `pattern`: copies
 * in *tags, NULL; or the error line (nothing kept). A tag's fields must be the template's, with
 * literal text between any two of them. */
const char *km_tags_parse(RedisModuleString **argv, int first, int argc, const char *pattern, size_t plen,
                          char ***tags, size_t **lens, int *n) {
    KmTemplate kt, tt;
    km_template_split(pattern, plen, &kt);
    *tags = NULL;
    *lens = NULL;
    *n = 0;
    for (int i = first; i + 1 < argc; i += 2) {
        size_t olen, len;
        const char *opt = KM_StringPtrLen(argv[i], &olen);
        if (!km_word_is(opt, olen, KM_OPT_TAG)) continue;
        const char *p = KM_StringPtrLen(argv[i + 1], &len), *err = NULL;
        if (*n == KM_MAX_TAGS) err = KM_ERR_PREFIX "a keyspace has at most " KM_XSTR(KM_MAX_TAGS) " tags";
        else if (len == 0 || len > KM_MAX_GLOB || memchr(p, '\0', len))
            err = KM_ERR_PREFIX "a tag is 1 to " KM_XSTR(KM_MAX_GLOB) " bytes";
        if (err == NULL) {
            km_template_split(p, len, &tt);
            if (tt.nfields < 0 || kt.nfields < 0) err = KM_ERR_PREFIX "a tag has too many <field>s";
            for (int f = 0; err == NULL && f < tt.nfields; f++) {
                if (km_field_index(&kt, &tt.name[f]) < 0)
                    err = KM_ERR_PREFIX "a tag names a <field> its keyspace's template does not have";
                else if (f > 0 && tt.lit[f].len == 0)
                    err = KM_ERR_PREFIX "a tag's <field>s need literal text between them";
                else if (f + 1 < tt.nfields && !km_tag_follows_key(&kt, &tt, f))
                    err = KM_ERR_PREFIX KM_TAG_AMBIGUOUS;
            }
        }
        if (err != NULL) {
            km_tags_free(*tags, *lens, *n);
            *tags = NULL;
            *lens = NULL;
            *n = 0;
            return err;
        }
        *tags = KM_Realloc(*tags, sizeof(char *) * (size_t)(*n + 1));
        *lens = KM_Realloc(*lens, sizeof(size_t) * (size_t)(*n + 1));
        (*tags)[*n] = km_dup_bytes(p, len);
        (*lens)[*n] = len;
        (*n)++;
    }
    return NULL;
}

/* Which keys carry `tag`: one match per keyspace tag it fits (a label: equal; a template: parsed,
 * its fields bound). NULL with *n 0 when no keyspace declares it. */
KmTagMatch *km_tag_matches(const char *tag, size_t len, int *n) {
    KmTagMatch *out = NULL;
    KmTemplate kt, tt;
    KmSpan vals[KM_MAX_FIELDS];
    *n = 0;
    for (int ksi = 0; ksi < km.nkeyspaces; ksi++) {
        KmKeyspace *ks = km.keyspaces[ksi];
        km_template_split(ks->pattern, strlen(ks->pattern), &kt);
        for (int t = 0; t < ks->ntags; t++) {
            km_template_split(ks->tags[t], ks->taglens[t], &tt);
            if (tt.nfields == 0 ? (len != ks->taglens[t] || memcmp(tag, ks->tags[t], len) != 0)
                                : !km_template_parse(&tt, tag, len, vals))
                continue;
            out = KM_Realloc(out, sizeof(KmTagMatch) * (size_t)(*n + 1));
            KmTagMatch *m = &out[(*n)++];
            memset(m, 0, sizeof(*m));
            m->patlen = strlen(ks->pattern);
            m->pattern = km_dup_bytes(ks->pattern, m->patlen);
            for (int f = 0; f < tt.nfields; f++) {
                m->field[f] = km_field_index(&kt, &tt.name[f]);
                m->value[f] = km_dup_bytes(vals[f].p, vals[f].len);
                m->vlen[f] = vals[f].len;
            }
            m->nbound = tt.nfields;
        }
    }
    return out;
}

/* Whether the key (of keyspace ksi, or -1) carries m's tag. */
int km_tag_match_key(const KmTagMatch *m, int ksi, const char *kp, size_t klen) {
    if (ksi < 0) return 0;
    const char *have = km.keyspaces[ksi]->pattern;
    if (strlen(have) != m->patlen || memcmp(have, m->pattern, m->patlen) != 0) return 0;
    if (m->nbound == 0) return 1;
    KmTemplate kt;
    KmSpan vals[KM_MAX_FIELDS];
    km_template_split(m->pattern, m->patlen, &kt);
    if (!km_template_parse(&kt, kp, klen, vals)) return 0;
    for (int i = 0; i < m->nbound; i++) {
        const KmSpan *v = &vals[m->field[i]];
        if (v->len != m->vlen[i] || memcmp(v->p, m->value[i], v->len) != 0) return 0;
    }
    return 1;
}

void km_tag_matches_free(KmTagMatch *m, int n) {
    for (int i = 0; i < n; i++) {
        KM_Free(m[i].pattern);
        for (int f = 0; f < m[i].nbound; f++) KM_Free(m[i].value[f]);
    }
    KM_Free(m);
}

/* A name covering every key m takes, for an ACL check of the caller's key patterns (KM_Alloc'd, or
 * NULL when its keyspace is gone): the keyspace's glob when no field is bound, else its template
 * with each bound field's value and a `*` for each other field. */
char *km_tag_match_scope(const KmTagMatch *m, size_t *len) {
    int ksi = km_keyspace_find(m->pattern, m->patlen);
    if (ksi < 0) return NULL;
    const KmKeyspace *ks = km.keyspaces[ksi];
    if (m->nbound == 0 || ks->glob == NULL) {
        *len = ks->glob ? ks->globlen : m->patlen;
        return km_dup_bytes(ks->glob ? ks->glob : m->pattern, *len);
    }
    KmTemplate kt;
    km_template_split(m->pattern, m->patlen, &kt);
    size_t cap = m->patlen + (size_t)kt.nfields + 1, n = 0;
    for (int f = 0; f < m->nbound; f++) cap += m->vlen[f];
    char *out = KM_Alloc(cap);
    for (int i = 0; i <= kt.nfields; i++) {
        memcpy(out + n, kt.lit[i].p, kt.lit[i].len);
        n += kt.lit[i].len;
        if (i == kt.nfields) break;
        int bound = -1;
        for (int f = 0; f < m->nbound; f++)
            if (m->field[f] == i) bound = f;
        if (bound < 0) {
            out[n++] = '*';
        } else {
            memcpy(out + n, m->value[bound], m->vlen[bound]);
            n += m->vlen[bound];
        }
    }
    out[n] = '\0';
    *len = n;
    return out;
}

