/* sk_msg on fastpath_socks: the same-node fast path. Every send of an app socket in the
 * map runs this. Until ztunnel pairs the socket (fastpath_pairs) its bytes take the
 * socket's own TCP connection to ztunnel, which relays them in user space; once paired,
 * and as soon as ztunnel has relayed every byte it passed (so nothing overtakes bytes
 * still on the way), its bytes go straight into the egress of ztunnel's socket to the
 * other app: the pair's TCP connection inside the other pod. Sends of ztunnel's own
 * sockets (no fastpath_bytes entry) pass. FIN and close always take the TCP connections,
 * so ztunnel sees both and propagates them; a redirect whose target is gone passes. */
#include "maps.h"

int ambimesh_fastpath(struct sk_msg_md *msg)
{
    union fastpath_key_words key;
    fastpath_key_build(&key, bpf_get_netns_cookie(msg), msg->local_ip4, msg->remote_ip4,
                       msg->local_port, bpf_ntohl(msg->remote_port));
    struct fastpath_bytes *sent = fastpath_bytes.lookup(&key.key);
    if (!sent)
        return SK_PASS;
    __u64 size = msg->size;
    struct fastpath_pair *pair = fastpath_pairs.lookup(&key.key);
    if (pair && pair->relayed == sent->passed) {
        struct fastpath_key target = pair->target;
        if (fastpath_socks.msg_redirect_hash(msg, &target, 0) == SK_PASS) {
            /* Sends of one socket run one at a time (socket lock): no atomics needed. */
            sent->redirected += size;
            return SK_PASS;
        }
    }
    sent->passed += size;
    return SK_PASS;
}
