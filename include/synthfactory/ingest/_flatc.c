/*
 * synthfactory.ingest._flatc: the compiled flatten of the plain NDJSON lines of every built-in table
 * (Observation, Encounter, Condition, Patient: the hand-written flatteners' rows; MedicationRequest,
 * Procedure: their built-in views' rows) for the NDJSON hot loop (fhir_ndjson.ingest_ndjson). A Patient's
 * names, address lines and telecoms go only to the identifiers, in collect_identifiers' order.
 *
 * Contract: the rows this module writes for a line are exactly the rows the hand-written Python
 * flatteners (flatteners.make_flatteners) write for it, with the same side effects (identifiers,
 * seen ids, counters). It only ever *accepts* a line it can prove plain; anything else (invalid JSON,
 * escapes in a value it reads, a shape or value it does not cover, a duplicate id, a dangling reference, a
 * modifierExtension) is handed back to the Python loop untouched, so every quarantine decision and every
 * reason stays the Python code's. A plain line picked for the validation sample is handed back to be
 * validated (R4B, in Python), and taken here only once it passed. The JSON grammar is checked in
 * full (RFC 8259, UTF-8, orjson's limits) before anything is read: a line orjson would reject is never
 * accepted here.
 *
 * Keys: HMAC-SHA256 of "Type/id" from the Keyer's inner and outer pads, cut to 32 hex characters;
 * the Python side checks them against Keyer.key before using this module.
 *
 * No value from the data ever goes to an error message; errors here are only MemoryError/TypeError.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <unistd.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <sys/mman.h>
#if defined(__SSE2__)
#include <emmintrin.h>
#endif

/* ============================================================================================== */
/* Large zeroed tables                                                                            */
/* ============================================================================================== */
/* The hash tables probed at random (the duplicate-id set, first_seen's table, the reference caches)
 * reach tens of MB. calloc maps them to the shared zero page, so a probe's first read of a page and its
 * first write cost two page faults, the second one a TLB shootdown across the process's threads. From
 * 2 MiB up they are mapped with MAP_POPULATE instead: the kernel fills every page at once, written, in one
 * call (a table is touched nearly whole as it fills). Transparent huge pages were tried and dropped:
 * on a VM whose memory the host backs lazily, a fresh 2 MiB page cost more than the faults it saved. */
#define BIG_MIN ((size_t)2 << 20)

static void *big_calloc(size_t size) {
#if defined(MAP_ANONYMOUS) && defined(MAP_POPULATE)
    if (size >= BIG_MIN) {
        void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
        return p == MAP_FAILED ? NULL : p;
    }
#endif
    return calloc(1, size ? size : 1);
}

/* frees a big_calloc table of `size` bytes */
static void big_free(void *p, size_t size) {
    if (!p) return;
#if defined(MAP_ANONYMOUS) && defined(MAP_POPULATE)
    if (size >= BIG_MIN) {
        munmap(p, size);
        return;
    }
#endif
    free(p);
}

/* ============================================================================================== */
/* SHA-256 / HMAC                                                                                  */
/* ============================================================================================== */
static const uint32_t SHA_K[64] = {
    0x428a2f98, 0x71374491, 0xb5c0fbcf, 0xe9b5dba5, 0x3956c25b, 0x59f111f1, 0x923f82a4, 0xab1c5ed5,
    0xd807aa98, 0x12835b01, 0x243185be, 0x550c7dc3, 0x72be5d74, 0x80deb1fe, 0x9bdc06a7, 0xc19bf174,
    0xe49b69c1, 0xefbe4786, 0x0fc19dc6, 0x240ca1cc, 0x2de92c6f, 0x4a7484aa, 0x5cb0a9dc, 0x76f988da,
    0x983e5152, 0xa831c66d, 0xb00327c8, 0xbf597fc7, 0xc6e00bf3, 0xd5a79147, 0x06ca6351, 0x14292967,
    0x27b70a85, 0x2e1b2138, 0x4d2c6dfc, 0x53380d13, 0x650a7354, 0x766a0abb, 0x81c2c92e, 0x92722c85,
    0xa2bfe8a1, 0xa81a664b, 0xc24b8b70, 0xc76c51a3, 0xd192e819, 0xd6990624, 0xf40e3585, 0x106aa070,
    0x19a4c116, 0x1e376c08, 0x2748774c, 0x34b0bcb5, 0x391c0cb3, 0x4ed8aa4a, 0x5b9cca4f, 0x682e6ff3,
    0x748f82ee, 0x78a5636f, 0x84c87814, 0x8cc70208, 0x90befffa, 0xa4506ceb, 0xbef9a3f7, 0xc67178f2};
static const uint32_t SHA_IV[8] = {0x6a09e667, 0xbb67ae85, 0x3c6ef372, 0xa54ff53a,
                                   0x510e527f, 0x9b05688c, 0x1f83d9ab, 0x5be0cd19};

#define ROR(x, n) (((x) >> (n)) | ((x) << (32 - (n))))

static void sha_compress(uint32_t h[8], const uint8_t *p) {
    uint32_t w[64], a, b, c, d, e, f, g, hh, t1, t2;
    int i;
    for (i = 0; i < 16; i++)
        w[i] = ((uint32_t)p[4 * i] << 24) | ((uint32_t)p[4 * i + 1] << 16) | ((uint32_t)p[4 * i + 2] << 8) |
               (uint32_t)p[4 * i + 3];
    for (i = 16; i < 64; i++) {
        uint32_t s0 = ROR(w[i - 15], 7) ^ ROR(w[i - 15], 18) ^ (w[i - 15] >> 3);
        uint32_t s1 = ROR(w[i - 2], 17) ^ ROR(w[i - 2], 19) ^ (w[i - 2] >> 10);
        w[i] = w[i - 16] + s0 + w[i - 7] + s1;
    }
    a = h[0]; b = h[1]; c = h[2]; d = h[3]; e = h[4]; f = h[5]; g = h[6]; hh = h[7];
    for (i = 0; i < 64; i++) {
        t1 = hh + (ROR(e, 6) ^ ROR(e, 11) ^ ROR(e, 25)) + ((e & f) ^ (~e & g)) + SHA_K[i] + w[i];
        t2 = (ROR(a, 2) ^ ROR(a, 13) ^ ROR(a, 22)) + ((a & b) ^ (a & c) ^ (b & c));
        hh = g; g = f; f = e; e = d + t1; d = c; c = b; b = a; a = t1 + t2;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e; h[5] += f; h[6] += g; h[7] += hh;
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_SHA_NI 1
/* the same compression with the x86 SHA extensions (used when the CPU has them, checked at import) */
__attribute__((target("sha,sse4.1,ssse3"))) static void sha_compress_ni(uint32_t h[8], const uint8_t *p) {
    const __m128i MASK = _mm_set_epi64x(0x0c0d0e0f08090a0bULL, 0x0405060700010203ULL);
    __m128i st0, st1, tmp, msg, x[4], abef, cdgh;
    int k;
    tmp = _mm_loadu_si128((const __m128i *)&h[0]);
    st1 = _mm_loadu_si128((const __m128i *)&h[4]);
    tmp = _mm_shuffle_epi32(tmp, 0xB1);      /* CDAB */
    st1 = _mm_shuffle_epi32(st1, 0x1B);      /* EFGH */
    st0 = _mm_alignr_epi8(tmp, st1, 8);      /* ABEF */
    st1 = _mm_blend_epi16(st1, tmp, 0xF0);   /* CDGH */
    abef = st0;
    cdgh = st1;
    for (k = 0; k < 16; k++) {
        __m128i w;
        if (k < 4) {
            w = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16 * k)), MASK);
        } else {
            w = _mm_sha256msg1_epu32(x[k & 3], x[(k + 1) & 3]);                   /* W[t-16] + s0(W[t-15]) */
            w = _mm_add_epi32(w, _mm_alignr_epi8(x[(k + 3) & 3], x[(k + 2) & 3], 4)); /* + W[t-7] */
            w = _mm_sha256msg2_epu32(w, x[(k + 3) & 3]);                          /* + s1(W[t-2]) */
        }
        x[k & 3] = w;
        msg = _mm_add_epi32(w, _mm_loadu_si128((const __m128i *)&SHA_K[4 * k]));
        st1 = _mm_sha256rnds2_epu32(st1, st0, msg);
        msg = _mm_shuffle_epi32(msg, 0x0E);
        st0 = _mm_sha256rnds2_epu32(st0, st1, msg);
    }
    st0 = _mm_add_epi32(st0, abef);
    st1 = _mm_add_epi32(st1, cdgh);
    tmp = _mm_shuffle_epi32(st0, 0x1B);      /* FEBA */
    st1 = _mm_shuffle_epi32(st1, 0xB1);      /* DCHG */
    st0 = _mm_blend_epi16(tmp, st1, 0xF0);   /* DCBA */
    st1 = _mm_alignr_epi8(st1, tmp, 8);      /* HGFE */
    _mm_storeu_si128((__m128i *)&h[0], st0);
    _mm_storeu_si128((__m128i *)&h[4], st1);
}

static int cpu_has_sha(void) {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!(b & (1u << 29))) return 0; /* SHA */
    if (!__get_cpuid(1, &a, &b, &c, &d)) return 0;
    return (c & (1u << 19)) && (c & (1u << 9)); /* SSE4.1, SSSE3 */
}
#endif

static void (*compress)(uint32_t h[8], const uint8_t *p) = sha_compress;

/* hash the message m (after one 64-byte block already absorbed into state h) and write the digest */
static void sha_finish(const uint32_t st[8], const uint8_t *m, size_t n, uint8_t out[32]) {
    uint32_t h[8];
    uint8_t blk[64];
    uint64_t bits = (uint64_t)(64 + n) * 8;
    size_t i;
    memcpy(h, st, sizeof h);
    while (n >= 64) {
        compress(h, m);
        m += 64;
        n -= 64;
    }
    memset(blk, 0, 64);
    memcpy(blk, m, n);
    blk[n] = 0x80;
    if (n >= 56) {
        compress(h, blk);
        memset(blk, 0, 64);
    }
    for (i = 0; i < 8; i++) blk[63 - i] = (uint8_t)(bits >> (8 * i));
    compress(h, blk);
    for (i = 0; i < 8; i++) {
        out[4 * i] = (uint8_t)(h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(h[i] >> 8);
        out[4 * i + 3] = (uint8_t)h[i];
    }
}

/* ============================================================================================== */
/* JSON: a strict, validating parse into a flat node array                                        */
/* ============================================================================================== */
enum { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

typedef struct {
    uint8_t type;
    uint8_t esc;    /* string has a backslash escape */
    uint8_t isint;  /* number without fraction or exponent */
    uint8_t kesc;   /* member key has an escape */
    uint32_t off, len;   /* string content / number text */
    uint32_t koff, klen; /* member key content (object children) */
    int32_t next;        /* next sibling, -1 */
    int32_t child;       /* first child, -1 */
    uint32_t count;      /* children */
} jnode;

#define MAX_DEPTH 256 /* orjson allows 1024: deeper lines go to the Python path, never accepted here */

/* What the Observation flatten keeps: valueString (free text) and plausible numeric ranges per unit */
#define MAX_RANGES 128
typedef struct {
    uint8_t unit[64];
    uint32_t len;
    double lo, hi;
} vrange;
typedef struct {
    int strings_fb; /* a valueString: 1 hands the line to Python (a code allow-list decides), 0 drops it */
    int n;
    vrange r[MAX_RANGES];
    double lo, hi; /* the range of any other unit, and of a value without one */
} limits;

typedef struct {
    const limits *lim; /* the flattener's (set once, read-only) */
    const uint8_t *s;
    size_t n, pos;
    jnode *nodes;
    size_t nn, cap;
    int odd; /* valid JSON, but a shape this module leaves to Python (surrogate escapes, key escapes) */
    int dup; /* a key read from an object occurs twice in it */
    int patient; /* the Patient flattener: its members are kept too (PATIENT_KEYS) */
    int root;    /* the line's root object (its members are indexed), -1 before it is parsed */
    int32_t rslot[64];  /* by RK_ index: the root's (last) member of that name, -1 none */
    uint8_t rdup[64];   /* by RK_ index: the root has the member twice */
} parser;

static int new_node(parser *P) {
    if (P->nn == P->cap) {
        size_t cap = P->cap ? P->cap * 2 : 256;
        jnode *nn;
        if (cap > (size_t)INT32_MAX) return -1;
        nn = (jnode *)realloc(P->nodes, cap * sizeof(jnode));
        if (!nn) return -1;
        P->nodes = nn;
        P->cap = cap;
    }
    memset(&P->nodes[P->nn], 0, sizeof(jnode));
    P->nodes[P->nn].next = -1;
    P->nodes[P->nn].child = -1;
    return (int)P->nn++;
}

static inline void skip_ws(parser *P) {
    while (P->pos < P->n) {
        uint8_t c = P->s[P->pos];
        if (c == ' ' || c == '\t' || c == '\n' || c == '\r') P->pos++;
        else break;
    }
}

static inline int hexval(uint8_t c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* a string at P->pos (the opening quote); returns 0 and the content span, -1 if invalid */
static int parse_string(parser *P, uint32_t *off, uint32_t *len, uint8_t *esc) {
    const uint8_t *s = P->s;
    size_t i = P->pos + 1, n = P->n;
    *esc = 0;
    *off = (uint32_t)i;
    while (i < n) {
        uint8_t c;
#if defined(__SSE2__)
        /* 16 bytes at a time while none is a quote, a backslash, a control or a non-ASCII byte (the
         * signed compare flags bytes >= 0x80 as below 0x20) */
        while (i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i *)(s + i));
            __m128i bad = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('"')),
                                                    _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))),
                                       _mm_cmplt_epi8(v, _mm_set1_epi8(0x20)));
            int mask = _mm_movemask_epi8(bad);
            if (mask) {
                i += (size_t)__builtin_ctz((unsigned)mask);
                break;
            }
            i += 16;
        }
        if (i >= n) break;
#endif
        c = s[i];
        if (c == '"') {
            *len = (uint32_t)(i - *off);
            P->pos = i + 1;
            return 0;
        }
        if (c == '\\') {
            uint8_t e;
            if (i + 1 >= n) return -1;
            e = s[i + 1];
            *esc = 1;
            if (e == 'u') {
                int k, v = 0;
                if (i + 5 >= n) return -1;
                for (k = 2; k < 6; k++) {
                    int hv = hexval(s[i + k]);
                    if (hv < 0) return -1;
                    v = v * 16 + hv;
                }
                if (v >= 0xD800 && v <= 0xDFFF) P->odd = 1; /* surrogates: left to orjson */
                i += 6;
                continue;
            }
            if (e == '"' || e == '\\' || e == '/' || e == 'b' || e == 'f' || e == 'n' || e == 'r' || e == 't') {
                i += 2;
                continue;
            }
            return -1;
        }
        if (c < 0x20) return -1;
        if (c < 0x80) {
            i++;
            continue;
        }
        /* UTF-8: no overlongs, no surrogates, nothing above U+10FFFF */
        if (c >= 0xC2 && c <= 0xDF) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return -1;
            i += 2;
        } else if (c >= 0xE0 && c <= 0xEF) {
            uint8_t c1;
            if (i + 2 >= n) return -1;
            c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80) return -1;
            if (c == 0xE0 && c1 < 0xA0) return -1;
            if (c == 0xED && c1 >= 0xA0) return -1;
            i += 3;
        } else if (c >= 0xF0 && c <= 0xF4) {
            uint8_t c1;
            if (i + 3 >= n) return -1;
            c1 = s[i + 1];
            if ((c1 & 0xC0) != 0x80 || (s[i + 2] & 0xC0) != 0x80 || (s[i + 3] & 0xC0) != 0x80) return -1;
            if (c == 0xF0 && c1 < 0x90) return -1;
            if (c == 0xF4 && c1 >= 0x90) return -1;
            i += 4;
        } else {
            return -1;
        }
    }
    return -1;
}

static int parse_number(parser *P, jnode *out) {
    const uint8_t *s = P->s;
    size_t i = P->pos, n = P->n, start = i, sig = 0;
    long exp = 0;
    int isint = 1, lead = 1;
    if (i < n && s[i] == '-') i++;
    if (i >= n) return -1;
    if (s[i] == '0') {
        i++;
    } else if (s[i] >= '1' && s[i] <= '9') {
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            i++;
            sig++;
        }
    } else {
        return -1;
    }
    if (i < n && s[i] == '.') {
        size_t d = 0;
        isint = 0;
        i++;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            i++;
            d++;
        }
        if (!d) return -1;
    }
    if (i < n && (s[i] == 'e' || s[i] == 'E')) {
        size_t d = 0;
        int neg = 0;
        isint = 0;
        i++;
        if (i < n && (s[i] == '+' || s[i] == '-')) {
            neg = s[i] == '-';
            i++;
        }
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            if (exp < 100000) exp = exp * 10 + (s[i] - '0');
            i++;
            d++;
        }
        if (!d) return -1;
        if (neg) exp = -exp;
    }
    (void)lead;
    /* orjson rejects a number that overflows a double: anything that might is left to it */
    if ((long)sig + exp > 300 || exp > 300) P->odd = 1;
    if (out) {
        out->type = J_NUM;
        out->isint = (uint8_t)isint;
        out->off = (uint32_t)start;
        out->len = (uint32_t)(i - start);
    }
    P->pos = i;
    return 0;
}

static int parse_value(parser *P, int depth);

/* true, false or null at P->pos: its node type (and past it), -1 if none */
static int parse_literal(parser *P) {
    static const struct {
        const char *word;
        size_t n;
        int type;
    } L[] = {{"true", 4, J_TRUE}, {"false", 5, J_FALSE}, {"null", 4, J_NULL}};
    size_t i;
    for (i = 0; i < 3; i++)
        if (P->n - P->pos >= L[i].n && memcmp(P->s + P->pos, L[i].word, L[i].n) == 0) {
            P->pos += L[i].n;
            return L[i].type;
        }
    return -1;
}

/* the members of a resource that the flatteners read (any type): the others are checked, not kept; then the
 * members the Patient flattener reads (besides resourceType, id, identifier), and the identifiers it collects
 * (kept for Patient only). One list: RK_x is the index of member "x". */
#define ROOT_KEY_LIST(X)                                                                                       \
    X(resourceType) X(id) X(identifier) X(subject) X(encounter) X(context) X(category) X(effectiveDateTime)    \
    X(effectivePeriod) X(effectiveInstant) X(valueQuantity) X(valueCodeableConcept) X(valueString)             \
    X(valueBoolean) X(valueInteger) X(component) X(code) X(status) X(class) X(type) X(period) X(actualPeriod)  \
    X(onsetDateTime) X(onsetPeriod) X(clinicalStatus)                                                          \
    /* MedicationRequest and Procedure (the members their built-in views read, and the shapes left to Python) */ \
    X(intent) X(medicationCodeableConcept) X(medicationReference) X(medication) X(authoredOn)                  \
    X(dosageInstruction) X(performedDateTime) X(performedPeriod) X(performed) X(performedString)               \
    X(performedAge) X(performedRange)
#define PATIENT_KEY_LIST(X)                                                                                    \
    X(gender) X(birthDate) X(deceasedBoolean) X(deceasedDateTime) X(extension) X(maritalStatus) X(address)     \
    X(name) X(telecom)
#define RK_ENUM(k) RK_##k,
#define RK_NAME(k) #k,
enum { ROOT_KEY_LIST(RK_ENUM) N_ROOT_KEYS_, PATIENT_KEY_LIST(RK_ENUM) N_ALL_KEYS_ };
static const char *ROOT_KEYS[] = {ROOT_KEY_LIST(RK_NAME) "", PATIENT_KEY_LIST(RK_NAME)};
#define N_ROOT_KEYS ((size_t)N_ROOT_KEYS_)
#define N_ALL_KEYS ((size_t)N_ALL_KEYS_)

/* the keys by length (filled once at import by key_index_init): at most 8 of any length up to 31 */
#define KEY_MAXLEN 32
static uint8_t KEYS_BY_LEN[KEY_MAXLEN][8], N_KEYS_BY_LEN[KEY_MAXLEN];

static int key_index_init(void) {
    size_t i;
    memset(N_KEYS_BY_LEN, 0, sizeof N_KEYS_BY_LEN);
    for (i = 0; i < N_ALL_KEYS; i++) {
        size_t n = strlen(ROOT_KEYS[i]);
        if (i == N_ROOT_KEYS) continue; /* the "" between the two lists */
        if (n >= KEY_MAXLEN || N_KEYS_BY_LEN[n] >= 8) return -1;
        KEYS_BY_LEN[n][N_KEYS_BY_LEN[n]++] = (uint8_t)i;
    }
    return 0;
}

/* 1 + the member's RK_ index when the flatteners read it (the Patient members only for `patient`), else 0.
 * Only the keys of the same length are compared, the first byte before memcmp (a line has ~10-20 members) */
static int root_key_kept(const uint8_t *k, uint32_t n, int patient) {
    size_t j, end = patient ? N_ALL_KEYS : N_ROOT_KEYS;
    if (n == 0 || n >= KEY_MAXLEN) return 0;
    for (j = 0; j < N_KEYS_BY_LEN[n]; j++) {
        size_t i = KEYS_BY_LEN[n][j];
        if (i < end && (uint8_t)ROOT_KEYS[i][0] == k[0] && memcmp(ROOT_KEYS[i], k, n) == 0) return (int)i + 1;
    }
    return 0;
}

/* a member key: its span; escapes and modifierExtension mark the line odd. 0, or -1 invalid */
static int parse_key(parser *P, uint32_t *koff, uint32_t *klen, uint8_t *kesc) {
    skip_ws(P);
    if (P->pos >= P->n || P->s[P->pos] != '"') return -1;
    if (parse_string(P, koff, klen, kesc) < 0) return -1;
    if (*kesc) P->odd = 1;
    /* a modifierExtension anywhere: the Python path decides (it quarantines a non-empty one) */
    if (*klen == 17 && memcmp(P->s + *koff, "modifierExtension", 17) == 0) P->odd = 1;
    skip_ws(P);
    if (P->pos >= P->n || P->s[P->pos] != ':') return -1;
    P->pos++;
    return 0;
}

/* the same grammar and checks as parse_value, keeping nothing: 0, or -1 invalid */
static int skip_value(parser *P, int depth) {
    uint8_t c;
    if (depth > MAX_DEPTH) {
        P->odd = 1;
        return -1;
    }
    skip_ws(P);
    if (P->pos >= P->n) return -1;
    c = P->s[P->pos];
    if (c == '{' || c == '[') {
        int obj = c == '{';
        P->pos++;
        skip_ws(P);
        if (P->pos < P->n && P->s[P->pos] == (obj ? '}' : ']')) {
            P->pos++;
            return 0;
        }
        for (;;) {
            if (obj) {
                uint32_t koff, klen;
                uint8_t kesc;
                if (parse_key(P, &koff, &klen, &kesc) < 0) return -1;
            }
            if (skip_value(P, depth + 1) < 0) return -1;
            skip_ws(P);
            if (P->pos >= P->n) return -1;
            if (P->s[P->pos] == ',') {
                P->pos++;
                continue;
            }
            if (P->s[P->pos] == (obj ? '}' : ']')) {
                P->pos++;
                return 0;
            }
            return -1;
        }
    }
    if (c == '"') {
        uint32_t off, len;
        uint8_t esc;
        return parse_string(P, &off, &len, &esc);
    }
    if (c == 't' || c == 'f' || c == 'n') return parse_literal(P) < 0 ? -1 : 0;
    if (c == '-' || (c >= '0' && c <= '9')) return parse_number(P, NULL);
    return -1;
}

