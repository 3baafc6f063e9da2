/*
 * livemig guest workload: dirties memory at a controlled rate and can prove,
 * on demand, that every page of its working set holds exactly what it last
 * wrote.  It is the guest-side witness of a live migration: if a migration
 * loses a dirty page (the destination got an older copy) or corrupts one, the
 * next "check" reports it.  Optionally it is also the witness for the VM's
 * block volume (disk mode: an append-only log of checksummed records whose
 * acknowledged part must survive) and for its network (network mode: a TCP
 * echo server, a UDP sequence sink and an outbound TCP client, all served by
 * the same single-threaded poll() loop as the console).
 *
 * Build: gcc -static -O2 -Wall -Wextra -o livemig-workload workload.c
 * Usage: livemig-workload [-w WSS_MIB] [-r RATE_MIB_S] [-d DEVICE [-D RECORDS_S]] [-n IP]
 *
 * Page layout (4 KiB pages, 512 64-bit words):
 *   word 0      generation of the last write
 *   word 1      page index XOR HEADER_MAGIC
 *   word 2..511 pattern(page, gen, word) = base(page, gen) + word * STEP
 * Any flipped word, or a whole page from an older generation, differs from the
 * pattern computed from the expected generation kept in a separate array.
 *
 * Disk log layout (-d; 4 KiB blocks, all integers little-endian):
 *   block 0     header: "LMDISKLG", u32 version (1), u32 record size (4096),
 *               u64 log id (random, chosen when the log is created),
 *               u64 first record block (1), zeros, u32 CRC32 of bytes 0..4091
 *   block s     record s (s = 1, 2, 3, ...): "LMRECORD", u64 log id, u64 seq,
 *               508 u64 payload words base(log id, seq) + i * STEP,
 *               u32 version (1), u32 CRC32 (zlib's) of bytes 0..4091
 *   The payload depends only on (log id, seq), so a checker needs no state
 *   beyond the header; livemig.guest.disklog reads the same format on the host.
 *
 * Console protocol (stdout, one line each, always starting with "LIVEMIG "):
 *   LIVEMIG READY wss_mib=<n> rate_mib_s=<n> pages=<n>
 *   LIVEMIG HB seq=<n> uptime_ms=<ms> dirtied_mib=<n> live_errors=<n>
 *           [disk_acked=<n> disk_state=ok|full|error] [net=<ip>]
 *   LIVEMIG CHECK <token> ok pages=<n> live_errors=<n>
 *   LIVEMIG CHECK <token> fail pages=<n> bad=<n> first_bad=<page>
 *           expected_gen=<g> found_gen=<g> live_errors=<n>      (one line)
 *   LIVEMIG RATE <mib_s>
 *   LIVEMIG LIVE_ERROR page=<n> expected_gen=<g> found_gen=<g>  (first 16 only)
 *   LIVEMIG CORRUPT <page> word=<w>                             (test hook)
 *   LIVEMIG ERR <reason>
 *  disk mode (before READY, then on demand):
 *   LIVEMIG DISK dev=<path> mode=format|resume log_id=<16 hex> records=<n>
 *           capacity=<n> diskrate=<n> tail=none|zero|end|<why>
 *   LIVEMIG DISK dev=<path> mode=unavailable error=<ENAME>
 *   LIVEMIG DISKRATE <records_s>
 *   LIVEMIG DISKCHECK <token> ok records=<n> acked=<n>
 *   LIVEMIG DISKCHECK <token> fail records=<n> acked=<n> first_bad=<seq> why=<word>
 *           why: header magic crc version logid seq payload torn lost io unavailable
 *   LIVEMIG DISKCORRUPT <seq> offset=<byte>                     (test hook)
 *   LIVEMIG DISKFULL records=<n> acked=<n>
 *   LIVEMIG DISK_ERROR op=write|flush seq=<n> error=<ENAME>
 *  network mode:
 *   LIVEMIG NET ip=<ip> tcp_echo=7 udp_sink=9          (before READY)
 *   LIVEMIG NET ip=<ip> error=<ENAME> what=<tcp|udp>  (a listener failed)
 *   LIVEMIG UDPSTATS <token> received=<n> lost=<n> duplicated=<n> reordered=<n> max_seq=<n>
 *   LIVEMIG UDPRESET
 *   LIVEMIG TCPCLIENT state=connecting peer=<ip>:<port> interval_ms=<n>
 *   LIVEMIG TCPCLIENT state=connected peer=<ip>:<port>
 *   LIVEMIG TCPCLIENT state=closed error=<word>   (refused reset eof pipe timeout mismatch ...)
 *   LIVEMIG TCPCLIENT state=stopped
 *   LIVEMIG TCPSTATS <token> connected=<0|1> sent=<n> received=<n> errors=<n> last_error=<word>
 * Commands (stdin, newline-terminated):
 *   check <token>      full verification of the working set
 *   rate <mib_s>       change the dirty rate (0 = idle)
 *   corrupt <page> [w] TEST HOOK: flip word w (default 256) of a page without
 *                      updating the expectation, so tests can prove that
 *                      "check" (w >= 2) or the live header check (w < 2) fails
 *   exit <code>        TEST HOOK: exit with that code (init then prints
 *                      "LIVEMIG EXIT <code>" and starts a shell)
 *   diskcheck <token>  flush, then read the whole log back from the device
 *   diskrate <n>       records per second (0 = pause the log)
 *   diskcorrupt <seq>  TEST HOOK: flip one byte of that record on the device
 *   udpstats <token>   counters of the UDP sequence sink; udpreset zeroes them
 *   tcpclient <ip> <port> <interval_ms> | tcpclient stop   (interval 0: echo back what the peer sends)
 *                      (re)start the outbound client: "ping <n>\n" every
 *                      interval, echoes must come back in order; a failed
 *                      connection is counted and closed, never retried
 *   tcpstats <token>   counters of the outbound client
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/fs.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <termios.h>
#include <time.h>
#include <unistd.h>

#define PAGE_SIZE 4096u
#define WORDS_PER_PAGE (PAGE_SIZE / sizeof(uint64_t))
#define PAGES_PER_MIB 256u
#define HEADER_MAGIC UINT64_C(0x4c4956454d494721) /* "LIVEMIG!" */
#define STEP UINT64_C(0x9e3779b97f4a7c15)
#define SLICE_NS 10000000LL      /* dirty the quota of one 10 ms slice, then sleep */
#define CHUNK_PAGES 64u          /* look at the clock and stdin at least this often */
#define MAX_DEBT_NS 100000000LL  /* never try to catch up more than 100 ms of work */
#define MAX_LIVE_ERROR_LINES 16
#define NEVER INT64_MAX

static uint8_t *memory;
static uint32_t *expected_gen;
static uint64_t n_pages;
static uint64_t cursor;           /* next page the dirtier visits (round-robin) */
static uint64_t dirtied_pages;    /* total pages rewritten since start */
static uint64_t live_errors;
static uint64_t rate_mib_s;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void sleep_ns(int64_t ns) {
    struct timespec ts = {ns / 1000000000LL, ns % 1000000000LL};
    nanosleep(&ts, NULL);
}

/* The virtio-serial command port (opened in main, see open_command_port): every line goes there
 * too, so the host reads answers even if the UART's transmit side wedged after a migration. */
static int cmd_port_fd = -1;
static uint64_t console_dropped; /* lines the serial console would not take within a second */

/* Write the line to the command port (one non-blocking try: nobody may be listening) and to the
 * serial console (whole line, but never blocking the workload for more than a second). */
