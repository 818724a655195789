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
 * connect4/connect6 redirected have a cookie entry. */
#include "maps.h"

int ambimesh_sockops(struct bpf_sock_ops *skops)
{
    __u64 cookie = bpf_get_socket_cookie(skops);

    if (skops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB) {
        struct orig_dst *found = orig_dst_by_cookie.lookup(&cookie);
        if (!found)
            return 1;
        struct orig_dst dst = *found;
        struct peer_key key = {};
        key.netns_cookie = bpf_get_netns_cookie(skops);
        key.ip4 = skops->local_ip4;
        key.port = bpf_htons((__u16)skops->local_port); /* local_port is host order */
        orig_dst_by_peer.update(&key, &dst);
        bpf_sock_ops_cb_flags_set(skops,
                                  skops->bpf_sock_ops_cb_flags | BPF_SOCK_OPS_STATE_CB_FLAG);
        count(COUNTER_OUTBOUND_ESTABLISHED);
    } else if (skops->op == BPF_SOCK_OPS_STATE_CB && skops->args[1] == BPF_TCP_CLOSE) {
        orig_dst_by_cookie.delete(&cookie);
    }
    return 1;
}
