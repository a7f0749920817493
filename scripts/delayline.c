/*
 * delayline: a userspace learning switch that delays every frame by a fixed time.
 *
 * What it is for: the network lab (scripts/netlab.py) runs it inside the "switch" network namespace, one port per
 * switch-side veth, so that a round trip between two lab hosts costs twice the one-way delay given here. The
 * kernel on the lab machines has no netem; this replaces it for latency. Bandwidth caps stay with tc (tbf on the
 * veths): frames leave through the destination port's packet socket, i.e. through that veth's qdisc.
 * What it is not for: loss, jitter, reordering, VLANs, or anything but a handful of ports on one lab machine.
 *
 * Usage:
 *   delayline DELAY_US IFNAME...   forward between the ports, each frame after DELAY_US microseconds;
 *                                  prints "ready" on stdout once every port is open, statistics on SIGTERM/SIGINT
 *   delayline --no-offload IFNAME...  only turn the offloads of these interfaces off (run in the host namespaces)
 *
 * Contract:
 * - Frames are queued with their due time in one FIFO (the delay is the same for all, so FIFO order is due order)
 *   and sent when due; the loop waits in ppoll() with the time to the next due frame, never sleeps per frame.
 * - Source MACs are learned on receipt; a frame to a known unicast MAC leaves on that port only, anything else is
 *   flooded to all other ports. Frames the socket sees leaving (PACKET_OUTGOING) are ignored.
 * - Offloads (TSO/GSO/GRO/SG/checksum) are switched off on every port, since a packet socket on a veth would
 *   otherwise see super-frames larger than the MTU that cannot be sent again.
 * - A full queue, a full send buffer or a port that is down drops the frame (counted), like a real switch would.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/ethtool.h>
#include <linux/if_packet.h>
#include <linux/sockios.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define MAX_PORTS 64
#define MAX_MACS 1024
#define QUEUE_SLOTS 32768 /* power of two; 32768 full frames in flight cover 15 Gbit/s at a 25 ms delay */
#define FRAME_MAX 2048
#define SOCKET_BUF (32 * 1024 * 1024)

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif

struct port {
    int fd;
    int ifindex;
    const char *name;
};

struct slot {
    uint64_t due_ns;
    uint16_t len;
    uint8_t in_port;
    unsigned char data[FRAME_MAX];
};

struct mac_entry {
    unsigned char mac[6];
    uint8_t port;
    uint8_t used;
};

static struct port ports[MAX_PORTS];
static int n_ports;
static struct slot *queue;
static uint32_t q_head, q_tail; /* head: next to send; tail: next free; count = tail - head */
static struct mac_entry macs[MAX_MACS];
static uint32_t next_mac_victim;
static volatile sig_atomic_t stop;
static uint64_t st_received, st_sent, st_queue_drops, st_send_drops, st_flooded;

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void on_signal(int sig) {
    (void)sig;
    stop = 1;
}

/* Set one ethtool flag; a driver that lacks the feature (EOPNOTSUPP) is fine, any other error is reported. */
static int ethtool_set(int fd, const char *ifname, uint32_t cmd, uint32_t value) {
    struct ethtool_value ev = {.cmd = cmd, .data = value};
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", ifname);
    ifr.ifr_data = (char *)&ev;
    if (ioctl(fd, SIOCETHTOOL, &ifr) < 0 && errno != EOPNOTSUPP) {
        fprintf(stderr, "delayline: ethtool 0x%x on %s: %s\n", cmd, ifname, strerror(errno));
        return -1;
    }
    return 0;
}

static int offloads_off(const char *ifname) {
    static const uint32_t cmds[] = {ETHTOOL_STSO, ETHTOOL_SGSO, ETHTOOL_SGRO, ETHTOOL_SSG,
                                    ETHTOOL_STXCSUM, ETHTOOL_SRXCSUM};
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int rc = 0;
    if (fd < 0) {
        perror("delayline: socket");
        return -1;
    }
    for (size_t i = 0; i < sizeof(cmds) / sizeof(cmds[0]); i++)
        rc |= ethtool_set(fd, ifname, cmds[i], 0);
    close(fd);
    return rc;
}

