/* edgetl_head: see edgetl_head.h for the contract. C99, no allocation, single precision (a
 * Cortex-M4F/M7 FPU does float in hardware; double would be emulated). */
#include "edgetl_head.h"

#include <math.h>

#define EDGETL_MASK_NEG (-1e9f) /* added to inactive-class logits: exp() underflows to exactly 0 */
#define EDGETL_ADAM_BETA1 0.9f
#define EDGETL_ADAM_BETA2 0.999f
#define EDGETL_ADAM_EPS 1e-7f

static int head_ok(const edgetl_head *h) {
    return h != NULL && h->dim > 0 && h->capacity > 0 && h->W != NULL && h->b != NULL && h->mask != NULL;
}

/* p = masked_softmax(e . W + b) for one embedding; returns p[label] (or 0 when label < 0). */
static float softmax_row(const edgetl_head *h, const float *e, float *p, int32_t label) {
    const int32_t C = h->capacity;
    float top, sum = 0.0f;
    int32_t c, d;
    for (c = 0; c < C; ++c) {
        p[c] = h->b[c] + (1.0f - h->mask[c]) * EDGETL_MASK_NEG;
    }
    for (d = 0; d < h->dim; ++d) {
        const float ed = e[d];
        const float *w = h->W + (size_t)d * (size_t)C;
        for (c = 0; c < C; ++c) {
            p[c] += ed * w[c];
        }
    }
    top = p[0];
    for (c = 1; c < C; ++c) {
        top = p[c] > top ? p[c] : top;
    }
    for (c = 0; c < C; ++c) {
        p[c] = expf(p[c] - top);
        sum += p[c];
    }
    for (c = 0; c < C; ++c) {
        p[c] /= sum;
    }
    return label >= 0 ? p[label] : 0.0f;
}

int edgetl_head_reset_state(edgetl_head *head, edgetl_optimizer optimizer) {
    size_t i, n;
    if (!head_ok(head) || head->m_W == NULL || head->m_b == NULL) {
        return EDGETL_HEAD_BAD_ARGUMENT;
    }
    if (optimizer == EDGETL_ADAM && (head->v_W == NULL || head->v_b == NULL)) {
        return EDGETL_HEAD_BAD_ARGUMENT;
    }
    n = (size_t)head->dim * (size_t)head->capacity;
    for (i = 0; i < n; ++i) {
        head->m_W[i] = 0.0f;
        if (optimizer == EDGETL_ADAM) {
            head->v_W[i] = 0.0f;
        }
    }
    for (i = 0; i < (size_t)head->capacity; ++i) {
        head->m_b[i] = 0.0f;
        if (optimizer == EDGETL_ADAM) {
            head->v_b[i] = 0.0f;
        }
    }
    head->t = 0.0f;
    return EDGETL_HEAD_OK;
}

int edgetl_head_probabilities(const edgetl_head *head, const float *emb, int32_t rows, float *probs) {
    int32_t i;
    if (!head_ok(head) || emb == NULL || probs == NULL || rows <= 0) {
        return EDGETL_HEAD_BAD_ARGUMENT;
    }
    for (i = 0; i < rows; ++i) {
        softmax_row(head, emb + (size_t)i * (size_t)head->dim, probs + (size_t)i * (size_t)head->capacity, -1);
    }
    return EDGETL_HEAD_OK;
}

int32_t edgetl_head_predict(const edgetl_head *head, const float *emb, float *probs) {
    int32_t c, best = -1;
    if (!head_ok(head) || emb == NULL || probs == NULL) {
        return EDGETL_HEAD_BAD_ARGUMENT;
    }
    softmax_row(head, emb, probs, -1);
    for (c = 0; c < head->capacity; ++c) {
        if (head->mask[c] > 0.5f && (best < 0 || probs[c] > probs[best])) {
            best = c;
        }
    }
    return best;
}

