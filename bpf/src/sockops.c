/* sockops on an enrolled pod's cgroup: once a redirected connection is established its
 * client address and port are known, so the original destination is also filed under the
 * key the proxy can compute from its accepted socket (see struct peer_key).
 *
 * The cookie entry stays until the socket closes (getpeername4/6 need it); the peer entry
 * is left to the LRU, because the proxy may accept and ask only after the client closed.
 *
 * Both families: a dual-stack AF_INET6 socket that connect6 redirected runs an IPv4
 * connection (tcp_v6_connect hands a v4-mapped destination to tcp_v4_connect), so its
 * local_ip4 and local_port are that connection's, as on an AF_INET socket. Only sockets
 * connect4/connect6 redirected have a cookie entry.
 *
 * With the same-node fast path on, redirected sockets and the app's end of ztunnel's
 * fast-path deliveries (from AMBIMESH_FASTPATH_SOURCE) join fastpath_socks. */
#include "maps.h"

/* The same-node fast path needs every byte an app socket sends counted from the first
 * one, so the socket joins fastpath_socks (where fastpath.c sees its sends) as it is
 * established, before ztunnel has decided anything about it. */
static __always_inline void fastpath_track(struct bpf_sock_ops *skops, __u64 cookie)
{
    __u64 zero = 0; /* whole words on the stack (Linux 6.1's verifier, see maps.h) */
    __u32 *enabled = fastpath_config.lookup((int *)&zero);
    if (!enabled || !*enabled)
        return;
    union fastpath_key_words key;
    fastpath_key_build(&key, bpf_get_netns_cookie(skops), skops->local_ip4, skops->remote_ip4,
                       skops->local_port, bpf_ntohl(skops->remote_port));
    struct fastpath_bytes zeros = {.cookie = cookie};
    fastpath_bytes.update(&key.key, &zeros);
    struct fastpath_flow flow = {};
    fastpath_read.update(&cookie, &flow);
    fastpath_socks.sock_hash_update(skops, &key.key, BPF_NOEXIST);
}

int ambimesh_sockops(struct bpf_sock_ops *skops)
{
    __u64 cookie = bpf_get_socket_cookie(skops);

    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        struct orig_dst *found = orig_dst_by_cookie.lookup(&cookie);
        if (!found)
            return 1;
        union orig_dst_words dst = {.dst = *found};
        union peer_key_words key; /* local_port is host order */
        peer_key_build(&key, bpf_get_netns_cookie(skops), skops->local_ip4,
                       bpf_htons((__u16)skops->local_port));
        orig_dst_by_peer.update(&key.key, &dst.dst);
        bpf_sock_ops_cb_flags_set(skops,
                                  skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        count(COUNTER_OUTBOUND_ESTABLISHED);
        fastpath_track(skops, cookie);
    } else if (skops->op == BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB &&
               skops->remote_ip4 == bpf_htonl(AMBIMESH_FASTPATH_SOURCE)) {
        fastpath_track(skops, cookie); /* the app's end of a fast-path delivery */
    } else if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE) {
        orig_dst_by_cookie.delete(&cookie);
    }
    return 1;
}
