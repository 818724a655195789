/* cgroup/getpeername6 on an enrolled pod's cgroup: getpeername4 for a dual-stack socket
 * that connect6 redirected; the app sees ::ffff:<original address>. */
#include "maps.h"

int ambimesh_getpeername6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMBIMESH_SOCK_STREAM)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst *dst = orig_dst_by_cookie.lookup(&cookie);
    if (!dst)
        return 1;
    /* The peer is ::ffff:127.0.0.1: connect6 redirects only v4-mapped destinations (and a
     * socket once on the v4-mapped path cannot reach IPv6 later), so only the IPv4 word
     * changes. */
    ctx->user_ip6[3] = dst->ip4;
    ctx->user_port = dst->port;
    return 1;
}
