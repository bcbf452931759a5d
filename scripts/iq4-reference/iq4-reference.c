// Reference data for streamgen's IQ4_NL and IQ4_XS tests: blocks of pseudo-random bytes (every
// bit pattern is a valid block once the f16 scale is finite) and what ggml's reference
// dequantizer (`ggml_get_type_traits(type)->to_float`, i.e. dequantize_row_iq4_nl/_xs in
// ggml-quants.c) makes of them. Writes tests/data/iq4/iq4_nl.json and iq4_xs.json: the values,
// as a JSON list of floats that read back to the same f32s. The blocks themselves are not
// stored: the tests make the same bytes with the same generator (`src/testdata.rs`).
//
//   cc -O1 -I$LLAMA/ggml/include scripts/iq4-reference/iq4-reference.c
//      -L$LLAMA_BUILD/bin -lggml-base -Wl,-rpath,$LLAMA_BUILD/bin -o /tmp/iq4-reference
//   (cd tests/data/iq4 && /tmp/iq4-reference)
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ggml.h"

static uint64_t state = 42;

static uint8_t next_byte(void) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    return (uint8_t)(state >> 56);
}

// Writes `blocks` blocks of `type` (`block_bytes` each, scale first) and their dequantized
// values to `path`.
static void emit(enum ggml_type type, int blocks, const char * path) {
    const struct ggml_type_traits * traits = ggml_get_type_traits(type);
    const size_t block_bytes = traits->type_size;
    const int64_t values = (int64_t)blocks * traits->blck_size;
    uint8_t * data = malloc(blocks * block_bytes);
    float * out = malloc(values * sizeof(float));
    for (size_t i = 0; i < blocks * block_bytes; i++) {
        data[i] = next_byte();
    }
    for (int b = 0; b < blocks; b++) {
        // A scale in [0.001, 0.05), negative for every third block.
        float d = 0.001f + 0.049f * (float)next_byte() / 256.0f;
        ggml_fp16_t h = ggml_fp32_to_fp16(b % 3 == 2 ? -d : d);
        memcpy(data + b * block_bytes, &h, sizeof(h));
    }
    traits->to_float(data, out, values);
    FILE * f = fopen(path, "w");
    if (!f) {
        perror(path);
        exit(1);
    }
    fprintf(f, "[");
    for (int64_t i = 0; i < values; i++) {
        fprintf(f, "%s%.9g", i ? (i % 8 ? ", " : ",\n ") : "", out[i]);
    }
    fprintf(f, "]\n");
    if (fclose(f) != 0) {
        perror(path);
        exit(1);
    }
    free(data);
    free(out);
}

int main(void) {
    emit(GGML_TYPE_IQ4_NL, 12, "iq4_nl.json");
    emit(GGML_TYPE_IQ4_XS, 6, "iq4_xs.json");
    return 0;
}
