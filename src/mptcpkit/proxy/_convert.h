/* RFC 8803 (the 0-RTT TCP Convert Protocol) in the engine: the codec, I/O-free.
 *
 * The same rules as convertproto.py's parse()/parse_request(), which
 * tests/test_convert_engine.py checks verdict by verdict with hypothesis (need more,
 * the message and its length, or the error code and value to answer with).  Included
 * by _engine.c only; what the engine does with a message lives there (conv_* hooks).
 *
 *   header:  version=1 (8) | total length in words (8) | unassigned (16)
 *   TLV:     type (8) | length in words (8, header included) | value
 *   Connect 0x0A: port (16) | address (128, IPv4 as ::ffff:a.b.c.d) | TCP options
 *   Cookie 0x16:  zero (16) | opaque;  Error 0x1E: code (8) | value
 */
#ifndef MPTCPKIT_CONVERT_H
#define MPTCPKIT_CONVERT_H

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define CONV_VERSION 1
#define CONV_MAX 1020 /* 255 words */

enum { CONV_NEED = 0, CONV_OK = 1, CONV_ERR = -1 };

enum {
    CT_INFO = 0x01, CT_CONNECT = 0x0A, CT_EXT_HEADER = 0x14, CT_SUPPORTED = 0x15,
    CT_COOKIE = 0x16, CT_ERROR = 0x1E,
};

enum {
    CE_UNSUPPORTED_VERSION = 0x00, CE_MALFORMED = 0x01, CE_UNSUPPORTED_MESSAGE = 0x02,
    CE_MISSING_COOKIE = 0x03, CE_NOT_AUTHORIZED = 0x20, CE_UNSUPPORTED_OPTION = 0x21,
    CE_NETWORK_FAILURE = 0x41, CE_CONNECTION_RESET = 0x60, CE_UNREACHABLE = 0x61,
};

typedef struct {
    size_t used;                 /* CONV_OK: the message's length (its total length) */
    int connects, info;          /* Connect TLVs seen; an Info TLV seen */
    unsigned port;               /* the first Connect's */
    unsigned char addr[16];      /* its address as sent (IPv4: ::ffff:a.b.c.d) */
    int v4;                      /* the address is IPv4-mapped */
    const unsigned char *options; /* its TCP options (points into the buffer) */
    size_t options_len;
    const unsigned char *cookie; /* the first Cookie's opaque bytes, or NULL */
    size_t cookie_len;
    int error;                   /* the first Error TLV's code, -1: none (replies) */
    int code;                    /* CONV_ERR: the error to answer with, and its value byte */
    unsigned char value;
    char reason[80];
} ConvMsg;

static const unsigned char conv_mapped[12] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff};

static int conv_fail(ConvMsg *m, int code, unsigned char value, const char *reason) {
    m->code = code;
    m->value = value;
    snprintf(m->reason, sizeof m->reason, "%s", reason);
    return CONV_ERR;
}

static int conv_malformed(ConvMsg *m, size_t off, const char *what) {
    m->code = CE_MALFORMED;
    m->value = (unsigned char)(off / 4 > 255 ? 255 : off / 4);
    snprintf(m->reason, sizeof m->reason, "%s (byte %zu)", what, off);
    return CONV_ERR;
}

/* Decode the message at the start of buf: CONV_NEED, CONV_OK (m filled), CONV_ERR
 * (m->code, m->value, m->reason).  `request`: as a converter reads a client's message
 * (Info, or one Connect with an optional Cookie; TLVs only a converter sends refused). */
static int conv_parse(const unsigned char *buf, size_t len, int request, ConvMsg *m) {
    memset(m, 0, sizeof *m);
    m->error = -1;
    if (len > CONV_MAX)
        len = CONV_MAX;
    if (!len)
        return CONV_NEED;
    if (buf[0] != CONV_VERSION) {
        char why[48];
        snprintf(why, sizeof why, "version %u, not %d", buf[0], CONV_VERSION);
        return conv_fail(m, CE_UNSUPPORTED_VERSION, CONV_VERSION, why);
    }
    if (len < 4)
        return CONV_NEED;
    size_t total = (size_t)buf[1] * 4;
    if (!total)
        return conv_fail(m, CE_MALFORMED, 1, "total length 0");
    if (len < total)
        return CONV_NEED;
    int foreign = -1; /* the first TLV a client does not send */
    for (size_t off = 4; off < total;) {
        unsigned kind = buf[off], words = buf[off + 1];
        size_t end = off + (size_t)words * 4;
        if (!words || end > total) {
            char why[64];
            snprintf(why, sizeof why, "TLV 0x%02x of %u words past the total length", kind, words);
            return conv_malformed(m, off, why);
        }
        const unsigned char *raw = buf + off;
        size_t n = end - off;
        switch (kind) {
        case CT_INFO:
            m->info = 1;
            break;
        case CT_CONNECT:
            if (n < 20)
                return conv_malformed(m, off, "Connect TLV shorter than 20 bytes");
            if (!m->connects) {
                m->port = (unsigned)raw[2] << 8 | raw[3];
                memcpy(m->addr, raw + 4, 16);
                m->v4 = memcmp(raw + 4, conv_mapped, 12) == 0;
                m->options = raw + 20;
                m->options_len = n - 20;
            }
            m->connects++;
            break;
        case CT_COOKIE:
            if (!m->cookie) {
                m->cookie = raw + 4;
                m->cookie_len = n - 4;
            }
            break;
        case CT_ERROR:
            if (m->error < 0)
                m->error = raw[2];
            /* fall through */
        case CT_EXT_HEADER:
        case CT_SUPPORTED:
            if (foreign < 0)
                foreign = (int)kind;
            break;
        default: {
            char why[48];
            snprintf(why, sizeof why, "unknown TLV type 0x%02x (byte %zu)", kind, off);
            return conv_fail(m, CE_UNSUPPORTED_MESSAGE, (unsigned char)kind, why);
        }
        }
        off = end;
    }
    m->used = total;
    if (!request)
        return CONV_OK;
    if (foreign >= 0) {
        char why[48];
        snprintf(why, sizeof why, "TLV 0x%02x is not sent by a client", (unsigned)foreign);
        return conv_fail(m, CE_UNSUPPORTED_MESSAGE, (unsigned char)foreign, why);
    }
    if (m->connects > 1)
        return conv_fail(m, CE_MALFORMED, 1, "more than one Connect TLV");
    if (!m->connects && !m->info)
        return conv_fail(m, CE_MALFORMED, 1, "neither Connect nor Info TLV");
    return CONV_OK;
}

/* The first TCP option kind in a Connect TLV the converter will not set, 0 if none
 * (EOL ends the list, NOPs are padding). */
static int conv_refused_option(const ConvMsg *m) {
    for (size_t i = 0; i < m->options_len; i++) {
        unsigned kind = m->options[i];
        if (kind == 0)
            return 0;
        if (kind != 1)
            return (int)kind;
    }
    return 0;
}

#endif