static int parse_container(parser *P, int idx, int depth, int obj) {
    int prev = -1;
    uint32_t count = 0;
    if (depth == 0 && obj) { /* the root: its members the flatteners read are indexed as they are parsed */
        P->root = idx;
        memset(P->rslot, 0xff, sizeof(P->rslot));
        memset(P->rdup, 0, sizeof(P->rdup));
    }
    P->pos++; /* [ or { */
    skip_ws(P);
    if (P->pos < P->n && P->s[P->pos] == (obj ? '}' : ']')) {
        P->pos++;
        P->nodes[idx].count = 0;
        return 0;
    }
    for (;;) {
        uint32_t koff = 0, klen = 0;
        uint8_t kesc = 0;
        int c, kid = 0;
        if (obj) {
            if (parse_key(P, &koff, &klen, &kesc) < 0) return -1;
            if (depth == 0 && !(kid = root_key_kept(P->s + koff, klen, P->patient))) { /* no flattener reads it */
                if (skip_value(P, depth + 1) < 0) return -1;
                goto separator;
            }
        }
        c = parse_value(P, depth + 1);
        if (c < 0) return -1;
        if (kid) {
            if (P->rslot[kid - 1] >= 0) P->rdup[kid - 1] = 1;
            P->rslot[kid - 1] = c;
        }
        if (obj) {
            P->nodes[c].koff = koff;
            P->nodes[c].klen = klen;
            P->nodes[c].kesc = kesc;
        }
        if (prev < 0) P->nodes[idx].child = c;
        else P->nodes[prev].next = c;
        prev = c;
        count++;
    separator:
        skip_ws(P);
        if (P->pos >= P->n) return -1;
        if (P->s[P->pos] == ',') {
            P->pos++;
            continue;
        }
        if (P->s[P->pos] == (obj ? '}' : ']')) {
            P->pos++;
            break;
        }
        return -1;
    }
    P->nodes[idx].count = count;
    return 0;
}

/* returns the node index, -1 on invalid JSON, -2 on out of memory */
static int parse_value(parser *P, int depth) {
    int idx;
    uint8_t c;
    if (depth > MAX_DEPTH) {
        P->odd = 1;
        return -1;
    }
    skip_ws(P);
    if (P->pos >= P->n) return -1;
    idx = new_node(P);
    if (idx < 0) return -2;
    c = P->s[P->pos];
    switch (c) {
    case '{':
    case '[': {
        int r;
        P->nodes[idx].type = c == '{' ? J_OBJ : J_ARR;
        r = parse_container(P, idx, depth, c == '{');
        if (r < 0) return r;
        return idx;
    }
    case '"': {
        uint32_t off, len;
        uint8_t esc;
        if (parse_string(P, &off, &len, &esc) < 0) return -1;
        P->nodes[idx].type = J_STR;
        P->nodes[idx].off = off;
        P->nodes[idx].len = len;
        P->nodes[idx].esc = esc;
        return idx;
    }
    case 't':
    case 'f':
    case 'n': {
        int t = parse_literal(P);
        if (t < 0) return -1;
        P->nodes[idx].type = (uint8_t)t;
        return idx;
    }
    default:
        if (c == '-' || (c >= '0' && c <= '9')) {
            if (parse_number(P, &P->nodes[idx]) < 0) return -1;
            return idx;
        }
        return -1;
    }
}

/* ============================================================================================== */
/* Reading the parsed line                                                                        */
/* ============================================================================================== */
#define ABSENT (-1)
#define FB (-3) /* hand the line to Python */

/* the member `key` of object `obj`: its node or ABSENT. A key that occurs twice (orjson keeps the last
 * one) marks the line as a duplicate-key line, which is handed to Python before anything is kept. */
static inline int get(parser *P, int obj, const char *key) {
    size_t kl = strlen(key);
    int c, hit = ABSENT;
    for (c = P->nodes[obj].child; c >= 0; c = P->nodes[c].next) {
        const jnode *m = &P->nodes[c];
        if (m->klen == kl && memcmp(P->s + m->koff, key, kl) == 0) {
            if (hit != ABSENT) P->dup = 1;
            hit = c;
        }
    }
    return hit;
}

/* get(P, obj, ROOT_KEYS[k]) in one step where obj is the line's root (its members were indexed as parsed) */
static inline int rget(parser *P, int obj, int k) {
    if (obj != P->root) return get(P, obj, ROOT_KEYS[k]);
    if (P->rdup[k]) P->dup = 1;
    return P->rslot[k] >= 0 ? P->rslot[k] : ABSENT;
}

static inline int is_none(parser *P, int i) { return i == ABSENT || P->nodes[i].type == J_NULL; }
static inline int is_type(parser *P, int i, int t) { return i >= 0 && P->nodes[i].type == t; }
static inline int nth(parser *P, int arr, uint32_t k) {
    int c = P->nodes[arr].child;
    while (c >= 0 && k--) c = P->nodes[c].next;
    return c;
}

/* A C-level cell value, made a Python object only once the whole line is accepted. */
enum { V_NONE, V_SPAN, V_CONST, V_DBL, V_INT, V_BOOL, V_DATE }; /* V_BOOL, V_DATE (days): in i */
typedef struct {
    int kind;
    uint32_t off, len; /* V_SPAN: string bytes in the line (validated UTF-8, no escapes) */
    int cidx;          /* V_CONST: index into the module's interned strings */
    double d;          /* V_DBL */
    long long i;       /* V_INT */
} cell;

static const cell NONE_CELL = {V_NONE, 0, 0, 0, 0.0, 0};

/* interned constants */
enum { C_LOINC, C_SNOMED, C_ICD10CM, C_RXNORM, C_TRUE, C_FALSE, C_YEAR, C_MONTH, C_DAY, C_SECOND, N_CONST };
/* SYSTEM_RANK / SYSTEM_SHORT of normalize.py (rank = short index) */
static const struct {
    const char *uri;
    int code;
} SYSTEMS[] = {
    {"http://loinc.org", C_LOINC},
    {"urn:oid:2.16.840.1.113883.6.1", C_LOINC},
    {"http://snomed.info/sct", C_SNOMED},
    {"urn:oid:2.16.840.1.113883.6.96", C_SNOMED},
    {"http://hl7.org/fhir/sid/icd-10-cm", C_ICD10CM},
    {"urn:oid:2.16.840.1.113883.6.90", C_ICD10CM},
    {"http://www.nlm.nih.gov/research/umls/rxnorm", C_RXNORM},
    {"urn:oid:2.16.840.1.113883.6.88", C_RXNORM},
};
#define N_SYSTEMS (sizeof(SYSTEMS) / sizeof(SYSTEMS[0]))

static int system_code(parser *P, int i) {
    size_t k;
    const jnode *n = &P->nodes[i];
    for (k = 0; k < N_SYSTEMS; k++) {
        size_t l = strlen(SYSTEMS[k].uri);
        if (n->len == l && memcmp(P->s + n->off, SYSTEMS[k].uri, l) == 0) return SYSTEMS[k].code;
    }
    return -1;
}

/* a string member read as `_s(value)`: None (absent/null), a plain string, else FB */
static int str_cell(parser *P, int i, cell *out) {
    if (is_none(P, i)) {
        *out = NONE_CELL;
        return 0;
    }
    if (P->nodes[i].type != J_STR || P->nodes[i].esc) return FB;
    out->kind = V_SPAN;
    out->off = P->nodes[i].off;
    out->len = P->nodes[i].len;
    return 0;
}

static inline int span_empty(const cell *c) { return c->kind == V_SPAN && c->len == 0; }

/* object member that must be None or an object: returns node, ABSENT (None) or FB */
static int obj_or_none(parser *P, int i) {
    if (is_none(P, i)) return ABSENT;
    if (P->nodes[i].type != J_OBJ) return FB;
    return i;
}

/* A CodeableConcept's text where the Python flatteners would read it: free text, so None here. With an
 * allow-list (strings_fb) and `may_keep` (Python keeps it for allow-listed codes) the line goes to Python. */
static int dropped_text(parser *P, int i, cell *out, int may_keep) {
    if (str_cell(P, i, out) == FB) return FB;
    if (out->kind != V_NONE) {
        if (may_keep && P->lim->strings_fb) return FB;
        *out = NONE_CELL;
    }
    return 0;
}

static int first_code_k(parser *P, int cc, cell *out, int may_keep);
/* first_code(cc): code of the first coding; a text alone is free text (None) */
static int first_code(parser *P, int cc, cell *out) { return first_code_k(P, cc, out, 1); }

/* the same; may_keep 0: the caller never keeps the text (Patient.maritalStatus), whatever the allow-list */
static int first_code_k(parser *P, int cc, cell *out, int may_keep) {
    int codings;
    cc = obj_or_none(P, cc);
    if (cc == FB) return FB;
    if (cc == ABSENT || P->nodes[cc].count == 0) { /* `if not cc` */
        *out = NONE_CELL;
        return 0;
    }
    codings = get(P, cc, "coding");
    if (!is_none(P, codings)) {
        int c0;
        if (P->nodes[codings].type != J_ARR) return FB;
        if (P->nodes[codings].count) {
            c0 = P->nodes[codings].child;
            if (P->nodes[c0].type != J_OBJ) return FB;
            return str_cell(P, get(P, c0, "code"), out);
        }
    }
    return dropped_text(P, get(P, cc, "text"), out, may_keep);
}

/* concept(cc): (short system, code, display) of the preferred coding, display falling back to text */
static int concept(parser *P, int cc, cell *sys, cell *code, cell *disp) {
    int codings, best = -1, c;
    cc = obj_or_none(P, cc);
    if (cc == FB) return FB;
    *sys = *code = *disp = NONE_CELL;
    if (cc == ABSENT || P->nodes[cc].count == 0) return 0;
    codings = get(P, cc, "coding");
    if (!is_none(P, codings)) {
        if (P->nodes[codings].type != J_ARR) return FB;
        if (P->nodes[codings].count == 1) {
            best = P->nodes[codings].child;
            if (P->nodes[best].type != J_OBJ) return FB;
        } else if (P->nodes[codings].count > 1) {
            int rank = 99;
            for (c = P->nodes[codings].child; c >= 0; c = P->nodes[c].next) {
                int s, r = 99;
                if (P->nodes[c].type != J_OBJ) return FB;
                s = get(P, c, "system");
                if (!is_none(P, s)) {
                    if (P->nodes[s].type != J_STR) return FB;
                    if (P->nodes[s].esc) return FB;
                    r = system_code(P, s);
                    if (r < 0) r = 99;
                }
                if (r < rank) {
                    best = c;
                    rank = r;
                }
            }
            if (best < 0) best = P->nodes[codings].child;
        }
    }
    if (best < 0) return dropped_text(P, get(P, cc, "text"), disp, 0);
    {
        int s = get(P, best, "system");
        if (str_cell(P, s, sys) == FB) return FB;
        if (sys->kind == V_SPAN) {
            int sc = system_code(P, s);
            if (sc >= 0) {
                sys->kind = V_CONST;
                sys->cidx = sc;
            }
        }
        if (str_cell(P, get(P, best, "code"), code) == FB) return FB;
        if (str_cell(P, get(P, best, "display"), disp) == FB) return FB;
        if (disp->kind == V_NONE || span_empty(disp)) /* the text only for an allow-listed code: Python */
            if (dropped_text(P, get(P, cc, "text"), disp, 1) == FB) return FB;
    }
    return 0;
}

static const uint8_t DIM[13] = {0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};

static inline int dig(const uint8_t *s, int i) { return (s[i] >= '0' && s[i] <= '9') ? s[i] - '0' : -1000; }

/* The canonical dateTimes that fhir_datetime_deferred returns as they are (YYYY-MM-DDThh:mm:ss with Z
 * or +hh:mm, a valid calendar time). Anything else is left to Python. */
static int canonical_dt(const uint8_t *s, uint32_t n) {
    int y, mo, d, h, mi, se, dim;
    if (n != 20 && n != 25) return 0;
    if (s[4] != '-' || s[7] != '-' || s[10] != 'T' || s[13] != ':' || s[16] != ':') return 0;
    y = dig(s, 0) * 1000 + dig(s, 1) * 100 + dig(s, 2) * 10 + dig(s, 3);
    mo = dig(s, 5) * 10 + dig(s, 6);
    d = dig(s, 8) * 10 + dig(s, 9);
    h = dig(s, 11) * 10 + dig(s, 12);
    mi = dig(s, 14) * 10 + dig(s, 15);
    se = dig(s, 17) * 10 + dig(s, 18);
    if (y < 1 || mo < 1 || mo > 12 || d < 1 || h < 0 || h > 23 || mi < 0 || mi > 59 || se < 0 || se > 59) return 0;
    dim = DIM[mo];
    if (mo == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) dim = 29;
    if (d > dim) return 0;
    if (n == 20) return s[19] == 'Z';
    {
        int oh, om;
        if (s[19] != '+' && s[19] != '-') return 0;
        if (s[22] != ':') return 0;
        oh = dig(s, 20) * 10 + dig(s, 21);
        om = dig(s, 23) * 10 + dig(s, 24);
        if (oh < 0 || oh > 14 || om < 0 || om > 59) return 0;
    }
    return 1;
}

static int two(const uint8_t *s, uint32_t n, uint32_t *k) {
    int v;
    if (*k + 2 > n) return -1;
    v = dig(s, (int)*k) * 10 + dig(s, (int)*k + 1);
    *k += 2;
    return v < 0 ? -1 : v;
}

/* normalize.datetime_parts(value)[0]: microseconds since the epoch, UTC, of any FHIR date/dateTime
 * (YYYY[-MM[-DD[Thh:mm[:ss[.f+]][Z|+hh:mm|-hh:mm]]]]; a time without zone is UTC). 0, or -1 invalid. */
static int dt_micros(const uint8_t *s, uint32_t n, long long *out) {
    uint32_t k = 4;
    int y, mo = 1, d = 1, h, mi, se = 0, dim;
    long long days, secs, us = 0;
    if (n < 4) return -1;
    y = dig(s, 0) * 1000 + dig(s, 1) * 100 + dig(s, 2) * 10 + dig(s, 3);
    if (y < 1) return -1;
    if (k < n) {
        if (s[k++] != '-' || (mo = two(s, n, &k)) < 0) return -1;
        if (k < n) {
            if (s[k++] != '-' || (d = two(s, n, &k)) < 0) return -1;
        }
    }
    if (mo < 1 || mo > 12 || d < 1) return -1;
    dim = DIM[mo];
    if (mo == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) dim = 29;
    if (d > dim) return -1;
    {   /* days from civil (proleptic Gregorian) */
        long long yy = y - (mo <= 2), era = yy / 400, yoe = yy - era * 400;
        long long doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1, doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
        days = era * 146097 + doe - 719468;
    }
    if (k == n) {
        *out = days * 86400000000LL;
        return 0;
    }
    if (n < 11 || k != 10 || s[k++] != 'T') return -1;
    if ((h = two(s, n, &k)) < 0 || k >= n || s[k++] != ':' || (mi = two(s, n, &k)) < 0) return -1;
    if (k < n && s[k] == ':') {
        k++;
        if ((se = two(s, n, &k)) < 0) return -1;
        if (k < n && s[k] == '.') {
            int nd = 0;
            k++;
            while (k < n && s[k] >= '0' && s[k] <= '9') {
                if (nd < 6) us = us * 10 + (s[k] - '0');
                nd++;
                k++;
            }
            if (!nd) return -1;
            for (; nd < 6; nd++) us *= 10;
        }
    }
    if (h > 23 || mi > 59 || se > 60) return -1;
    secs = days * 86400 + h * 3600 + mi * 60 + se;
    if (k < n) {
        if (s[k] == 'Z') {
            k++;
        } else if (s[k] == '+' || s[k] == '-') {
            int sign = s[k] == '+' ? 1 : -1, oh, om;
            k++;
            if ((oh = two(s, n, &k)) < 0 || k >= n || s[k++] != ':' || (om = two(s, n, &k)) < 0) return -1;
            if (oh > 14 || om > 59) return -1;
            secs -= sign * (oh * 3600 + om * 60);
        } else {
            return -1;
        }
    }
    if (k != n) return -1;
    *out = secs * 1000000LL + us;
    return 0;
}

/* `_ts(value)` of a value known to be not None (normalize.fhir_datetime_deferred): a canonical dateTime
 * as its string, any other valid shape as microseconds; an invalid one, or a 20/25-character one that is
 * not canonical, goes to Python */
static int ts_cell(parser *P, int i, cell *out) {
    const jnode *n;
    if (i < 0) return FB;
    n = &P->nodes[i];
    if (n->type != J_STR || n->esc) return FB;
    if (n->len == 20 || n->len == 25) {
        if (!canonical_dt(P->s + n->off, n->len)) return FB;
        out->kind = V_SPAN;
        out->off = n->off;
        out->len = n->len;
        return 0;
    }
    if (dt_micros(P->s + n->off, n->len, &out->i) < 0) return FB;
    out->kind = V_INT;
    return 0;
}

/* a number node as Python's float(v) of orjson's value */
#include <locale.h>
static locale_t c_locale; /* strtod in the C locale whatever the process's LC_NUMERIC */

static int num_value(parser *P, int i, double *out) {
    const jnode *n = &P->nodes[i];
    char buf[64];
    char *end;
    if (n->len >= sizeof buf) return FB;
    memcpy(buf, P->s + n->off, n->len);
    buf[n->len] = 0;
    if (n->isint) {
        long long v;
        size_t digits = n->len - (buf[0] == '-');
        if (digits > 18) return FB; /* a 64-bit or larger int: left to Python */
        v = strtoll(buf, &end, 10);
        *out = (double)v;
        return 0;
    }
    *out = strtod_l(buf, &end, c_locale);
    if (!isfinite(*out) || end != buf + n->len) return FB;
    return 0;
}

/* A reference to a key of `rtype`: kind 0 None, 1 "rtype/id" (key of the id), else FB */
typedef struct {
    int some;
    uint32_t off, len;     /* the reference string */
    uint32_t idoff, idlen; /* its id */
} ref;

/* ref_key(ref_obj, rtype): only `Type/id` references (one slash, both parts non-empty) are taken */
/* an id of the FHIR grammar: [A-Za-z0-9\-\.]{1,64} */
static int fhir_id_ok(const uint8_t *s, uint32_t n) {
    uint32_t k;
    if (n == 0 || n > 64) return 0;
    for (k = 0; k < n; k++) {
        uint8_t c = s[k];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '.'))
            return 0;
    }
    return 1;
}

static int ref_of(parser *P, int member, const char *rtype, ref *out) {
    int obj = obj_or_none(P, member), r;
    const jnode *n;
    const uint8_t *s;
    uint32_t k, slash = 0, slashes = 0;
    size_t tl = strlen(rtype);
    out->some = 0;
    if (obj == FB) return FB;
    if (obj == ABSENT || P->nodes[obj].count == 0) return 0; /* `if not ref_obj` */
    r = get(P, obj, "reference");
    if (is_none(P, r)) return 0;
    n = &P->nodes[r];
    if (n->type != J_STR || n->esc || n->len == 0) return FB;
    s = P->s + n->off;
    for (k = 0; k < n->len; k++)
        if (s[k] == '/') {
            slash = k;
            slashes++;
        }
    if (slashes != 1 || slash == 0 || slash == n->len - 1 || s[0] == '#') return FB;
    if (n->len >= 9 && memcmp(s, "urn:uuid:", 9) == 0) return FB;
    if (slash != tl || memcmp(s, rtype, tl) != 0) return FB; /* another type: Python decides (None) */
    if (!fhir_id_ok(s + slash + 1, n->len - slash - 1)) return FB; /* malformed: Python quarantines it */
    out->some = 1;
    out->off = n->off;
    out->len = n->len;
    out->idoff = n->off + slash + 1;
    out->idlen = n->len - slash - 1;
    return 0;
}

/* ============================================================================================== */
/* The flattener object                                                                           */
/* ============================================================================================== */
/* ============================================================================================== */
/* Columns: Arrow buffers (validity bitmap, int32 offsets + UTF-8 data, float64, int64 timestamps)  */
/* ============================================================================================== */
typedef struct {
    uint8_t *p;
    size_t len, cap;
} gbuf;

static int gb_reserve(gbuf *b, size_t extra) {
    if (b->len + extra > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        uint8_t *q;
        while (cap < b->len + extra) cap *= 2;
        q = (uint8_t *)realloc(b->p, cap);
        if (!q) return -1; /* callers holding the GIL raise MemoryError */
        b->p = q;
        b->cap = cap;
    }
    return 0;
}

/* Errors raised where the GIL may be released (the commit's loop, see Flat_commit): with the GIL they are set
 * at once; without it the first is kept (a static exception type and message) and set once the GIL is back. */
static _Thread_local int nogil_depth;
static _Thread_local PyObject *nogil_exc;
static _Thread_local const char *nogil_msg;

static void err_set(PyObject *exc, const char *msg) {
    if (!nogil_depth) {
        PyErr_SetString(exc, msg);
    } else if (!nogil_exc) {
        nogil_exc = exc;
        nogil_msg = msg;
    }
}

static void err_nomem(void) {
    if (!nogil_depth)
        PyErr_NoMemory();
    else if (!nogil_exc) {
        nogil_exc = PyExc_MemoryError;
        nogil_msg = NULL;
    }
}

/* the error kept while the GIL was released, set now (GIL held) */
static void err_restore(void) {
    PyObject *exc = nogil_exc;
    nogil_exc = NULL;
    if (!exc || exc == PyExc_MemoryError)
        PyErr_NoMemory();
    else
        PyErr_SetString(exc, nogil_msg);
}

static inline int gb_put(gbuf *b, const void *src, size_t n) {
    if (n == 0) return 0;
    if (gb_reserve(b, n) < 0) return -1;
    memcpy(b->p + b->len, src, n);
    b->len += n;
    return 0;
}

enum { COL_STR = 's', COL_DBL = 'd', COL_TS = 't', COL_BOOL = 'b', COL_DATE = 'D' };
#define MAX_COLS 16

typedef struct {
    char kind;
    gbuf data, offs, valid;
    Py_ssize_t nulls;
} column;

typedef struct {
    PyObject_HEAD
    int ncols;
    Py_ssize_t nrows;
    column cols[MAX_COLS];
} Columns;

static PyTypeObject ColumnsType;

typedef struct {
    size_t data, offs, valid;
    Py_ssize_t nulls;
} colmark;

static void cols_mark(Columns *C, colmark *m) {
    int j;
    for (j = 0; j < C->ncols; j++) {
        m[j].data = C->cols[j].data.len;
        m[j].offs = C->cols[j].offs.len;
        m[j].valid = C->cols[j].valid.len;
        m[j].nulls = C->cols[j].nulls;
    }
}

/* undo a partly written row */
static void cols_rollback(Columns *C, const colmark *m) {
    int j;
    for (j = 0; j < C->ncols; j++) {
        column *c = &C->cols[j];
        c->data.len = m[j].data;
        c->offs.len = m[j].offs;
        c->valid.len = m[j].valid;
        c->nulls = m[j].nulls;
        if (c->valid.len && (C->nrows & 7)) c->valid.p[C->nrows >> 3] &= (uint8_t)((1u << (C->nrows & 7)) - 1);
        if (c->kind == COL_BOOL && c->data.len && (C->nrows & 7))
            c->data.p[C->nrows >> 3] &= (uint8_t)((1u << (C->nrows & 7)) - 1);
    }
}

static int col_begin(column *c, Py_ssize_t r) {
    if ((r & 7) == 0) {
        uint8_t z = 0;
        if (gb_put(&c->valid, &z, 1) < 0) {
            err_nomem();
            return -1;
        }
    }
    return 0;
}

static int col_put(gbuf *b, const void *src, size_t n) {
    if (gb_put(b, src, n) < 0) {
        err_nomem();
        return -1;
    }
    return 0;
}

