/* Hash slots: Redis Cluster's key slot, a short hash tag for every slot, and the companion key of a
 * versioned value (keymiss:v:{<tag>}<key>), which lands in the value's own slot. */
#include "keymiss.h"

/* CRC16/XMODEM, as Redis Cluster computes key slots. */
static void km_crc16_init(void) {
    for (int i = 0; i < 256; i++) {
        uint16_t c = (uint16_t)(i << 8);
        for (int j = 0; j < 8; j++) c = (c & 0x8000) ? (uint16_t)((c << 1) ^ 0x1021) : (uint16_t)(c << 1);
        km.crc16tab[i] = c;
    }
}

static uint16_t km_crc16(const char *p, size_t len) {
    uint16_t crc = 0;
    for (size_t i = 0; i < len; i++)
        crc = (uint16_t)((crc << 8) ^ km.crc16tab[((crc >> 8) ^ (unsigned char)p[i]) & 0xff]);
    return crc;
}

/* The key's slot: the CRC16 of its hash tag, or of the whole key. */
static unsigned km_key_slot(const char *p, size_t len) {
    size_t s, e;
    for (s = 0; s < len && p[s] != '{'; s++) {
    }
    if (s == len) return km_crc16(p, len) & (KM_SLOTS - 1);
    for (e = s + 1; e < len && p[e] != '}'; e++) {
    }
    if (e == len || e == s + 1) return km_crc16(p, len) & (KM_SLOTS - 1);
    return km_crc16(p + s + 1, e - s - 1) & (KM_SLOTS - 1);
}

/* For every slot, the first short base-36 string whose CRC16 lands in it (about 170,000 tries). */
int km_slot_tags_init(void) {
    static const char digits[] = "0123456789abcdefghijklmnopqrstuvwxyz";
    km_crc16_init();
    int left = KM_SLOTS;
    for (unsigned n = 0; left > 0 && n < 36u * 36 * 36 * 36; n++) {
        char buf[4];
        int len = 0;
        unsigned v = n;
        do {
            buf[len++] = digits[v % 36];
            v /= 36;
        } while (v && len < 4);
        unsigned s = km_crc16(buf, (size_t)len) & (KM_SLOTS - 1);
        if (km.slot_taglen[s] == 0) {
            memcpy(km.slot_tags[s], buf, (size_t)len);
            km.slot_taglen[s] = (unsigned char)len;
            left--;
        }
    }
    return left == 0 ? RM_OK : RM_ERR;
}

/* keymiss:v:{<tag>}<key>: where a versioned value's version is kept, in the value's own slot. */
RedisModuleString *km_companion_name(const RedisModuleString *key) {
    size_t len;
    const char *kp = KM_StringPtrLen(key, &len);
    unsigned s = km_key_slot(kp, len);
    size_t tl = km.slot_taglen[s], n = KM_COMPANION_PREFIX_LEN + tl + 1 + len;
    char *buf = KM_Alloc(n);
    memcpy(buf, KM_COMPANION_PREFIX, KM_COMPANION_PREFIX_LEN);
    memcpy(buf + KM_COMPANION_PREFIX_LEN, km.slot_tags[s], tl);
    buf[KM_COMPANION_PREFIX_LEN + tl] = '}';
    memcpy(buf + KM_COMPANION_PREFIX_LEN + tl + 1, kp, len);
    RedisModuleString *name = KM_CreateString(NULL, buf, n);
    KM_Free(buf);
    return name;
}
