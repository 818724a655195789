/* sk_lookup linked to an enrolled pod's netns: a new TCP connection for an enrolled pod
 * IP goes to ztunnel's inbound listener, which reads the original destination with
 * getsockname(). Not captured: HBONE and ztunnel's own ports, excluded ports, and
 * anything from or to loopback (ztunnel delivers to the app from 127.0.0.6).
 * No listener for an enrolled pod means ztunnel is gone: drop (fail closed), never
 * deliver plaintext to the app. */
#include "maps.h"

int ambimesh_sk_lookup(struct bpf_sk_lookup *ctx)
{
    if (ctx->family != AMBIMESH_AF_INET || ctx->protocol != AMBIMESH_IPPROTO_TCP)
        return SK_PASS;
    __u32 port = ctx->local_port; /* host order */
    if (port == AMBIMESH_HBONE_PORT || port == AMBIMESH_INBOUND_PORT ||
        port == AMBIMESH_OUTBOUND_PORT)
        return SK_PASS;
    if (is_local(ctx->remote_ip4) || is_local(ctx->local_ip4))
        return SK_PASS;

    /* Keys in the low bytes of whole words (Linux 6.1's verifier, see maps.h). */
    __u64 pod_ip = ctx->local_ip4;
    if (!enrolled_pods.lookup((__u32 *)&pod_ip))
        return SK_PASS;
    __u64 port_key = port;
    if (excluded_ports.lookup((__u16 *)&port_key))
        return SK_PASS;

    struct bpf_sock *listener = (struct bpf_sock *)inbound_listeners.lookup((__u32 *)&pod_ip);
    if (!listener) {
        count(COUNTER_INBOUND_DROPPED);
        return SK_DROP;
    }
    long err = bpf_sk_assign(ctx, listener, 0);
    bpf_sk_release(listener);
    if (err) {
        count(COUNTER_INBOUND_DROPPED);
        return SK_DROP;
    }
    count(COUNTER_INBOUND_STEERED);
    return SK_PASS;
}