/* a bool column's values are a bitmap too: one byte per 8 rows */
static int bool_begin(column *c, Py_ssize_t r) {
    if ((r & 7) == 0) {
        uint8_t z = 0;
        return col_put(&c->data, &z, 1);
    }
    return 0;
}

static int col_null(column *c, Py_ssize_t r) {
    if (col_begin(c, r) < 0) return -1;
    c->nulls++;
    if (c->kind == COL_STR) {
        int32_t o = (int32_t)c->data.len;
        return col_put(&c->offs, &o, 4);
    } else if (c->kind == COL_BOOL) {
        return bool_begin(c, r);
    } else if (c->kind == COL_DATE) {
        int32_t z = 0;
        return col_put(&c->data, &z, 4);
    } else {
        int64_t z = 0;
        return col_put(&c->data, &z, 8);
    }
}

static int col_str(column *c, Py_ssize_t r, const void *s, size_t n) {
    int32_t o;
    if (c->kind != COL_STR) {
        err_set(PyExc_TypeError, "a string for a non-string column");
        return -1;
    }
    if (c->data.len + n > (size_t)INT32_MAX) {
        err_set(PyExc_OverflowError, "string column over 2 GiB in one batch");
        return -1;
    }
    if (col_begin(c, r) < 0 || col_put(&c->data, s, n) < 0) return -1;
    c->valid.p[r >> 3] |= (uint8_t)(1u << (r & 7));
    o = (int32_t)c->data.len;
    return col_put(&c->offs, &o, 4);
}

static int col_f64(column *c, Py_ssize_t r, double v) {
    if (c->kind != COL_DBL) {
        err_set(PyExc_TypeError, "a number for a non-float column");
        return -1;
    }
    if (col_begin(c, r) < 0 || col_put(&c->data, &v, 8) < 0) return -1;
    c->valid.p[r >> 3] |= (uint8_t)(1u << (r & 7));
    return 0;
}

static int col_i64(column *c, Py_ssize_t r, int64_t v) {
    if (c->kind != COL_TS) {
        err_set(PyExc_TypeError, "a timestamp for a non-timestamp column");
        return -1;
    }
    if (col_begin(c, r) < 0 || col_put(&c->data, &v, 8) < 0) return -1;
    c->valid.p[r >> 3] |= (uint8_t)(1u << (r & 7));
    return 0;
}

static int col_bool(column *c, Py_ssize_t r, int v) {
    if (c->kind != COL_BOOL) {
        err_set(PyExc_TypeError, "a bool for a non-bool column");
        return -1;
    }
    if (col_begin(c, r) < 0 || bool_begin(c, r) < 0) return -1;
    c->valid.p[r >> 3] |= (uint8_t)(1u << (r & 7));
    if (v) c->data.p[r >> 3] |= (uint8_t)(1u << (r & 7));
    return 0;
}

static int col_date(column *c, Py_ssize_t r, long long days) {
    int32_t d = (int32_t)days;
    if (c->kind != COL_DATE) {
        err_set(PyExc_TypeError, "a date for a non-date column");
        return -1;
    }
    if (days < INT32_MIN || days > INT32_MAX) {
        err_set(PyExc_OverflowError, "date out of range");
        return -1;
    }
    if (col_begin(c, r) < 0 || col_put(&c->data, &d, 4) < 0) return -1;
    c->valid.p[r >> 3] |= (uint8_t)(1u << (r & 7));
    return 0;
}

static int dt_micros(const uint8_t *s, uint32_t n, long long *out);

static void cols_reset(Columns *C) {
    int j;
    C->nrows = 0;
    for (j = 0; j < C->ncols; j++) {
        column *c = &C->cols[j];
        int32_t z = 0;
        c->data.len = c->offs.len = c->valid.len = 0;
        c->nulls = 0;
        if (c->kind == COL_STR && col_put(&c->offs, &z, 4) < 0) return;
    }
}

/* one Python row tuple (the Python flatteners' rows) */
static int cols_append_row(Columns *C, PyObject *row) {
    colmark m[MAX_COLS];
    Py_ssize_t r = C->nrows;
    int j;
    if (!PyTuple_Check(row) || PyTuple_GET_SIZE(row) != C->ncols) {
        PyErr_SetString(PyExc_TypeError, "a row must be a tuple with one value per column");
        return -1;
    }
    cols_mark(C, m);
    for (j = 0; j < C->ncols; j++) {
        column *c = &C->cols[j];
        PyObject *v = PyTuple_GET_ITEM(row, j);
        int rc;
        if (v == Py_None) {
            rc = col_null(c, r);
        } else if (c->kind == COL_STR) {
            Py_ssize_t n;
            const char *u = PyUnicode_Check(v) ? PyUnicode_AsUTF8AndSize(v, &n) : NULL;
            if (!u && !PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "a string column holds str or None");
            rc = u ? col_str(c, r, u, (size_t)n) : -1;
        } else if (c->kind == COL_DBL) {
            double d = PyFloat_CheckExact(v) ? PyFloat_AS_DOUBLE(v) : (PyLong_CheckExact(v) ? PyLong_AsDouble(v) : -1.0);
            if (!PyFloat_CheckExact(v) && !PyLong_CheckExact(v))
                PyErr_SetString(PyExc_TypeError, "a float column holds float, int or None");
            rc = PyErr_Occurred() ? -1 : col_f64(c, r, d);
        } else if (c->kind == COL_BOOL) {
            if (!PyBool_Check(v)) {
                PyErr_SetString(PyExc_TypeError, "a bool column holds bool or None");
                rc = -1;
            } else {
                rc = col_bool(c, r, v == Py_True);
            }
        } else if (c->kind == COL_DATE) { /* days since 1970-01-01 */
            long long days = PyLong_CheckExact(v) ? PyLong_AsLongLong(v) : 0;
            if (!PyLong_CheckExact(v)) PyErr_SetString(PyExc_TypeError, "a date column holds int (days) or None");
            rc = PyErr_Occurred() ? -1 : col_date(c, r, days);
        } else { /* timestamp: microseconds, or a dateTime string as fhir_datetime_deferred returns it */
            long long us = 0;
            if (PyLong_CheckExact(v)) {
                us = PyLong_AsLongLong(v);
                rc = PyErr_Occurred() ? -1 : 0;
            } else if (PyUnicode_Check(v)) {
                Py_ssize_t n;
                const char *u = PyUnicode_AsUTF8AndSize(v, &n);
                rc = u ? dt_micros((const uint8_t *)u, (uint32_t)n, &us) : -1;
                if (u && rc < 0) PyErr_SetString(PyExc_ValueError, "not a FHIR dateTime");
            } else {
                PyErr_SetString(PyExc_TypeError, "a timestamp column holds int, str or None");
                rc = -1;
            }
            if (rc == 0) rc = col_i64(c, r, us);
        }
        if (rc < 0) {
            cols_rollback(C, m);
            return -1;
        }
    }
    C->nrows++;
    return 0;
}

static PyObject *Columns_append(Columns *C, PyObject *row) {
    if (cols_append_row(C, row) < 0) return NULL;
    Py_RETURN_NONE;
}

static PyObject *Columns_extend(Columns *C, PyObject *rows) {
    PyObject *it = PyObject_GetIter(rows), *row;
    if (!it) return NULL;
    while ((row = PyIter_Next(it))) {
        int rc = cols_append_row(C, row);
        Py_DECREF(row);
        if (rc < 0) {
            Py_DECREF(it);
            return NULL;
        }
    }
    Py_DECREF(it);
    if (PyErr_Occurred()) return NULL;
    Py_RETURN_NONE;
}

/* take() -> [(null_count, validity bytes | None, offsets bytes | None, data bytes), ...]; then empty */
static PyObject *Columns_take(Columns *C, PyObject *unused) {
    PyObject *out = PyList_New(C->ncols);
    int j;
    if (!out) return NULL;
    for (j = 0; j < C->ncols; j++) {
        column *c = &C->cols[j];
        PyObject *valid, *offs, *data, *t;
        if (c->nulls) {
            valid = PyBytes_FromStringAndSize((const char *)c->valid.p, (Py_ssize_t)c->valid.len);
        } else {
            valid = Py_None;
            Py_INCREF(valid);
        }
        if (c->kind == COL_STR) {
            offs = PyBytes_FromStringAndSize((const char *)c->offs.p, (Py_ssize_t)c->offs.len);
        } else {
            offs = Py_None;
            Py_INCREF(offs);
        }
        data = PyBytes_FromStringAndSize(c->data.len ? (const char *)c->data.p : "", (Py_ssize_t)c->data.len);
        t = (valid && offs && data) ? Py_BuildValue("nNNN", c->nulls, valid, offs, data) : NULL;
        if (!t) {
            Py_XDECREF(valid);
            Py_XDECREF(offs);
            Py_XDECREF(data);
            Py_DECREF(out);
            return NULL;
        }
        PyList_SET_ITEM(out, j, t);
    }
    cols_reset(C);
    return out;
}

static Py_ssize_t Columns_len(Columns *C) { return C->nrows; }

static int Columns_init(Columns *C, PyObject *args, PyObject *kw) {
    const char *kinds;
    Py_ssize_t n, j;
    if (!PyArg_ParseTuple(args, "s#", &kinds, &n)) return -1;
    if (n < 1 || n > MAX_COLS) {
        PyErr_SetString(PyExc_ValueError, "1 to 16 columns");
        return -1;
    }
    for (j = 0; j < n; j++)
        if (kinds[j] != COL_STR && kinds[j] != COL_DBL && kinds[j] != COL_TS && kinds[j] != COL_BOOL &&
            kinds[j] != COL_DATE) {
            PyErr_SetString(PyExc_ValueError,
                            "column kinds are s (string), d (float64), t (timestamp), b (bool) and D (date32)");
            return -1;
        }
    for (j = 0; j < C->ncols; j++) {
        free(C->cols[j].data.p);
        free(C->cols[j].offs.p);
        free(C->cols[j].valid.p);
    }
    memset(C->cols, 0, sizeof C->cols);
    C->ncols = (int)n;
    for (j = 0; j < n; j++) C->cols[j].kind = kinds[j];
    cols_reset(C);
    if (PyErr_Occurred()) return -1;
    return 0;
}

static void Columns_dealloc(Columns *C) {
    int j;
    for (j = 0; j < C->ncols; j++) {
        free(C->cols[j].data.p);
        free(C->cols[j].offs.p);
        free(C->cols[j].valid.p);
    }
    Py_TYPE(C)->tp_free((PyObject *)C);
}

static PyObject *Columns_kinds(Columns *C, void *closure) {
    char k[MAX_COLS];
    int j;
    for (j = 0; j < C->ncols; j++) k[j] = C->cols[j].kind;
    return PyUnicode_FromStringAndSize(k, C->ncols);
}

static PyMethodDef Columns_methods[] = {
    {"append", (PyCFunction)Columns_append, METH_O, "Add one row tuple."},
    {"extend", (PyCFunction)Columns_extend, METH_O, "Add row tuples."},
    {"take", (PyCFunction)Columns_take, METH_NOARGS, "The columns' Arrow buffers; the builder is then empty."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Columns_getset[] = {{"kinds", (getter)Columns_kinds, NULL, "column kinds", NULL},
                                       {NULL, NULL, NULL, NULL, NULL}};

static PySequenceMethods Columns_seq = {.sq_length = (lenfunc)Columns_len};

static PyTypeObject ColumnsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "synthfactory.ingest._flatc.Columns",
    .tp_basicsize = sizeof(Columns),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Columns(kinds): row buffer of a table as Arrow buffers (kinds: s string, d float64, t timestamp).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Columns_init,
    .tp_dealloc = (destructor)Columns_dealloc,
    .tp_methods = Columns_methods,
    .tp_getset = Columns_getset,
    .tp_as_sequence = &Columns_seq,
};

/* ============================================================================================== */
/* Reference cache: reference string -> key (and whether the key is a known patient)              */
/* ============================================================================================== */
typedef struct {
    uint64_t h;      /* 0: empty slot */
    uint32_t off, len; /* the reference string in the arena */
    char key[32];
    Py_ssize_t checked; /* 1 + size of the patient-key set when `known` was decided, 0 never */
    int known;
} rentry;

typedef struct {
    rentry *e;
    size_t cap, n;
    gbuf arena;
} rcache;

#define RCACHE_MAX (1u << 17)

/* the reference caches' hash (never 0: 0 marks an empty slot). Eight bytes a step, then a 64-bit finaliser
 * (murmur3's fmix64 constants); it only spreads the slots: an entry matches only if its string is the same
 * (FNV-1a, a byte a step, took ~2 % of an ingest's CPU on ~45-byte references). */
static uint64_t refhash(const uint8_t *s, size_t n) {
    uint64_t h = 0x9e3779b97f4a7c15ULL ^ (uint64_t)n, w;
    while (n >= 8) {
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xff51afd7ed558ccdULL;
        h ^= h >> 32;
        s += 8;
        n -= 8;
    }
    if (n) {
        w = 0;
        memcpy(&w, s, n);
        h = (h ^ w) * 0xc4ceb9fe1a85ec53ULL;
    }
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    return h ? h : 1;
}

static void rc_clear(rcache *c) {
    if (c->e) memset(c->e, 0, c->cap * sizeof(rentry));
    c->n = 0;
    c->arena.len = 0;
}

/* the entry of a reference (new entries have key[0] == 0); NULL on out of memory. h is refhash(s, n). */
static rentry *rc_get_h(rcache *c, const uint8_t *s, size_t n, uint64_t h) {
    size_t i;
    if (c->n >= RCACHE_MAX) rc_clear(c);
    if (!c->e || (c->n + 1) * 2 > c->cap) { /* grow (rehash) */
        size_t cap = c->cap ? c->cap * 2 : 1024, k;
        rentry *e = (rentry *)big_calloc(cap * sizeof(rentry));
        if (!e) return NULL;
        for (k = 0; k < c->cap; k++)
            if (c->e[k].h) {
                size_t j = c->e[k].h & (cap - 1);
                while (e[j].h) j = (j + 1) & (cap - 1);
                e[j] = c->e[k];
            }
        big_free(c->e, c->cap * sizeof(rentry));
        c->e = e;
        c->cap = cap;
    }
    i = h & (c->cap - 1);
    while (c->e[i].h) {
        if (c->e[i].h == h && c->e[i].len == n && memcmp(c->arena.p + c->e[i].off, s, n) == 0) return &c->e[i];
        i = (i + 1) & (c->cap - 1);
    }
    if (n > UINT32_MAX || c->arena.len + n > UINT32_MAX) {
        rc_clear(c);
        return rc_get_h(c, s, n, h);
    }
    c->e[i].h = h;
    c->e[i].off = (uint32_t)c->arena.len;
    c->e[i].len = (uint32_t)n;
    c->e[i].key[0] = 0;
    c->e[i].checked = 0;
    if (gb_put(&c->arena, s, n) < 0) {
        c->e[i].h = 0;
        return NULL;
    }
    c->n++;
    return &c->e[i];
}

static rentry *rc_get(rcache *c, const uint8_t *s, size_t n) { return rc_get_h(c, s, n, refhash(s, n)); }

/* ============================================================================================== */
/* The flattener object                                                                           */
/* ============================================================================================== */
enum { K_OBSERVATION, K_ENCOUNTER, K_CONDITION, K_MEDREQ, K_PROCEDURE, K_PATIENT, N_KINDS };
static const char *KIND_TYPE[N_KINDS] = {"Observation", "Encounter", "Condition", "MedicationRequest", "Procedure",
                                         "Patient"};
/* the columns of the type's table (schemas.py; the built-in views of views.py for MedicationRequest, Procedure) */
static const int KIND_NCOLS[N_KINDS] = {11, 8, 8, 14, 11, 11};

typedef struct {
    PyObject_HEAD
    int kind;                /* K_OBSERVATION, K_ENCOUNTER, K_CONDITION */
    uint32_t ist[8], ost[8]; /* HMAC midstates after the inner and outer pad */
    limits lim;              /* what Observation values are kept (read-only after init) */
    parser P;                      /* prepare phase only (helper thread, no GIL) */
    rcache pcache, ecache;         /* prepare phase only: reference -> key */
    rcache known;                  /* commit phase only: patient key -> in the patient-key set (a set of str) */
    PyObject *s_id, *s_identifier; /* identifier kinds */
    PyObject *s_kind[5];           /* identifier kinds by IK_* (Patient) */
    int busy;                      /* a prepare is running (set and read with the GIL) */
} Flat;

/* the 32-hex key of "type/id[#comp]": no state but the (read-only) midstates, so any thread may call it */
static int key_hex(Flat *F, const char *type, const uint8_t *id, size_t idlen, long comp, char hex[32]) {
    size_t tl = strlen(type), n = tl + 1 + idlen + 24;
    uint8_t small[512], *msg = n <= sizeof small ? small : (uint8_t *)malloc(n);
    uint8_t d[32], d2[32];
    static const char HEX[] = "0123456789abcdef";
    int i;
    if (!msg) return -1;
    memcpy(msg, type, tl);
    msg[tl] = '/';
    memcpy(msg + tl + 1, id, idlen);
    n = tl + 1 + idlen;
    if (comp >= 0) n += (size_t)snprintf((char *)msg + n, 24, "#%ld", comp);
    sha_finish(F->ist, msg, n, d);
    sha_finish(F->ost, d, 32, d2);
    if (msg != small) free(msg);
    for (i = 0; i < 16; i++) {
        hex[2 * i] = HEX[d2[i] >> 4];
        hex[2 * i + 1] = HEX[d2[i] & 15];
    }
    return 0;
}

static const char *CONST_TEXT[N_CONST] = {"loinc", "snomed", "icd10cm", "rxnorm", "true", "false",
                                          "year", "month", "day", "second"};

/* a cell into a column */
static int put_cell(const uint8_t *base, column *c, Py_ssize_t r, const cell *v) {
    switch (v->kind) {
    case V_SPAN:
        if (c->kind == COL_TS) {
            long long us;
            if (dt_micros(base + v->off, v->len, &us) < 0) {
                err_set(PyExc_SystemError, "_flatc: a checked dateTime did not parse");
                return -1;
            }
            return col_i64(c, r, us);
        }
        return col_str(c, r, base + v->off, v->len);
    case V_CONST:
        return col_str(c, r, CONST_TEXT[v->cidx], strlen(CONST_TEXT[v->cidx]));
    case V_DBL:
        return col_f64(c, r, v->d);
    case V_INT:
        return col_i64(c, r, v->i);
    case V_BOOL:
        return col_bool(c, r, (int)v->i);
    case V_DATE:
        return col_date(c, r, v->i);
    default:
        return col_null(c, r);
    }
}

/* the key of a reference through the cache into out: 1 a key, 0 no reference, -1 out of memory */
static int ref_key(Flat *F, const ref *r, const char *rtype, rcache *cache, char out[32]) {
    rentry *e;
    if (!r->some) return 0;
    e = rc_get(cache, F->P.s + r->off, r->len);
    if (!e) return -1;
    if (!e->key[0] && key_hex(F, rtype, F->P.s + r->idoff, r->idlen, -1, e->key) < 0) {
        e->key[0] = 0;
        return -1;
    }
    memcpy(out, e->key, 32);
    return 1;
}

/* the value within the plausible range of its unit (a span or None) */
static int in_range(parser *P, const cell *unit, double d) {
    const limits *L = P->lim;
    int k;
    if (unit->kind == V_SPAN)
        for (k = 0; k < L->n; k++)
            if (L->r[k].len == unit->len && memcmp(L->r[k].unit, P->s + unit->off, unit->len) == 0)
                return d >= L->r[k].lo && d <= L->r[k].hi;
    return d >= L->lo && d <= L->hi;
}

/* obs_value(x): 0 no value (None), 1 a value in num/unit/vcode, FB */
static int obs_value(parser *P, int x, cell *num, cell *unit, cell *vcode) {
    int q, v;
    *num = *unit = *vcode = NONE_CELL;
    q = get(P, x, "valueQuantity");
    if (!is_none(P, q)) {
        int val, u;
        if (P->nodes[q].type != J_OBJ) return FB;
        val = get(P, q, "value");
        if (is_none(P, val)) return 0;
        if (P->nodes[val].type != J_NUM) return FB;
        num->kind = V_DBL;
        if (num_value(P, val, &num->d) == FB) return FB;
        u = get(P, q, "unit");
        if (str_cell(P, u, unit) == FB) return FB;
        if (unit->kind == V_NONE || span_empty(unit)) /* `q.get("unit") or q.get("code")` */
            if (str_cell(P, get(P, q, "code"), unit) == FB) return FB;
        if (!in_range(P, unit, num->d)) return FB; /* implausible: Python quarantines it */
        return 1;
    }
    v = get(P, x, "valueCodeableConcept");
    if (!is_none(P, v)) {
        if (first_code(P, v, vcode) == FB) return FB;
        return vcode->kind == V_NONE ? 0 : 1;
    }
    v = get(P, x, "valueString");
    if (!is_none(P, v)) { /* free text never reaches a table: no value (Python decides for allow-listed codes) */
        if (P->lim->strings_fb || str_cell(P, v, vcode) == FB) return FB;
        *vcode = NONE_CELL;
        return 0;
    }
    v = get(P, x, "valueBoolean");
    if (!is_none(P, v)) {
        if (P->nodes[v].type == J_TRUE) vcode->cidx = C_TRUE;
        else if (P->nodes[v].type == J_FALSE) vcode->cidx = C_FALSE;
        else return FB;
        vcode->kind = V_CONST;
        return 1;
    }
    v = get(P, x, "valueInteger");
    if (!is_none(P, v)) {
        if (P->nodes[v].type != J_NUM || !P->nodes[v].isint) return FB;
        num->kind = V_DBL;
        if (num_value(P, v, &num->d) == FB) return FB;
        return in_range(P, &NONE_CELL, num->d) ? 1 : FB;
    }
    return 0;
}

/* `o.get(a) or o.get(b)` for an encounter/period-like member: the node of a non-empty object, ABSENT or FB */
static int first_object(parser *P, int root, const char *a, const char *b) {
    int x = obj_or_none(P, get(P, root, a));
    if (x == FB) return FB;
    if (x >= 0) return P->nodes[x].count ? x : FB; /* an empty object is falsy: rare, left to Python */
    x = obj_or_none(P, get(P, root, b));
    if (x == FB) return FB;
    if (x >= 0) return P->nodes[x].count ? x : FB;
    return ABSENT;
}

#define MAX_ROWS 64

typedef struct {
    int nrows, ncols;
    int pk_col, ek_col; /* columns holding the patient/encounter reference */
    ref pk, ek;
    cell cells[MAX_ROWS][MAX_COLS];
    long comp[MAX_ROWS]; /* component index of the row's key, -1 for the resource's own */
} rows_t;

/* Observation -> rows (components with a value first, then the resource's own row) */
static int flat_observation(parser *P, int root, rows_t *R) {
    int cats, comps, x, own;
    cell category = NONE_CELL, effective = NONE_CELL, num, unit, vcode, sys, code, disp;
    R->ncols = KIND_NCOLS[K_OBSERVATION];
    R->nrows = 0;
    if (ref_of(P, rget(P, root, RK_subject), "Patient", &R->pk) == FB) return FB;
    x = first_object(P, root, "encounter", "context");
    if (x == FB) return FB;
    if (ref_of(P, x, "Encounter", &R->ek) == FB) return FB;
    cats = rget(P, root, RK_category);
    if (!is_none(P, cats)) {
        if (P->nodes[cats].type != J_ARR) return FB;
        if (P->nodes[cats].count) {
            int c0 = P->nodes[cats].child, codings;
            if (P->nodes[c0].type != J_OBJ) return FB;
            codings = get(P, c0, "coding");
            if (!is_none(P, codings) && (P->nodes[codings].type != J_ARR)) return FB;
            if (!is_none(P, codings) && P->nodes[codings].count) {
                int k0 = P->nodes[codings].child;
                if (P->nodes[k0].type != J_OBJ) return FB;
                if (str_cell(P, get(P, k0, "code"), &category) == FB) return FB;
            } else if (dropped_text(P, get(P, c0, "text"), &category, 0) == FB) {
                return FB;
            }
        }
    }
    x = rget(P, root, RK_effectiveDateTime);
    if (!is_none(P, x)) {
        if (ts_cell(P, x, &effective) == FB) return FB;
    } else {
        x = rget(P, root, RK_effectivePeriod);
        if (!is_none(P, x)) return FB; /* periods and instants: Python */
        x = rget(P, root, RK_effectiveInstant);
        if (!is_none(P, x)) return FB;
    }
    own = obs_value(P, root, &num, &unit, &vcode);
    if (own == FB) return FB;
    comps = rget(P, root, RK_component);
    if (!is_none(P, comps) && (P->nodes[comps].type != J_ARR)) return FB;
    if (!is_none(P, comps) && P->nodes[comps].count) {
        long i = 0;
        for (x = P->nodes[comps].child; x >= 0; x = P->nodes[x].next, i++) {
            cell cn, cu, cv, cs, cc, cd;
            int r = P->nodes[x].type == J_OBJ ? obs_value(P, x, &cn, &cu, &cv) : FB;
            if (r == FB) return FB;
            if (r == 0) continue;
            if (concept(P, get(P, x, "code"), &cs, &cc, &cd) == FB) return FB;
            if (R->nrows >= MAX_ROWS - 1) return FB;
            R->comp[R->nrows] = i;
            R->cells[R->nrows][3] = category;
            R->cells[R->nrows][4] = cs;
            R->cells[R->nrows][5] = cc;
            R->cells[R->nrows][6] = cd;
            R->cells[R->nrows][7] = effective;
            R->cells[R->nrows][8] = cn;
            R->cells[R->nrows][9] = cu;
            R->cells[R->nrows][10] = cv;
            R->nrows++;
        }
        if (own == 0) return 0;
    }
    if (concept(P, rget(P, root, RK_code), &sys, &code, &disp) == FB) return FB;
    R->comp[R->nrows] = -1;
    R->cells[R->nrows][3] = category;
    R->cells[R->nrows][4] = sys;
    R->cells[R->nrows][5] = code;
    R->cells[R->nrows][6] = disp;
    R->cells[R->nrows][7] = effective;
    R->cells[R->nrows][8] = num;
    R->cells[R->nrows][9] = unit;
    R->cells[R->nrows][10] = vcode;
    R->nrows++;
    return 0;
}

static int flat_encounter(parser *P, int root, rows_t *R) {
    int cls, types, period, x;
    cell *c = R->cells[0];
    R->ncols = KIND_NCOLS[K_ENCOUNTER];
    R->nrows = 1;
    R->comp[0] = -1;
    R->ek.some = 0;
    if (ref_of(P, rget(P, root, RK_subject), "Patient", &R->pk) == FB) return FB;
    if (str_cell(P, rget(P, root, RK_status), &c[2]) == FB) return FB;
    cls = obj_or_none(P, rget(P, root, RK_class)); /* a list is the R5 shape: Python */
    if (cls == FB) return FB;
    c[3] = NONE_CELL;
    if (cls >= 0 && P->nodes[cls].count && str_cell(P, get(P, cls, "code"), &c[3]) == FB) return FB;
    c[4] = c[5] = NONE_CELL;
    types = rget(P, root, RK_type);
    if (!is_none(P, types)) {
        if (P->nodes[types].type != J_ARR) return FB;
        if (P->nodes[types].count) {
            int t0 = P->nodes[types].child, codings;
            if (P->nodes[t0].type != J_OBJ) return FB;
            codings = get(P, t0, "coding");
            if (!is_none(P, codings) && P->nodes[codings].type != J_ARR) return FB;
            if (!is_none(P, codings) && P->nodes[codings].count) {
                int k0 = P->nodes[codings].child;
                if (P->nodes[k0].type != J_OBJ) return FB;
                if (str_cell(P, get(P, k0, "code"), &c[4]) == FB) return FB;
                if (str_cell(P, get(P, k0, "display"), &c[5]) == FB) return FB;
            }
            if (c[5].kind == V_NONE && dropped_text(P, get(P, t0, "text"), &c[5], 1) == FB) return FB;
        }
    }
    c[6] = c[7] = NONE_CELL;
    period = first_object(P, root, "period", "actualPeriod");
    if (period == FB) return FB;
    if (period >= 0) {
        x = get(P, period, "start");
        if (!is_none(P, x) && ts_cell(P, x, &c[6]) == FB) return FB;
        x = get(P, period, "end");
        if (!is_none(P, x) && ts_cell(P, x, &c[7]) == FB) return FB;
    }
    return 0;
}

static int flat_condition(parser *P, int root, rows_t *R) {
    int x;
    cell *c = R->cells[0];
    R->ncols = KIND_NCOLS[K_CONDITION];
    R->nrows = 1;
    R->comp[0] = -1;
    if (concept(P, rget(P, root, RK_code), &c[3], &c[4], &c[5]) == FB) return FB;
    c[7] = NONE_CELL;
    x = rget(P, root, RK_onsetDateTime);
    if (!is_none(P, x)) {
        if (ts_cell(P, x, &c[7]) == FB) return FB;
    } else {
        x = rget(P, root, RK_onsetPeriod);
        if (!is_none(P, x)) return FB;
    }
    x = first_object(P, root, "encounter", "context");
    if (x == FB) return FB;
    if (ref_of(P, rget(P, root, RK_subject), "Patient", &R->pk) == FB) return FB;
    if (ref_of(P, x, "Encounter", &R->ek) == FB) return FB;
    if (first_code(P, rget(P, root, RK_clinicalStatus), &c[6]) == FB) return FB;
    return 0;
}

/* ---- MedicationRequest and Procedure: the rows of their built-in ViewDefinitions (views.BUILTIN_VIEWS), which
 * never read a CodeableConcept's text. Conservative: an empty string, a second choice of a [x] element, a
 * medicationReference, an R5 shape: the line goes to Python (the view decides). */

/* a string member: None (absent/null), a non-empty plain string, else FB */
static int sstr(parser *P, int i, cell *out) {
    if (str_cell(P, i, out) == FB) return FB;
    if (out->kind == V_SPAN && out->len == 0) return FB;
    return 0;
}

/* cc.preferredCoding() -> system.systemAlias(), code, display (no text fallback) */
static int pref_coding(parser *P, int cc, cell *sys, cell *code, cell *disp) {
    int codings, best = -1, c;
    *sys = *code = *disp = NONE_CELL;
    cc = obj_or_none(P, cc);
    if (cc == FB) return FB;
    if (cc == ABSENT || P->nodes[cc].count == 0) return 0;
    codings = get(P, cc, "coding");
    if (is_none(P, codings)) return 0;
    if (P->nodes[codings].type != J_ARR) return FB;
    if (P->nodes[codings].count == 0) return 0;
    if (P->nodes[codings].count == 1) {
        best = P->nodes[codings].child;
        if (P->nodes[best].type != J_OBJ) return FB;
    } else {
        int rank = 99;
        for (c = P->nodes[codings].child; c >= 0; c = P->nodes[c].next) {
            int s, r = 99;
            if (P->nodes[c].type != J_OBJ) return FB;
            s = get(P, c, "system");
            if (!is_none(P, s)) {
                if (P->nodes[s].type != J_STR || P->nodes[s].esc) return FB;
                r = system_code(P, s);
                if (r < 0) r = 99;
            }
            if (r < rank) {
                best = c;
                rank = r;
            }
        }
        if (best < 0) best = P->nodes[codings].child;
    }
    {
        int s = get(P, best, "system");
        if (sstr(P, s, sys) == FB) return FB;
        if (sys->kind == V_SPAN) {
            int sc = system_code(P, s);
            if (sc >= 0) {
                sys->kind = V_CONST;
                sys->cidx = sc;
            }
        }
        if (sstr(P, get(P, best, "code"), code) == FB) return FB;
        if (sstr(P, get(P, best, "display"), disp) == FB) return FB;
    }
    return 0;
}

/* cc.coding.first().code (the text is never read) */
static int code_of_first(parser *P, int cc, cell *out) {
    int codings, c0;
    *out = NONE_CELL;
    cc = obj_or_none(P, cc);
    if (cc == FB) return FB;
    if (cc == ABSENT) return 0;
    codings = get(P, cc, "coding");
    if (is_none(P, codings)) return 0;
    if (P->nodes[codings].type != J_ARR) return FB;
    if (P->nodes[codings].count == 0) return 0;
    c0 = P->nodes[codings].child;
    if (P->nodes[c0].type != J_OBJ) return FB;
    return sstr(P, get(P, c0, "code"), out);
}

/* a checked dateTime's datePrecision() */
static void precision_of(parser *P, int i, cell *out) {
    uint32_t n = P->nodes[i].len;
    out->kind = V_CONST;
    out->cidx = n == 4 ? C_YEAR : n == 7 ? C_MONTH : n == 10 ? C_DAY : C_SECOND;
}

/* a timestamp member (not None) with its precision */
static int ts_prec(parser *P, int i, cell *ts, cell *prec) {
    if (ts_cell(P, i, ts) == FB) return FB;
    if (P->nodes[i].len < 4 || (P->nodes[i].len > 4 && P->nodes[i].len < 7)) return FB;
    if (prec) precision_of(P, i, prec);
    return 0;
}

static int flat_medreq(parser *P, int root, rows_t *R) {
    int x, k;
    cell *c = R->cells[0];
    R->ncols = KIND_NCOLS[K_MEDREQ];
    R->nrows = 1;
    R->comp[0] = -1;
    for (k = 0; k < R->ncols; k++) c[k] = NONE_CELL;
    if (ref_of(P, rget(P, root, RK_subject), "Patient", &R->pk) == FB) return FB;
    if (ref_of(P, rget(P, root, RK_encounter), "Encounter", &R->ek) == FB) return FB;
    if (sstr(P, rget(P, root, RK_status), &c[3]) == FB) return FB;
    if (sstr(P, rget(P, root, RK_intent), &c[4]) == FB) return FB;
    x = rget(P, root, RK_category);
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_ARR) return FB;
        if (P->nodes[x].count) {
            int c0 = P->nodes[x].child;
            if (P->nodes[c0].type != J_OBJ) return FB;
            if (code_of_first(P, c0, &c[5]) == FB) return FB;
        }
    }
    if (!is_none(P, rget(P, root, RK_medication)) || !is_none(P, rget(P, root, RK_medicationReference))) return FB;
    x = rget(P, root, RK_medicationCodeableConcept);
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_OBJ || P->nodes[x].count == 0) return FB;
        if (pref_coding(P, x, &c[6], &c[7], &c[8]) == FB) return FB;
    }
    x = rget(P, root, RK_authoredOn);
    if (!is_none(P, x) && ts_prec(P, x, &c[10], &c[11]) == FB) return FB;
    x = rget(P, root, RK_dosageInstruction);
    if (!is_none(P, x)) {
        int d0, dr, r0, q, v;
        if (P->nodes[x].type != J_ARR) return FB;
        if (P->nodes[x].count == 0) return 0;
        d0 = P->nodes[x].child;
        if (P->nodes[d0].type != J_OBJ) return FB;
        dr = get(P, d0, "doseAndRate");
        if (is_none(P, dr)) return 0;
        if (P->nodes[dr].type != J_ARR) return FB;
        if (P->nodes[dr].count == 0) return 0;
        r0 = P->nodes[dr].child;
        if (P->nodes[r0].type != J_OBJ) return FB;
        if (!is_none(P, get(P, r0, "dose"))) return FB;
        q = get(P, r0, "doseQuantity");
        if (is_none(P, q)) return 0;
        if (P->nodes[q].type != J_OBJ) return FB;
        v = get(P, q, "value");
        if (!is_none(P, v)) {
            if (P->nodes[v].type != J_NUM) return FB;
            if (num_value(P, v, &c[12].d) == FB) return FB;
            c[12].kind = V_DBL;
        }
        {
            cell sys, code, unit;
            if (sstr(P, get(P, q, "system"), &sys) == FB || sstr(P, get(P, q, "code"), &code) == FB ||
                sstr(P, get(P, q, "unit"), &unit) == FB)
                return FB;
            if (sys.kind == V_SPAN && sys.len == 25 && memcmp(P->s + sys.off, "http://unitsofmeasure.org", 25) == 0 &&
                code.kind != V_NONE)
                c[13] = code;
            else
                c[13] = unit;
        }
    }
    return 0;
}