void edgetl_dequantize(const int8_t *q, int32_t n, float scale, int32_t zero_point, float *out) {
    int32_t i;
    for (i = 0; i < n; ++i) {
        out[i] = scale * (float)((int32_t)q[i] - zero_point);
    }
}

float edgetl_head_sgd_learning_rate(float learning_rate, const float *emb, int32_t n, int32_t dim) {
    float total = 0.0f;
    size_t i, count;
    if (emb == NULL || n <= 0 || dim <= 0) {
        return learning_rate;
    }
    count = (size_t)n * (size_t)dim;
    for (i = 0; i < count; ++i) {
        total += emb[i] * emb[i];
    }
    return learning_rate / (total / (float)n + 1.0f);
}

/* Gradient of one weight, then its optimizer update (SGD with momentum, or Adam). */
static float update(float w, float g, float *m, float *v, edgetl_optimizer opt, float lr, float momentum,
                    float bias1, float bias2) {
    if (opt == EDGETL_SGD) {
        *m = momentum * *m + g;
        return w - lr * *m;
    }
    *m = EDGETL_ADAM_BETA1 * *m + (1.0f - EDGETL_ADAM_BETA1) * g;
    *v = EDGETL_ADAM_BETA2 * *v + (1.0f - EDGETL_ADAM_BETA2) * g * g;
    return w - lr * (*m / bias1) / (sqrtf(*v / bias2) + EDGETL_ADAM_EPS);
}

static int step_arguments_ok(const edgetl_head *h, edgetl_optimizer opt, const float *emb, const int32_t *labels,
                             const int32_t *rows, int32_t batch, const float *scratch) {
    int32_t i;
    if (!head_ok(h) || h->anchor == NULL || h->m_W == NULL || h->m_b == NULL || emb == NULL || labels == NULL ||
        rows == NULL || scratch == NULL || batch <= 0 || (opt != EDGETL_SGD && opt != EDGETL_ADAM)) {
        return 0;
    }
    if (opt == EDGETL_ADAM && (h->v_W == NULL || h->v_b == NULL)) {
        return 0;
    }
    for (i = 0; i < batch; ++i) {
        if (rows[i] < 0 || labels[rows[i]] < 0 || labels[rows[i]] >= h->capacity || h->mask[labels[rows[i]]] < 0.5f) {
            return 0;
        }
    }
    return 1;
}

int edgetl_head_step(edgetl_head *head, edgetl_optimizer optimizer, const float *emb, const int32_t *labels,
                     const int32_t *rows, int32_t batch, float lr, float l2, float momentum, float *scratch,
                     float *loss) {
    const int32_t C = head != NULL ? head->capacity : 0, D = head != NULL ? head->dim : 0;
    float ce = 0.0f, pull = 0.0f, bias1 = 1.0f, bias2 = 1.0f;
    int32_t i, c, d;
    if (!step_arguments_ok(head, optimizer, emb, labels, rows, batch, scratch)) {
        return EDGETL_HEAD_BAD_ARGUMENT;
    }
    /* scratch[i][c] = (p - y) / B: the gradient of the mean loss w.r.t. example i's logits. */
    for (i = 0; i < batch; ++i) {
        float *g = scratch + (size_t)i * (size_t)C;
        const int32_t label = labels[rows[i]];
        const float p_label = softmax_row(head, emb + (size_t)rows[i] * (size_t)D, g, label);
        ce -= logf(p_label > 1e-12f ? p_label : 1e-12f);
        g[label] -= 1.0f;
        for (c = 0; c < C; ++c) {
            g[c] /= (float)batch;
        }
    }
    if (optimizer == EDGETL_ADAM) {
        head->t += 1.0f;
        bias1 = 1.0f - powf(EDGETL_ADAM_BETA1, head->t);
        bias2 = 1.0f - powf(EDGETL_ADAM_BETA2, head->t);
    }
    for (d = 0; d < D; ++d) {
        for (c = 0; c < C; ++c) {
            const size_t k = (size_t)d * (size_t)C + (size_t)c;
            const float diff = head->W[k] - head->anchor[k];
            float g = l2 * diff;
            for (i = 0; i < batch; ++i) {
                g += emb[(size_t)rows[i] * (size_t)D + (size_t)d] * scratch[(size_t)i * (size_t)C + (size_t)c];
            }
            pull += diff * diff;
            head->W[k] = update(head->W[k], g, &head->m_W[k], head->v_W != NULL ? &head->v_W[k] : NULL, optimizer,
                                lr, momentum, bias1, bias2);
        }
    }
    for (c = 0; c < C; ++c) {
        float g = 0.0f;
        for (i = 0; i < batch; ++i) {
            g += scratch[(size_t)i * (size_t)C + (size_t)c];
        }
        head->b[c] = update(head->b[c], g, &head->m_b[c], head->v_b != NULL ? &head->v_b[c] : NULL, optimizer, lr,
                            momentum, bias1, bias2);
    }
    if (loss != NULL) {
        *loss = ce / (float)batch + 0.5f * l2 * pull;
    }
    return EDGETL_HEAD_OK;
}

