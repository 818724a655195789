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

enum ambimesh_counter {
    COUNTER_OUTBOUND_REDIRECTED = 0,
    COUNTER_OUTBOUND_ESTABLISHED = 1,
    COUNTER_ORIGINAL_DST_ANSWERED = 2,
    COUNTER_INBOUND_STEERED = 3,
    COUNTER_INBOUND_DROPPED = 4,
    COUNTER_MAX = 5,
};

/* With -DAMBIMESH_MAP_PIN_DIR="<dir>" every map is pinned at <dir>/<name>, or reused if
 * already pinned there (bcc creates the pin), so every agent generation on a node and the
 * programs it left attached share one set of maps. bcc does not check that a reused map
 * matches the declaration: the loader does. */
#ifdef AMBIMESH_MAP_PIN_DIR
#define AMBIMESH_MAP(type, key, leaf, name, max_entries) \
    BPF_TABLE_PINNED(type, key, leaf, name, max_entries, AMBIMESH_MAP_PIN_DIR "/" #name)
#define AMBIMESH_SOCKHASH_SECTION(name) "maps/sockhash:" AMBIMESH_MAP_PIN_DIR "/" #name
#else
#define AMBIMESH_MAP(type, key, leaf, name, max_entries) \
    BPF_TABLE(type, key, leaf, name, max_entries)
#define AMBIMESH_SOCKHASH_SECTION(name) "maps/sockhash"
#endif

/* bcc's BPF_SOCKHASH (its helper methods: sock_hash_update, msg_redirect_hash), pinned
 * like AMBIMESH_MAP; the value is an fd (int) from user space. */
#define AMBIMESH_SOCKHASH(key_type, name, max) \
    struct name##_table_t { \
        key_type key; \
        int leaf; \
        int (*update)(key_type *, int *); \
        int (*delete)(key_type *); \
        int (*sock_hash_update)(void *, void *, u64); \
        int (*msg_redirect_hash)(void *, void *, u64); \
        int (*sk_redirect_hash)(void *, void *, u64); \
        u32 max_entries; \
    }; \
    __attribute__((section(AMBIMESH_SOCKHASH_SECTION(name)))) \
    struct name##_table_t name = {.max_entries = (max)}; \
    BPF_ANNOTATE_KV_PAIR(name, key_type, int)

/* connect4/6 -> sockops, getpeername4/6: the IPv4 destination the pod's socket asked for. */
AMBIMESH_MAP("lru_hash", __u64, struct orig_dst, orig_dst_by_cookie, 65536);
/* sockops -> getsockopt: the same destination, found from the proxy's accepted socket. */
AMBIMESH_MAP("lru_hash", struct peer_key, struct orig_dst, orig_dst_by_peer, 65536);
/* Enrolled pod IPv4 addresses (network byte order); the value is always 1. */
AMBIMESH_MAP("hash", __u32, __u8, enrolled_pods, 4096);
/* Inbound destination ports (host byte order) that are never captured. */
AMBIMESH_MAP("hash", __u16, __u8, excluded_ports, 1024);
/* ztunnel's inbound (15006) listener in each pod netns, keyed by pod IPv4. */
AMBIMESH_MAP("sockhash", __u32, __u64, inbound_listeners, 4096);
AMBIMESH_MAP("percpu_array", int, __u64, counters, COUNTER_MAX);

/* Same-node fast path (fastpath.c). A TCP socket as it sees itself; ports in host order. */
struct fastpath_key {
    __u64 netns_cookie;
    __u32 local_ip4;  /* network byte order */
    __u32 remote_ip4; /* network byte order */
    __u32 local_port;
    __u32 remote_port;
};

/* What an app socket sent: through its own TCP connection to ztunnel, or straight into the
 * socket ztunnel paired it with. Written only by fastpath.c (created by sockops). */
struct fastpath_bytes {
    __u64 passed;
    __u64 redirected;
};

/* Written only by ztunnel: where an app socket's bytes go once ztunnel has relayed all it
 * passed (``relayed`` is that count, so nothing overtakes bytes still in user space). */
struct fastpath_pair {
    struct fastpath_key target;
    __u64 relayed;
};

/* App sockets (sockops) and ztunnel's own ends (ztunnel) of fast-path connections. */
AMBIMESH_SOCKHASH(struct fastpath_key, fastpath_socks, 65536);
AMBIMESH_MAP("lru_hash", struct fastpath_key, struct fastpath_bytes, fastpath_bytes, 65536);
AMBIMESH_MAP("lru_hash", struct fastpath_key, struct fastpath_pair, fastpath_pairs, 65536);
/* [0] != 0: ztunnel runs with the fast path on, so sockops tracks app sockets for it. */
AMBIMESH_MAP("array", int, __u32, fastpath_config, 1);

static __always_inline void count(__u32 which)
{
    __u64 *value = counters.lookup(&which);
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