static int flat_procedure(parser *P, int root, rows_t *R) {
    int x, pdt, pp, k;
    cell *c = R->cells[0];
    R->ncols = KIND_NCOLS[K_PROCEDURE];
    R->nrows = 1;
    R->comp[0] = -1;
    for (k = 0; k < R->ncols; k++) c[k] = NONE_CELL;
    if (ref_of(P, rget(P, root, RK_subject), "Patient", &R->pk) == FB) return FB;
    if (ref_of(P, rget(P, root, RK_encounter), "Encounter", &R->ek) == FB) return FB;
    if (sstr(P, rget(P, root, RK_status), &c[3]) == FB) return FB;
    if (pref_coding(P, rget(P, root, RK_code), &c[4], &c[5], &c[6]) == FB) return FB;
    x = rget(P, root, RK_category); /* R4: one CodeableConcept (a list is the R5 shape: Python) */
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_OBJ) return FB;
        if (code_of_first(P, x, &c[7]) == FB) return FB;
    }
    if (!is_none(P, rget(P, root, RK_performed)) || !is_none(P, rget(P, root, RK_performedString)) ||
        !is_none(P, rget(P, root, RK_performedAge)) || !is_none(P, rget(P, root, RK_performedRange)))
        return FB;
    pdt = rget(P, root, RK_performedDateTime);
    pp = rget(P, root, RK_performedPeriod);
    if (!is_none(P, pdt)) {
        if (!is_none(P, pp)) return FB;
        if (ts_prec(P, pdt, &c[8], &c[10]) == FB) return FB;
    } else if (!is_none(P, pp)) {
        if (P->nodes[pp].type != J_OBJ) return FB;
        x = get(P, pp, "start");
        if (!is_none(P, x) && ts_prec(P, x, &c[8], &c[10]) == FB) return FB;
        x = get(P, pp, "end");
        if (!is_none(P, x) && ts_prec(P, x, &c[9], NULL) == FB) return FB;
    }
    return 0;
}


/* ---------------------------------------------------------------------------------------------- */
/* Patient (flatteners.make_flatteners: patient; identifiers as normalize.collect_identifiers)     */
/* ---------------------------------------------------------------------------------------------- */
static const char *US_CORE_RACE = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-race";
static const char *US_CORE_ETHNICITY = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-ethnicity";
static const char *US_CORE_BIRTHSEX = "http://hl7.org/fhir/us/core/StructureDefinition/us-core-birthsex";

static inline int span_is(parser *P, int i, const char *t) {
    size_t l = strlen(t);
    return P->nodes[i].len == l && memcmp(P->s + P->nodes[i].off, t, l) == 0;
}

/* days since 1970-01-01 of a proleptic Gregorian date (checked by the caller) */
static long long civil_days(int y, int mo, int d) {
    long long yy = y - (mo <= 2), era = yy / 400, yoe = yy - era * 400;
    long long doy = (153 * (mo + (mo > 2 ? -3 : 9)) + 2) / 5 + d - 1, doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    return era * 146097 + doe - 719468;
}

/* YYYY, YYYY-MM or YYYY-MM-DD (ASCII digits, a valid calendar date, year >= 1): its days and the number of
 * parts (1..3); -1 otherwise */
static int date_part(const uint8_t *s, uint32_t n, long long *days) {
    int y, mo = 1, d = 1, dim, parts = 1;
    if (n != 4 && n != 7 && n != 10) return -1;
    y = dig(s, 0) * 1000 + dig(s, 1) * 100 + dig(s, 2) * 10 + dig(s, 3);
    if (y < 1) return -1;
    if (n >= 7) {
        if (s[4] != '-') return -1;
        mo = dig(s, 5) * 10 + dig(s, 6);
        parts = 2;
    }
    if (n == 10) {
        if (s[7] != '-') return -1;
        d = dig(s, 8) * 10 + dig(s, 9);
        parts = 3;
    }
    if (mo < 1 || mo > 12 || d < 1) return -1;
    dim = DIM[mo];
    if (mo == 2 && ((y % 4 == 0 && y % 100 != 0) || y % 400 == 0)) dim = 29;
    if (d > dim) return -1;
    *days = civil_days(y, mo, d);
    return parts;
}

/* omb_display(ext): display (or code) of the first ombCategory sub-extension */
static int omb_cell(parser *P, int ext, cell *out) {
    int subs = get(P, ext, "extension"), c;
    *out = NONE_CELL;
    if (is_none(P, subs)) return 0;
    if (P->nodes[subs].type != J_ARR) return FB;
    for (c = P->nodes[subs].child; c >= 0; c = P->nodes[c].next) {
        int u, vc;
        if (P->nodes[c].type != J_OBJ) return FB;
        u = get(P, c, "url");
        if (is_none(P, u)) continue;
        if (P->nodes[u].type != J_STR || P->nodes[u].esc) return FB;
        if (!span_is(P, u, "ombCategory")) continue;
        vc = obj_or_none(P, get(P, c, "valueCoding"));
        if (vc == FB) return FB;
        if (vc == ABSENT) return 0;
        if (str_cell(P, get(P, vc, "display"), out) == FB) return FB;
        if (out->kind == V_NONE || span_empty(out))
            if (str_cell(P, get(P, vc, "code"), out) == FB) return FB;
        return 0;
    }
    return 0;
}

static int flat_patient(parser *P, int root, rows_t *R) {
    int x, c;
    cell *k = R->cells[0];
    R->ncols = KIND_NCOLS[K_PATIENT];
    R->nrows = 1;
    R->comp[0] = -1;
    R->pk.some = R->ek.some = 0;
    for (c = 0; c < R->ncols; c++) k[c] = NONE_CELL;
    if (str_cell(P, rget(P, root, RK_gender), &k[1]) == FB) return FB;
    if (k[1].kind == V_SPAN) {
        const uint8_t *g = P->s + k[1].off;
        uint32_t n = k[1].len;
        if (!((n == 4 && memcmp(g, "male", 4) == 0) || (n == 6 && memcmp(g, "female", 6) == 0) ||
              (n == 5 && memcmp(g, "other", 5) == 0) || (n == 7 && memcmp(g, "unknown", 7) == 0)))
            return FB; /* invalid: Python quarantines it */
    }
    x = rget(P, root, RK_birthDate);
    if (!is_none(P, x)) {
        int parts;
        if (P->nodes[x].type != J_STR || P->nodes[x].esc) return FB;
        parts = date_part(P->s + P->nodes[x].off, P->nodes[x].len, &k[2].i);
        if (parts < 0) return FB;
        k[2].kind = V_DATE;
        k[3].kind = V_CONST;
        k[3].cidx = parts == 1 ? C_YEAR : parts == 2 ? C_MONTH : C_DAY;
    }
    k[4].kind = V_BOOL;
    k[4].i = 0;
    x = rget(P, root, RK_deceasedBoolean);
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_TRUE && P->nodes[x].type != J_FALSE) return FB;
        k[4].i = P->nodes[x].type == J_TRUE;
    }
    x = rget(P, root, RK_deceasedDateTime);
    if (!is_none(P, x)) {
        const uint8_t *s;
        uint32_t n;
        long long us;
        if (P->nodes[x].type != J_STR || P->nodes[x].esc) return FB;
        s = P->s + P->nodes[x].off;
        n = P->nodes[x].len;
        /* the common shapes only (a date, or a canonical dateTime); the others: Python */
        if (n == 20 || n == 25) {
            if (!canonical_dt(s, n) || dt_micros(s, n, &us) < 0 || date_part(s, 10, &k[5].i) != 3) return FB;
        } else if (date_part(s, n, &k[5].i) < 0) {
            return FB;
        }
        k[5].kind = V_DATE;
        k[4].i = 1;
    }
    x = rget(P, root, RK_extension);
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_ARR) return FB;
        for (c = P->nodes[x].child; c >= 0; c = P->nodes[c].next) {
            int u;
            if (P->nodes[c].type != J_OBJ) return FB;
            u = get(P, c, "url");
            if (is_none(P, u)) continue;
            if (P->nodes[u].type != J_STR || P->nodes[u].esc) return FB;
            if (span_is(P, u, US_CORE_RACE)) {
                if (k[6].kind == V_NONE && omb_cell(P, c, &k[6]) == FB) return FB;
            } else if (span_is(P, u, US_CORE_ETHNICITY)) {
                if (k[7].kind == V_NONE && omb_cell(P, c, &k[7]) == FB) return FB;
            } else if (span_is(P, u, US_CORE_BIRTHSEX)) {
                if (str_cell(P, get(P, c, "valueCode"), &k[8]) == FB) return FB; /* the last one wins */
            }
        }
    }
    if (first_code_k(P, rget(P, root, RK_maritalStatus), &k[9], 0) == FB) return FB; /* its text: never */
    x = rget(P, root, RK_address);
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_ARR) return FB;
        if (P->nodes[x].count) {
            int a0 = P->nodes[x].child;
            if (P->nodes[a0].type != J_OBJ) return FB;
            if (str_cell(P, get(P, a0, "state"), &k[10]) == FB) return FB;
        }
    }
    return 0;
}

/* identifier kinds (IK_*), and a flag: the value is in the Prepared's arena, not in the line */
enum { IK_IDENTIFIER, IK_NAME, IK_FAMILY, IK_ADDRESS, IK_TELECOM, N_IK };
static const char *IK_TEXT[N_IK] = {"identifier", "name", "family", "address", "telecom"};
#define IK_ARENA 0x100

/* identifier values of a resource (collect_identifiers): 0 ok, FB */
static int check_identifiers(parser *P, int root, int *ident) {
    int c;
    *ident = rget(P, root, RK_identifier);
    if (is_none(P, *ident)) {
        *ident = ABSENT;
        return 0;
    }
    if (P->nodes[*ident].type != J_ARR) return FB;
    for (c = P->nodes[*ident].child; c >= 0; c = P->nodes[c].next) {
        int v;
        if (P->nodes[c].type != J_OBJ) return FB;
        v = get(P, c, "value");
        if (!is_none(P, v) && (P->nodes[v].type != J_STR || P->nodes[v].esc)) return FB;
    }
    return 0;
}

static int add_identifier(PyObject *chunk, PyObject *value, PyObject *kind) {
    return PyDict_SetDefault(chunk, value, kind) ? 0 : -1; /* borrowed */
}

/* An identifier into a Columns("ss") sink (value, kind) as UTF-8 bytes: no Python object per value (the
 * session deduplicates the sink's Arrow arrays when it spills, first kind wins). */
static int add_identifier_cols(Columns *C, const uint8_t *v, size_t n, const char *kind) {
    Py_ssize_t r = C->nrows;
    colmark m[MAX_COLS];
    cols_mark(C, m);
    if (col_str(&C->cols[0], r, v, n) < 0 || col_str(&C->cols[1], r, kind, strlen(kind)) < 0) {
        cols_rollback(C, m);
        return -1;
    }
    C->nrows++;
    return 0;
}

/* ---------------------------------------------------------------------------------------------- */
/* Two phases per block. prepare (a helper thread, GIL released): parse, flatten and key every line;  */
/* nothing of Python is touched. commit (the ingest thread, GIL held): the checks against the        */
/* session's state (validation sample, known patients, duplicate ids) and the side effects, in line  */
/* order, handing a line to the Python loop exactly where the one-phase loop would.                  */
/* ---------------------------------------------------------------------------------------------- */
typedef struct {
    int status; /* 0 plain, FB */
    const uint8_t *s;
    uint32_t rid_off, rid_len;
    int32_t ident0, nident; /* identifier value spans: idents[2*ident0 ...] */
    int32_t row0, nrows;    /* rows[row0 ...] */
    int pk_col, ek_col, has_pk, has_ek;
    char pk[32], ek[32];
    uint64_t idh[2];  /* the id's idset_hash: hashed here, off the commit's thread */
    uint64_t pkid[2]; /* the idset_hash of the patient key (of the row's own key for a Patient): for an IdSet of keys */
} linerec;

