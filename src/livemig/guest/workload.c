/*
 * livemig guest workload: dirties memory at a controlled rate and can prove,
 * on demand, that every page of its working set holds exactly what it last
 * wrote.  It is the guest-side witness of a live migration: if a migration
 * loses a dirty page (the destination got an older copy) or corrupts one, the
 * next "check" reports it.
 *
 * Build: gcc -static -O2 -o livemig-workload workload.c
 * Usage: livemig-workload [-w WSS_MIB] [-r RATE_MIB_S]
 *
 * Page layout (4 KiB pages, 512 64-bit words):
 *   word 0      generation of the last write
 *   word 1      page index XOR HEADER_MAGIC
 *   word 2..511 pattern(page, gen, word) = base(page, gen) + word * STEP
 * Any flipped word, or a whole page from an older generation, differs from the
 * pattern computed from the expected generation kept in a separate array.
 *
 * Console protocol (stdout, one line each, always starting with "LIVEMIG "):
 *   LIVEMIG READY wss_mib=<n> rate_mib_s=<n> pages=<n>
 *   LIVEMIG HB seq=<n> uptime_ms=<ms> dirtied_mib=<n> live_errors=<n>
 *   LIVEMIG CHECK <token> ok pages=<n> live_errors=<n>
 *   LIVEMIG CHECK <token> fail pages=<n> bad=<n> first_bad=<page>
 *           expected_gen=<g> found_gen=<g> live_errors=<n>      (one line)
 *   LIVEMIG RATE <mib_s>
 *   LIVEMIG LIVE_ERROR page=<n> expected_gen=<g> found_gen=<g>  (first 16 only)
 *   LIVEMIG CORRUPT <page> word=<w>                             (test hook)
 *   LIVEMIG ERR <reason>
 * Commands (stdin, newline-terminated):
 *   check <token>      full verification of the working set
 *   rate <mib_s>       change the dirty rate (0 = idle)
 *   corrupt <page> [w] TEST HOOK: flip word w (default 256) of a page without
 *                      updating the expectation, so tests can prove that
 *                      "check" (w >= 2) or the live header check (w < 2) fails
 *   exit <code>        TEST HOOK: exit with that code (init then prints
 *                      "LIVEMIG EXIT <code>" and starts a shell)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
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

/* Write the whole string even if the tty takes it in pieces. */
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
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(STDOUT_FILENO, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                if (errno == EAGAIN) {
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

static void handle_command(char *line) {
    char *save = NULL;
    char *verb = strtok_r(line, " \t\r", &save);
    char *arg = strtok_r(NULL, " \t\r", &save);
    char *arg2 = strtok_r(NULL, " \t\r", &save);
    uint64_t v, w;
    if (verb == NULL)
        return; /* empty line: ignore */
    if (strcmp(verb, "check") == 0) {
        if (arg == NULL || strlen(arg) > 64) {
            emit("LIVEMIG ERR check needs a token of 1-64 characters");
            return;
        }
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
    } else {
        emit("LIVEMIG ERR unknown command");
    }
}

static char inbuf[256];
static size_t inlen;
static int stdin_open = 1;
static int discarding; /* inside an over-long line: drop bytes up to its newline */

/* Read what is available on stdin (poll said so) and run complete lines. */
static void read_commands(void) {
    ssize_t n = read(STDIN_FILENO, inbuf + inlen, sizeof inbuf - 1 - inlen);
    if (n == 0) {
        stdin_open = 0; /* no console input any more: keep dirtying */
        return;
    }
    if (n < 0) {
        if (errno != EINTR && errno != EAGAIN)
            stdin_open = 0;
        return;
    }
    inlen += (size_t)n;
    for (;;) {
        char *nl = memchr(inbuf, '\n', inlen);
        if (nl == NULL)
            break;
        *nl = '\0';
        if (discarding)
            discarding = 0;
        else
            handle_command(inbuf);
        size_t used = (size_t)(nl - inbuf) + 1;
        memmove(inbuf, inbuf + used, inlen - used);
        inlen -= used;
    }
    if (inlen == sizeof inbuf - 1) { /* a line longer than any command: drop all of it */
        if (!discarding)
            emit("LIVEMIG ERR line too long");
        discarding = 1;
        inlen = 0;
    }
}

/* Wait up to timeout_ns for console input and handle it. */
static void poll_stdin(int64_t timeout_ns) {
    struct pollfd pfd = {.fd = STDIN_FILENO, .events = POLLIN};
    if (timeout_ns < 0)
        timeout_ns = 0;
    if (!stdin_open) {
        if (timeout_ns > 0) {
            struct timespec ts = {timeout_ns / 1000000000LL, timeout_ns % 1000000000LL};
            nanosleep(&ts, NULL);
        }
        return;
    }
    struct timespec ts = {timeout_ns / 1000000000LL, timeout_ns % 1000000000LL};
    int r = ppoll(&pfd, 1, &ts, NULL);
    if (r > 0) {
        if (pfd.revents & (POLLIN | POLLHUP | POLLERR))
            read_commands();
        if ((pfd.revents & (POLLHUP | POLLERR | POLLNVAL)) && !(pfd.revents & POLLIN))
            stdin_open = 0;
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
    fprintf(stderr, "usage: livemig-workload [-w WSS_MIB] [-r RATE_MIB_S]\n");
    exit(2);
}

int main(int argc, char **argv) {
    uint64_t wss_mib = 64;
    int opt;
    rate_mib_s = 20;
    while ((opt = getopt(argc, argv, "w:r:")) != -1) {
        switch (opt) {
        case 'w':
            if (parse_u64(optarg, &wss_mib) != 0 || wss_mib == 0 || wss_mib > 1024 * 1024)
                usage();
            break;
        case 'r':
            if (parse_u64(optarg, &rate_mib_s) != 0 || rate_mib_s > 1000000)
                usage();
            break;
        default:
            usage();
        }
    }
    setvbuf(stdout, NULL, _IOLBF, 0);
    setup_tty();

    n_pages = wss_mib * PAGES_PER_MIB;
    memory = mmap(NULL, n_pages * PAGE_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    expected_gen = calloc(n_pages, sizeof *expected_gen);
    if (memory == MAP_FAILED || expected_gen == NULL) {
        emit("LIVEMIG ERR cannot allocate %" PRIu64 " MiB", wss_mib);
        return 1;
    }
    for (uint64_t p = 0; p < n_pages; p++) /* touch every page: generation 1 */
        write_page(p, 1);

    emit("LIVEMIG READY wss_mib=%" PRIu64 " rate_mib_s=%" PRIu64 " pages=%" PRIu64, wss_mib, rate_mib_s, n_pages);

    const int64_t start = now_ns();
    int64_t next_hb = start + 1000000000LL;
    uint64_t hb_seq = 0;
    int64_t slice_start = start;
    double owed = 0.0; /* pages still to dirty in the current accounting */
    int64_t last = start;

    for (;;) {
        int64_t t = now_ns();
        if (t >= next_hb) {
            hb_seq++;
            emit("LIVEMIG HB seq=%" PRIu64 " uptime_ms=%" PRId64 " dirtied_mib=%" PRIu64 " live_errors=%" PRIu64,
                 hb_seq, t / 1000000LL, dirtied_pages / PAGES_PER_MIB, live_errors);
            next_hb += 1000000000LL;
            if (next_hb <= t) /* we were paused (e.g. the VM was stopped): no burst of heartbeats */
                next_hb = t + 1000000000LL;
        }
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
            poll_stdin(0);
            continue;
        }
        /* Quota of this slice done: sleep until the next slice (or heartbeat), serving commands. */
        slice_start += SLICE_NS;
        if (slice_start <= t)
            slice_start = t + SLICE_NS;
        int64_t wake = slice_start < next_hb ? slice_start : next_hb;
        if (rate_mib_s == 0)
            wake = next_hb;
        poll_stdin(wake - t);
    }
}
