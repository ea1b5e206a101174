/* The sparse products of a CPU training step, in float32 (built at first use by kernels/cpu_native.py
 * with the machine's C compiler, -O3 -march=native).
 *
 *   cltrain_sampled_f32    out[p] = <W[f, :], Y[rows[p], :]>, for the pairs (f, rows[p]) listed by
 *                          feature (ccol[f] .. ccol[f + 1]): the decode's activation gradient on a mask
 *   cltrain_csr_dense_f32  out[r, :] (+)= sum_p vals[p] * D[idx[p], :] over row r's entries
 *                          (ptr[r] .. ptr[r + 1]): the decode's forward and weight gradient and the
 *                          encoder's weight gradient (CSR x dense)
 *   cltrain_decode_grads_f32  both products of a source layer's decode backward in one pass over its
 *                          decoder rows: out[p] = <W[f, :], Y[rows[p], :]> at the mask pairs, and
 *                          dW[f, :] = coef[f] W[f, :] + sum_p act[p] Y[rows[p], :] (the decoder
 *                          gradient with the decoder norms' term)
 *
 * Why not torch's own: on CPU torch.sparse.sampled_addmm computes one dot product per pair from
 * memory and the CSR x dense addmm (MKL) reaches ~10 GFLOP/s; both products load one dense operand
 * element per multiply-add from wherever it lies, so what matters is keeping that operand's column
 * block in cache and everything else in registers:
 *   - sampled: a column block of Y stays in cache while every feature's tokens re-read it, and 8
 *     tokens are dotted per pass over the feature's row block, so each W element loaded feeds 8 FMAs;
 *   - CSR x dense: a block of ACC_VECS x 16 output columns is accumulated in registers over the row's
 *     entries, so each loaded element of D feeds one FMA and nothing else touches memory.
 * The multiply-adds are torch's; only the summation order differs (fp32 rounding).
 *
 * Portable C: GCC/Clang vector extensions (lowered to AVX-512, AVX2 or NEON) and pthreads. Rows
 * (features, tokens) are split over threads by entry count. */
#include <pthread.h>
#include <stdint.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));  /* for unaligned loads / stores */
typedef float v16a __attribute__((vector_size(64)));
typedef float v8a __attribute__((vector_size(32)));
typedef float v4a __attribute__((vector_size(16)));
typedef union { v16a v; v8a h[2]; } u16;
typedef union { v8a v; v4a h[2]; } u8;

#define TILE_TOKENS 8
/* CSR x dense accumulators: 16 x 16 floats fill AVX-512's 32 registers by half; narrower vector
 * units (AVX2, NEON) split each v16 into 2 or 4 registers, so fewer */
#ifdef __AVX512F__
#define ACC_VECS 16
#else
#define ACC_VECS 4
#endif
#define MAX_THREADS 256
#ifndef CSR_PREFETCH_AHEAD
#define CSR_PREFETCH_AHEAD 4
#endif

