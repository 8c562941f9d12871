/* edgetl_head: the bundle's trainable linear head in dependency-free C99.
 *
 * The same contract as the bundle's head graphs (edgetl/bundle/_head.py):
 *
 *   p    = masked_softmax(e . W + b, mask)            W[D][C] row-major, b[C], mask[C] (1 = active class)
 *   loss = mean(-log p[label]) + l2/2 ||W - W0||^2    W0 = anchor (the factory head): pull against forgetting
 *   g    = (p - onehot(label)) / B;  gW = e^T g + l2 (W - W0);  gb = sum g
 *   SGD with momentum:  v = mu v + g;  w -= lr v
 *   Adam:  m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2;  t += 1;
 *          w -= lr (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)      b1 0.9, b2 0.999, eps 1e-7
 *
 * For SGD, edgetl normalises the learning rate by the embeddings' scale:
 * lr = learning_rate / (mean over examples of |e|^2 + 1) (edgetl_head_sgd_learning_rate).
 *
 * No malloc, no globals, no I/O: the caller owns every buffer. Only <math.h> (expf, logf,
 * sqrtf, powf) and <stdint.h>/<stddef.h> are used. Not thread-safe per head (one writer).
 */
#ifndef EDGETL_HEAD_H
#define EDGETL_HEAD_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define EDGETL_HEAD_OK 0
#define EDGETL_HEAD_BAD_ARGUMENT (-1) /* NULL buffer, size <= 0, label out of range or inactive */

typedef enum { EDGETL_SGD = 0, EDGETL_ADAM = 1 } edgetl_optimizer;

/* One head and its optimizer state. Every pointer is caller-owned memory:
 *   W, anchor: dim * capacity floats (row d, column c at [d * capacity + c]); b, mask: capacity floats.
 *   SGD:  m_W (velocity, dim * capacity), m_b (capacity); v_W, v_b may be NULL.
 *   Adam: m_W, v_W (dim * capacity), m_b, v_b (capacity); t counts steps.
 * anchor may point at the const factory weights in flash. */
typedef struct {
    int32_t dim;
    int32_t capacity;
    float *W;
    float *b;
    const float *mask;
    const float *anchor;
    float *m_W;
    float *m_b;
    float *v_W;
    float *v_b;
    float t;
} edgetl_head;

/* Zero the optimizer state (velocity / moments and t): what a new training run starts from. */
int edgetl_head_reset_state(edgetl_head *head, edgetl_optimizer optimizer);

/* Probabilities of `rows` embeddings (emb[rows][dim]) into probs[rows][capacity]. */
int edgetl_head_probabilities(const edgetl_head *head, const float *emb, int32_t rows, float *probs);

/* The active column with the highest probability for one embedding; probs: capacity floats of scratch
 * (receives the probabilities). Returns the column, or EDGETL_HEAD_BAD_ARGUMENT. */
int32_t edgetl_head_predict(const edgetl_head *head, const float *emb, float *probs);

/* int8 backbone output -> float embedding: e = scale * (q - zero_point). */
void edgetl_dequantize(const int8_t *q, int32_t n, float scale, int32_t zero_point, float *out);

/* learning_rate / (mean_i |emb_i|^2 + 1): the SGD step edgetl uses for n examples (emb[n][dim]). */
float edgetl_head_sgd_learning_rate(float learning_rate, const float *emb, int32_t n, int32_t dim);

/* One optimizer step on the batch emb[rows[0..batch-1]] with labels[rows[i]] (column indices; every
 * rows[i] must index an example of emb: the trainer does not know how many there are).
 * scratch: batch * capacity floats. momentum is used by SGD only. *loss (may be NULL) receives the
 * batch loss before the step. Returns EDGETL_HEAD_OK or EDGETL_HEAD_BAD_ARGUMENT (nothing changed). */
int edgetl_head_step(edgetl_head *head, edgetl_optimizer optimizer, const float *emb, const int32_t *labels,
                     const int32_t *rows, int32_t batch, float lr, float l2, float momentum, float *scratch,
                     float *loss);

/* Training settings of edgetl_head_fit (edgetl.device.TrainSettings' defaults: 30 epochs, batch 16,
 * learning_rate 0.1 (SGD; normalised as above), l2 1e-3, momentum 0.9, seed 0). */
typedef struct {
    int32_t epochs;
    int32_t batch_size;
    float learning_rate;
    float l2;
    float momentum;
    edgetl_optimizer optimizer;
    uint32_t seed;
} edgetl_train_settings;

edgetl_train_settings edgetl_default_settings(void);

/* A whole training run from a zero optimizer state on the examples rows[0..n-1] (indices into emb
 * and labels; an index may repeat, e.g. to balance classes; rows NULL: examples 0..n-1): every
 * epoch shuffles them (xorshift32 seeded by settings.seed, Fisher-Yates: the bundle's documented
 * batch order, "xorshift32-fisher-yates", so with rows NULL the batches are the Python trainers')
 * and steps through them in batches.
 * order: n int32 of scratch; scratch: batch_size * capacity floats. *last_loss may be NULL. */
int edgetl_head_fit(edgetl_head *head, const float *emb, const int32_t *labels, const int32_t *rows, int32_t n,
                    const edgetl_train_settings *settings, int32_t *order, float *scratch, float *last_loss);

#ifdef __cplusplus
}
#endif

#endif /* EDGETL_HEAD_H */