edgetl_train_settings edgetl_default_settings(void) {
    edgetl_train_settings s;
    s.epochs = 30;
    s.batch_size = 16;
    s.learning_rate = 0.1f;
    s.l2 = 1e-3f;
    s.momentum = 0.9f;
    s.optimizer = EDGETL_SGD;
    s.seed = 0u;
    return s;
}

static uint32_t xorshift32(uint32_t *state) {
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *state = x;
    return x;
}

/* The SGD learning rate over the examples a fit uses (repeats included, as the Python trainers see them). */
static float fit_learning_rate(const edgetl_head *h, const edgetl_train_settings *s, const float *emb,
                               const int32_t *order, int32_t n) {
    float total = 0.0f;
    int32_t i, d;
    if (s->optimizer != EDGETL_SGD) {
        return s->learning_rate;
    }
    for (i = 0; i < n; ++i) {
        const float *e = emb + (size_t)order[i] * (size_t)h->dim;
        for (d = 0; d < h->dim; ++d) {
            total += e[d] * e[d];
        }
    }
    return s->learning_rate / (total / (float)n + 1.0f);
}

int edgetl_head_fit(edgetl_head *head, const float *emb, const int32_t *labels, const int32_t *rows, int32_t n,
                    const edgetl_train_settings *settings, int32_t *order, float *scratch, float *last_loss) {
    uint32_t rng;
    float lr;
    int32_t epoch, i, start;
    int status;
    if (settings == NULL || order == NULL || emb == NULL || n <= 0 || settings->epochs <= 0 ||
        settings->batch_size <= 0) {
        return EDGETL_HEAD_BAD_ARGUMENT;
    }
    status = edgetl_head_reset_state(head, settings->optimizer);
    if (status != EDGETL_HEAD_OK) {
        return status;
    }
    for (i = 0; i < n; ++i) {
        order[i] = rows != NULL ? rows[i] : i;
    }
    lr = fit_learning_rate(head, settings, emb, order, n);
    rng = settings->seed * 2654435761u + 0x9E3779B9u; /* xorshift32 must not start at 0 */
    rng = rng != 0u ? rng : 1u;
    for (epoch = 0; epoch < settings->epochs; ++epoch) {
        for (i = n - 1; i > 0; --i) { /* Fisher-Yates */
            const int32_t j = (int32_t)(xorshift32(&rng) % (uint32_t)(i + 1));
            const int32_t tmp = order[i];
            order[i] = order[j];
            order[j] = tmp;
        }
        for (start = 0; start < n; start += settings->batch_size) {
            const int32_t batch = n - start < settings->batch_size ? n - start : settings->batch_size;
            status = edgetl_head_step(head, settings->optimizer, emb, labels, order + start, batch, lr, settings->l2,
                                      settings->momentum, scratch, last_loss);
            if (status != EDGETL_HEAD_OK) {
                return status;
            }
        }
    }
    return EDGETL_HEAD_OK;
}