static void emit(const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 1, fmt, ap);
    va_end(ap);
    if (n < 0)
        return;
    if ((size_t)n > sizeof buf - 2)
        n = (int)(sizeof buf - 2);
    buf[n++] = '\n';
    if (cmd_port_fd >= 0 && write(cmd_port_fd, buf, (size_t)n) < 0) {
        /* EAGAIN: no host connected or its buffer is full; the console still has the line */
    }
    const char *p = buf;
    int waits = 0;
    while (n > 0) {
        ssize_t w = write(STDOUT_FILENO, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                if (errno == EAGAIN) {
                    if (++waits > 10) { /* a wedged console must not stop the workload */
                        console_dropped++;
                        return;
                    }
                    struct pollfd pfd = {.fd = STDOUT_FILENO, .events = POLLOUT};
                    poll(&pfd, 1, 100);
                }
                continue;
            }
            return;
        }
        p += w;
        n -= (int)w;
    }
}

/* "EIO", "ENOSPC", ...: one word, so console lines stay machine-readable. */
static const char *errname(int err) {
    const char *name = strerrorname_np(err);
    return name != NULL ? name : "EUNKNOWN";
}

static inline uint64_t *page_words(uint64_t page) {
    return (uint64_t *)(memory + page * PAGE_SIZE);
}

static inline uint64_t pattern_base(uint64_t page, uint64_t gen) {
    uint64_t x = (page << 32) ^ gen ^ HEADER_MAGIC;
    x ^= x >> 31;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 29;
    return x;
}

static void write_page(uint64_t page, uint32_t gen) {
    uint64_t *w = page_words(page);
    uint64_t v = pattern_base(page, gen);
    w[0] = gen;
    w[1] = page ^ HEADER_MAGIC;
    for (unsigned i = 2; i < WORDS_PER_PAGE; i++)
        w[i] = v + i * STEP;
    expected_gen[page] = gen;
}

/* 1 if the page holds exactly the pattern of its expected generation. */
static int page_ok(uint64_t page) {
    const uint64_t *w = page_words(page);
    uint64_t gen = expected_gen[page];
    if (w[0] != gen || w[1] != (page ^ HEADER_MAGIC))
        return 0;
    uint64_t v = pattern_base(page, gen);
    uint64_t diff = 0;
    for (unsigned i = 2; i < WORDS_PER_PAGE; i++)
        diff |= w[i] ^ (v + i * STEP);
    return diff == 0;
}

/* Dirty one page: verify its header (cheap live check), then rewrite it all. */
static void dirty_page(uint64_t page) {
    const uint64_t *w = page_words(page);
    uint32_t gen = expected_gen[page];
    if (w[0] != gen || w[1] != (page ^ HEADER_MAGIC)) {
        live_errors++;
        if (live_errors <= MAX_LIVE_ERROR_LINES)
            emit("LIVEMIG LIVE_ERROR page=%" PRIu64 " expected_gen=%" PRIu32 " found_gen=%" PRIu64,
                 page, gen, w[0]);
    }
    gen++;
    if (gen == 0) /* generation 0 is never written, so zeroed memory never passes */
        gen = 1;
    write_page(page, gen);
    dirtied_pages++;
}

static void do_check(const char *token) {
    uint64_t bad = 0, first_bad = 0;
    uint64_t exp_gen = 0, found_gen = 0;
    for (uint64_t p = 0; p < n_pages; p++) {
        if (!page_ok(p)) {
            if (bad == 0) {
                first_bad = p;
                exp_gen = expected_gen[p];
                found_gen = page_words(p)[0];
            }
            bad++;
        }
    }
    if (bad == 0 && live_errors == 0) {
        emit("LIVEMIG CHECK %s ok pages=%" PRIu64 " live_errors=0", token, n_pages);
    } else if (bad == 0) {
        emit("LIVEMIG CHECK %s fail pages=%" PRIu64 " bad=0 first_bad=-1 expected_gen=0 found_gen=0 live_errors=%" PRIu64,
             token, n_pages, live_errors);
    } else {
        emit("LIVEMIG CHECK %s fail pages=%" PRIu64 " bad=%" PRIu64 " first_bad=%" PRIu64 " expected_gen=%" PRIu64
             " found_gen=%" PRIu64 " live_errors=%" PRIu64,
             token, n_pages, bad, first_bad, exp_gen, found_gen, live_errors);
    }
}

static int parse_u64(const char *s, uint64_t *out) {
    if (s == NULL || *s == '\0')
        return -1;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno != 0 || *end != '\0' || *s == '-')
        return -1;
    *out = v;
    return 0;
}

/* ------------------------------------------------------------------ disk log */

/* CRC-32 as in zlib (reflected 0xEDB88320), so the host can verify with zlib.crc32. */
static uint32_t crc_table[256];

static void crc32_init(void) {
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        crc_table[i] = c;
    }
}

static uint32_t crc32_buf(const uint8_t *p, size_t n) {
    uint32_t c = 0xFFFFFFFFu;
    while (n--)
        c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
    return c ^ 0xFFFFFFFFu;
}

static void put_le32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static void put_le64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (uint8_t)(v >> (8 * i));
}

static uint32_t get_le32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

static uint64_t get_le64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#define DISK_BLOCK 4096u
#define DISK_SECTOR 512u
#define DISK_VERSION 1u
#define DISK_BATCH 8u                    /* records per fdatasync: one flush acknowledges the batch */
#define DISK_FLUSH_NS 200000000LL        /* ...or after 200 ms, so slow rates still get acknowledged */
#define DISK_MAX_PER_TICK 16u            /* records per loop pass: the memory dirtier keeps its share */
#define DISK_IO_BLOCKS 64u               /* blocks per O_DIRECT read while scanning */
#define DISK_OPEN_WAIT_NS 5000000000LL   /* the device node may appear a little after init starts us */
#define DISK_MAX_RATE 100000u
#define DISK_MAX_LIVE_LINES 8
#define REC_PAYLOAD_OFF 24u
#define REC_PAYLOAD_WORDS 508u
#define REC_VERSION_OFF 4088u
#define REC_CRC_OFF 4092u

enum { DISK_OK, DISK_FULL, DISK_ERROR };
static const char *const disk_state_name[] = {"ok", "full", "error"};

/* Why a block is not the expected record (REC_OK: it is). The order is the order of the tests. */
enum { REC_OK, REC_ZERO, REC_TORN, REC_MAGIC, REC_CRC, REC_VERSION, REC_LOGID, REC_SEQ, REC_PAYLOAD, REC_END, REC_IO };
static const char *const rec_why[] = {"ok",  "zero",  "torn", "magic",   "crc", "version",
                                      "logid", "seq", "payload", "end", "io"};

static struct {
    int on;                /* disk mode requested (-d) */
    const char *dev;
    int fd;                /* buffered: the log is appended through the page cache, flushed per batch */
    int dfd;               /* O_DIRECT: every read of the check, the scan and the corrupt hook */
    int state;
    uint64_t log_id;
    uint64_t capacity;     /* records that fit after the header block */
    uint64_t next_seq;     /* next record to write; next_seq - 1 records written (maybe not flushed) */
    uint64_t last_acked;   /* every record up to this one was on the device when fdatasync returned */
    uint64_t rate;         /* records per second */
    unsigned pending;      /* written since the last flush */
    int64_t first_pending_ns;
    int64_t last_ns;
    double owed;
    uint8_t *rec;          /* one aligned block, for building records and the corrupt hook */
    uint8_t *io;           /* DISK_IO_BLOCKS aligned blocks for reads */
} disk = {.fd = -1, .dfd = -1, .rate = 40};

static uint64_t record_base(uint64_t log_id, uint64_t seq) {
    uint64_t x = log_id ^ (seq * STEP);
    x ^= x >> 30;
    x *= UINT64_C(0xbf58476d1ce4e5b9);
    x ^= x >> 27;
    x *= UINT64_C(0x94d049bb133111eb);
    x ^= x >> 31;
    return x;
}