static void idset_hash(const uint8_t *p, size_t len, uint64_t h[2]);

typedef struct {
    char key[32];
    cell cells[MAX_COLS];
} rowrec;

typedef struct Prepared_s {
    PyObject_HEAD
    PyObject *block;
    Py_ssize_t n;
    int kind, ncols, oom;
    linerec *lines;
    rowrec *rows;
    size_t nrows, caprows;
    uint32_t *idents; /* (offset, length, IK_* | IK_ARENA) per identifier value */
    size_t nidents, capidents;
    gbuf arena; /* identifier values built here (a Patient's joined name) */
    const uint8_t **ptr; /* each line's bytes (into the block's bytes objects, or into the one chunk) */
    size_t *len;
    const uint8_t *cs; /* the chunk (a bytes or memoryview block): split into lines by prepare_run */
    Py_ssize_t cn;
    int chunk;         /* the block is one chunk of lines (else a list of lines, held as a tuple) */
    Py_buffer view;    /* a memoryview block's buffer, exported for the Prepared's life (view.obj set) */
    PyObject *owner;   /* the Flattener whose prepare runs on the worker thread (start), or the PreparePool
                        * whose workers prepare it (pooled), else NULL */
    int pooled;        /* started by a PreparePool: queued, then prepared by one of its workers */
    int taken;         /* pooled: a worker has taken it off the queue (read and written under the pool's mutex) */
    struct Prepared_s *next; /* pooled: the next block in the pool's queue */
    pthread_t th;
    long pid;          /* the process that started the worker (a forked child has no such thread) */
    int running;       /* 1: a worker thread is preparing this block, 2: a thread is joining it; 0: done */
    int finished;      /* set by the worker thread as it ends (read with __atomic_load) */
    int forked;        /* started in the process this one was forked from: never prepared here */
    size_t sc_bytes[3]; /* the sizes of lines, ptr and len (from scratch_calloc) */
} Prepared;

static int prepared_join(Prepared *Q);
static PyObject *Prepared_wait(Prepared *Q, PyObject *noarg);

/* PreparePool: worker threads of the module's own (one per flattener, never the GIL) that prepare started
 * blocks in the order they were started (see Pool_start) */
#define POOL_MAX 16
typedef struct Pool_s Pool;
typedef struct {
    Pool *P;
    int k;
} pool_arg;
struct Pool_s {
    PyObject_HEAD
    int n;                  /* workers: one per flattener */
    PyObject *flats[POOL_MAX]; /* worker k prepares with flats[k] (its parser and reference caches) */
    pool_arg args[POOL_MAX];
    pthread_t th[POOL_MAX];
    int nth;                /* worker threads running in this process */
    int stop, closed, sync; /* sync: no thread could be started, blocks are prepared in start */
    long pid;               /* the process whose threads these are (a forked child starts its own) */
    pthread_mutex_t mu;
    pthread_cond_t work, done;
    Prepared *head, *tail;  /* blocks started and not yet taken by a worker, oldest first */
};

/* Per-block arrays, recycled: a dropped Prepared's line table and rows go back to a small stash, and the
 * next block's prepare takes them, so their pages stay mapped (fresh 2-4 MB arrays per 4 MiB block cost
 * page faults and realloc copies: ~2 % of an ingest's CPU). The stash is taken with trylock only, so a
 * thread never waits on it (nor does a forked child whose parent held it: it then allocates afresh);
 * scratch_release() empties it (the session calls it when an ingest ends). */
enum { SC_LINES, SC_PTR, SC_LEN, SC_ROWS, SC_IDENTS, N_SC };
#define SC_SLOTS 4
static struct {
    void *p;
    size_t bytes;
} scratch[N_SC][SC_SLOTS];
static int n_scratch[N_SC];
static pthread_mutex_t scratch_mu = PTHREAD_MUTEX_INITIALIZER;

/* a stashed array of kind k (its size in bytes in *bytes), or NULL with *bytes 0 */
static void *scratch_take(int k, size_t *bytes) {
    void *p = NULL;
    *bytes = 0;
    if (pthread_mutex_trylock(&scratch_mu) != 0) return NULL;
    if (n_scratch[k] > 0) {
        n_scratch[k]--;
        p = scratch[k][n_scratch[k]].p;
        *bytes = scratch[k][n_scratch[k]].bytes;
    }
    pthread_mutex_unlock(&scratch_mu);
    return p;
}

/* hand an array back (freed when the stash is full or busy) */
static void scratch_give(int k, void *p, size_t bytes) {
    if (!p) return;
    if (bytes && pthread_mutex_trylock(&scratch_mu) == 0) {
        if (n_scratch[k] < SC_SLOTS) {
            scratch[k][n_scratch[k]].p = p;
            scratch[k][n_scratch[k]].bytes = bytes;
            n_scratch[k]++;
            p = NULL;
        }
        pthread_mutex_unlock(&scratch_mu);
    }
    free(p);
}

/* n zeroed elements of `size` bytes, from the stash where one is large enough; its size in *bytes */
static void *scratch_calloc(int k, size_t n, size_t size, size_t *bytes) {
    size_t need = (n ? n : 1) * size;
    void *p = scratch_take(k, bytes);
    if (p && *bytes >= need) {
        memset(p, 0, need);
        return p;
    }
    free(p);
    p = calloc(n ? n : 1, size);
    *bytes = p ? need : 0;
    return p;
}

static void scratch_release(void) {
    int k;
    pthread_mutex_lock(&scratch_mu);
    for (k = 0; k < N_SC; k++)
        while (n_scratch[k] > 0) {
            n_scratch[k]--;
            free(scratch[k][n_scratch[k]].p);
        }
    pthread_mutex_unlock(&scratch_mu);
}

static void Prepared_dealloc(Prepared *Q) {
    {   /* a block dropped while it is being prepared: wait for the worker, which uses it (any error it
         * reports is dropped with the block; an exception being raised stays as it was) */
        PyObject *et, *ev, *tb;
        PyErr_Fetch(&et, &ev, &tb);
        if (Q->running == 1 && Q->pooled && Q->pid == (long)getpid()) { /* not taken yet: out of the queue */
            Pool *P = (Pool *)Q->owner;
            pthread_mutex_lock(&P->mu);
            if (!Q->taken) {
                Prepared **at = &P->head, *prev = NULL;
                while (*at && *at != Q) {
                    prev = *at;
                    at = &(*at)->next;
                }
                if (*at) {
                    *at = Q->next;
                    if (P->tail == Q) P->tail = prev;
                }
                Q->finished = 1;
            }
            pthread_mutex_unlock(&P->mu);
        }
        prepared_join(Q);
        PyErr_Restore(et, ev, tb);
    }
    if (Q->view.obj) PyBuffer_Release(&Q->view);
    Py_XDECREF(Q->block);
    scratch_give(SC_LINES, Q->lines, Q->sc_bytes[SC_LINES]);
    scratch_give(SC_PTR, (void *)Q->ptr, Q->sc_bytes[SC_PTR]);
    scratch_give(SC_LEN, Q->len, Q->sc_bytes[SC_LEN]);
    scratch_give(SC_ROWS, Q->rows, Q->caprows * sizeof(rowrec));
    scratch_give(SC_IDENTS, Q->idents, Q->capidents * sizeof(uint32_t));
    free(Q->arena.p);
    Py_TYPE(Q)->tp_free((PyObject *)Q);
}

/* line(i) -> bytes: line i of the block (for the Python loop, which takes the lines the commit leaves) */
static PyObject *Prepared_line(Prepared *Q, PyObject *arg) {
    Py_ssize_t i = PyLong_AsSsize_t(arg);
    if (i == -1 && PyErr_Occurred()) return NULL;
    if (prepared_join(Q) == -1) return NULL;
    if (i < 0 || i >= Q->n) {
        PyErr_SetString(PyExc_IndexError, "line index out of range");
        return NULL;
    }
    if (PyTuple_Check(Q->block)) return Py_NewRef(PyTuple_GET_ITEM(Q->block, i));
    return PyBytes_FromStringAndSize((const char *)Q->ptr[i], (Py_ssize_t)Q->len[i]);
}

static PyObject *Prepared_get_done(Prepared *Q, void *closure) {
    return PyBool_FromLong(!Q->running || __atomic_load_n(&Q->finished, __ATOMIC_ACQUIRE));
}

static PyGetSetDef Prepared_getset[] = {
    {"done", (getter)Prepared_get_done, NULL, "True once the block is prepared (wait() will not block).", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static Py_ssize_t Prepared_len(Prepared *Q) {
    if (prepared_join(Q) == -1) return -1;
    return Q->n;
}

static PyMethodDef Prepared_methods[] = {
    {"line", (PyCFunction)Prepared_line, METH_O, "Line i of the block, as bytes."},
    {"wait", (PyCFunction)Prepared_wait, METH_NOARGS, "Join the thread of Flattener.start; returns self."},
    {NULL, NULL, 0, NULL}};
static PySequenceMethods Prepared_seq = {.sq_length = (lenfunc)Prepared_len};

static PyTypeObject PreparedType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "synthfactory.ingest._flatc.Prepared",
    .tp_basicsize = sizeof(Prepared),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A block parsed and flattened by Flattener.prepare, for Flattener.commit.",
    .tp_dealloc = (destructor)Prepared_dealloc,
    .tp_methods = Prepared_methods,
    .tp_getset = Prepared_getset,
    .tp_as_sequence = &Prepared_seq,
};

static int grow(void **p, size_t *cap, size_t need, size_t size) {
    if (need > *cap) {
        size_t c = *cap ? *cap * 2 : 1024;
        void *q;
        while (c < need) c *= 2;
        q = realloc(*p, c * size);
        if (!q) return -1;
        *p = q;
        *cap = c;
    }
    return 0;
}

/* one identifier value for the line being prepared: -1 out of memory */
static int push_ident(Prepared *Q, linerec *rec, uint32_t off, uint32_t len, uint32_t meta) {
    if (grow((void **)&Q->idents, &Q->capidents, 3 * (Q->nidents + 1), sizeof(uint32_t)) < 0) return -1;
    Q->idents[3 * Q->nidents] = off;
    Q->idents[3 * Q->nidents + 1] = len;
    Q->idents[3 * Q->nidents + 2] = meta;
    Q->nidents++;
    rec->nident++;
    return 0;
}

/* code points of validated UTF-8 */
static size_t cp_len(const uint8_t *s, uint32_t n) {
    size_t k, c = 0;
    for (k = 0; k < n; k++) c += (s[k] & 0xC0) != 0x80;
    return c;
}

/* a plain string member or None; FB for anything else */
static int plain_or_none(parser *P, int i) {
    if (is_none(P, i)) return ABSENT;
    if (P->nodes[i].type != J_STR || P->nodes[i].esc) return FB;
    return i;
}

/* a Patient's names, address lines and telecoms, in collect_identifiers' order and under its rules (any
 * shape it would stop at or skip: FB). 0, FB, -1 out of memory */
static int patient_idents(parser *P, Prepared *Q, linerec *rec, int root) {
    int x, c, e;
    x = rget(P, root, RK_name);
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_ARR) return FB;
        for (c = P->nodes[x].child; c >= 0; c = P->nodes[c].next) {
            int given, family, text, ngiven = 0, nparts = 0, first = -1;
            size_t cps = 0, bytes = 0;
            if (P->nodes[c].type != J_OBJ) return FB;
            given = get(P, c, "given");
            if (!is_none(P, given)) {
                if (P->nodes[given].type != J_ARR) return FB;
                for (e = P->nodes[given].child; e >= 0; e = P->nodes[e].next) {
                    if (P->nodes[e].type != J_STR || P->nodes[e].esc) return FB;
                    if (P->nodes[e].len == 0) continue;
                    ngiven++;
                }
            } else {
                given = ABSENT;
            }
            family = plain_or_none(P, get(P, c, "family"));
            if (family == FB) return FB;
            if (family >= 0 && P->nodes[family].len == 0) family = ABSENT;
            text = plain_or_none(P, get(P, c, "text"));
            if (text == FB) return FB;
            /* full = " ".join(given + [family]) */
            if (given >= 0)
                for (e = P->nodes[given].child; e >= 0; e = P->nodes[e].next)
                    if (P->nodes[e].len) {
                        if (first < 0) first = e;
                        cps += cp_len(P->s + P->nodes[e].off, P->nodes[e].len);
                        bytes += P->nodes[e].len;
                        nparts++;
                    }
            if (family >= 0) {
                if (first < 0) first = family;
                cps += cp_len(P->s + P->nodes[family].off, P->nodes[family].len);
                bytes += P->nodes[family].len;
                nparts++;
            }
            if (nparts) {
                cps += (size_t)(nparts - 1);
                bytes += (size_t)(nparts - 1);
            }
            if (nparts && (ngiven || cps >= 4)) {
                if (nparts == 1) {
                    if (push_ident(Q, rec, P->nodes[first].off, P->nodes[first].len, IK_NAME) < 0) return -1;
                } else {
                    size_t at = Q->arena.len;
                    int sep = 0;
                    if (bytes > (size_t)UINT32_MAX || gb_reserve(&Q->arena, bytes) < 0) return -1;
                    if (given >= 0)
                        for (e = P->nodes[given].child; e >= 0; e = P->nodes[e].next)
                            if (P->nodes[e].len) {
                                if (sep) Q->arena.p[Q->arena.len++] = ' ';
                                memcpy(Q->arena.p + Q->arena.len, P->s + P->nodes[e].off, P->nodes[e].len);
                                Q->arena.len += P->nodes[e].len;
                                sep = 1;
                            }
                    if (family >= 0) {
                        if (sep) Q->arena.p[Q->arena.len++] = ' ';
                        memcpy(Q->arena.p + Q->arena.len, P->s + P->nodes[family].off, P->nodes[family].len);
                        Q->arena.len += P->nodes[family].len;
                    }
                    if (push_ident(Q, rec, (uint32_t)at, (uint32_t)bytes, IK_NAME | IK_ARENA) < 0) return -1;
                }
            }
            if (family >= 0 && cp_len(P->s + P->nodes[family].off, P->nodes[family].len) >= 4)
                if (push_ident(Q, rec, P->nodes[family].off, P->nodes[family].len, IK_FAMILY) < 0) return -1;
            if (text >= 0 && P->nodes[text].len)
                if (push_ident(Q, rec, P->nodes[text].off, P->nodes[text].len, IK_NAME) < 0) return -1;
        }
    }
    x = rget(P, root, RK_address);
    if (!is_none(P, x)) { /* an array of objects (flat_patient checked it) */
        for (c = P->nodes[x].child; c >= 0; c = P->nodes[c].next) {
            int lines;
            if (P->nodes[c].type != J_OBJ) return FB;
            lines = get(P, c, "line");
            if (is_none(P, lines)) continue;
            if (P->nodes[lines].type != J_ARR) return FB;
            for (e = P->nodes[lines].child; e >= 0; e = P->nodes[e].next) {
                if (P->nodes[e].type != J_STR || P->nodes[e].esc) return FB;
                if (P->nodes[e].len && push_ident(Q, rec, P->nodes[e].off, P->nodes[e].len, IK_ADDRESS) < 0) return -1;
            }
        }
    }
    x = rget(P, root, RK_telecom);
    if (!is_none(P, x)) {
        if (P->nodes[x].type != J_ARR) return FB;
        for (c = P->nodes[x].child; c >= 0; c = P->nodes[c].next) {
            int v;
            if (P->nodes[c].type != J_OBJ) return FB;
            v = plain_or_none(P, get(P, c, "value"));
            if (v == FB) return FB;
            if (v >= 0 && P->nodes[v].len && push_ident(Q, rec, P->nodes[v].off, P->nodes[v].len, IK_TELECOM) < 0)
                return -1;
        }
    }
    return 0;
}

/* prepare one line into rec (no GIL): 0 plain, FB, -1 out of memory */
static int prepare_line(Flat *F, Prepared *Q, linerec *rec, const uint8_t *s, size_t n) {
    parser *P = &F->P;
    int root, x, ident, i, c;
    rows_t R;
    const char *rtype = KIND_TYPE[F->kind];
    size_t tl = strlen(rtype);

    rec->status = FB;
    if (n == 0 || n >= (size_t)INT32_MAX) return FB;
    P->s = s;
    P->n = n;
    P->pos = 0;
    P->nn = 0;
    P->odd = 0;
    P->dup = 0;
    P->root = -1;
    root = parse_value(P, 0);
    if (root == -2) return -1;
    if (root < 0 || P->odd) return FB;
    skip_ws(P);
    if (P->pos != P->n || P->nodes[root].type != J_OBJ) return FB;
    x = rget(P, root, RK_resourceType);
    if (x < 0 || P->nodes[x].type != J_STR || P->nodes[x].esc || P->nodes[x].len != tl ||
        memcmp(P->s + P->nodes[x].off, rtype, tl) != 0)
        return FB;
    x = rget(P, root, RK_id);
    if (x < 0 || P->nodes[x].type != J_STR || P->nodes[x].esc || P->nodes[x].len == 0) return FB;
    if (check_identifiers(P, root, &ident) == FB) return FB;
    switch (F->kind) {
    case K_OBSERVATION:
        R.pk_col = 1, R.ek_col = 2;
        if (flat_observation(P, root, &R) == FB) return FB;
        break;
    case K_ENCOUNTER:
        R.pk_col = 1, R.ek_col = -1;
        if (flat_encounter(P, root, &R) == FB) return FB;
        break;
    case K_MEDREQ:
        R.pk_col = 1, R.ek_col = 2;
        if (flat_medreq(P, root, &R) == FB) return FB;
        break;
    case K_PROCEDURE:
        R.pk_col = 1, R.ek_col = 2;
        if (flat_procedure(P, root, &R) == FB) return FB;
        break;
    case K_PATIENT:
        R.pk_col = -1, R.ek_col = -1;
        if (flat_patient(P, root, &R) == FB) return FB;
        break;
    default:
        R.pk_col = 1, R.ek_col = 2;
        if (flat_condition(P, root, &R) == FB) return FB;
        break;
    }
    if (P->dup) return FB;
    rec->s = s;
    rec->rid_off = P->nodes[x].off;
    rec->rid_len = P->nodes[x].len;
    idset_hash(s + rec->rid_off, rec->rid_len, rec->idh);
    rec->pk_col = R.pk_col;
    rec->ek_col = R.ek_col;
    rec->has_pk = 0;
    if (R.pk_col >= 0 && (rec->has_pk = ref_key(F, &R.pk, "Patient", &F->pcache, rec->pk)) < 0) return -1;
    if (rec->has_pk) idset_hash((const uint8_t *)rec->pk, 32, rec->pkid);
    rec->has_ek = 0;
    if (R.ek_col >= 0 && (rec->has_ek = ref_key(F, &R.ek, "Encounter", &F->ecache, rec->ek)) < 0) return -1;
    rec->ident0 = (int32_t)Q->nidents;
    rec->nident = 0;
    if (ident >= 0)
        for (c = P->nodes[ident].child; c >= 0; c = P->nodes[c].next) {
            int v = get(P, c, "value");
            if (is_none(P, v) || P->nodes[v].len == 0) continue;
            if (push_ident(Q, rec, P->nodes[v].off, P->nodes[v].len, IK_IDENTIFIER) < 0) return -1;
        }
    if (F->kind == K_PATIENT) {
        int r = patient_idents(P, Q, rec, root);
        if (r != 0) return r;
        if (P->dup) return FB;
    }
    if (grow((void **)&Q->rows, &Q->caprows, Q->nrows + (size_t)R.nrows, sizeof(rowrec)) < 0) return -1;
    rec->row0 = (int32_t)Q->nrows;
    rec->nrows = R.nrows;
    for (i = 0; i < R.nrows; i++) {
        rowrec *w = &Q->rows[Q->nrows++];
        if (key_hex(F, rtype, P->s + rec->rid_off, rec->rid_len, R.comp[i], w->key) < 0) return -1;
        memcpy(w->cells, R.cells[i], sizeof(cell) * (size_t)R.ncols);
    }
    if (F->kind == K_PATIENT && R.nrows) idset_hash((const uint8_t *)Q->rows[rec->row0].key, 32, rec->pkid);
    rec->status = 0;
    return 0;
}

/* prepare(block) -> Prepared: parse, flatten and key the block's lines with the GIL released. block: a list
 * of lines (bytes), or one bytes object of lines separated by newlines (split here, without the GIL: the
 * last line is the text after the last newline, so b"a\nb" is two lines and b"" one empty line). */
/* The work of a prepare, with no Python: split the chunk into lines (when the block is one), then parse,
 * flatten and key every line. Runs with the GIL released (prepare) or on a worker thread (start). */
static void prepare_run(Flat *F, Prepared *Q) {
    Py_ssize_t i;
    if (!Q->rows) { /* the rows and identifier spans start in arrays an earlier block left */
        size_t b;
        Q->rows = (rowrec *)scratch_take(SC_ROWS, &b);
        Q->caprows = b / sizeof(rowrec);
    }
    if (!Q->idents) {
        size_t b;
        Q->idents = (uint32_t *)scratch_take(SC_IDENTS, &b);
        Q->capidents = b / sizeof(uint32_t);
    }
    if (Q->chunk) { /* count the lines first: one more than the newlines */
        const uint8_t *s = Q->cs, *e = Q->cs + Q->cn, *q;
        Py_ssize_t nl = 0;
        for (q = s; q < e && (q = (const uint8_t *)memchr(q, '\n', (size_t)(e - q))) != NULL; q++) nl++;
        Q->n = nl + 1;
        Q->lines = (linerec *)scratch_calloc(SC_LINES, (size_t)Q->n, sizeof(linerec), &Q->sc_bytes[SC_LINES]);
        Q->ptr = (const uint8_t **)scratch_calloc(SC_PTR, (size_t)Q->n, sizeof(*Q->ptr), &Q->sc_bytes[SC_PTR]);
        Q->len = (size_t *)scratch_calloc(SC_LEN, (size_t)Q->n, sizeof(*Q->len), &Q->sc_bytes[SC_LEN]);
        if (!Q->lines || !Q->ptr || !Q->len) {
            Q->oom = 1;
            Q->n = 0; /* nothing to read back */
            return;
        }
        for (i = 0; i < Q->n; i++) {
            q = (const uint8_t *)memchr(s, '\n', (size_t)(e - s));
            if (!q) q = e;
            Q->ptr[i] = s;
            Q->len[i] = (size_t)(q - s);
            s = q + 1;
        }
    }
    for (i = 0; i < Q->n; i++) {
        Q->lines[i].status = FB;
        if (!Q->ptr[i]) continue;
        if (prepare_line(F, Q, &Q->lines[i], Q->ptr[i], Q->len[i]) == -1) {
            Q->lines[i].status = FB;
            Q->oom = 1;
            break;
        }
    }
}

/* A Prepared for ``block`` (GIL held): a list of bytes lines has its line table filled here; a chunk
 * (bytes, or a contiguous memoryview of bytes: no copy) is split by prepare_run. */
static Prepared *prepared_new_kind(int kind, PyObject *block);

static Prepared *prepared_new(Flat *F, PyObject *block) {
    if (F->busy) {
        PyErr_SetString(PyExc_RuntimeError, "one prepare at a time per Flattener");
        return NULL;
    }
    return prepared_new_kind(F->kind, block);
}

