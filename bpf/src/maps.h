/* Shared by every ambimesh program. The loader compiles all programs as one translation
 * unit, so each map below exists once and every program sees the same one.
 *
 * bpf/maps.py mirrors the structs and the counter enum; a test compares them with the
 * layouts bcc derives from this file, so change both together.
 */
#ifndef AMBIMESH_MAPS_H
#define AMBIMESH_MAPS_H

#include <uapi/linux/bpf.h>

/* The loader passes the real ports as -D flags; these are the documented defaults. */
#ifndef AMBIMESH_OUTBOUND_PORT
#define AMBIMESH_OUTBOUND_PORT 15001
#endif
#ifndef AMBIMESH_INBOUND_PORT
#define AMBIMESH_INBOUND_PORT 15006
#endif
#ifndef AMBIMESH_HBONE_PORT
#define AMBIMESH_HBONE_PORT 15008
#endif

/* Userspace constants, spelled out because bcc does not pull in libc headers. */
#define AMBIMESH_AF_INET 2
#define AMBIMESH_SOCK_STREAM 1
#define AMBIMESH_IPPROTO_TCP 6
#define AMBIMESH_SOL_IP 0
#define AMBIMESH_SO_ORIGINAL_DST 80
#define AMBIMESH_LOCALHOST 0x7f000001
/* ztunnel delivers same-node fast-path connections from 127.0.0.7 (HBONE ones from
 * 127.0.0.6), so sockops can tell the app sockets that take part apart. */
#define AMBIMESH_FASTPATH_SOURCE 0x7f000007

/* A connection's original destination; both fields in network byte order. */
struct orig_dst {
    __u32 ip4;
    __u16 port;
    __u16 pad;
};

/* The client end of a redirected connection, as the proxy's accepted socket sees its
 * peer. Every pod dials the same 127.0.0.1:15001 inside its own netns, so the address
 * and port alone repeat across pods; the netns cookie makes the key unique. */
struct peer_key {
    __u64 netns_cookie;
    __u32 ip4;  /* network byte order */
    __u16 port; /* network byte order */
    __u16 pad;
};

/* Linux 6.1's verifier refuses, unless the loader has CAP_PERFMON, a store narrower than 8
 * bytes into a stack slot whose first bytes hold a spilled register (a pointer, or a
 * bounded scalar such as a 32-bit field clang stored there). clang fills a struct on the
 * stack field by field and packs small locals into one slot, so every map key and value
 * built on the stack is written in whole 8-byte words: structs through the unions below,
 * a scalar key in the low bytes of a __u64 (hence little-endian only).
 * tests/integration/test_bpf_bytecode.py scans the compiled programs for such stores. */
#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "ambimesh's eBPF programs lay map keys out for little-endian hosts"
#endif

union orig_dst_words {
    struct orig_dst dst;
    __u64 word;
};

union peer_key_words {
    struct peer_key key;
    __u64 word[2];
};

/* ip4 and port in network byte order, as in struct peer_key. */
static __always_inline void peer_key_build(union peer_key_words *k, __u64 netns_cookie,
                                           __u32 ip4, __u16 port)
{
    k->word[0] = netns_cookie;
    k->word[1] = (__u64)ip4 | ((__u64)port << 32);
}

enum ambimesh_counter {
    COUNTER_OUTBOUND_REDIRECTED = 0,
    COUNTER_OUTBOUND_ESTABLISHED = 1,
    COUNTER_ORIGINAL_DST_ANSWERED = 2,
    COUNTER_INBOUND_STEERED = 3,
    COUNTER_INBOUND_DROPPED = 4,
    COUNTER_MAX = 5,
};

/* With a pin dir the loader pins every map at <pin dir>/maps/<name>, or puts the map
 * already pinned there in its place before any program is loaded, so every agent
 * generation on a node and the programs it left attached share one set of maps. Not bcc's
 * BPF_TABLE_PINNED: bcc reopens a pinned map by id, which Linux 6.1 allows only with
 * CAP_SYS_ADMIN (bpf/loader.py). */

/* connect4/6 -> sockops, getpeername4/6: the IPv4 destination the pod's socket asked for. */
BPF_TABLE("lru_hash", __u64, struct orig_dst, orig_dst_by_cookie, 65536);
/* sockops -> getsockopt: the same destination, found from the proxy's accepted socket. */
BPF_TABLE("lru_hash", struct peer_key, struct orig_dst, orig_dst_by_peer, 65536);
/* Enrolled pod IPv4 addresses (network byte order); the value is always 1. */
BPF_TABLE("hash", __u32, __u8, enrolled_pods, 4096);
/* Inbound destination ports (host byte order) that are never captured. */
BPF_TABLE("hash", __u16, __u8, excluded_ports, 1024);
/* ztunnel's inbound (15006) listener in each pod netns, keyed by pod IPv4. */
BPF_TABLE("sockhash", __u32, __u64, inbound_listeners, 4096);
BPF_TABLE("percpu_array", int, __u64, counters, COUNTER_MAX);

