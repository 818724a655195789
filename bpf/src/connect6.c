/* cgroup/connect6 on an enrolled pod's cgroup: connect4 for dual-stack AF_INET6 sockets.
 * gRPC C-core, Java and Node.js connect to an IPv4 target as ::ffff:a.b.c.d from such a
 * socket, which runs this hook instead of connect4; left alone, the connection would leave
 * the pod in plaintext. The mesh is IPv4-only: genuine IPv6 destinations are left alone. */
#include "maps.h"

int ambimesh_connect6(struct bpf_sock_addr *ctx)
{
    if (ctx->type != AMBIMESH_SOCK_STREAM || ctx->protocol != AMBIMESH_IPPROTO_TCP)
        return 1;
    if (!is_v4_mapped(ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2]))
        return 1;
    __u32 ip4 = ctx->user_ip6[3];
    if (is_local(ip4))
        return 1;

    __u64 cookie = bpf_get_socket_cookie(ctx);
    /* One 8-byte store, as in connect4 (Linux 6.1's verifier, see maps.h). */
    union orig_dst_words value;
    value.word = (__u64)ip4 | ((__u64)(__u16)ctx->user_port << 32);
    orig_dst_by_cookie.update(&cookie, &value.dst);

    /* The ::ffff: prefix stays: the socket goes to ztunnel's IPv4 listener. */
    ctx->user_ip6[3] = bpf_htonl(AMBIMESH_LOCALHOST);
    ctx->user_port = bpf_htons(AMBIMESH_OUTBOUND_PORT);
    count(COUNTER_OUTBOUND_REDIRECTED);
    return 1;
}