/* a Prepared of a block of `kind`'s lines, not yet prepared (GIL held) */
static Prepared *prepared_new_kind(int kind, PyObject *block) {
    Prepared *Q;
    Py_ssize_t i;
    const uint8_t *cs = NULL;
    Py_ssize_t cn = 0;
    if (PyBytes_CheckExact(block)) {
        cs = (const uint8_t *)PyBytes_AS_STRING(block);
        cn = PyBytes_GET_SIZE(block);
    } else if (PyMemoryView_Check(block)) {
        Py_buffer *view = PyMemoryView_GET_BUFFER(block);
        if (!PyBuffer_IsContiguous(view, 'C') || view->itemsize != 1 || view->obj == NULL ||
            !PyBytes_CheckExact(view->obj)) {
            PyErr_SetString(PyExc_TypeError, "a memoryview block must be a contiguous view of bytes");
            return NULL;
        }
    } else if (!PyList_Check(block)) {
        PyErr_SetString(PyExc_TypeError, "block must be a list, bytes or a memoryview of bytes");
        return NULL;
    }
    Q = PyObject_New(Prepared, &PreparedType);
    if (!Q) return NULL;
    /* everything the dealloc reads, first */
    Q->block = NULL;
    Q->view.obj = NULL;
    Q->owner = NULL;
    Q->pooled = Q->taken = 0;
    Q->next = NULL;
    Q->running = 0;
    Q->lines = NULL;
    Q->ptr = NULL;
    Q->len = NULL;
    Q->sc_bytes[0] = Q->sc_bytes[1] = Q->sc_bytes[2] = 0;
    Q->rows = NULL;
    Q->idents = NULL;
    Q->arena.p = NULL;
    Q->arena.len = Q->arena.cap = 0;
    Q->nrows = Q->caprows = 0;
    Q->nidents = Q->capidents = 0;
    Q->oom = 0;
    Q->finished = 0;
    Q->forked = 0;
    Q->n = 0;
    Q->chunk = !PyList_Check(block);
    /* what the prepare reads stays as it is until the Prepared goes: a list's lines are held as a tuple (the
     * caller may change its list), a memoryview's buffer is exported (it cannot be released under us) */
    if (PyList_Check(block)) {
        Q->block = PyList_AsTuple(block);
        if (!Q->block) {
            Py_DECREF(Q);
            return NULL;
        }
    } else {
        Q->block = Py_NewRef(block);
        if (PyMemoryView_Check(block)) {
            if (PyObject_GetBuffer(block, &Q->view, PyBUF_SIMPLE) < 0) {
                Py_DECREF(Q);
                return NULL;
            }
            cs = (const uint8_t *)Q->view.buf;
            cn = Q->view.len;
        }
    }
    Q->kind = kind;
    Q->ncols = KIND_NCOLS[kind];
    Q->cs = cs;
    Q->cn = cn;
    if (!Q->chunk) {
        Q->n = PyTuple_GET_SIZE(Q->block);
        Q->lines = (linerec *)scratch_calloc(SC_LINES, (size_t)Q->n, sizeof(linerec), &Q->sc_bytes[SC_LINES]);
        Q->ptr = (const uint8_t **)scratch_calloc(SC_PTR, (size_t)Q->n, sizeof(*Q->ptr), &Q->sc_bytes[SC_PTR]);
        Q->len = (size_t *)scratch_calloc(SC_LEN, (size_t)Q->n, sizeof(*Q->len), &Q->sc_bytes[SC_LEN]);
        if (!Q->lines || !Q->ptr || !Q->len) {
            Py_DECREF(Q);
            PyErr_NoMemory();
            return NULL;
        }
        for (i = 0; i < Q->n; i++) { /* the bytes stay alive: the Prepared holds them in its tuple */
            PyObject *raw = PyTuple_GET_ITEM(Q->block, i);
            if (PyBytes_CheckExact(raw)) {
                Q->ptr[i] = (const uint8_t *)PyBytes_AS_STRING(raw);
                Q->len[i] = (size_t)PyBytes_GET_SIZE(raw);
            }
        }
    }
    return Q;
}

/* prepare(block) -> Prepared: the block parsed, flattened and keyed on the calling thread, GIL released. */
static PyObject *Flat_prepare(Flat *F, PyObject *block) {
    Prepared *Q = prepared_new(F, block);
    if (!Q) return NULL;
    F->busy = 1;
    Py_BEGIN_ALLOW_THREADS
    prepare_run(F, Q);
    Py_END_ALLOW_THREADS
    F->busy = 0;
    if (Q->oom) {
        Py_DECREF(Q);
        return PyErr_NoMemory();
    }
    return (PyObject *)Q;
}

static void *prepare_thread(void *arg) {
    Prepared *Q = (Prepared *)arg;
    prepare_run((Flat *)Q->owner, Q);
    __atomic_store_n(&Q->finished, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Wait for a started prepare (GIL held on entry and exit, released while waiting). 0, or -1 with an exception
 * set: MemoryError when the prepare ran out of memory, RuntimeError for a Prepared started by the process this
 * one was forked from (its worker thread is not here). Only one thread joins; another that asks meanwhile waits
 * for it to finish (``running`` is read and written with the GIL held). */
static int prepared_join(Prepared *Q) {
    if (Q->running == 1 && Q->pooled) {
        if (Q->pid != (long)getpid()) {
            Q->running = 0;
            Py_CLEAR(Q->owner);
            Q->forked = 1;
        } else {
            Pool *P = (Pool *)Q->owner;
            Q->running = 2;
            Py_BEGIN_ALLOW_THREADS
            pthread_mutex_lock(&P->mu);
            while (!Q->finished) pthread_cond_wait(&P->done, &P->mu);
            pthread_mutex_unlock(&P->mu);
            Py_END_ALLOW_THREADS
            Q->running = 0;
            Py_CLEAR(Q->owner);
        }
    }
    if (Q->running == 1) {
        if (Q->pid != (long)getpid()) {
            Q->running = 0;
            ((Flat *)Q->owner)->busy = 0;
            Py_CLEAR(Q->owner);
            Q->forked = 1;
        } else {
            Q->running = 2;
            Py_BEGIN_ALLOW_THREADS
            pthread_join(Q->th, NULL);
            Py_END_ALLOW_THREADS
            Q->running = 0;
            ((Flat *)Q->owner)->busy = 0;
            Py_CLEAR(Q->owner);
        }
    }
    while (Q->running == 2) { /* another thread is joining it */
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
    }
    if (Q->forked) {
        PyErr_SetString(PyExc_RuntimeError, "this block was being prepared when the process forked");
        return -1;
    }
    if (Q->oom) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

/* start(block) -> Prepared: the same work as prepare, on a thread of its own that never takes the GIL,
 * so it runs beside the caller's Python and commits whatever they hold; wait() (or commit) joins it.
 * A thread handed from Python (a pool running prepare) would need the GIL to start and to finish each
 * block, and so wait for the ingest thread's commit: the two phases ran one after the other. */
static PyObject *Flat_start(Flat *F, PyObject *block) {
    Prepared *Q = prepared_new(F, block);
    if (!Q) return NULL;
    pthread_attr_t attr;
    sigset_t all, old;
    int with_attr, made;
    F->busy = 1;
    Q->owner = Py_NewRef((PyObject *)F);
    Q->pid = (long)getpid();
    /* a stack of its own size (the parse recurses up to MAX_DEPTH; musl's default is 128 KiB), and every signal
     * blocked in the worker, so that they reach the Python threads */
    with_attr = pthread_attr_init(&attr) == 0 && pthread_attr_setstacksize(&attr, 4u << 20) == 0;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    made = pthread_create(&Q->th, with_attr ? &attr : NULL, prepare_thread, Q) == 0;
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (with_attr) pthread_attr_destroy(&attr);
    if (made) {
        Q->running = 1;
    } else { /* no thread: prepare it here */
        Py_CLEAR(Q->owner);
        Py_BEGIN_ALLOW_THREADS
        prepare_run(F, Q);
        Py_END_ALLOW_THREADS
        F->busy = 0;
    }
    return (PyObject *)Q;
}

/* wait() -> self, once the worker thread of start has prepared the block (MemoryError if it could not) */
static PyObject *Prepared_wait(Prepared *Q, PyObject *noarg) {
    if (prepared_join(Q) == -1) return NULL;
    return Py_NewRef((PyObject *)Q);
}

/* ============================================================================================== */
/* PreparePool: the prepares of started blocks, in order, on a fixed set of threads               */
/* ============================================================================================== */
/* Flattener.start runs each block on a thread of its own, and a flattener prepares one block at a time: with
 * two flatteners at most two blocks were ahead of the commit, and a core went idle whenever both were done
 * before the commit of the one before them (~13 % of a 2-core ingest's CPU time at 2M resources). A pool keeps
 * as many blocks queued as its caller starts, and its n workers (n flatteners, each worker with its own
 * parser and reference caches) take them oldest first: the block the commit waits for is always the first
 * one prepared, and no core waits while a later block is queued. The workers never take the GIL. */
static PyTypeObject FlatType;

static void *pool_worker(void *arg) {
    Pool *P = ((pool_arg *)arg)->P;
    Flat *F = (Flat *)P->flats[((pool_arg *)arg)->k];
    Prepared *Q;
    pthread_mutex_lock(&P->mu);
    for (;;) {
        while (!P->head && !P->stop) pthread_cond_wait(&P->work, &P->mu);
        Q = P->head;
        if (!Q) break; /* stopped, and nothing left to prepare */
        P->head = Q->next;
        if (!P->head) P->tail = NULL;
        Q->next = NULL;
        Q->taken = 1;
        pthread_mutex_unlock(&P->mu);
        prepare_run(F, Q);
        pthread_mutex_lock(&P->mu);
        __atomic_store_n(&Q->finished, 1, __ATOMIC_RELEASE);
        pthread_cond_broadcast(&P->done);
    }
    pthread_mutex_unlock(&P->mu);
    return NULL;
}

/* the pool's threads (GIL held): after a fork the parent's are not here, nor is the state of their mutex */
static void pool_threads(Pool *P) {
    pthread_attr_t attr;
    sigset_t all, old;
    int with_attr;
    if (P->pid != (long)getpid()) {
        pthread_mutex_init(&P->mu, NULL);
        pthread_cond_init(&P->work, NULL);
        pthread_cond_init(&P->done, NULL);
        P->head = P->tail = NULL; /* the parent's blocks: their wait() says so (Prepared.forked) */
        P->nth = 0;
        P->stop = P->sync = 0;
        P->pid = (long)getpid();
    }
    if (P->nth || P->sync) return;
    /* the parse recurses up to MAX_DEPTH (musl's default stack is 128 KiB); every signal blocked in the workers,
     * so that they reach the Python threads */
    with_attr = pthread_attr_init(&attr) == 0 && pthread_attr_setstacksize(&attr, 4u << 20) == 0;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    while (P->nth < P->n) {
        P->args[P->nth].P = P;
        P->args[P->nth].k = P->nth;
        if (pthread_create(&P->th[P->nth], with_attr ? &attr : NULL, pool_worker, &P->args[P->nth]) != 0) break;
        P->nth++;
    }
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (with_attr) pthread_attr_destroy(&attr);
    if (!P->nth) P->sync = 1;
}

/* stop the workers once they have prepared every queued block, and join them (GIL held on entry and exit) */
static void pool_stop(Pool *P) {
    int k;
    if (!P->nth || P->pid != (long)getpid()) return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&P->mu);
    P->stop = 1;
    pthread_cond_broadcast(&P->work);
    pthread_mutex_unlock(&P->mu);
    for (k = 0; k < P->nth; k++) pthread_join(P->th[k], NULL);
    Py_END_ALLOW_THREADS
    P->nth = 0;
    P->stop = 0;
}

static int Pool_init(Pool *P, PyObject *args, PyObject *kw) {
    PyObject *flats, *seq;
    Py_ssize_t n, k;
    int kind = -1;
    if (P->pid) {
        PyErr_SetString(PyExc_RuntimeError, "PreparePool is initialised once");
        return -1;
    }
    if (!PyArg_ParseTuple(args, "O", &flats)) return -1;
    seq = PySequence_Fast(flats, "flatteners must be a sequence of Flattener");
    if (!seq) return -1;
    n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > POOL_MAX) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "a pool of 1 to %d flatteners", POOL_MAX);
        return -1;
    }
    for (k = 0; k < n; k++) {
        PyObject *f = PySequence_Fast_GET_ITEM(seq, k);
        int j;
        if (!Py_IS_TYPE(f, &FlatType)) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "flatteners must be a sequence of Flattener");
            return -1;
        }
        for (j = 0; j < k; j++)
            if (PySequence_Fast_GET_ITEM(seq, j) == f) {
                Py_DECREF(seq);
                PyErr_SetString(PyExc_ValueError, "a flattener may serve one worker only");
                return -1;
            }
        if (((Flat *)f)->busy || (kind >= 0 && ((Flat *)f)->kind != kind)) {
            Py_DECREF(seq);
            PyErr_SetString(((Flat *)f)->busy ? PyExc_RuntimeError : PyExc_ValueError,
                            ((Flat *)f)->busy ? "a flattener of the pool is busy"
                                              : "the flatteners of a pool are of one resource type");
            return -1;
        }
        kind = ((Flat *)f)->kind;
    }
    for (k = 0; k < n; k++) { /* the pool's for its life: prepare and start on them are refused */
        P->flats[k] = Py_NewRef(PySequence_Fast_GET_ITEM(seq, k));
        ((Flat *)P->flats[k])->busy = 1;
    }
    Py_DECREF(seq);
    P->n = (int)n;
    P->nth = P->stop = P->closed = P->sync = 0;
    P->head = P->tail = NULL;
    pthread_mutex_init(&P->mu, NULL);
    pthread_cond_init(&P->work, NULL);
    pthread_cond_init(&P->done, NULL);
    P->pid = (long)getpid();
    return 0;
}

/* start(block) -> Prepared: queued for the workers (started on first use); wait() (or commit) has it once it is
 * prepared. Blocks are taken in the order they were started. */
static PyObject *Pool_start(Pool *P, PyObject *block) {
    Prepared *Q;
    if (!P->pid || P->closed) {
        PyErr_SetString(PyExc_RuntimeError, P->pid ? "the pool is closed" : "the pool is not initialised");
        return NULL;
    }
    Q = prepared_new_kind(((Flat *)P->flats[0])->kind, block);
    if (!Q) return NULL;
    pool_threads(P);
    if (P->sync) { /* no thread: prepared here, like Flattener.prepare */
        Py_BEGIN_ALLOW_THREADS
        prepare_run((Flat *)P->flats[0], Q);
        Py_END_ALLOW_THREADS
        return (PyObject *)Q;
    }
    Q->owner = Py_NewRef((PyObject *)P);
    Q->pooled = 1;
    Q->pid = P->pid;
    Q->running = 1;
    pthread_mutex_lock(&P->mu);
    if (P->tail)
        P->tail->next = Q;
    else
        P->head = Q;
    P->tail = Q;
    pthread_cond_signal(&P->work);
    pthread_mutex_unlock(&P->mu);
    return (PyObject *)Q;
}

/* close(): every queued block is prepared, then the workers end; start is refused afterwards */
static PyObject *Pool_close(Pool *P, PyObject *noarg) {
    pool_stop(P);
    P->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *Pool_get_workers(Pool *P, void *closure) { return PyLong_FromLong(P->n); }

static void Pool_dealloc(Pool *P) {
    int k;
    if (P->pid) {
        pool_stop(P);
        if (P->pid == (long)getpid()) {
            pthread_mutex_destroy(&P->mu);
            pthread_cond_destroy(&P->work);
            pthread_cond_destroy(&P->done);
        }
    }
    for (k = 0; k < P->n; k++) {
        ((Flat *)P->flats[k])->busy = 0;
        Py_CLEAR(P->flats[k]);
    }
    Py_TYPE(P)->tp_free((PyObject *)P);
}

static PyMethodDef Pool_methods[] = {
    {"start", (PyCFunction)Pool_start, METH_O, "Queue a block for the workers; Prepared.wait() has it prepared."},
    {"close", (PyCFunction)Pool_close, METH_NOARGS, "Prepare what is queued, then end the workers."},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef Pool_getset[] = {
    {"workers", (getter)Pool_get_workers, NULL, "The number of worker threads (one per flattener).", NULL},
    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "synthfactory.ingest._flatc.PreparePool",
    .tp_basicsize = sizeof(Pool),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PreparePool(flatteners): worker threads (one per flattener) that prepare started blocks in order.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Pool_init,
    .tp_dealloc = (destructor)Pool_dealloc,
    .tp_methods = Pool_methods,
    .tp_getset = Pool_getset,
};

/* ============================================================================================== */
/* IdSet: the resource ids seen, per type, as 128-bit hashes                                     */
/* ============================================================================================== */
/* A Python set of 75M id strings holds ~120 bytes per id (9 GB at 2M patients); this holds 16 bytes per
 * slot at a load of at most 0.7 (about 24-32 bytes per id). Ids are told apart by MurmurHash3 x64 128 of
 * their UTF-8 bytes: two different ids are taken for one with a probability of about n^2 / 2^129 (1e-23 at
 * 75M ids). Used the way the ingest used a set: `id in s`, `s.add(id)`, `len(s)`. */
static inline uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }

static inline uint64_t fmix64(uint64_t k) {
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

static void murmur3_128(const uint8_t *data, size_t len, uint64_t seed, uint64_t out[2]) {
    const uint64_t c1 = 0x87c37b91114253d5ULL, c2 = 0x4cf5ad432745937fULL;
    size_t nblocks = len / 16, i;
    uint64_t h1 = seed, h2 = seed, k1 = 0, k2 = 0;
    const uint8_t *tail = data + nblocks * 16;
    for (i = 0; i < nblocks; i++) {
        memcpy(&k1, data + i * 16, 8);
        memcpy(&k2, data + i * 16 + 8, 8);
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
        h1 = rotl64(h1, 27); h1 += h2; h1 = h1 * 5 + 0x52dce729;
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        h2 = rotl64(h2, 31); h2 += h1; h2 = h2 * 5 + 0x38495ab5;
    }
    k1 = k2 = 0;
    switch (len & 15) {
    case 15: k2 ^= (uint64_t)tail[14] << 48; /* fallthrough */
    case 14: k2 ^= (uint64_t)tail[13] << 40; /* fallthrough */
    case 13: k2 ^= (uint64_t)tail[12] << 32; /* fallthrough */
    case 12: k2 ^= (uint64_t)tail[11] << 24; /* fallthrough */
    case 11: k2 ^= (uint64_t)tail[10] << 16; /* fallthrough */
    case 10: k2 ^= (uint64_t)tail[9] << 8; /* fallthrough */
    case 9:
        k2 ^= (uint64_t)tail[8];
        k2 *= c2; k2 = rotl64(k2, 33); k2 *= c1; h2 ^= k2;
        /* fallthrough */
    case 8: k1 ^= (uint64_t)tail[7] << 56; /* fallthrough */
    case 7: k1 ^= (uint64_t)tail[6] << 48; /* fallthrough */
    case 6: k1 ^= (uint64_t)tail[5] << 40; /* fallthrough */
    case 5: k1 ^= (uint64_t)tail[4] << 32; /* fallthrough */
    case 4: k1 ^= (uint64_t)tail[3] << 24; /* fallthrough */
    case 3: k1 ^= (uint64_t)tail[2] << 16; /* fallthrough */
    case 2: k1 ^= (uint64_t)tail[1] << 8; /* fallthrough */
    case 1:
        k1 ^= (uint64_t)tail[0];
        k1 *= c1; k1 = rotl64(k1, 31); k1 *= c2; h1 ^= k1;
        /* fallthrough */
    default:
        break;
    }
    h1 ^= (uint64_t)len;
    h2 ^= (uint64_t)len;
    h1 += h2;
    h2 += h1;
    h1 = fmix64(h1);
    h2 = fmix64(h2);
    h1 += h2;
    h2 += h1;
    out[0] = h1;
    out[1] = h2;
}

typedef struct {
    PyObject_HEAD
    uint64_t *slots; /* 2 per slot; (0, 0) is an empty slot */
    Py_ssize_t cap, n;
} IdSet;

static PyTypeObject IdSetType;

#define IDSET_SEED 0x5f3759df9e3779b9ULL

static void idset_hash(const uint8_t *p, size_t len, uint64_t h[2]) {
    murmur3_128(p, len, IDSET_SEED, h);
    if (!(h[0] | h[1])) h[1] = 1; /* (0, 0) marks an empty slot */
}

static int idset_grow(IdSet *S) {
    Py_ssize_t ncap = S->cap ? S->cap * 2 : 1024, i, mask = ncap - 1;
    uint64_t *ns = (uint64_t *)big_calloc((size_t)ncap * 2 * sizeof(uint64_t));
    if (!ns) {
        err_nomem();
        return -1;
    }
    for (i = 0; i < S->cap; i++) {
        uint64_t a = S->slots[2 * i], b = S->slots[2 * i + 1];
        Py_ssize_t j;
        if (!(a | b)) continue;
        j = (Py_ssize_t)(a & (uint64_t)mask);
        while (ns[2 * j] | ns[2 * j + 1]) j = (j + 1) & mask;
        ns[2 * j] = a;
        ns[2 * j + 1] = b;
    }
    big_free(S->slots, (size_t)S->cap * 2 * sizeof(uint64_t));
    S->slots = ns;
    S->cap = ncap;
    return 0;
}

/* idset_probe with the id's idset_hash */
static int idset_probe_h(IdSet *S, const uint64_t h[2], int add) {
    Py_ssize_t j, mask;
    if (add && (S->n + 1) * 10 > S->cap * 7 && idset_grow(S) < 0) return -1;
    if (!S->cap) return 0;
    mask = S->cap - 1;
    j = (Py_ssize_t)(h[0] & (uint64_t)mask);
    for (;;) {
        uint64_t a = S->slots[2 * j], b = S->slots[2 * j + 1];
        if (!(a | b)) break;
        if (a == h[0] && b == h[1]) return 1;
        j = (j + 1) & mask;
    }
    if (add) {
        S->slots[2 * j] = h[0];
        S->slots[2 * j + 1] = h[1];
        S->n++;
    }
    return 0;
}

/* 1: present, 0: absent; with `add`, an absent id is added (and 0 returned); -1: out of memory */
static int idset_probe(IdSet *S, const uint8_t *p, size_t len, int add) {
    uint64_t h[2];
    idset_hash(p, len, h);
    return idset_probe_h(S, h, add);
}

/* a hint: the slot where the probe of hash h starts, fetched into the cache ahead of the probe */
static inline void idset_prefetch(const IdSet *S, const uint64_t h[2]) {
    if (S->cap) __builtin_prefetch(&S->slots[2 * (h[0] & (uint64_t)(S->cap - 1))], 1, 1);
}

/* probe with the UTF-8 bytes of a str; a str with a lone surrogate (which strict UTF-8 cannot encode, and
 * the compiled path never sees) is probed with its "surrogatepass" bytes: still one byte string per str */
static int idset_probe_str(IdSet *S, PyObject *o, int add) {
    Py_ssize_t len;
    const char *p;
    PyObject *b;
    int r;
    if (!PyUnicode_Check(o)) {
        PyErr_SetString(PyExc_TypeError, "IdSet holds str ids");
        return -1;
    }
    p = PyUnicode_AsUTF8AndSize(o, &len);
    if (p) return idset_probe(S, (const uint8_t *)p, (size_t)len, add);
    if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) return -1;
    PyErr_Clear();
    b = PyUnicode_AsEncodedString(o, "utf-8", "surrogatepass");
    if (!b) return -1;
    r = idset_probe(S, (const uint8_t *)PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b), add);
    Py_DECREF(b);
    return r;
}

static PyObject *IdSet_add(IdSet *S, PyObject *o) {
    if (idset_probe_str(S, o, 1) < 0) return NULL;
    Py_RETURN_NONE;
}

