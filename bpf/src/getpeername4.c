/* cgroup/getpeername4 on an enrolled pod's cgroup: the app sees the peer it asked for,
 * not ztunnel's 127.0.0.1:AMBIMESH_OUTBOUND_PORT. */
#include "maps.h"

int ambimesh_getpeername4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMBIMESH_SOCK_STREAM)
        return 1;
    __u64 cookie = bpf_get_socket_cookie(ctx);
    struct orig_dst *dst = orig_dst_by_cookie.lookup(&cookie);
    if (!dst)
        return 1;
    ctx->user_ip4 = dst->ip4;
    ctx->user_port = dst->port;
    return 1;
}
