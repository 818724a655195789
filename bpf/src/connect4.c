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
    /* One 8-byte store (Linux 6.1's verifier, see maps.h); ip4 in the low half. */
    union orig_dst_words value;
    value.word = (__u64)ip4 | ((__u64)(__u16)ctx->user_port << 32);
    orig_dst_by_cookie.update(&cookie, &value.dst);

    ctx->user_ip4 = bpf_htonl(AMBIMESH_LOCALHOST);
    ctx->user_port = bpf_htons(AMBIMESH_OUTBOUND_PORT);
    count(COUNTER_OUTBOUND_REDIRECTED);
    return 1;
}