static int IdSet_contains(IdSet *S, PyObject *o) {
    if (!PyUnicode_Check(o)) return 0; /* like a set of str: anything else is not in it */
    return idset_probe_str(S, o, 0);
}

static Py_ssize_t IdSet_len(IdSet *S) { return S->n; }

static PyObject *IdSet_sizeof(IdSet *S, PyObject *unused) {
    return PyLong_FromSsize_t((Py_ssize_t)sizeof(IdSet) + S->cap * 2 * (Py_ssize_t)sizeof(uint64_t));
}

static void IdSet_dealloc(IdSet *S) {
    big_free(S->slots, (size_t)S->cap * 2 * sizeof(uint64_t));
    Py_TYPE(S)->tp_free((PyObject *)S);
}

static PyMethodDef IdSet_methods[] = {
    {"add", (PyCFunction)IdSet_add, METH_O, "Add an id (a str)."},
    {"__sizeof__", (PyCFunction)IdSet_sizeof, METH_NOARGS, "Bytes held."},
    {NULL, NULL, 0, NULL}};

static PySequenceMethods IdSet_seq = {.sq_length = (lenfunc)IdSet_len, .sq_contains = (objobjproc)IdSet_contains};

static PyTypeObject IdSetType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "synthfactory.ingest._flatc.IdSet",
    .tp_basicsize = sizeof(IdSet),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "IdSet(): the ids seen, as 128-bit hashes (add, in, len).",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)IdSet_dealloc,
    .tp_methods = IdSet_methods,
    .tp_as_sequence = &IdSet_seq,
};

typedef struct {
    Columns *cols;
    Columns *idcols; /* the identifiers sink when it is a Columns("ss"), else NULL (chunk is a dict) */
    PyObject *seen, *pkeys, *chunk;
    IdSet *idset; /* seen when it is an IdSet, else NULL (seen is a set) */
    IdSet *pkset; /* pkeys when it is an IdSet (of patient keys), else NULL (a set, or None) */
    Py_ssize_t n_cand, vdone, vcap, vfirst;
    unsigned long long threshold, salt;
} runctx;

/* is a patient key in the set of known patient keys (decided once per key and set size) */
static int known_patient(Flat *F, runctx *X, const linerec *rec) {
    const char *pk = rec->pk;
    Py_ssize_t size;
    rentry *e;
    if (X->pkset) return idset_probe_h(X->pkset, rec->pkid, 0);
    size = PySet_GET_SIZE(X->pkeys);
    e = rc_get(&F->known, (const uint8_t *)pk, 32);
    if (!e) {
        PyErr_NoMemory();
        return -1;
    }
    if (e->checked != size + 1) {
        PyObject *k = PyUnicode_FromStringAndSize(pk, 32);
        int r;
        if (!k) return -1;
        r = PySet_Contains(X->pkeys, k);
        Py_DECREF(k);
        if (r < 0) return -1;
        e->known = r;
        e->checked = size + 1;
    }
    return e->known;
}

#define VAL (-4) /* picked for validation: the caller validates the line, then commits it (or quarantines it) */

/* is the line's id in the set of ids seen (nothing added): 1, 0, -1 Python error */
static int seen_id(runctx *X, const linerec *rec) {
    PyObject *rid;
    int r;
    if (X->idset) return idset_probe_h(X->idset, rec->idh, 0);
    rid = PyUnicode_DecodeUTF8((const char *)rec->s + rec->rid_off, rec->rid_len, "strict");
    if (!rid) return -1;
    r = PySet_Contains(X->seen, rid);
    Py_DECREF(rid);
    return r;
}

/* one prepared line (GIL held): FB (untouched), VAL (untouched: picked for the validation sample, and
 * neither a dangling reference nor a duplicate id, so the Python loop would validate it next), 0 accepted,
 * -1 Python error. `validated`: the caller has validated this line (it came back as VAL) and it passed. */
static int commit_line(Flat *F, Prepared *Q, runctx *X, const linerec *rec, Py_ssize_t lineno, int validated) {
    Columns *C = X->cols;
    PyObject *rid;
    int i, j;
    if (rec->status != 0) return FB;
    if (!validated) {
        Py_ssize_t cand = X->n_cand + 1;
        unsigned long long h = ((unsigned long long)lineno * 2654435761ULL + X->salt) & 0xFFFFFFFFULL;
        if (cand <= X->vfirst || (X->threshold && (X->vcap < 0 || X->vdone < X->vcap) && h < X->threshold)) {
            /* the Python loop checks the id (and, having validated, the patient reference) before it
             * would take it: those lines stay its own */
            if (F->kind != K_PATIENT && X->pkeys != Py_None && rec->nrows && rec->has_pk) {
                i = known_patient(F, X, rec);
                if (i < 0) return -1;
                if (i == 0) return FB;
            }
            i = seen_id(X, rec);
            if (i < 0) return -1;
            return i ? FB : VAL;
        }
    }
    if (F->kind != K_PATIENT && X->pkeys != Py_None && rec->nrows && rec->has_pk) {
        i = known_patient(F, X, rec);
        if (i < 0) return -1;
        if (i == 0) return FB; /* dangling: Python counts and decides */
    }
    if (X->idset) { /* one probe: added now (the rest below only fails on memory, which ends the ingest) */
        int r = idset_probe_h(X->idset, rec->idh, 1);
        if (r < 0) return -1;
        if (r == 1) return FB; /* duplicate id: Python */
        rid = NULL; /* the id as a str only where the identifiers sink is a dict */
        if (!X->idcols) {
            rid = PyUnicode_DecodeUTF8((const char *)rec->s + rec->rid_off, rec->rid_len, "strict");
            if (!rid) return -1;
        }
    } else {
        Py_ssize_t before = PySet_GET_SIZE(X->seen);
        rid = PyUnicode_DecodeUTF8((const char *)rec->s + rec->rid_off, rec->rid_len, "strict");
        if (!rid) return -1;
        if (PySet_Add(X->seen, rid) < 0) {
            Py_DECREF(rid);
            return -1;
        }
        if (PySet_GET_SIZE(X->seen) == before) {
            Py_DECREF(rid);
            return FB; /* duplicate id: Python */
        }
    }
    /* accepted: the side effects, in the Python loop's order */
    if (X->idcols) {
        if (add_identifier_cols(X->idcols, rec->s + rec->rid_off, rec->rid_len, "id") < 0) goto fail;
    } else if (add_identifier(X->chunk, rid, F->s_id) < 0) goto fail;
    for (i = 0; i < rec->nident; i++) {
        uint32_t off = Q->idents[3 * (rec->ident0 + i)], len = Q->idents[3 * (rec->ident0 + i) + 1];
        uint32_t meta = Q->idents[3 * (rec->ident0 + i) + 2], ik = meta & 0xFF;
        const uint8_t *src = (meta & IK_ARENA) ? Q->arena.p : rec->s;
        PyObject *vs;
        if (X->idcols) {
            if (add_identifier_cols(X->idcols, src + off, len, IK_TEXT[ik]) < 0) goto fail;
            continue;
        }
        vs = PyUnicode_DecodeUTF8((const char *)src + off, len, "strict");
        if (!vs) goto fail;
        if (add_identifier(X->chunk, vs, F->s_kind[ik]) < 0) {
            Py_DECREF(vs);
            goto fail;
        }
        Py_DECREF(vs);
    }
    for (i = 0; i < rec->nrows; i++) {
        const rowrec *w = &Q->rows[rec->row0 + i];
        colmark m[MAX_COLS];
        Py_ssize_t r = C->nrows;
        cols_mark(C, m);
        if (col_str(&C->cols[0], r, w->key, 32) < 0 ||
            (rec->pk_col >= 0 &&
             (rec->has_pk ? col_str(&C->cols[rec->pk_col], r, rec->pk, 32) : col_null(&C->cols[rec->pk_col], r)) < 0) ||
            (rec->ek_col >= 0 &&
             (rec->has_ek ? col_str(&C->cols[rec->ek_col], r, rec->ek, 32) : col_null(&C->cols[rec->ek_col], r)) < 0)) {
            cols_rollback(C, m);
            goto fail;
        }
        for (j = 1; j < Q->ncols; j++) {
            if (j == rec->pk_col || j == rec->ek_col) continue;
            if (put_cell(rec->s, &C->cols[j], r, &w->cells[j]) < 0) {
                cols_rollback(C, m);
                goto fail;
            }
        }
        C->nrows++;
    }
    if (F->kind == K_PATIENT && X->pkset && rec->nrows) { /* session.patient_keys.add(key), an IdSet */
        if (idset_probe_h(X->pkset, rec->pkid, 1) < 0) goto fail;
    } else if (F->kind == K_PATIENT && X->pkeys != Py_None && rec->nrows) { /* session.patient_keys.add(key) */
        PyObject *k = PyUnicode_FromStringAndSize(Q->rows[rec->row0].key, 32);
        if (!k) goto fail;
        if (PySet_Add(X->pkeys, k) < 0) {
            Py_DECREF(k);
            goto fail;
        }
        Py_DECREF(k);
    }
    Py_XDECREF(rid);
    X->n_cand++;
    return 0;
fail:
    Py_XDECREF(rid);
    return -1;
}

/* commit(prepared, start, lineno, cols, seen, pkeys, chunk, n_cand, vdone, vcap, vfirst, threshold, salt,
 *        batch_rows[, validated]) -> (pos, accepted, why)
 * Takes the prepared block's lines from `start` while they are plain, writing their rows to `cols` (a
 * Columns); `lineno` is the number of the line before block[start]. why: 0 the block is done, 1
 * block[pos] is for the Python path, 2 the buffer is full (flush, then call again from pos), 3 block[pos]
 * is picked for the validation sample: the caller validates it and quarantines it, or calls again from pos
 * with `validated` true (and vdone counting it), and the line is taken like any other. Accepted lines count
 * as read and as validation candidates. */
#define COMMIT_PREFETCH 8

/* the lines of Q from start, until one is not taken (*why 1 handed back, 3 to validate) or the batch is full (2):
 * -1 on an error (set, or kept for err_restore where the GIL is released) */
static int commit_loop(Flat *F, Prepared *Q, runctx *X, Py_ssize_t start, Py_ssize_t lineno, Py_ssize_t batch_rows,
                       int validated, Py_ssize_t *at, Py_ssize_t *accepted, int *why) {
    Py_ssize_t pos;
    for (pos = start; pos < Q->n; pos++) {
        int r;
        /* the duplicate-id set is probed at random: its slot for a line a few ahead is fetched now */
        if (X->idset && pos + COMMIT_PREFETCH < Q->n && Q->lines[pos + COMMIT_PREFETCH].status == 0)
            idset_prefetch(X->idset, Q->lines[pos + COMMIT_PREFETCH].idh);
        if (X->cols->nrows >= batch_rows) {
            *why = 2;
            break;
        }
        r = commit_line(F, Q, X, &Q->lines[pos], lineno + (pos - start) + 1, validated && pos == start);
        if (r == -1) {
            *at = pos;
            return -1;
        }
        if (r == FB) {
            *why = 1;
            break;
        }
        if (r == VAL) {
            *why = 3;
            break;
        }
        (*accepted)++;
    }
    *at = pos;
    return 0;
}

static PyObject *Flat_commit(Flat *F, PyObject *args) {
    Prepared *Q;
    Py_ssize_t start, lineno, batch_rows, pos = 0, accepted = 0;
    runctx X;
    int why = 0, validated = 0, nogil, failed;
    if (!PyArg_ParseTuple(args, "O!nnO!OOOnnnnKKn|p", &PreparedType, &Q, &start, &lineno, &ColumnsType, &X.cols,
                          &X.seen, &X.pkeys, &X.chunk, &X.n_cand, &X.vdone, &X.vcap,
                          &X.vfirst, &X.threshold, &X.salt, &batch_rows, &validated))
        return NULL;
    if (prepared_join(Q) == -1) return NULL; /* a block from start: its thread first */
    X.idcols = NULL;
    X.idset = Py_IS_TYPE(X.seen, &IdSetType) ? (IdSet *)X.seen : NULL;
    if (!X.idset && !PySet_CheckExact(X.seen)) {
        PyErr_SetString(PyExc_TypeError, "seen must be an IdSet or a set");
        return NULL;
    }
    if (Py_IS_TYPE(X.chunk, &ColumnsType)) {
        X.idcols = (Columns *)X.chunk;
        if (X.idcols->ncols != 2 || X.idcols->cols[0].kind != COL_STR || X.idcols->cols[1].kind != COL_STR) {
            PyErr_SetString(PyExc_ValueError, "the identifiers sink must be Columns('ss')");
            return NULL;
        }
    } else if (!PyDict_CheckExact(X.chunk)) {
        PyErr_SetString(PyExc_TypeError, "chunk must be a dict or Columns('ss')");
        return NULL;
    }
    X.pkset = Py_IS_TYPE(X.pkeys, &IdSetType) ? (IdSet *)X.pkeys : NULL;
    if (X.pkeys != Py_None && !X.pkset && !PySet_Check(X.pkeys)) {
        PyErr_SetString(PyExc_TypeError, "pkeys must be an IdSet, a set or None");
        return NULL;
    }
    if (Q->kind != F->kind || X.cols->ncols != Q->ncols) {
        PyErr_SetString(PyExc_ValueError, "the prepared block or the Columns do not fit this flattener");
        return NULL;
    }
    if (start < 0) start = 0;
    /* With the C sets and sinks (an IdSet of ids, an IdSet of patient keys or none, Columns for the identifiers)
     * the loop touches no Python object: it runs with the GIL released, so the ingest's other Python threads (the
     * validation sample's, the reader's) run beside it. The objects are the ingest thread's own. */
    nogil = X.idset && X.idcols && (X.pkset || X.pkeys == Py_None);
    if (nogil) {
        Py_BEGIN_ALLOW_THREADS
        nogil_depth++;
        failed = commit_loop(F, Q, &X, start, lineno, batch_rows, validated, &pos, &accepted, &why);
        nogil_depth--;
        Py_END_ALLOW_THREADS
        if (failed) {
            err_restore();
            return NULL;
        }
    } else if (commit_loop(F, Q, &X, start, lineno, batch_rows, validated, &pos, &accepted, &why) < 0) {
        return NULL;
    }
    if (pos >= Q->n && why == 0 && X.cols->nrows >= batch_rows) why = 2;
    return Py_BuildValue("nni", pos, accepted, why);
}

/* key(type, id) -> the 32-hex HMAC (for the start-up check against Keyer.key) */
static PyObject *Flat_key(Flat *F, PyObject *args) {
    const char *type, *id;
    Py_ssize_t idlen;
    char hex[32];
    if (!PyArg_ParseTuple(args, "ss#", &type, &id, &idlen)) return NULL;
    if (key_hex(F, type, (const uint8_t *)id, (size_t)idlen, -1, hex) < 0) return NULL;
    return PyUnicode_FromStringAndSize(hex, 32);
}

static int Flat_init(Flat *F, PyObject *args, PyObject *kw) {
    static char *kwlist[] = {"kind", "ipad", "opad", "strings_fb", "ranges", "lo", "hi", NULL};
    const char *kind;
    Py_buffer ipad, opad;
    int k, strings_fb = 0;
    PyObject *ranges = NULL;
    double lo = -HUGE_VAL, hi = HUGE_VAL;
    if (F->busy) {
        PyErr_SetString(PyExc_RuntimeError, "a prepare is running on this Flattener");
        return -1;
    }
    if (!PyArg_ParseTupleAndKeywords(args, kw, "sy*y*|pOdd", kwlist, &kind, &ipad, &opad, &strings_fb, &ranges,
                                     &lo, &hi))
        return -1;
    F->lim.strings_fb = strings_fb;
    F->lim.lo = lo;
    F->lim.hi = hi;
    F->lim.n = 0;
    F->P.lim = &F->lim;
    if (ranges != NULL && ranges != Py_None) {
        PyObject *seq = PySequence_Fast(ranges, "ranges must be a sequence of (unit, lo, hi)");
        Py_ssize_t i, m;
        if (!seq) goto bad_ranges;
        m = PySequence_Fast_GET_SIZE(seq);
        if (m > MAX_RANGES) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "too many ranges");
            goto bad_ranges;
        }
        for (i = 0; i < m; i++) {
            const char *u;
            Py_ssize_t ul;
            double a, b;
            if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "s#dd", &u, &ul, &a, &b) || ul > 64) {
                Py_DECREF(seq);
                if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a range unit longer than 64 bytes");
                goto bad_ranges;
            }
            memcpy(F->lim.r[i].unit, u, (size_t)ul);
            F->lim.r[i].len = (uint32_t)ul;
            F->lim.r[i].lo = a;
            F->lim.r[i].hi = b;
        }
        F->lim.n = (int)m;
        Py_DECREF(seq);
    }
    if (0) {
    bad_ranges:
        PyBuffer_Release(&ipad);
        PyBuffer_Release(&opad);
        return -1;
    }
    if (ipad.len != 64 || opad.len != 64) {
        PyBuffer_Release(&ipad);
        PyBuffer_Release(&opad);
        PyErr_SetString(PyExc_ValueError, "ipad and opad must be 64 bytes");
        return -1;
    }
    memcpy(F->ist, SHA_IV, sizeof F->ist);
    memcpy(F->ost, SHA_IV, sizeof F->ost);
    compress(F->ist, (const uint8_t *)ipad.buf);
    compress(F->ost, (const uint8_t *)opad.buf);
    PyBuffer_Release(&ipad);
    PyBuffer_Release(&opad);
    for (k = 0; k < N_KINDS; k++)
        if (strcmp(kind, KIND_TYPE[k]) == 0) break;
    if (k == N_KINDS) {
        PyErr_SetString(PyExc_ValueError,
                        "kind must be Observation, Encounter, Condition, MedicationRequest, Procedure or Patient");
        return -1;
    }
    F->kind = k;
    F->P.patient = k == K_PATIENT;
    rc_clear(&F->pcache);
    rc_clear(&F->ecache);
    rc_clear(&F->known);
    Py_CLEAR(F->s_id);
    Py_CLEAR(F->s_identifier);
    F->s_id = PyUnicode_InternFromString("id");
    F->s_identifier = PyUnicode_InternFromString("identifier");
    if (!F->s_id || !F->s_identifier) return -1;
    for (k = 0; k < N_IK; k++) {
        Py_CLEAR(F->s_kind[k]);
        F->s_kind[k] = PyUnicode_InternFromString(IK_TEXT[k]);
        if (!F->s_kind[k]) return -1;
    }
    return 0;
}

static void Flat_dealloc(Flat *F) {
    int k;
    for (k = 0; k < N_IK; k++) Py_CLEAR(F->s_kind[k]);
    Py_CLEAR(F->s_id);
    Py_CLEAR(F->s_identifier);
    free(F->P.nodes);
    big_free(F->pcache.e, F->pcache.cap * sizeof(rentry));
    free(F->pcache.arena.p);
    big_free(F->ecache.e, F->ecache.cap * sizeof(rentry));
    free(F->ecache.arena.p);
    big_free(F->known.e, F->known.cap * sizeof(rentry));
    free(F->known.arena.p);
    Py_TYPE(F)->tp_free((PyObject *)F);
}

static PyMethodDef Flat_methods[] = {
    {"prepare", (PyCFunction)Flat_prepare, METH_O, "Parse, flatten and key a block without the GIL."},
    {"start", (PyCFunction)Flat_start, METH_O, "prepare on a thread of its own (never takes the GIL); Prepared.wait()."},
    {"commit", (PyCFunction)Flat_commit, METH_VARARGS, "Take a prepared block's plain lines (see the source)."},
    {"key", (PyCFunction)Flat_key, METH_VARARGS, "The HMAC key of (type, id)."},
    {NULL, NULL, 0, NULL}};

static PyTypeObject FlatType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "synthfactory.ingest._flatc.Flattener",
    .tp_basicsize = sizeof(Flat),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Flattener(kind, ipad, opad): the compiled flatten of one resource type's plain lines.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Flat_init,
    .tp_dealloc = (destructor)Flat_dealloc,
    .tp_methods = Flat_methods,
};

/* ============================================================================================== */
/* Bundles: the entries of a Bundle file, streamed (bundle.ingest_bundles)                         */
/* ============================================================================================== */
/*
 * scan_bundle(buf, pos, state, final, wanted=None) -> (pos, state, entries)
 *
 * Walks the root object of a Bundle held (in part) in ``buf`` from ``pos``: the members before and after
 * ``entry`` are checked and skipped; each element of the ``entry`` array is found (its extent by a
 * bracket-and-string scan, then read strictly) and returned as a tuple; the caller drops the bytes before
 * the returned ``pos`` and appends the next chunk. A unit (member or entry) not complete in ``buf`` stops
 * the scan at its start (``final``: the buffer holds the end of the file, so it is invalid JSON).
 *
 * state: S_* below, with ST_BUNDLE set once the root's resourceType "Bundle" was read and ST_DONE once the
 * entry array was. ST_FALLBACK (only before any entry): the file cannot be streamed (not an object, ``entry`` before ``resourceType``, a resourceType that is not
 * Bundle, ``entry`` not an array): the caller parses it whole. ST_INVALID: invalid JSON outside entries.
 *
 * entry tuple: (status, start, end, resource, fullUrl, method, url, resourceType, id, id_kind, subject_ref,
 *               patient_ref, refs)
 *   status 0: read here; 1: anything unusual (not an object, a field of an unexpected type, an escape in a
 *   string read here, duplicate members, invalid JSON, too deep): the caller parses the entry's bytes with
 *   orjson and takes its Python path, so every decision stays that path's.
 *   resource: the resource object's bytes, compact (no whitespace between tokens), or None when the entry
 *   has no resource member; b"" (and no refs) for a resourceType not in the set ``wanted`` (the caller skips it). id_kind: 0 absent, 1 a string. refs: start, end, start, end... of every
 *   "reference" string member in the resource (the string's content, without quotes; offsets in the compact
 *   bytes), in order. The other strings are None unless present as strings without escapes.
 */
enum { S_START, S_MEMBER_FIRST, S_MEMBER, S_AFTER_MEMBER, S_ENTRY_FIRST, S_ENTRY, S_AFTER_ENTRY, S_END };
#define ST_BUNDLE 0x100
#define ST_DONE 0x200 /* the entry array was read */
#define ST_FALLBACK 1000
#define ST_INVALID 1001

static inline size_t string_end(const uint8_t *s, size_t i, size_t n) {
    /* i at an opening quote: the index after the closing one, or (size_t)-1 when not in the buffer */
    i++;
    while (i < n) {
#if defined(__SSE2__)
        while (i + 16 <= n) {
            __m128i v = _mm_loadu_si128((const __m128i *)(s + i));
            int mask = _mm_movemask_epi8(_mm_or_si128(_mm_cmpeq_epi8(v, _mm_set1_epi8('"')),
                                                      _mm_cmpeq_epi8(v, _mm_set1_epi8('\\'))));
            if (mask) {
                i += (size_t)__builtin_ctz((unsigned)mask);
                break;
            }
            i += 16;
        }
        if (i >= n) break;
#endif
        if (s[i] == '"') return i + 1;
        if (s[i] == '\\') {
            i += 2;
            continue;
        }
        i++;
    }
    return (size_t)-1;
}

/* the end of the JSON value starting at s[i] (not whitespace), by brackets and strings only (lenient: the
 * strict read follows); (size_t)-1 when it does not end within n */
static size_t unit_end(const uint8_t *s, size_t i, size_t n) {
    uint8_t c = s[i];
    if (c == '{' || c == '[') {
        size_t depth = 0;
        while (i < n) {
            c = s[i];
            if (c == '"') {
                i = string_end(s, i, n);
                if (i == (size_t)-1) return i;
                continue;
            }
            if (c == '{' || c == '[') depth++;
            else if (c == '}' || c == ']') {
                if (--depth == 0) return i + 1;
            }
            i++;
        }
        return (size_t)-1;
    }
    if (c == '"') return string_end(s, i, n);
    while (i < n) {
        c = s[i];
        if (c == ',' || c == ']' || c == '}' || c == ' ' || c == '\n' || c == '\r' || c == '\t') return i;
        i++;
    }
    return (size_t)-1;
}

