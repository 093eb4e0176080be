/* Megatron's greedy blending index in C, loaded by blending_indices.py through ctypes.
 *
 * At sample i pick argmax_d  weights[d] * max(i, 1) - drawn[d]  (ties to the lowest d). The arithmetic is
 * the Python rule's, in double: compile without FMA contraction (-ffp-contract=off) or without SSE2 on
 * x86, or a product-then-subtract may round once instead of twice. Counts below 2^53 are exact as doubles,
 * so drawn[] is kept as double, which saves an int-to-double conversion per comparison.
 */
#include <stdint.h>
#include <stdlib.h>

/* Fill dataset_index[size] and dataset_sample_index[size]; return 0, or -1 if out of memory. */
int build_blending_indices(const double *weights, int64_t num_datasets, int64_t size,
                           const int64_t *start_counts, int64_t *dataset_index,
                           int64_t *dataset_sample_index)
{
    double *drawn = calloc((size_t)num_datasets, sizeof(double));
    if (drawn == NULL)
        return -1;
    for (int64_t i = 0; i < size; ++i) {
        const double target = (double)(i > 1 ? i : 1);
        int64_t best = 0;
        double best_lag = weights[0] * target - drawn[0];
        for (int64_t d = 1; d < num_datasets; ++d) {
            const double lag = weights[d] * target - drawn[d];
            if (lag > best_lag) {
                best = d;
                best_lag = lag;
            }
        }
        dataset_index[i] = best;
        dataset_sample_index[i] = start_counts[best] + (int64_t)drawn[best];
        drawn[best] += 1.0;
    }
    free(drawn);
    return 0;
}