static void build_record(uint8_t *b, uint64_t log_id, uint64_t seq) {
    memset(b, 0, DISK_BLOCK);
    memcpy(b, "LMRECORD", 8);
    put_le64(b + 8, log_id);
    put_le64(b + 16, seq);
    uint64_t base = record_base(log_id, seq);
    for (unsigned i = 0; i < REC_PAYLOAD_WORDS; i++)
        put_le64(b + REC_PAYLOAD_OFF + 8 * i, base + i * STEP);
    put_le32(b + REC_VERSION_OFF, DISK_VERSION);
    put_le32(b + REC_CRC_OFF, crc32_buf(b, REC_CRC_OFF));
}

static void build_header(uint8_t *b, uint64_t log_id) {
    memset(b, 0, DISK_BLOCK);
    memcpy(b, "LMDISKLG", 8);
    put_le32(b + 8, DISK_VERSION);
    put_le32(b + 12, DISK_BLOCK);
    put_le64(b + 16, log_id);
    put_le64(b + 24, 1);
    put_le32(b + REC_CRC_OFF, crc32_buf(b, REC_CRC_OFF));
}

static int all_zero(const uint8_t *p, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (p[i] != 0)
            return 0;
    return 1;
}

/* Is block b record `seq` of log `log_id`?  A valid record never has an all-zero 512-byte sector
 * (sector 0 holds the magic, the last one the version, the others consecutive payload words that
 * differ by STEP), so a record with a zero sector is one the device wrote only partly: "torn". */
static int classify_record(const uint8_t *b, uint64_t log_id, uint64_t seq) {
    if (all_zero(b, DISK_BLOCK))
        return REC_ZERO;
    for (unsigned s = 0; s < DISK_BLOCK; s += DISK_SECTOR)
        if (all_zero(b + s, DISK_SECTOR))
            return REC_TORN;
    if (memcmp(b, "LMRECORD", 8) != 0)
        return REC_MAGIC;
    if (get_le32(b + REC_CRC_OFF) != crc32_buf(b, REC_CRC_OFF))
        return REC_CRC;
    if (get_le32(b + REC_VERSION_OFF) != DISK_VERSION)
        return REC_VERSION;
    if (get_le64(b + 8) != log_id)
        return REC_LOGID;
    if (get_le64(b + 16) != seq)
        return REC_SEQ;
    uint64_t base = record_base(log_id, seq);
    for (unsigned i = 0; i < REC_PAYLOAD_WORDS; i++)
        if (get_le64(b + REC_PAYLOAD_OFF + 8 * i) != base + i * STEP)
            return REC_PAYLOAD;
    return REC_OK;
}

/* The log id of a valid header, or 0. */
static uint64_t header_log_id(const uint8_t *b) {
    if (memcmp(b, "LMDISKLG", 8) != 0 || get_le32(b + REC_CRC_OFF) != crc32_buf(b, REC_CRC_OFF))
        return 0;
    if (get_le32(b + 8) != DISK_VERSION || get_le32(b + 12) != DISK_BLOCK || get_le64(b + 24) != 1)
        return 0;
    return get_le64(b + 16);
}

/* Read blocks [block, block + count) through the O_DIRECT descriptor into disk.io.
 *
 * Why O_DIRECT and not posix_fadvise(DONTNEED) or BLKFLSBUF: a direct read is served by the device
 * on every call, by construction. DONTNEED is advisory and silently keeps pages that are dirty,
 * under writeback or mapped, so a check could compare the page cache with itself; BLKFLSBUF drops
 * the cache of the whole device for every opener and says nothing about pages re-read meanwhile.
 * (The kernel writes back dirty cached pages of the range before a direct read, which is harmless:
 * the check flushes first anyway.) Returns 0, or -1 with errno. */
static int disk_read(uint64_t block, unsigned count) {
    size_t want = (size_t)count * DISK_BLOCK, got = 0;
    while (got < want) {
        ssize_t n = pread(disk.dfd, disk.io + got, want - got, (off_t)(block * DISK_BLOCK + got));
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            errno = EIO; /* the device is shorter than it said */
            return -1;
        }
        got += (size_t)n;
    }
    return 0;
}

/* Longest run of valid records from seq 1: returns its last seq; *why says what ended it
 * (REC_ZERO: a never-written block, REC_END: the device is full, REC_IO, or the invalid block's status). */
static uint64_t disk_scan(int *why) {
    uint64_t seq = 1;
    while (seq <= disk.capacity) {
        uint64_t left = disk.capacity - seq + 1;
        unsigned count = left < DISK_IO_BLOCKS ? (unsigned)left : DISK_IO_BLOCKS;
        if (disk_read(seq, count) != 0) {
            *why = REC_IO;
            return seq - 1;
        }
        for (unsigned i = 0; i < count; i++, seq++) {
            int st = classify_record(disk.io + (size_t)i * DISK_BLOCK, disk.log_id, seq);
            if (st != REC_OK) {
                *why = st;
                return seq - 1;
            }
        }
    }
    *why = REC_END;
    return disk.capacity;
}

/* Stop writing for good: after a failed write or flush Linux may already have marked the pages
 * clean, so a later fdatasync could "succeed" without the data ever reaching the device. */
static void disk_fail(const char *op, uint64_t seq, int err) {
    disk.state = DISK_ERROR;
    emit("LIVEMIG DISK_ERROR op=%s seq=%" PRIu64 " error=%s", op, seq, errname(err));
}

/* fdatasync the log: only when it returns are the records written so far acknowledged.
 *
 * Why buffered pwrite + one fdatasync per batch and not O_DSYNC: O_DSYNC turns every record into
 * a write plus a device cache flush (FUA or a FLUSH request), so a batch of 8 costs 8 flushes; on
 * a volume served over NBD every flush is a round trip to the server and an fsync there. One
 * fdatasync per batch (block device: write back the dirty pages, then one FLUSH) costs one, and it
 * is an explicit acknowledgement point: records are acked exactly when the flush covering them
 * returned, like a database commit. Writes themselves only touch the page cache, so the
 * single-threaded loop (memory dirtier, console, network) blocks once per batch, not per record. */
static int disk_flush(void) {
    if (disk.pending == 0 || disk.state == DISK_ERROR)
        return disk.state == DISK_ERROR ? -1 : 0;
    if (fdatasync(disk.fd) != 0) {
        disk_fail("flush", disk.next_seq - 1, errno);
        return -1;
    }
    disk.last_acked = disk.next_seq - 1;
    disk.pending = 0;
    return 0;
}

static void disk_full(void) {
    if (disk.state != DISK_OK)
        return;
    if (disk_flush() != 0)
        return;
    disk.state = DISK_FULL;
    emit("LIVEMIG DISKFULL records=%" PRIu64 " acked=%" PRIu64, disk.next_seq - 1, disk.last_acked);
}

static void disk_unavailable(int err) {
    disk.state = DISK_ERROR;
    if (disk.fd >= 0)
        close(disk.fd);
    if (disk.dfd >= 0)
        close(disk.dfd);
    disk.fd = disk.dfd = -1;
    emit("LIVEMIG DISK dev=%s mode=unavailable error=%s", disk.dev, errname(err));
}

/* A fresh random log id; GRND_INSECURE never blocks early in boot (uniqueness is all we need). */
static uint64_t new_log_id(void) {
    uint64_t id = 0;
    while (id == 0) {
        if (getrandom(&id, sizeof id, GRND_INSECURE) != (ssize_t)sizeof id)
            id = (uint64_t)now_ns() ^ ((uint64_t)getpid() << 48) ^ STEP;
    }
    return id;
}

/* Open the device; continue an existing log (same header, after its last valid record) or
 * format a new one. Prints the DISK line either way. */
