/* Looks up the module API by name (see api.h). */
#define KEYMISS_API_DEFINE
#include "api.h"

#include <stdio.h>

typedef int (*GetApiFunc)(const char *name, void *out);

static int lookup(GetApiFunc get_api, const char *name, void *out) {
    char full[96];
    /* Valkey answers both its own prefix and the Redis one; try Redis's first. */
    if (snprintf(full, sizeof(full), "RedisModule_%s", name) < (int)sizeof(full) &&
        get_api(full, out) == RM_OK)
        return RM_OK;
    if (snprintf(full, sizeof(full), "ValkeyModule_%s", name) < (int)sizeof(full) &&
        get_api(full, out) == RM_OK)
        return RM_OK;
    return RM_ERR;
}

int keymiss_api_init(RedisModuleCtx *ctx, const char *name, int ver) {
    GetApiFunc get_api = (GetApiFunc)(uintptr_t)((void **)ctx)[0];
#define KEYMISS_LOOKUP(ret, fn, params)                                                               \
    if (lookup(get_api, #fn, (void *)&KM_##fn) != RM_OK) return RM_ERR;
    KEYMISS_API_CALLS(KEYMISS_LOOKUP)
#undef KEYMISS_LOOKUP
#define KEYMISS_LOOKUP_OPTIONAL(ret, fn, params)                                                      \
    if (lookup(get_api, #fn, (void *)&KM_##fn) != RM_OK) KM_##fn = NULL;
    KEYMISS_API_OPTIONAL(KEYMISS_LOOKUP_OPTIONAL)
#undef KEYMISS_LOOKUP_OPTIONAL
    if (KM_IsModuleNameBusy(name)) return RM_ERR;
    KM_SetModuleAttribs(ctx, name, ver, RM_APIVER_1);
    return RM_OK;
}