static int open_port(struct port *p, const char *ifname) {
    int one = 1, buf = SOCKET_BUF;
    struct sockaddr_ll sll;
    p->name = ifname;
    p->ifindex = (int)if_nametoindex(ifname);
    if (p->ifindex == 0) {
        fprintf(stderr, "delayline: no interface %s\n", ifname);
        return -1;
    }
    if (offloads_off(ifname) < 0)
        return -1;
    p->fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK, htons(ETH_P_ALL));
    if (p->fd < 0) {
        perror("delayline: socket(AF_PACKET)");
        return -1;
    }
    setsockopt(p->fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one)); /* best effort; pkttype checked too */
    if (setsockopt(p->fd, SOL_SOCKET, SO_RCVBUFFORCE, &buf, sizeof(buf)) < 0)
        setsockopt(p->fd, SOL_SOCKET, SO_RCVBUF, &buf, sizeof(buf));
    if (setsockopt(p->fd, SOL_SOCKET, SO_SNDBUFFORCE, &buf, sizeof(buf)) < 0)
        setsockopt(p->fd, SOL_SOCKET, SO_SNDBUF, &buf, sizeof(buf));
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_protocol = htons(ETH_P_ALL);
    sll.sll_ifindex = p->ifindex;
    if (bind(p->fd, (struct sockaddr *)&sll, sizeof(sll)) < 0) {
        fprintf(stderr, "delayline: bind %s: %s\n", ifname, strerror(errno));
        return -1;
    }
    return 0;
}

static int lookup_mac(const unsigned char *mac) {
    for (int i = 0; i < MAX_MACS && macs[i].used; i++)
        if (memcmp(macs[i].mac, mac, 6) == 0)
            return macs[i].port;
    return -1;
}

static void learn_mac(const unsigned char *mac, int port) {
    int i;
    if (mac[0] & 1) /* a multicast source is bogus; never learn it */
        return;
    for (i = 0; i < MAX_MACS && macs[i].used; i++) {
        if (memcmp(macs[i].mac, mac, 6) == 0) {
            macs[i].port = (uint8_t)port; /* a host that moved ports */
            return;
        }
    }
    if (i == MAX_MACS) /* table full: overwrite round-robin */
        i = (int)(next_mac_victim++ % MAX_MACS);
    memcpy(macs[i].mac, mac, 6);
    macs[i].port = (uint8_t)port;
    macs[i].used = 1;
}

static void send_on(int port, const struct slot *s) {
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ports[port].ifindex;
    sll.sll_halen = 6;
    memcpy(sll.sll_addr, s->data, 6);
    if (sendto(ports[port].fd, s->data, s->len, MSG_DONTWAIT, (struct sockaddr *)&sll, sizeof(sll)) < 0)
        st_send_drops++;
    else
        st_sent++;
}

static void forward(const struct slot *s) {
    int dst = (s->data[0] & 1) ? -1 : lookup_mac(s->data);
    if (dst == s->in_port)
        return; /* both ends on one port: a real switch filters it too */
    if (dst >= 0) {
        send_on(dst, s);
        return;
    }
    st_flooded++;
    for (int p = 0; p < n_ports; p++)
        if (p != s->in_port)
            send_on(p, s);
}