static inline float hsum(v16a v) {  /* a tree of halves: a few vector adds, not 15 extractions */
    u16 a = {.v = v};
    u8 b = {.v = a.h[0] + a.h[1]};
    v4a c = b.h[0] + b.h[1];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

typedef struct {
    const float *A; int64_t lda;      /* sampled, one pass: W; CSR x dense: D */
    const float *Y; int64_t ldy;      /* sampled, one pass: Y */
    float *out; int64_t ldo;          /* CSR x dense: output rows; one pass: dW */
    const int64_t *ptr, *idx;
    const float *vals;                /* CSR x dense: entry values; one pass: act per pair */
    int64_t K, block;
    int accumulate;
    const float *coef;                /* one pass: per feature, or NULL */
    float *pair_out;                  /* one pass: the dot product per pair */
    int64_t r0, r1;                   /* this thread's rows */
} job_t;

/* ---------------------------------------------------------------------------------------------- */
/* sampled product */

static void sampled_block(const job_t *j, int64_t k0, int64_t k1) {
    const int64_t kv = k0 + ((k1 - k0) / 16) * 16;
    const int first = k0 == 0;
    for (int64_t f = j->r0; f < j->r1; f++) {
        const float *w = j->A + f * j->lda;
        int64_t p = j->ptr[f];
        const int64_t end = j->ptr[f + 1];
        for (; p + TILE_TOKENS <= end; p += TILE_TOKENS) {
            const float *y[TILE_TOKENS];
            v16a acc[TILE_TOKENS];
            for (int t = 0; t < TILE_TOKENS; t++) {
                y[t] = j->Y + j->idx[p + t] * j->ldy;
                acc[t] = (v16a){0};
            }
            for (int64_t k = k0; k < kv; k += 16) {
                const v16a wv = *(const v16 *)(w + k);
                for (int t = 0; t < TILE_TOKENS; t++) acc[t] += wv * *(const v16 *)(y[t] + k);
            }
            for (int t = 0; t < TILE_TOKENS; t++) {
                float s = hsum(acc[t]);
                for (int64_t k = kv; k < k1; k++) s += w[k] * y[t][k];
                j->out[p + t] = first ? s : j->out[p + t] + s;
            }
        }
        for (; p < end; p++) {
            const float *yr = j->Y + j->idx[p] * j->ldy;
            v16a acc = {0};
            for (int64_t k = k0; k < kv; k += 16) acc += *(const v16 *)(w + k) * *(const v16 *)(yr + k);
            float s = hsum(acc);
            for (int64_t k = kv; k < k1; k++) s += w[k] * yr[k];
            j->out[p] = first ? s : j->out[p] + s;
        }
    }
}

static void *sampled_job(void *arg) {
    const job_t *j = (const job_t *)arg;
    for (int64_t k0 = 0; k0 < j->K; k0 += j->block)
        sampled_block(j, k0, k0 + j->block < j->K ? k0 + j->block : j->K);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------- */
/* CSR x dense */

/* one full block of ACC_VECS x 16 columns starting at k0, accumulated in registers */
static inline void csr_block_full(const job_t *j, int64_t r, int64_t k0) {
    float *o = j->out + r * j->ldo + k0;
    /* the output block of the row CSR_PREFETCH_AHEAD on: rows lie a page or more apart (see grads_block) */
    if (r + CSR_PREFETCH_AHEAD < j->r1)
        for (int i = 0; i < ACC_VECS; i++) __builtin_prefetch(o + CSR_PREFETCH_AHEAD * j->ldo + 16 * i, 1, 3);
    v16a acc[ACC_VECS];
    for (int i = 0; i < ACC_VECS; i++) acc[i] = j->accumulate ? *(const v16 *)(o + 16 * i) : (v16a){0};
    for (int64_t p = j->ptr[r]; p < j->ptr[r + 1]; p++) {
        const float v = j->vals[p];
        const float *d = j->A + j->idx[p] * j->lda + k0;
        for (int i = 0; i < ACC_VECS; i++) acc[i] += v * *(const v16 *)(d + 16 * i);
    }
    for (int i = 0; i < ACC_VECS; i++) *(v16 *)(o + 16 * i) = acc[i];
}

/* the ragged last columns k0..k1 */
static void csr_block_rest(const job_t *j, int64_t r, int64_t k0, int64_t k1) {
    float *o = j->out + r * j->ldo;
    if (!j->accumulate)
        for (int64_t k = k0; k < k1; k++) o[k] = 0.0f;
    for (int64_t p = j->ptr[r]; p < j->ptr[r + 1]; p++) {
        const float v = j->vals[p];
        const float *d = j->A + j->idx[p] * j->lda;
        int64_t k = k0;
        for (; k + 16 <= k1; k += 16) *(v16 *)(o + k) = *(const v16 *)(o + k) + v * *(const v16 *)(d + k);
        for (; k < k1; k++) o[k] += v * d[k];
    }
}

static void *csr_job(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int64_t width = ACC_VECS * 16, full = (j->K / width) * width;
    /* column blocks outermost: the block of D (its rows x width floats) stays in cache for all rows */
    for (int64_t k0 = 0; k0 < full; k0 += width)
        for (int64_t r = j->r0; r < j->r1; r++) csr_block_full(j, r, k0);
    if (full < j->K)
        for (int64_t r = j->r0; r < j->r1; r++) csr_block_rest(j, r, full, j->K);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------- */
/* the decode backward's two products, fused */

/* Columns per block: the Y block (its tokens x GRAD_VECS x 16 floats, 512 KB at B = 1024 with
 * AVX-512) stays in L2 while every feature's tokens re-read it, and a feature's W and dW blocks sit in
 * registers (2 x GRAD_VECS vectors) while its tokens stream past: each W element is loaded once and
 * each dW element stored once per step, and each Y element loaded feeds two FMAs where the token is
 * active (the dot product and the weight gradient), one where it is only in the mask. */
#ifndef GRAD_VECS
#ifdef __AVX512F__
#define GRAD_VECS 8
#else
#define GRAD_VECS 2
#endif
#endif


/* columns k0 .. k0 + n*16 of feature f, n <= GRAD_VECS vectors. GRAD_TOKENS pairs at a time: their dot
 * products are independent chains of FMAs (one chain per pair would wait on FMA latency). An inactive
 * pair's act is 0, so adding act * Y leaves dW as it is: no branch per pair. */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 4
#endif
#ifndef GRAD_TOKENS
#define GRAD_TOKENS 4
#endif
static inline __attribute__((always_inline)) void grads_block(const job_t *j, int64_t f, int64_t k0, int n, int first) {
    const float *w = j->A + f * j->lda + k0;
    float *dw = j->out + f * j->ldo + k0;
    const float c = j->coef ? j->coef[f] : 0.0f;
    /* Features PREFETCH_AHEAD on, their decoder block and its gradient's: consecutive features' rows
     * lie tens of KB apart (a new page each), where the hardware prefetchers do not follow */
    if (f + PREFETCH_AHEAD < j->r1)
        for (int i = 0; i < n; i++) {
            __builtin_prefetch(w + PREFETCH_AHEAD * j->lda + 16 * i, 0, 3);
            __builtin_prefetch(dw + PREFETCH_AHEAD * j->ldo + 16 * i, 1, 3);
        }
    v16a wv[GRAD_VECS], acc[GRAD_VECS];
    for (int i = 0; i < GRAD_VECS; i++) {
        wv[i] = i < n ? *(const v16 *)(w + 16 * i) : (v16a){0};
        acc[i] = c * wv[i];
    }
    int64_t p = j->ptr[f];
    const int64_t end = j->ptr[f + 1];
    for (; p + GRAD_TOKENS <= end; p += GRAD_TOKENS) {
        const float *y[GRAD_TOKENS];
        float a[GRAD_TOKENS];
        v16a dot[GRAD_TOKENS];
        for (int t = 0; t < GRAD_TOKENS; t++) {
            y[t] = j->Y + j->idx[p + t] * j->ldy + k0;
            a[t] = j->vals[p + t];
            dot[t] = (v16a){0};
        }
        for (int i = 0; i < GRAD_VECS; i++) if (i < n) {
            for (int t = 0; t < GRAD_TOKENS; t++) {
                const v16a yv = *(const v16 *)(y[t] + 16 * i);
                dot[t] += wv[i] * yv;
                acc[i] += a[t] * yv;
            }
        }
        for (int t = 0; t < GRAD_TOKENS; t++) {
            const float s = hsum(dot[t]);
            j->pair_out[p + t] = first ? s : j->pair_out[p + t] + s;
        }
    }
    for (; p < end; p++) {
        const float *y = j->Y + j->idx[p] * j->ldy + k0;
        const float a = j->vals[p];
        v16a dot = {0};
        for (int i = 0; i < GRAD_VECS; i++) if (i < n) {
            const v16a yv = *(const v16 *)(y + 16 * i);
            dot += wv[i] * yv;
            acc[i] += a * yv;
        }
        const float s = hsum(dot);
        j->pair_out[p] = first ? s : j->pair_out[p] + s;
    }
    for (int i = 0; i < GRAD_VECS; i++) if (i < n) *(v16 *)(dw + 16 * i) = acc[i];
}

/* the last K % 16 columns, one at a time */
static void grads_tail(const job_t *j, int64_t f, int64_t k0, int first) {
    const float *w = j->A + f * j->lda;
    float *dw = j->out + f * j->ldo;
    const float c = j->coef ? j->coef[f] : 0.0f;
    for (int64_t k = k0; k < j->K; k++) dw[k] = c * w[k];
    for (int64_t p = j->ptr[f]; p < j->ptr[f + 1]; p++) {
        const float *y = j->Y + j->idx[p] * j->ldy;
        const float a = j->vals[p];
        float s = 0.0f;
        for (int64_t k = k0; k < j->K; k++) {
            s += w[k] * y[k];
            dw[k] += a * y[k];
        }
        j->pair_out[p] = first ? s : j->pair_out[p] + s;
    }
}

static void *grads_job(void *arg) {
    const job_t *j = (const job_t *)arg;
    const int64_t width = GRAD_VECS * 16, vec_end = (j->K / 16) * 16;
    /* column blocks outermost: the Y block stays in cache for all of this thread's features */
    for (int64_t k0 = 0; k0 < vec_end; k0 += width) {
        const int n = (int)((vec_end - k0 < width ? vec_end - k0 : width) / 16);
        if (n == GRAD_VECS)  /* a constant n: the inlined block keeps W and dW in registers */
            for (int64_t f = j->r0; f < j->r1; f++) grads_block(j, f, k0, GRAD_VECS, k0 == 0);
        else
            for (int64_t f = j->r0; f < j->r1; f++) grads_block(j, f, k0, n, k0 == 0);
    }
    if (vec_end < j->K)
        for (int64_t f = j->r0; f < j->r1; f++) grads_tail(j, f, vec_end, vec_end == 0);
    return NULL;
}

/* ---------------------------------------------------------------------------------------------- */

/* Runs `fn` over rows 0..n_rows split into contiguous ranges of about equal cost (entries, plus per_row
 * for each row); returns 0,
 * or -1 if a thread could not start (its rows then ran on the calling thread). */
static int run_split(void *(*fn)(void *), job_t proto, int64_t n_rows, int n_threads, int64_t per_row) {
    if (n_rows <= 0) return 0;
    if (n_threads < 1) n_threads = 1;
    if (n_threads > MAX_THREADS) n_threads = MAX_THREADS;
    job_t jobs[MAX_THREADS];
    pthread_t tids[MAX_THREADS];
    const int64_t *ptr = proto.ptr;
    /* row r's cost: its entries, plus per_row (work every row does whatever its entries) */
    const int64_t total = ptr[n_rows] - ptr[0] + per_row * n_rows;
    int64_t r = 0;
    int used = 0;
    for (int t = 0; t < n_threads && r < n_rows; t++) {
        const int64_t target = ptr[0] + (total * (t + 1)) / n_threads;
        int64_t r1 = r + 1;
        while (r1 < n_rows && ptr[r1 + 1] + per_row * (r1 + 1) <= target) r1++;
        if (t == n_threads - 1) r1 = n_rows;
        jobs[t] = proto;
        jobs[t].r0 = r;
        jobs[t].r1 = r1;
        r = r1;
        used = t + 1;
    }
    int started = 0, failed = 0;
    for (int t = 1; t < used; t++) {
        if (pthread_create(&tids[t], NULL, fn, &jobs[t]) != 0) { failed = 1; break; }
        started = t;
    }
    fn(&jobs[0]);
    for (int t = 1; t <= started; t++) pthread_join(tids[t], NULL);
    for (int t = started + 1; failed && t < used; t++) fn(&jobs[t]);
    return failed ? -1 : 0;
}

/* W [F, >= K] (row stride ldw), Y [*, >= K] (row stride ldy), ccol [F + 1], rows [ccol[F]],
 * out [ccol[F]]; block: columns per cache block. */
int cltrain_sampled_f32(const float *W, int64_t ldw, const float *Y, int64_t ldy, int64_t F, int64_t K,
                        const int64_t *ccol, const int64_t *rows, float *out, int64_t block, int n_threads) {
    job_t proto = {.A = W, .lda = ldw, .Y = Y, .ldy = ldy, .out = out, .ptr = ccol, .idx = rows, .K = K,
                   .block = block < 16 ? 16 : block};
    return run_split(sampled_job, proto, F, n_threads, 0);
}

/* out [R, >= K] (row stride ldo) (+)= CSR (ptr [R + 1], idx, vals) x D [*, >= K] (row stride ldd). */
int cltrain_csr_dense_f32(const int64_t *ptr, const int64_t *idx, const float *vals, int64_t R,
                          const float *D, int64_t ldd, int64_t K, float *out, int64_t ldo, int accumulate,
                          int n_threads) {
    job_t proto = {.A = D, .lda = ldd, .out = out, .ldo = ldo, .ptr = ptr, .idx = idx, .vals = vals, .K = K,
                   .accumulate = accumulate};
    return run_split(csr_job, proto, R, n_threads, 0);
}

/* Per feature f of W [F, >= K] (row stride ldw), its mask pairs ccol[f] .. ccol[f + 1] (token rows[p]
 * of Y [*, >= K], row stride ldy; activation act[p], 0 where inactive):
 *   out[p] = <W[f, :K], Y[rows[p], :K]>,   dW[f, :K] = coef[f] W[f, :K] + sum_p act[p] Y[rows[p], :K]
 * (coef NULL: 0); dW [F, >= K] (row stride lddw) is overwritten. */
int cltrain_decode_grads_f32(const float *W, int64_t ldw, const float *Y, int64_t ldy, float *dW, int64_t lddw,
                             int64_t F, int64_t K, const int64_t *ccol, const int64_t *rows, const float *act,
                             const float *coef, float *out, int n_threads) {
    job_t proto = {.A = W, .lda = ldw, .Y = Y, .ldy = ldy, .out = dW, .ldo = lddw, .ptr = ccol, .idx = rows,
                   .vals = act, .K = K, .coef = coef, .pair_out = out};
    /* features split by pairs plus a share for the dW row every feature writes */
    return run_split(grads_job, proto, F, n_threads, 4);
}
