/* cgroup/getsockopt on ztunnel's cgroup: answers getsockopt(SOL_IP, SO_ORIGINAL_DST) on a
 * socket accepted by the outbound listener, as iptables REDIRECT would, so ztunnel uses
 * the standard call. Every other option, and every unknown connection, keeps the
 * kernel's own answer. */
#include "maps.h"

struct ambimesh_sockaddr_in {
    __u16 sin_family;
    __u16 sin_port;
    __u32 sin_addr;
    __u8 sin_zero[8];
};

int ambimesh_getsockopt(struct bpf_sockopt *ctx)
{
    if (ctx->level != AMBIMESH_SOL_IP || ctx->optname != AMBIMESH_SO_ORIGINAL_DST)
        return 1;
    struct bpf_sock *sk = ctx->sk;
    if (!sk || sk->family != AMBIMESH_AF_INET || sk->protocol != AMBIMESH_IPPROTO_TCP)
        return 1;
    if (sk->src_port != AMBIMESH_OUTBOUND_PORT) /* src_port is host order */
        return 1;

    union peer_key_words key; /* dst_port is network order */
    peer_key_build(&key, bpf_get_netns_cookie(ctx), sk->dst_ip4, (__u16)sk->dst_port);
    struct orig_dst *dst = orig_dst_by_peer.lookup(&key.key);
    if (!dst)
        return 1;

    struct ambimesh_sockaddr_in *sa = ctx->optval;
    if ((void *)(sa + 1) > ctx->optval_end)
        return 1;
    sa->sin_family = AMBIMESH_AF_INET;
    sa->sin_port = dst->port;
    sa->sin_addr = dst->ip4;
    __builtin_memset(sa->sin_zero, 0, sizeof(sa->sin_zero));
    /* volatile: clang would merge these two adjacent stores into one 64-bit store,
     * which the verifier rejects for this context. */
    *(volatile __s32 *)&ctx->optlen = sizeof(*sa);
    *(volatile __s32 *)&ctx->retval = 0;
    count(COUNTER_ORIGINAL_DST_ANSWERED);
    return 1;
}