static void disk_open(void) {
    int64_t deadline = now_ns() + DISK_OPEN_WAIT_NS;
    while ((disk.fd = open(disk.dev, O_RDWR | O_CLOEXEC)) < 0 && errno == ENOENT && now_ns() < deadline)
        sleep_ns(50000000LL);
    if (disk.fd < 0) {
        disk_unavailable(errno);
        return;
    }
    disk.dfd = open(disk.dev, O_RDWR | O_DIRECT | O_CLOEXEC);
    if (disk.dfd < 0) {
        disk_unavailable(errno);
        return;
    }
    struct stat st;
    uint64_t size = 0;
    if (fstat(disk.fd, &st) != 0) {
        disk_unavailable(errno);
        return;
    }
    if (S_ISBLK(st.st_mode)) {
        if (ioctl(disk.fd, BLKGETSIZE64, &size) != 0) {
            disk_unavailable(errno);
            return;
        }
    } else if (S_ISREG(st.st_mode)) { /* a plain file works too: handy for tests on the host */
        size = (uint64_t)st.st_size;
    } else {
        disk_unavailable(ENOTBLK);
        return;
    }
    if (size / DISK_BLOCK < 2) {
        disk_unavailable(ENOSPC);
        return;
    }
    disk.capacity = size / DISK_BLOCK - 1;
    if (posix_memalign((void **)&disk.rec, DISK_BLOCK, DISK_BLOCK) != 0 ||
        posix_memalign((void **)&disk.io, DISK_BLOCK, (size_t)DISK_IO_BLOCKS * DISK_BLOCK) != 0) {
        disk_unavailable(ENOMEM);
        return;
    }
    if (disk_read(0, 1) != 0) {
        disk_unavailable(errno);
        return;
    }
    const char *mode;
    int tail = -1;
    disk.log_id = header_log_id(disk.io);
    if (disk.log_id != 0) {
        /* Our log (a restart, or the same VM after a migration): records after the last valid one
         * were never acknowledged in a previous life, so writing over them loses nothing. */
        mode = "resume";
        uint64_t last = disk_scan(&tail);
        if (tail == REC_IO) {
            disk_unavailable(errno);
            return;
        }
        if (fdatasync(disk.fd) != 0) {
            disk_unavailable(errno);
            return;
        }
        disk.next_seq = last + 1;
        disk.last_acked = last; /* read back from the device and flushed: durable */
    } else {
        mode = "format";
        disk.log_id = new_log_id();
        build_header(disk.rec, disk.log_id);
        ssize_t w = pwrite(disk.fd, disk.rec, DISK_BLOCK, 0);
        if (w != (ssize_t)DISK_BLOCK) {
            disk_unavailable(w < 0 ? errno : EIO);
            return;
        }
        if (fdatasync(disk.fd) != 0) {
            disk_unavailable(errno);
            return;
        }
        disk.next_seq = 1;
        disk.last_acked = 0;
    }
    disk.last_ns = now_ns();
    emit("LIVEMIG DISK dev=%s mode=%s log_id=%016" PRIx64 " records=%" PRIu64 " capacity=%" PRIu64
         " diskrate=%" PRIu64 " tail=%s",
         disk.dev, mode, disk.log_id, disk.next_seq - 1, disk.capacity, disk.rate, tail < 0 ? "none" : rec_why[tail]);
    if (disk.next_seq > disk.capacity)
        disk_full();
}

/* Append one record (page cache only; disk_flush makes it durable). 0, or -1 when stopped. */
static int disk_append(int64_t t) {
    if (disk.next_seq > disk.capacity) {
        disk_full();
        return -1;
    }
    build_record(disk.rec, disk.log_id, disk.next_seq);
    ssize_t w = pwrite(disk.fd, disk.rec, DISK_BLOCK, (off_t)(disk.next_seq * DISK_BLOCK));
    if (w != (ssize_t)DISK_BLOCK) {
        int err = w < 0 ? errno : EIO;
        if (err == ENOSPC) { /* smaller than it said: what is written is all there is */
            disk.capacity = disk.next_seq - 1;
            disk_full();
        } else {
            disk_fail("write", disk.next_seq, err);
        }
        return -1;
    }
    if (disk.pending++ == 0)
        disk.first_pending_ns = t;
    disk.next_seq++;
    if (disk.pending >= DISK_BATCH)
        return disk_flush();
    return 0;
}

/* Write the records this much time is worth (at most DISK_MAX_PER_TICK), flush full or old batches. */
static void disk_tick(int64_t t) {
    if (!disk.on || disk.state != DISK_OK)
        return;
    int64_t dt = t - disk.last_ns;
    disk.last_ns = t;
    if (dt > MAX_DEBT_NS) /* paused (VM stopped): resume at the rate, not in a burst */
        dt = MAX_DEBT_NS;
    if (dt < 0)
        dt = 0;
    disk.owed += (double)disk.rate * (double)dt / 1e9;
    double cap = (double)disk.rate * (double)MAX_DEBT_NS / 1e9;
    if (cap < 1.0)
        cap = 1.0;
    if (disk.owed > cap)
        disk.owed = cap;
    if (disk.rate == 0)
        disk.owed = 0.0;
    for (unsigned i = 0; i < DISK_MAX_PER_TICK && disk.owed >= 1.0; i++) {
        if (disk_append(t) != 0)
            return;
        disk.owed -= 1.0;
    }
    if (disk.pending > 0 && t - disk.first_pending_ns >= DISK_FLUSH_NS)
        disk_flush();
}

/* When disk_tick has work next (NEVER if none). */
static int64_t disk_wake(int64_t t) {
    if (!disk.on || disk.state != DISK_OK)
        return NEVER;
    int64_t wake = NEVER;
    if (disk.rate > 0)
        wake = disk.owed >= 1.0 ? t : t + (int64_t)((1.0 - disk.owed) * 1e9 / (double)disk.rate) + 1;
    if (disk.pending > 0 && disk.first_pending_ns + DISK_FLUSH_NS < wake)
        wake = disk.first_pending_ns + DISK_FLUSH_NS;
    return wake;
}

/* Flush, then read the log back from the device and compare it with what was acknowledged.
 * The log ends at the first never-written (all-zero) block; a block that is not the expected
 * record is a failure if this log wrote it, and just the end of the log beyond that (stale data
 * of an older use of the volume). Every acknowledged record must be there. */
static void disk_check(const char *token) {
    uint64_t records = 0, first_bad = 0;
    const char *why = NULL;
    if (disk.dfd < 0) {
        why = "unavailable";
    } else {
        if (disk.state != DISK_ERROR)
            disk_flush();
        if (disk_read(0, 1) != 0) {
            why = "io";
        } else if (header_log_id(disk.io) != disk.log_id) {
            why = "header";
        } else {
            int end;
            records = disk_scan(&end);
            uint64_t written = disk.next_seq - 1;
            if (end == REC_IO || (end != REC_ZERO && end != REC_END && records + 1 <= written)) {
                first_bad = records + 1;
                why = rec_why[end];
            } else if (records < disk.last_acked) {
                first_bad = records + 1;
                why = "lost";
            }
        }
    }
    if (why == NULL)
        emit("LIVEMIG DISKCHECK %s ok records=%" PRIu64 " acked=%" PRIu64, token, records, disk.last_acked);
    else
        emit("LIVEMIG DISKCHECK %s fail records=%" PRIu64 " acked=%" PRIu64 " first_bad=%" PRIu64 " why=%s", token,
             records, disk.last_acked, first_bad, why);
}

/* TEST HOOK: flip one payload byte of a written record on the device (not in any cache). */
static void disk_corrupt(uint64_t seq) {
    const uint64_t offset = 2048;
    if (disk.dfd < 0 || seq == 0 || seq >= disk.next_seq) {
        emit("LIVEMIG ERR bad record");
        return;
    }
    if (disk.state != DISK_ERROR)
        disk_flush();
    if (disk_read(seq, 1) != 0) {
        emit("LIVEMIG ERR diskcorrupt read: %s", errname(errno));
        return;
    }
    memcpy(disk.rec, disk.io, DISK_BLOCK);
    disk.rec[offset] ^= 0xFF;
    if (pwrite(disk.dfd, disk.rec, DISK_BLOCK, (off_t)(seq * DISK_BLOCK)) != (ssize_t)DISK_BLOCK ||
        fdatasync(disk.dfd) != 0) {
        emit("LIVEMIG ERR diskcorrupt write: %s", errname(errno));
        return;
    }
    emit("LIVEMIG DISKCORRUPT %" PRIu64 " offset=%" PRIu64, seq, offset);
}

