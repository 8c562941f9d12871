/* The whole on-device personalization as firmware runs it, after TFLM has embedded the user's
 * examples: dequantize, train the head from the factory weights (with the replay embeddings
 * shipped in flash, against forgetting), predict. Built with the bundle's edgetl_model.c and
 * edgetl_head.c by tools/measure_mcu.py and tests/mcu; an example for docs/integration.md.
 * No malloc: every buffer below is static, sized by edgetl_model.h (as on a microcontroller). */
#include "edgetl_head.h"
#include "edgetl_model.h"

#ifndef MAX_USER_EXAMPLES
#define MAX_USER_EXAMPLES 64
#endif
#define MAX_TRAIN (MAX_USER_EXAMPLES + EDGETL_REPLAY_EXAMPLES)
/* Class balancing repeats example indices (4 bytes each), not embeddings. */
#define MAX_ROWS (EDGETL_MAX_CLASSES * MAX_TRAIN)
#define D EDGETL_EMBEDDING_SIZE
#define C EDGETL_MAX_CLASSES

static float W[D * C], b[C], velocity_W[D * C], velocity_b[C];
static float train_emb[MAX_TRAIN * D], scratch[16 * C], probs[C], one[D];
static int32_t train_labels[MAX_TRAIN], rows[MAX_ROWS], order[MAX_ROWS];

/* rows: every example once, then the examples of smaller classes again (cyclically) until every
 * class has as many as the largest, as edgetl's Personalizer does: otherwise the head tilts
 * toward the bigger classes. Returns the number of rows. */
static int32_t balance(int32_t n) {
    int32_t counts[C] = {0}, most = 0, c, i, k, out = 0;
    for (i = 0; i < n; ++i) {
        most = ++counts[train_labels[i]] > most ? counts[train_labels[i]] : most;
        rows[out++] = i;
    }
    for (c = 0; c < C; ++c) {
        for (i = 0, k = counts[c]; k > 0 && k < most; i = (i + 1) % n) {
            if (train_labels[i] == c) {
                rows[out++] = i;
                ++k;
            }
        }
    }
    return out;
}

/* user: n_user int8 embeddings (TFLM's output) with their head columns; test: n_test int8
 * embeddings to classify into predictions (head columns); seed: the shuffle's. Returns 0, or
 * -1 on bad arguments. */
int personalize_and_predict(const int8_t *user, const int32_t *user_labels, int32_t n_user, const int8_t *test,
                            int32_t n_test, int32_t *predictions, uint32_t seed) {
    edgetl_head head;
    edgetl_train_settings settings = edgetl_default_settings();
    int32_t i, n = 0;
    if (n_user < 0 || n_user > MAX_USER_EXAMPLES) {
        return -1;
    }
    for (i = 0; i < n_user; ++i) {
        if (user_labels[i] < 0 || user_labels[i] >= C) {
            return -1;
        }
    }
    settings.seed = seed;
    for (i = 0; i < D * C; ++i) {
        W[i] = edgetl_head_W[i]; /* start from the factory head; it stays in flash as the anchor */
    }
    for (i = 0; i < C; ++i) {
        b[i] = edgetl_head_b[i];
    }
    for (i = 0; i < n_user; ++i, ++n) {
        edgetl_dequantize(user + i * D, D, edgetl_embedding_scale, edgetl_embedding_zero_point, train_emb + n * D);
        train_labels[n] = user_labels[i];
    }
#if EDGETL_REPLAY_EXAMPLES > 0
    for (i = 0; i < EDGETL_REPLAY_EXAMPLES; ++i, ++n) {
        edgetl_dequantize(edgetl_replay_embeddings + i * D, D, edgetl_embedding_scale, edgetl_embedding_zero_point,
                          train_emb + n * D);
        train_labels[n] = edgetl_replay_labels[i];
    }
#endif
    head.dim = D;
    head.capacity = C;
    head.W = W;
    head.b = b;
    head.mask = edgetl_head_mask;
    head.anchor = edgetl_head_W;
    head.m_W = velocity_W;
    head.m_b = velocity_b;
    head.v_W = 0;
    head.v_b = 0;
    head.t = 0.0f;
    if (edgetl_head_fit(&head, train_emb, train_labels, rows, balance(n), &settings, order, scratch, 0) !=
        EDGETL_HEAD_OK) {
        return -1;
    }
    for (i = 0; i < n_test; ++i) {
        edgetl_dequantize(test + i * D, D, edgetl_embedding_scale, edgetl_embedding_zero_point, one);
        predictions[i] = edgetl_head_predict(&head, one, probs);
    }
    return 0;
}