typedef struct {
    Py_ssize_t off, len;
    int kind; /* 0 absent, 1 string without escapes, 2 anything else */
} fspan;

typedef struct {
    fspan full, method, url, rtype, rid, subj, pat;
    fspan *holder; /* subj or pat while its object is walked */
    Py_ssize_t res_start, res_end;
    int has_res, has_req, odd;
    Py_ssize_t *refs;
    size_t nrefs, cap;
} einfo;

static inline int key_is(parser *P, uint32_t koff, uint32_t klen, const char *k) {
    size_t n = strlen(k);
    return klen == n && memcmp(P->s + koff, k, n) == 0;
}

static int push_ref(einfo *E, Py_ssize_t a, Py_ssize_t b) {
    if (E->nrefs + 2 > E->cap) {
        size_t cap = E->cap ? E->cap * 2 : 32;
        Py_ssize_t *r = (Py_ssize_t *)realloc(E->refs, cap * sizeof(Py_ssize_t));
        if (!r) return -2;
        E->refs = r;
        E->cap = cap;
    }
    E->refs[E->nrefs++] = a;
    E->refs[E->nrefs++] = b;
    return 0;
}

/* a member value read into f (a string without escapes: kind 1; else kind 2 and the value skipped) */
static int read_field(parser *P, einfo *E, fspan *f, int depth) {
    if (f->kind) E->odd = 1; /* a duplicate member */
    skip_ws(P);
    if (P->pos < P->n && P->s[P->pos] == '"') {
        uint32_t off, len;
        uint8_t esc;
        if (parse_string(P, &off, &len, &esc) < 0) return -1;
        f->off = off;
        f->len = len;
        f->kind = esc ? 2 : 1;
        if (esc) E->odd = 1;
        return 0;
    }
    f->kind = 2;
    E->odd = 1;
    return skip_value(P, depth);
}

/* any value inside a resource: strict, collecting "reference" string members */
static int walk_any(parser *P, einfo *E, int depth) {
    uint8_t c;
    if (depth > MAX_DEPTH) return -1;
    skip_ws(P);
    if (P->pos >= P->n) return -1;
    c = P->s[P->pos];
    if (c != '{' && c != '[') return skip_value(P, depth);
    {
        int obj = c == '{';
        P->pos++;
        skip_ws(P);
        if (P->pos < P->n && P->s[P->pos] == (obj ? '}' : ']')) {
            P->pos++;
            return 0;
        }
        for (;;) {
            int r;
            if (obj) {
                uint32_t koff, klen;
                uint8_t kesc;
                if (parse_key(P, &koff, &klen, &kesc) < 0) return -1;
                skip_ws(P);
                if (key_is(P, koff, klen, "reference") && P->pos < P->n && P->s[P->pos] == '"') {
                    uint32_t off, len;
                    uint8_t esc;
                    if (parse_string(P, &off, &len, &esc) < 0) return -1;
                    if (esc) E->odd = 1;
                    if (push_ref(E, off, (Py_ssize_t)off + len) < 0) return -2;
                    r = 0;
                } else {
                    r = walk_any(P, E, depth + 1);
                }
            } else {
                r = walk_any(P, E, depth + 1);
            }
            if (r < 0) return r;
            skip_ws(P);
            if (P->pos >= P->n) return -1;
            if (P->s[P->pos] == ',') {
                P->pos++;
                continue;
            }
            if (P->s[P->pos] == (obj ? '}' : ']')) {
                P->pos++;
                return 0;
            }
            return -1;
        }
    }
}

/* an object whose members are read by ``member`` (0 handled, 1 not one of its keys: walk/skip it) */
typedef int (*member_fn)(parser *P, einfo *E, uint32_t koff, uint32_t klen, int depth);

static int walk_object(parser *P, einfo *E, int depth, member_fn member, int collect) {
    skip_ws(P);
    if (P->pos >= P->n || P->s[P->pos] != '{') {
        E->odd = 1;
        return collect ? walk_any(P, E, depth) : skip_value(P, depth);
    }
    P->pos++;
    skip_ws(P);
    if (P->pos < P->n && P->s[P->pos] == '}') {
        P->pos++;
        return 0;
    }
    for (;;) {
        uint32_t koff, klen;
        uint8_t kesc;
        int r;
        if (parse_key(P, &koff, &klen, &kesc) < 0) return -1;
        r = member(P, E, koff, klen, depth + 1);
        if (r < 0) return r;
        if (r == 1) {
            r = collect ? walk_any(P, E, depth + 1) : skip_value(P, depth + 1);
            if (r < 0) return r;
        }
        skip_ws(P);
        if (P->pos >= P->n) return -1;
        if (P->s[P->pos] == ',') {
            P->pos++;
            continue;
        }
        if (P->s[P->pos] == '}') {
            P->pos++;
            return 0;
        }
        return -1;
    }
}

static int m_holder(parser *P, einfo *E, uint32_t koff, uint32_t klen, int depth) {
    if (key_is(P, koff, klen, "reference")) {
        fspan *h = E->holder;
        int r = read_field(P, E, h, depth);
        if (r < 0) return r;
        if (h->kind == 1 && push_ref(E, h->off, h->off + h->len) < 0) return -2;
        return 0;
    }
    return 1;
}

static int m_resource(parser *P, einfo *E, uint32_t koff, uint32_t klen, int depth) {
    if (key_is(P, koff, klen, "resourceType")) return read_field(P, E, &E->rtype, depth);
    if (key_is(P, koff, klen, "id")) return read_field(P, E, &E->rid, depth);
    if (key_is(P, koff, klen, "subject") || key_is(P, koff, klen, "patient")) {
        fspan *f = key_is(P, koff, klen, "subject") ? &E->subj : &E->pat;
        if (f->kind) E->odd = 1;
        f->kind = 2; /* present; 1 once its reference is read */
        E->holder = f;
        {
            fspan tmp = *f;
            int r;
            f->kind = 0;
            r = walk_object(P, E, depth, m_holder, 1);
            if (f->kind == 0) *f = tmp; /* no reference in it: still "present, no string" */
            return r;
        }
    }
    return 1;
}

static int m_request(parser *P, einfo *E, uint32_t koff, uint32_t klen, int depth) {
    if (key_is(P, koff, klen, "method")) return read_field(P, E, &E->method, depth);
    if (key_is(P, koff, klen, "url")) return read_field(P, E, &E->url, depth);
    return 1;
}

static int m_entry(parser *P, einfo *E, uint32_t koff, uint32_t klen, int depth) {
    if (key_is(P, koff, klen, "fullUrl")) return read_field(P, E, &E->full, depth);
    if (key_is(P, koff, klen, "request")) {
        if (E->has_req) E->odd = 1;
        E->has_req = 1;
        return walk_object(P, E, depth, m_request, 0);
    }
    if (key_is(P, koff, klen, "resource")) {
        int r;
        if (E->has_res) E->odd = 1;
        E->has_res = 1;
        skip_ws(P);
        E->res_start = (Py_ssize_t)P->pos;
        r = walk_object(P, E, depth, m_resource, 1);
        E->res_end = (Py_ssize_t)P->pos;
        return r;
    }
    return 1;
}

static PyObject *span_str(const uint8_t *s, const fspan *f) {
    if (f->kind != 1) Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8((const char *)s + f->off, f->len, NULL);
}

/* the resource's bytes without the whitespace between tokens (strings copied as they are), and its reference
 * spans moved to match (relative to the compact bytes) */
static PyObject *compact_resource(const uint8_t *s, einfo *E) {
    size_t i = (size_t)E->res_start, n = (size_t)E->res_end, o = 0, k = 0;
    PyObject *b = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n - i));
    uint8_t *d;
    if (!b) return NULL;
    d = (uint8_t *)PyBytes_AS_STRING(b);
    while (i < n) {
        uint8_t c = s[i];
        if (c == '"') {
            size_t e = string_end(s, i, n); /* the walk read it: it ends */
            if (k < E->nrefs && E->refs[k] == (Py_ssize_t)i + 1) {
                Py_ssize_t len = E->refs[k + 1] - E->refs[k];
                E->refs[k] = (Py_ssize_t)o + 1;
                E->refs[k + 1] = (Py_ssize_t)o + 1 + len;
                k += 2;
            }
            memcpy(d + o, s + i, e - i);
            o += e - i;
            i = e;
            continue;
        }
        if (c != ' ' && c != '\n' && c != '\r' && c != '\t') d[o++] = c;
        i++;
    }
    if (k != E->nrefs) { /* not expected: every reference span starts a string */
        Py_DECREF(b);
        return NULL;
    }
    if (_PyBytes_Resize(&b, (Py_ssize_t)o) < 0) return NULL;
    return b;
}

static PyObject *entry_tuple(const uint8_t *s, size_t start, size_t end, einfo *E, int ok, PyObject *wanted) {
    PyObject *refs, *t, *line, *rtype;
    size_t k;
    int status = (!ok || E->odd) ? 1 : 0, keep = 1;
    if (status) /* the caller reads the entry with orjson */
        return Py_BuildValue("(inn)", 1, (Py_ssize_t)start, (Py_ssize_t)end);
    rtype = span_str(s, &E->rtype);
    if (!rtype) return NULL;
    if (wanted != Py_None && rtype != Py_None) {
        keep = PySet_Contains(wanted, rtype);
        if (keep < 0) {
            Py_DECREF(rtype);
            return NULL;
        }
    }
    if (E->has_res && !keep) { /* a type the caller skips: no bytes */
        line = PyBytes_FromStringAndSize("", 0);
        if (!line) {
            Py_DECREF(rtype);
            return NULL;
        }
        E->nrefs = 0;
    } else if (E->has_res) {
        line = compact_resource(s, E);
        if (!line) {
            Py_DECREF(rtype);
            if (PyErr_Occurred()) return NULL;
            return Py_BuildValue("(inn)", 1, (Py_ssize_t)start, (Py_ssize_t)end);
        }
    } else {
        Py_INCREF(Py_None);
        line = Py_None;
    }
    refs = PyTuple_New((Py_ssize_t)E->nrefs);
    if (!refs) {
        Py_DECREF(line);
        Py_DECREF(rtype);
        return NULL;
    }
    for (k = 0; k < E->nrefs; k++) {
        PyObject *v = PyLong_FromSsize_t(E->refs[k]);
        if (!v) {
            Py_DECREF(refs);
            Py_DECREF(line);
            Py_DECREF(rtype);
            return NULL;
        }
        PyTuple_SET_ITEM(refs, (Py_ssize_t)k, v);
    }
    t = Py_BuildValue("(innNNNNNNiNNN)", 0, (Py_ssize_t)start, (Py_ssize_t)end, line,
                      span_str(s, &E->full), span_str(s, &E->method), span_str(s, &E->url),
                      rtype, span_str(s, &E->rid), E->rid.kind, span_str(s, &E->subj),
                      span_str(s, &E->pat), refs);
    return t;
}

static PyObject *scan_bundle(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t pos0;
    int state, final;
    parser P;
    PyObject *entries = NULL, *res = NULL, *wanted = Py_None;
    const uint8_t *s;
    size_t n, pos;
    int flags, st;
    if (!PyArg_ParseTuple(args, "y*nip|O", &view, &pos0, &state, &final, &wanted)) return NULL;
    if (wanted != Py_None && !PyAnySet_Check(wanted)) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_TypeError, "wanted must be a set or None");
        return NULL;
    }
    s = (const uint8_t *)view.buf;
    n = (size_t)view.len;
    if (n > (size_t)UINT32_MAX) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "buffer too large");
        return NULL;
    }
    pos = pos0 < 0 ? 0 : (size_t)pos0;
    flags = state & (ST_BUNDLE | ST_DONE);
    st = state & 0xFF;
    entries = PyList_New(0);
    if (!entries) goto done;
    memset(&P, 0, sizeof(P));
    P.s = s;
    if (state >= ST_FALLBACK) goto out;
    for (;;) {
        uint8_t c;
        while (pos < n && (s[pos] == ' ' || s[pos] == '\t' || s[pos] == '\n' || s[pos] == '\r')) pos++;
        if (st == S_END) {
            if (pos < n) st = ST_INVALID;
            goto out;
        }
        if (pos >= n) {
            if (final) st = ST_INVALID;
            goto out;
        }
        c = s[pos];
        switch (st) {
        case S_START:
            if (c != '{') {
                st = ST_FALLBACK;
                goto out;
            }
            pos++;
            st = S_MEMBER_FIRST;
            continue;
        case S_MEMBER_FIRST:
        case S_MEMBER: {
            uint32_t koff, klen;
            uint8_t kesc;
            size_t kend, vstart, vend;
            if (c == '}' && st == S_MEMBER_FIRST) {
                pos++;
                st = S_END;
                continue;
            }
            if (c != '"') {
                st = ST_INVALID;
                goto out;
            }
            kend = string_end(s, pos, n);
            if (kend == (size_t)-1) {
                if (final) st = ST_INVALID;
                goto out;
            }
            vstart = kend;
            while (vstart < n && (s[vstart] == ' ' || s[vstart] == '\t' || s[vstart] == '\n' || s[vstart] == '\r'))
                vstart++;
            if (vstart >= n) {
                if (final) st = ST_INVALID;
                goto out;
            }
            if (s[vstart] != ':') {
                st = ST_INVALID;
                goto out;
            }
            vstart++;
            while (vstart < n && (s[vstart] == ' ' || s[vstart] == '\t' || s[vstart] == '\n' || s[vstart] == '\r'))
                vstart++;
            if (vstart >= n) {
                if (final) st = ST_INVALID;
                goto out;
            }
            P.n = vstart;
            P.pos = pos;
            P.odd = 0;
            kesc = 0;
            if (parse_key(&P, &koff, &klen, &kesc) < 0) {
                st = ST_INVALID;
                goto out;
            }
            if (P.odd && !(flags & ST_DONE)) { /* an escaped key before the entries: orjson reads the file */
                st = ST_FALLBACK;
                goto out;
            }
            if (P.odd) { /* after them: a member this reader does not read, checked and skipped */
                kesc = 0;
                klen = 0;
            }
            if (key_is(&P, koff, klen, "entry")) {
                if (!flags || s[vstart] != '[') {
                    st = ST_FALLBACK;
                    goto out;
                }
                pos = vstart + 1;
                st = S_ENTRY_FIRST;
                continue;
            }
            vend = unit_end(s, vstart, n);
            if (vend == (size_t)-1) {
                if (!final) goto out;
                vend = n; /* a scalar at the end of the file, or truncated: the strict read decides */
            }
            P.n = vend;
            P.pos = vstart;
            if (key_is(&P, koff, klen, "resourceType")) {
                uint32_t off, len;
                uint8_t esc;
                if (s[vstart] != '"' || parse_string(&P, &off, &len, &esc) < 0 || esc || P.pos != vend) {
                    st = ST_FALLBACK;
                    goto out;
                }
                if (!(len == 6 && memcmp(s + off, "Bundle", 6) == 0)) {
                    st = ST_FALLBACK; /* a bare resource */
                    goto out;
                }
                flags = ST_BUNDLE;
            } else if (skip_value(&P, 1) < 0 || P.pos != vend) {
                st = (P.odd && !(flags & ST_DONE)) ? ST_FALLBACK : ST_INVALID;
                goto out;
            }
            pos = vend;
            st = S_AFTER_MEMBER;
            continue;
        }
        case S_AFTER_MEMBER:
            if (c == ',') {
                pos++;
                st = S_MEMBER;
                continue;
            }
            if (c == '}') {
                pos++;
                st = S_END;
                continue;
            }
            st = ST_INVALID;
            goto out;
        case S_ENTRY_FIRST:
        case S_ENTRY: {
            size_t end;
            einfo E;
            int r;
            PyObject *t;
            if (c == ']' && st == S_ENTRY_FIRST) {
                pos++;
                st = S_AFTER_MEMBER;
                flags |= ST_DONE;
                continue;
            }
            /* read it strictly within the buffer; only when that fails, find its extent (incomplete: wait
             * for more bytes; complete but not read here: the caller's orjson decides) */
            if (c != '{') { /* not an object: its extent (a number must not end at the buffer's end) */
                end = unit_end(s, pos, n);
                if (end == (size_t)-1) {
                    if (final) st = ST_INVALID;
                    goto out;
                }
                t = Py_BuildValue("(inn)", 1, (Py_ssize_t)pos, (Py_ssize_t)end);
                if (!t || PyList_Append(entries, t) < 0) {
                    Py_XDECREF(t);
                    goto fail;
                }
                Py_DECREF(t);
                pos = end;
                st = S_AFTER_ENTRY;
                continue;
            }
            memset(&E, 0, sizeof(E));
            P.n = n;
            P.pos = pos;
            P.odd = 0;
            r = walk_object(&P, &E, 0, m_entry, 0);
            if (r == -2) {
                free(E.refs);
                PyErr_NoMemory();
                goto fail;
            }
            end = P.pos;
            if (r < 0) {
                end = unit_end(s, pos, n);
                if (end == (size_t)-1) {
                    free(E.refs);
                    if (final) st = ST_INVALID;
                    goto out;
                }
            }
            if (P.odd) E.odd = 1;
            t = entry_tuple(s, pos, end, &E, r == 0, wanted);
            free(E.refs);
            if (!t || PyList_Append(entries, t) < 0) {
                Py_XDECREF(t);
                goto fail;
            }
            Py_DECREF(t);
            pos = end;
            st = S_AFTER_ENTRY;
            continue;
        }
        case S_AFTER_ENTRY:
            if (c == ',') {
                pos++;
                st = S_ENTRY;
                continue;
            }
            if (c == ']') {
                pos++;
                st = S_AFTER_MEMBER;
                flags |= ST_DONE;
                continue;
            }
            st = ST_INVALID;
            goto out;
        default:
            st = ST_INVALID;
            goto out;
        }
    }
out:
    res = Py_BuildValue("(niO)", (Py_ssize_t)pos, st >= ST_FALLBACK ? st : (st | flags), entries);
fail:
    Py_XDECREF(entries);
done:
    PyBuffer_Release(&view);
    return res;
}

/* first_seen(offsets, data, n) -> bytearray: 1 where a string of an Arrow string array (n values; ``offsets``
 * its n + 1 int32 offsets into ``data``) is the first of its value, 0 where the value came before. One hash
 * pass without the GIL: a table of (64-bit hash, index of the value's first string); strings whose hashes
 * match are compared byte for byte, so the mask is exact. ValueError for offsets outside the data. */
static PyObject *first_seen(PyObject *self, PyObject *args) {
    Py_buffer ob, db;
    Py_ssize_t n, i, cap = 1024, mask;
    PyObject *out = NULL;
    uint64_t *slots; /* per slot: the hash, then 1 + the index of the first string with it (0: empty) */
    uint8_t *m;
    const uint8_t *offp, *data;
    int bad = 0;
    if (!PyArg_ParseTuple(args, "y*y*n", &ob, &db, &n)) return NULL;
    if (n < 0 || ob.len / 4 < 1 || n > ob.len / 4 - 1) {
        PyErr_SetString(PyExc_ValueError, "offsets too short for n values");
        goto done;
    }
    while (cap * 7 < n * 10) cap *= 2;
    mask = cap - 1;
    out = PyByteArray_FromStringAndSize(NULL, n);
    if (!out) goto done;
    m = (uint8_t *)PyByteArray_AS_STRING(out);
    slots = (uint64_t *)big_calloc((size_t)cap * 2 * sizeof(uint64_t));
    if (!slots) {
        Py_CLEAR(out);
        PyErr_NoMemory();
        goto done;
    }
    offp = (const uint8_t *)ob.buf;
    data = (const uint8_t *)db.buf;
    Py_BEGIN_ALLOW_THREADS
    for (i = 0; i < n; i++) {
        uint64_t h[2];
        int32_t a, b;
        Py_ssize_t j;
        memcpy(&a, offp + 4 * i, 4); /* the offsets may sit at any address: copied, not cast */
        memcpy(&b, offp + 4 * (i + 1), 4);
        if (a < 0 || b < a || b > db.len) {
            bad = 1;
            break;
        }
        idset_hash(data + a, (size_t)(b - a), h);
        j = (Py_ssize_t)(h[0] & (uint64_t)mask);
        m[i] = 1;
        for (;;) {
            uint64_t k = slots[2 * j + 1];
            if (!k) {
                slots[2 * j] = h[0];
                slots[2 * j + 1] = (uint64_t)i + 1;
                break;
            }
            if (slots[2 * j] == h[0]) { /* the same hash: the same value only if the same bytes */
                int32_t fa, fb;
                memcpy(&fa, offp + 4 * (k - 1), 4);
                memcpy(&fb, offp + 4 * k, 4);
                if (fb - fa == b - a && (b == a || memcmp(data + fa, data + a, (size_t)(b - a)) == 0)) {
                    m[i] = 0;
                    break;
                }
            }
            j = (j + 1) & mask;
        }
    }
    Py_END_ALLOW_THREADS
    big_free(slots, (size_t)cap * 2 * sizeof(uint64_t));
    if (bad) {
        Py_CLEAR(out);
        PyErr_SetString(PyExc_ValueError, "offsets outside the data");
    }
done:
    PyBuffer_Release(&ob);
    PyBuffer_Release(&db);
    return out;
}

static PyObject *release_scratch(PyObject *mod, PyObject *noarg) {
    scratch_release();
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"release_scratch", (PyCFunction)release_scratch, METH_NOARGS,
     "Free the per-block arrays kept for the next prepare (an ingest calls it as it ends)."},
    {"scan_bundle", (PyCFunction)scan_bundle, METH_VARARGS, "The entries of a Bundle, streamed (see the source)."},
    {"first_seen", (PyCFunction)first_seen, METH_VARARGS, "1 where a string is the first of its value (see the source)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef flatc_module = {PyModuleDef_HEAD_INIT, "_flatc",
                                          "Compiled flatten of plain FHIR NDJSON lines (see the source).", -1,
                                          module_methods};

PyMODINIT_FUNC PyInit__flatc(void) {
    if (key_index_init() < 0) {
        PyErr_SetString(PyExc_SystemError, "_flatc: a member name too long, or too many of one length");
        return NULL;
    }
    PyObject *m;
    if (!c_locale) c_locale = newlocale(LC_NUMERIC_MASK, "C", (locale_t)0);
    if (!c_locale) return PyErr_NoMemory();
#ifdef HAVE_SHA_NI
    if (cpu_has_sha() && !getenv("SYNTHFACTORY_NO_SHA_NI")) compress = sha_compress_ni;
#endif
    if (PyType_Ready(&FlatType) < 0 || PyType_Ready(&ColumnsType) < 0 || PyType_Ready(&PreparedType) < 0 ||
        PyType_Ready(&IdSetType) < 0 || PyType_Ready(&PoolType) < 0)
        return NULL;
    m = PyModule_Create(&flatc_module);
    if (!m) return NULL;
    Py_INCREF(&FlatType);
    if (PyModule_AddObject(m, "Flattener", (PyObject *)&FlatType) < 0) {
        Py_DECREF(&FlatType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&ColumnsType);
    if (PyModule_AddObject(m, "Columns", (PyObject *)&ColumnsType) < 0) {
        Py_DECREF(&ColumnsType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&IdSetType);
    if (PyModule_AddObject(m, "IdSet", (PyObject *)&IdSetType) < 0) {
        Py_DECREF(&IdSetType);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "PreparePool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(&PoolType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddIntConstant(m, "SHA_NI", compress != sha_compress) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
