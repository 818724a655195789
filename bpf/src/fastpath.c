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
#define FASTPATH_PASSED 0
#define FASTPATH_KERNEL 1

/* Whether ``size`` more bytes may go into the receive queue of ``pair``'s peer;
 * ``redirected`` is what this socket's sends really put into the kernel so far. */
static __always_inline int fastpath_ingress_ok(struct fastpath_bytes *sent,
                                               struct fastpath_pair *pair, __u64 redirected,
                                               __u64 size)
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
    struct fastpath_flow *flow = fastpath_read.lookup(&cookie);
    if (!flow)
        return 0;
    /* Everything sent to the peer's socket: ztunnel's relay and this program's. */
    __u64 sent_to_peer = pair->relayed + redirected;
    __u64 was_read = flow->read;
    if (was_read > sent_to_peer)
        return 0; /* not a count this program can trust */
    __u64 unread = sent_to_peer - was_read;
    if (unread && !sent->ingress)
        return 0; /* TCP data may be unread: the queue would overtake it */
    return unread + size <= FASTPATH_QUEUE_MAX;
}

/* Which way this send's last bytes took, for ambimesh_fastpath_sent. Looked up again, not
 * kept from the start of the program: Linux 6.1's verifier forgets that a map value
 * pointer tested for null once is one when the code tests it again after the paths
 * joined ("R8 invalid mem access 'scalar'"), which later kernels track. */
static __always_inline void fastpath_last_way(__u64 cookie, __u64 way)
{
    struct fastpath_flow *flow = fastpath_read.lookup(&cookie);
    if (flow)
        flow->last = way;
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
    /* This send call's bytes, so that its end (ambimesh_fastpath_sent) can take back what
     * the kernel then did not take. Another thread's call in between taints the counts. */
    __u64 one = 1;
    __u32 *counting = fastpath_config.lookup((int *)&one);
    __u64 token = counting ? *counting : 0;
    __u64 cookie = sent->cookie;
    struct fastpath_flow *own = fastpath_read.lookup(&cookie);
    __u64 thread = bpf_get_current_pid_tgid();
    __u64 excess_passed = 0, excess_kernel = 0;
    int exact = 0;
    if (own && token) {
        if (own->call && (own->thread != thread || own->token != token))
            own->tainted = 1;
        own->thread = thread;
        own->token = token;
        own->call += size;
        excess_passed = own->excess_passed;
        excess_kernel = own->excess_kernel;
        exact = !own->tainted;
    }
    struct fastpath_pair *pair = fastpath_pairs.lookup(&key.key);
    if (pair && pair->relayed == sent->passed - excess_passed) {
        /* Sends of one socket run one at a time (socket lock): no atomics needed. The
         * TCP connection first: while ztunnel's socket is there (it leaves the sockhash
         * as ztunnel closes it), so is the connection, and the receive queue may be
         * used; a second redirect replaces the first. */
        struct fastpath_key target = pair->target;
        if (fastpath_socks.msg_redirect_hash(msg, &target, 0) == SK_PASS) {
            int queue = exact &&
                        fastpath_ingress_ok(sent, pair, sent->redirected - excess_kernel, size);
            sent->redirected += size;
            fastpath_last_way(cookie, FASTPATH_KERNEL);
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
    fastpath_last_way(cookie, FASTPATH_PASSED);
    return SK_PASS;
}

/* The agent's token (-D): only one agent's program counts reads (see fastpath_config). */
#ifndef AMBIMESH_READER_TOKEN
#define AMBIMESH_READER_TOKEN 1
#endif

#include <net/sock.h>

/* The sock_recv_length tracepoint (Linux >= 6.4; the agent attaches both tracepoint
 * programs where there are both): every recvmsg's result. Counts what a tracked app socket read, from either
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
    struct fastpath_flow *flow = fastpath_read.lookup(&cookie);
    if (flow)
        __sync_fetch_and_add(&flow->read, (__u64)ret);
    return 0;
}

/* The sock_send_length tracepoint: the end of every send call, with what it took. What the
 * sk_msg program counted beyond that (the call was cut short: EAGAIN, a signal, an error)
 * came from the way its last bytes took, and is taken back from that count. */
int ambimesh_fastpath_sent(struct bpf_raw_tracepoint_args *ctx)
{
    __u64 one = 1;
    __u32 *token = fastpath_config.lookup((int *)&one);
    if (!token || *token != AMBIMESH_READER_TOKEN)
        return 0;
    struct sock *sk = (struct sock *)ctx->args[0];
    __u64 cookie = 0;
    bpf_probe_read_kernel(&cookie, sizeof(cookie), &sk->sk_cookie);
    struct fastpath_flow *flow = fastpath_read.lookup(&cookie);
    if (!flow || !flow->call)
        return 0;
    __u64 call = flow->call;
    flow->call = 0;
    if (flow->token != AMBIMESH_READER_TOKEN || flow->thread != bpf_get_current_pid_tgid())
        flow->tainted = 1; /* another agent's or another thread's call */
    if (flow->tainted)
        return 0;
    int ret = (int)ctx->args[1];
    __u64 taken = ret > 0 ? (__u64)ret : 0;
    if (taken > call) {
        flow->tainted = 1; /* bytes this program did not see: trust nothing */
        return 0;
    }
    if (flow->last == FASTPATH_KERNEL)
        flow->excess_kernel += call - taken;
    else
        flow->excess_passed += call - taken;
    return 0;
}
