/* sk_msg on fastpath_socks: the same-node fast path. Every send of an app socket in the
 * map runs this. Until ztunnel pairs the socket (fastpath_pairs) its bytes take the
 * socket's own TCP connection to ztunnel, which relays them in user space; once paired,
 * and as soon as ztunnel has relayed every byte it passed (so nothing overtakes bytes
 * still on the way), the kernel carries them:
 *
 * - straight into the other app's receive queue (its psock's ingress, BPF_F_INGRESS)
 *   while everything sent to it before has been read or waits in that same queue, and
 *   that queue stays within FASTPATH_QUEUE_MAX: the app reads the queue before its TCP
 *   data, so this is in order only with no TCP data unread, and the kernel charges the
 *   queue to no socket buffer, so this program bounds it;
 * - otherwise into the egress of ztunnel's socket towards the other app (that TCP
 *   connection inside the other pod), whose buffers hold the sender back like any TCP
 *   connection's, until the app has read everything again.
 *
 * What the other app read comes from ambimesh_fastpath_read below (fastpath_read).
 * Sends of ztunnel's own sockets (no fastpath_bytes entry) pass. FIN and close always take the TCP
 * connections, so ztunnel sees both and propagates them; a redirect whose target is gone
 * passes. */
#include "maps.h"

/* The most a fast-path sender may have waiting in the other app's receive queue. */
#define FASTPATH_QUEUE_MAX (4u << 20)
#define AMBIMESH_MSG_PEEK 2

/* Whether ``size`` more bytes may go into the receive queue of ``pair``'s peer. */
static __always_inline int fastpath_ingress_ok(struct fastpath_bytes *sent,
                                               struct fastpath_pair *pair, __u64 size)
{
    struct fastpath_key peer = pair->peer;
    __u64 one = 1;
    __u32 *token = fastpath_config.lookup((int *)&one);
    if (!token || !*token)
        return 0; /* no agent counts reads (no tracepoint): TCP only */
    struct fastpath_bytes *other = fastpath_bytes.lookup(&peer);
    if (!other)
        return 0;
    __u64 cookie = other->cookie;
    __u64 *read = fastpath_read.lookup(&cookie);
    if (!read)
        return 0;
    /* Everything sent to the peer's socket: ztunnel's relay and this program's. */
    __u64 sent_to_peer = pair->relayed + sent->redirected;
    __u64 was_read = *read;
    if (was_read > sent_to_peer)
        return 0; /* not a count this program can trust */
    __u64 unread = sent_to_peer - was_read;
    if (unread && !sent->ingress)
        return 0; /* TCP data may be unread: the queue would overtake it */
    return unread + size <= FASTPATH_QUEUE_MAX;
}

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
        /* Sends of one socket run one at a time (socket lock): no atomics needed. The
         * TCP connection first: while ztunnel's socket is there (it leaves the sockhash
         * as ztunnel closes it), so is the connection, and the receive queue may be
         * used; a second redirect replaces the first. */
        struct fastpath_key target = pair->target;
        if (fastpath_socks.msg_redirect_hash(msg, &target, 0) == SK_PASS) {
            int queue = fastpath_ingress_ok(sent, pair, size);
            sent->redirected += size;
            struct fastpath_key peer = pair->peer;
            if (queue &&
                fastpath_socks.msg_redirect_hash(msg, &peer, BPF_F_INGRESS) == SK_PASS) {
                sent->ingress = 1;
            } else {
                sent->to_tcp += size;
                sent->ingress = 0;
            }
            return SK_PASS;
        }
    }
    sent->passed += size;
    return SK_PASS;
}

/* The agent's token (-D): only one agent's program counts reads (see fastpath_config). */
#ifndef AMBIMESH_READER_TOKEN
#define AMBIMESH_READER_TOKEN 1
#endif

#include <net/sock.h>

/* The sock_recv_length tracepoint (Linux >= 6.4; the agent attaches it where there is
 * one): every recvmsg's result. Counts what a tracked app socket read, from either
 * queue. */
int ambimesh_fastpath_read(struct bpf_raw_tracepoint_args *ctx)
{
    __u64 one = 1; /* whole words on the stack (Linux 6.1's verifier, see maps.h) */
    __u32 *token = fastpath_config.lookup((int *)&one);
    if (!token || *token != AMBIMESH_READER_TOKEN)
        return 0;
    int ret = (int)ctx->args[1];
    int flags = (int)ctx->args[2];
    if (ret <= 0 || (flags & AMBIMESH_MSG_PEEK))
        return 0;
    struct sock *sk = (struct sock *)ctx->args[0];
    __u64 cookie = 0;
    bpf_probe_read_kernel(&cookie, sizeof(cookie), &sk->sk_cookie);
    __u64 *read = fastpath_read.lookup(&cookie);
    if (read)
        __sync_fetch_and_add(read, (__u64)ret);
    return 0;
}
