// Writes llama.cpp's reference outputs for teacher-forced logit tests: for each prompt, its
// token ids, llama.cpp's greedy continuation, and the five highest logits at every step.
//
// Built against a llama.cpp build (see make-reference.sh); never part of streamgen's build or
// tests. Input: a JSON list of prompt strings on stdin. Output: a JSON list of
// {prompt, prompt_ids, greedy_ids, top5_per_step} on stdout, the format of tests/data/*/greedy*.json.
//
// Usage: greedy_top5 MODEL.gguf N_GENERATE [stop-at-eog: 0|1] < prompts.json > out.json

#include "llama.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

// Minimal JSON string reading/writing: the input is a list of strings.
static std::vector<std::string> read_string_list(const std::string & s) {
    std::vector<std::string> out;
    size_t i = 0;
    auto hex = [](char c) { return (c >= '0' && c <= '9') ? c - '0' : (c | 32) - 'a' + 10; };
    while ((i = s.find('"', i)) != std::string::npos) {
        std::string cur;
        for (++i; i < s.size() && s[i] != '"'; ++i) {
            if (s[i] != '\\') { cur += s[i]; continue; }
            char e = s[++i];
            switch (e) {
                case 'n': cur += '\n'; break;
                case 't': cur += '\t'; break;
                case 'r': cur += '\r'; break;
                case 'b': cur += '\b'; break;
                case 'f': cur += '\f'; break;
                case 'u': {
                    unsigned cp = 0;
                    for (int k = 0; k < 4; ++k) cp = cp * 16 + hex(s[++i]);
                    if (cp >= 0xD800 && cp < 0xDC00) {  // surrogate pair
                        unsigned lo = 0;
                        i += 2;
                        for (int k = 0; k < 4; ++k) lo = lo * 16 + hex(s[++i]);
                        cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    }
                    if (cp < 0x80) cur += char(cp);
                    else if (cp < 0x800) { cur += char(0xC0 | cp >> 6); cur += char(0x80 | (cp & 63)); }
                    else if (cp < 0x10000) {
                        cur += char(0xE0 | cp >> 12); cur += char(0x80 | ((cp >> 6) & 63)); cur += char(0x80 | (cp & 63));
                    } else {
                        cur += char(0xF0 | cp >> 18); cur += char(0x80 | ((cp >> 12) & 63));
                        cur += char(0x80 | ((cp >> 6) & 63)); cur += char(0x80 | (cp & 63));
                    }
                    break;
                }
                default: cur += e;
            }
        }
        ++i;
        out.push_back(cur);
    }
    return out;
}

static std::string json_string(const std::string & s) {
    std::string out = "\"";
    for (unsigned char c : s) {
        if (c == '"') out += "\\\"";
        else if (c == '\\') out += "\\\\";
        else if (c == '\n') out += "\\n";
        else if (c == '\t') out += "\\t";
        else if (c < 0x20) { char buf[8]; snprintf(buf, sizeof buf, "\\u%04x", c); out += buf; }
        else out += char(c);
    }
    return out + "\"";
}

int main(int argc, char ** argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL N_GENERATE [STOP_AT_EOG] < prompts.json\n", argv[0]);
        return 2;
    }
    const int n_gen = atoi(argv[2]);
    const bool stop_at_eog = argc > 3 && atoi(argv[3]) != 0;
    std::string input((std::istreambuf_iterator<char>(std::cin)), std::istreambuf_iterator<char>());
    const auto prompts = read_string_list(input);

    llama_backend_init();
    auto mparams = llama_model_default_params();
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const int n_vocab = llama_vocab_n_tokens(vocab);

    printf("[");
    for (size_t p = 0; p < prompts.size(); ++p) {
        const std::string & prompt = prompts[p];
        std::vector<llama_token> ids(prompt.size() + 16);
        int n = llama_tokenize(vocab, prompt.c_str(), prompt.size(), ids.data(), ids.size(), true, true);
        if (n < 0) { fprintf(stderr, "tokenize failed\n"); return 1; }
        ids.resize(n);

        // The settings of llama.cpp's own tools: f16 cache, flash attention, 2 threads, the
        // whole prompt in one decode call.
        auto cparams = llama_context_default_params();
        cparams.n_ctx = ((n + n_gen) / 256 + 1) * 256;
        cparams.n_batch = 2048;
        cparams.n_ubatch = 512;
        cparams.n_threads = 2;
        cparams.n_threads_batch = 2;
        cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_ENABLED;
        llama_context * ctx = llama_init_from_model(model, cparams);
        if (!ctx) { fprintf(stderr, "cannot make a context\n"); return 1; }

        std::vector<llama_token> greedy;
        std::vector<std::vector<std::pair<int, float>>> top5;
        std::vector<llama_token> batch = ids;
        for (int step = 0; step < n_gen; ++step) {
            if (llama_decode(ctx, llama_batch_get_one(batch.data(), batch.size())) != 0) {
                fprintf(stderr, "decode failed\n");
                return 1;
            }
            const float * logits = llama_get_logits_ith(ctx, -1);
            std::vector<int> order(n_vocab);
            for (int i = 0; i < n_vocab; ++i) order[i] = i;
            std::partial_sort(order.begin(), order.begin() + 5, order.end(),
                              [&](int a, int b) { return logits[a] > logits[b]; });
            std::vector<std::pair<int, float>> best;
            for (int k = 0; k < 5; ++k) best.push_back({order[k], std::round(logits[order[k]] * 1e4f) / 1e4f});
            top5.push_back(best);
            const llama_token next = order[0];  // greedy: the highest logit, lowest id on ties
            greedy.push_back(next);
            if (stop_at_eog && llama_vocab_is_eog(vocab, next)) break;
            batch.assign(1, next);
        }
        llama_free(ctx);

        printf("%s\n{\"prompt\": %s, \"prompt_ids\": [", p ? "," : "", json_string(prompt).c_str());
        for (size_t i = 0; i < ids.size(); ++i) printf("%s%d", i ? ", " : "", ids[i]);
        printf("], \"greedy_ids\": [");
        for (size_t i = 0; i < greedy.size(); ++i) printf("%s%d", i ? ", " : "", greedy[i]);
        printf("], \"top5_per_step\": [");
        for (size_t i = 0; i < top5.size(); ++i) {
            printf("%s[", i ? ", " : "");
            for (size_t k = 0; k < top5[i].size(); ++k) printf("%s[%d, %.4f]", k ? ", " : "", top5[i][k].first, top5[i][k].second);
            printf("]");
        }
        printf("]}");
    }
    printf("\n]\n");
    llama_model_free(model);
    return 0;
}