/* ------------------------------------------------------------------ network */

#define ECHO_PORT 7
#define UDP_PORT 9
#define MAX_ECHO_CONNS 64
#define ECHO_BUF 4096
#define UDP_WINDOW (1u << 20)            /* sequence numbers remembered behind the newest */
#define UDP_RCVBUF (4 << 20)             /* absorb bursts while the loop is busy dirtying memory */
#define CONNECT_TIMEOUT_NS 5000000000LL

static int net_on;
static char net_ip[INET_ADDRSTRLEN];
static int tcp_listen_fd = -1, udp_fd = -1;

struct echo_conn {
    int fd;          /* -1: free slot */
    int rd_closed;   /* the peer finished sending: echo what is left, then close */
    size_t len;
    uint8_t buf[ECHO_BUF];
};
static struct echo_conn echo_conns[MAX_ECHO_CONNS];
static unsigned echo_active;

/* UDP sink: which of the last UDP_WINDOW sequence numbers were seen (ring of bits). Sequence
 * numbers are expected to start at 1 (or 0) after boot or "udpreset"; lost counts the gaps below
 * the highest one seen. A datagram more than UDP_WINDOW behind the newest can no longer be told
 * apart from a duplicate and is counted as one. */
static struct {
    uint64_t received, distinct, duplicated, reordered, max_seq;
    int zero_seen;
    uint8_t seen[UDP_WINDOW / 8];
} udp;

enum { CL_IDLE, CL_CONNECTING, CL_CONNECTED, CL_CLOSED };
static struct {
    int fd;
    int state;
    struct sockaddr_in peer;
    uint64_t interval_ms, sent, received, errors;
    const char *last_error;
    int64_t next_ping, connect_deadline;
    size_t outlen, inlen;
    char out[1024], in[256];
} cl = {.fd = -1, .last_error = "none"};

static int net_listener(int type, uint16_t port) {
    int fd = socket(AF_INET, type | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    int one = 1, rcvbuf = UDP_RCVBUF;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(port), .sin_addr.s_addr = htonl(INADDR_ANY)};
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (type == SOCK_DGRAM && setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof rcvbuf) != 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
    if (bind(fd, (struct sockaddr *)&addr, sizeof addr) != 0 || (type == SOCK_STREAM && listen(fd, 128) != 0)) {
        int err = errno;
        close(fd);
        errno = err;
        return -1;
    }
    return fd;
}

static void net_start(void) {
    for (unsigned i = 0; i < MAX_ECHO_CONNS; i++)
        echo_conns[i].fd = -1;
    tcp_listen_fd = net_listener(SOCK_STREAM, ECHO_PORT);
    if (tcp_listen_fd < 0) {
        emit("LIVEMIG NET ip=%s error=%s what=tcp", net_ip, errname(errno));
        return;
    }
    udp_fd = net_listener(SOCK_DGRAM, UDP_PORT);
    if (udp_fd < 0) {
        emit("LIVEMIG NET ip=%s error=%s what=udp", net_ip, errname(errno));
        return;
    }
    emit("LIVEMIG NET ip=%s tcp_echo=%d udp_sink=%d", net_ip, ECHO_PORT, UDP_PORT);
}

static void echo_close(struct echo_conn *c) {
    close(c->fd);
    c->fd = -1;
    echo_active--;
}

static void echo_accept(void) {
    for (int i = 0; i < 16 && echo_active < MAX_ECHO_CONNS; i++) {
        int fd = accept4(tcp_listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0)
            return;
        for (unsigned k = 0; k < MAX_ECHO_CONNS; k++) {
            if (echo_conns[k].fd < 0) {
                echo_conns[k].fd = fd;
                echo_conns[k].rd_closed = 0;
                echo_conns[k].len = 0;
                echo_active++;
                break;
            }
        }
    }
}

static void echo_io(struct echo_conn *c, short revents) {
    if ((revents & (POLLIN | POLLHUP | POLLERR)) && !c->rd_closed && c->len < ECHO_BUF) {
        ssize_t n = recv(c->fd, c->buf + c->len, ECHO_BUF - c->len, 0);
        if (n > 0)
            c->len += (size_t)n;
        else if (n == 0)
            c->rd_closed = 1;
        else if (errno != EAGAIN && errno != EINTR) {
            echo_close(c);
            return;
        }
    }
    if (c->len > 0) {
        ssize_t n = send(c->fd, c->buf, c->len, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n > 0) {
            memmove(c->buf, c->buf + n, c->len - (size_t)n);
            c->len -= (size_t)n;
        } else if (n < 0 && errno != EAGAIN && errno != EINTR) {
            echo_close(c);
            return;
        }
    }
    if (c->rd_closed && (c->len == 0 || (revents & (POLLHUP | POLLERR))))
        echo_close(c);
}

static void udp_account(uint64_t s) {
    udp.received++;
    if (s == 0) { /* outside the ring: one flag is enough */
        if (udp.zero_seen) {
            udp.duplicated++;
        } else {
            udp.zero_seen = 1;
            udp.distinct++;
            if (udp.max_seq > 0)
                udp.reordered++;
        }
        return;
    }
    if (s > udp.max_seq) {
        if (s - udp.max_seq >= UDP_WINDOW)
            memset(udp.seen, 0, sizeof udp.seen);
        else
            for (uint64_t q = udp.max_seq + 1; q < s; q++) /* forget what these slots held a lap ago */
                udp.seen[(q % UDP_WINDOW) / 8] &= (uint8_t)~(1u << (q % 8));
        udp.seen[(s % UDP_WINDOW) / 8] |= (uint8_t)(1u << (s % 8));
        udp.max_seq = s;
        udp.distinct++;
        return;
    }
    uint8_t *slot = &udp.seen[(s % UDP_WINDOW) / 8];
    uint8_t bit = (uint8_t)(1u << (s % 8));
    if (udp.max_seq - s >= UDP_WINDOW || (*slot & bit)) {
        udp.duplicated++;
    } else {
        *slot |= bit;
        udp.distinct++;
        udp.reordered++; /* arrived after a higher sequence number */
    }
}

static void udp_receive(void) {
    uint8_t buf[2048];
    for (int i = 0; i < 256; i++) {
        ssize_t n = recv(udp_fd, buf, sizeof buf, MSG_DONTWAIT);
        if (n < 0)
            return;
        if (n < 8)
            continue; /* no sequence number: not part of any stream */
        uint64_t s = 0;
        for (int k = 0; k < 8; k++)
            s = (s << 8) | buf[k];
        udp_account(s);
    }
}

static void udp_stats(const char *token) {
    uint64_t expected = udp.max_seq + (udp.zero_seen ? 1 : 0);
    uint64_t lost = expected > udp.distinct ? expected - udp.distinct : 0;
    emit("LIVEMIG UDPSTATS %s received=%" PRIu64 " lost=%" PRIu64 " duplicated=%" PRIu64 " reordered=%" PRIu64
         " max_seq=%" PRIu64,
         token, udp.received, lost, udp.duplicated, udp.reordered, udp.max_seq);
}

static const char *sock_error_word(int err) {
    switch (err) {
    case ECONNREFUSED: return "refused";
    case ECONNRESET: return "reset";
    case ECONNABORTED: return "aborted";
    case EPIPE: return "pipe";
    case ETIMEDOUT: return "timeout";
    case EHOSTUNREACH: return "hostunreach";
    case ENETUNREACH: return "netunreach";
    default: return "other";
    }
}

