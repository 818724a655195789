/* cgroup/connect4 on an enrolled pod's cgroup: every outbound TCP connect() to a
 * non-local address goes to ztunnel's outbound listener in the same pod netns
 * (127.0.0.1:AMBIMESH_OUTBOUND_PORT); the asked-for destination is kept by socket cookie.
 * UDP (DNS) and loopback connections are left alone. */
#include "maps.h"

int ambimesh_connect4(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMBIMESH_SOCK_STREAM || ctx->protocol != AMBIMESH_IPPROTO_TCP)
        return 1;
    __u32 ip4 = ctx->user_ip4;
    if (is_local(ip4))
        return 1;

    __u64 cookie = bpf_get_socket_cookie(ctx);
    /* One 8-byte store: older verifiers (Linux 6.1) reject a 2-byte store into a stack
     * slot that also held a spilled pointer unless the loader has CAP_PERFMON. The layout
     * (ip4 in the low half) is that of struct orig_dst on little-endian hosts. */
    union {
        struct orig_dst dst;
        __u64 raw;
    } value;
    value.raw = (__u64)ip4 | ((__u64)(__u16)ctx->user_port << 32);
    orig_dst_by_cookie.update(&cookie, &value.dst);

    ctx->user_ip4 = bpf_htonl(AMBIMESH_LOCALHOST);
    ctx->user_port = bpf_htons(AMBIMESH_OUTBOUND_PORT);
    count(COUNTER_OUTBOUND_REDIRECTED);
    return 1;
}