/* Drain one port's socket into the queue, stamping each frame with its due time. */
static void receive_port(int port, uint64_t delay_ns) {
    for (;;) {
        struct sockaddr_ll from;
        socklen_t fromlen = sizeof(from);
        struct slot *s;
        ssize_t n;
        if (q_tail - q_head >= QUEUE_SLOTS) {
            unsigned char scratch[FRAME_MAX];
            n = recv(ports[port].fd, scratch, sizeof(scratch), MSG_DONTWAIT);
            if (n < 0)
                return;
            st_queue_drops++;
            continue;
        }
        s = &queue[q_tail & (QUEUE_SLOTS - 1)];
        n = recvfrom(ports[port].fd, s->data, FRAME_MAX, MSG_DONTWAIT | MSG_TRUNC, (struct sockaddr *)&from,
                     &fromlen);
        if (n < 0)
            return; /* EAGAIN, or ENETDOWN reported once after the port went down */
        if (from.sll_pkttype == PACKET_OUTGOING || n < 14)
            continue;
        if (n > FRAME_MAX) { /* offloads still on somewhere: a super-frame we cannot resend */
            st_queue_drops++;
            continue;
        }
        st_received++;
        s->len = (uint16_t)n;
        s->in_port = (uint8_t)port;
        s->due_ns = now_ns() + delay_ns;
        learn_mac(s->data + 6, port);
        q_tail++;
    }
}

static void send_due(uint64_t now) {
    while (q_head != q_tail && queue[q_head & (QUEUE_SLOTS - 1)].due_ns <= now) {
        forward(&queue[q_head & (QUEUE_SLOTS - 1)]);
        q_head++;
    }
}

static int run(uint64_t delay_ns) {
    struct pollfd pfds[MAX_PORTS];
    for (int p = 0; p < n_ports; p++)
        pfds[p] = (struct pollfd){.fd = ports[p].fd, .events = POLLIN};
    printf("ready\n");
    fflush(stdout);
    while (!stop) {
        struct timespec ts, *timeout = NULL;
        uint64_t now = now_ns();
        send_due(now);
        if (q_head != q_tail) {
            uint64_t wait = queue[q_head & (QUEUE_SLOTS - 1)].due_ns - now_ns();
            if ((int64_t)wait < 0)
                wait = 0;
            ts.tv_sec = (time_t)(wait / 1000000000ull);
            ts.tv_nsec = (long)(wait % 1000000000ull);
            timeout = &ts;
        }
        if (ppoll(pfds, (nfds_t)n_ports, timeout, NULL) < 0) {
            if (errno == EINTR)
                continue;
            perror("delayline: ppoll");
            return 1;
        }
        for (int p = 0; p < n_ports; p++)
            if (pfds[p].revents)
                receive_port(p, delay_ns);
    }
    fprintf(stderr, "delayline: received %llu sent %llu flooded %llu queue_drops %llu send_drops %llu\n",
            (unsigned long long)st_received, (unsigned long long)st_sent, (unsigned long long)st_flooded,
            (unsigned long long)st_queue_drops, (unsigned long long)st_send_drops);
    return 0;
}

int main(int argc, char **argv) {
    struct sigaction sa;
    char *end;
    unsigned long long delay_us;
    if (argc >= 3 && strcmp(argv[1], "--no-offload") == 0) {
        int rc = 0;
        for (int i = 2; i < argc; i++)
            rc |= offloads_off(argv[i]);
        return rc ? 1 : 0;
    }
    if (argc < 3 || argc - 2 > MAX_PORTS) {
        fprintf(stderr, "usage: %s DELAY_US IFNAME... (2..%d ports) | --no-offload IFNAME...\n", argv[0], MAX_PORTS);
        return 2;
    }
    delay_us = strtoull(argv[1], &end, 10);
    if (*end != '\0') {
        fprintf(stderr, "delayline: bad delay %s\n", argv[1]);
        return 2;
    }
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    queue = calloc(QUEUE_SLOTS, sizeof(struct slot));
    if (queue == NULL) {
        perror("delayline: calloc");
        return 1;
    }
    for (int i = 2; i < argc; i++) {
        if (open_port(&ports[n_ports], argv[i]) < 0)
            return 1;
        n_ports++;
    }
    return run((uint64_t)delay_us * 1000ull);
}