static void client_close(void) {
    if (cl.fd >= 0)
        close(cl.fd);
    cl.fd = -1;
    cl.outlen = cl.inlen = 0;
}

/* Every failure is counted and ends the session: a silent reconnect would hide exactly the
 * connection loss a migration must not cause. */
static void client_fail(const char *word) {
    client_close();
    cl.state = CL_CLOSED;
    cl.errors++;
    cl.last_error = word;
    emit("LIVEMIG TCPCLIENT state=closed error=%s", word);
}

static void client_start(const char *ip, uint64_t port, uint64_t interval_ms) {
    client_close();
    memset(&cl.peer, 0, sizeof cl.peer);
    cl.peer.sin_family = AF_INET;
    cl.peer.sin_port = htons((uint16_t)port);
    inet_pton(AF_INET, ip, &cl.peer.sin_addr);
    cl.interval_ms = interval_ms;
    cl.sent = cl.received = cl.errors = 0;
    cl.last_error = "none";
    emit("LIVEMIG TCPCLIENT state=connecting peer=%s:%" PRIu64 " interval_ms=%" PRIu64, ip, port, interval_ms);
    cl.fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (cl.fd < 0) {
        client_fail(sock_error_word(errno));
        return;
    }
    int one = 1;
    setsockopt(cl.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); /* one small line per interval */
    cl.state = CL_CONNECTING;
    cl.connect_deadline = now_ns() + CONNECT_TIMEOUT_NS;
    if (connect(cl.fd, (struct sockaddr *)&cl.peer, sizeof cl.peer) != 0 && errno != EINPROGRESS)
        client_fail(sock_error_word(errno));
    /* even an immediate success is reported by poll (writable), which keeps one code path */
}

static void client_connected(int64_t t) {
    char ip[INET_ADDRSTRLEN];
    inet_ntop(AF_INET, &cl.peer.sin_addr, ip, sizeof ip);
    cl.state = CL_CONNECTED;
    cl.next_ping = t;
    emit("LIVEMIG TCPCLIENT state=connected peer=%s:%u", ip, (unsigned)ntohs(cl.peer.sin_port));
}

