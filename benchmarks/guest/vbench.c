/*
 * Guest side of the virtio benchmark (built static by benchmarks/virtio.py and put in
 * the guest's root image). Prints one line "BENCH <name> <value> <unit>" per measurement,
 * timed with the guest's CLOCK_MONOTONIC.
 *
 *   vbench seqread  DEV MIB        1 MiB O_DIRECT reads        -> MB/s
 *   vbench seqwrite DEV MIB        1 MiB O_DIRECT writes+fsync -> MB/s
 *   vbench randread DEV SECONDS    4 KiB O_DIRECT random reads -> IOPS (queue depth 1)
 *   vbench randread DEV SECONDS QD 4 KiB O_DIRECT random reads, QD in flight (Linux AIO) -> IOPS
 *   vbench tcpsend  HOST PORT MIB  one TCP stream to the host  -> MB/s (until the host closes)
 *   vbench tcprecv  HOST PORT      one TCP stream from the host -> MB/s (until the host closes)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
#include <linux/aio_abi.h>
#include <linux/fs.h>
#include <sys/syscall.h>

/* Linux native AIO through the raw system calls (no libaio in a static busybox guest). */
static long io_setup_(unsigned n, aio_context_t *ctx) { return syscall(SYS_io_setup, n, ctx); }
static long io_submit_(aio_context_t ctx, long n, struct iocb **cbs) { return syscall(SYS_io_submit, ctx, n, cbs); }
static long io_getevents_(aio_context_t ctx, long min, long max, struct io_event *ev) {
    return syscall(SYS_io_getevents, ctx, min, max, ev, NULL);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int open_dev(const char *path, int flags) {
    int fd = open(path, flags | O_DIRECT);
    if (fd < 0) { perror(path); exit(1); }
    return fd;
}

int main(int argc, char **argv) {
    if (argc < 4) { fprintf(stderr, "usage: see source\n"); return 2; }
    const char *what = argv[1];
    void *buf;
    if (posix_memalign(&buf, 4096, 1 << 20)) return 1;
    memset(buf, 0x5a, 1 << 20);
    if (!strcmp(what, "seqread") || !strcmp(what, "seqwrite")) {
        int write_mode = !strcmp(what, "seqwrite");
        long mib = atol(argv[3]);
        int fd = open_dev(argv[2], write_mode ? O_WRONLY : O_RDONLY);
        double start = now();
        for (long i = 0; i < mib; i++) {
            ssize_t n = write_mode ? pwrite(fd, buf, 1 << 20, i << 20) : pread(fd, buf, 1 << 20, i << 20);
            if (n != 1 << 20) { perror(what); return 1; }
        }
        if (write_mode) fsync(fd);
        printf("BENCH %s_1m %.1f MB/s\n", what, mib * 1.048576 / (now() - start));
    } else if (!strcmp(what, "randread") && argc >= 5 && atoi(argv[4]) > 1) {
        /* QD requests always in flight: each completion is replaced by a new random read. */
        int fd = open_dev(argv[2], O_RDONLY), depth = atoi(argv[4]);
        unsigned long long size = 0;
        ioctl(fd, BLKGETSIZE64, &size);
        long blocks = size / 4096;
        if (depth > 256) depth = 256;
        aio_context_t ctx = 0;
        if (io_setup_(depth, &ctx)) { perror("io_setup"); return 1; }
        struct iocb cbs[256], *ptrs[256];
        struct io_event events[256];
        unsigned int seed = 12345;
        for (int k = 0; k < depth; k++) {  /* buf is 1 MiB: 256 distinct 4 KiB slots */
            memset(&cbs[k], 0, sizeof cbs[k]);
            cbs[k].aio_fildes = fd;
            cbs[k].aio_lio_opcode = IOCB_CMD_PREAD;
            cbs[k].aio_buf = (unsigned long)((char *)buf + k * 4096);
            cbs[k].aio_nbytes = 4096;
            cbs[k].aio_offset = (long long)(rand_r(&seed) % blocks) * 4096;
            cbs[k].aio_data = k;
            ptrs[k] = &cbs[k];
        }
        double seconds = atof(argv[3]), start = now(), end = start + seconds;
        long ops = 0;
        if (io_submit_(ctx, depth, ptrs) != depth) { perror("io_submit"); return 1; }
        long in_flight = depth;
        while (in_flight) {
            long got = io_getevents_(ctx, 1, depth, events);
            if (got < 0) { perror("io_getevents"); return 1; }
            int again = now() < end, n = 0;
            for (long i = 0; i < got; i++) {
                if (events[i].res != 4096) { fprintf(stderr, "randread: result %lld\n", (long long)events[i].res); return 1; }
                ops++;
                struct iocb *cb = &cbs[events[i].data];
                if (again) {
                    cb->aio_offset = (long long)(rand_r(&seed) % blocks) * 4096;
                    ptrs[n++] = cb;
                }
            }
            in_flight -= got;
            if (n) {
                if (io_submit_(ctx, n, ptrs) != n) { perror("io_submit"); return 1; }
                in_flight += n;
            }
        }
        printf("BENCH randread_4k_qd%d %.0f IOPS %ld\n", depth, ops / (now() - start), ops);
    } else if (!strcmp(what, "randread")) {
        int fd = open_dev(argv[2], O_RDONLY);
        unsigned long long size = 0;
        ioctl(fd, BLKGETSIZE64, &size);
        long blocks = size / 4096;
        double seconds = atof(argv[3]), start = now(), end = start + seconds;
        long ops = 0;
        unsigned int seed = 12345;
        while (now() < end) {
            for (int k = 0; k < 64; k++, ops++) {
                long block = rand_r(&seed) % blocks;
                if (pread(fd, buf, 4096, block * 4096) != 4096) { perror("randread"); return 1; }
            }
        }
        printf("BENCH randread_4k %.0f IOPS %ld\n", ops / (now() - start), ops);
    } else if (!strcmp(what, "tcpsend") && argc >= 5) {
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &addr.sin_addr);
        long mib = atol(argv[4]);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 1; }
        double start = now();
        for (long i = 0; i < mib; i++) {
            for (size_t done = 0; done < (1 << 20);) {
                ssize_t n = send(s, (char *)buf + done, (1 << 20) - done, 0);
                if (n <= 0) { perror("send"); return 1; }
                done += n;
            }
        }
        shutdown(s, SHUT_WR);
        char c;
        while (read(s, &c, 1) > 0) {}  /* the host closes once it has every byte */
        printf("BENCH tcp_guest_to_host %.1f MB/s\n", mib * 1.048576 / (now() - start));
    } else if (!strcmp(what, "tcprecv")) {
        struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[3]))};
        inet_pton(AF_INET, argv[2], &addr.sin_addr);
        int s = socket(AF_INET, SOCK_STREAM, 0);
        if (connect(s, (struct sockaddr *)&addr, sizeof addr)) { perror("connect"); return 1; }
        double start = 0;
        long long total = 0;
        for (;;) {
            ssize_t n = read(s, buf, 1 << 20);
            if (n < 0) { perror("recv"); return 1; }
            if (n == 0) break;
            if (!total) start = now();  /* from the first byte, as the host side times it */
            total += n;
        }
        printf("BENCH tcp_host_to_guest %.1f MB/s %lld\n", total / 1e6 / (now() - start), total);
    } else {
        fprintf(stderr, "unknown benchmark %s\n", what);
        return 2;
    }
    return 0;
}