/* Same-node fast path (fastpath.c). A TCP socket as it sees itself; ports in host order. */
struct fastpath_key {
    __u64 netns_cookie;
    __u32 local_ip4;  /* network byte order */
    __u32 remote_ip4; /* network byte order */
    __u32 local_port;
    __u32 remote_port;
};

/* What an app socket sent: through its own TCP connection to ztunnel (passed), or by the
 * kernel (redirected), of which ``to_tcp`` into the egress of ztunnel's socket towards the
 * other app, the rest straight into the other app's receive queue. Created by sockops with
 * ``cookie`` (the socket's, the key of its fastpath_read entry); the counters and
 * ``ingress`` (the last redirect went to the receive queue) are written only by
 * fastpath.c, under the socket's lock. */
struct fastpath_bytes {
    __u64 passed;
    __u64 redirected;
    __u64 to_tcp;
    __u64 cookie;
    __u64 ingress;
};

/* Written only by ztunnel: where an app socket's bytes go once ztunnel has relayed all it
 * passed (``relayed`` is that count, so nothing overtakes bytes still in user space):
 * ``peer``, the other app's socket (its receive queue), or ``target``, ztunnel's socket
 * towards it (that TCP connection's egress). */
struct fastpath_pair {
    struct fastpath_key target;
    __u64 relayed;
    struct fastpath_key peer;
};

union fastpath_key_words {
    struct fastpath_key key;
    __u64 word[3];
};

/* The fields of struct fastpath_key, in its byte orders. */
static __always_inline void fastpath_key_build(union fastpath_key_words *k, __u64 netns_cookie,
                                               __u32 local_ip4, __u32 remote_ip4,
                                               __u32 local_port, __u32 remote_port)
{
    k->word[0] = netns_cookie;
    k->word[1] = (__u64)local_ip4 | ((__u64)remote_ip4 << 32);
    k->word[2] = (__u64)local_port | ((__u64)remote_port << 32);
}

/* App sockets (sockops) and ztunnel's own ends (ztunnel) of fast-path connections. */
BPF_SOCKHASH(fastpath_socks, struct fastpath_key, 65536);
BPF_TABLE("lru_hash", struct fastpath_key, struct fastpath_bytes, fastpath_bytes, 65536);
BPF_TABLE("lru_hash", struct fastpath_key, struct fastpath_pair, fastpath_pairs, 65536);
/* [0] != 0: ztunnel runs with the fast path on, so sockops tracks app sockets for it.
 * [1]: the token of the agent whose fastpath.c counts fastpath_read (0: none does). */
BPF_TABLE("array", int, __u32, fastpath_config, 2);
/* Per tracked app socket, by socket cookie (fastpath.c's tracepoint programs and sk_msg):
 * ``read``: bytes the app read (what the other side sent minus this still waits for it);
 * ``excess_passed``/``excess_kernel``: bytes the sk_msg program counted in ``passed`` /
 * ``redirected`` that the send did not take after all (a send cut short), so that the
 * counts stay exact; ``call``, ``thread``, ``last``, ``token``: the current send call's
 * count, its thread, the way its last bytes took and the counting agent's token when it
 * began; ``tainted``: two threads' sends overlapped, or the counting agent changed during
 * a call, so the corrections cannot be trusted and the receive queue is not used any
 * more. */
struct fastpath_flow {
    __u64 read;
    __u64 excess_passed;
    __u64 excess_kernel;
    __u64 call;
    __u64 thread;
    __u64 last;
    __u64 token;
    __u64 tainted;
};
BPF_TABLE("lru_hash", __u64, struct fastpath_flow, fastpath_read, 65536);

static __always_inline void count(__u32 which)
{
    __u64 key = which; /* a whole word (see above); the map reads its low 4 bytes */
    __u64 *value = counters.lookup((int *)&key);
    if (value)
        *value += 1;
}

/* 127.0.0.0/8 and 0.0.0.0 (which connect() treats as this host). */
static __always_inline int is_local(__u32 ip4_be)
{
    __u32 ip4 = bpf_ntohl(ip4_be);
    return ip4 == 0 || (ip4 >> 24) == 127;
}

/* The first three words (network order) of ::ffff:a.b.c.d, how a dual-stack AF_INET6
 * socket names an IPv4 address. */
static __always_inline int is_v4_mapped(__u32 w0, __u32 w1, __u32 w2)
{
    return w0 == 0 && w1 == 0 && w2 == bpf_htonl(0x0000ffff);
}

#endif /* AMBIMESH_MAPS_H */