static int client_flush(void) {
    while (cl.outlen > 0) {
        ssize_t n = send(cl.fd, cl.out, cl.outlen, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (n < 0) {
            if (errno == EAGAIN || errno == EINTR)
                return 0;
            client_fail(sock_error_word(errno));
            return -1;
        }
        memmove(cl.out, cl.out + n, cl.outlen - (size_t)n);
        cl.outlen -= (size_t)n;
    }
    return 0;
}

/* Echoed lines must come back whole and in order: "ping 1", "ping 2", ... */
static void client_read(void) {
    for (;;) {
        ssize_t n = recv(cl.fd, cl.in + cl.inlen, sizeof cl.in - cl.inlen, MSG_DONTWAIT);
        if (n == 0) {
            client_fail("eof");
            return;
        }
        if (n < 0) {
            if (errno != EAGAIN && errno != EINTR)
                client_fail(sock_error_word(errno));
            return;
        }
        cl.inlen += (size_t)n;
        char *nl;
        while (cl.interval_ms == 0 && (nl = memchr(cl.in, '\n', cl.inlen)) != NULL) {
            /* echo-back mode: the peer talks, we answer each line (we never speak first, so a
             * reply dropped on its way to us stalls the connection: the flow-state proof) */
            size_t line = (size_t)(nl - cl.in) + 1;
            cl.received++;
            if (cl.outlen + line <= sizeof cl.out) {
                memcpy(cl.out + cl.outlen, cl.in, line);
                cl.outlen += line;
                cl.sent++;
            }
            memmove(cl.in, nl + 1, cl.inlen - line);
            cl.inlen -= line;
            if (client_flush() != 0)
                return;
        }
        while ((nl = memchr(cl.in, '\n', cl.inlen)) != NULL) {
            char expect[32];
            int len = snprintf(expect, sizeof expect, "ping %" PRIu64, cl.received + 1);
            size_t line = (size_t)(nl - cl.in);
            if (cl.received >= cl.sent || line != (size_t)len || memcmp(cl.in, expect, line) != 0) {
                client_fail("mismatch");
                return;
            }
            cl.received++;
            memmove(cl.in, nl + 1, cl.inlen - line - 1);
            cl.inlen -= line + 1;
        }
        if (cl.inlen == sizeof cl.in) {
            client_fail("mismatch");
            return;
        }
    }
}

static void client_io(short revents, int64_t t) {
    if (cl.state == CL_CONNECTING && (revents & (POLLOUT | POLLERR | POLLHUP))) {
        int err = 0;
        socklen_t len = sizeof err;
        if (getsockopt(cl.fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0)
            err = errno;
        if (err != 0) {
            client_fail(sock_error_word(err));
            return;
        }
        client_connected(t);
        return;
    }
    if (cl.state != CL_CONNECTED)
        return;
    if (revents & (POLLIN | POLLHUP | POLLERR)) {
        client_read();
        if (cl.state != CL_CONNECTED)
            return;
    }
    if (revents & POLLOUT)
        client_flush();
}

/* Timers of the client: connect timeout, and one ping per interval (no burst after a pause; a
 * ping that does not fit the send buffer because the peer stopped reading is skipped, not sent). */
static void net_tick(int64_t t) {
    if (cl.state == CL_CONNECTING && t >= cl.connect_deadline) {
        client_fail("timeout");
        return;
    }
    if (cl.state != CL_CONNECTED || cl.interval_ms == 0 || t < cl.next_ping)
        return;
    char line[32];
    int len = snprintf(line, sizeof line, "ping %" PRIu64 "\n", cl.sent + 1);
    if (len > 0 && cl.outlen + (size_t)len <= sizeof cl.out) {
        memcpy(cl.out + cl.outlen, line, (size_t)len);
        cl.outlen += (size_t)len;
        cl.sent++;
        if (client_flush() != 0)
            return;
    }
    cl.next_ping += (int64_t)cl.interval_ms * 1000000LL;
    if (cl.next_ping <= t)
        cl.next_ping = t + (int64_t)cl.interval_ms * 1000000LL;
}

static int64_t net_wake(void) {
    if (cl.state == CL_CONNECTING)
        return cl.connect_deadline;
    if (cl.state == CL_CONNECTED && cl.interval_ms > 0)
        return cl.next_ping;
    return NEVER;
}

/* ------------------------------------------------------------------ console commands */

static int valid_token(const char *verb, const char *token) {
    if (token == NULL || strlen(token) > 64) {
        emit("LIVEMIG ERR %s needs a token of 1-64 characters", verb);
        return 0;
    }
    return 1;
}

static int need_disk(void) {
    if (!disk.on)
        emit("LIVEMIG ERR disk mode is off");
    return disk.on;
}

static int need_net(void) {
    if (!net_on)
        emit("LIVEMIG ERR network mode is off");
    return net_on;
}

static void handle_command(char *line) {
    char *save = NULL;
    char *verb = strtok_r(line, " \t\r", &save);
    char *arg = strtok_r(NULL, " \t\r", &save);
    char *arg2 = strtok_r(NULL, " \t\r", &save);
    char *arg3 = strtok_r(NULL, " \t\r", &save);
    uint64_t v, w;
    if (verb == NULL)
        return; /* empty line: ignore */
    if (strcmp(verb, "check") == 0) {
        if (valid_token(verb, arg))
            do_check(arg);
    } else if (strcmp(verb, "rate") == 0) {
        if (parse_u64(arg, &v) != 0 || v > 1000000) {
            emit("LIVEMIG ERR bad rate");
            return;
        }
        rate_mib_s = v;
        emit("LIVEMIG RATE %" PRIu64, rate_mib_s);
    } else if (strcmp(verb, "corrupt") == 0) {
        w = WORDS_PER_PAGE / 2;
        if (parse_u64(arg, &v) != 0 || v >= n_pages || (arg2 != NULL && (parse_u64(arg2, &w) != 0 || w >= WORDS_PER_PAGE))) {
            emit("LIVEMIG ERR bad page");
            return;
        }
        page_words(v)[w] ^= 1; /* on word 0 this looks like a neighbouring generation */
        emit("LIVEMIG CORRUPT %" PRIu64 " word=%" PRIu64, v, w);
    } else if (strcmp(verb, "exit") == 0) {
        if (parse_u64(arg, &v) != 0 || v > 255) {
            emit("LIVEMIG ERR bad exit code");
            return;
        }
        exit((int)v);
    } else if (strcmp(verb, "diskcheck") == 0) {
        if (need_disk() && valid_token(verb, arg))
            disk_check(arg);
    } else if (strcmp(verb, "diskrate") == 0) {
        if (!need_disk())
            return;
        if (parse_u64(arg, &v) != 0 || v > DISK_MAX_RATE) {
            emit("LIVEMIG ERR bad disk rate");
            return;
        }
        disk.rate = v;
        emit("LIVEMIG DISKRATE %" PRIu64, v);
    } else if (strcmp(verb, "diskcorrupt") == 0) {
        if (!need_disk())
            return;
        if (parse_u64(arg, &v) != 0) {
            emit("LIVEMIG ERR bad record");
            return;
        }
        disk_corrupt(v);
    } else if (strcmp(verb, "udpstats") == 0) {
        if (need_net() && valid_token(verb, arg))
            udp_stats(arg);
    } else if (strcmp(verb, "udpreset") == 0) {
        if (!need_net())
            return;
        memset(&udp, 0, sizeof udp);
        emit("LIVEMIG UDPRESET");
    } else if (strcmp(verb, "tcpclient") == 0) {
        struct in_addr ip;
        if (!need_net())
            return;
        if (arg != NULL && strcmp(arg, "stop") == 0) {
            client_close();
            cl.state = CL_IDLE;
            emit("LIVEMIG TCPCLIENT state=stopped");
            return;
        }
        if (arg == NULL || inet_pton(AF_INET, arg, &ip) != 1 || parse_u64(arg2, &v) != 0 || v == 0 || v > 65535 ||
            parse_u64(arg3, &w) != 0 || w > 3600000) {
            emit("LIVEMIG ERR usage: tcpclient <ip> <port> <interval_ms> | tcpclient stop");
            return;
        }
        client_start(arg, v, w);
    } else if (strcmp(verb, "tcpstats") == 0) {
        if (need_net() && valid_token(verb, arg))
            emit("LIVEMIG TCPSTATS %s connected=%d sent=%" PRIu64 " received=%" PRIu64 " errors=%" PRIu64
                 " last_error=%s",
                 arg, cl.state == CL_CONNECTED, cl.sent, cl.received, cl.errors, cl.last_error);
    } else {
        emit("LIVEMIG ERR unknown command");
    }
}

/* A command source: the serial console (stdin) and, when QEMU provides it, the virtio-serial
 * port "livemig.cmd". The port is the reliable one: a 16550 UART's receive path can wedge after
 * a live migration (seen rarely under TCG) while virtio queues migrate as device state. */
struct cmd_source {
    int fd;
    int open;
    int discarding; /* inside an over-long line: drop bytes up to its newline */
    int64_t quiet_until; /* port with no host connected: poll it again only after this */
    size_t len;
    char buf[256];
};
static struct cmd_source src_stdin = {.fd = STDIN_FILENO, .open = 1};
static struct cmd_source src_port = {.fd = -1};

/* Find /dev/vportNpM whose name (sysfs) is livemig.cmd; no udev in the guest, so look it up. */
static void open_command_port(void) {
    for (int n = 0; n < 8; n++)
        for (int m = 0; m < 4; m++) {
            char path[96], name[64] = {0};
            snprintf(path, sizeof path, "/sys/class/virtio-ports/vport%dp%d/name", n, m);
            int fd = open(path, O_RDONLY | O_CLOEXEC);
            if (fd < 0)
                continue;
            ssize_t got = read(fd, name, sizeof name - 1);
            close(fd);
            if (got > 0 && strncmp(name, "livemig.cmd", 11) == 0) {
                snprintf(path, sizeof path, "/dev/vport%dp%d", n, m);
                src_port.fd = open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC);
                src_port.open = src_port.fd >= 0;
                cmd_port_fd = src_port.fd;
                return;
            }
        }
}

/* Read what is available (poll said so) and run complete lines. */
static void read_commands(struct cmd_source *src) {
    ssize_t n = read(src->fd, src->buf + src->len, sizeof src->buf - 1 - src->len);
    if (n == 0) {
        if (src == &src_port) /* host side not connected: not an end, just nothing to read */
            src->quiet_until = now_ns() + 100000000LL;
        else
            src->open = 0; /* no console input any more: keep dirtying */
        return;
    }
    if (n < 0) {
        if (errno != EINTR && errno != EAGAIN && src != &src_port)
            src->open = 0;
        return;
    }
    src->len += (size_t)n;
    for (;;) {
        char *nl = memchr(src->buf, '\n', src->len);
        if (nl == NULL)
            break;
        *nl = '\0';
        if (src->discarding)
            src->discarding = 0;
        else
            handle_command(src->buf);
        size_t used = (size_t)(nl - src->buf) + 1;
        memmove(src->buf, src->buf + used, src->len - used);
        src->len -= used;
    }
    if (src->len == sizeof src->buf - 1) { /* a line longer than any command: drop all of it */
        if (!src->discarding)
            emit("LIVEMIG ERR line too long");
        src->discarding = 1;
        src->len = 0;
    }
}

/* Wait up to timeout_ns for console input or network traffic and handle it. One poll() serves
 * everything, so the workload stays single-threaded: no locks, and a stopped VM stops it all. */
static void poll_io(int64_t timeout_ns) {
    enum { P_STDIN, P_PORT, P_LISTEN, P_UDP, P_CLIENT, P_CONN0 };
    struct pollfd pfd[P_CONN0 + MAX_ECHO_CONNS];
    unsigned slot_of[MAX_ECHO_CONNS];
    nfds_t n = P_CONN0;
    if (timeout_ns < 0)
        timeout_ns = 0;
    for (unsigned i = 0; i < P_CONN0; i++)
        pfd[i] = (struct pollfd){.fd = -1};
    if (src_stdin.open)
        pfd[P_STDIN] = (struct pollfd){.fd = STDIN_FILENO, .events = POLLIN};
    if (src_port.open && now_ns() >= src_port.quiet_until)
        pfd[P_PORT] = (struct pollfd){.fd = src_port.fd, .events = POLLIN};
    else if (src_port.open && timeout_ns > src_port.quiet_until - now_ns())
        timeout_ns = src_port.quiet_until - now_ns(); /* come back to look at the port */
    if (timeout_ns < 0)
        timeout_ns = 0;
    if (net_on) {
        if (echo_active < MAX_ECHO_CONNS) /* when full, new connections wait in the backlog */
            pfd[P_LISTEN] = (struct pollfd){.fd = tcp_listen_fd, .events = POLLIN};
        pfd[P_UDP] = (struct pollfd){.fd = udp_fd, .events = POLLIN};
        if (cl.state == CL_CONNECTING)
            pfd[P_CLIENT] = (struct pollfd){.fd = cl.fd, .events = POLLOUT};
        else if (cl.state == CL_CONNECTED)
            pfd[P_CLIENT] = (struct pollfd){.fd = cl.fd, .events = (short)(POLLIN | (cl.outlen ? POLLOUT : 0))};
        for (unsigned k = 0; k < MAX_ECHO_CONNS; k++) {
            struct echo_conn *c = &echo_conns[k];
            if (c->fd < 0)
                continue;
            short ev = 0;
            if (!c->rd_closed && c->len < ECHO_BUF)
                ev |= POLLIN;
            if (c->len > 0)
                ev |= POLLOUT;
            slot_of[n - P_CONN0] = k;
            pfd[n++] = (struct pollfd){.fd = c->fd, .events = ev};
        }
    }
    struct timespec ts = {timeout_ns / 1000000000LL, timeout_ns % 1000000000LL};
    if (ppoll(pfd, n, &ts, NULL) <= 0)
        return;
    int64_t t = now_ns();
    for (nfds_t i = P_CONN0; i < n; i++)
        if (pfd[i].revents)
            echo_io(&echo_conns[slot_of[i - P_CONN0]], pfd[i].revents);
    if (pfd[P_CLIENT].revents && pfd[P_CLIENT].fd == cl.fd)
        client_io(pfd[P_CLIENT].revents, t);
    if (pfd[P_UDP].revents)
        udp_receive();
    if (pfd[P_LISTEN].revents)
        echo_accept();
    if (pfd[P_STDIN].revents) {
        if (pfd[P_STDIN].revents & (POLLIN | POLLHUP | POLLERR))
            read_commands(&src_stdin);
        if ((pfd[P_STDIN].revents & (POLLHUP | POLLERR | POLLNVAL)) && !(pfd[P_STDIN].revents & POLLIN))
            src_stdin.open = 0;
    }
    if (pfd[P_PORT].revents) {
        if (pfd[P_PORT].revents & POLLIN)
            read_commands(&src_port);
        else /* POLLHUP: no host connected; look again later instead of spinning */
            src_port.quiet_until = now_ns() + 100000000LL;
    }
}

/* Canonical input (whole lines), but no echo and no signals from stray bytes. */
static void setup_tty(void) {
    struct termios t;
    if (!isatty(STDIN_FILENO) || tcgetattr(STDIN_FILENO, &t) != 0)
        return;
    t.c_lflag |= ICANON;
    t.c_lflag &= ~(tcflag_t)(ECHO | ECHOE | ECHOK | ECHONL | ECHOCTL | ECHOKE | ISIG | IEXTEN);
    t.c_iflag |= ICRNL;
    t.c_iflag &= ~(tcflag_t)(IXON | IXOFF | INLCR | IGNCR);
    tcsetattr(STDIN_FILENO, TCSANOW, &t);
}

static void usage(void) {
    fprintf(stderr, "usage: livemig-workload [-w WSS_MIB] [-r RATE_MIB_S] [-d DEVICE [-D RECORDS_S]] [-n IP]\n");
    exit(2);
}

static void heartbeat(uint64_t seq, int64_t t) {
    char extra[128] = "";
    int n = 0;
    if (disk.on)
        n = snprintf(extra, sizeof extra, " disk_acked=%" PRIu64 " disk_state=%s", disk.last_acked,
                     disk_state_name[disk.state]);
    if (net_on && n >= 0 && (size_t)n < sizeof extra)
        snprintf(extra + n, sizeof extra - (size_t)n, " net=%s", net_ip);
    emit("LIVEMIG HB seq=%" PRIu64 " uptime_ms=%" PRId64 " dirtied_mib=%" PRIu64 " live_errors=%" PRIu64 "%s", seq,
         t / 1000000LL, dirtied_pages / PAGES_PER_MIB, live_errors, extra);
}

int main(int argc, char **argv) {
    uint64_t wss_mib = 64;
    int opt;
    struct in_addr ip;
    rate_mib_s = 20;
    while ((opt = getopt(argc, argv, "w:r:d:D:n:")) != -1) {
        switch (opt) {
        case 'w':
            if (parse_u64(optarg, &wss_mib) != 0 || wss_mib == 0 || wss_mib > 1024 * 1024)
                usage();
            break;
        case 'r':
            if (parse_u64(optarg, &rate_mib_s) != 0 || rate_mib_s > 1000000)
                usage();
            break;
        case 'd':
            disk.on = 1;
            disk.dev = optarg;
            break;
        case 'D':
            if (parse_u64(optarg, &disk.rate) != 0 || disk.rate > DISK_MAX_RATE)
                usage();
            break;
        case 'n':
            if (inet_pton(AF_INET, optarg, &ip) != 1)
                usage();
            inet_ntop(AF_INET, &ip, net_ip, sizeof net_ip);
            net_on = 1;
            break;
        default:
            usage();
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    setup_tty();
    open_command_port();
    fcntl(STDOUT_FILENO, F_SETFL, fcntl(STDOUT_FILENO, F_GETFL) | O_NONBLOCK); /* see emit() */
    signal(SIGPIPE, SIG_IGN); /* a peer that vanished is an error code, not a dead workload */
    crc32_init();

    n_pages = wss_mib * PAGES_PER_MIB;
    memory = mmap(NULL, n_pages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expected_gen = calloc(n_pages, sizeof *expected_gen);
    if (memory == MAP_FAILED || expected_gen == NULL) {
        emit("LIVEMIG ERR cannot allocate %" PRIu64 " MiB", wss_mib);
        return 1;
    }
    for (uint64_t p = 0; p < n_pages; p++) /* touch every page: generation 1 */
        write_page(p, 1);
    if (disk.on)
        disk_open();
    if (net_on)
        net_start();

    emit("LIVEMIG READY wss_mib=%" PRIu64 " rate_mib_s=%" PRIu64 " pages=%" PRIu64, wss_mib, rate_mib_s, n_pages);

    const int64_t start = now_ns();
    int64_t next_hb = start + 1000000000LL;
    uint64_t hb_seq = 0;
    int64_t slice_start = start;
    double owed = 0.0; /* pages still to dirty in the current accounting */
    int64_t last = start;
    disk.last_ns = start;

    for (;;) {
        int64_t t = now_ns();
        if (t >= next_hb) {
            heartbeat(++hb_seq, t);
            next_hb += 1000000000LL;
            if (next_hb <= t) /* we were paused (e.g. the VM was stopped): no burst of heartbeats */
                next_hb = t + 1000000000LL;
        }
        /* The disk log and the client's pings run between chunks of memory work: a flush blocks
         * the loop for its duration, and the dirtier's time-based debt below makes up for it. */
        disk_tick(t);
        net_tick(t);
        /* Accrue the pages this much time is worth, but never more than MAX_DEBT_NS of them:
         * after a pause (VM stopped for migration) the workload resumes at its rate, not in a burst. */
        int64_t dt = t - last;
        last = t;
        if (dt > MAX_DEBT_NS)
            dt = MAX_DEBT_NS;
        owed += (double)rate_mib_s * PAGES_PER_MIB * (double)dt / 1e9;
        double cap = (double)rate_mib_s * PAGES_PER_MIB * (double)MAX_DEBT_NS / 1e9;
        if (owed > cap)
            owed = cap;
        if (rate_mib_s == 0)
            owed = 0.0;

        if (owed >= 1.0) {
            uint64_t todo = (uint64_t)owed;
            if (todo > CHUNK_PAGES)
                todo = CHUNK_PAGES;
            for (uint64_t i = 0; i < todo; i++) {
                dirty_page(cursor);
                if (++cursor == n_pages)
                    cursor = 0;
            }
            owed -= (double)todo;
            poll_io(0);
            continue;
        }
        /* Quota of this slice done: sleep until the next slice, heartbeat, record or ping. */
        slice_start += SLICE_NS;
        if (slice_start <= t)
            slice_start = t + SLICE_NS;
        int64_t wake = slice_start < next_hb ? slice_start : next_hb;
        if (rate_mib_s == 0)
            wake = next_hb;
        int64_t other = disk_wake(t);
        if (other < wake)
            wake = other;
        other = net_wake();
        if (other < wake)
            wake = other;
        poll_io(wake - t);
    }
}
